"""The UNICAST layer, sans-IO: reliable, ordered point-to-point messages.

Real :class:`~groupcomm.layers.unicast.Unicast` objects are driven by :class:`Net`, a
tiny deterministic network in virtual microseconds (seeded loss, duplication,
reordering and latency) that calls each node's ``tick`` at its
``next_deadline``.  No sockets, no clock.
"""

from __future__ import annotations

import heapq
import random
import struct
from collections import defaultdict

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from groupcomm.config import LayerSpec, build_config
from groupcomm.errors import ConfigError, LocalProtocolError, PayloadTooLarge, QueueFull
from groupcomm.core.ring import SendTo
from groupcomm.layers.wire import PROTOCOL_VERSION
from groupcomm.layers.unicast import (
    ACK,
    ACK_NOW,
    DATA,
    LEFT,
    MAGIC,
    NOT_MEMBER,
    RESTARTED,
    Unicast,
    UnicastConfig,
    UnicastFailed,
    UnicastMessage,
    UnicastSent,
)

CLUSTER = 7
MS = 1000
SMALL = UnicastConfig(mtu=200, window=8)          # 142-byte fragments: multi-fragment messages are cheap
# The wire format as documented in groupcomm/unicast.py, written out again here on purpose.
_COMMON = struct.Struct(">2sBBIIIQQ")
_SEQ = struct.Struct(">IQ")                        # stream, seq: right after the common header of DATA and ACK
_DATA_FORMAT = struct.Struct(">2sBBIIIQQIQIIIBB")


def data_packet(*, sender: int = 1, dest: int = 2, s_epoch: int = 1, d_epoch: int = 0, stream: int = 1,
                seq: int = 0, msg_id: int = 1, index: int = 0, count: int = 1, kind: int = 0, flags: int = 0,
                payload: bytes = b"") -> bytes:
    return _DATA_FORMAT.pack(MAGIC, PROTOCOL_VERSION, DATA, CLUSTER, sender, dest, s_epoch, d_epoch, stream, seq, msg_id,
                             index, count, kind, flags) + payload


def header(packet: bytes) -> tuple:
    """(type, sender, dest, sender epoch, dest epoch, stream, seq or cumulative ack)."""
    _, _, ptype, _, sender, dest, s_epoch, d_epoch = _COMMON.unpack_from(packet)
    stream, seq = _SEQ.unpack_from(packet, _COMMON.size)
    return ptype, sender, dest, s_epoch, d_epoch, stream, seq


class Net:
    """Unicast nodes joined by a seeded, lossy, reordering network in virtual microseconds."""

    def __init__(self, ids=(1, 2), *, config: UnicastConfig = SMALL, seed: int = 0, loss: float = 0.0,
                 dup: float = 0.0, reorder: float = 0.0, latency: tuple[int, int] = (50, 300)) -> None:
        self.config = config
        self.rng = random.Random(seed)
        self.loss, self.dup, self.reorder, self.latency = loss, dup, reorder, latency
        self.now = 0
        self.nodes = {n: Unicast(n, CLUSTER, config, epoch=1) for n in ids}
        self.events: dict[int, list] = defaultdict(list)      # node -> its non-packet outputs, this life
        self.past: dict[int, list[list]] = defaultdict(list)  # node -> outputs of its earlier lives
        self.wire: list[tuple[int, int, bytes]] = []          # (time, sender, packet) of every packet emitted
        self.cut: set[frozenset[int]] = set()                 # pairs whose packets are all lost
        self._flight: list = []
        self._serial = 0
        self.strict_sent = False                               # check UnicastSent against deliveries
        self.sent_ids: dict[tuple[int, int], list[int]] = defaultdict(list)
        for node in self.nodes.values():
            node.set_members(ids, 0)

    # -- driving ----------------------------------------------------------------

    def send(self, src: int, dst: int, payload: bytes, kind: int = 0) -> int:
        msg_id = self.nodes[src].send(self.now, dst, payload, kind)
        self.sent_ids[src, dst].append(msg_id)
        self.flush()
        return msg_id

    def flush(self) -> None:
        for n, node in self.nodes.items():
            for out in node.take():
                if type(out) is SendTo:
                    self._route(n, out)
                    continue
                if type(out) is UnicastSent and self.strict_sent:   # acknowledged => already delivered
                    position = self.sent_ids[n, out.dest].index(out.msg_id)
                    assert len(self.received(out.dest, n)) > position, f"UnicastSent before delivery: {out}"
                self.events[n].append(out)

    def _route(self, src: int, out: SendTo) -> None:
        self.wire.append((self.now, src, out.packet))
        assert len(out.packet) <= self.config.mtu
        if frozenset((src, out.node)) in self.cut:
            return
        rng = self.rng
        for _ in range(2 if rng.random() < self.dup else 1):
            if rng.random() < self.loss:
                continue
            delay = rng.randint(*self.latency)
            if rng.random() < self.reorder:
                delay += rng.randint(0, 5 * MS)
            self._serial += 1
            heapq.heappush(self._flight, (self.now + delay, self._serial, out.node, out.packet))

    def next_time(self) -> int | None:
        times = [d for d in (n.next_deadline() for n in self.nodes.values()) if d is not None]
        if self._flight:
            times.append(self._flight[0][0])
        return min(times) if times else None

    def step(self) -> bool:
        """Advance to the next packet arrival or timer; False when nothing is left to happen."""
        t = self.next_time()
        if t is None:
            return False
        self.now = max(self.now, t)
        while self._flight and self._flight[0][0] <= self.now:
            _, _, dst, packet = heapq.heappop(self._flight)
            if dst in self.nodes:
                self.nodes[dst].receive(self.now, packet)
        for node in self.nodes.values():
            deadline = node.next_deadline()
            if deadline is not None and deadline <= self.now:
                node.tick(self.now)
        self.flush()
        for node in self.nodes.values():
            for peer in self.nodes:
                assert node.in_flight(peer) <= self.config.window
        return True

    def run(self, until: int | None = None, horizon: int = 60_000 * MS) -> None:
        """Run until quiet (no packet, no timer) or virtual time ``until``; fail past ``horizon``."""
        while True:
            t = self.next_time()
            if t is None or (until is not None and t > until):
                if until is not None:
                    self.now = max(self.now, until)
                return
            assert t <= horizon, "the network never went quiet"
            self.step()

    def restart(self, n: int, epoch: int, members=None) -> None:
        """Replace node ``n`` by a new incarnation; its outputs so far move to ``past[n]``."""
        self.nodes[n] = Unicast(n, CLUSTER, self.config, epoch=epoch)
        self.past[n].append(self.events.pop(n, []))
        self.nodes[n].set_members(self.nodes if members is None else members, self.now)

    # -- reading outputs --------------------------------------------------------

    def of(self, n: int, kind: type) -> list:
        return [e for e in self.events[n] if type(e) is kind]

    def received(self, n: int, sender: int | None = None) -> list[bytes]:
        return [m.payload for m in self.of(n, UnicastMessage) if sender is None or m.sender == sender]


