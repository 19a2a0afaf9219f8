"""The C socket pump (``pump = "c"``): channels on loopback with the ring's hot path in a C thread.

Bounded in time, 127.0.0.1 only, multicast TTL 0.  The pump is the default driver
on Linux (``pump = "auto"``), so the other suites run it; the last tests here
re-run the channel, blocking-facade and process suites with the trio driver.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import random
import select
import socket
import time

import pytest
import trio

import tests.test_blocking as blocking_suite
import tests.test_channel as channel_suite
import tests.test_processes as process_suite
from groupcomm.io import channel as channel_module
from groupcomm.core.native import ffi, lib
from groupcomm.io.channel import Channel, cluster_id_for, open_channel
from groupcomm.config import build_stack, load_stack
from groupcomm.cli.demo import view_is
from groupcomm.errors import ChannelClosed, ConfigError, DeliveryOverflow
from groupcomm.events import Configuration, Delivery, Message
from groupcomm.layers.fd import FdConfig
from groupcomm.io.probe import probe, probe_seal
from groupcomm.core.seal import CryptoConfig
from groupcomm.core.ring import parse_actions
from groupcomm.core.ring import LayerDelivery, Ring, RingConfig
from groupcomm.io.pump import MIN_SLOT, TAKE_MAX, TAKE_MAX_BYTES, LockedRing, Pump, now_us
from groupcomm.io.udp import UdpConfig, UdpSockets, UdpuConfig, resolve_pump
from tests.test_channel import FAST, free_port, unique_cluster, wait_for_view

BIG = bytes(range(256)) * 400                   # 100 KiB: about 75 datagrams at mtu 1400


def pumped() -> UdpConfig:
    return UdpConfig(bind_addr="127.0.0.1", mcast_port=free_port(), mcast_ttl=0, pump="c")


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


async def collect(ch, count: int) -> list[Message]:
    got: list[Message] = []
    async for ev in ch.events():
        if isinstance(ev, Message):
            got.append(ev)
            if len(got) == count:
                return got
    raise AssertionError(f"events ended after {len(got)} of {count} messages")


# -- bounded takes --------------------------------------------------------------------


def _pump_alone(config: RingConfig):
    """A ring of one with a pump that is never started: Python's locked calls drive it."""
    ring = Ring(9, config)
    ring.start(now_us())
    while not ring.members:
        time.sleep(0.005)
        ring.tick(now_us())
    ring.take()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    pump = Pump(ring, UdpSockets(unicast=sock, multicast=None, group=None), max_backlog=100_000)
    return LockedRing(ring, pump), pump, sock


def _notified(pump: Pump) -> bool:
    return bool(select.select([pump.notify_fd], [], [], 0)[0])


