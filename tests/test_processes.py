"""Real member processes on loopback: join, one total order, kill -9, restart.

Every process is started here, bounded in time, and killed in ``finally`` by
the PID we hold (never by name).
"""

from __future__ import annotations

import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKEN = 0.3


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Member:
    """One `groupcomm node --json` process and a thread collecting its events."""

    def __init__(self, name: str, cluster: str, port: int) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "groupcomm", "node", "--json", "--cluster", cluster, "--name", name,
             "--mcast-port", str(port), "--ttl", "0", "--token-timeout", str(TOKEN)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self._start_reader()

    def _start_reader(self) -> None:
        self.events: queue.Queue = queue.Queue()
        self.log: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.put(json.loads(line))

    def drain(self) -> None:
        while True:
            try:
                self.log.append(self.events.get_nowait())
            except queue.Empty:
                return

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def address(self, timeout: float = 10) -> int:
        return self.wait(lambda e: "address" in e, timeout)["address"]

    def mark(self) -> int:
        """A position in the event log: ``wait(..., since=mark)`` looks only at later events."""
        self.drain()
        return len(self.log)

    def wait(self, predicate, timeout: float, since: int = 0) -> dict:
        deadline = time.monotonic() + timeout
        for event in self.log[since:]:
            if predicate(event):
                return event
        while time.monotonic() < deadline:
            try:
                event = self.events.get(timeout=0.05)
            except queue.Empty:
                continue
            self.log.append(event)
            if predicate(event):
                return event
        err = self.proc.stderr.read() if self.proc.poll() is not None and self.proc.stderr else ""
        raise AssertionError(f"{self.name}: timed out; last events {self.log[-5:]} {err}")

    def messages(self) -> list[str]:
        self.drain()
        return [e["msg"] for e in self.log if "msg" in e]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def view_is(members: set[int]):
    return lambda e: "view" in e and not e["transitional"] and set(e["view"]) == members


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
        out = subprocess.run(
            [sys.executable, "-m", "groupcomm", "probe", "--cluster", cluster, "--mcast-port", str(port), "--json"],
            cwd=ROOT, capture_output=True, text=True, timeout=30,
        )
        assert out.returncode == 0, out.stderr
        reports = json.loads(out.stdout)
        assert {r["address"] for r in reports} == ids
        assert all(r["state"] == "OPERATIONAL" and set(r["view"]) == ids for r in reports)
        assert all("drop_malformed" in r["stats"] for r in reports)
        table = subprocess.run(
            [sys.executable, "-m", "groupcomm", "probe", "--cluster", cluster, "--mcast-port", str(port)],
            cwd=ROOT, capture_output=True, text=True, timeout=30,
        ).stdout
        assert "rotations/s" in table and "q1" in table and "q2" in table
    finally:
        for m in members:
            m.stop()