def payloads(rng: random.Random, sizes: list[int]) -> list[bytes]:
    return [rng.randbytes(size) for size in sizes]


def drive_packets(a: Unicast, b: Unicast, now: int = 0) -> list:
    """Shuttle packets between two nodes, losing none and firing timers, until both are idle.

    Returns their other outputs."""
    nodes, events = {a.me: a, b.me: b}, []
    while True:
        moved = False
        for node in (a, b):
            for out in node.take():
                if type(out) is SendTo:
                    nodes[out.node].receive(now, out.packet)
                    moved = True
                else:
                    events.append(out)
        if not moved:
            deadlines = [d for d in (a.next_deadline(), b.next_deadline()) if d is not None]
            if not deadlines:
                return events
            now = min(deadlines)
            a.tick(now)
            b.tick(now)


# ------------------------------------------------------------------ delivery under faults


@given(
    seed=st.integers(0, 2**32 - 1),
    loss=st.floats(0, 0.3),
    dup=st.floats(0, 0.2),
    reorder=st.floats(0, 0.5),
    sizes=st.lists(st.one_of(st.integers(0, 150), st.integers(0, 2500)), min_size=1, max_size=12),
)
@example(seed=1, loss=0.3, dup=0.2, reorder=0.5, sizes=[0, 142, 143, 2500, 0, 1])
def test_exactly_once_in_order_delivery_under_loss_duplication_and_reordering(seed, loss, dup, reorder, sizes):
    net = Net((1, 2, 3), seed=seed, loss=loss, dup=dup, reorder=reorder)
    net.strict_sent = True
    rng = random.Random(seed)
    sent: dict[tuple[int, int], list[tuple[bytes, int]]] = defaultdict(list)
    ids: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, size in enumerate(sizes):
        for src, dst in ((1, 2), (2, 1), (3, 1 + i % 2)):
            data, kind = rng.randbytes(size), rng.randrange(256)
            ids[src, dst].append(net.send(src, dst, data, kind))
            sent[src, dst].append((data, kind))
        net.run(until=net.now + rng.randint(0, 3 * MS))        # some sends while others are in flight
    net.run()
    for (src, dst), expected in sent.items():
        assert [(m.payload, m.kind) for m in net.of(dst, UnicastMessage) if m.sender == src] == expected
    for (src, dst), msg_ids in ids.items():
        assert [e.msg_id for e in net.of(src, UnicastSent) if e.dest == dst] == msg_ids
        assert net.of(src, UnicastFailed) == []
    for node in net.nodes.values():
        assert node.pending == 0 and node.next_deadline() is None


def test_kind_travels_with_each_message():
    net = Net()
    for kind in (0, 1, 255):
        net.send(1, 2, b"k" * 300, kind)
    net.run()
    assert [(m.sender, m.kind) for m in net.of(2, UnicastMessage)] == [(1, 0), (1, 1), (1, 255)]


def test_a_sixty_four_mebibyte_message_goes_through_whole():
    a, b = Unicast(1, CLUSTER, epoch=1), Unicast(2, CLUSTER, epoch=1)
    a.set_members((1, 2), 0)
    b.set_members((1, 2), 0)
    big = bytes(range(256)) * (1 << 18)              # 64 MiB, the default max_message
    msg_id = a.send(0, 2, big)
    events = drive_packets(a, b)
    assert [type(e) for e in events] == [UnicastMessage, UnicastSent]
    assert events[0].payload == big and events[1] == UnicastSent(2, msg_id)
    assert a.pending == 0 and a.stats()["retransmitted"] == 0


def test_sent_is_reported_only_once_the_last_fragment_is_acknowledged():
    net = Net(loss=0.0)
    net.cut.add(frozenset((1, 2)))
    msg_id = net.send(1, 2, b"x" * 1000)
    net.run(until=100 * MS)
    assert net.of(1, UnicastSent) == [] and net.nodes[1].pending == 8
    net.cut.clear()
    net.run()
    assert net.of(1, UnicastSent) == [UnicastSent(2, msg_id)]
    assert net.received(2) == [b"x" * 1000]


