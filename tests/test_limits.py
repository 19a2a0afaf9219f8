"""Every queue a member keeps is bounded in bytes as well as in count, and errors stay with the caller.

Sans-IO where the limit lives in a layer (the send queue, reassembly, unicast
peer tables, state transfer), trio channels on loopback where it is the
driver's (the application's event queues, the blocking facade, ``send_to`` and
request handlers).  docs/guarantees.rst ("A slow consumer", "Bounded memory")
states the limits these tests hold the code to.
"""

from __future__ import annotations

import dataclasses
import time
import tracemalloc
from collections import deque

import msgpack
import pytest
import trio

import groupcomm
from groupcomm import blocking
from groupcomm.config import build_stack, load_stack
from groupcomm.core.ring import RingConfig
from groupcomm.errors import ConfigError, DeliveryOverflow, PayloadTooLarge, QueueFull
from groupcomm.events import Direct, Message, RingId, View
from groupcomm.io.channel import ChannelConfig, open_channel
from groupcomm.layers.frag import FragConfig, Fragmenter
from groupcomm.layers.multicast import Multicast
from groupcomm.layers.spaces import (
    RingSend,
    SpaceLayer,
    SpaceMessage,
    SpacesConfig,
    StateInstalled,
    StateRequest,
    UnicastSend,
)
from groupcomm.layers.unicast import Unicast, UnicastConfig, UnicastMessage
from groupcomm.layers.wire import (
    FRAG_HEADER,
    JOIN,
    DataFrame,
    StateChunkFrame,
    decode_unicast,
    encode,
)
from groupcomm.testing import SimCluster
from tests.test_channel import FAST, loopback, unique_cluster, wait_for_view
from tests.test_unicast import CLUSTER, data_packet

KiB, MiB = 1 << 10, 1 << 20


# ---------------------------------------------------------------------------
# The send queue: bytes as well as messages (TOTEM send_queue_bytes)
# ---------------------------------------------------------------------------


def started(config: RingConfig | None = None) -> Multicast:
    m = Multicast(1, config or RingConfig(), frag=FragConfig())
    m.start(0)
    return m


def flood(m: Multicast, payload: bytes, most: int = 10_001) -> int:
    """Send ``payload`` until QueueFull (at most ``most`` times); how many were taken."""
    for n in range(most):
        try:
            m.send(0, payload)
        except QueueFull:
            return n
    return most


def test_a_flood_of_256_kib_messages_stops_at_send_queue_bytes_and_a_refused_send_queues_nothing():
    m = started()
    payload = bytes(256 * KiB)
    taken = flood(m, payload)
    assert taken == RingConfig().send_queue_bytes // len(payload)          # 256 (64 MiB), not 10 001
    pending, queued = m.pending, m.queued_bytes
    assert queued <= RingConfig().send_queue_bytes
    with pytest.raises(QueueFull, match="send_queue_bytes"):
        m.send(0, payload)
    assert (m.pending, m.queued_bytes) == (pending, queued)
    assert not m.can_send


def test_small_messages_are_bounded_in_bytes_too():
    m = started(RingConfig(send_queue_bytes=100_000))
    assert flood(m, bytes(1000)) == 100
    assert m.queued_bytes == 100_000


def test_a_message_over_the_byte_limit_is_taken_when_nothing_is_queued():
    m = started(RingConfig(send_queue_bytes=1 * MiB))
    m.send(0, bytes(8 * MiB))
    assert m.queued_bytes == 8 * MiB
    with pytest.raises(QueueFull):
        m.send(0, b"x")


