"""The Channel on real UDP sockets: loopback only (multicast TTL 0), bounded in time."""

from __future__ import annotations

import socket
import uuid

import pytest
import trio

from groupcomm.config import build_stack
from groupcomm.io.channel import open_channel
from groupcomm.config import load_stack, stack_names
from groupcomm.errors import ChannelClosed, ConfigError, DeliveryOverflow, PayloadTooLarge
from groupcomm.events import Message, View
from groupcomm.core.ring import RingConfig
from groupcomm.io.udp import UdpConfig

FAST = RingConfig(token_timeout=0.3, join=0.02, merge=0.05)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback() -> UdpConfig:
    return UdpConfig(bind_addr="127.0.0.1", mcast_port=free_port(), mcast_ttl=0)


def unique_cluster() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


async def wait_for_view(ch, size: int) -> None:
    while not (ch.view and len(ch.view.members) == size):
        await trio.sleep(0.005)


async def test_three_members_agree_on_view_and_order():
    udp, cluster, n_msgs = loopback(), unique_cluster(), 100
    orders: dict[str, list[bytes]] = {}

    async def member(name: str) -> None:
        async with open_channel(cluster=cluster, name=name, udp=udp, ring=FAST) as ch:
            got: list[bytes] = []
            async with trio.open_nursery() as nursery:

                async def read() -> None:
                    async for ev in ch.events():
                        if isinstance(ev, Message):
                            got.append(ev.payload)
                            if len(got) == 3 * n_msgs:
                                return

                nursery.start_soon(read)
                await wait_for_view(ch, 3)
                for i in range(n_msgs):
                    await ch.send(f"{name}-{i}".encode(), safe=i % 10 == 0)
            orders[name] = got

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for name in ("a", "b", "c"):
                nursery.start_soon(member, name)
    assert len(orders) == 3
    first = orders["a"]
    assert all(order == first for order in orders.values())
    for name in "abc":
        mine = [p for p in first if p.startswith(name.encode())]
        assert mine == [f"{name}-{i}".encode() for i in range(n_msgs)]   # FIFO per sender


async def test_send_many_keeps_order_and_stops_at_a_full_queue():
    """A batch goes in order with single sends around it, fragmented ones too; a full queue takes
    a prefix (send_nowait_many says how many) and send_many waits for room; bad payloads raise
    before anything is queued."""
    ring = RingConfig(token_timeout=0.3, join=0.02, merge=0.05, mtu=1400, send_queue_max=64)
    udp, cluster = loopback(), unique_cluster()
    sent = [b"%04d" % i + bytes(i % 7 * 400) for i in range(600)]        # up to 2.4 KiB: some fragmented
    with trio.fail_after(30):
        async with open_channel(cluster=cluster, name="a", udp=udp, ring=ring) as a, \
                open_channel(cluster=cluster, name="b", udp=udp, ring=ring) as b:
            await wait_for_view(a, 2)
            with pytest.raises(TypeError, match="payload must be bytes, not str"):
                a.send_nowait_many([b"fine", "not bytes"])
            a.send_nowait(sent[0])
            taken = a.send_nowait_many(sent[1:])
            assert 1 <= taken < len(sent) - 1                      # the queue filled up
            await a.send_many(sent[1 + taken : 300])
            for payload in sent[300:310]:
                await a.send(payload)
            await a.send_many(sent[310:])
            got = []
            async for ev in b.events():
                if type(ev) is Message:
                    got.append(ev.payload)
                    if len(got) == len(sent):
                        break
            assert got == sent


async def test_leaving_member_is_dropped_from_the_view_quickly():
    udp, cluster = loopback(), unique_cluster()
    with trio.fail_after(20):
        async with open_channel(cluster=cluster, name="stay", udp=udp, ring=FAST) as stay:
            async with open_channel(cluster=cluster, name="go", udp=udp, ring=FAST) as go:
                await wait_for_view(stay, 2)
                leaver = go.address
            t0 = trio.current_time()
            await wait_for_view(stay, 1)
            assert leaver not in stay.view.members
            assert trio.current_time() - t0 < FAST.token_timeout   # no timeout: a graceful leave


