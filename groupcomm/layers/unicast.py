"""Reliable, ordered point-to-point messages, sans-IO (the UNICAST layer).

For RPC replies, requests to one member and state transfer, without loading
the Totem ring.  Time is integer microseconds passed in by the caller; outputs
are taken in batches with :meth:`Unicast.take`.

Streams
    Each (sender, dest) pair has one *stream*: sequence numbers from 0,
    cumulative plus selective acknowledgement, retransmission with
    exponential backoff, and at most ``window`` packets (and no more than
    ``window_bytes`` of them) between the oldest unacknowledged one and the
    newest sent.  A message is cut into fragments
    of consecutive sequence numbers, so in-order delivery makes reassembly
    an append; the bytes are joined once, when the last fragment arrives.
    Streams are numbered by the sender (one counter per instance).  A
    receiver keeps, per sender, the highest ``(sender epoch, stream)`` it
    has accepted, even after the sender leaves the view (for the last
    ``remembered_peers`` peers to leave), and accepts a new stream only
    above it, so a late packet of a finished stream can never be taken for
    the start of a new one.  A sender starts a new stream to a
    peer after the peer left the view and came back, and after it restarted.

Acknowledgements
    An ACK carries the next sequence number expected (everything below
    arrived) and a bitmap of what arrived past that hole.  The receiver
    delays an in-order ack by ``ack_delay`` (one ack then covers many
    packets), and acks at once when a packet is out of order, a duplicate,
    fills a hole, or carries ACK_NOW: the sender sets that flag on
    retransmissions, each time half a window is in flight (so a full window
    never waits for the delay), and on the last packet of a message of
    several packets (so a sender that keeps a few large messages in flight,
    as the layers above do with snapshot chunks, sends the next one while
    the receiver works through this one, instead of waiting ``ack_delay``
    for every few).  ``UnicastSent`` is reported when the cumulative ack
    passes a message's last fragment, so it also means the message was
    delivered to the peer's application, in order.

Retransmission
    One timer per peer, armed at ``retransmit`` when a packet goes out and
    restarted whenever the cumulative ack advances.  When it fires, every
    in-flight packet the peer has not selectively acknowledged is sent again
    and the timeout doubles, up to ``max_retransmit``; progress resets it.
    Between timeouts, an ACK that selectively acknowledges a packet sent
    after a missing one re-sends the missing one at once (each transmission
    has a serial number, so this happens once per transmission, not once per
    duplicate ack).  A silent peer costs at most one window every
    ``max_retransmit``; deciding that it is dead is the membership's job, and
    :meth:`Unicast.set_members` then fails what was sent to it.

Incarnations
    Every packet carries the sender's epoch and the epoch the sender believes
    the receiver has (0 while unknown).  The driver must pass an epoch that
    grows across restarts of a node (for example wall-clock milliseconds at
    start); with a constant epoch a restarted node cannot be told from its
    previous life.

    * A packet whose sender epoch is below the highest seen from that sender
      comes from a dead incarnation and is dropped.
    * A higher sender epoch means the peer restarted: its receive state is
      dropped, and every message we had not seen fully acknowledged by the
      old incarnation (including messages still queued) is reported as
      ``UnicastFailed(reason="restarted")``.  Later sends go to the new
      incarnation on a new stream.  Failing the queued messages too is
      deliberate: a new life never receives the tail of a sequence whose
      head went to the old one (half a state transfer, say); what it
      receives from us starts with a message sent after we learned it
      restarted.
    * A DATA packet addressed to another epoch of the receiver is dropped and
      answered with an ACK carrying the receiver's epoch: that is how a
      sender whose peer restarted silently learns of it.
    * A stream's destination epoch is bound by the first packet heard from
      the peer.  Until then packets say "unknown" and any incarnation
      accepts them; so a message sent to a peer we never heard from (or only
      heard from before it left the view) may reach an incarnation that
      started after the send.

Failures
    ``UnicastFailed`` means delivery was *not confirmed*: the peer may have
    received the message before it left, restarted or its acks were lost.
    Reasons: :data:`NOT_MEMBER` (dest not in the current view at send time,
    or no view yet), :data:`LEFT`, :data:`RESTARTED`.

Packet format (big-endian; bytes 8..12 are always the sender, as the
transport expects; the structs are declared in :mod:`groupcomm.layers.wire`)::

    common  magic "GU" | version u8 | type u8 | cluster u32 | sender u32 | dest u32
            | sender epoch u64 | dest epoch u64 (0: unknown)                  32 bytes
    DATA    common | stream u32 | seq u64 | msg id u32 | index u32 | count u32
            | kind u8 | flags u8 | fragment bytes                            58 + n
    ACK     common | stream u32 | next expected seq u64 | bitmap length u16
            | bitmap (bit i: seq next+1+i arrived; little-endian)           46 + n
    RESET   laid out as an ACK with next expected 0 and no bitmap: "I dropped
            this stream" (I saw you leave my view while you did not see me
            leave yours; EVS allows that).  The sender fails the stream's
            messages as "left" and starts a new stream.                     46

Malformed, foreign, misaddressed, stale and duplicate packets are counted in
:attr:`Unicast.drops` by reason and dropped; so are packets of another protocol
version (``drops["version"]``, logged once per peer and version); :meth:`Unicast.receive` never
raises.  Every packet is parsed and bounds-checked in full before it changes any
state.  Sequence numbers are 64-bit and never wrap.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple, Union

from groupcomm.config import Duration, Size
from groupcomm.errors import ConfigError, LocalProtocolError, PayloadTooLarge, QueueFull
from groupcomm.core.ring import SendTo
from groupcomm.layers.wire import (
    PROTOCOL_VERSION,
    UNICAST_ACK,
    UNICAST_ACK_HEADER,
    UNICAST_ACK_NOW,
    UNICAST_COMMON,
    UNICAST_DATA,
    UNICAST_DATA_HEADER,
    UNICAST_MAGIC,
    UNICAST_RESET,
    VERSION_OFFSET,
    VersionLog,
    datagram_sender,
)

__all__ = [
    "MAGIC",
    "MAX_WINDOW",
    "LEFT",
    "NOT_MEMBER",
    "RESTARTED",
    "Unicast",
    "UnicastConfig",
    "UnicastFailed",
    "UnicastMessage",
    "UnicastOutput",
    "UnicastSent",
]

# The layouts live in groupcomm.layers.wire; the short names are this module's.
MAGIC = UNICAST_MAGIC
VERSION = PROTOCOL_VERSION
DATA, ACK, RESET = UNICAST_DATA, UNICAST_ACK, UNICAST_RESET
ACK_NOW = UNICAST_ACK_NOW
_KNOWN_FLAGS = ACK_NOW

_COMMON, _DATA, _ACK = UNICAST_COMMON, UNICAST_DATA_HEADER, UNICAST_ACK_HEADER
_COMMON_SIZE, _DATA_SIZE, _ACK_SIZE = _COMMON.size, _DATA.size, _ACK.size

MAX_WINDOW = 4096
"""Largest ``window``; also how far past a hole a receiver buffers packets."""
_MAX_BITMAP = MAX_WINDOW // 8
_MIN_MTU = 64
_MAX_MTU = 65507                                     # largest UDP payload over IPv4
_VERSION_BYTE = bytes([VERSION])
_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1
_US = 1_000_000

NOT_MEMBER = "not a member"
LEFT = "left"
RESTARTED = "restarted"


@dataclass(frozen=True)
class UnicastConfig:
    """The UNICAST layer: per-peer window, timers (seconds) and limits."""

    window: int = 64
    """Packets in flight per peer: from the oldest unacknowledged to the newest sent."""
    window_bytes: Size = 1 << 20
    """Bytes in flight per peer, at most (in whole packets of ``mtu``, at least one): with large
    datagrams a window of packets would outgrow the receiver's socket buffer and be lost."""
    retransmit: Duration = 0.02
    """First retransmission timeout."""
    max_retransmit: Duration = 0.5
    """Cap of the exponential backoff."""
    ack_delay: Duration = 0.002
    """An in-order packet is acknowledged this much later (cumulatively); 0 acks every packet at once."""
    mtu: Size = 1400
    """Largest packet this layer emits, header included."""
    max_message: Size = 64 << 20
    """Largest message; also the largest a receiver reassembles."""
    send_queue_max: int = 10000
    """Packets queued per peer beyond the window before ``send`` raises QueueFull.
    A message is always accepted when nothing is queued for that peer, so a
    message of ``max_message`` bytes can be sent even if it is more packets."""
    send_queue_bytes: Size = 64 << 20
    """Bytes queued per peer (not yet sent, and for ``send_to`` and requests to chosen
    members also waiting above this layer) before a send raises QueueFull (``await
    ch.send_to`` waits); a message is always accepted when nothing is queued for that peer."""
    remembered_peers: int = 1024
    """Peers that left the view whose last incarnation and stream are remembered (so a late
    packet of a finished stream is never taken for a new one); past this the one that left
    longest ago is forgotten."""

    def __post_init__(self) -> None:
        if not 1 <= self.window <= MAX_WINDOW:
            raise ConfigError(f"UNICAST: window must be >= 1 and <= {MAX_WINDOW}")
        if self.window_bytes < 1:
            raise ConfigError("UNICAST: window_bytes must be at least 1 byte")
        if self.retransmit <= 0:
            raise ConfigError("UNICAST: retransmit must be > 0")
        if self.max_retransmit < self.retransmit:
            raise ConfigError("UNICAST: max_retransmit must be >= retransmit")
        if not 0 <= self.ack_delay < self.retransmit:
            raise ConfigError("UNICAST: ack_delay must be >= 0 and < retransmit (else every packet is re-sent)")
        if not _MIN_MTU <= self.mtu <= _MAX_MTU:
            raise ConfigError(f"UNICAST: mtu must be between {_MIN_MTU} and {_MAX_MTU} bytes")
        if not 0 <= self.max_message <= _U32 * (self.mtu - _DATA_SIZE):
            raise ConfigError("UNICAST: max_message must be >= 0 and fit in 2**32 - 1 fragments")
        if self.send_queue_max < 1:
            raise ConfigError("UNICAST: send_queue_max must be >= 1")
        if self.send_queue_bytes < 1:
            raise ConfigError("UNICAST: send_queue_bytes must be at least 1 byte")
        if self.remembered_peers < 0:
            raise ConfigError("UNICAST: remembered_peers must be >= 0")


