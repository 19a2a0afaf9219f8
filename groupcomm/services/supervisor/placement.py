"""Where cluster-placed processes run: pure functions of an agreed view (sans-IO).

Every member computes the same answer from the same agreed space view, so no
message is needed to decide:

* :func:`dc_host` -- the domain controller runs on the longest-standing
  eligible member of a primary view (a space view lists its members oldest
  first), and nowhere in a view that is not primary;
* :func:`replica_hosts` -- ``replicas = N`` instances go to the N eligible
  members that rank highest for that process under rendezvous hashing, so a
  membership change moves only the instances it must: those of a member that
  left, and those a new member now ranks highest for.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence

__all__ = ["dc_host", "replica_hosts", "rank"]


def dc_host(members: Sequence[int], eligible: Collection[int] | None, *, primary: bool) -> int | None:
    """The member that runs the domain controller, or None.

    ``members``: the agreed space view, oldest first; ``eligible``: the node ids
    that may host it (None: every member); ``primary``: whether the view is
    primary.  A view that is not primary never hosts one.
    """
    if not primary:
        return None
    return next((m for m in members if eligible is None or m in eligible), None)


def rank(process: str, node: int) -> int:
    """The rendezvous weight of ``node`` for ``process`` (the same on every member)."""
    digest = hashlib.blake2b(f"{process}\0{node}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def replica_hosts(process: str, members: Collection[int], eligible: Collection[int] | None, replicas: int, *,
                  primary: bool) -> tuple[int, ...]:
    """The members that run the ``replicas`` instances of ``process`` (fewer if fewer are eligible),
    highest rendezvous weight first; none in a view that is not primary."""
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, not {replicas}")
    if not primary:
        return ()
    candidates = [m for m in members if eligible is None or m in eligible]
    candidates.sort(key=lambda m: (rank(process, m), m), reverse=True)
    return tuple(candidates[:replicas])
