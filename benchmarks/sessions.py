"""Replicated HTTP sessions: requests/s through the middleware, migration latency, fail-over time.

    python benchmarks/sessions.py [--nodes 3] [--clients 16] [--seconds 3] [--quick] [--json]

1. **Requests/s through the middleware** (in one process, ASGI called directly -- no HTTP
   server, so the figure is the session layer's cost, not Hypercorn's): the demo counter app
   (``POST /incr``) behind :class:`SessionMiddleware`, ``--clients`` concurrent clients, each
   with its own session, each sending to the node that holds its session (what a load
   balancer following the cookie's routing hint does).  Variants, measured in the same run:

   * ``app alone``: the app without the middleware (its counter in a dict): the floor;
   * ``no replication``: the middleware over a :class:`MemorySessionStore` (one node);
   * ``K=0``, ``K=1``, ``K=2``: the middleware over :class:`ReplicatedSessionStore` on
     ``--nodes`` loopback channels (the K backups acknowledge every save before the answer).

   Also ``K=1 random node``: every request to a random node (a session migrates whenever
   its request lands elsewhere).
2. **Migration latency**: a session held on one node is loaded on another
   (``store.load``: ask the bucket's owner, the holder hands it over): p50/p99.
3. **Fail-over time** (real processes: ``groupcomm sessions-node`` x 3 on the loopback
   stack, K=1): a session is created on the third node, that node is killed with SIGKILL, and
   the first node is asked for the session every 10 ms; the time from the kill until it
   answers with the counter.  That is failure detection + a new ring + the index rebuilt +
   the backup promoted.

Nothing here asserts a speed; every wait is bounded; only the processes started here are signalled.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workers import free_port, free_tcp_port, log, ms, percentile

from groupcomm.io.channel import open_channel
from groupcomm.services.sessions.asgi import SessionMiddleware
from groupcomm.services.sessions.demo_app import demo_app
from groupcomm.services.sessions.driver import ReplicatedSessionStore
from groupcomm.services.sessions.ids import parse_cookie_value
from groupcomm.services.sessions.memory import MemorySessionStore
from groupcomm.services.sessions.settings import SessionSettings

# ---------------------------------------------------------------------- ASGI without a server


async def call(app: Any, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> tuple[int, dict, bytes]:
    """One HTTP request through an ASGI app, in process: (status, headers, body)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    sent = False
    status, out_headers, body = 0, {}, bytearray()

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await trio.sleep_forever()

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            for key, value in message.get("headers", ()):
                out_headers[bytes(key).lower()] = bytes(value)
        elif message["type"] == "http.response.body":
            body.extend(message.get("body", b""))

    await app(scope, receive, send)
    return status, out_headers, bytes(body)


