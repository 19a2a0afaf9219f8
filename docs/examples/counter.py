"""The replicated counter of the tutorial: the state machine, with no I/O.

Every replica applies the same increments in the same total order, so every
replica holds the same value.  A member that joins late gets a snapshot.
"""

from __future__ import annotations


class Counter:
    """A counter whose updates are messages: ``b"5"`` adds 5."""

    def __init__(self) -> None:
        self.value = 0

    def apply(self, payload: bytes) -> None:
        """One increment, as delivered in the total order."""
        self.value += int(payload)

    def snapshot(self) -> bytes:
        """The whole state, for a member that joins (the state provider)."""
        return str(self.value).encode()

    def restore(self, state: bytes | None) -> None:
        """Replace the state with a snapshot (``None``: nobody had any state yet)."""
        self.value = int(state) if state else 0
