"""Fuzzing the receive path of the C ring core (h11's rule for untrusted input).

For ANY bytes fed to :meth:`groupcomm.core.ring.Ring.receive` of a running member:

* the call returns 0 (used) or a negative drop code, and with ``strict=True``
  raises nothing but :class:`~groupcomm.errors.RemoteProtocolError`;
* it is counted: ``packets_received`` goes up by one, and a drop moves exactly
  one ``drop_*`` counter, the one that matches its code (an accepted packet
  moves none);
* it never crashes the process;
* the ring keeps working: afterwards the honest members form one ring again
  and deliver identical, complete message sequences.

The members are real :class:`~groupcomm.core.ring.Ring` objects driven by
:class:`RingCluster`, a tiny FIFO network with a fake microsecond clock (h11's
``ConnectionPair`` pattern); no simulator internals are used.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import json
import random
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from groupcomm.core.native import lib
from groupcomm.errors import RemoteProtocolError
from groupcomm.events import Configuration, Delivery
from groupcomm.core.ring import LayerDelivery, Ring, RingConfig, RingState, SendTo, SendToAll

FAST = RingConfig(token_timeout=0.2, join=0.02, merge=0.05)
"""Short timers keep the virtual time (and the real time) of every example small."""

# Wire layout (groupcomm/_ring.c, "Encoders"): a 12-byte big-endian header.
HEADER = struct.Struct(">HBBII")  # magic, version, type, cluster, sender
MAGIC, VERSION = 0x4743, 2
MSG_TOKEN, MSG_MCAST, MSG_JOIN, MSG_COMMIT, MSG_MERGE_DETECT, MSG_HOLD_CANCEL, MSG_PROBE, MSG_PROBE_REPLY = range(1, 9)
TOKEN_RTR_N_AT = 12 + 12 + 6 * 4 + 1  # header, ring id, six u32, retrans_flg
MCAST_FLAGS_AT = 12 + 12 + 4  # header, ring id, seq
JOIN_FLAGS_AT = 12 + 8  # header, ring seq
MCAST_FLAG_ENCAP, MCAST_FLAG_SAFE, JOIN_FLAG_LEAVE = 0x01, 0x02, 0x01

_STAT_NAMES = tuple(Ring(1).stats())
DROP_COUNTERS = tuple(name for name in _STAT_NAMES if name.startswith("drop_"))
COUNTERS_FOR_CODE: dict[int, frozenset[str]] = {
    lib.GC_ETRUNCATED: frozenset({"drop_truncated"}),
    lib.GC_EBADMAGIC: frozenset({"drop_bad_magic"}),
    lib.GC_EBADVERSION: frozenset({"drop_bad_version"}),
    lib.GC_EFOREIGN: frozenset({"drop_foreign_cluster"}),
    lib.GC_EMALFORMED: frozenset({"drop_malformed"}),
    lib.GC_ESTALE: frozenset({"drop_stale", "drop_duplicate", "drop_out_of_window"}),
    lib.GC_ESELF: frozenset({"drop_self"}),
    lib.GC_EIGNORED: frozenset({"drop_ignored"}),
}
"""Which drop counter each (negative) return code of ``receive`` may move."""

_US = 1_000_000


# ---------------------------------------------------------------------------
# The invariant
# ---------------------------------------------------------------------------


def feed(ring: Ring, now_us: int, packet: bytes) -> int:
    """Feed ``packet`` to ``ring`` with ``strict=True`` and check the fuzz invariant.

    Returns 0 if the packet was used, else its (negative) drop code.  The
    caller must still drain ``ring.take()``.
    """
    before = ring.stats()
    try:
        rc = ring.receive(now_us, packet, strict=True)
    except RemoteProtocolError as exc:
        assert isinstance(exc.code, int) and exc.code < 0, f"RemoteProtocolError without a drop code: {exc!r}"
        rc = exc.code
    after = ring.stats()
    assert rc == 0 or rc in COUNTERS_FOR_CODE, f"receive returned {rc}, not 0 or a drop code, for {packet.hex()}"
    assert after["packets_received"] == before["packets_received"] + 1, f"packet not counted: {packet.hex()}"
    assert after["bytes_received"] == before["bytes_received"] + len(packet)
    moved = {name: after[name] - before[name] for name in DROP_COUNTERS if after[name] != before[name]}
    if rc == 0:
        assert moved == {}, f"accepted packet moved drop counters {moved}: {packet.hex()}"
    else:
        assert len(moved) == 1 and set(moved.values()) == {1}, (
            f"drop {rc} moved {moved} (expected exactly one counter by one): {packet.hex()}"
        )
        assert set(moved) <= COUNTERS_FOR_CODE[rc], f"drop {rc} counted as {moved}: {packet.hex()}"
    return rc


# ---------------------------------------------------------------------------
# A tiny deterministic network of real rings
# ---------------------------------------------------------------------------


class RingCluster:
    """Real :class:`Ring` members on a FIFO network with a fake microsecond clock.

    ``SendToAll`` goes to every other member and ``SendTo`` to the named one.
    Each packet takes a latency drawn from ``latency_us`` (low, high) with a
    seeded :class:`random.Random`, and packets on one link arrive in the order
    they were sent (FIFO).  Members in :attr:`cut_off` neither send nor
    receive; ``loss`` drops packets, and so does ``drop_if(src, dest, packet)``
    when set.  Every packet sent is kept in :attr:`wire`.

    The jitter matters: with one fixed latency for every packet, members that
    time out together keep excluding each other in lock-step, a livelock real
    networks (and SimCluster) do not have.
    """

    def __init__(
        self,
        nodes: Iterable[int] = (1, 2, 3),
        config: RingConfig = FAST,
        *,
        ring_seq_floor: int = 0,
        loss: float = 0.0,
        seed: int = 0,
        latency_us: tuple[int, int] = (50, 150),
        cut_off: Iterable[int] = (),
    ) -> None:
        self.rings: dict[int, Ring] = {n: Ring(n, config, ring_seq_floor=ring_seq_floor) for n in nodes}
        self.now = 0
        self.loss = loss
        self.latency_us = latency_us
        self.cut_off: set[int] = set(cut_off)
        self.drop_if: Callable[[int, int, bytes], bool] | None = None
        self.deliveries: dict[int, list[Delivery]] = {n: [] for n in self.rings}
        self.configurations: dict[int, list[Configuration]] = {n: [] for n in self.rings}
        self.wire: list[tuple[int, int | None, bytes]] = []
        """(source, destination or None for all, packet) of every packet sent."""
        self._rng = random.Random(seed)
        self._queue: list[tuple[int, int, int, bytes]] = []
        self._order = itertools.count()
        self._link_clock: dict[tuple[int, int], int] = {}

    # -- inputs ---------------------------------------------------------------

    def start(self) -> RingCluster:
        """Start every member at the current time."""
        for node, ring in self.rings.items():
            ring.start(self.now)
            self._collect(node)
        return self

    def submit(self, node: int, payload: bytes, *, safe: bool = False) -> None:
        """Submit ``payload`` at ``node`` now."""
        self.rings[node].submit(self.now, payload, safe=safe)
        self._collect(node)

    def inject(self, node: int, packet: bytes) -> int:
        """Feed a foreign ``packet`` to ``node`` now, checking the fuzz invariant."""
        rc = feed(self.rings[node], self.now, packet)
        self._collect(node)
        return rc

    def receive(self, node: int, packet: bytes) -> int:
        """Feed ``packet`` to ``node`` now without checks; returns receive()'s code."""
        rc = self.rings[node].receive(self.now, packet)
        self._collect(node)
        return rc

    def leave(self, node: int) -> None:
        """``node`` leaves the ring gracefully now."""
        self.rings[node].leave(self.now)
        self._collect(node)

    def run(self, seconds: float) -> None:
        """Advance the clock by ``seconds``, delivering packets and firing timers in time order."""
        end = self.now + int(round(seconds * _US))
        while True:
            at = self._next_event()
            if at is None or at > end:
                break
            self.now = max(self.now, at)
            while self._queue and self._queue[0][0] <= self.now:
                _, _, dest, packet = heapq.heappop(self._queue)
                self.rings[dest].receive(self.now, packet)
                self._collect(dest)
            for node, ring in self.rings.items():
                deadline = ring.next_deadline()
                if deadline is not None and deadline <= self.now:
                    ring.tick(self.now)
                    self._collect(node)
        self.now = end

    def run_until(self, predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
        """Run in ``step``-second slices until ``predicate()`` holds; False after ``timeout``."""
        for _ in range(int(timeout / step)):
            if predicate():
                return True
            self.run(step)
        return predicate()

    # -- observation ----------------------------------------------------------

    def view(self, node: int) -> Configuration | None:
        """The last regular configuration ``node`` installed."""
        regular = [c for c in self.configurations[node] if not c.transitional]
        return regular[-1] if regular else None

    def formed(self, nodes: Iterable[int] | None = None) -> bool:
        """``nodes`` (default: all) are operational in one ring made of exactly them."""
        nodes = sorted(self.rings if nodes is None else nodes)
        views = {self.view(n) for n in nodes}
        return (
            len(views) == 1
            and None not in views
            and views.pop().members == tuple(nodes)
            and all(self.rings[n].state == RingState.OPERATIONAL for n in nodes)
        )

    def describe(self) -> str:
        """Member states, for assertion messages."""
        return ", ".join(f"{n}: {r.state.name} {self.view(n)}" for n, r in self.rings.items())

    # -- plumbing -------------------------------------------------------------

    def _next_event(self) -> int | None:
        times = [self._queue[0][0]] if self._queue else []
        times += [d for r in self.rings.values() if (d := r.next_deadline()) is not None]
        return min(times) if times else None

    def _collect(self, node: int) -> None:
        for out in self.rings[node].take():
            if isinstance(out, SendToAll):
                self.wire.append((node, None, out.packet))
                for dest in self.rings:
                    if dest != node:
                        self._send(node, dest, out.packet)
            elif isinstance(out, SendTo):
                self.wire.append((node, out.node, out.packet))
                self._send(node, out.node, out.packet)
            elif isinstance(out, (Delivery, LayerDelivery)):
                self.deliveries[node].append(out)
            else:
                self.configurations[node].append(out)

    def _send(self, src: int, dest: int, packet: bytes) -> None:
        if dest not in self.rings or src in self.cut_off or dest in self.cut_off:
            return
        if (self.loss and self._rng.random() < self.loss) or (self.drop_if and self.drop_if(src, dest, packet)):
            return
        at = max(self.now + self._rng.randint(*self.latency_us), self._link_clock.get((src, dest), 0))
        self._link_clock[(src, dest)] = at
        heapq.heappush(self._queue, (at, next(self._order), dest, packet))


def formed_cluster(nodes: Iterable[int] = (1, 2, 3), **kwargs) -> RingCluster:
    """A started cluster whose members (except those cut off) have formed one ring."""
    cluster = RingCluster(nodes, **kwargs).start()
    live = [n for n in cluster.rings if n not in cluster.cut_off]
    assert cluster.run_until(lambda: cluster.formed(live), timeout=5.0), cluster.describe()
    return cluster


def settle(cluster: RingCluster, timeout: float = 20.0) -> None:
    """Run until every member is in one ring, and it stays so for a while."""
    stable = 0

    def steady() -> bool:
        nonlocal stable
        stable = stable + 1 if cluster.formed() else 0
        return stable >= 4

    assert cluster.run_until(steady, timeout, step=0.25), f"the ring did not re-form: {cluster.describe()}"


def assert_orders_messages(cluster: RingCluster, tag: bytes, per_member: int = 4) -> list[bytes]:
    """Every member sends fresh messages; all members must deliver all of them in one order.

    Returns the common delivery order of the fresh messages.
    """
    marks = {n: len(d) for n, d in cluster.deliveries.items()}
    sent = []
    for k in range(per_member):
        for node in cluster.rings:
            payload = b"%s/%d/%d" % (tag, node, k)
            cluster.submit(node, payload, safe=bool(k % 2))
            sent.append(payload)

    def fresh(node: int) -> list[bytes]:
        return [d.payload for d in cluster.deliveries[node][marks[node] :]]

    cluster.run_until(lambda: all(len(fresh(n)) >= len(sent) for n in cluster.rings), timeout=10.0)
    orders = {n: fresh(n) for n in cluster.rings}
    first = next(iter(orders.values()))
    assert all(order == first for order in orders.values()), f"members disagree on the order: {orders}"
    assert sorted(first) == sorted(sent), f"not every message was delivered exactly once: {first} vs {sent}"
    by_sender = {n: [p for p in first if p.startswith(b"%s/%d/" % (tag, n))] for n in cluster.rings}
    assert all(seq == sorted(seq, key=lambda p: int(p.rsplit(b"/", 1)[1])) for seq in by_sender.values())
    return first


# ---------------------------------------------------------------------------
# A corpus of real packets
# ---------------------------------------------------------------------------


def packet_kind(packet: bytes) -> str:
    """A label for a valid packet: its type plus the variant that matters for decoding."""
    ptype = packet[3]
    if ptype == MSG_TOKEN:
        return "token_rtr" if packet[TOKEN_RTR_N_AT] else "token"
    if ptype == MSG_MCAST:
        flags = packet[MCAST_FLAGS_AT]
        return "mcast_encap" if flags & MCAST_FLAG_ENCAP else "mcast_safe" if flags & MCAST_FLAG_SAFE else "mcast"
    if ptype == MSG_JOIN:
        return "join_leave" if packet[JOIN_FLAGS_AT] & JOIN_FLAG_LEAVE else "join"
    return {MSG_COMMIT: "commit", MSG_MERGE_DETECT: "merge_detect", MSG_HOLD_CANCEL: "hold_cancel",
            MSG_PROBE: "probe", MSG_PROBE_REPLY: "probe_reply"}[ptype]


KINDS = ("token", "token_rtr", "mcast", "mcast_safe", "mcast_encap", "join", "join_leave", "commit",
         "merge_detect", "hold_cancel")


def capture_traffic() -> RingCluster:
    """Run a 3-member cluster through every kind of exchange; its ``wire`` is the corpus.

    Formation (joins, commit tokens, tokens), agreed and safe traffic, an idle
    ring (token hold, merge detects), a send at a non-representative (hold
    cancel), loss and a partition during traffic (retransmission requests,
    recovery with encapsulated messages), a heal, and a graceful leave.
    """
    cluster = formed_cluster((1, 2, 3), seed=7)
    for k in range(12):
        cluster.submit(1 + k % 3, b"first ring %d" % k, safe=bool(k % 2))
    cluster.run(0.5)
    cluster.submit(3, b"after idle")
    cluster.run(0.3)
    lossy = random.Random(3)
    cluster.drop_if = lambda src, dest, packet: packet[3] == MSG_MCAST and dest == 2 and lossy.random() < 0.3
    for k in range(30):
        cluster.submit(1 + k % 3, b"lossy %d" % k)
        cluster.run(0.002)
    cluster.run(0.3)
    cluster.drop_if = None
    cluster.loss = 0.2
    for k in range(200):
        size = (k * 37) % cluster.rings[1].max_payload
        cluster.submit(1 + k % 3, bytes([k % 256]) * size, safe=k % 3 == 0)
        cluster.run(0.0005)
    cluster.cut_off = {3}
    cluster.run(0.6)
    cluster.loss = 0.0
    cluster.run(0.5)
    cluster.cut_off = set()
    cluster.run(2.0)
    cluster.leave(3)
    cluster.run(0.5)
    return cluster


@functools.cache
def corpus() -> dict[str, tuple[bytes, ...]]:
    """Distinct captured packets by :func:`packet_kind` (deterministic)."""
    by_kind: dict[str, dict[bytes, None]] = {}
    for _src, _dest, packet in capture_traffic().wire:
        by_kind.setdefault(packet_kind(packet), {})[packet] = None
    return {kind: tuple(packets) for kind, packets in by_kind.items()}


@functools.cache
def corpus_list() -> tuple[bytes, ...]:
    """Up to 40 packets of each kind, so rare kinds are drawn as often as tokens."""
    return tuple(itertools.chain.from_iterable(packets[:40] for packets in corpus().values()))


def representative(kind: str) -> bytes:
    """The first captured packet of ``kind``."""
    return corpus()[kind][0]


# ---------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------

SENDERS = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 99, 0xFFFFFFFE, 0xFFFFFFFF])


