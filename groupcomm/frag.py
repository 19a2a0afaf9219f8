"""Fragmentation and reassembly of large messages, sans-IO.

Every application message on the ring starts with one kind byte: ``0`` a whole
message, ``1`` a fragment ``(msg_id, index, count)``.  Fragments of one
message are sent in order by one sender, so per-sender FIFO makes reassembly a
matter of appending; the message takes its place in the total order where its
last fragment is delivered.

A message must be delivered inside one configuration, or joiners would see a
tail without its head.  So at every regular view all partial messages are
dropped, by every member alike, *including the sender's own reassembly*; the
sender then re-sends, as a new message, exactly the messages its own
reassembly dropped.  Members that moved together dropped the same ones (EVS:
they delivered the same fragments), so nobody delivers a message twice.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from groupcomm.config import Size
from groupcomm.errors import ConfigError, PayloadTooLarge
from groupcomm.events import Message

__all__ = ["FragConfig", "Fragmenter", "WHOLE", "FRAGMENT"]


@dataclass(frozen=True)
class FragConfig:
    """The FRAG layer: messages up to ``max_message`` bytes, split to fit the ring."""

    max_message: Size = 64 << 20

    def __post_init__(self) -> None:
        if self.max_message < 1:
            raise ConfigError("FRAG: max_message must be at least 1 byte")

WHOLE = 0
FRAGMENT = 1
_FRAG = struct.Struct(">BIII")          # kind, msg_id, index, count
_WHOLE = b"\x00"


@dataclass
class _Partial:
    count: int
    safe: bool
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
        self._outgoing: dict[int, tuple[bytes, bool]] = {}
        self._partial: dict[tuple[int, int], _Partial] = {}
        self._to_resend: list[tuple[bytes, bool]] = []
        self.dropped = 0

    def split(self, payload: bytes, safe: bool) -> list[bytes]:
        """The ring messages that carry ``payload``, in order."""
        size = len(payload)
        if size > self.max_message:
            raise PayloadTooLarge(
                f"payload of {size} bytes is over the limit of {self.max_message} bytes per message "
                "(FRAG max_message); send it in parts or raise the limit"
            )
        if size + 1 <= self._ring_max:
            return [_WHOLE + payload]
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        msg_id = self._next_id
        self._outgoing[msg_id] = (payload, safe)
        chunk = self._chunk
        count = -(-size // chunk)
        view = memoryview(payload)
        return [_FRAG.pack(FRAGMENT, msg_id, i, count) + view[i * chunk : (i + 1) * chunk] for i in range(count)]

    def deliver(self, sender: int, data: bytes, safe: bool) -> Message | None:
        """A ring delivery; returns the application message once it is whole."""
        if not data:
            self.dropped += 1
            return None
        if data[0] == WHOLE:
            return Message(sender, data[1:], safe)
        if data[0] != FRAGMENT or len(data) < _FRAG.size:
            self.dropped += 1
            return None
        _, msg_id, index, count = _FRAG.unpack_from(data)
        key = (sender, msg_id)
        chunk = data[_FRAG.size :]
        if index == 0 and count >= 1:
            partial = self._partial[key] = _Partial(count, safe, [chunk])
        else:
            partial = self._partial.get(key)
            if partial is None or index != len(partial.parts) or count != partial.count:
                self._lost(key)               # a tail whose head fell in another configuration
                return None
            partial.parts.append(chunk)
        if len(partial.parts) < partial.count:
            return None
        del self._partial[key]
        if sender == self.me:
            self._outgoing.pop(msg_id, None)
        return Message(sender, b"".join(partial.parts), partial.safe)

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

    def take_resends(self) -> list[tuple[bytes, bool]]:
        """Our own messages that were cut by a view change and must be sent again."""
        out, self._to_resend = self._to_resend, []
        return out

    def _lost(self, key: tuple[int, int]) -> None:
        self._partial.pop(key, None)
        self.dropped += 1
        sender, msg_id = key
        if sender == self.me and msg_id in self._outgoing:
            self._to_resend.append(self._outgoing.pop(msg_id))
