"""The C socket pump (``groupcomm/_pump.c``): a thread that drives the ring over UDP.

Under the trio driver every token hop wakes the trio loop; with the pump
(``pump = "c"`` in the UDP/UDPU layer) a C thread receives the ring's
datagrams, feeds the ring, sends its packets and fires its timers, and wakes
Python only for what Python must see: deliveries, views, and the other layers'
packets (failure detector, unicast, probe).

The protocol layers stay as they are.  :func:`attach` hands the
:class:`~groupcomm.layers.multicast.Multicast` a :class:`LockedRing` in place of its ring:
the same interface, but every call holds the pump's lock and reads the pump's
clock, the thread sends the ring's packets, and :meth:`LockedRing.take`
returns the deliveries the pump collected (in :meth:`Ring.take`'s format), so
``Multicast.take`` still does reassembly, views and failure detection.
"""

from __future__ import annotations

import os
import socket
from array import array
from functools import partial

from groupcomm.core.native import ffi, lib
from groupcomm.errors import ConfigError, QueueFull
from groupcomm.events import Delivery
from groupcomm.core.ring import Ring, parse_actions
from groupcomm.core.seal import OVERHEAD as SEAL_OVERHEAD, Seal
from groupcomm.io.probe import PROBE_REQUEST_SIZE
from groupcomm.io.udp import UdpSockets

__all__ = ["DGRAM_MEMBER", "DGRAM_PROBE", "DGRAM_RING", "DGRAM_SELF", "DGRAM_TOKEN", "LockedRing", "Pump",
           "TargetSet", "attach", "classify", "detach", "now_us"]

now_us = lib.gc_pump_now_us
"""CLOCK_MONOTONIC in integer microseconds: every ring input's clock while a pump runs."""

classify = lib.gc_pump_classify
"""``classify(datagram, len(datagram), node_id)``: what a driver does with an (opened)
datagram -- one of the ``DGRAM_*`` below.  Both socket drivers sort datagrams with it
(the pump in C, the trio driver per datagram), so they apply the same rules."""
DGRAM_PROBE = lib.GC_DGRAM_PROBE      # a probe request: answered by the channel
DGRAM_SELF = lib.GC_DGRAM_SELF        # our own multicast looped back: dropped
DGRAM_MEMBER = lib.GC_DGRAM_MEMBER    # failure detector, unicast, or another wire version: Member.receive
DGRAM_TOKEN = lib.GC_DGRAM_TOKEN      # a token: after the messages of the same read
DGRAM_RING = lib.GC_DGRAM_RING        # the ring

MIN_SLOT = max(2048, PROBE_REQUEST_SIZE)   # receive slot floor: FD packets, padded probe requests
RECV_SLOTS_BYTES = 1 << 20   # receive slots per pump, in bytes (sets the recvmmsg batch)
MIN_BATCH, MAX_BATCH = 8, 64
MIN_BACKLOG = 1024           # deliveries waiting for Python before the pump stops reading ...
MAX_BACKLOG_BYTES = 64 << 20  # ... or their bytes
TAKE_MAX = 1024              # deliveries one take hands to Python at most ...
TAKE_MAX_BYTES = 2 << 20     # ... and their bytes: like the trio driver's 2 MiB per wake-up
_MAX_KIND = 127

_PUMP_STATS = tuple(name for name, _ in ffi.typeof("gc_pump_stats_t").fields)


def _sockaddr(addr: tuple) -> tuple[int, bytes, int, int]:
    """(family, packed address, port, scope id) of a socket address tuple."""
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    scope = addr[3] if len(addr) > 3 else 0
    return family, socket.inet_pton(family, addr[0]), addr[1], scope