def test_sent_is_not_reported_for_a_message_whose_last_packet_is_missing():
    a, b = Unicast(1, CLUSTER, SMALL), Unicast(2, CLUSTER, SMALL)
    for n in (a, b):
        n.set_members((1, 2), 0)
    first, second = a.send(0, 2, b"first"), a.send(0, 2, b"second")
    packets = [o.packet for o in a.take()]
    b.receive(10, packets[0])                            # the second is lost
    b.tick(10 + 2 * MS)
    (ack,) = b.take()[1:]
    a.receive(3 * MS, ack.packet)
    assert a.take() == [UnicastSent(2, first)]                  # not UnicastSent(2, second)
    assert a.pending == 1 and second != first


def test_a_full_window_does_not_wait_for_the_ack_delay():
    net = Net(config=UnicastConfig(window=8, mtu=200, ack_delay=0.002), latency=(100, 100))
    net.send(1, 2, bytes(64 * 142))                       # 64 packets: 8 windows
    net.run()
    assert len(net.of(1, UnicastSent)) == 1
    assert net.now < 6 * MS                               # each window's ack came at once, not 2 ms later
    assert net.nodes[2].stats()["acks_sent"] < 64


# ------------------------------------------------------------------ window, queue, limits


def test_at_most_window_packets_are_in_flight_and_the_rest_wait():
    net = Net(config=UnicastConfig(window=4, mtu=200))
    net.cut.add(frozenset((1, 2)))
    for i in range(10):
        net.send(1, 2, bytes([i]))
    seqs = {header(p)[6] for _, src, p in net.wire if src == 1}
    assert seqs == {0, 1, 2, 3}
    assert net.nodes[1].in_flight(2) == 4 and net.nodes[1].pending == 10
    net.run(until=2000 * MS)                          # retransmissions only: still the first four
    assert {header(p)[6] for _, src, p in net.wire if src == 1} == {0, 1, 2, 3}
    net.cut.clear()
    net.run()
    assert net.received(2) == [bytes([i]) for i in range(10)]


def test_queue_full_beyond_send_queue_max_and_nothing_is_queued_then():
    net = Net(config=UnicastConfig(window=2, send_queue_max=3, mtu=200))
    net.cut.add(frozenset((1, 2)))
    ids = [net.send(1, 2, b"m%d" % i) for i in range(5)]     # 2 in flight, 3 queued
    with pytest.raises(QueueFull, match="send_queue_max=3"):
        net.send(1, 2, b"one too many")
    assert net.nodes[1].pending == 5
    net.cut.clear()
    net.run()
    assert [e.msg_id for e in net.of(1, UnicastSent)] == ids
    assert net.received(2) == [b"m%d" % i for i in range(5)]


def test_one_message_larger_than_the_queue_is_accepted_when_nothing_is_queued():
    net = Net(config=UnicastConfig(window=2, send_queue_max=3, mtu=200))
    big = bytes(range(256)) * 8                       # 15 fragments
    net.send(1, 2, big)
    with pytest.raises(QueueFull):
        net.send(1, 2, b"behind it")
    net.run()
    assert net.received(2) == [big]
    net.send(1, 2, b"after it")
    net.run()
    assert net.received(2) == [big, b"after it"]


def test_payload_too_large_names_the_sizes():
    net = Net(config=UnicastConfig(max_message=1000, mtu=200))
    with pytest.raises(PayloadTooLarge, match="1001 bytes.*1000 bytes"):
        net.send(1, 2, b"x" * 1001)
    net.send(1, 2, b"x" * 1000)
    net.run()
    assert net.received(2) == [b"x" * 1000]


def test_local_errors():
    net = Net()
    with pytest.raises(LocalProtocolError, match="itself"):
        net.send(1, 1, b"me")
    with pytest.raises(LocalProtocolError, match="kind"):
        net.send(1, 2, b"k", kind=256)
    assert net.nodes[1].pending == 0 and net.wire == []


# ------------------------------------------------------------------ membership


def test_sends_to_non_members_fail_at_once_without_raising():
    fresh = Unicast(1, CLUSTER)
    first = fresh.send(0, 2, b"before any view")
    assert fresh.take() == [UnicastFailed(2, first, NOT_MEMBER)]
    fresh.set_members((1, 2), 0)
    second = fresh.send(0, 9, b"stranger")
    assert fresh.take() == [UnicastFailed(9, second, NOT_MEMBER)]
    assert second != first and fresh.pending == 0 and fresh.next_deadline() is None


def test_a_member_that_leaves_fails_every_pending_send_in_the_same_call():
    net = Net(config=UnicastConfig(window=2, mtu=200))
    net.cut.add(frozenset((1, 2)))
    ids = [net.send(1, 2, b"p%d" % i) for i in range(4)] + [net.send(1, 2, b"y" * 500)]
    a = net.nodes[1]
    a.set_members((1, 3), net.now)
    assert a.take() == [UnicastFailed(2, i, LEFT) for i in ids]
    assert a.pending == 0 and a.next_deadline() is None


def test_partly_acknowledged_messages_fail_and_acknowledged_ones_do_not():
    net = Net(config=UnicastConfig(window=4, mtu=200))
    done = net.send(1, 2, b"delivered")
    net.run()
    net.cut.add(frozenset((1, 2)))
    cut = [net.send(1, 2, b"z" * 1000), net.send(1, 2, b"w")]
    net.nodes[1].set_members((1,), net.now)
    net.flush()
    assert net.of(1, UnicastSent) == [UnicastSent(2, done)]
    assert net.of(1, UnicastFailed) == [UnicastFailed(2, i, LEFT) for i in cut]


def test_nothing_from_a_departed_member_is_accepted_until_it_is_back():
    net = Net()
    net.nodes[2].set_members((1, 2, 3), 0)
    net.nodes[1].set_members((1, 3), 0)                  # 1 no longer sees 2; 2 has not noticed yet
    net.send(2, 1, b"into the void")
    net.run(until=50 * MS)
    assert net.received(1) == [] and net.nodes[1].drops["not_member"] >= 1
    net.nodes[1].set_members((1, 2), net.now)            # 2 is back: its retransmission gets through
    net.run()
    assert net.received(1) == [b"into the void"]