@pytest.mark.parametrize(("mtu", "size", "count"), [(64000, 20_000, 1200), (256, 10, 6000)])
def test_a_take_hands_over_a_bounded_batch_and_the_pump_calls_back_for_the_rest(mtu, size, count):
    """24 MB (or 6000 deliveries) queued for Python come out in batches of at most
    TAKE_MAX_BYTES / TAKE_MAX (or one ring call's run), in order, and the notify fd
    says when some are left (before: one take handed over everything)."""
    config = RingConfig(mtu=mtu, max_members=2, token_timeout=0.3, join=0.02, merge=0.05, startup_wait=0.02)
    ring, pump, sock = _pump_alone(config)
    try:
        sent = [i.to_bytes(4, "big") * (size // 4) for i in range(count)]
        for payload in sent:
            ring.submit(0, payload)
        for _ in range(10 * count):
            if ring.pending == 0:
                break
            ring.tick(0)                          # one token visit each (the pump's clock)
        assert ring.pending == 0
        got, calls = [], 0
        while len(got) < count:
            pump.clear_notify()
            batch = [d for d in pump.take() if isinstance(d, Delivery)]
            calls += 1
            assert batch, f"nothing taken after {len(got)} of {count}"
            assert sum(len(d.payload) for d in batch) <= TAKE_MAX_BYTES + 17 * mtu     # at most one run past the bound
            assert len(batch) <= TAKE_MAX + 17 * (mtu // 13)
            got += [d.payload for d in batch]
            assert _notified(pump) == (len(got) < count)          # woken again exactly while some are left
        assert got == sent
        assert calls > 2
        assert pump.stats()["pump_takes_cut"] == calls - 1
    finally:
        pump.close()
        sock.close()


def test_submit_many_keeps_order_through_the_handoff_and_stops_at_a_full_queue():
    """A batch submitted while the lock is free, another while it is held (queued for the lock's
    holder), all delivered in order; with the lock held the room check still applies; a payload
    over the ring's limit stops a batch there and raises, the ones before it queued."""
    from groupcomm.errors import PayloadTooLarge

    config = RingConfig(mtu=1400, max_members=2, token_timeout=0.3, join=0.02, merge=0.05, startup_wait=0.02,
                        send_queue_max=12)
    ring, pump, sock = _pump_alone(config)

    def delivered() -> list[bytes]:
        for _ in range(200):
            if ring.pending == 0:
                break
            ring.tick(0)                          # one token visit each (the pump's clock)
        got = []
        while batch := [d.payload for d in pump.take() if isinstance(d, Delivery)]:
            got += batch
        return got

    try:
        sent = [b"%02d" % i for i in range(12)]
        assert ring.submit_many(0, sent[:5]) == 5                     # the lock is free: into the ring
        pump.lock()
        try:
            assert ring.submit_many(0, sent[5:] + [b"no room"]) == 7  # handed off; the 13th finds no room
        finally:
            pump.unlock()                                             # the holder submits them, in order
        assert pump.stats()["pump_handoffs"] == 7
        assert delivered() == sent
        with pytest.raises(PayloadTooLarge):
            ring.submit_many(0, [b"x", bytes(ring.max_payload + 1), b"y"])
        assert delivered() == [b"x"]
    finally:
        pump.close()
        sock.close()


# -- the parsing seam --------------------------------------------------------------


def _singleton_with_outputs() -> Ring:
    """A singleton ring, fed the same inputs every time, with deliveries of every shape waiting."""
    ring = Ring(7, RingConfig(token_timeout=0.3, join=0.02, merge=0.05, startup_wait=0.05))
    ring.start(0)
    t = 0
    while not ring.members:
        t += 10_000
        ring.tick(t)
    for i in range(6):
        ring.submit(t, b"m%d" % i, safe=i % 2 == 1, kind=5 if i == 3 else 0)
        t += 1000
        ring.tick(t)
    for _ in range(5):
        t += 1000
        ring.tick(t)
    return ring


@pytest.mark.parametrize("runs", [False, True])
def test_parse_actions_reads_records_exactly_as_ring_take_does(runs):
    expected = _singleton_with_outputs().take(Message, runs=runs)
    twin = _singleton_with_outputs()
    pa, pn, pd, pl = ffi.new("gc_action_t **"), ffi.new("size_t *"), ffi.new("uint8_t **"), ffi.new("size_t *")
    lib.gc_ring_take(twin._r, pa, pn, pd, pl)
    records = ffi.buffer(pa[0], pn[0] * ffi.sizeof("gc_action_t"))[:]
    parsed = parse_actions(records, ffi.buffer(pd[0], pl[0])[:], Message, runs=runs)
    assert parsed == expected
    assert any(isinstance(x, Configuration) for x in parsed)
    assert any(isinstance(x, LayerDelivery) and x.kind == 5 for x in parsed)
    assert parse_actions(b"", b"") == []
    assert parse_actions(records, ffi.buffer(pd[0], pl[0])[:])[-1] == Delivery(7, b"m5", True)


# -- channels with the pump ----------------------------------------------------------


async def test_three_pumped_members_agree_on_one_order_of_small_safe_and_fragmented_messages():
    udp, cluster, n = pumped(), unique_cluster(), 60
    orders: dict[str, list[Message]] = {}

    async def member(name: str) -> None:
        async with open_channel(cluster=cluster, name=name, udp=udp, ring=FAST) as ch:
            await wait_for_view(ch, 3)
            async with trio.open_nursery() as nursery:

                async def read() -> None:
                    orders[name] = await collect(ch, 3 * (n + 1))

                nursery.start_soon(read)
                for i in range(n):
                    await ch.send(f"{name}-{i}".encode(), safe=i % 7 == 0)
                await ch.send(name.encode() + BIG, safe=True)
            assert ch.stats()["pump_batches"] > 0
            await trio.sleep(0.2)                   # the others may still need our token

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for name in "abc":
                nursery.start_soon(member, name)
    first = orders["a"]
    assert orders["b"] == first and orders["c"] == first
    senders = {}
    for m in first:
        senders.setdefault(m.sender, []).append(m)
    for mine in senders.values():
        name = mine[0].payload[:1].decode()
        assert [m.payload for m in mine] == [f"{name}-{i}".encode() for i in range(n)] + [name.encode() + BIG]
        assert [m.safe for m in mine] == [i % 7 == 0 for i in range(n)] + [True]


async def test_a_member_that_vanishes_without_leaving_is_excluded():
    udp, cluster = pumped(), unique_cluster()
    with trio.fail_after(20):
        async with open_channel(cluster=cluster, name="a", udp=udp, ring=FAST, fd=FdConfig.loopback()) as a:
            victim = Channel(cluster=cluster, name="b", node_id=None, ring=FAST, udp=udp,
                             max_pending_events=1000, fd=FdConfig.loopback(),
                             crypto=CryptoConfig(key_file=os.environ["GROUPCOMM_KEY_FILE"]))
            async with trio.open_nursery() as nursery:
                await nursery.start(victim.run)
                await wait_for_view(a, 2)
                dead = victim.address
                nursery.cancel_scope.cancel()       # no leave: as if the process died
            t0 = trio.current_time()
            await wait_for_view(a, 1)
            assert dead not in a.view.members
            assert trio.current_time() - t0 < FAST.token_timeout    # the failure detector, not token loss
            assert a.stats()["suspicions"] >= 1


async def test_the_pump_thread_is_joined_when_the_channel_closes_and_sends_after_close_fail():
    udp, cluster = pumped(), unique_cluster()
    before = threads()
    with trio.fail_after(20):
        async with open_channel(cluster=cluster, name="a", udp=udp, ring=FAST) as a:
            async with open_channel(cluster=cluster, name="b", udp=udp, ring=FAST):
                assert threads() == before + 2
                await wait_for_view(a, 2)
            assert threads() == before + 1
            await a.send(b"alone")
            assert [m.payload for m in await collect(a, 1)] == [b"alone"]   # a singleton ring self-delivers
    assert threads() == before
    with pytest.raises(ChannelClosed):
        await a.send(b"after close")
    with pytest.raises(ChannelClosed):
        a.stats()


async def test_a_slow_consumer_overflows_and_leaves_with_the_pump():
    udp, cluster = pumped(), unique_cluster()
    with trio.fail_after(20):
        async with open_channel(cluster=cluster, name="fast", udp=udp, ring=FAST) as fast:
            async with open_channel(cluster=cluster, name="slow", udp=udp, ring=FAST, max_pending_events=50) as slow:
                await wait_for_view(fast, 2)
                for i in range(200):
                    await fast.send(b"%d" % i)
                await wait_for_view(fast, 1)
                with pytest.raises(DeliveryOverflow):
                    async for _ in slow.events():
                        pass


async def test_probe_gets_answers_from_pumped_members():
    udp, cluster = pumped(), unique_cluster()
    with trio.fail_after(20):
        async with open_channel(cluster=cluster, name="p1", udp=udp, ring=FAST) as p1:
            async with open_channel(cluster=cluster, name="p2", udp=udp, ring=FAST) as p2:
                await wait_for_view(p1, 2)
                seal = probe_seal(cluster_id_for(cluster), os.environ["GROUPCOMM_KEY_FILE"])
                reports = await trio.to_thread.run_sync(lambda: probe(cluster_id_for(cluster), udp, 1.0, seal=seal))
                assert {r["address"] for r in reports} == {p1.address, p2.address}
                assert all(r["state"] == "OPERATIONAL" and r["stats"]["pump_to_python"] >= 1 for r in reports)


async def test_garbage_and_oversized_datagrams_are_counted_and_dropped():
    """Without a key the ring's own checks count them (with one, the seal: tests/test_keyed_channel.py)."""
    udp, cluster = pumped(), unique_cluster()
    rng = random.Random(5)
    with trio.fail_after(20):
        async with open_channel(cluster=cluster, name="a", udp=udp, ring=FAST, key_file="") as a:
            async with open_channel(cluster=cluster, name="b", udp=udp, ring=FAST, key_file="") as b:
                await wait_for_view(a, 2)
                targets = [a._sockets.address, b._sockets.address, (udp.mcast_addr, udp.mcast_port)]
                slot = max(FAST.mtu, MIN_SLOT)
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 0)
                    for i in range(3000):
                        body = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 80)))
                        head = rng.choice([b"", b"GC\x01", b"GC\x01\x01", b"GF", b"GP", b"GC\x01\x02"])
                        s.sendto(head + body, targets[i % 3])
                        if i % 100 == 0:
                            s.sendto(b"GC" + bytes(slot + 100), targets[i % 3])
                            await trio.sleep(0)
                await trio.sleep(0.2)
                await a.send(b"still ordered")
                assert [m.payload for m in await collect(b, 1)] == [b"still ordered"]
                stats = [a.stats(), b.stats()]
                assert sum(s["pump_drops"] for s in stats) >= 20      # 30 oversized, some may be lost in flight
                assert sum(s["drop_bad_magic"] + s["drop_truncated"] + s["drop_malformed"] for s in stats) > 100
                assert a.view == b.view and len(a.view.members) == 2