class Pump:
    """One ``gc_pump_t``: its thread, its queues for Python and its address book.

    Build it with :func:`attach`.  :meth:`start` creates the thread and
    :meth:`close` joins it; close it before the sockets.
    """

    def __init__(self, ring: Ring, sockets: UdpSockets, *, max_backlog: int, seal: Seal | None = None) -> None:
        slot = max(ring.config.mtu + (SEAL_OVERHEAD if seal is not None else 0), MIN_SLOT)
        cfg = ffi.new("gc_pump_config_t *")
        cfg.unicast_fd = sockets.unicast.fileno()
        cfg.multicast_fd = sockets.multicast.fileno() if sockets.multicast is not None else -1
        cfg.node_id = ring.node_id
        cfg.cluster_id = ring.config.cluster_id
        cfg.send_queue_max = ring.config.send_queue_max
        cfg.slot_size = slot
        cfg.batch = max(MIN_BATCH, min(MAX_BATCH, RECV_SLOTS_BYTES // slot))
        cfg.max_backlog = max(max_backlog, MIN_BACKLOG)
        cfg.max_backlog_bytes = MAX_BACKLOG_BYTES
        cfg.take_max = TAKE_MAX
        cfg.take_max_bytes = TAKE_MAX_BYTES
        cfg.seal = seal.pointer if seal is not None else ffi.NULL
        self._seal = seal                         # the C seal must outlive the thread
        out = ffi.new("gc_pump_t **")
        rc = lib.gc_pump_new(ring.handle, cfg, out)
        if rc != lib.GC_OK:
            raise ConfigError(f"C pump: {ffi.string(lib.gc_strerror(rc)).decode()}")
        self._p = ffi.gc(out[0], lib.gc_pump_free)
        self._ring = ring                         # the C ring must outlive the thread
        if sockets.group is not None:
            family, packed, port, scope = _sockaddr(sockets.group)
            lib.gc_pump_set_group(self._p, family, packed, port, scope)
        self.notify_fd: int = lib.gc_pump_notify_fd(self._p)
        self._batch = ffi.new("gc_pump_batch_t *")
        self._taken: list[tuple[bytes, bytes]] = []           # (records, data) not yet parsed
        self._packets: list[tuple[bytes, tuple, bool]] = []   # datagrams not yet handed out
        self._heard_nodes = ffi.new("uint32_t[]", lib.GC_PUMP_PEERS_MAX)
        self._heard_times = ffi.new("uint64_t[]", lib.GC_PUMP_PEERS_MAX)
        self._heard: dict[int, int] = {}
        self.multicast = None
        """The Multicast layer whose ring this pump drives (set by :func:`attach`)."""

    # -- lifetime ---------------------------------------------------------------

    def start(self) -> None:
        if lib.gc_pump_start(self._p) != lib.GC_OK:
            raise OSError("C pump: cannot create its thread")

    def stop(self) -> None:
        """Join the thread: the ring is no longer driven (as if the process died)."""
        if self._p is not None:
            lib.gc_pump_stop(self._p)

    @property
    def closed(self) -> bool:
        return self._p is None

    @property
    def handle(self):
        """The ``gc_pump_t *`` (None once closed)."""
        return self._p

    def close(self) -> None:
        """Join the thread and free the pump (idempotent)."""
        if self._p is not None:
            ffi.release(self._p)                  # gc_pump_free: stop + join, then free
            self._p = None

    # -- locking ----------------------------------------------------------------

    def lock(self) -> int:
        """Take the ring's lock; returns the time to give the ring."""
        lib.gc_pump_lock(self._p)
        return now_us()

    def unlock(self) -> None:
        """Send what the ring produced under the lock, queue its deliveries, release."""
        if lib.gc_pump_unlock(self._p) == lib.GC_ENOMEM:
            raise MemoryError("groupcomm pump: out of memory; deliveries were lost")

    # -- Python's side of the traffic ---------------------------------------------

    def clear_notify(self) -> None:
        """Reset the wake-up eventfd; call it before taking, so no wake-up is lost."""
        try:
            os.read(self.notify_fd, 8)
        except BlockingIOError:
            pass

    def _collect(self) -> None:
        """Copy what the pump queued for Python (no lock): every datagram, and deliveries up
        to ``TAKE_MAX`` / ``TAKE_MAX_BYTES``; the pump signals :attr:`notify_fd` again if it kept some."""
        b = self._batch
        if lib.gc_pump_take(self._p, b) == lib.GC_ENOMEM:
            raise MemoryError("groupcomm pump: out of memory; deliveries were lost")
        if b.n_actions:
            records = ffi.buffer(b.actions, b.n_actions * ffi.sizeof("gc_action_t"))[:]
            self._taken.append((records, ffi.buffer(b.data, b.data_len)[:]))
        if b.n_packets:
            data = ffi.buffer(b.packet_data, b.packet_data_len)[:]
            for i in range(b.n_packets):
                rec = b.packets[i]
                self._packets.append((data[rec.offset : rec.offset + rec.len], _address(rec), bool(rec.newest)))

    def take(self, message_type: type = Delivery, *, runs: bool = False) -> list:
        """Deliveries and configurations the ring produced, in order: one bounded batch
        (at most ``TAKE_MAX`` deliveries and ``TAKE_MAX_BYTES`` of their payload, or
        one run of them), so one call is a bounded amount of work for the loop.  The
        rest comes with the next calls; the pump wakes the driver for them."""
        if not self._taken:
            self._collect()
        taken, self._taken = self._taken, []
        if len(taken) == 1:
            return parse_actions(*taken[0], message_type, runs=runs)
        return [item for records, data in taken for item in parse_actions(records, data, message_type, runs=runs)]

    def take_packets(self) -> list[tuple[bytes, tuple, bool]]:
        """The other layers' datagrams (failure detector, unicast, probe), with their source and
        whether each is the newest yet from its sender (only those may move its address)."""
        self._collect()
        packets, self._packets = self._packets, []
        return packets

    def send_all(self, packet: bytes) -> None:
        """To the group, or to every known member without multicast."""
        lib.gc_pump_send_all(self._p, packet, len(packet))

    def send_to(self, node: int, packet: bytes) -> None:
        """To ``node`` at the address its packets come from (dropped and counted if unknown)."""
        lib.gc_pump_send_to(self._p, node, packet, len(packet))

    def learn(self, node: int, addr: tuple) -> None:
        """``node`` is at ``addr``: a datagram from there was accepted by its layer."""
        family, packed, port, scope = _sockaddr(addr)
        lib.gc_pump_learn(self._p, node, family, packed, port, scope)

    def add_target(self, addr: tuple) -> None:
        """A unicast-only member's address (static host list, discovery)."""
        family, packed, port, scope = _sockaddr(addr)
        lib.gc_pump_add_target(self._p, family, packed, port, scope)

    def forget(self, members, silent_since_us: int) -> int:
        """At a view: forget the peers outside ``members`` silent since ``silent_since_us`` (pump time;
        ``UINT64_MAX``: every one outside) and the targets learnt from them; returns the peers kept."""
        nodes = list(members)
        return lib.gc_pump_forget(self._p, ffi.new("uint32_t[]", nodes), len(nodes), silent_since_us)

    @property
    def known_peers(self) -> int:
        """How many members' addresses the pump knows."""
        return lib.gc_pump_heard(self._p, self._heard_nodes, self._heard_times, lib.GC_PUMP_PEERS_MAX)

    def sync_heard(self, fd) -> None:
        """Tell the failure detector about every peer heard from since the last call."""
        n = lib.gc_pump_heard(self._p, self._heard_nodes, self._heard_times, lib.GC_PUMP_PEERS_MAX)
        seen = self._heard
        for i in range(n):
            node, when = self._heard_nodes[i], self._heard_times[i]
            if seen.get(node) != when:
                seen[node] = when
                fd.heard(node, when)

    def stats(self) -> dict[str, int]:
        """The pump's counters, named ``pump_*``."""
        s = ffi.new("gc_pump_stats_t *")
        lib.gc_pump_get_stats(self._p, s)
        return {f"pump_{name}": getattr(s, name) for name in _PUMP_STATS}


def _address(rec) -> tuple:
    """A ``gc_pump_packet_t``'s source as a socket address tuple."""
    if rec.family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, ffi.buffer(rec.addr, 16)[:]), rec.port, 0, rec.scope_id
    return socket.inet_ntop(socket.AF_INET, ffi.buffer(rec.addr, 4)[:]), rec.port


class TargetSet(set):
    """The unicast-only transport's member addresses; additions reach the pump too."""

    def __init__(self, pump: Pump, addrs) -> None:
        super().__init__()
        self._pump = pump
        for addr in addrs:
            self.add(addr)

    def add(self, addr) -> None:
        if addr not in self:
            super().add(addr)
            self._pump.add_target(addr)


class LockedRing:
    """The :class:`~groupcomm.core.ring.Ring` as the Multicast layer sees it while a pump drives it.

    Every call holds the pump's lock and gives the ring the pump's clock (the
    ``now`` arguments are ignored); releasing the lock sends what the ring
    produced.  :meth:`submit` never waits for the pump's thread (see
    ``gc_pump_submit``).  Outputs come from :meth:`Pump.take`; timers are the
    pump's, so :meth:`next_deadline` is None and the Multicast layer's own deadline is
    its failure detector's.
    """

    def __init__(self, ring: Ring, pump: Pump) -> None:
        self.ring = ring
        self.node_id = ring.node_id
        self.config = ring.config
        self.max_payload = ring.max_payload
        self._pump = pump
        self._p = pump.handle
        self._taken = ffi.new("size_t *")

    # -- inputs -------------------------------------------------------------------

    def submit(self, now_us: int, payload: bytes, *, safe: bool = False, kind: int = 0) -> bool:
        if type(payload) is bytes and type(kind) is int and 0 <= kind <= _MAX_KIND:
            rc = lib.gc_pump_submit(self._p, payload, len(payload), (kind << 1) | (1 if safe else 0))
            if rc >= 0:
                return False                      # the pump sends what the ring produced
            if rc == lib.GC_EQUEUEFULL:
                raise QueueFull(
                    f"member {self.node_id}: send queue is full ({self.config.send_queue_max} messages); "
                    "wait for deliveries and retry",
                    code=rc,
                )
        # Not plain bytes, or refused: Ring.submit converts, or raises the precise error.
        self._call(partial(self.ring.submit, safe=safe, kind=kind), payload)
        return False

    def submit_many(self, now_us: int, payloads: list[bytes], *, safe: bool = False, kind: int = 0) -> int:
        """:meth:`Ring.submit_many <groupcomm.core.ring.Ring.submit_many>` in one call into the pump."""
        if not (type(kind) is int and 0 <= kind <= _MAX_KIND) or not all(type(p) is bytes for p in payloads):
            return self._call(partial(self.ring.submit_many, safe=safe, kind=kind), payloads)   # converts, or raises
        lens = array("I", map(len, payloads))
        taken = self._taken
        rc = lib.gc_pump_submit_many(self._p, b"".join(payloads), ffi.from_buffer("uint32_t[]", lens), len(lens),
                                     (kind << 1) | (1 if safe else 0), taken)
        if rc >= 0 or rc == lib.GC_EQUEUEFULL:
            return taken[0]
        # Refused for another reason: the ring raises the precise error for that message.
        done = taken[0]
        self._call(partial(self.ring.submit, safe=safe, kind=kind), payloads[done])
        return done + 1

    def _call(self, method, *args):
        now = self._pump.lock()
        try:
            return method(now, *args)
        finally:
            self._pump.unlock()

    def start(self, now_us: int) -> None:
        self._call(self.ring.start)

    def receive(self, now_us: int, packet: bytes, *, strict: bool = False) -> int:
        return self._call(partial(self.ring.receive, strict=strict), packet)

    def tick(self, now_us: int) -> None:
        self._call(self.ring.tick)

    def leave(self, now_us: int) -> None:
        self._call(self.ring.leave)                   # the leave packets are sent before this returns

    def suspect(self, now_us: int, node: int) -> bool:
        return self._call(self.ring.suspect, node)

    # -- outputs ------------------------------------------------------------------

    def next_deadline(self) -> None:
        return None

    @property
    def has_output(self) -> bool:
        return False                                  # the pump wakes the driver when it has some

    def take(self, message_type: type = Delivery, *, runs: bool = False) -> list:
        return self._pump.take(message_type, runs=runs)

    # -- introspection ------------------------------------------------------------

    def _read(self, getter):
        lib.gc_pump_lock(self._p)
        try:
            return getter()
        finally:
            lib.gc_pump_unlock(self._p)

    @property
    def state(self):
        return self._read(lambda: self.ring.state)

    @property
    def ring_seq(self) -> int:
        return lib.gc_pump_ring_seq(self._p)         # no lock: read on every take

    @property
    def members(self) -> tuple[int, ...]:
        return self._read(lambda: self.ring.members)

    @property
    def pending(self) -> int:
        return lib.gc_pump_pending(self._p)

    def debug(self) -> str:
        return self._read(self.ring.debug)

    def stats(self) -> dict[str, int]:
        return self._read(self.ring.stats)


def attach(multicast, sockets: UdpSockets, *, max_backlog: int, seal: Seal | None = None) -> Pump:
    """Build a pump for ``multicast``'s ring and put a :class:`LockedRing` in its place.

    :func:`detach` undoes it; the thread starts with :meth:`Pump.start`.
    """
    ring = multicast.ring
    pump = Pump(ring, sockets, max_backlog=max_backlog, seal=seal)
    multicast.ring = LockedRing(ring, pump)
    pump.multicast = multicast
    return pump


def detach(pump: Pump) -> None:
    """Join the pump's thread, free it, and give its Multicast layer the plain ring back."""
    pump.close()
    multicast = pump.multicast
    if multicast is not None and isinstance(multicast.ring, LockedRing):
        multicast.ring = multicast.ring.ring
    pump.multicast = None