def test_a_rejoined_member_gets_a_new_stream_and_old_packets_stay_out():
    net = Net()
    net.send(1, 2, b"first life of the stream")
    net.run()
    old = [p for _, src, p in net.wire if src == 1 and p[3] == DATA]
    for n in (1, 2):
        net.nodes[n].set_members((n,), net.now)
    for n in (1, 2):
        net.nodes[n].set_members((1, 2), net.now)
    for packet in old:                                   # a late copy of the old stream arrives first
        net.nodes[2].receive(net.now, packet)
    assert net.nodes[2].drops["stale_stream"] == len(old)
    net.send(1, 2, b"second")
    net.run()
    assert net.received(2) == [b"first life of the stream", b"second"]


def test_a_receiver_that_saw_the_sender_leave_resets_the_stream_the_sender_kept():
    # EVS lets views differ for a while: 2 passes through a view without 1 while
    # 1 never stops seeing 2, so 1 keeps its stream and 2 has dropped it.
    net = Net()
    net.send(1, 2, b"before")
    net.run()
    net.nodes[2].set_members((2,), net.now)
    net.nodes[2].set_members((1, 2), net.now)
    pending = net.send(1, 2, b"lost to the reset")
    net.run()
    assert UnicastFailed(2, pending, LEFT) in net.of(1, UnicastFailed)
    assert net.nodes[1].stats()["resets_received"] == 1
    net.send(1, 2, b"after")                             # a new stream: accepted
    net.run()
    assert net.received(2) == [b"before", b"after"]


@st.composite
def churn_plans(draw):
    node = st.integers(1, 3)
    ops = st.one_of(
        st.tuples(st.just("send"), node, node, st.integers(0, 700)),
        st.tuples(st.just("send"), node, node, st.integers(0, 50)),
        st.tuples(st.just("leave"), node),
        st.tuples(st.just("join"), node),
        st.tuples(st.just("restart"), node),
        st.tuples(st.just("run"), st.sampled_from([100, 1 * MS, 5 * MS, 30 * MS, 200 * MS])),
    )
    return draw(st.integers(0, 2**16)), draw(st.floats(0, 0.2)), draw(st.lists(ops, max_size=30))