class Client:
    """One user: a cookie and a counter of acknowledged increments."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.cookie: bytes | None = None
        self.acked = 0
        self.requests = 0

    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"x-request-id", f"c{self.number}-{self.requests}".encode())]
        if self.cookie:
            headers.append((b"cookie", self.cookie))
        return headers

    async def increment(self, app: Any) -> bool:
        self.requests += 1
        status, headers, _ = await call(app, "POST", "/incr", self.headers())
        if b"set-cookie" in headers:
            self.cookie = headers[b"set-cookie"].split(b";")[0]
        if status == 200:
            self.acked += 1
        return status == 200

    def holder(self) -> str | None:
        if not self.cookie:
            return None
        parsed = parse_cookie_value(self.cookie.split(b"=", 1)[1].decode())
        return parsed[1] if parsed else None


async def load(apps: dict[str, Any], clients: int, seconds: float, *, sticky: bool) -> dict[str, Any]:
    """``clients`` tasks incrementing for ``seconds``; requests/s and latency percentiles."""
    names = list(apps)
    people = [Client(i) for i in range(clients)]
    latencies: list[float] = []
    failures = 0
    rng = random.Random(1)
    # every client makes its session first (on a node chosen round-robin)
    for person in people:
        await person.increment(apps[names[person.number % len(names)]])
    deadline = time.perf_counter() + seconds

    async def run(person: Client) -> None:
        nonlocal failures
        while time.perf_counter() < deadline:
            hint = person.holder() if sticky else None
            name = hint if hint in apps else rng.choice(names)
            started = time.perf_counter()
            ok = await person.increment(apps[name])
            latencies.append(time.perf_counter() - started)
            failures += not ok

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for person in people:
            nursery.start_soon(run, person)
    elapsed = time.perf_counter() - started
    return {"requests_per_s": round(len(latencies) / elapsed, 1), "p50_ms": ms(statistics.median(latencies)),
            "p99_ms": ms(percentile(latencies, 99)), "requests": len(latencies), "failed": failures}


def app_alone(name: str) -> Any:
    """The demo app's counter without sessions: a dict keyed by the client's request-id prefix."""
    counters: dict[bytes, int] = {}

    async def app(scope: dict, receive: Any, send: Any) -> None:
        request_id = dict(scope["headers"]).get(b"x-request-id", b"")
        client = request_id.split(b"-")[0]
        counters[client] = counters.get(client, 0) + 1
        body = json.dumps({"node": name, "counter": counters[client], "applied": True}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})
    return app


@contextlib.asynccontextmanager
async def replicated(nodes: int, settings: SessionSettings):
    cluster, overrides = f"bench-sess-{uuid.uuid4().hex[:8]}", {"UDP": {"mcast_port": free_port()}}
    async with contextlib.AsyncExitStack() as stack:
        stores = []
        for i in range(nodes):
            channel = await stack.enter_async_context(open_channel(
                "loopback", cluster=cluster, name=f"n{i + 1}", overrides=overrides))
            stores.append(await stack.enter_async_context(ReplicatedSessionStore(channel, "bench", settings)))
        with trio.fail_after(30):
            while not all(s.core.indexed and len(s.core.members) == nodes for s in stores):
                await trio.sleep(0.02)
        yield stores


async def throughput(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    log("requests/s: app alone")
    out["app alone"] = await load({"n1": app_alone("n1")}, args.clients, args.seconds, sticky=True)
    log("requests/s: middleware, no replication (memory store)")
    memory = MemorySessionStore("n1")
    out["no replication"] = await load({"n1": SessionMiddleware(demo_app("n1"), memory)},
                                       args.clients, args.seconds, sticky=True)
    for k in args.k:
        async with replicated(args.nodes, SessionSettings(backups=k)) as stores:
            apps = {s.node_name: SessionMiddleware(demo_app(s.node_name), s) for s in stores}
            log(f"requests/s: K={k}, {args.nodes} nodes, sticky")
            out[f"K={k}"] = await load(apps, args.clients, args.seconds, sticky=True)
            if k == 1:
                log("requests/s: K=1, random node (migrations)")
                out["K=1 random node"] = await load(apps, args.clients, args.seconds, sticky=False)
                out["K=1 random node"]["migrations"] = sum(s.stats()["migrations_in"] for s in stores)
    return out


async def migration(args: argparse.Namespace) -> dict[str, Any]:
    async with replicated(args.nodes, SessionSettings(backups=1)) as stores:
        async with stores[0].session() as session:
            session.values["counter"] = 0
        sid = session.id
        latencies = []
        for i in range(args.migrations):
            store = stores[(i + 1) % len(stores)]
            started = time.perf_counter()
            data = await store.load(sid)
            latencies.append(time.perf_counter() - started)
            await store.release(data.id)
        return {"migrations": len(latencies), "p50_ms": ms(statistics.median(latencies)),
                "p99_ms": ms(percentile(latencies, 99))}


# ---------------------------------------------------------------------- fail-over, real processes


def start_node(name: str, cluster: str, mcast_port: int, http_port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "groupcomm", "sessions-node", "--cluster", cluster, "--stack", "loopback",
         "--mcast-port", str(mcast_port), "--name", name, "--http", f"127.0.0.1:{http_port}", "--backups", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def failover_once(run: int) -> dict[str, Any]:
    cluster, mcast = f"bench-fo-{uuid.uuid4().hex[:8]}", free_port()
    ports = [free_tcp_port() for _ in range(3)]
    procs = [start_node(f"n{i + 1}", cluster, mcast, port) for i, port in enumerate(ports)]
    try:
        with httpx.Client(timeout=2.0) as http:
            deadline = time.monotonic() + 30
            cookie = None
            while time.monotonic() < deadline:              # the cluster is up once n3 takes a session
                try:
                    answer = http.post(f"http://127.0.0.1:{ports[2]}/incr", headers={"x-request-id": "r1"})
                    if answer.status_code == 200:
                        cookie = answer.cookies.get("GCSESSION")
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            if cookie is None:
                raise RuntimeError("the three nodes did not serve within 30 s")
            time.sleep(1.0)                                  # let the copy settle on its backup
            procs[2].send_signal(signal.SIGKILL)
            killed = time.perf_counter()
            while time.perf_counter() - killed < 30:
                try:
                    answer = http.get(f"http://127.0.0.1:{ports[0]}/", cookies={"GCSESSION": cookie})
                    if answer.status_code == 200 and answer.json().get("counter") == 1:
                        return {"run": run, "failover_s": round(time.perf_counter() - killed, 3)}
                except (httpx.TransportError, ValueError):
                    pass
                time.sleep(0.01)
            raise RuntimeError("the session was not served again within 30 s of the kill")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            if proc.stdout:
                proc.stdout.close()


def failover(args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    for run in range(args.failovers):
        log(f"fail-over run {run + 1}/{args.failovers}")
        runs.append(failover_once(run))
    times = [r["failover_s"] for r in runs]
    return {"runs": runs, "median_s": round(statistics.median(times), 3), "max_s": max(times)}


def report(results: dict[str, Any]) -> list[str]:
    lines = [f"sessions benchmark ({results['nodes']} nodes, {results['clients']} clients, loopback, one process)"]
    rows = results.get("throughput", {})
    if rows:
        lines.append(f"  {'variant':<18} {'req/s':>9} {'vs memory':>9} {'p50 ms':>8} {'p99 ms':>8} {'failed':>6}")
        base = rows.get("no replication", {}).get("requests_per_s") or 1
        for name, row in rows.items():
            lines.append(f"  {name:<18} {row['requests_per_s']:>9} {row['requests_per_s'] / base:>9.2f} "
                         f"{row['p50_ms']:>8} {row['p99_ms']:>8} {row['failed']:>6}"
                         + (f"  ({row['migrations']} migrations)" if "migrations" in row else ""))
    if "migration" in results:
        m = results["migration"]
        lines.append(f"  migration latency ({m['migrations']} moves): p50 {m['p50_ms']} ms, p99 {m['p99_ms']} ms")
    if "failover" in results:
        f = results["failover"]
        lines.append(f"  fail-over (kill -9 of the holder, 3 processes, loopback stack): median {f['median_s']} s, "
                     f"max {f['max_s']} s over {len(f['runs'])} runs")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=None, help="per throughput variant (default 3)")
    parser.add_argument("--migrations", type=int, default=None, help="moves timed (default 300)")
    parser.add_argument("--failovers", type=int, default=None, help="fail-over runs (default 3)")
    parser.add_argument("--quick", action="store_true", help="1 s per variant, 100 moves, 1 fail-over")
    parser.add_argument("--only", default="throughput,migration,failover")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.nodes < 2 or args.clients < 1:
        parser.error("--nodes must be at least 2 and --clients at least 1")
    args.seconds = args.seconds or (1.0 if args.quick else 3.0)
    args.migrations = args.migrations or (100 if args.quick else 300)
    args.failovers = args.failovers or (1 if args.quick else 3)
    args.k = [0, 1, 2]
    only = set(args.only.split(","))
    results: dict[str, Any] = {"nodes": args.nodes, "clients": args.clients}
    if "throughput" in only:
        results["throughput"] = trio.run(throughput, args)
    if "migration" in only:
        results["migration"] = trio.run(migration, args)
    if "failover" in only:
        results["failover"] = failover(args)
    print("\n".join(report(results)))
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
