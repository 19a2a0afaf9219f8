"""``groupcomm sessions-demo``: three web-app nodes with replicated sessions on loopback, narrated.

Starts ``--nodes`` ``groupcomm sessions-node`` processes (one cluster on the
``loopback`` stack, a cluster key and state directory made for the demo, HTTP on
loopback ports: free ones, or ``--base-port`` P, P+1, ...) and prints their URLs.
Then, unless ``--serve`` (keep serving until Ctrl-C), one HTTP client increments
its session's counter on randomly chosen nodes -- the session migrates to each
node that answers -- retrying an unanswered increment with the same request id;
then the node holding the session is stopped gracefully (it hands its sessions
to the others) and another node reads the counter.  Exit status 0 when the
counter equals the increments made.  Bounded in time; only the processes it
started are signalled, on every path.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

from groupcomm.cli.demo import free_udp_port
from groupcomm.cli.errors import EXIT_FAILED, EXIT_OK, CliError, UsageError
from groupcomm.config.keys import new_key_file, write_key_file

__all__ = ["COOKIE", "SessionNodeProcess", "add_parser", "run", "run_sessions_demo"]

COOKIE = "GCSESSION"
"""The session cookie's name (SessionMiddleware's default)."""
START_TIMEOUT = 60.0
"""Seconds for every node to join and serve."""
CHECK_TIMEOUT = 30.0
"""Seconds for the narrated check (increments, graceful stop, final read)."""


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "sessions-demo", help="three web-app nodes with replicated sessions on loopback, narrated",
        description="Start sessions-node processes of the demo app on loopback ports (one cluster, stack "
                    "'loopback'), print their URLs, then increment one session's counter on random nodes (it "
                    "migrates), stop its holder gracefully and check the counter. --serve: just keep serving "
                    "until Ctrl-C.",
    )
    p.add_argument("--nodes", type=int, default=3, help="node processes (3..8, default 3)")
    p.add_argument("--backups", type=int, default=1, metavar="K", help="backups of each session (default 1)")
    p.add_argument("--base-port", type=int, default=None, metavar="P",
                   help="serve HTTP on ports P, P+1, ... (default: free ports)")
    p.add_argument("--increments", type=int, default=12, help="increments the client makes (1..1000, default 12)")
    p.add_argument("--serve", action="store_true", help="no check: keep the nodes serving until Ctrl-C")
    p.add_argument("--seed", type=int, default=None, help="seed of the client's choice of nodes")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not 3 <= args.nodes <= 8:
        # the check stops one node: the others must still be a majority (a primary component)
        raise UsageError("--nodes must be in 3..8")
    if not 0 <= args.backups < args.nodes:
        raise UsageError(f"--backups must be in 0..{args.nodes - 1} (fewer than --nodes)")
    if args.base_port is not None and not 1024 <= args.base_port <= 65535 - args.nodes:
        raise UsageError(f"--base-port must be in 1024..{65535 - args.nodes}")
    if not 1 <= args.increments <= 1000:
        raise UsageError("--increments must be in 1..1000")
    try:
        ok = run_sessions_demo(args.nodes, args.backups, base_port=args.base_port, serve=args.serve,
                               increments=args.increments, seed=args.seed)
    except TimeoutError as exc:
        raise CliError(f"sessions-demo: {exc}") from exc
    return EXIT_OK if ok else EXIT_FAILED


class SessionNodeProcess:
    """One ``groupcomm sessions-node`` process; its stdout JSON lines are collected, stderr goes to a file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: str) -> None:
        self.name = name
        self.log_path = log_path
        self.url: str | None = None
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                # -P: never the current directory first on sys.path (a source checkout would shadow
                # the installed package and its compiled core)
                [sys.executable, "-P", "-m", "groupcomm", "sessions-node", "--name", name, *argv],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True,
                env={**os.environ, **env, "PYTHONPATH": os.pathsep.join(
                    filter(None, [_package_root(), os.environ.get("PYTHONPATH")]))},
            )
        self.events: queue.Queue[dict] = queue.Queue()
        threading.Thread(target=self._read, name=f"{name}-stdout", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                continue

    def wait_serving(self, deadline: float) -> str:
        """The node's URL once it serves; TimeoutError (with its log's tail) past ``deadline`` or if it exits."""
        while self.url is None:
            try:
                event = self.events.get(timeout=0.05)
            except queue.Empty:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name} is not serving (exit status {self.proc.poll()}): "
                                       f"{self.log_tail()}") from None
                continue
            if event.get("event") == "serving":
                self.url = event["url"]
        return self.url

    def final_stats(self, timeout: float = 1.0) -> dict | None:
        """The store's counters the node printed when it stopped gracefully, None if it did not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                event = self.events.get(timeout=0.05)
            except queue.Empty:
                continue
            if event.get("event") == "stopped":
                return event.get("stats", {})
        return None

    def log_tail(self, lines: int = 3) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as log:
                return " | ".join(log.read().strip().splitlines()[-lines:])
        except OSError:
            return ""

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float) -> int:
        """SIGTERM (graceful: evacuation), SIGKILL if it is still running after ``timeout``; its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