@st.composite
def framed_garbage(draw: st.DrawFn) -> bytes:
    """A header that passes the first checks (magic, version, cluster 0) and a random body."""
    ptype = draw(st.integers(0, 8))
    return HEADER.pack(MAGIC, VERSION, ptype, 0, draw(SENDERS)) + draw(st.binary(max_size=300))


ANY_BYTES = st.one_of(st.binary(max_size=2000), framed_garbage())


def _write_be(packet: bytearray, offset: int, width: int, value: int) -> None:
    """Overwrite ``width`` big-endian bytes at ``offset`` (clipped to the packet)."""
    raw = (value % (1 << (8 * width))).to_bytes(width, "big")
    end = min(len(packet), offset + width)
    packet[offset:end] = raw[: end - offset]


@st.composite
def mutated_packets(draw: st.DrawFn) -> bytes:
    """A captured packet with one to three mutations applied."""
    packet = bytearray(draw(st.sampled_from(corpus_list())))
    for op in draw(st.lists(st.sampled_from(
        ["flip", "truncate", "extend", "type", "field", "cluster", "version", "sender"]), min_size=1, max_size=3)):
        if op == "flip" and packet:
            packet[draw(st.integers(0, len(packet) - 1))] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del packet[draw(st.integers(0, len(packet))):]
        elif op == "extend":
            packet += draw(st.binary(min_size=1, max_size=64))
        elif op == "type" and len(packet) > 3:
            packet[3] = draw(st.integers(0, 255))
        elif op == "field" and len(packet) > 12:
            # counts, sequence numbers, ring seqs, node ids... set to extreme values
            offset = draw(st.integers(12, len(packet) - 1))
            width = draw(st.sampled_from([1, 2, 4, 8]))
            value = draw(st.one_of(
                st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, 0x8000, 0xFFFF, 2**31, 2**32 - 1, 2**63, 2**64 - 1]),
                st.integers(0, 2**64 - 1)))
            _write_be(packet, offset, width, value)
        elif op == "cluster":
            _write_be(packet, 4, 4, draw(st.integers(0, 2**32 - 1)))
        elif op == "version" and len(packet) > 2:
            packet[2] = draw(st.integers(0, 255))
        elif op == "sender":
            _write_be(packet, 8, 4, draw(SENDERS))
    return bytes(packet)


