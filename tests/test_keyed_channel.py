"""Channels with a cluster key, on real sockets (loopback, TTL 0), facing an outsider.

The outsider has no key: it sniffs the group, runs members of its own (no key,
another key), replays everything it captured and floods garbage from many
source ports.  The keyed members must show it nothing, deliver nothing of it,
keep their view, learn no address from it, and count every attack.
"""

from __future__ import annotations

import os
import socket
import struct
import uuid
from contextlib import AsyncExitStack

import msgpack
import pytest
import trio

from groupcomm.config.keys import new_key_file, write_key_file
from groupcomm.core.ring import RingConfig
from groupcomm.events import Message, View
from groupcomm.io.channel import cluster_id_for, open_channel
from groupcomm.io.probe import PROBE_REQUEST_SIZE, probe_request
from groupcomm.io.udp import UdpConfig, UdpuConfig
from tests.hostile import loopback_socket

FAST = RingConfig(token_timeout=0.3, join=0.02, merge=0.05)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def key_file(tmp_path, name: str = "cluster.key") -> str:
    path = tmp_path / name
    write_key_file(path, new_key_file())
    return str(path)


def sniffer(udp: UdpConfig) -> socket.socket:
    """A socket that sees every multicast datagram of the group, as an outsider on the LAN would."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((udp.mcast_addr, udp.mcast_port))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                 socket.inet_aton(udp.mcast_addr) + socket.inet_aton("127.0.0.1"))
    s.setblocking(False)
    return s


def drain(sock: socket.socket) -> list[tuple[bytes, tuple]]:
    got = []
    while True:
        try:
            got.append(sock.recvfrom(65536))
        except BlockingIOError:
            return got


class Recorder:
    """Reads a channel's events: the messages in order, and every view after the first."""

    def __init__(self, ch) -> None:
        self.ch = ch
        self.messages: list[bytes] = []
        self.views: list[View] = []

    async def run(self) -> None:
        async for ev in self.ch.events():
            if isinstance(ev, Message):
                self.messages.append(ev.payload)
            elif isinstance(ev, View) and not ev.transitional:
                self.views.append(ev)


async def wait_until(predicate, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


@pytest.mark.parametrize("pump", ["trio", "c"])
async def test_an_outsider_reads_nothing_joins_nothing_and_replays_nothing(tmp_path, pump):
    udp = UdpConfig(bind_addr="127.0.0.1", mcast_port=free_port(), mcast_ttl=0, pump=pump)
    cluster, key = f"keyed-{uuid.uuid4().hex[:8]}", key_file(tmp_path)
    spy = sniffer(udp)
    async with AsyncExitStack() as stack:
        chans = [await stack.enter_async_context(
            open_channel(cluster=cluster, name=f"m{i}", udp=udp, ring=FAST, key_file=key)) for i in range(3)]
        nursery = await stack.enter_async_context(trio.open_nursery())
        recorders = [Recorder(ch) for ch in chans]
        for r in recorders:
            nursery.start_soon(r.run)
        await wait_until(lambda: all(ch.view and len(ch.view.members) == 3 for ch in chans))
        ring_id = chans[0].view.ring_id
        await wait_until(lambda: all(r.views and r.views[-1].ring_id == ring_id for r in recorders))
        views_seen = [len(r.views) for r in recorders]
        for i in range(30):
            await chans[i % 3].send(b"SECRET-%03d" % i)
        await wait_until(lambda: all(len(r.messages) == 30 for r in recorders))
        captured = drain(spy)
        assert len(captured) > 5
        assert not any(b"SECRET" in data for data, _ in captured)          # only ciphertext on the wire
        unicast_addrs = {addr for _, addr in captured}

        # Members of the outsider's own: one without a key, one with another key.
        for intruder_key in ("", key_file(tmp_path, "other.key")):
            async with open_channel(cluster=cluster, name="intruder", udp=UdpConfig(**{**udp.__dict__, "pump": "trio"}),
                                    ring=FAST,
                                    key_file=intruder_key, join_timeout=5) as intruder:
                await intruder.send(b"FORGED")
                await trio.sleep(0.5)
                assert intruder.view.members == (intruder.address,)       # it stays alone

        # Replays of everything captured, to the group and to every member's own address.
        out = loopback_socket()
        for data, _ in captured:
            out.sendto(data, (udp.mcast_addr, udp.mcast_port))
            for addr in unicast_addrs:
                out.sendto(data, addr)
        # Garbage from many source ports: random bytes, and seal headers with random claims.
        rng = __import__("random").Random(7)
        for n in range(300):
            with loopback_socket() as s:
                for addr in unicast_addrs | {(udp.mcast_addr, udp.mcast_port)}:
                    s.sendto(os.urandom(rng.randrange(1, 200)), addr)
                    s.sendto(struct.pack(">2sBBIQQI", b"GS", 2, 1, rng.randrange(1, 4),
                                         rng.getrandbits(64), rng.getrandbits(40), 0) + os.urandom(60), addr)
            if n % 50 == 0:
                await trio.sleep(0.01)

        for i in range(30, 60):
            await chans[i % 3].send(b"SECRET-%03d" % i)
        await wait_until(lambda: all(len(r.messages) == 60 for r in recorders))
        expected = recorders[0].messages
        assert all(r.messages == expected for r in recorders)               # one order, nothing forged
        assert all(m.startswith(b"SECRET-") for m in expected)
        assert all(ch.view.ring_id == ring_id for ch in chans)               # no view change at all
        assert [len(r.views) for r in recorders] == views_seen
        stats = [ch.stats() for ch in chans]
        for s in stats:
            assert s["peer_addresses"] <= 2 and s["seal_peers"] <= 3
            if pump == "c":
                assert s["pump_seal_drops"] > 0
            assert s["seal_drop_replay"] + s["seal_drop_stale"] > 0
            assert s["seal_drop_unsealed"] > 0 and s["seal_drop_auth"] > 0
        nursery.cancel_scope.cancel()
    spy.close()


@pytest.mark.parametrize("pump", ["trio", "c"])
async def test_garbage_from_many_sources_adds_no_unicast_target(tmp_path, pump):
    ports = [free_port() for _ in range(2)]
    hosts = tuple(f"127.0.0.1:{p}" for p in ports)
    cluster, key = f"keyed-{uuid.uuid4().hex[:8]}", key_file(tmp_path)
    async with AsyncExitStack() as stack:
        chans = [await stack.enter_async_context(open_channel(
            "udpu", cluster=cluster, name=f"u{i}", ring=FAST, key_file=key,
            udp=UdpuConfig(bind_addr="127.0.0.1", port=p, hosts=hosts, pump=pump))) for i, p in enumerate(ports)]
        await wait_until(lambda: all(ch.view and len(ch.view.members) == 2 for ch in chans))
        before = [ch.stats()["send_targets"] for ch in chans]
        for _ in range(500):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("127.0.0.1", 0))
                for p in ports:
                    s.sendto(b"GC\x02\x01" + os.urandom(40), ("127.0.0.1", p))   # a token, unsealed
        await trio.sleep(0.3)
        assert [ch.stats()["send_targets"] for ch in chans] == before == [1, 1]
        assert all(ch.view and len(ch.view.members) == 2 for ch in chans)