@given(churn_plans())
def test_under_churn_and_restarts_each_message_has_one_outcome_and_none_is_delivered_twice(plan):
    """Views change at different times at different nodes, nodes restart, packets are lost.

    Safety: per receiving life, messages from a sender arrive at most once and
    in send order; every message of a live sender gets exactly one outcome;
    UnicastSent means some life of the receiver delivered it.  Liveness: once
    the views agree again, new messages get through (after at most one
    "restarted" failure, for a message sent before the sender learned of a
    restart).
    """
    seed, loss, ops = plan
    net = Net((1, 2, 3), seed=seed, loss=loss, dup=0.05, reorder=0.1)
    rng = random.Random(seed)
    sent: dict[tuple[int, int, int], tuple[int, bytes]] = {}   # (src, src life, msg id) -> (dst, payload)
    out_of_view: set[int] = set()
    serial, epoch = 0, 1

    def view_of(n: int) -> tuple[int, ...]:
        return (n,) if n in out_of_view else tuple(m for m in net.nodes if m not in out_of_view)

    def view_change(lag: int) -> None:
        for n in net.nodes:
            net.run(until=net.now + rng.randint(0, lag))
            net.nodes[n].set_members(view_of(n), net.now)
            net.flush()
        net.cut = {frozenset((a, b)) for a in net.nodes for b in net.nodes if (a in out_of_view) != (b in out_of_view)}

    def send(src: int, dst: int, data: bytes) -> tuple[int, int, int]:
        key = (src, len(net.past[src]), net.send(src, dst, data))
        sent[key] = (dst, data)
        return key

    for op in ops:
        if op[0] == "send" and op[1] != op[2]:
            serial += 1
            send(op[1], op[2], serial.to_bytes(4, "big") * (op[3] // 4 + 1))
        elif op[0] == "leave" and op[1] not in out_of_view:
            out_of_view.add(op[1])
            view_change(lag=3 * MS)
        elif op[0] == "join" and op[1] in out_of_view:
            out_of_view.discard(op[1])
            view_change(lag=3 * MS)
        elif op[0] == "restart":
            epoch += 1                                     # too quick for the membership to notice
            net.restart(op[1], epoch, view_of(op[1]))
        elif op[0] == "run":
            net.run(until=net.now + op[1])
    out_of_view.clear()
    view_change(lag=0)
    tail = [send(src, dst, b"after healing %d" % src) for src, dst in ((1, 2), (2, 3), (3, 1))]
    net.run()
    for key in list(tail):        # sent before the sender learned the peer restarted: fails once, then works
        if UnicastFailed(sent[key][0], key[2], RESTARTED) in net.events[key[0]]:
            tail.append(send(key[0], sent[key][0], b"retry %d" % key[0]))
            tail.remove(key)
    net.run()

    outcome: dict[tuple[int, int, int], str] = {}
    for src in net.nodes:
        for life, events in enumerate(net.past[src] + [net.events[src]]):
            for e in events:
                if type(e) in (UnicastSent, UnicastFailed):
                    key = (src, life, e.msg_id)
                    assert key not in outcome, f"two outcomes for message {key}"
                    assert e.dest == sent[key][0]
                    outcome[key] = "sent" if type(e) is UnicastSent else e.reason
    live = {key for key in sent if key[1] == len(net.past[key[0]])}
    assert live <= set(outcome), "a message of a live sender got neither UnicastSent nor UnicastFailed"
    assert all(outcome[key] == "sent" for key in tail), "no liveness once the views agree again"
    for src in net.nodes:
        for dst in net.nodes:
            order = [data for (s, _, _), (d, data) in sorted(sent.items(), key=lambda kv: kv[1][1]) if (s, d) == (src, dst)]
            everywhere = set()
            for events in net.past[dst] + [net.events[dst]]:
                got = [m.payload for m in events if type(m) is UnicastMessage and m.sender == src]
                assert len(set(got)) == len(got), "a message was delivered twice to one life"
                rest = iter(order)
                assert all(p in rest for p in got), "delivered out of send order, or never sent"
                everywhere.update(got)
            acked = {data for key, (d, data) in sent.items() if key[0] == src and d == dst and outcome.get(key) == "sent"}
            assert acked <= everywhere, "UnicastSent for a message no life of the receiver delivered"


# ------------------------------------------------------------------ restarts


def test_a_restarted_peer_fails_old_messages_with_restarted_and_new_traffic_flows():
    net = Net()
    net.send(1, 2, b"to the first life")
    net.run()
    net.cut.add(frozenset((1, 2)))
    lost = [net.send(1, 2, b"never acknowledged"), net.send(1, 2, b"q" * 400)]
    net.run(until=net.now + 5 * MS)
    net.restart(2, epoch=2)                               # same node id, new incarnation
    net.cut.clear()
    net.run()                                             # a retransmission reaches the new life, which says who it is
    assert net.of(1, UnicastFailed) == [UnicastFailed(2, i, RESTARTED) for i in lost]
    assert net.received(2) == [] and net.nodes[2].drops["wrong_epoch"] >= 1
    after = net.send(1, 2, b"hello again")
    back = net.send(2, 1, b"hello from the new life")
    net.run()
    assert net.received(2) == [b"hello again"]
    assert net.received(1) == [b"hello from the new life"]
    assert UnicastSent(2, after) in net.of(1, UnicastSent) and net.of(2, UnicastSent) == [UnicastSent(1, back)]


def test_a_restart_is_also_learned_from_the_new_lifes_own_traffic():
    net = Net()
    net.send(1, 2, b"a")
    net.send(2, 1, b"b")
    net.run()
    old_packets = [p for _, src, p in net.wire if src == 2]
    net.cut.add(frozenset((1, 2)))
    lost = net.send(1, 2, b"pending")
    net.restart(2, epoch=5)
    net.cut.clear()
    net.send(2, 1, b"from the new life")                  # reaches 1 before 1 retransmits
    assert net.of(1, UnicastFailed) == []
    net.step()
    assert net.of(1, UnicastFailed) == [UnicastFailed(2, lost, RESTARTED)]
    for packet in old_packets:                            # the old life's packets, arriving late
        net.nodes[1].receive(net.now, packet)
    assert net.nodes[1].drops["stale_epoch"] == len(old_packets)
    net.run()
    assert net.received(1) == [b"b", b"from the new life"]


def test_messages_to_a_peer_never_heard_from_reach_whichever_life_answers():
    net = Net()
    net.cut.add(frozenset((1, 2)))
    msg_id = net.send(1, 2, b"early")
    net.restart(2, epoch=9)
    net.cut.clear()
    net.run()
    assert net.of(1, UnicastSent) == [UnicastSent(2, msg_id)] and net.received(2) == [b"early"]


def test_acks_addressed_to_a_previous_life_of_the_sender_are_ignored():
    net = Net()
    net.cut.add(frozenset((1, 2)))
    net.send(1, 2, b"old life")                           # node 1, epoch 1, stream 1, seq 0
    net.cut.clear()
    net.run()
    old_acks = [p for _, src, p in net.wire if src == 2 and p[3] == ACK]
    assert old_acks
    net.restart(1, epoch=2)                               # node 1 again: its stream to 2 is numbered 1 again
    net.cut.add(frozenset((1, 2)))
    net.send(1, 2, b"new life")
    for packet in old_acks:                               # a late ack of the old life's seq 0
        net.nodes[1].receive(net.now, packet)
    assert net.nodes[1].pending == 1 and net.of(1, UnicastSent) == []
    assert net.nodes[1].drops["wrong_epoch"] == len(old_acks)
    net.cut.clear()
    net.run()
    assert net.received(2) == [b"old life", b"new life"]


def test_a_restart_drops_the_dead_lifes_receive_state():
    a, b = Unicast(1, CLUSTER, SMALL, epoch=1), Unicast(2, CLUSTER, SMALL, epoch=1)
    for n in (a, b):
        n.set_members((1, 2), 0)
    a.send(0, 2, b"acknowledged")
    drive_packets(a, b)
    b.send(10 * MS, 1, b"its ack is delayed")
    a.receive(10 * MS, b.take()[0].packet)
    assert a.take() == [UnicastMessage(2, b"its ack is delayed", 0)] and a.next_deadline() == 12 * MS
    b = Unicast(2, CLUSTER, SMALL, epoch=2)               # node 2 restarts
    b.set_members((1, 2), 10 * MS)
    hello = a.send(11 * MS, 2, b"hello")
    b.receive(11 * MS, a.take()[0].packet)                # addressed to epoch 1: dropped, and answered
    (notice,) = b.take()
    assert b.drops == {"wrong_epoch": 1} and notice.packet[3] == ACK
    a.receive(11 * MS, notice.packet)
    assert a.take() == [UnicastFailed(2, hello, RESTARTED)]
    assert a.next_deadline() is None                      # no ack owed to the dead life, nothing in flight


def test_fragments_out_of_place_discard_their_message_without_delivering_it():
    b = Unicast(2, CLUSTER, SMALL)
    b.set_members((1, 2), 0)
    b.receive(0, data_packet(seq=0, msg_id=1, index=0, count=3, payload=b"a"))
    b.receive(0, data_packet(seq=1, msg_id=1, index=2, count=3, payload=b"c"))     # index 1 never came
    b.receive(0, data_packet(seq=2, msg_id=1, index=2, count=3, payload=b"c"))
    b.receive(0, data_packet(seq=3, msg_id=2, index=0, count=2, payload=b"x"))
    b.receive(0, data_packet(seq=4, msg_id=3, index=1, count=2, payload=b"y"))     # another message's tail
    b.receive(0, data_packet(seq=5, msg_id=4, index=0, count=1, payload=b"whole"))
    assert [o for o in b.take() if type(o) is UnicastMessage] == [UnicastMessage(1, b"whole", 0)]
    assert b.stats()["discarded"] == 3 and b.stats()["received"] == 6


def test_a_reassembled_message_over_max_message_is_discarded_not_delivered():
    b = Unicast(2, CLUSTER, UnicastConfig(mtu=200, max_message=100))
    b.set_members((1, 2), 0)
    for i in range(3):
        b.receive(0, data_packet(seq=i, msg_id=1, index=i, count=3, payload=b"z" * 50))
    b.receive(0, data_packet(seq=3, msg_id=2, index=0, count=2, payload=b"z" * 50))
    b.receive(0, data_packet(seq=4, msg_id=2, index=1, count=2, payload=b"z" * 50))
    assert [o for o in b.take() if type(o) is UnicastMessage] == [UnicastMessage(1, b"z" * 100, 0)]
    assert b.stats()["discarded"] == 1


def test_a_real_packet_has_the_documented_layout():
    a = Unicast(3, CLUSTER, SMALL, epoch=11)
    a.set_members((3, 4), 0)
    a.send(0, 4, b"payload", kind=9)
    (out,) = a.take()
    fields = _DATA_FORMAT.unpack_from(out.packet)
    assert fields == (MAGIC, PROTOCOL_VERSION, DATA, CLUSTER, 3, 4, 11, 0, 1, 0, 1, 0, 1, 9, 0)
    assert out.packet[_DATA_FORMAT.size:] == b"payload"


# ------------------------------------------------------------------ acknowledgements and timers


def test_in_order_packets_are_acknowledged_after_ack_delay_and_next_deadline_is_none_when_idle():
    b = Unicast(2, CLUSTER, SMALL)
    b.set_members((1, 2), 0)
    assert b.next_deadline() is None
    b.receive(100, data_packet(seq=0, msg_id=1, payload=b"one"))          # no ACK_NOW: more was queued
    assert [type(e) for e in b.take()] == [UnicastMessage]
    assert b.next_deadline() == 100 + 2 * MS
    b.receive(200, data_packet(seq=1, msg_id=2, payload=b"two"))
    assert b.next_deadline() == 100 + 2 * MS                               # one ack covers both
    b.take()
    b.tick(100 + 2 * MS)
    (ack,) = b.take()
    assert ack.node == 1 and ack.packet[3] == ACK and header(ack.packet)[6] == 2
    assert b.next_deadline() is None


def test_the_last_packet_of_a_large_message_asks_for_the_ack_at_once():
    a, b = connected_pair(UnicastConfig(mtu=200, window=16))      # 142-byte fragments, no half window here
    a.send(0, 2, b"one")
    a.send(0, 2, b"m" * 300)                                 # three fragments
    a.send(0, 2, b"two")
    packets = [o.packet for o in a.take()]
    assert [_DATA_FORMAT.unpack_from(p)[14] for p in packets] == [0, 0, 0, ACK_NOW, 0]
    for p in packets[:4]:
        b.receive(100, p)
    outputs = b.take()
    assert [type(o) for o in outputs] == [UnicastMessage, UnicastMessage, SendTo]     # no ack_delay to wait
    a.receive(200, outputs[-1].packet)
    assert a.take() == [UnicastSent(2, 1), UnicastSent(2, 2)]
    b.receive(300, packets[4])                               # a small one: its ack waits for ack_delay
    assert b.next_deadline() == 300 + 2 * MS


def test_ack_delay_zero_acknowledges_every_packet_at_once():
    cfg = UnicastConfig(ack_delay=0, mtu=200)
    a, b = Unicast(1, CLUSTER, cfg), Unicast(2, CLUSTER, cfg)
    for n in (a, b):
        n.set_members((1, 2), 0)
    a.send(0, 2, b"z" * 500)
    packets = [o.packet for o in a.take()]
    acks = []
    for p in packets:
        b.receive(0, p)
        acks += [o for o in b.take() if type(o) is SendTo]
    assert len(acks) == len(packets) == 4 and b.next_deadline() is None


def test_a_lost_packet_is_resent_when_a_later_one_is_acknowledged_before_the_timeout():
    a, b = Unicast(1, CLUSTER, SMALL), Unicast(2, CLUSTER, SMALL)
    for n in (a, b):
        n.set_members((1, 2), 0)
    for i in range(3):
        a.send(0, 2, b"%d" % i)
    first, second, third = (o.packet for o in a.take())
    b.receive(10, second)                                  # the first was lost
    (ack,) = b.take()
    a.receive(20, ack.packet)
    (resent,) = a.take()
    assert header(resent.packet)[6] == 0 and resent.packet.endswith(b"0")
    a.receive(30, ack.packet)                              # a duplicate of that ack: no second re-send
    assert a.take() == []
    for p in (resent.packet, third):
        b.receive(40, p)
    b.tick(b.next_deadline())
    outputs = b.take()
    assert [m.payload for m in outputs if type(m) is UnicastMessage] == [b"0", b"1", b"2"]
    for later_ack in [o for o in outputs if type(o) is SendTo]:
        a.receive(50 + 2 * MS, later_ack.packet)
    assert a.pending == 0 and a.take() == [UnicastSent(2, i) for i in (1, 2, 3)]
    a.receive(60 + 2 * MS, ack.packet)                     # the first ack, overtaken
    assert a.drops == {"stale_ack": 1} and a.take() == []


def test_retransmissions_back_off_to_max_retransmit_and_no_faster():
    cfg = UnicastConfig(retransmit=0.02, max_retransmit=0.5)
    net = Net(config=cfg)
    net.cut.add(frozenset((1, 2)))
    net.send(1, 2, b"anyone there?")
    net.run(until=5000 * MS)
    times = [t for t, src, _ in net.wire if src == 1]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps[:6] == [20 * MS, 40 * MS, 80 * MS, 160 * MS, 320 * MS, 500 * MS]
    assert set(gaps[5:]) == {500 * MS} and len(gaps) >= 12
    assert net.nodes[1].stats()["retransmitted"] == len(gaps)


def test_progress_resets_the_backoff():
    net = Net(config=UnicastConfig(retransmit=0.02, max_retransmit=0.5, mtu=200))
    net.cut.add(frozenset((1, 2)))
    net.send(1, 2, b"x")
    net.run(until=1000 * MS)
    net.cut.clear()
    net.run()
    start = len(net.wire)
    net.cut.add(frozenset((1, 2)))
    net.send(1, 2, b"y")
    net.run(until=net.now + 25 * MS)
    times = [t for t, src, _ in net.wire[start:] if src == 1]
    assert [b - a for a, b in zip(times, times[1:])] == [20 * MS]


# ------------------------------------------------------------------ bad input


def counted(node: Unicast) -> int:
    """Each receive() moves exactly one of these."""
    s = node.stats()
    return s["drops"] + s["received"] + s["acks_received"]


def busy_pair() -> tuple[Unicast, Unicast, list[bytes]]:
    """Node 2 mid-stream from node 1 (a hole, a partial message), and real packets of both kinds."""
    a, b = Unicast(1, CLUSTER, SMALL, epoch=3), Unicast(2, CLUSTER, SMALL, epoch=4)
    for n in (a, b):
        n.set_members((1, 2, 3), 0)
    a.send(0, 2, b"m" * 600)
    a.send(0, 2, b"small")
    packets = [o.packet for o in a.take()]
    for p in packets[1:3]:
        b.receive(0, p)
    acks = [o.packet for o in b.take() if type(o) is SendTo]
    b.send(0, 1, b"reply" * 50)
    return a, b, packets + acks + [o.packet for o in b.take()]


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise_and_are_counted(data):
    for prefix in (b"", MAGIC + b"\x01\x01", MAGIC + b"\x01\x02"):
        _, b, _ = busy_pair()
        before = counted(b)
        b.receive(5, prefix + data)
        assert counted(b) == before + 1


@given(st.data())
def test_mutated_real_packets_never_raise_and_are_counted(data):
    a, b, packets = busy_pair()
    packet = bytearray(data.draw(st.sampled_from(packets)))
    for _ in range(data.draw(st.integers(1, 4))):
        choice = data.draw(st.sampled_from(["flip", "cut", "grow"]))
        if choice == "flip" and packet:
            packet[data.draw(st.integers(0, len(packet) - 1))] = data.draw(st.integers(0, 255))
        elif choice == "cut":
            del packet[data.draw(st.integers(0, len(packet))):]
        else:
            packet += data.draw(st.binary(min_size=1, max_size=40))
    for node in (a, b):
        before = counted(node)
        node.receive(7, bytes(packet))
        node.tick(10**9)
        assert counted(node) == before + 1


def test_packets_from_another_cluster_or_for_another_node_are_dropped():
    a, b = Unicast(1, CLUSTER), Unicast(2, CLUSTER)
    stranger = Unicast(1, CLUSTER + 1)
    for n in (a, b, stranger):
        n.set_members((1, 2, 3), 0)
    stranger.send(0, 2, b"foreign")
    a.send(0, 3, b"for node 3")
    b.receive(0, stranger.take()[0].packet)
    b.receive(0, a.take()[0].packet)
    assert b.take() == []
    assert b.drops == {"cluster": 1, "not_for_me": 1}


def test_the_sender_id_is_at_bytes_8_to_12():
    a = Unicast(0x01020304, CLUSTER)
    a.set_members((0x01020304, 2), 0)
    a.send(0, 2, b"x")
    (out,) = a.take()
    assert out.packet[:2] == MAGIC and out.packet[8:12] == bytes([1, 2, 3, 4])


def test_window_bytes_bounds_the_packets_in_flight():
    a, b = connected_pair(UnicastConfig(mtu=200, window=8, window_bytes=600))     # 3 packets of 200 bytes
    for i in range(5):
        a.send(0, 2, b"%d" % i)
    assert len(a.take()) == 3 and a.in_flight(2) == 3
    assert [m.payload for m in drive_packets(a, b) if type(m) is UnicastMessage] == [b"%d" % i for i in range(5)]


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(window=0), "window"),
        (dict(window=5000), "window"),
        (dict(window_bytes=0), "window_bytes"),
        (dict(retransmit=0), "retransmit"),
        (dict(max_retransmit=0.01), "max_retransmit"),
        (dict(ack_delay=0.05), "ack_delay"),
        (dict(mtu=40), "mtu"),
        (dict(max_message=-1), "max_message"),
        (dict(send_queue_max=0), "send_queue_max"),
    ],
)
def test_bad_settings_are_config_errors_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"UNICAST: {field} must"):
        UnicastConfig(**kwargs)