class UnicastMessage(NamedTuple):
    """A whole message from ``sender``, in the order ``sender`` sent it to us."""

    sender: int
    payload: bytes
    kind: int


class UnicastSent(NamedTuple):
    """``dest`` acknowledged every packet of ``msg_id`` (and so delivered it)."""

    dest: int
    msg_id: int


class UnicastFailed(NamedTuple):
    """Delivery of ``msg_id`` to ``dest`` is not confirmed and never will be: ``reason``."""

    dest: int
    msg_id: int
    reason: str


UnicastOutput = Union[SendTo, UnicastMessage, UnicastSent, UnicastFailed]

# Fields of an in-flight packet record (a list, mutated in place).
_TX, _SACKED, _MSG, _INDEX, _COUNT, _KIND, _CHUNK = range(7)
# Fields of a queued message record.
_Q_MSG, _Q_VIEW, _Q_KIND, _Q_COUNT, _Q_NEXT = range(5)


class _Out:
    """Our stream to one peer."""

    __slots__ = ("stream", "bound", "base", "next_seq", "flight", "queue", "queued", "unacked", "timer", "rto", "tx")

    def __init__(self, stream: int, rto: int) -> None:
        self.stream = stream
        self.bound: int | None = None          # the peer's epoch this stream talks to; None until heard
        self.base = 0                          # oldest unacknowledged seq
        self.next_seq = 0
        self.flight: dict[int, list] = {}      # seq -> [tx, sacked, msg id, index, count, kind, chunk]
        self.queue: deque[list] = deque()      # messages with fragments not yet sent: [msg id, view, kind, count, next]
        self.queued = 0                        # fragments in ``queue`` not yet sent
        self.unacked: deque[tuple[int, int]] = deque()   # (msg id, seq of its last fragment), all sent
        self.timer: int | None = None
        self.rto = rto
        self.tx = 0                            # transmission serial number