async def test_without_a_key_a_probe_answer_is_never_larger_than_the_request():
    udp = UdpConfig(bind_addr="127.0.0.1", mcast_port=free_port(), mcast_ttl=0)
    cluster = f"probe-{uuid.uuid4().hex[:8]}"
    async with open_channel(cluster=cluster, name="p", udp=udp, ring=FAST, key_file="") as ch:
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            await s.bind(("127.0.0.1", 0))
            member = ch._sockets.address
            small = probe_request(cluster_id_for(cluster))
            await s.sendto(small, member)
            with trio.fail_after(2):
                answer, _ = await s.recvfrom(65536)
            assert len(answer) <= len(small)
            await s.sendto(probe_request(cluster_id_for(cluster), pad_to=PROBE_REQUEST_SIZE), member)
            with trio.fail_after(2):
                answer, _ = await s.recvfrom(65536)
            assert len(answer) <= PROBE_REQUEST_SIZE
            assert msgpack.unpackb(answer[8:])["name"] == "p"


async def test_with_a_key_only_sealed_probes_are_answered(tmp_path):
    from groupcomm.io.probe import probe, probe_seal

    udp = UdpConfig(bind_addr="127.0.0.1", mcast_port=free_port(), mcast_ttl=0)
    cluster, key = f"probe-{uuid.uuid4().hex[:8]}", key_file(tmp_path)
    async with open_channel(cluster=cluster, name="p", udp=udp, ring=FAST, key_file=key):
        unsealed = await trio.to_thread.run_sync(lambda: probe(cluster_id_for(cluster), udp, 0.5))
        assert unsealed == []
        seal = probe_seal(cluster_id_for(cluster), key)
        sealed = await trio.to_thread.run_sync(lambda: probe(cluster_id_for(cluster), udp, 0.5, seal=seal))
        assert [r["name"] for r in sealed] == ["p"]


async def test_a_key_holder_outside_the_nodelist_stays_out(tmp_path):
    udp = UdpConfig(bind_addr="127.0.0.1", mcast_port=free_port(), mcast_ttl=0)
    cluster, key = f"nodelist-{uuid.uuid4().hex[:8]}", key_file(tmp_path)
    only_ab = {"CRYPTO": {"nodelist": ["a", "b"]}}
    async with AsyncExitStack() as stack:
        a, b = [await stack.enter_async_context(open_channel(
            cluster=cluster, name=n, udp=udp, ring=FAST, key_file=key, overrides=only_ab)) for n in "ab"]
        await wait_until(lambda: a.view and len(a.view.members) == 2)
        async with open_channel(cluster=cluster, name="c", udp=udp, ring=FAST, key_file=key,
                                overrides=only_ab, join_timeout=5) as c:
            await trio.sleep(1.0)
            assert c.view.members == (c.address,)
            assert set(a.view.members) == {a.address, b.address}
            assert a.stats()["seal_drop_nodelist"] > 0


@pytest.mark.parametrize("pump", ["c", "trio"])
async def test_addresses_of_departed_members_expire(tmp_path, monkeypatch, pump):
    import groupcomm.io.channel as channel_module

    monkeypatch.setattr(channel_module, "PEER_EXPIRY", 0.3)
    udp = UdpConfig(bind_addr="127.0.0.1", mcast_port=free_port(), mcast_ttl=0, pump=pump)
    cluster, key = f"expiry-{uuid.uuid4().hex[:8]}", key_file(tmp_path)
    async with open_channel(cluster=cluster, name="a", udp=udp, ring=FAST, key_file=key) as a:
        for name in ("b", "c"):
            async with open_channel(cluster=cluster, name=name, udp=udp, ring=FAST, key_file=key):
                await wait_until(lambda: len(a.view.members) == 2)
                assert a.stats()["peer_addresses"] == 1
            await wait_until(lambda: len(a.view.members) == 1)
            await trio.sleep(0.4)
        # b left, then c's arrival and departure were views: b (silent past PEER_EXPIRY) is forgotten,
        # c (heard just now) is kept until a later view.
        assert a.stats()["peer_addresses"] == 1
