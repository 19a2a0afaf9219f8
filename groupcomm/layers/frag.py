"""Fragmentation and reassembly of large messages, sans-IO.

Every message on the ring carries a ``kind`` (0-127, see
:meth:`~groupcomm.core.ring.Ring.submit`) outside its payload: ``0`` is a whole
application message, :data:`FRAGMENT` a fragment with a header ``(msg_id,
index, count, inner kind)``, and the layers above use kinds of their own.  A
message that fits the ring travels as is, with no header and no copy.

Fragments of one message are sent in order by one sender, so per-sender FIFO
makes reassembly a matter of appending; the message takes its place in the
total order where its last fragment is delivered.

A message must be delivered inside one configuration, or joiners would see a
tail without its head.  So at every regular view all partial messages are
dropped, by every member alike, *including the sender's own reassembly*; the
sender then re-sends, as a new message, exactly the messages its own
reassembly dropped.  Members that moved together dropped the same ones (EVS:
they delivered the same fragments), so nobody delivers a message twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from groupcomm.config import Size
from groupcomm.errors import ConfigError, PayloadTooLarge
from groupcomm.layers.wire import FRAG_HEADER, KIND_FRAGMENT

__all__ = ["FragConfig", "Fragmenter", "FRAGMENT"]


@dataclass(frozen=True)
class FragConfig:
    """The FRAG layer: messages up to ``max_message`` bytes, split to fit the ring."""

    max_message: Size = 64 << 20
    """Largest application message; bigger ones are refused with PayloadTooLarge."""

    def __post_init__(self) -> None:
        if self.max_message < 1:
            raise ConfigError("FRAG: max_message must be at least 1 byte")

FRAGMENT = KIND_FRAGMENT
"""The ring kind of a fragment."""
_FRAG = FRAG_HEADER                     # msg_id, index, count, kind of the whole message


@dataclass
class _Partial:
    count: int
    safe: bool
    kind: int
    parts: list


class Fragmenter:
    """Splits outgoing payloads to fit the ring and reassembles deliveries."""

    def __init__(self, me: int, ring_max_payload: int, max_message: int) -> None:
        if ring_max_payload <= _FRAG.size:
            raise ValueError("ring payload limit too small for fragment headers")
        self.me = me
        self.max_message = max_message
        self._ring_max = ring_max_payload
        self._chunk = ring_max_payload - _FRAG.size
        self._next_id = 0
        self._outgoing: dict[int, tuple[bytes, bool, int]] = {}
        self._partial: dict[tuple[int, int], _Partial] = {}
        self._to_resend: list[tuple[bytes, bool, int]] = []
        self.dropped = 0

    def split(self, payload: bytes, safe: bool, kind: int = 0) -> list[bytes] | None:
        """``None`` if ``payload`` fits the ring whole; else its fragments, in order."""
        size = len(payload)
        if size > self.max_message:
            raise PayloadTooLarge(
                f"payload of {size} bytes is over the limit of {self.max_message} bytes per message "
                "(FRAG max_message); send it in parts or raise the limit"
            )
        if size <= self._ring_max:
            return None
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        msg_id = self._next_id
        self._outgoing[msg_id] = (payload, safe, kind)
        chunk = self._chunk
        count = -(-size // chunk)
        view = memoryview(payload)
        return [_FRAG.pack(msg_id, i, count, kind) + view[i * chunk : (i + 1) * chunk] for i in range(count)]

    def deliver(self, sender: int, data: bytes, safe: bool) -> tuple[bytes, int] | None:
        """A delivered fragment; returns ``(payload, kind)`` once the message is whole."""
        if len(data) < _FRAG.size:
            self.dropped += 1
            return None
        msg_id, index, count, kind = _FRAG.unpack_from(data)
        key = (sender, msg_id)
        chunk = data[_FRAG.size :]
        if index == 0 and count >= 1:
            if key in self._partial:
                self._lost(key)
            partial = self._partial[key] = _Partial(count, safe, kind, [chunk])
        else:
            partial = self._partial.get(key)
            if partial is None or index != len(partial.parts) or count != partial.count or kind != partial.kind:
                self._lost(key)               # a tail whose head fell in another configuration
                return None
            partial.parts.append(chunk)
        if len(partial.parts) < partial.count:
            return None
        del self._partial[key]
        if sender == self.me:
            self._outgoing.pop(msg_id, None)
        return b"".join(partial.parts), kind

    @property
    def last_id(self) -> int:
        """The msg id of the most recent message :meth:`split` fragmented."""
        return self._next_id

    def in_flight(self, msg_id: int) -> bool:
        """Whether our fragmented message ``msg_id`` is neither delivered nor cut."""
        return msg_id in self._outgoing

    def view(self) -> None:
        """A regular view was installed: drop every partial message."""
        for key in list(self._partial):
            self._lost(key)

    def take_resends(self) -> list[tuple[bytes, bool, int]]:
        """Our own messages that were cut by a view change and must be sent again."""
        out, self._to_resend = self._to_resend, []
        return out

    def _lost(self, key: tuple[int, int]) -> None:
        self._partial.pop(key, None)
        self.dropped += 1
        sender, msg_id = key
        if sender == self.me and msg_id in self._outgoing:
            self._to_resend.append(self._outgoing.pop(msg_id))
