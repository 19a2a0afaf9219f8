"""A thin typed wrapper around the C Totem core (``groupcomm/_ring.c``).

The ring is sans-IO: feed it packets, application messages and the time; take
its outputs (packets to send, deliveries, configuration changes) in batches
with :meth:`Ring.take`.  Time is integer microseconds of a clock the caller
owns.
"""

from __future__ import annotations

import enum
import math
import struct
from array import array
from functools import partial
from itertools import repeat
from dataclasses import dataclass, field
from typing import NamedTuple, Union

from groupcomm.core.native import ffi, lib
from groupcomm.config import Duration, Size
from groupcomm.errors import (
    ConfigError,
    LocalProtocolError,
    NotOperational,
    PayloadTooLarge,
    QueueFull,
    RemoteProtocolError,
)
from groupcomm.events import Configuration, Delivery, RingId

__all__ = [
    "Ring", "RingConfig", "RingState", "SendToAll", "SendTo", "LayerDelivery", "Output", "MAX_MEMBERS",
    "parse_actions", "BAD_VERSION", "FROM_A_LIVE_PEER",
]

MAX_MEMBERS: int = lib.GC_MAX_MEMBERS
BAD_VERSION: int = lib.GC_EBADVERSION
""":meth:`Ring.receive`'s result for a packet of another protocol version."""
FROM_A_LIVE_PEER = frozenset({lib.GC_OK, lib.GC_ESTALE, lib.GC_EIGNORED})
""":meth:`Ring.receive` results of a well-formed packet of this cluster from a peer:
a sign of life for a failure detector, even when the ring had no use for it."""
_ACTION = struct.Struct("=BBHIQII")
assert ffi.sizeof("gc_action_t") == _ACTION.size == 24
assert array("I").itemsize == 4
_PLAIN = 3                   # first record word of an agreed kind-0 delivery: kind 3, flags 0
_PLAIN_SAFE = 3 | (1 << 8)   # ... and of a safe one
_MAX_KIND = 127
_OUTPUT = lib.GC_OUTPUT
_tuple_new = tuple.__new__
_US = 1_000_000


class RingState(enum.IntEnum):
    """The Totem membership states, plus before-start and after-leave."""

    INIT = lib.GC_STATE_INIT
    GATHER = lib.GC_STATE_GATHER
    COMMIT = lib.GC_STATE_COMMIT
    RECOVERY = lib.GC_STATE_RECOVERY
    OPERATIONAL = lib.GC_STATE_OPERATIONAL
    LEFT = lib.GC_STATE_LEFT


@dataclass(frozen=True, slots=True)
class SendToAll:
    """Multicast ``packet`` to every member of the cluster."""

    packet: bytes


@dataclass(frozen=True, slots=True)
class SendTo:
    """Send ``packet`` to member ``node`` only (the token's next hop)."""

    node: int
    packet: bytes


class LayerDelivery(NamedTuple):
    """A delivered message that a layer above submitted with a nonzero ``kind``."""

    sender: int
    payload: bytes
    safe: bool
    kind: int


Output = Union[SendToAll, SendTo, Delivery, LayerDelivery, Configuration]


def _derived(value: float | None, default: float) -> float:
    return default if value is None else value


