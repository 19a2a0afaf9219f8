"""Keyed member processes under attack, and a key rotation, on loopback (issue 10, items 6 and 9).

Three ``groupcomm node`` processes share a cluster key and exchange ordered
traffic while an outsider on the same host (tests/hostile.py) sniffs every
datagram, forges ring, FD, UNICAST and probe packets, replays what it
captured and floods garbage from thousands of source addresses.  Nothing
forged is delivered, no view changes, deliveries continue, memory stays
bounded, and each attack shows in the members' drop counters.

Bounded in CI (``GROUPCOMM_HOSTILE_SECONDS``, default 10 s of attack); run it
longer by hand.  Every process is started here and killed by the PID we hold.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from groupcomm.cli.demo import NodeProcess, free_udp_port, view_is
from groupcomm.config.keys import new_key_file, read_key_file, write_key_file
from groupcomm.io.channel import cluster_id_for
from groupcomm.io.probe import probe_request
from groupcomm.layers import wire
from tests.hostile import Outsider

ROOT = Path(__file__).resolve().parent.parent
SECONDS = float(os.environ.get("GROUPCOMM_HOSTILE_SECONDS", "10"))
RSS_GROWTH_MAX = 48 << 20
"""How much a member's resident memory may grow while under attack (bytes)."""
GROUP = "239.192.0.77"          # the udp stack's group


class KeyedMember(NodeProcess):
    def __init__(self, name: str, cluster: str, port: int, key: str) -> None:
        super().__init__(name, cluster, ["--mcast-port", str(port), "--ttl", "0", "--token-timeout", "0.3"],
                         env={"GROUPCOMM_KEY_FILE": key})

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


