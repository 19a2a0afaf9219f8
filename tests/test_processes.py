"""Real member processes on loopback: join, one total order, kill -9, restart.

Every process is started here, bounded in time, and killed in ``finally`` by
the PID we hold (never by name).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from groupcomm.cli.demo import NodeProcess, free_udp_port, view_is

ROOT = Path(__file__).resolve().parent.parent
TOKEN = 0.3


free_port = free_udp_port


class Member(NodeProcess):
    """A `groupcomm node --json` member on loopback multicast (TTL 0)."""

    def __init__(self, name: str, cluster: str, port: int) -> None:
        super().__init__(name, cluster, ["--mcast-port", str(port), "--ttl", "0", "--token-timeout", str(TOKEN)])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def test_processes_join_agree_survive_kill_and_rejoin():
    cluster, port = f"proc-{uuid.uuid4().hex[:8]}", free_port()
    members = [Member(n, cluster, port) for n in ("p1", "p2", "p3")]
    try:
        ids = {m.name: m.address() for m in members}
        everyone = set(ids.values())
        for m in members:
            m.wait(view_is(everyone), 15)
        for i in range(20):
            for m in members:
                m.send(f"{m.name}-{i}")
        for m in members:
            m.wait(lambda e: "msg" in e and sum("msg" in x for x in m.log) >= 60, 15)
        orders = [m.messages()[:60] for m in members]
        assert orders[0] == orders[1] == orders[2]
        assert sorted(orders[0]) == sorted(f"{n}-{i}" for n in ("p1", "p2", "p3") for i in range(20))

        victim = members[2]
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(timeout=10)
        survivors = members[:2]
        t0 = time.monotonic()
        for m in survivors:
            m.wait(view_is(everyone - {ids["p3"]}), 10)
        elapsed = time.monotonic() - t0
        assert elapsed < 10

        marks = [m.mark() for m in members[:2]]
        members[2] = Member("p3", cluster, port)        # same name, so the same node id
        assert members[2].address() == ids["p3"]
        for m, mark in zip(members, [*marks, 0]):
            m.wait(view_is(everyone), 15, since=mark)   # the merged view, not the first one
        members[0].send("after rejoin")
        for m in members:
            m.wait(lambda e: e.get("msg") == "after rejoin", 10)
    finally:
        for m in members:
            m.stop()


def test_probe_lists_every_running_member():
    cluster, port = f"probe-{uuid.uuid4().hex[:8]}", free_port()
    members = [Member(n, cluster, port) for n in ("q1", "q2")]
    try:
        ids = {m.address() for m in members}
        for m in members:
            m.wait(view_is(ids), 15)
        probe = [sys.executable, "-P", "-m", "groupcomm", "probe", "--cluster", cluster, "--mcast-port", str(port)]
        out = subprocess.run([*probe, "--json"], check=False, cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert f"probing cluster {cluster!r} on stack 'udp'" in out.stderr
        reports = json.loads(out.stdout)
        assert {r["address"] for r in reports} == ids
        assert all(r["state"] == "OPERATIONAL" and set(r["view"]) == ids for r in reports)
        assert all("drop_malformed" in r["stats"] for r in reports)
        table = subprocess.run(probe, check=False, cwd=ROOT, capture_output=True, text=True, timeout=30).stdout
        assert "rotations/s" in table and "q1" in table and "q2" in table
    finally:
        for m in members:
            m.stop()


def test_the_demo_runs_real_processes_and_all_its_checks_pass():
    from groupcomm.cli.demo import run_demo

    lines: list[str] = []
    assert run_demo(3, 5, out=lines.append)
    text = "\n".join(lines)
    assert "identical order at all 3 members: True" in text and "merged back into one view" in text


def test_members_started_together_form_one_ring_not_several():
    cluster, port = f"start-{uuid.uuid4().hex[:8]}", free_port()
    args = ["--stack", "loopback", "--mcast-port", str(port)]
    members = [NodeProcess(f"s{i}", cluster, args) for i in range(5)]
    try:
        ids = {m.address() for m in members}
        for m in members:
            first = m.wait(lambda e: "view" in e and not e["transitional"], 20)
            assert set(first["view"]) == ids, f"{m.name} first formed {first['view']}"
    finally:
        for m in members:
            m.stop()