@dataclass(frozen=True)
class RingConfig:
    """Timers and limits of the Totem ring; durations in seconds.

    Defaults follow corosync's ``totem`` section.  Leaving ``token_retransmit``,
    ``hold`` or ``consensus`` unset derives them from ``token_timeout`` the way
    corosync does, which keeps the required order
    ``hold < token_retransmit < token_timeout < consensus``.
    """

    token_timeout: Duration = 1.0
    """No token for this long: the ring is broken, start a membership round."""
    token_retransmit: Duration | None = None
    """Re-send our last token after this long (default ``token_timeout / 4.2``)."""
    hold: Duration | None = None
    """Idle ring: the representative parks the token this long
    (default ``max(0.8 * token_retransmit - 10ms, token_retransmit / 2)``)."""
    join: Duration = 0.05
    """Join messages are re-sent this often while gathering."""
    consensus: Duration | None = None
    """Gathering gives up on silent members after this (default ``1.2 * token_timeout``)."""
    merge: Duration = 0.2
    """An idle representative announces its ring this often, so partitions merge."""
    startup_wait: Duration | None = None
    """A fresh member gathers this long before forming its first ring, so members
    started together form one ring rather than several (default ``4 * join``)."""
    mtu: Size = 1400
    """Largest datagram the ring sends; application messages are packed up to it."""
    max_members: int = 32
    """Largest ring (at most 64); a commit token for this many must fit in ``mtu``."""
    window_size: int = 50
    """Ring messages (datagrams) per token rotation, all members together."""
    max_messages: int = 17
    """Ring messages one member may send per token visit."""
    send_queue_max: int = 10000
    """Application messages a member may queue before ``submit`` raises QueueFull."""
    send_queue_bytes: Size = 64 << 20
    """Bytes of its own messages a member may hold not yet ordered (queued for the ring,
    or a large message being fragmented) before a send raises QueueFull (``await
    ch.send`` waits); a message is always taken when nothing is queued."""
    sort_queue_size: int = 4096
    """Sequence numbers in flight (a power of two, at least 4 * window_size)."""
    retransmit_bytes: Size = 32 << 20
    """Bytes of ring messages a member may keep for retransmission.  Every member
    keeps each ring message (in an ``mtu``-sized buffer) until every member has it,
    so no member stamps a new one while the messages from the oldest one kept to the
    newest would take more than this: ``retransmit_bytes / mtu`` messages, at least
    ``2 * window_size`` and at most ``sort_queue_size``.  At least ``mtu``."""
    fail_recv_const: int = 2500
    """Token rotations with our aru stuck before we exclude ourselves (and at least
    two token timeouts stuck)."""
    seqno_unchanged_const: int = 30
    """Idle rotations before the token is held."""
    miss_count_const: int = 5
    """Token visits a missing message must stay missing before we request it."""
    token_retransmits_max: int = 4
    """Re-sends of one token before waiting for the token-loss timeout."""
    pause_fraction: float = 0.5
    """Pause detection: called this fraction of ``token_timeout`` or more past its
    next deadline, a member concludes that *it* was stopped (SIGSTOP, a long GC, a VM
    stall): instead of blaming the others at once, it restarts its token-loss and
    consensus timers and ignores the joins that queued up meanwhile (Corosync also
    uses half the token timeout)."""
    exclusion_backoff: Duration | None = None
    """A member that excluded itself (it kept missing messages the others have: a
    one-way link, a partly deaf member) stays out in a quarantined singleton ring
    at least this long, doubled for each exclusion in a row up to
    ``exclusion_backoff_max``; after that it merges only once every member of a
    ring answered its probes directly (default ``token_timeout``)."""
    exclusion_backoff_max: Duration | None = None
    """Cap of the doubling back-off above (default ``4 * token_timeout``)."""
    cluster_id: int = 0
    """Packets carrying another cluster id are dropped."""
    initial_seq: int = 0
    """Test knob: sequence number before the first message of each ring (wrap-around tests)."""
    initial_token_seq: int = 0
    """Test knob: token sequence of each new ring."""
    mutation: int = field(default=0, repr=False)
    """Test knob: a deliberate bug, for proving the EVS checker catches it. Never set in production."""

    @property
    def consensus_timeout(self) -> float:
        """``consensus`` in force (seconds): the value given, else ``1.2 * token_timeout``."""
        return _derived(self.consensus, 1.2 * self.token_timeout)

    @property
    def join_timeout(self) -> float:
        """How long forming or joining a ring may take before a caller gives up (seconds):
        ``startup_wait + 10 * consensus``, derived values included."""
        consensus = _derived(self.consensus, 1.2 * self.token_timeout)
        return _derived(self.startup_wait, 4 * self.join) + 10 * consensus

    def to_c(self, node_id: int, ring_seq_floor: int = 0):
        """Build and validate the C config struct; raises ConfigError naming the bad field."""
        token_retransmit = _derived(self.token_retransmit, self.token_timeout / 4.2)
        hold = _derived(self.hold, max(token_retransmit * 0.8 - 0.010, token_retransmit * 0.5))
        consensus = _derived(self.consensus, 1.2 * self.token_timeout)
        if not isinstance(self.send_queue_bytes, int) or self.send_queue_bytes < 1:
            raise ConfigError(f"ring config: send_queue_bytes must be at least 1 byte, not {self.send_queue_bytes!r}")
        if not isinstance(self.retransmit_bytes, int) or isinstance(self.retransmit_bytes, bool):
            raise ConfigError(f"ring config: retransmit_bytes must be a number of bytes, not {self.retransmit_bytes!r}")
        cfg = ffi.new("gc_ring_config_t *")
        lib.gc_ring_config_default(cfg)
        values = {
            "node_id": node_id,
            "cluster_id": self.cluster_id,
            "ring_seq_floor": ring_seq_floor,
            "mtu": self.mtu,
            "max_members": self.max_members,
            "window_size": self.window_size,
            "max_messages": self.max_messages,
            "send_queue_max": self.send_queue_max,
            "sort_queue_size": self.sort_queue_size,
            "retransmit_bytes": self.retransmit_bytes,
            "token_timeout_us": _to_us("token_timeout", self.token_timeout),
            "token_retransmit_us": _to_us("token_retransmit", token_retransmit),
            "hold_us": _to_us("hold", hold),
            "join_us": _to_us("join", self.join),
            "consensus_us": _to_us("consensus", consensus),
            "merge_us": _to_us("merge", self.merge),
            "startup_wait_us": _to_us("startup_wait", _derived(self.startup_wait, 4 * self.join)),
            "fail_recv_const": self.fail_recv_const,
            "seqno_unchanged_const": self.seqno_unchanged_const,
            "miss_count_const": self.miss_count_const,
            "token_retransmits_max": self.token_retransmits_max,
            "pause_us": _pause_us(self.pause_fraction, self.token_timeout),
            "exclusion_backoff_us": _to_us("exclusion_backoff", _derived(self.exclusion_backoff, self.token_timeout)),
            "exclusion_backoff_max_us": _to_us(
                "exclusion_backoff_max", _derived(self.exclusion_backoff_max, 4 * self.token_timeout)
            ),
            "initial_seq": self.initial_seq,
            "initial_token_seq": self.initial_token_seq,
            "mutation": self.mutation,
        }
        for name, value in values.items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"ring config: {name} must be an integer, not {value!r}")
            try:
                setattr(cfg, name, value)
            except OverflowError:
                raise ConfigError(f"ring config: {name}={value} is out of range") from None
        err = ffi.new("char **")
        if lib.gc_ring_config_check(cfg, ffi.cast("const char **", err)) != lib.GC_OK:
            raise ConfigError(f"ring config: {ffi.string(err[0]).decode()}")
        return cfg


