"""`groupcomm demo`: a local cluster of real member processes on loopback.

Starts members (``groupcomm node --json --stack loopback``), shows the view
forming, streams totally ordered messages and checks every member saw the
same order, kills one member with SIGKILL and shows the new view, restarts it
and shows the merge, then shuts everything down.  Multicast stays on this host
(TTL 0) and only the processes it started are signalled.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from groupcomm.cli.errors import EXIT_FAILED, EXIT_OK, CliError, UsageError
from groupcomm.config.keys import new_key_file, write_key_file

__all__ = ["NodeProcess", "add_parser", "free_udp_port", "run", "run_demo"]


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "demo", help="a local cluster of real member processes on loopback, narrated",
        description="Start member processes on this host (stack 'loopback'), show the view forming, "
                    "a totally ordered stream, kill -9 of one member, its restart and the merge.",
    )
    p.add_argument("--members", type=int, default=3, help="member processes (2..8, default 3)")
    p.add_argument("--messages", type=int, default=10, help="messages each member sends (default 10)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not 2 <= args.members <= 8:
        raise UsageError("--members must be in 2..8")
    if args.messages < 1:
        raise UsageError("--messages must be at least 1")
    try:
        return EXIT_OK if run_demo(args.members, args.messages) else EXIT_FAILED
    except TimeoutError as exc:
        raise CliError(f"demo: {exc}") from exc


def free_udp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class NodeProcess:
    """One ``groupcomm node --json`` process and a thread collecting its events."""

    def __init__(self, name: str, cluster: str, args: list[str], prefix: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            # -P: never the current directory first on sys.path.  Run from a source
            # checkout, it would shadow the installed package (and its compiled core).
            [*(prefix or []), sys.executable, "-P", "-m", "groupcomm", "node", "--json", "--cluster", cluster,
             "--name", name, *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {}),
                 "PYTHONPATH": os.pathsep.join(filter(None, [_package_root(), os.environ.get("PYTHONPATH")]))},
        )
        self.events: queue.Queue = queue.Queue()
        self.log: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                continue

    def drain(self) -> None:
        while True:
            try:
                self.log.append(self.events.get_nowait())
            except queue.Empty:
                return

    def mark(self) -> int:
        """A position in the event log: ``wait(..., since=mark)`` looks only at later events."""
        self.drain()
        return len(self.log)

    def wait(self, predicate: Callable[[dict], bool], timeout: float, since: int = 0) -> dict:
        deadline = time.monotonic() + timeout
        for event in self.log[since:]:
            if predicate(event):
                return event
        while time.monotonic() < deadline:
            try:
                event = self.events.get(timeout=0.02)
            except queue.Empty:
                continue
            self.log.append(event)
            if predicate(event):
                return event
        err = self.proc.stderr.read() if self.proc.poll() is not None and self.proc.stderr else ""
        raise TimeoutError(f"{self.name}: timed out; last events {self.log[-5:]} {err}")

    def address(self, timeout: float = 10) -> int:
        return self.wait(lambda e: "address" in e, timeout)["address"]

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def messages(self) -> list[str]:
        self.drain()
        return [e["msg"] for e in self.log if "msg" in e]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        """Graceful leave (SIGINT), then kill if it lingers."""
        if self.proc.poll() is None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()           # the stdin reader thread cannot be cancelled otherwise
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _package_root() -> str:
    """The folder that holds the ``groupcomm`` package this process imported."""
    import groupcomm

    return os.path.dirname(os.path.dirname(os.path.abspath(groupcomm.__file__)))


def view_is(members: set[int]) -> Callable[[dict], bool]:
    return lambda e: "view" in e and not e["transitional"] and set(e["view"]) == members


def run_demo(members: int = 3, messages: int = 10, out: Callable[[str], None] = print) -> bool:
    """Run the narrated demo; returns True when every check passed."""
    cluster, port = f"demo-{uuid.uuid4().hex[:6]}", free_udp_port()
    args = ["--stack", "loopback", "--mcast-port", str(port)]
    names = [f"node{i}" for i in range(1, members + 1)]
    out(f"== starting {members} member processes on loopback (cluster {cluster}, stack 'loopback')")
    t0 = time.monotonic()
    # The members' state directories (ring seqs, quorum memory) and the cluster key
    # (every datagram sealed, docs/security.rst) live as long as the demo.
    state = tempfile.TemporaryDirectory(prefix="groupcomm-demo-")
    key = os.path.join(state.name, "cluster.key")
    write_key_file(key, new_key_file())
    env = {"GROUPCOMM_STATE_DIR": state.name, "GROUPCOMM_KEY_FILE": key}
    out(f"   with a cluster key made for this demo ({key}): every datagram is encrypted and authenticated")
    nodes = [NodeProcess(n, cluster, args, env=env) for n in names]
    ok = True
    try:
        ids = {n.name: n.address() for n in nodes}
        everyone = set(ids.values())
        for n in nodes:
            n.wait(view_is(everyone), 20)
        out(f"   one view of {members} formed after {time.monotonic() - t0:.2f}s: {sorted(everyone)}")
        out(f"== every member sends {messages} messages at once")
        for i in range(messages):
            for n in nodes:
                n.send(f"{n.name} says {i}")
        total = messages * members
        for n in nodes:
            n.wait(lambda e, n=n: len([x for x in n.log if "msg" in x]) >= total, 20)
        orders = [n.messages()[:total] for n in nodes]
        same = all(o == orders[0] for o in orders)
        ok &= same
        for line in orders[0][:6]:
            out(f"   {line}")
        out(f"   ... {total} messages; identical order at all {members} members: {same}")
        victim = nodes[-1]
        out(f"== kill -9 {victim.name}")
        marks = [n.mark() for n in nodes[:-1]]
        t1 = time.monotonic()
        victim.kill()
        survivors = everyone - {ids[victim.name]}
        for n, m in zip(nodes[:-1], marks):
            n.wait(view_is(survivors), 20, since=m)
        out(f"   survivors installed the new view {sorted(survivors)} after {time.monotonic() - t1:.3f}s")
        out(f"== restart {victim.name} (same name, same node id, new incarnation)")
        marks = [n.mark() for n in nodes[:-1]]
        t2 = time.monotonic()
        nodes[-1] = NodeProcess(victim.name, cluster, args, env=env)
        for n, m in zip(nodes, [*marks, 0]):
            n.wait(view_is(everyone), 20, since=m)
        out(f"   merged back into one view of {members} after {time.monotonic() - t2:.3f}s")
        marks = [n.mark() for n in nodes]
        for n in nodes:
            n.send(f"{n.name} is back")
        for n, m in zip(nodes, marks):
            n.wait(lambda e, n=n, m=m: len([x for x in n.log[m:] if "msg" in x]) >= members, 20, since=m)
        after = [[e["msg"] for e in n.log[m:] if "msg" in e][:members] for n, m in zip(nodes, marks)]
        same = all(a == after[0] for a in after)
        ok &= same
        out(f"   after the merge: {after[0]}; identical at all members: {same}")
    finally:
        for n in nodes:
            n.stop()
        state.cleanup()
    out("== done: all checks passed" if ok else "== done: A CHECK FAILED")
    return ok