def test_a_queued_large_message_is_cut_into_fragments_lazily_not_copied():
    m = started()
    payload = bytes(8 * MiB)
    tracemalloc.start()
    try:
        m.send(0, payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 * MiB                     # the fragments of all 8 MiB used to be built at once


def test_the_byte_limit_frees_as_the_ring_orders_and_every_message_arrives():
    config = dataclasses.replace(RingConfig(token_timeout=1.0, join=0.05, merge=0.2), send_queue_bytes=20_000)
    sim = SimCluster(2, seed=3, config=config, stack="sim")
    assert sim.run_until(sim.converged, timeout=10)
    taken: list[int] = []

    def burst(member, now: int) -> None:
        taken.append(flood(member.multicast, bytes(1000)))

    sim.act(1, burst)
    assert 20 <= taken[0] <= 25 and sim.layers(1).multicast.queued_bytes <= 20_000
    assert sim.run_until(lambda: sim.layers(1).multicast.queued_bytes == 0, timeout=10)
    sim.act(1, burst)
    assert 20 <= taken[1] <= 25
    sim.run(2.0)
    got = [e for e in sim.history(2) if type(e).__name__ == "Delivery"]
    assert len(got) == sum(taken)


# ---------------------------------------------------------------------------
# Reassembly: max_message on what a receiver builds; partial messages per sender
# ---------------------------------------------------------------------------


def test_a_receiver_refuses_a_message_over_its_max_message_from_the_first_fragment():
    sender, receiver = Fragmenter(1, 64, 1 << 20), Fragmenter(2, 64, 1000)
    packets = sender.split(bytes(5000), False)
    assert all(receiver.deliver(1, p, False) is None for p in packets)
    assert receiver.refused == 1 and receiver.partial == 0
    assert receiver.dropped == len(packets)                  # the head refused, every tail dropped
    fine = sender.split(bytes(900), False)
    assert [w for p in fine if (w := receiver.deliver(1, p, False))] == [(bytes(900), 0)]


def test_a_message_that_grows_past_max_message_is_dropped_as_it_does():
    receiver = Fragmenter(2, 1 << 16, 1000)
    # A short first fragment declaring 3, then long ones: the declared size passed, the bytes do not.
    for index, size in enumerate((10, 600, 600)):
        assert receiver.deliver(1, FRAG_HEADER.pack(9, index, 3, 0) + bytes(size), False) is None
    assert receiver.partial == 0 and receiver.refused == 1


def test_partial_messages_per_sender_are_capped_in_number():
    sender, receiver = Fragmenter(1, 64, 1 << 20), Fragmenter(2, 64, 1 << 20, partial_messages=2)
    heads = [sender.split(bytes(500), False)[0] for _ in range(5)]
    for head in heads:
        receiver.deliver(1, head, False)
    assert receiver.refused == 3                              # the oldest go as new ones start
    assert receiver.partial == 2 * (64 - 13)
    other = Fragmenter(3, 64, 1 << 20).split(bytes(500), False)
    assert [w for p in other if (w := receiver.deliver(3, p, False))] == [(bytes(500), 0)]   # per sender


def test_partial_bytes_per_sender_are_capped():
    receiver = Fragmenter(2, 64, 1000, partial_messages=4, partial_bytes=1000)
    sender = Fragmenter(1, 64, 1000)
    first, second = sender.split(bytes(900), False), sender.split(bytes(900), False)
    for p in first[:15]:                                      # 765 bytes of the first held
        receiver.deliver(1, p, False)
    for p in second[:6]:                                      # the second passes 1000 bytes for sender 1
        receiver.deliver(1, p, False)
    assert receiver.partial <= 1000 and receiver.refused == 1


def test_frag_limits_are_validated():
    with pytest.raises(ConfigError, match="partial_bytes"):
        FragConfig(max_message=1000, partial_bytes=999)
    with pytest.raises(ConfigError, match="partial_messages"):
        FragConfig(partial_messages=0)
    assert FragConfig(max_message=1000).reassembly_bytes == 1000


# ---------------------------------------------------------------------------
# UNICAST: the send queue in bytes; per-peer tables
# ---------------------------------------------------------------------------


def test_unicast_queue_is_bounded_in_bytes():
    u = Unicast(1, CLUSTER, UnicastConfig(mtu=200, window=2, send_queue_bytes=2000), epoch=1)
    u.set_members((1, 2), 0)
    u.send(0, 2, bytes(5000))                                 # taken: nothing was queued
    with pytest.raises(QueueFull, match="send_queue_bytes"):
        u.send(0, 2, b"x")
    assert u.queued_bytes(2) > 2000


def test_peers_that_left_are_remembered_up_to_remembered_peers():
    u = Unicast(1, CLUSTER, UnicastConfig(remembered_peers=2), epoch=1)
    for peer in range(2, 12):
        u.set_members((1, peer), 0)
        u.receive(0, data_packet(sender=peer, dest=1, s_epoch=5, payload=b"hi"))
        assert UnicastMessage(peer, b"hi", 0) in u.take()
    u.set_members((1,), 0)
    assert u.stats()["peers_remembered"] == 2
    u.set_members((1, 11), 0)                                 # the last to leave is still known:
    u.receive(0, data_packet(sender=11, dest=1, s_epoch=5, payload=b"hi"))
    assert u.drops["stale_stream"] == 1                       # its finished stream is not taken for a new one


# ---------------------------------------------------------------------------
# State transfer: a timeout that asks another provider; the joiner's buffer; early chunks
# ---------------------------------------------------------------------------


class Spaces:
    """SpaceLayers of several members fed one total order by hand: no ring, no clock.

    Ring messages are ordered in the order they are handed out; snapshot chunks
    go straight to the joiner; providers in :attr:`stuck` never answer.
    """

    def __init__(self, ids: tuple[int, ...], config: SpacesConfig | None = None) -> None:
        self.layers = {n: SpaceLayer(n, config=config) for n in ids}
        self.seen: dict[int, list] = {n: [] for n in ids}
        self.stuck: set[int] = set()
        self.ring: deque = deque()
        self.chunks: deque = deque()
        for layer in self.layers.values():
            layer.view(View(ids, RingId(ids[0], 1), False))
        self.pump()

    def send(self, node: int, payload: bytes) -> None:
        self.ring.append((node, self.layers[node].send("s", payload)))
        self.pump()

    def pump(self) -> None:
        while True:
            took = False
            for node, layer in self.layers.items():
                for item in layer.take():
                    took = True
                    t = type(item)
                    if t is RingSend:
                        self.ring.append((node, item.payload))
                    elif t is UnicastSend:
                        self.chunks.append((node, item.dest, item.payload))
                    elif t is StateRequest:
                        if node not in self.stuck:
                            layer.provide(item, b"state from %d" % node)
                    else:
                        self.seen[node].append(item)
            if self.ring:
                sender, payload = self.ring.popleft()
                for layer in self.layers.values():
                    layer.deliver(sender, payload, False)
            elif self.chunks:
                sender, dest, payload = self.chunks.popleft()
                self.layers[dest].state_chunk(sender, decode_unicast(payload))
            elif not took:
                return

    def join(self, node: int) -> None:
        self.layers[node].join("s")
        self.pump()

    def installed(self, node: int) -> list[bytes | None]:
        return [e.state for e in self.seen[node] if type(e) is StateInstalled]


def three_with_a_stuck_provider(config: SpacesConfig | None = None) -> Spaces:
    """1 and 3 hold the space's state; 2 joins and its provider, 1 (the oldest), never answers."""
    h = Spaces((1, 2, 3), config)
    h.join(1)
    h.join(3)
    assert h.installed(3) == [b"state from 1"]
    h.stuck = {1}
    h.join(2)
    assert h.installed(2) == []
    return h


def test_a_joiner_asks_another_provider_after_the_state_transfer_timeout():
    h = three_with_a_stuck_provider(SpacesConfig(state_transfer_timeout=5.0))
    joiner = h.layers[2]
    joiner.tick(1_000_000)                                    # the timer starts
    assert joiner.next_deadline() == 6_000_000
    joiner.tick(5_999_999)
    h.pump()
    assert h.installed(2) == []
    joiner.tick(6_000_000)                                    # STATE_REQ on the ring: 3 provides, not 1 again
    h.pump()
    assert h.installed(2) == [b"state from 3"]
    assert joiner.transfers_retried == 1 and joiner.next_deadline() is None


def test_after_every_provider_was_asked_the_first_is_asked_again():
    h = three_with_a_stuck_provider(SpacesConfig(state_transfer_timeout=1.0))
    h.stuck = {1, 3}
    joiner, now = h.layers[2], 0
    joiner.tick(now)
    for _ in range(2):                                        # 3 is asked, then 1 again
        now = joiner.next_deadline()
        joiner.tick(now)
        h.pump()
    h.stuck = set()
    now = joiner.next_deadline()
    joiner.tick(now)                                          # and 3 again, which answers now
    h.pump()
    assert h.installed(2) == [b"state from 3"]


def test_a_joiners_buffer_is_bounded_and_a_full_one_asks_again_at_a_later_point():
    h = three_with_a_stuck_provider(SpacesConfig(snapshot_buffer_bytes=1000))
    for i in range(30):
        h.send(3, bytes([i]) * 100)
    seen = [e for e in h.seen[2] if type(e) in (StateInstalled, SpaceMessage)]
    assert type(seen[0]) is StateInstalled and seen[0].state == b"state from 3"
    # Messages up to the new snapshot point are in that snapshot; every later one follows it.
    later = [e.message.payload[0] for e in seen[1:]]
    assert later == list(range(11, 30))          # the 11th message passed 1000 bytes: asked again there
    assert h.layers[2].transfers_retried == 1


def test_a_joiners_buffer_is_bounded_in_events_too():
    h = three_with_a_stuck_provider(SpacesConfig(snapshot_buffer_events=5))
    for i in range(8):
        h.send(3, b"%d" % i)
    assert h.installed(2) == [b"state from 3"]


def test_early_snapshot_chunks_are_capped_by_count_and_by_bytes():
    layer = SpaceLayer(2, config=SpacesConfig(early_chunks=3))
    layer.view(View((1, 2), RingId(1, 5), False))
    for i in range(5):
        layer.state_chunk(1, StateChunkFrame("s", (1, 5, 99), i, False, b"x" * 10))   # one point: used to be unbounded
    assert layer.dropped == 2
    layer = SpaceLayer(2, config=SpacesConfig(early_chunk_bytes=1000))
    layer.view(View((1, 2), RingId(1, 5), False))
    for i in range(5):
        layer.state_chunk(1, StateChunkFrame("s", (1, 5, 99 + i), 0, False, b"x" * 400))
    assert layer.dropped == 3


def test_remote_space_names_are_checked_like_local_ones():
    layer = SpaceLayer(2)
    layer.view(View((1, 2), RingId(1, 5), False))
    for bad in (msgpack.packb([JOIN, "x" * 300]), msgpack.packb([JOIN, ""]), msgpack.packb([JOIN, 7]),
                encode(DataFrame("s", b"x"))[:-1]):
        assert layer.deliver(1, bad, False) is None
    assert layer.dropped == 4 and layer.spaces == {}
    with pytest.raises(ValueError):
        layer.join("x" * 300)


def test_spaces_limits_are_validated():
    with pytest.raises(ConfigError, match="state_transfer_timeout"):
        SpacesConfig(state_transfer_timeout=0)
    with pytest.raises(ConfigError, match="early_chunks"):
        SpacesConfig(early_chunks=0)
    with pytest.raises(ConfigError, match="max_pending_bytes"):
        ChannelConfig(max_pending_bytes=0)


def test_the_stack_file_sets_the_channel_and_spaces_limits(tmp_path):
    path = tmp_path / "limits.toml"
    path.write_text('[[layer]]\nname = "UDP"\n\n[[layer]]\nname = "TOTEM"\n\n'
                    '[[layer]]\nname = "SPACES"\nstate_transfer_timeout = "2s"\nsnapshot_buffer_bytes = "1MiB"\n\n'
                    '[[layer]]\nname = "CHANNEL"\nmax_pending_bytes = "8MiB"\n')
    settings = build_stack(load_stack(str(path)))
    assert settings.spaces == SpacesConfig(state_transfer_timeout=2.0, snapshot_buffer_bytes=MiB)
    assert settings.channel == ChannelConfig(max_pending_bytes=8 * MiB)
    assert build_stack(load_stack("udp")).channel is None          # absent: the defaults


# ---------------------------------------------------------------------------
# Item 10: errors stay with the caller (sans-IO part)
# ---------------------------------------------------------------------------


def test_space_send_refuses_what_is_not_bytes():
    sim = SimCluster(2, seed=1, stack="sim")
    assert sim.run_until(sim.converged, timeout=10)
    sim.services.join(1, "s")
    sim.run(1.0)
    for bad in (12345, "x", None):
        with pytest.raises(TypeError, match="payload must be bytes"):
            sim.services.send(1, "s", bad)
    sim.run(1.0)
    assert [e for e in sim.services.events(1, "s") if type(e) is Message] == []


# ---------------------------------------------------------------------------
# Channels on loopback
# ---------------------------------------------------------------------------


def stack_with(tmp_path, extra: str) -> str:
    path = tmp_path / "stack.toml"
    path.write_text('[[layer]]\nname = "UDP"\n\n[[layer]]\nname = "TOTEM"\n\n' + extra)
    return str(path)


async def test_a_slow_consumer_of_60_kb_messages_leaves_at_max_pending_bytes():
    udp, cluster = loopback(), unique_cluster()
    async with open_channel(cluster=cluster, name="slow", udp=udp, ring=FAST, max_pending_bytes=MiB) as slow, \
            open_channel(cluster=cluster, name="fast", udp=udp, ring=FAST) as fast:
        with trio.fail_after(10):
            await wait_for_view(slow, 2)
            await wait_for_view(fast, 2)
            for i in range(40):
                await fast.send(bytes([i]) * 60_000)
            while not slow.overflowed:
                await trio.sleep(0.01)
        got = 0
        with pytest.raises(DeliveryOverflow, match="max_pending_bytes"):
            async for event in slow.events():
                got += type(event) is Message
        assert 0 < got < 40 and got * 60_000 <= 2 * MiB


async def test_a_space_consumer_that_falls_behind_in_bytes_makes_the_member_leave():
    udp, cluster = loopback(), unique_cluster()
    async with open_channel(cluster=cluster, name="slow", udp=udp, ring=FAST, max_pending_bytes=MiB) as slow, \
            open_channel(cluster=cluster, name="fast", udp=udp, ring=FAST) as fast:
        with trio.fail_after(10):
            await wait_for_view(slow, 2)
            await wait_for_view(fast, 2)
            space = await slow.join_space("s")
            theirs = await fast.join_space("s")
            while len(space.members) < 2:
                await trio.sleep(0.01)
            for i in range(40):
                await theirs.send(bytes(60_000))
            while not slow.overflowed:
                await trio.sleep(0.01)
        with pytest.raises(DeliveryOverflow, match="space 's'.*max_pending_bytes"):
            async for _ in space.events():
                pass


async def test_send_nowait_refuses_a_flood_at_send_queue_bytes():
    udp, cluster = loopback(), unique_cluster()
    async with open_channel(cluster=cluster, name="a", udp=udp, ring=FAST) as a:
        await wait_for_view(a, 1)
        taken = 0
        with pytest.raises(QueueFull):
            for _ in range(10_001):
                a.send_nowait(bytes(256 * KiB))
                taken += 1
        assert taken <= 256 and a.stats()["send_queue_bytes"] <= 64 * MiB


async def test_an_oversize_send_to_raises_leaves_nothing_queued_and_the_channel_lives(tmp_path):
    stack = stack_with(tmp_path, '[[layer]]\nname = "UNICAST"\nmax_message = "64KiB"\n')
    udp, cluster = loopback(), unique_cluster()
    async with open_channel(stack, cluster=cluster, name="a", udp=udp, ring=FAST) as a, \
            open_channel(stack, cluster=cluster, name="b", udp=udp, ring=FAST) as b:
        with trio.fail_after(10):
            await wait_for_view(a, 2)
            await wait_for_view(b, 2)
            with pytest.raises(PayloadTooLarge, match="max_message"):
                await a.send_to(b.address, bytes(70_000))
            await a.send_to(b.address, b"small")               # used to raise for the one still queued
            async for event in b.events():
                if type(event) is Direct:
                    assert event == Direct(a.address, b"small")
                    break


async def test_an_oversize_reply_becomes_an_error_reply_and_the_answering_member_lives(tmp_path):
    stack = stack_with(tmp_path, '[[layer]]\nname = "UNICAST"\nmax_message = "64KiB"\n')
    udp, cluster = loopback(), unique_cluster()
    async with open_channel(stack, cluster=cluster, name="a", udp=udp, ring=FAST) as a, \
            open_channel(stack, cluster=cluster, name="b", udp=udp, ring=FAST) as b:
        with trio.fail_after(10):
            await wait_for_view(a, 2)
            await wait_for_view(b, 2)

            async def too_big(request) -> bytes:
                return bytes(70_000)

            a.on_request(too_big)
            b.on_request(too_big)
            for to in (b.address, None):                        # point to point, and through the ring to both
                replies = await a.request(b"x", to=to, mode=groupcomm.ALL, timeout=2.0)
                assert replies and all(r.status == "error" and "PayloadTooLarge" in r.error
                                       for r in replies.values()), replies
            await b.send(b"still here")
            async for event in a.events():
                if type(event) is Message:
                    assert event.payload == b"still here"
                    break


def test_the_blocking_facade_does_not_drain_into_a_queue_of_its_own():
    udp, cluster = loopback(), unique_cluster()
    with blocking.connect(cluster=cluster, name="x", udp=udp, ring=FAST, max_pending_events=50) as x, \
            blocking.connect(cluster=cluster, name="y", udp=udp, ring=FAST) as y:
        for _ in x.events(timeout=5):
            if x.view and len(x.view.members) == 2:
                break
        for i in range(200):
            y.send(b"%d" % i)
        time.sleep(1.0)                                          # x's caller is busy elsewhere
        got = 0
        with pytest.raises(DeliveryOverflow, match="max_pending_events"):
            for event in x.events(timeout=5):
                got += type(event) is Message
        assert got < 200