def test_settings_parse_from_a_stack_file():
    layer = LayerSpec(name="UNICAST", settings={"retransmit": "10ms", "max_retransmit": "1s", "mtu": "9000",
                                                "ack_delay": "0"}, source="test.toml", index=3)
    cfg = build_config(UnicastConfig, layer)
    assert (cfg.retransmit, cfg.max_retransmit, cfg.mtu, cfg.ack_delay) == (0.01, 1.0, 9000, 0.0)


# ------------------------------------------------------------------ found by mutation testing


def connected_pair(config: UnicastConfig = SMALL) -> tuple[Unicast, Unicast]:
    a, b = Unicast(1, CLUSTER, config), Unicast(2, CLUSTER, config)
    for n in (a, b):
        n.set_members((1, 2), 0)
    return a, b


def test_a_message_that_starts_before_the_last_one_ended_replaces_it():
    b = Unicast(2, CLUSTER, SMALL)
    b.set_members((1, 2), 0)
    b.receive(0, data_packet(seq=0, msg_id=1, index=0, count=2, payload=b"half"))
    b.receive(0, data_packet(seq=1, msg_id=2, index=0, count=1, payload=b"whole"))
    assert [o for o in b.take() if type(o) is UnicastMessage] == [UnicastMessage(1, b"whole", 0)]
    assert b.stats()["discarded"] == 1