def _pause_us(fraction: float, token_timeout: float) -> int:
    if (not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not math.isfinite(fraction)
            or fraction <= 0):
        raise ConfigError(f"ring config: pause_fraction must be a positive fraction of token_timeout, not {fraction!r}")
    return max(1, int(_to_us("token_timeout", token_timeout) * fraction))


def _to_us(name: str, seconds: float) -> int:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not math.isfinite(seconds):
        raise ConfigError(f"ring config: {name} must be a finite number of seconds, not {seconds!r}")
    us = int(round(seconds * _US))
    if us <= 0:
        raise ConfigError(f"ring config: {name} must be at least 1 microsecond, not {seconds!r} s")
    return us


_STAT_FIELDS = tuple(name for name, _ in ffi.typeof("gc_ring_stats_t").fields)


def parse_actions(records: bytes, data: bytes, message_type: type = Delivery, *, runs: bool = False) -> list:
    """Ring outputs from ``gc_action_t`` records and their data arena (see :meth:`Ring.take`).

    Columns of the records (six 32-bit words each): slicing an array is
    C-speed, and runs of plain deliveries become objects without a
    Python-level loop body per message.  This is the hot path.
    """
    n = len(records) // _ACTION.size
    if n == 0:
        return []
    words = array("I")
    words.frombytes(records)
    heads, nodes, offsets, lengths = words[0::6], words[1::6], words[4::6], words[5::6]
    payloads = [data[o : o + size] for o, size in zip(offsets, lengths)]
    make = partial(_tuple_new, message_type)
    agreed = heads.count(_PLAIN)
    if agreed == n or agreed + heads.count(_PLAIN_SAFE) == n:     # the hot path: no slicing
        safe = repeat(False) if agreed == n else map(_PLAIN_SAFE.__eq__, heads)
        messages = list(map(make, zip(nodes, payloads, safe)))
        return [messages] if runs else messages

    def plain(lo: int, hi: int) -> list:
        return list(map(make, zip(nodes[lo:hi], payloads[lo:hi], map(_PLAIN_SAFE.__eq__, heads[lo:hi]))))

    out: list = []
    append = out.append
    add_run = append if runs else out.extend
    run = 0                                   # start of the current run of plain deliveries
    for i, head in enumerate(heads):
        if head == _PLAIN or head == _PLAIN_SAFE:
            continue
        if run < i:
            add_run(plain(run, i))
        run = i + 1
        kind = head & 0xFF
        if kind == lib.GC_ACT_SEND_MCAST:
            append(SendToAll(payloads[i]))
        elif kind == lib.GC_ACT_SEND_UNICAST:
            append(SendTo(nodes[i], payloads[i]))
        elif kind == lib.GC_ACT_DELIVER:
            flags = (head >> 8) & 0xFF
            append(LayerDelivery(nodes[i], payloads[i], bool(flags & 1), flags >> 1))
        else:
            _, flags, count, node, value, off, _ = _ACTION.unpack_from(records, i * _ACTION.size)
            members = struct.unpack_from(f"<{count}I", data, off)
            append(Configuration(RingId(node, value), members, bool(flags & 1)))
    if run < n:
        add_run(plain(run, n))
    return out