ASAN_WORKLOAD = """
import random, socket, sys, uuid
import trio
sys.path.insert(0, sys.argv[1])
from groupcomm.io.channel import open_channel
from groupcomm.events import Message
from groupcomm.core.ring import RingConfig
from groupcomm.io.udp import UdpConfig

async def main():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    udp = UdpConfig(mcast_port=port, mcast_ttl=0, pump="c")
    ring = RingConfig(token_timeout=0.3, join=0.02, merge=0.05)
    cluster, rng = uuid.uuid4().hex, random.Random(3)
    async with open_channel(cluster=cluster, name="a", udp=udp, ring=ring) as a:
        async with open_channel(cluster=cluster, name="b", udp=udp, ring=ring) as b:
            while not (a.view and len(a.view.members) == 2):
                await trio.sleep(0.01)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as g:
                for i in range(2000):
                    head = rng.choice([b"", b"GC\\x01", b"GC\\x01\\x01", b"GF", b"GP"])
                    g.sendto(head + rng.randbytes(rng.randint(0, 3000)), a._sockets.address)
            for i in range(300):
                await a.send(b"m%d" % i + bytes(i * 40), safe=i % 5 == 0)
            got = 0
            async for ev in b.events():
                if isinstance(ev, Message):
                    got += 1
                    if got == 300:
                        break
    print("pumped workload ok")

trio.run(main)
"""