def test_every_oversize_message_is_counted():
    b = Unicast(2, CLUSTER, UnicastConfig(mtu=200, max_message=60))
    b.set_members((1, 2), 0)
    for m in range(2):
        for i in range(2):
            b.receive(0, data_packet(seq=2 * m + i, msg_id=m + 1, index=i, count=2, payload=b"z" * 50))
    assert [o for o in b.take() if type(o) is UnicastMessage] == []
    assert b.stats()["discarded"] == 2


def test_only_the_holes_a_later_packet_overtook_are_sent_again():
    a, b = connected_pair()
    for i in range(6):
        a.send(0, 2, b"%d" % i)
    packets = [o.packet for o in a.take()]
    for seq in (0, 2, 4, 5):                                  # seqs 1 and 3 were lost
        b.receive(10, packets[seq])
    acks = [o.packet for o in b.take() if type(o) is SendTo]
    a.receive(20, acks[-1])                                    # cumulative 1, selective 2, 4 and 5
    out = a.take()
    resent = [o.packet for o in out if type(o) is SendTo]
    assert [header(p)[6] for p in resent] == [1, 3] and a.stats()["retransmitted"] == 2
    for p in resent:
        b.receive(30, p)
    b.tick(b.next_deadline() or 30)
    for o in b.take():
        if type(o) is SendTo:
            a.receive(40, o.packet)
    out += a.take()
    assert [o for o in out if type(o) is UnicastSent] == [UnicastSent(2, i) for i in range(1, 7)]
    assert a.stats()["completed"] == 6 and a.pending == 0 and a.next_deadline() is None


