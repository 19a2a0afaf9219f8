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

Memory is bounded at both ends: a message waiting to be sent is cut into
fragments one at a time, as the ring takes them (:class:`Fragments`), and a
receiver reassembles at most ``partial_messages`` messages and
``partial_bytes`` bytes per sender, none over ``max_message``
(:class:`FragConfig`); a message past a limit is dropped and counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from groupcomm.config import Size
from groupcomm.errors import ConfigError, PayloadTooLarge
from groupcomm.layers.wire import FRAG_HEADER, KIND_FRAGMENT

__all__ = ["FragConfig", "Fragmenter", "Fragments", "FRAGMENT", "Pieces"]


@dataclass(frozen=True)
class FragConfig:
    """The FRAG layer: messages up to ``max_message`` bytes, split to fit the ring, and the
    receivers' reassembly limits.  Every member must use the same values."""

    max_message: Size = 64 << 20
    """Largest application message; bigger ones are refused with PayloadTooLarge, and a
    receiver drops (and counts) a message whose fragments add up to more."""
    partial_messages: int = 2
    """Messages a receiver reassembles at once per sender; a new one past this drops the
    oldest (counted).  A sender has one fragmented message in flight at a time."""
    partial_bytes: Size | None = None
    """Bytes a receiver holds in partial messages per sender; the message that would pass it
    is dropped (counted) (default ``max_message``; at least ``max_message``)."""

    fragments_ahead: int = 32
    """Fragments of our large message handed to the ring at a time (the ring sends at most
    ``max_messages`` of a member's per token visit); the rest are cut as the ring sends these.
    Keeps the send of a large message from stalling its member's loop, and leaves the
    sender's other traffic (heartbeats, the token) a turn between slices."""

    def __post_init__(self) -> None:
        if self.fragments_ahead < 1:
            raise ConfigError("FRAG: fragments_ahead must be at least 1")
        if self.max_message < 1:
            raise ConfigError("FRAG: max_message must be at least 1 byte")
        if self.partial_messages < 1:
            raise ConfigError("FRAG: partial_messages must be at least 1")
        if self.partial_bytes is not None and self.partial_bytes < self.max_message:
            raise ConfigError("FRAG: partial_bytes must be at least max_message (or a message of "
                              "max_message bytes could never be reassembled)")

    @property
    def reassembly_bytes(self) -> int:
        """``partial_bytes`` with its default applied."""
        return self.max_message if self.partial_bytes is None else self.partial_bytes

FRAGMENT = KIND_FRAGMENT
"""The ring kind of a fragment."""
_FRAG = FRAG_HEADER                     # msg_id, index, count, kind of the whole message


@dataclass
class _Partial:
    count: int
    safe: bool
    kind: int
    parts: list
    size: int


class Pieces:
    """A reassembled message whose fragments are not yet joined into one ``bytes``.

    Reassembly keeps each fragment's payload (``bytes``, one fragment's worth of work as
    it arrives); the copy of the whole is :meth:`join`.  For a message of tens of MiB that
    copy takes tens of milliseconds, so a driver may do it in a worker thread, where it
    does not hold up the ring's timers (``bytes.join`` of ``bytes`` parts releases the GIL).
    """

    __slots__ = ("parts", "size")

    def __init__(self, parts: list, size: int) -> None:
        self.parts = parts
        self.size = size

    def __len__(self) -> int:
        return self.size

    def join(self) -> bytes:
        """The message's payload."""
        return b"".join(self.parts)


class Fragments(Sequence):
    """The fragments of one message, in order, each cut when it is asked for (the
    message is not copied up front: a queued 64 MiB message costs 64 MiB, not twice that)."""

    __slots__ = ("msg_id", "safe", "size", "_payload", "_chunk", "_kind", "_count")

    def __init__(self, msg_id: int, payload: bytes, safe: bool, kind: int, chunk: int) -> None:
        self.msg_id = msg_id
        self.safe = safe
        self.size = len(payload)
        self._payload = memoryview(payload)
        self._chunk = chunk
        self._kind = kind
        self._count = -(-self.size // chunk)

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._count))]
        if index < 0:
            index += self._count
        if not 0 <= index < self._count:
            raise IndexError("fragment index out of range")
        chunk = self._chunk
        return _FRAG.pack(self.msg_id, index, self._count, self._kind) + self._payload[index * chunk : (index + 1) * chunk]