def test_the_pump_under_asan_and_ubsan(tmp_path):
    """Channels with the pump, garbage at its socket, on a sanitized build of the C code."""
    from tests.test_sanitizers import run_sanitized

    run_sanitized(tmp_path, ASAN_WORKLOAD, "pumped workload ok", timeout=300)


def test_the_pump_key_is_validated():
    with pytest.raises(ConfigError, match="pump must be one of 'auto', 'c', 'trio'"):
        UdpConfig(pump="rust")
    with pytest.raises(ConfigError, match="pump must be one of"):
        UdpuConfig(hosts=("127.0.0.1:4000",), pump="")
    for name in ("udp", "loopback", "udpu"):
        spec = load_stack(name, environ={"GROUPCOMM_PUMP": "c"})
        transport = build_stack(spec).transport
        assert transport.pump == "c"


def test_the_pump_is_the_default_driver_on_linux():
    assert UdpConfig().pump == "auto" and UdpuConfig(hosts=("127.0.0.1:4000",)).pump == "auto"
    assert resolve_pump("auto") == "c" and resolve_pump("trio") == "trio"
    for name in ("udp", "loopback", "udpu"):
        assert build_stack(load_stack(name, environ={})).transport.pump == "auto"


async def test_a_default_channel_runs_the_pump():
    udp = UdpConfig(bind_addr="127.0.0.1", mcast_port=free_port(), mcast_ttl=0)
    async with open_channel(cluster=unique_cluster(), name="a", udp=udp, ring=FAST) as a:
        await wait_for_view(a, 1)
        assert a.stats()["pump_wakeups"] > 0