def test_the_newest_hole_below_a_selective_ack_is_sent_again_at_once():
    a, b = connected_pair()
    for i in range(3):
        a.send(0, 2, b"%d" % i)
    packets = [o.packet for o in a.take()]
    for p in (packets[0], packets[2]):                        # seq 1, just below the newest, was lost
        b.receive(10, p)
    a.receive(20, [o.packet for o in b.take() if type(o) is SendTo][-1])
    assert [header(o.packet)[6] for o in a.take() if type(o) is SendTo] == [1]   # not after a timeout


def test_what_is_still_in_flight_after_an_ack_keeps_its_retransmission_timer():
    a, b = connected_pair()
    a.send(0, 2, b"first")
    a.send(0, 2, b"second")
    first, _lost = (o.packet for o in a.take())
    b.receive(10, first)                                       # the second is lost
    b.tick(b.next_deadline())
    (ack,) = [o.packet for o in b.take() if type(o) is SendTo]
    a.receive(3 * MS, ack)
    assert a.take() == [UnicastSent(2, 1)]
    deadline = a.next_deadline()
    assert deadline == 3 * MS + round(SMALL.retransmit * 1_000_000)   # the timer starts over, from rto0
    a.tick(deadline)
    assert [header(o.packet)[6] for o in a.take()] == [1]


def test_the_byte_limit_refuses_a_message_queued_behind_others_and_says_how_much():
    chunk = SMALL.mtu - _DATA_FORMAT.size                      # payload bytes per packet
    config = UnicastConfig(mtu=SMALL.mtu, window=1, send_queue_bytes=3 * chunk)
    a, _ = connected_pair(config)
    a.send(0, 2, b"in flight")
    a.send(0, 2, b"queued")                                    # one packet queued
    a.send(0, 2, bytes(2 * chunk))                             # two more: exactly the limit
    with pytest.raises(QueueFull, match=rf"^UNICAST: {3 * chunk} bytes already queued for node 2 and this message "
                                        rf"needs {chunk} more, over send_queue_bytes={3 * chunk};"):
        a.send(0, 2, b"x")
    b_limit = UnicastConfig(mtu=SMALL.mtu, window=1, send_queue_bytes=10 * chunk)
    c, _ = connected_pair(b_limit)
    c.send(0, 2, b"in flight")
    c.send(0, 2, b"queued")
    with pytest.raises(QueueFull, match="over send_queue_bytes"):
        c.send(0, 2, bytes(10 * chunk))                        # 10 more behind 1: over
    assert c.pending == 2