# ---------------------------------------------------------------------------
# Property tests
# ---------------------------------------------------------------------------


@given(ANY_BYTES)
def test_any_bytes_into_a_started_ring(packet: bytes) -> None:
    """A lone member that just started (gathering) survives any packet and still forms its ring."""
    cluster = RingCluster((7,)).start()
    cluster.inject(7, packet)
    settle(cluster)
    assert_orders_messages(cluster, b"alone")


@given(st.lists(st.tuples(st.sampled_from([1, 2, 3]), ANY_BYTES), min_size=1, max_size=5))
def test_any_bytes_into_an_operational_ring(garbage: list[tuple[int, bytes]]) -> None:
    """Members of an operational 3-ring survive any packets and keep ordering messages identically."""
    cluster = formed_cluster()
    assert_orders_messages(cluster, b"before")
    for node, packet in garbage:
        cluster.inject(node, packet)
    settle(cluster)
    assert_orders_messages(cluster, b"after")


@given(
    st.sampled_from(["same members", "other ring"]),
    st.lists(st.tuples(st.integers(0, 2), mutated_packets()), min_size=1, max_size=20),
)
def test_mutated_packets(target: str, garbage: list[tuple[int, bytes]]) -> None:
    """Mutated real packets fed to a running ring: counted, dropped or absorbed, never fatal.

    ``same members``: members 1-3, whose first ring has the very ring id of the
    captured traffic, so mutated packets also hit the current ring's token,
    message and recovery paths.  ``other ring``: members 3, 5, 6 (node 3 sees
    its own id as sender) that never heard of the others.

    A mutated message that still names the current ring and a member as sender
    is indistinguishable from a genuine one (the wire is not authenticated),
    so it may be delivered, or pre-empt a genuine message at one member.  A
    fourth member (cut off until then) therefore joins after the garbage: the
    membership change flushes the old ring per EVS, and the fresh messages sent
    in the new ring must reach every member in one order.
    """
    nodes, joiner, floor = ((1, 2, 3), 4, 0) if target == "same members" else ((3, 5, 6), 8, 1000)
    cluster = formed_cluster((*nodes, joiner), ring_seq_floor=floor, cut_off={joiner}, seed=7)
    for k in range(12):  # the traffic of the capture's first ring
        cluster.submit(nodes[k % 3], b"first ring %d" % k, safe=bool(k % 2))
    cluster.run(0.5)
    for index, packet in garbage:
        cluster.inject(nodes[index], packet)
    cluster.cut_off.clear()
    settle(cluster)
    assert_orders_messages(cluster, b"after")