# -- the other suites with the trio driver --------------------------------------------


@pytest.fixture
def force_trio(monkeypatch):
    """Every channel opened in the test runs the trio driver (attaching a pump fails the test)."""
    init = Channel.__init__

    def init_with_trio(self, *, udp, **kwargs):
        init(self, udp=dataclasses.replace(udp, pump="trio"), **kwargs)

    def no_pump(*args, **kwargs):
        raise AssertionError("a channel attached the C pump under force_trio")

    monkeypatch.setattr(Channel, "__init__", init_with_trio)
    monkeypatch.setattr(channel_module, "attach", no_pump)
    monkeypatch.setenv("GROUPCOMM_PUMP", "trio")      # member processes read it from their stack file


def _suite(module, *, coroutines: bool) -> list:
    """The module's tests of one colour that need no fixture but ``tmp_path``."""
    return [
        pytest.param(fn, id=name)
        for name, fn in vars(module).items()
        if name.startswith("test_") and inspect.iscoroutinefunction(fn) == coroutines
        and set(inspect.signature(fn).parameters) <= {"tmp_path"}
    ]


def _optional_suite(name: str) -> list:
    """Another suite's coroutine tests, if that suite exists in this tree."""
    try:
        return _suite(importlib.import_module(name), coroutines=True)
    except ModuleNotFoundError:
        return []


@pytest.mark.parametrize("test", _suite(channel_suite, coroutines=True) + _optional_suite("tests.test_space_channel"))
async def test_channel_suite_with_the_trio_driver(test, force_trio, tmp_path):
    kwargs = {"tmp_path": tmp_path} if "tmp_path" in inspect.signature(test).parameters else {}
    await test(**kwargs)


@pytest.mark.parametrize("test", _suite(blocking_suite, coroutines=False)[:1])
def test_blocking_suite_with_the_trio_driver(test, force_trio):
    test()


def test_member_processes_join_survive_kill_and_rejoin_with_the_trio_driver(force_trio):
    process_suite.test_processes_join_agree_survive_kill_and_rejoin()


def test_member_processes_run_the_driver_their_stack_says(force_trio):
    cluster, port = unique_cluster(), free_port()
    members = [process_suite.Member(n, cluster, port) for n in ("q1", "q2")]
    try:
        ids = {m.address() for m in members}
        for m in members:
            m.wait(view_is(ids), 15)
        seal = probe_seal(cluster_id_for(cluster), os.environ["GROUPCOMM_KEY_FILE"])
        reports = probe(cluster_id_for(cluster), UdpConfig(mcast_port=port, mcast_ttl=0), 1.0, seal=seal)
        assert {r["address"] for r in reports} == ids
        assert all("pump_wakeups" not in r["stats"] for r in reports)     # GROUPCOMM_PUMP=trio
    finally:
        for m in members:
            m.stop()