class _In:
    """A peer's stream to us."""

    __slots__ = ("epoch", "stream", "expected", "ooo", "ack_at", "parts", "part_msg", "part_count", "part_kind",
                 "part_next", "part_size")

    def __init__(self, epoch: int, stream: int) -> None:
        self.epoch = epoch
        self.stream = stream
        self.expected = 0
        self.ooo: dict[int, tuple] = {}       # seq -> (msg id, index, count, kind, fragment), past the hole
        self.ack_at: int | None = None
        self.parts: list | None = None         # fragments of the message being reassembled
        self.part_msg = self.part_count = self.part_kind = self.part_next = self.part_size = 0


class Unicast:
    """Reliable, ordered messages between members; see the module docstring for the protocol."""

    def __init__(self, me: int, cluster_id: int, config: UnicastConfig | None = None, *, epoch: int = 0) -> None:
        for name, value, top in (("me", me, _U32), ("cluster_id", cluster_id, _U32), ("epoch", epoch, _U64)):
            if not 0 <= value <= top:
                raise ValueError(f"UNICAST: {name} must be between 0 and {top}")
        self.me = me
        self.epoch = epoch
        self.config = config = config or UnicastConfig()
        self._cluster = cluster_id
        self._window = min(config.window, max(1, config.window_bytes // config.mtu))
        self._half = max(1, self._window // 2)
        self._rto0 = max(1, round(config.retransmit * _US))
        self._rto_max = max(self._rto0, round(config.max_retransmit * _US))
        self._ack_delay = round(config.ack_delay * _US)
        self._chunk = config.mtu - _DATA_SIZE
        self._max_bitmap = min(_MAX_BITMAP, config.mtu - _ACK_SIZE)
        self._members: frozenset[int] = frozenset()
        self._outs: dict[int, _Out] = {}
        self._ins: dict[int, _In] = {}
        self._epochs: dict[int, int] = {}                  # highest epoch seen per peer (kept after it leaves)
        self._accepted: dict[int, tuple[int, int]] = {}    # highest (epoch, stream) accepted per peer (kept too)
        self._departed: dict[int, None] = {}               # peers out of the view with entries above, oldest first
        self._streams = 0
        self._msg_ids = 0
        self._out: list = []
        self.drops: dict[str, int] = {}
        """Dropped packets by reason."""
        self.versions = VersionLog(me)
        """Logs packets of another protocol version once per peer (counted as ``drops["version"]``)."""
        self.sent = self.retransmitted = self.acks_sent = 0
        self.received = self.acks_received = self.delivered = self.discarded = 0
        self.completed = self.failed = 0
        self.resets_received = 0

    # -- inputs -------------------------------------------------------------------

    def send(self, now: int, dest: int, payload: bytes, kind: int = 0) -> int:
        """Queue ``payload`` for ``dest``; returns its msg id.

        The outcome arrives later as :class:`UnicastSent` or
        :class:`UnicastFailed` (at once, with :data:`NOT_MEMBER`, if ``dest`` is
        not in the current view).  Raises :class:`LocalProtocolError` for
        ``dest == me`` or a kind outside 0..255, :class:`PayloadTooLarge` over
        ``max_message`` and :class:`QueueFull` when ``dest``'s queue is full;
        nothing is queued then.  A payload that is not ``bytes`` is copied.
        """
        if dest == self.me:
            raise LocalProtocolError(f"UNICAST: node {dest} cannot send to itself")
        if not 0 <= kind <= 255:
            raise LocalProtocolError(f"UNICAST: kind must be between 0 and 255 (got {kind})")
        if not isinstance(payload, bytes):
            payload = bytes(payload)                   # a snapshot: fragments are cut lazily, as the window opens
        size = len(payload)
        if size > self.config.max_message:
            raise PayloadTooLarge(
                f"payload of {size} bytes is over the limit of {self.config.max_message} bytes per message "
                "(UNICAST max_message); send it in parts or raise the limit"
            )
        count = max(1, -(-size // self._chunk))
        out = self._outs.get(dest) if dest in self._members else None
        if out is not None:
            self._check_queue(dest, out, count)
        self._msg_ids += 1
        msg_id = self._msg_ids
        if dest not in self._members:
            self._fail_one(dest, msg_id, NOT_MEMBER)
            return msg_id
        if out is None:
            out = self._outs[dest] = self._open()
        out.queue.append([msg_id, memoryview(payload), kind, count, 0])
        out.queued += count
        self._fill(now, dest, out)
        return msg_id

    def receive(self, now: int, packet: bytes) -> None:
        """A packet starting with :data:`MAGIC`. Bad packets are counted in :attr:`drops`."""
        if packet[VERSION_OFFSET:VERSION_OFFSET + 1] != _VERSION_BYTE:
            if packet[:2] != MAGIC or len(packet) <= VERSION_OFFSET:
                return self._drop("malformed")
            self.versions("unicast", datagram_sender(packet), packet[VERSION_OFFSET])
            return self._drop("version")             # another layout, perhaps: look no further
        if len(packet) < _COMMON_SIZE:
            return self._drop("malformed")
        ptype = packet[3]
        if ptype == DATA:
            if len(packet) < _DATA_SIZE:
                return self._drop("malformed")
            fields = _DATA.unpack_from(packet)
        elif ptype == ACK or ptype == RESET:
            if len(packet) < _ACK_SIZE:
                return self._drop("malformed")
            fields = _ACK.unpack_from(packet)
        else:
            return self._drop("malformed")
        magic, _, _, cluster, sender, dest, s_epoch, d_epoch = fields[:8]
        if magic != MAGIC:
            return self._drop("malformed")
        if cluster != self._cluster:
            return self._drop("cluster")
        if dest != self.me:
            return self._drop("not_for_me")
        if sender not in self._members:
            return self._drop("not_member")
        if s_epoch < self._epochs.get(sender, 0):
            return self._drop("stale_epoch")
        if ptype == DATA:
            self._on_data(now, packet, fields)
        elif ptype == ACK:
            self._on_ack(now, packet, fields)
        else:
            self._on_reset(packet, fields)

    def tick(self, now: int) -> None:
        """Fire the timers due at ``now``: retransmissions and delayed acks."""
        for dest, out in self._outs.items():
            if out.timer is not None and out.timer <= now:
                self._timeout(now, dest, out)
        for sender, inn in self._ins.items():
            if inn.ack_at is not None and inn.ack_at <= now:
                self._ack(sender, inn)

    def set_members(self, members: Iterable[int], now: int) -> None:
        """A regular view was installed: fail and forget everything about peers that left it."""
        new = frozenset(members) - {self.me}
        for dest in [d for d in self._outs if d not in new]:
            self._fail_stream(dest, self._outs.pop(dest), LEFT)
        for sender in [s for s in self._ins if s not in new]:
            del self._ins[sender]
        self._members = new
        self._forget_departed(new)

    def _forget_departed(self, members: frozenset[int]) -> None:
        """Keep the epochs and streams of at most ``remembered_peers`` peers outside the view."""
        departed = self._departed
        for peer in [p for p in departed if p in members]:
            del departed[peer]
        for peer in self._epochs.keys() | self._accepted.keys():
            if peer not in members and peer not in departed:
                departed[peer] = None
        while len(departed) > self.config.remembered_peers:
            peer = next(iter(departed))
            del departed[peer]
            self._epochs.pop(peer, None)
            self._accepted.pop(peer, None)

    # -- outputs ------------------------------------------------------------------

    def take(self) -> list[UnicastOutput]:
        """Outputs since the last call, in the order they arose: SendTo, UnicastMessage, UnicastSent, UnicastFailed."""
        out, self._out = self._out, []
        return out

    def next_deadline(self) -> int | None:
        """When :meth:`tick` must next be called, or None if no timer is running."""
        deadline = None
        for out in self._outs.values():
            t = out.timer
            if t is not None and (deadline is None or t < deadline):
                deadline = t
        for inn in self._ins.values():
            t = inn.ack_at
            if t is not None and (deadline is None or t < deadline):
                deadline = t
        return deadline

    @property
    def has_output(self) -> bool:
        """Whether :meth:`take` would return anything."""
        return bool(self._out)

    @property
    def pending(self) -> int:
        """Packets not yet acknowledged (in flight or queued), all peers."""
        return sum(out.next_seq - out.base + out.queued for out in self._outs.values())

    def queued_bytes(self, dest: int) -> int:
        """Bytes queued for ``dest`` and not yet sent (counted in whole packets)."""
        out = self._outs.get(dest)
        return 0 if out is None else out.queued * self._chunk

    def in_flight(self, dest: int) -> int:
        """Packets sent to ``dest`` and not yet cumulatively acknowledged (at most ``window``)."""
        out = self._outs.get(dest)
        return 0 if out is None else out.next_seq - out.base

    def stats(self) -> dict[str, int]:
        """Counters: packets sent/retransmitted/received, acks, messages, peers whose incarnation is
        remembered, drops (total and ``drops_<reason>``)."""
        counters = {
            "sent": self.sent,
            "retransmitted": self.retransmitted,
            "received": self.received,
            "acks_sent": self.acks_sent,
            "acks_received": self.acks_received,
            "delivered": self.delivered,
            "discarded": self.discarded,
            "completed": self.completed,
            "failed": self.failed,
            "resets_received": self.resets_received,
            "pending": self.pending,
            "peers_remembered": len(self._epochs.keys() | self._accepted.keys()),
            "drops": sum(self.drops.values()),
        }
        counters.update((f"drops_{reason}", n) for reason, n in sorted(self.drops.items()))
        return counters

    # -- sending ------------------------------------------------------------------

    def _open(self) -> _Out:
        self._streams += 1
        if self._streams > _U32:
            raise LocalProtocolError("UNICAST: out of stream numbers; restart with a higher epoch")
        return _Out(self._streams, self._rto0)

    def _check_queue(self, dest: int, out: _Out, count: int) -> None:
        room = 0 if out.queue else max(0, out.base + self._window - out.next_seq)
        extra = max(0, count - room)
        limit, limit_bytes = self.config.send_queue_max, self.config.send_queue_bytes
        if out.queued and out.queued + extra > limit:
            raise QueueFull(
                f"UNICAST: {out.queued} packets already queued for node {dest} and this message needs {extra} more, "
                f"over send_queue_max={limit}; wait for UnicastSent/UnicastFailed and retry"
            )
        if out.queued and (out.queued + extra) * self._chunk > limit_bytes:
            raise QueueFull(
                f"UNICAST: {out.queued * self._chunk} bytes already queued for node {dest} and this message needs "
                f"{extra * self._chunk} more, over send_queue_bytes={limit_bytes}; wait for UnicastSent/UnicastFailed and retry"
            )

    def _fill(self, now: int, dest: int, out: _Out) -> None:
        """Send queued fragments while the window has room."""
        limit = out.base + self._window
        queue, flight, chunk = out.queue, out.flight, self._chunk
        while queue and out.next_seq < limit:
            m = queue[0]
            msg_id, index, count = m[_Q_MSG], m[_Q_NEXT], m[_Q_COUNT]
            seq = out.next_seq
            out.next_seq = seq + 1
            rec = [0, False, msg_id, index, count, m[_Q_KIND], m[_Q_VIEW][index * chunk : (index + 1) * chunk]]
            flight[seq] = rec
            out.queued -= 1
            if index + 1 == count:
                queue.popleft()
                out.unacked.append((msg_id, seq))
            else:
                m[_Q_NEXT] = index + 1
            in_flight = seq + 1 - out.base
            # Ask for the ack at once each half window and at the end of a message of several
            # packets: a sender paced above this layer (Member keeps a few messages in flight per
            # peer) then sends the next large message while the receiver works through this one.
            urgent = in_flight % self._half == 0 or in_flight == self._window or (count > 1 and index + 1 == count)
            self._transmit(dest, out, seq, rec, ACK_NOW if urgent else 0)
            self.sent += 1
        if out.timer is None and flight:
            out.timer = now + out.rto

    def _transmit(self, dest: int, out: _Out, seq: int, rec: list, flags: int) -> None:
        out.tx += 1
        rec[_TX] = out.tx
        header = _DATA.pack(
            MAGIC, VERSION, DATA, self._cluster, self.me, dest, self.epoch, out.bound or 0,
            out.stream, seq, rec[_MSG] & _U32, rec[_INDEX], rec[_COUNT], rec[_KIND], flags,
        )
        self._out.append(SendTo(dest, header + rec[_CHUNK]))

    def _timeout(self, now: int, dest: int, out: _Out) -> None:
        """Re-send what the peer has not acknowledged in any way; back off."""
        flight = out.flight
        for seq in range(out.base, out.next_seq):
            rec = flight[seq]
            if not rec[_SACKED]:
                self._transmit(dest, out, seq, rec, ACK_NOW)
                self.retransmitted += 1
        out.rto = min(out.rto * 2, self._rto_max)
        out.timer = now + out.rto if flight else None

    def _on_reset(self, packet: bytes, fields: tuple) -> None:
        sender, d_epoch, stream, bitmap_len = fields[4], fields[7], fields[8], fields[10]
        if len(packet) != _ACK_SIZE or bitmap_len:
            return self._drop("malformed")
        out = self._outs.get(sender)
        if d_epoch != self.epoch or out is None or stream != out.stream:
            return self._drop("stale_reset")             # about a stream we no longer use
        self.resets_received += 1
        del self._outs[sender]
        self._fail_stream(sender, out, LEFT)

    def _on_ack(self, now: int, packet: bytes, fields: tuple) -> None:
        sender, d_epoch, stream, cum, bitmap_len = fields[4], fields[7], fields[8], fields[9], fields[10]
        if len(packet) != _ACK_SIZE + bitmap_len or bitmap_len > _MAX_BITMAP:
            return self._drop("malformed")
        if d_epoch != self.epoch:
            return self._drop("wrong_epoch")          # meant for an earlier incarnation of us
        self._learn_epoch(sender, fields[6])
        out = self._outs.get(sender)
        if out is None or stream != out.stream:
            return self._drop("stale_stream")
        if cum > out.next_seq:
            return self._drop("bad_ack")
        if cum < out.base:
            return self._drop("stale_ack")            # overtaken by a later ack
        self.acks_received += 1
        if cum > out.base:
            self._advance(now, sender, out, cum)
        if bitmap_len:
            self._selective(sender, out, cum, int.from_bytes(packet[_ACK_SIZE:], "little"))
        self._fill(now, sender, out)

    def _advance(self, now: int, dest: int, out: _Out, cum: int) -> None:
        flight = out.flight
        for seq in range(out.base, cum):
            del flight[seq]
        out.base = cum
        unacked = out.unacked
        while unacked and unacked[0][1] < cum:
            self._out.append(UnicastSent(dest, unacked.popleft()[0]))
            self.completed += 1
        out.rto = self._rto0
        out.timer = now + out.rto if flight else None

    def _selective(self, dest: int, out: _Out, cum: int, bits: int) -> None:
        """Mark what arrived past the hole; re-send holes that later transmissions overtook."""
        flight, newest_tx = out.flight, 0
        top = min(cum + bits.bit_length(), out.next_seq - 1)     # highest seq the bitmap may name
        while bits:
            low = bits & -bits
            bits ^= low
            rec = flight.get(cum + low.bit_length())
            if rec is not None:
                rec[_SACKED] = True
                newest_tx = max(newest_tx, rec[_TX])
        for seq in range(out.base, top):
            rec = flight[seq]
            if not rec[_SACKED] and rec[_TX] < newest_tx:
                self._transmit(dest, out, seq, rec, ACK_NOW)
                self.retransmitted += 1

    # -- receiving ----------------------------------------------------------------

    def _on_data(self, now: int, packet: bytes, fields: tuple) -> None:
        (_, _, _, _, sender, _, s_epoch, d_epoch, stream, seq, msg_id, index, count, kind, flags) = fields
        if count == 0 or index >= count or flags & ~_KNOWN_FLAGS:
            return self._drop("malformed")
        self._learn_epoch(sender, s_epoch)
        inn = self._ins.get(sender)
        if d_epoch and d_epoch != self.epoch:
            self._drop("wrong_epoch")                 # for our previous life: tell the sender who we are now
            return self._send_ack(sender, s_epoch, stream, inn if inn and inn.stream == stream else None)
        if inn is None or inn.stream != stream or inn.epoch != s_epoch:
            if (s_epoch, stream) <= self._accepted.get(sender, (-1, -1)):
                self._drop("stale_stream")
                header = _ACK.pack(MAGIC, VERSION, RESET, self._cluster, self.me, sender, self.epoch, s_epoch,
                                   stream, 0, 0)
                self._out.append(SendTo(sender, header))
                return
            inn = self._ins[sender] = _In(s_epoch, stream)
            self._accepted[sender] = (s_epoch, stream)
        expected = inn.expected
        if seq != expected:
            if seq < expected or seq in inn.ooo:
                self._drop("duplicate")
            elif seq - expected >= MAX_WINDOW:
                return self._drop("out_of_window")
            else:
                inn.ooo[seq] = (msg_id, index, count, kind, memoryview(packet)[_DATA_SIZE:])
                self.received += 1
            return self._ack(sender, inn)
        self.received += 1
        self._consume(sender, inn, msg_id, index, count, kind, memoryview(packet)[_DATA_SIZE:])
        expected += 1
        ooo, filled = inn.ooo, False
        while expected in ooo:
            self._consume(sender, inn, *ooo.pop(expected))
            expected += 1
            filled = True
        inn.expected = expected
        if filled or ooo or flags & ACK_NOW or not self._ack_delay:
            self._ack(sender, inn)
        elif inn.ack_at is None:
            inn.ack_at = now + self._ack_delay

    def _consume(self, sender: int, inn: _In, msg_id: int, index: int, count: int, kind: int, data: memoryview) -> None:
        """The next fragment of ``sender``'s stream, in order."""
        if index == 0:
            if inn.parts is not None:
                self._discard(inn)                     # the previous message never finished
            if count == 1:
                self._deliver(sender, bytes(data), kind)
                return
            inn.parts, inn.part_msg, inn.part_count, inn.part_kind = [], msg_id, count, kind
            inn.part_next = inn.part_size = 0
        elif inn.parts is None or index != inn.part_next or (msg_id, count, kind) != (
            inn.part_msg, inn.part_count, inn.part_kind
        ):
            self._discard(inn)                         # a fragment out of place: drop the message with it
            return
        parts = inn.parts
        inn.part_next += 1
        inn.part_size += len(data)
        if inn.part_size <= self.config.max_message:
            parts.append(data)
        elif parts:
            parts.clear()                              # too large: keep consuming its fragments, not its bytes
        if inn.part_next == count:
            inn.parts = None
            if inn.part_size <= self.config.max_message:
                self._deliver(sender, b"".join(parts), kind)
            else:
                self.discarded += 1

    def _discard(self, inn: _In) -> None:
        inn.parts = None
        self.discarded += 1

    def _deliver(self, sender: int, payload: bytes, kind: int) -> None:
        self._out.append(UnicastMessage(sender, payload, kind))
        self.delivered += 1

    def _ack(self, sender: int, inn: _In) -> None:
        self._send_ack(sender, inn.epoch, inn.stream, inn)

    def _send_ack(self, sender: int, s_epoch: int, stream: int, inn: _In | None) -> None:
        """Acknowledge ``inn`` (or nothing of ``stream``, to tell ``sender`` our epoch)."""
        cum, bitmap = 0, b""
        if inn is not None:
            inn.ack_at = None
            cum = inn.expected
            if inn.ooo:
                bits = 0
                for seq in inn.ooo:
                    bits |= 1 << (seq - cum - 1)
                size = min((bits.bit_length() + 7) // 8, self._max_bitmap)
                bitmap = (bits & ((1 << 8 * size) - 1)).to_bytes(size, "little")
        header = _ACK.pack(MAGIC, VERSION, ACK, self._cluster, self.me, sender, self.epoch, s_epoch,
                           stream, cum, len(bitmap))
        self._out.append(SendTo(sender, header + bitmap))
        self.acks_sent += 1

    # -- incarnations and failures ------------------------------------------------

    def _learn_epoch(self, peer: int, epoch: int) -> None:
        """A valid packet from ``peer`` says it runs as ``epoch`` (never lower than known)."""
        known = self._epochs.get(peer)
        if known is not None and epoch == known:
            out = self._outs.get(peer)
            if out is not None and out.bound is None:
                out.bound = epoch
            return
        self._epochs[peer] = epoch
        inn = self._ins.get(peer)
        if inn is not None and inn.epoch < epoch:
            del self._ins[peer]                        # its previous life's stream
        out = self._outs.get(peer)
        if out is None:
            return
        if out.bound is None:
            out.bound = epoch
        elif out.bound < epoch:
            del self._outs[peer]
            self._fail_stream(peer, out, RESTARTED)

    def _fail_stream(self, dest: int, out: _Out, reason: str) -> None:
        for msg_id, _ in out.unacked:
            self._fail_one(dest, msg_id, reason)
        for m in out.queue:
            self._fail_one(dest, m[_Q_MSG], reason)

    def _fail_one(self, dest: int, msg_id: int, reason: str) -> None:
        self._out.append(UnicastFailed(dest, msg_id, reason))
        self.failed += 1

    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1