# ---------------------------------------------------------------------------
# Regression cases
# ---------------------------------------------------------------------------


@pytest.fixture
def bystander() -> RingCluster:
    """An operational ring of members 5, 6, 7: none of the captured senders (1-3) is a member."""
    return formed_cluster((5, 6, 7))


def test_corpus_has_every_packet_kind() -> None:
    assert set(corpus()) == set(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_every_truncation_is_rejected_and_counted(bystander: RingCluster, kind: str) -> None:
    packet = representative(kind)
    ring = bystander.rings[5]
    for length in range(len(packet)):
        rc = bystander.inject(5, packet[:length])
        assert rc in (lib.GC_ETRUNCATED, lib.GC_EMALFORMED), f"{kind} cut to {length} bytes: {rc}"
    stats = ring.stats()
    assert stats["drop_truncated"] + stats["drop_malformed"] == len(packet)
    assert stats["drop_truncated"] >= 12  # every cut inside the header
    assert bystander.formed()


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_magic_version_or_cluster_is_rejected(bystander: RingCluster, kind: str) -> None:
    packet = representative(kind)
    cases = [
        (b"\x00\x00" + packet[2:], lib.GC_EBADMAGIC, "drop_bad_magic"),
        (b"CG" + packet[2:], lib.GC_EBADMAGIC, "drop_bad_magic"),
        (packet[:2] + b"\x00" + packet[3:], lib.GC_EBADVERSION, "drop_bad_version"),
        (packet[:2] + bytes([VERSION + 1]) + packet[3:], lib.GC_EBADVERSION, "drop_bad_version"),
        (packet[:4] + struct.pack(">I", 1) + packet[8:], lib.GC_EFOREIGN, "drop_foreign_cluster"),
        (packet[:4] + struct.pack(">I", 0xFFFFFFFF) + packet[8:], lib.GC_EFOREIGN, "drop_foreign_cluster"),
    ]
    for bad, code, counter in cases:
        before = bystander.rings[6].stats()[counter]
        assert bystander.inject(6, bad) == code
        assert bystander.rings[6].stats()[counter] == before + 1
    assert bystander.formed()


def test_other_cluster_id_is_foreign() -> None:
    """A ring configured with cluster id 9 drops every packet of cluster 0."""
    cluster = formed_cluster((5, 6), config=RingConfig(token_timeout=0.2, join=0.02, merge=0.05, cluster_id=9))
    for kind in KINDS:
        assert cluster.inject(5, representative(kind)) == lib.GC_EFOREIGN
    assert cluster.rings[5].stats()["drop_foreign_cluster"] == len(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_own_node_id_as_sender_is_dropped(bystander: RingCluster, kind: str) -> None:
    packet = representative(kind)
    looped = packet[:8] + struct.pack(">I", 7) + packet[12:]
    assert bystander.inject(7, looped) == lib.GC_ESELF
    assert bystander.rings[7].stats()["drop_self"] == 1
    assert bystander.formed()


def test_sender_zero_or_all_ones_and_unknown_types_are_malformed(bystander: RingCluster) -> None:
    packet = representative("token")
    for sender in (0, 0xFFFFFFFF):
        assert bystander.inject(5, packet[:8] + struct.pack(">I", sender) + packet[12:]) == lib.GC_EMALFORMED
    for ptype in (0, 7, 255):
        assert bystander.inject(5, packet[:3] + bytes([ptype]) + packet[4:]) == lib.GC_EMALFORMED
    assert bystander.rings[5].stats()["drop_malformed"] == 5


def test_replayed_tokens_and_messages_are_dropped_and_deliver_nothing_twice() -> None:
    cluster = formed_cluster()
    first_packet = len(cluster.wire)
    for k in range(6):
        cluster.submit(1 + k % 3, b"once %d" % k, safe=bool(k % 2))
    cluster.run(0.5)
    delivered = {n: list(d) for n, d in cluster.deliveries.items()}
    assert all(len(d) == 6 for d in delivered.values())
    replays = [(dest, p) for src, dest, p in cluster.wire[first_packet:] if src != 2 and dest in (2, None)
               and p[3] in (MSG_TOKEN, MSG_MCAST)]
    assert any(p[3] == MSG_TOKEN for _, p in replays) and any(p[3] == MSG_MCAST for _, p in replays)
    for _dest, packet in replays:
        rc = cluster.inject(2, packet)
        assert rc == lib.GC_ESTALE, f"replayed {packet_kind(packet)} was not dropped: {rc}"
    stats = cluster.rings[2].stats()
    assert stats["drop_duplicate"] + stats["drop_stale"] >= len(replays)
    cluster.run(1.0)
    assert cluster.deliveries == delivered
    assert cluster.formed()
    assert_orders_messages(cluster, b"later")


# ---------------------------------------------------------------------------
# Bugs this file found, as minimal cases (fixed unless the docstring says BUG)
# ---------------------------------------------------------------------------


def join_packet(sender: int, ring_seq: int, proc: Sequence[int], fail: Sequence[int], flags: int = 0) -> bytes:
    """Encode a join the way _ring.c's encode_join does."""

    def nodeset(ids: Sequence[int]) -> bytes:
        return struct.pack(f">H{len(ids)}I", len(ids), *ids)

    header = HEADER.pack(MAGIC, VERSION, MSG_JOIN, 0, sender)
    return header + struct.pack(">QB", ring_seq, flags) + nodeset(proc) + nodeset(fail)


def test_join_with_a_ring_seq_near_2_64_does_not_wedge_membership() -> None:
    """One join whose ring seq is 2**64 - 1 (a flipped or forged field) must not stop the ring forever.

    Regression: the core adopted it as ring_seq_max; commit_create then made ring
    seq ring_seq_max + 4, which wrapped to 3, and every member dropped that commit
    token as stale (3 < its ring seq): membership churned forever.
    """
    cluster = formed_cluster()
    packet = join_packet(2, 2**64 - 1, [1, 2, 3], [])
    cluster.inject(1, packet)
    settle(cluster, timeout=20.0)
    assert_orders_messages(cluster, b"after")


def test_a_leave_that_is_ignored_is_reported_as_a_drop(bystander: RingCluster) -> None:
    """A leave from a node that is not a member is ignored and counted in drop_ignored,

    so receive() must return GC_EIGNORED, not 0 (0 means "used").
    Regression: handle_leave counted drop_ignored but dispatch returned GC_OK.
    """
    packet = join_packet(3, 0, [1, 2], [3], flags=JOIN_FLAG_LEAVE)
    assert bystander.inject(5, packet) == lib.GC_EIGNORED


COMMIT_ENTRY = struct.Struct(">IQIIB")  # old ring id (rep, seq), aru, high_delivered, received_flg


def forge_commit_aru(packet: bytes, node: int, aru: int) -> bytes:
    """A commit token with ``node``'s entry claiming ``aru`` and a missing message (received_flg 0)."""
    (count,) = struct.unpack_from(">H", packet, 26)
    members = struct.unpack_from(f">{count}I", packet, 28)
    offset = 28 + 4 * count + COMMIT_ENTRY.size * members.index(node)
    rep, seq, _aru, high_delivered, _flag = COMMIT_ENTRY.unpack_from(packet, offset)
    forged = bytearray(packet)
    COMMIT_ENTRY.pack_into(forged, offset, rep, seq, aru % 2**32, high_delivered, 0)
    return bytes(forged)


def test_a_commit_token_with_an_impossible_aru_is_rejected() -> None:
    """A second-pass commit token whose entry for member 2 claims an old-ring aru 2**31 - 1
    below member 1's: no member of the old ring can lag that far (its sort queue holds 4096
    sequence numbers), so the token must be dropped as malformed.

    Regression: recovery_plan() walked every sequence number from that aru to old_high,
    about 2**31 iterations: one packet stalled gc_ring_receive() for 4.5 s (at -O2).
    """
    cluster = formed_cluster((1, 2, 3))
    for k in range(5):
        cluster.submit(1, b"old ring %d" % k)
    cluster.run(0.5)
    held: list[bytes] = []

    def hold_commit_from_2_to_1(src: int, dest: int, packet: bytes) -> bool:
        if packet[3] == MSG_COMMIT and (src, dest) == (2, 1):
            held.append(packet)
            return True
        return False

    cluster.drop_if = hold_commit_from_2_to_1
    cluster.leave(3)  # the others form a new ring {1, 2}: a commit token goes 1 -> 2 -> 1
    assert cluster.run_until(lambda: bool(held), timeout=2.0, step=0.001)
    cluster.drop_if = None
    assert cluster.rings[1].state == RingState.COMMIT
    own_aru = COMMIT_ENTRY.unpack_from(held[0], 28 + 4 * 2)[2]  # member 1's entry
    rc = cluster.inject(1, forge_commit_aru(held[0], 2, own_aru - (2**31 - 1)))
    assert rc < 0, "accepted"
    assert cluster.rings[1].state == RingState.COMMIT
    assert cluster.run_until(lambda: cluster.formed((1, 2)), timeout=10.0), cluster.describe()


def run_isolated(script: str) -> dict:
    """Run ``script`` in a fresh interpreter, so memory corruption cannot take pytest down.

    The script prints one JSON object as its last line; it is returned.
    """
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=root, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"the ring crashed (exit {result.returncode}): {result.stderr[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


_OVERSIZED_MCAST_SCRIPT = """
import json, struct
from tests.test_ring_fuzz import HEADER, MAGIC, VERSION, MSG_MCAST, formed_cluster
cluster = formed_cluster((1, 2))
rep, seq = cluster.view(2).ring_id.rep, cluster.view(2).ring_id.seq
payload = b"x" * 1500
packet = (HEADER.pack(MAGIC, VERSION, MSG_MCAST, 0, 1) + struct.pack(">IQIBH", rep, seq, 1, 0, 1)
          + struct.pack(">BH", 0, len(payload)) + payload)
rc = cluster.receive(2, packet)
cluster.run(1.0)
ring = cluster.rings[2]
print(json.dumps({"rc": rc, "drop_malformed": ring.stats()["drop_malformed"],
                  "delivered": len(cluster.deliveries[2])}))
"""


def test_a_datagram_larger_than_the_mtu_is_dropped_not_copied() -> None:
    """A well-formed message of the current ring (1, 4) from member 1 to member 2, 1534 bytes
    long with mtu 1400: it cannot come from a member with the same mtu.

    Expected: dropped as malformed, counted, nothing delivered.  Regression: handle_mcast
    -> sq_store memcpy()ed the whole packet into a buffer of mtu + 31 = 1431 bytes: a heap
    overflow (ASan: WRITE of size 1534), then an abort ("malloc(): invalid size").  A member
    configured with a larger mtu than its peers triggered it with ordinary traffic.
    """
    outcome = run_isolated(_OVERSIZED_MCAST_SCRIPT)
    assert outcome["rc"] == lib.GC_EMALFORMED, outcome
    assert outcome["drop_malformed"] == 1 and outcome["delivered"] == 0, outcome


_ENCAPSULATED_IN_OPERATIONAL_SCRIPT = """
import json, struct
from tests.test_ring_fuzz import HEADER, MAGIC, VERSION, MSG_MCAST, formed_cluster
cluster = formed_cluster((1, 2, 3))
sent = [b"m%d" % k for k in range(3)]
for k, payload in enumerate(sent):
    cluster.submit(1 + k, payload, safe=True)
rep, seq = cluster.view(1).ring_id.rep, cluster.view(1).ring_id.seq
inner = (HEADER.pack(MAGIC, VERSION, MSG_MCAST, 0, 2) + struct.pack(">IQIBH", rep, seq, 1, 0, 1)
         + struct.pack(">BH", 0, 5) + b"inner")
packet = HEADER.pack(MAGIC, VERSION, MSG_MCAST, 0, 2) + struct.pack(">IQIBH", rep, seq, 2, 1, 0) + inner
rc = cluster.receive(1, packet)
cluster.leave(3)
cluster.run(5.0)
print(json.dumps({"rc": rc, "packet": packet.hex(), "sent": [p.hex() for p in sent],
                  "delivered": [d.payload.hex() for d in cluster.deliveries[1]]}))
"""


def test_an_encapsulated_message_outside_recovery_is_never_delivered_as_plain() -> None:
    """Member 2 "sends" member 1 an encapsulated (recovery) message of the current ring
    while the ring is operational, at seq 2, behind a safe message at seq 1; then member 3
    leaves and 1 and 2 form a new ring.

    Expected: the packet is dropped (encapsulation exists only in RECOVERY), or at least
    member 1 delivers nothing but what was sent.  BUG: handle_mcast stores it in the
    regular queue with MCAST_FLAG_ENCAP; deliver_regular skips such slots but
    old_ring_deliver -> deliver_datagram parses it as entries: the inner header (magic
    "GC", version 1) reads as an entry of 0x4301 = 17153 bytes (ASan: heap-buffer-overflow
    READ of size 17153), rd.left underflows and the loop runs off the heap: SIGSEGV.
    """
    outcome = run_isolated(_ENCAPSULATED_IN_OPERATIONAL_SCRIPT)
    assert set(outcome["delivered"]) <= set(outcome["sent"]), outcome