# -- one set of rules for both drivers -------------------------------------------------


def test_both_drivers_sort_datagrams_with_one_function():
    from groupcomm.io.pump import DGRAM_MEMBER, DGRAM_PROBE, DGRAM_RING, DGRAM_SELF, DGRAM_TOKEN, classify
    from groupcomm.layers.wire import HEADER, PROTOCOL_VERSION, RING_MAGIC

    assert lib.GC_WIRE_VERSION == PROTOCOL_VERSION
    me, peer = 7, 9
    cases = {
        b"GP" + bytes(40): DGRAM_PROBE,
        HEADER.pack(b"GP", PROTOCOL_VERSION, 1, 3, me): DGRAM_PROBE,          # a probe names no member
        HEADER.pack(RING_MAGIC, PROTOCOL_VERSION, 2, 3, me): DGRAM_SELF,
        HEADER.pack(b"GF", PROTOCOL_VERSION, 1, 3, me): DGRAM_SELF,            # any layer's, looped back
        HEADER.pack(b"GF", PROTOCOL_VERSION, 1, 3, peer): DGRAM_MEMBER,
        HEADER.pack(b"GU", PROTOCOL_VERSION, 1, 3, peer): DGRAM_MEMBER,
        HEADER.pack(RING_MAGIC, PROTOCOL_VERSION + 1, 1, 3, peer): DGRAM_MEMBER,   # logged by Member
        HEADER.pack(RING_MAGIC, PROTOCOL_VERSION, 1, 3, peer): DGRAM_TOKEN,
        HEADER.pack(RING_MAGIC, PROTOCOL_VERSION, 2, 3, peer): DGRAM_RING,
        HEADER.pack(RING_MAGIC, PROTOCOL_VERSION, 1, 3, peer)[:5]: DGRAM_TOKEN,   # the ring drops it
        b"": DGRAM_RING,
        b"junk": DGRAM_RING,                                                  # the ring counts it malformed
    }
    for datagram, expected in cases.items():
        assert classify(datagram, len(datagram), me) == expected, datagram


@pytest.mark.parametrize("pump", ["c", "trio"])
async def test_a_ring_packet_of_another_version_is_logged_by_either_driver(pump, caplog):
    from groupcomm.layers.wire import HEADER, PROTOCOL_VERSION, RING_MAGIC

    udp = UdpConfig(bind_addr="127.0.0.1", mcast_port=free_port(), mcast_ttl=0, pump=pump)
    with trio.fail_after(20):
        async with open_channel(cluster=unique_cluster(), name="a", udp=udp, ring=FAST, key_file="") as a:
            await wait_for_view(a, 1)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for _ in range(3):
                    s.sendto(HEADER.pack(RING_MAGIC, PROTOCOL_VERSION + 1, 2, 3, 4242) + bytes(20),
                             a._sockets.address)
            while a.stats()["drop_bad_version"] < 3:
                await trio.sleep(0.01)
    lines = [r.getMessage() for r in caplog.records if "protocol version" in r.getMessage()]
    assert len(lines) == 1 and "from 4242" in lines[0]


def test_multicast_loop_is_a_transport_setting():
    """One member per host needs no copy of its own multicasts (mcast_loop = false)."""
    from groupcomm.io.udp import open_sockets

    with pytest.raises(ConfigError, match="mcast_loop must be true or false"):
        UdpConfig(mcast_loop="no")
    for loop in (True, False):
        sockets = open_sockets(UdpConfig(bind_addr="127.0.0.1", mcast_port=free_port(), mcast_ttl=0,
                                         mcast_loop=loop))
        try:
            assert sockets.unicast.getsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP) == int(loop)
        finally:
            sockets.close()