async def test_a_member_whose_block_is_cancelled_from_outside_still_leaves_gracefully():
    udp, cluster = loopback(), unique_cluster()
    with trio.fail_after(20):
        async with open_channel(cluster=cluster, name="stay", udp=udp, ring=FAST, fd=None) as stay:
            leaver: list[int] = []

            async def go() -> None:
                async with open_channel(cluster=cluster, name="go", udp=udp, ring=FAST, fd=None) as ch:
                    leaver.append(ch.address)
                    await trio.sleep_forever()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(go)
                await wait_for_view(stay, 2)
                while not leaver:                       # the block has started
                    await trio.sleep(0.001)
                nursery.cancel_scope.cancel()           # cancels the whole open_channel block
            t0 = trio.current_time()
            await wait_for_view(stay, 1)
            assert leaver[0] not in stay.view.members
            assert trio.current_time() - t0 < FAST.token_timeout   # a leave, not a token-loss timeout


async def test_misuse_gives_clear_errors():
    udp, cluster = loopback(), unique_cluster()
    with pytest.raises(ConfigError, match="nope"):
        async with open_channel("nope", cluster=cluster, udp=udp):
            pass
    with pytest.raises(ConfigError, match="TOTEM: unknown key 'tokn_timeout'"):
        async with open_channel(cluster=cluster, udp=udp, overrides={"TOTEM": {"tokn_timeout": "1s"}}):
            pass
    with pytest.raises(ConfigError, match="not a multicast address"):
        UdpConfig(mcast_addr="10.0.0.1")
    with trio.fail_after(20):
        async with open_channel(cluster=cluster, name="solo", udp=udp, ring=FAST) as ch:
            with pytest.raises(PayloadTooLarge, match="limit"):
                await ch.send(b"x" * (ch.max_payload + 1))
            with pytest.raises(TypeError):
                await ch.send("text")
        with pytest.raises(ChannelClosed):
            await ch.send(b"after close")


async def test_a_consumer_that_falls_behind_leaves_instead_of_stalling_the_ring():
    udp, cluster = loopback(), unique_cluster()
    with trio.fail_after(20):
        async with open_channel(cluster=cluster, name="fast", udp=udp, ring=FAST) as fast:
            async with open_channel(cluster=cluster, name="slow", udp=udp, ring=FAST, max_pending_events=50) as slow:
                await wait_for_view(fast, 2)
                for i in range(200):
                    await fast.send(b"%d" % i)
                await wait_for_view(fast, 1)          # slow was dropped; fast carried on
                with pytest.raises(DeliveryOverflow):
                    async for _ in slow.events():
                        pass
            events = []
            await fast.send(b"still going")
            async for ev in fast.events():
                events.append(ev)
                if isinstance(ev, Message) and ev.payload == b"still going":
                    break
            assert any(isinstance(e, View) for e in events)


def test_every_shipped_stack_builds_with_an_empty_environment():
    assert {"udp", "udpu", "loopback", "sim"} <= set(stack_names())
    for name in stack_names():
        s = build_stack(load_stack(name, environ={}), transport_optional=name == "sim")
        ring, udp, fd, frag = s.ring, s.transport, s.fd, s.frag
        assert ring.token_timeout > 0 and frag.max_message > 0 and (fd is None or fd.timeout > 0)


def test_a_stack_with_an_unknown_layer_is_rejected(tmp_path):
    path = tmp_path / "odd.toml"
    path.write_text('[[layer]]\nname = "UDP"\n[[layer]]\nname = "SEQUENCER"\n[[layer]]\nname = "TOTEM"\n')
    with pytest.raises(ConfigError, match="unknown layer 'SEQUENCER'"):
        build_stack(load_stack(str(path)))