def _package_root() -> str:
    import groupcomm

    return os.path.dirname(os.path.dirname(os.path.abspath(groupcomm.__file__)))


def run_sessions_demo(nodes: int = 3, backups: int = 1, *, base_port: int | None = None, serve: bool = False,
                      increments: int = 12, seed: int | None = None, out: Any = print) -> bool:
    """Run the demo (see the module doc); True when the check passed (or, with ``serve``, on Ctrl-C)."""
    cluster = f"sessions-demo-{uuid.uuid4().hex[:6]}"
    state = tempfile.TemporaryDirectory(prefix="groupcomm-sessions-demo-")
    key = os.path.join(state.name, "cluster.key")
    write_key_file(key, new_key_file())
    env = {"GROUPCOMM_STATE_DIR": state.name, "GROUPCOMM_KEY_FILE": key}
    channel = ["--cluster", cluster, "--stack", "loopback", "--mcast-port", str(free_udp_port())]
    out(f"== starting {nodes} sessions-node processes of the demo app (cluster {cluster}, stack 'loopback', "
        f"K={backups} backup{'s' if backups != 1 else ''})")
    processes: list[SessionNodeProcess] = []
    previous = signal.signal(signal.SIGTERM, _interrupt)   # SIGTERM cleans up as Ctrl-C does
    try:
        for i in range(nodes):
            port = 0 if base_port is None else base_port + i
            name = f"node{i + 1}"
            processes.append(SessionNodeProcess(
                name, [*channel, "--http", f"127.0.0.1:{port}", "--backups", str(backups)], env,
                os.path.join(state.name, f"{name}.log")))
        t0 = time.monotonic()
        deadline = t0 + START_TIMEOUT
        for process in processes:
            out(f"   {process.name}: {process.wait_serving(deadline)}")
        out(f"   all serving after {time.monotonic() - t0:.2f}s (GET / , POST /incr with x-request-id, GET /stats)")
        if serve:
            return _serve_until_interrupted(processes, out)
        return _check(processes, increments, random.Random(seed), out)
    finally:
        try:
            for process in processes:
                process.stop(timeout=10)
        finally:
            signal.signal(signal.SIGTERM, previous)
            state.cleanup()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _serve_until_interrupted(processes: list[SessionNodeProcess], out: Any) -> bool:
    out("== serving until Ctrl-C (or SIGTERM)")
    try:
        while all(p.running() for p in processes):
            time.sleep(0.2)
    except KeyboardInterrupt:
        out("== stopping (each node hands its sessions to the others, then leaves)")
        return True
    gone = [p.name for p in processes if not p.running()]
    out(f"== {', '.join(gone)} exited on its own: stopping")
    return False


class _Client:
    """One HTTP client with one session: its cookie is sent to whichever node it asks."""

    def __init__(self, http: Any) -> None:
        self.http = http
        self.cookie: str | None = None

    def request(self, method: str, url: str, **kw: Any) -> Any:
        headers = dict(kw.pop("headers", {}))
        if self.cookie is not None:
            headers["cookie"] = f"{COOKIE}={self.cookie}"
        response = self.http.request(method, url, headers=headers, **kw)
        if COOKIE in response.cookies:
            self.cookie = response.cookies[COOKIE] or None
        self.http.cookies.clear()                  # only the cookie above: whichever node is asked
        return response