class Ring:
    """One member's Totem ring state machine.

    Inputs: :meth:`start`, :meth:`receive`, :meth:`submit`, :meth:`tick`,
    :meth:`leave`.  Outputs: :meth:`take` after each input, in order.
    """

    __slots__ = ("node_id", "config", "_r", "_pa", "_pn", "_pd", "_pl", "_max_payload")

    def __init__(self, node_id: int, config: RingConfig | None = None, *, ring_seq_floor: int = 0) -> None:
        self.node_id = node_id
        self.config = config or RingConfig()
        c = self.config.to_c(node_id, ring_seq_floor)
        out = ffi.new("gc_ring_t **")
        rc = lib.gc_ring_new(c, out)
        if rc != lib.GC_OK:
            raise ConfigError(f"ring config: {ffi.string(lib.gc_strerror(rc)).decode()}")
        self._r = ffi.gc(out[0], lib.gc_ring_free)
        self._pa = ffi.new("gc_action_t **")
        self._pn = ffi.new("size_t *")
        self._pd = ffi.new("uint8_t **")
        self._pl = ffi.new("size_t *")
        self._max_payload = lib.gc_ring_max_payload(self._r)

    # -- inputs -------------------------------------------------------------

    def start(self, now_us: int) -> None:
        """Begin gathering with whoever answers; the first configuration follows."""
        if lib.gc_ring_start(self._r, now_us) != lib.GC_OK:
            raise LocalProtocolError(f"member {self.node_id}: start() called twice")

    def receive(self, now_us: int, packet: bytes, *, strict: bool = False) -> int:
        """Feed one packet from the network. Bad packets are counted and dropped.

        Returns 0 when the packet was used, otherwise the (negative) drop reason;
        with ``strict=True`` a drop raises :class:`RemoteProtocolError` instead
        (useful in tests).
        """
        rc = lib.gc_ring_receive(self._r, now_us, packet, len(packet))
        if rc == lib.GC_ENOMEM:
            raise MemoryError("groupcomm ring: out of memory")
        if strict and rc == lib.GC_ENOTRUNNING:
            raise NotOperational(f"member {self.node_id} is not running (state {self.state.name})", code=rc)
        if strict and rc != lib.GC_OK:
            raise RemoteProtocolError(f"packet dropped: {_strerror(rc)}", code=rc)
        return rc

    def submit(self, now_us: int, payload: bytes, *, safe: bool = False, kind: int = 0) -> bool:
        """Queue an application message for total-order delivery to the ring.

        ``kind`` (0-127) is opaque to the ring and delivered back with the
        message; layers above use it to tell their messages apart without a
        header byte.  Returns :attr:`has_output` (saving the caller a call).
        """
        if type(payload) is not bytes:
            if not isinstance(payload, (bytes, bytearray, memoryview)):
                raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
            payload = ffi.from_buffer(payload)
        if kind and not (type(kind) is int and 0 < kind <= _MAX_KIND):
            raise ValueError(f"kind must be an int in 0..{_MAX_KIND}, not {kind!r}")
        rc = lib.gc_ring_submit(self._r, now_us, payload, len(payload), (kind << 1) | (1 if safe else 0))
        if rc >= 0:
            return rc == _OUTPUT
        if rc == lib.GC_ETOOBIG:
            raise PayloadTooLarge(
                f"payload of {len(payload)} bytes is over this ring's limit of {self._max_payload} bytes "
                f"per message (mtu {self.config.mtu}); split it or use a fragmenting layer",
                code=rc,
            )
        if rc == lib.GC_EQUEUEFULL:
            raise QueueFull(
                f"member {self.node_id}: send queue is full ({self.config.send_queue_max} messages); "
                "wait for deliveries and retry",
                code=rc,
            )
        if rc == lib.GC_ENOTRUNNING:
            raise NotOperational(f"member {self.node_id} is not running (state {self.state.name})", code=rc)
        if rc == lib.GC_ENOMEM:
            raise MemoryError("groupcomm ring: out of memory")
        raise LocalProtocolError(_strerror(rc), code=rc)

    def submit_many(self, now_us: int, payloads: list[bytes], *, safe: bool = False, kind: int = 0) -> int:
        """:meth:`submit` for each of ``payloads`` in order while there is room; returns how
        many were queued (fewer than all: the queue filled up).  Other refusals raise as
        :meth:`submit` does, after the ones before were queued."""
        taken = 0
        for payload in payloads:
            try:
                self.submit(now_us, payload, safe=safe, kind=kind)
            except QueueFull:
                break
            taken += 1
        return taken

    def tick(self, now_us: int) -> None:
        """Fire every timer due at ``now_us``."""
        lib.gc_ring_tick(self._r, now_us)

    def leave(self, now_us: int) -> None:
        """Leave gracefully: the others form a new ring without waiting for a timeout."""
        rc = lib.gc_ring_leave(self._r, now_us)
        if rc != lib.GC_OK:
            raise NotOperational(f"member {self.node_id} is not running (state {self.state.name})", code=rc)

    def suspect(self, now_us: int, node: int) -> bool:
        """Exclude ``node`` now, on a failure detector's verified word.

        Returns False when ``node`` is not a member (nothing to do).
        """
        rc = lib.gc_ring_suspect(self._r, now_us, node)
        if rc == lib.GC_ENOTRUNNING:
            raise NotOperational(f"member {self.node_id} is not running (state {self.state.name})", code=rc)
        return rc == lib.GC_OK

    # -- outputs ------------------------------------------------------------

    def next_deadline(self) -> int | None:
        """Microsecond time by which :meth:`tick` must be called, or None."""
        d = lib.gc_ring_next_deadline(self._r)
        return None if d == 0xFFFFFFFFFFFFFFFF else d

    @property
    def has_output(self) -> bool:
        """Whether :meth:`take` has anything to hand out (cheap)."""
        return lib.gc_ring_output_count(self._r) > 0

    def take(self, message_type: type = Delivery, *, runs: bool = False) -> list:
        """Drain the outputs of the inputs so far, in the order they must be acted on.

        ``message_type`` builds each delivered kind-0 message from ``(sender,
        payload, safe)``; a layer above passes its own type to avoid building
        two objects per message.  Messages submitted with another ``kind``
        come out as :class:`LayerDelivery`.  With ``runs=True`` each run of
        consecutive kind-0 deliveries comes as one ``list`` in the output, so
        a driver can pass them on without touching each one.
        """
        lib.gc_ring_take(self._r, self._pa, self._pn, self._pd, self._pl)
        n = self._pn[0]
        if n == 0:
            return []
        records = ffi.buffer(self._pa[0], n * _ACTION.size)[:]
        data = ffi.buffer(self._pd[0], self._pl[0])[:]
        return parse_actions(records, data, message_type, runs=runs)

    @property
    def handle(self):
        """The C ``gc_ring_t *`` (for C code that drives this ring, like the socket pump)."""
        return self._r

    # -- introspection ------------------------------------------------------

    @property
    def state(self) -> RingState:
        return RingState(lib.gc_ring_state(self._r))

    @property
    def ring_seq(self) -> int:
        """Highest ring sequence seen or used; persist it and restart above it."""
        return lib.gc_ring_ring_seq(self._r)

    @property
    def members(self) -> tuple[int, ...]:
        """Members of the installed ring (empty before the first configuration)."""
        buf = ffi.new("uint32_t[]", MAX_MEMBERS)
        n = lib.gc_ring_members(self._r, buf, MAX_MEMBERS)
        return tuple(buf[i] for i in range(n))

    @property
    def max_payload(self) -> int:
        """Largest application message :meth:`submit` accepts."""
        return self._max_payload

    @property
    def pending(self) -> int:
        """Application messages queued and not yet ordered."""
        return lib.gc_ring_pending(self._r)

    def debug(self) -> str:
        """One line describing the membership state (sets, ring ids, timers)."""
        buf = ffi.new("char[]", 4096)
        lib.gc_ring_debug(self._r, buf, 4096)
        return ffi.string(buf).decode()

    def stats(self) -> dict[str, int]:
        """Counters: traffic, drops by reason, membership rounds, holds, retransmissions."""
        s = ffi.new("gc_ring_stats_t *")
        lib.gc_ring_get_stats(self._r, s)
        return {name: getattr(s, name) for name in _STAT_FIELDS}


def _strerror(rc: int) -> str:
    return ffi.string(lib.gc_strerror(rc)).decode()


def transition_table() -> list[tuple[str, str, str]]:
    """The membership state machine as (state, input, next state) rows (for the docs)."""
    rows = []
    s, i, a = ffi.new("char **"), ffi.new("char **"), ffi.new("char **")
    for k in range(lib.gc_ring_transition_count()):
        lib.gc_ring_transition(k, ffi.cast("const char **", s), ffi.cast("const char **", i), ffi.cast("const char **", a))
        rows.append((ffi.string(s[0]).decode(), ffi.string(i[0]).decode(), ffi.string(a[0]).decode()))
    return rows