async def test_large_messages_are_fragmented_and_delivered_in_order():
    udp, cluster = loopback(), unique_cluster()
    big = bytes(range(256)) * 4096                      # 1 MiB: about 800 datagrams at mtu 1400
    with trio.fail_after(30):
        async with open_channel(cluster=cluster, name="a", udp=udp, ring=FAST) as a:
            async with open_channel(cluster=cluster, name="b", udp=udp, ring=FAST) as b:
                await wait_for_view(a, 2)
                await a.send(b"before")
                await a.send(big, safe=True)
                await a.send(b"after")
                await b.send(b"from b")
                orders = []
                for ch in (a, b):
                    got = []
                    async for ev in ch.events():
                        if isinstance(ev, Message):
                            got.append(ev)
                            if len(got) == 4:
                                break
                    orders.append([m.payload for m in got])
                    mine = [m for m in got if m.sender == a.address]
                    assert [m.payload for m in mine] == [b"before", big, b"after"]   # FIFO per sender
                    assert mine[1].safe is True
                assert orders[0] == orders[1]                                       # one total order


async def test_unicast_only_stack_with_a_static_host_list_and_with_a_shared_directory(tmp_path):
    from groupcomm.io.udp import UdpuConfig

    ports = [free_port() for _ in range(3)]
    hosts = tuple(f"127.0.0.1:{p}" for p in ports)
    static = [UdpuConfig(port=p, hosts=hosts) for p in ports]
    shared = [UdpuConfig(port=free_port(), discovery_dir=str(tmp_path), rescan=0.02) for _ in range(3)]
    for configs in (static, shared):
        cluster = unique_cluster()
        orders: list[list[bytes]] = []

        async def member(cfg: UdpuConfig, name: str) -> None:
            async with open_channel(cluster=cluster, name=name, udp=cfg, ring=FAST) as ch:
                await wait_for_view(ch, 3)
                await ch.send(name.encode())
                got: list[bytes] = []
                async for ev in ch.events():
                    if isinstance(ev, Message):
                        got.append(ev.payload)
                        if len(got) == 3:
                            break
                orders.append(got)
                await trio.sleep(0.3)                  # let the others finish before leaving

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for i, cfg in enumerate(configs):
                    nursery.start_soon(member, cfg, f"u{i}")
        assert len(orders) == 3 and orders[0] == orders[1] == orders[2]
    assert not list(tmp_path.rglob("*.addr"))          # members unregister on exit


def test_unicast_stack_config_errors_name_the_problem():
    from groupcomm.io.udp import UdpuConfig

    with pytest.raises(ConfigError, match="hosts, or give a discovery_dir"):
        UdpuConfig()
    with pytest.raises(ConfigError, match="address:port"):
        UdpuConfig(hosts=("127.0.0.1",))


async def test_ipv6_on_the_unicast_stack():
    from groupcomm.io.udp import UdpuConfig

    def free6() -> int:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
            return s.getsockname()[1]

    ports = [free6(), free6()]
    hosts = tuple(f"[::1]:{p}" for p in ports)
    cluster = unique_cluster()
    with trio.fail_after(20):
        async with open_channel(cluster=cluster, name="a", udp=UdpuConfig(bind_addr="::1", port=ports[0], hosts=hosts), ring=FAST) as a:
            async with open_channel(cluster=cluster, name="b", udp=UdpuConfig(bind_addr="::1", port=ports[1], hosts=hosts), ring=FAST) as b:
                await wait_for_view(a, 2)
                await a.send(b"over v6")
                async for ev in b.events():
                    if isinstance(ev, Message):
                        assert ev == Message(a.address, b"over v6", False)
                        break
                assert len(a._targets) == 1                  # one target per peer, not per address form


def test_the_simulator_stack_cannot_open_a_real_channel():
    with pytest.raises(ConfigError, match="UDP or UDPU"):
        build_stack(load_stack("sim"))


async def test_messages_sent_just_before_leaving_are_still_delivered():
    udp, cluster = loopback(), unique_cluster()
    async with open_channel(cluster=cluster, name="stay", udp=udp, ring=FAST) as stay:
        async with open_channel(cluster=cluster, name="go", udp=udp, ring=FAST) as go:
            await wait_for_view(stay, 2)
            for i in range(50):
                await go.send(b"last words %d" % i)
        got, pair = [], False
        with trio.fail_after(10):
            async for ev in stay.events():
                if isinstance(ev, Message):
                    got.append(ev.payload)
                elif isinstance(ev, View) and not ev.transitional:
                    if pair and len(ev.members) == 1:
                        break                           # "go" left: everything it sent came before
                    pair = len(ev.members) == 2
        assert got == [b"last words %d" % i for i in range(50)]