def _check(processes: list[SessionNodeProcess], increments: int, rng: random.Random, out: Any) -> bool:
    import httpx

    deadline = time.monotonic() + CHECK_TIMEOUT
    out(f"== one client, {increments} increments, each on a node chosen at random (the session follows)")
    with httpx.Client(timeout=5.0) as http:
        client = _Client(http)
        holder: str | None = None
        counter = 0
        for n in range(1, increments + 1):
            answer = _increment(client, processes, rng, deadline, out)
            moved = f" (session moved {holder} -> {answer['node']})" if holder not in (None, answer["node"]) else ""
            holder, counter = answer["node"], answer["counter"]
            out(f"   increment {n:>2} answered by {holder}: counter {counter}{moved}")
        ok = counter == increments
        victim = next(p for p in processes if p.name == holder)
        out(f"== stop {victim.name}, the session's holder, gracefully (SIGTERM: it hands its sessions over)")
        t1 = time.monotonic()
        status = victim.stop(timeout=max(1.0, deadline - time.monotonic()))
        final_stats = victim.final_stats()
        handed = f", handing over {final_stats.get('evacuated', '?')} session(s)" if final_stats is not None else ""
        out(f"   {victim.name} exited with status {status} after {time.monotonic() - t1:.2f}s{handed}")
        ok &= status == 0
        reader = rng.choice([p for p in processes if p.running()])
        final = _read(client, reader, deadline, out)
        out(f"   {reader.name} reads the counter: {final['counter']} (expected {increments})")
        ok &= final["counter"] == increments
        for process in processes:
            if process.running():
                out(f"   {process.name} stats: {_stats(http, process)}")
    out("== done: the counter equals the increments" if ok else "== done: A CHECK FAILED")
    return ok


def _increment(client: _Client, processes: list[SessionNodeProcess], rng: random.Random, deadline: float,
               out: Any) -> dict:
    """One increment, retried with the same request id (on another random node) until a node answers it."""
    import httpx

    request_id = uuid.uuid4().hex
    while time.monotonic() < deadline:
        process = rng.choice([p for p in processes if p.running()])
        try:
            response = client.request("POST", f"{process.url}/incr", headers={"x-request-id": request_id})
        except httpx.TransportError as exc:
            out(f"   {process.name}: {type(exc).__name__}; retrying the same request id")
            continue
        if response.status_code == 200:
            return response.json()
        if response.status_code != 503:
            raise CliError(f"sessions-demo: {process.name} answered {response.status_code}: {response.text.strip()}")
        wait = min(1.0, float(response.headers.get("retry-after", "1") or 1))
        out(f"   {process.name}: 503 ({response.text.strip()}); retrying the same request id in {wait:g}s")
        time.sleep(wait)
    raise TimeoutError(f"no node answered an increment within {CHECK_TIMEOUT:g}s")


def _read(client: _Client, process: SessionNodeProcess, deadline: float, out: Any) -> dict:
    """The client's session read on ``process``, retried (same node) past errors and 503s until ``deadline``."""
    import httpx

    last = ""
    while time.monotonic() < deadline:
        try:
            response = client.request("GET", f"{process.url}/")
        except httpx.TransportError as exc:
            answer = type(exc).__name__
        else:
            if response.status_code == 200:
                return response.json()
            answer = f"{response.status_code} ({response.text.strip()})"
        if answer != last:
            out(f"   {process.name}: {answer}; retrying")
            last = answer
        time.sleep(0.2)
    raise TimeoutError(f"{process.name} did not answer GET / within {CHECK_TIMEOUT:g}s (last: {last})")


def _stats(http: Any, process: SessionNodeProcess) -> str:
    import httpx

    try:
        response = http.get(f"{process.url}/stats")
    except httpx.TransportError as exc:
        return type(exc).__name__
    if response.status_code != 200:
        return f"none ({response.status_code})"
    return ", ".join(f"{key} {value}" for key, value in response.json().items())