class Fragmenter:
    """Splits outgoing payloads to fit the ring and reassembles deliveries.

    A receiver reassembles at most ``partial_messages`` messages and
    ``partial_bytes`` bytes per sender, and no message over ``max_message``;
    a message past a limit is dropped and counted in :attr:`refused` (its
    fragments in :attr:`dropped`).  Members with the same limits drop the
    same messages: they see the same fragments in the same order.
    """

    def __init__(self, me: int, ring_max_payload: int, max_message: int, *,
                 partial_messages: int = 2, partial_bytes: int | None = None) -> None:
        if ring_max_payload <= _FRAG.size:
            raise ValueError("ring payload limit too small for fragment headers")
        self.me = me
        self.max_message = max_message
        self.partial_messages = partial_messages
        self.partial_bytes = max_message if partial_bytes is None else max(partial_bytes, max_message)
        self._ring_max = ring_max_payload
        self._chunk = ring_max_payload - _FRAG.size
        self._next_id = 0
        self._outgoing: dict[int, tuple[bytes, bool, int]] = {}
        self._partial: dict[tuple[int, int], _Partial] = {}
        self._held: dict[int, list[int]] = {}        # sender -> [partial messages, bytes], while it has any
        self._to_resend: list[tuple[bytes, bool, int]] = []
        self.dropped = 0
        """Fragments dropped: malformed, cut by a view change, or of a refused message."""
        self.refused = 0
        """Messages dropped by a reassembly limit (``max_message``, ``partial_messages``, ``partial_bytes``)."""

    def check(self, size: int) -> None:
        """Raise PayloadTooLarge if a message of ``size`` bytes is over ``max_message``."""
        if size > self.max_message:
            raise PayloadTooLarge(
                f"payload of {size} bytes is over the limit of {self.max_message} bytes per message "
                "(FRAG max_message); send it in parts or raise the limit"
            )

    def split(self, payload: bytes, safe: bool, kind: int = 0) -> Fragments | None:
        """``None`` if ``payload`` fits the ring whole; else its fragments, in order."""
        size = len(payload)
        self.check(size)
        if size <= self._ring_max:
            return None
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        msg_id = self._next_id
        self._outgoing[msg_id] = (payload, safe, kind)
        return Fragments(msg_id, payload, safe, kind, self._chunk)

    def deliver(self, sender: int, data: bytes, safe: bool) -> tuple[bytes, int] | None:
        """A delivered fragment; returns ``(payload, kind)`` once the message is whole."""
        whole = self.deliver_pieces(sender, data, safe)
        return None if whole is None else (whole[0].join(), whole[1])

    def deliver_pieces(self, sender: int, data: bytes, safe: bool) -> tuple[Pieces, int] | None:
        """Like :meth:`deliver`, but the whole message comes as :class:`Pieces`, not yet joined."""
        if len(data) < _FRAG.size:
            self.dropped += 1
            return None
        msg_id, index, count, kind = _FRAG.unpack_from(data)
        key = (sender, msg_id)
        # A bytes copy of 64 kB per fragment, not a memoryview: bytes.join releases the GIL
        # only when every part is bytes, so a driver can join a large message off its loop.
        chunk = data[_FRAG.size :]
        size = len(chunk)
        if index == 0 and count >= 1:
            if key in self._partial:
                self._lost(key)
            # Every fragment but the last is as long as the first: the declared size is known.
            if (count - 1) * size >= self.max_message or size > self.max_message:
                self._refuse(key)
                return None
            if self._held.get(sender, (0,))[0] >= self.partial_messages:
                self._refuse(next(k for k in self._partial if k[0] == sender))    # the sender's oldest
            held = self._held.setdefault(sender, [0, 0])
            partial = self._partial[key] = _Partial(count, safe, kind, [], 0)
            held[0] += 1
        else:
            partial = self._partial.get(key)
            if partial is None or index != len(partial.parts) or count != partial.count or kind != partial.kind:
                self._lost(key)               # a tail whose head fell in another configuration
                return None
            held = self._held[sender]
        if partial.size + size > self.max_message or held[1] + size > self.partial_bytes:
            self._refuse(key)
            return None
        partial.parts.append(chunk)
        partial.size += size
        held[1] += size
        if len(partial.parts) < partial.count:
            return None
        self._forget(key)
        if sender == self.me:
            self._outgoing.pop(msg_id, None)
        return Pieces(partial.parts, partial.size), kind

    @property
    def last_id(self) -> int:
        """The msg id of the most recent message :meth:`split` fragmented."""
        return self._next_id

    @property
    def partial(self) -> int:
        """Bytes held in partial messages, all senders."""
        return sum(held[1] for held in self._held.values())

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

    def _forget(self, key: tuple[int, int]) -> _Partial | None:
        partial = self._partial.pop(key, None)
        if partial is not None:
            held = self._held[key[0]]
            held[0] -= 1
            held[1] -= partial.size
            if not held[0]:
                del self._held[key[0]]
        return partial

    def _lost(self, key: tuple[int, int]) -> None:
        self._forget(key)
        self.dropped += 1
        sender, msg_id = key
        if sender == self.me and msg_id in self._outgoing:
            self._to_resend.append(self._outgoing.pop(msg_id))

    def _refuse(self, key: tuple[int, int]) -> None:
        """Drop a message over a reassembly limit; its later fragments are dropped as tails.
        Never re-sent: our own messages are within the limits (the config guarantees it)."""
        partial = self._forget(key)
        self.refused += 1
        self.dropped += 1 if partial is None else len(partial.parts) + 1
        if key[0] == self.me:
            self._outgoing.pop(key[1], None)