class Traffic:
    """Each member sends a line every ``period`` seconds until stopped; remembers what was sent."""

    def __init__(self, members: list[KeyedMember], period: float = 0.02) -> None:
        self.members, self.period = members, period
        self.sent: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            for m in self.members:
                text = f"ordered-{m.name}-{i}"
                m.send(text)
                self.sent.append(text)
            i += 1
            time.sleep(self.period)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def probe_stats(cluster: str, port: int, key: str) -> dict[int, dict]:
    out = subprocess.run(
        [sys.executable, "-P", "-m", "groupcomm", "probe", "--cluster", cluster, "--mcast-port", str(port),
         "--json", "--key-file", key, "--timeout", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    return {r["address"]: r["stats"] for r in json.loads(out.stdout)}


def start_members(names, cluster, port, key) -> tuple[list[KeyedMember], set[int]]:
    members = [KeyedMember(n, cluster, port, key) for n in names]
    everyone = {m.address() for m in members}
    for m in members:
        m.wait(view_is(everyone), 20)
    return members, everyone


def delivered(m: KeyedMember, since: int) -> list[str]:
    m.drain()
    return [e["msg"] for e in m.log[since:] if "msg" in e]


def wait_delivered(members, marks, expected: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    want = set(expected)
    while time.monotonic() < deadline:
        if all(want <= set(delivered(m, k)) for m, k in zip(members, marks)):
            return
        time.sleep(0.05)
    missing = {m.name: len(want - set(delivered(m, k))) for m, k in zip(members, marks)}
    raise AssertionError(f"not delivered everywhere in {timeout} s: missing {missing}")


def forged_plain(cluster_id: int, senders: list[int], rng: random.Random) -> bytes:
    """An unsealed ring, FD, UNICAST or probe datagram naming a real member."""
    sender = rng.choice(senders)
    kind = rng.randrange(4)
    if kind == 0:
        return wire.HEADER.pack(wire.RING_MAGIC, wire.PROTOCOL_VERSION, rng.randrange(1, 8), cluster_id, sender) \
            + rng.randbytes(rng.randrange(0, 120))
    if kind == 1:
        return wire.HEADER.pack(wire.FD_MAGIC, wire.PROTOCOL_VERSION, wire.FD_PING, cluster_id, sender)
    if kind == 2:
        return wire.UNICAST_COMMON.pack(wire.UNICAST_MAGIC, wire.PROTOCOL_VERSION, wire.UNICAST_DATA, cluster_id,
                                        sender, rng.choice(senders), 1, 0) + rng.randbytes(40)
    return probe_request(cluster_id)


def forged_sealed(senders: list[int], rng: random.Random) -> bytes:
    """A datagram that looks sealed by a real member, with made-up incarnation and counter."""
    return struct.pack(">2sBBIQQI", b"GS", wire.PROTOCOL_VERSION, 1, rng.choice(senders),
                       rng.getrandbits(64), rng.getrandbits(40), 0) + rng.randbytes(rng.randrange(16, 200))


def garbage(rng: random.Random) -> bytes:
    return rng.randbytes(rng.randrange(1, 300))


def test_a_hostile_outsider_reads_nothing_delivers_nothing_and_changes_no_view(tmp_path):
    key = str(tmp_path / "cluster.key")
    write_key_file(key, new_key_file())
    cluster, port = f"hostile-{uuid.uuid4().hex[:8]}", free_udp_port()
    outsider = Outsider(group=(GROUP, port))
    members: list[KeyedMember] = []
    try:
        members, everyone = start_members(("h1", "h2", "h3"), cluster, port, key)
        senders, cluster_id = sorted(everyone), cluster_id_for(cluster)
        marks = [m.mark() for m in members]
        rss_before = [m.rss() for m in members]
        rng = random.Random(2026)
        attacks = {"forged": 0, "sealed_forgeries": 0, "replayed": 0, "garbage": 0}
        with Traffic(members) as traffic:
            outsider.learn_members(1.0)
            deadline = time.monotonic() + SECONDS
            while time.monotonic() < deadline:
                outsider.sniff()
                for _ in range(50):
                    for dest in outsider.targets():
                        outsider.send(forged_plain(cluster_id, senders, rng), dest)
                        attacks["forged"] += 1
                attacks["sealed_forgeries"] += outsider.flood(300, rng, lambda r: forged_sealed(senders, r))
                attacks["garbage"] += outsider.flood(2000, rng, garbage)
                if len(outsider.captured) > 20_000:
                    del outsider.captured[:-5_000]
                attacks["replayed"] += outsider.replay_all()
                time.sleep(0.05)
            sent_during = len(traffic.sent)
        wait_delivered(members, marks, traffic.sent, 30)
        rss_after = [m.rss() for m in members]
        stats = probe_stats(cluster, port, key)

        # Only ciphertext on the wire: no datagram carries a message's text.
        assert outsider.captured and not any(b"ordered-" in c.data for c in outsider.captured)
        if outsider.raw:
            assert outsider.ports, "the outsider saw the members' unicast traffic (tokens) too"
        # Every message sent was delivered, nothing else, in one order.
        orders = [delivered(m, k) for m, k in zip(members, marks)]
        assert all(sorted(o) == sorted(traffic.sent) for o in orders)
        assert orders[0] == orders[1] == orders[2]
        assert sent_during > 3 * 20 * SECONDS * 0.3, "deliveries kept flowing during the attack"
        # No view change at all.
        for m, k in zip(members, marks):
            assert not [e for e in m.log[k:] if "view" in e], f"{m.name} changed views under attack"
        # Memory bounded.
        for m, before, after in zip(members, rss_before, rss_after):
            assert after - before < RSS_GROWTH_MAX, f"{m.name}: RSS {before >> 20} -> {after >> 20} MiB"
        # Each attack shows in every member's counters.
        assert set(stats) == everyone
        for node, s in stats.items():
            assert s["seal_drop_unsealed"] > 0, (node, "forged clear packets and garbage")
            assert s["seal_drop_auth"] + s["seal_drop_rate"] + s["seal_drop_stale"] > 0, (node, "sealed forgeries")
            assert s["seal_drop_replay"] > 0, (node, "replays")
            assert s["peer_addresses"] <= 2
        print(f"attacks: {attacks}; RSS MiB before {[b >> 20 for b in rss_before]} after "
              f"{[a >> 20 for a in rss_after]}; drops: "
              + "; ".join(f"{n}: " + ", ".join(f"{k[5:]}={v}" for k, v in sorted(s.items())
                                               if k.startswith("seal_drop") and v) for n, s in stats.items()))
    finally:
        for m in members:
            m.stop()
        outsider.close()


def run_key(*args: str) -> None:
    out = subprocess.run([sys.executable, "-P", "-m", "groupcomm", "key", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr


def test_a_running_cluster_rotates_its_key_without_a_view_change_or_a_lost_message(tmp_path):
    key = str(tmp_path / "cluster.key")
    write_key_file(key, new_key_file())
    old_key_copy = str(tmp_path / "old.key")
    write_key_file(old_key_copy, read_key_file(key))
    cluster, port = f"rotate-{uuid.uuid4().hex[:8]}", free_udp_port()
    members: list[KeyedMember] = []
    reload_wait = 2.5                                  # > the CRYPTO reload_interval (1 s) twice
    try:
        members, everyone = start_members(("r1", "r2", "r3"), cluster, port, key)
        marks = [m.mark() for m in members]
        with Traffic(members, period=0.05) as traffic:
            time.sleep(0.5)
            run_key("add", key)                        # 1. every member accepts key 2
            time.sleep(reload_wait)
            run_key("use", key, "2")                   # 2. every member seals with key 2
            time.sleep(reload_wait)
            run_key("retire", key, "1")                # 3. key 1 is gone
            time.sleep(reload_wait)
        wait_delivered(members, marks, traffic.sent, 20)
        orders = [delivered(m, k) for m, k in zip(members, marks)]
        assert all(sorted(o) == sorted(traffic.sent) for o in orders) and orders[0] == orders[1] == orders[2]
        for m, k in zip(members, marks):
            assert not [e for e in m.log[k:] if "view" in e], f"{m.name} changed views during the rotation"
        assert set(probe_stats(cluster, port, key)) == everyone          # the new key opens them
        out = subprocess.run(                                            # the retired key no longer does
            [sys.executable, "-P", "-m", "groupcomm", "probe", "--cluster", cluster, "--mcast-port", str(port),
             "--json", "--key-file", old_key_copy, "--timeout", "0.5"],
            cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
        assert out.returncode == 1 and json.loads(out.stdout) == []
    finally:
        for m in members:
            m.stop()
