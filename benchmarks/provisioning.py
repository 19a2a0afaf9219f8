"""Provisioning timings with N in-process agents (ProvisioningNode) on the loopback stack.

    python benchmarks/provisioning.py [--nodes 3] [--sizes 1,20] [--quick] [--json]

Every node is a :class:`~groupcomm.services.provisioning.node.ProvisioningNode`
on its own loopback channel (one fresh cluster, multicast on 127.0.0.1), with
its own :class:`~groupcomm.services.supervisor.runner.Supervisor` and state
directory (a temporary one), all in one trio run.  Bundle processes are the
greeter of ``tests/bundles.py``; each listens on its node's port, a node-local
configuration (PID ``node``, kept local by the sync policy).

1. **Operations**: ``set_config`` round trips until accepted -- one outstanding
   (p50/p99) and many in flight (``--concurrency`` tasks: ops/s) -- on the
   replicated path (group ``default``), against the node-local path (PID
   ``node``: applied to the overlay without the ring) as the baseline.
2. **Artifact distribution**: ``install_bundle`` (not started) of a wheel holding
   S MiB of incompressible data from the first node, until every node has it
   installed; split into the pull (the executor's puller, timed per node) and
   the environment install (venv + pip, timed per node), with the pull's MB/s
   against copying the same bytes through one loopback TCP connection.
3. **Start-to-healthy**: install + start the greeter (HTTP health check, interval
   1 s) until every node reports it healthy.
4. **Rollout**: a plan with one role on all N nodes, batch 1: time per batch and
   in total for ``apply_plan``; then a version whose health check fails
   (``health_timeout`` 3 s): time until it is rolled back (mostly that timeout).

Nothing here asserts a speed; every wait is bounded.  The processes started
are the supervisors' children, which stop with their supervisors.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workers import free_port, free_tcp_port, log, ms, percentile

from groupcomm.io.channel import open_channel
from groupcomm.services.provisioning.node import ProvisioningNode, ProvisioningSettings
from groupcomm.services.provisioning.overview import Progress
from groupcomm.services.provisioning.policy import SyncPolicy
from groupcomm.services.provisioning.reconcile import Fetch, Install
from groupcomm.services.supervisor.runner import Supervisor
from groupcomm.services.supervisor.spec import NodeSpec
from tests.bundles import BUNDLE_NAME, build_wheel, greeter_wheel, manifest

MiB = 1024 * 1024
PID = "bench.config"
NODE_LOCAL = SyncPolicy.from_toml(
    {"default": {"configs": {"inbound": {"deny": ["node"]}, "outbound": {"deny": ["node"]}}}})
DATA_BUNDLE = "bench-data"
PORT_VAR = "GROUPCOMM_CONFIG_NODE_PORT"
BAD_PORT_VAR = "GROUPCOMM_CONFIG_NODE_BAD"      # a port nobody can serve on: the health check never passes
WAIT = 600.0            # the whole run

PLAN = """
[plan]
name = "bench"

[roles.web]
bundles = ["{wheel}"]

[environments.bench]
health_timeout = "{timeout}"
batch = 1
roles = {{ web = {{ group = "default", nodes = {nodes} }} }}
"""


# --------------------------------------------------------------------------- helpers









def data_wheel(directory: Path, name: str, size: int) -> Path:
    """A wheel of bundle ``name`` (version 1.0) carrying ``size`` bytes of incompressible (seeded) data."""
    directory.mkdir(parents=True, exist_ok=True)
    data = random.Random(size).randbytes(size)
    return build_wheel(directory, "1.0", manifest_text=manifest("1.0", name=name), dist=name.replace("-", "_"),
                       extra_files={"hello_bundle/data.bin": data})


def tcp_copy(path: Path) -> float:
    """Seconds to send the file's bytes through one loopback TCP connection (a thread each side)."""
    payload = path.read_bytes()
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        received: list[int] = []

        def receive() -> None:
            conn, _ = server.accept()
            with conn:
                got = 0
                while chunk := conn.recv(MiB):
                    got += len(chunk)
                received.append(got)

        reader = threading.Thread(target=receive)
        reader.start()
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            reader.join(timeout=60)
        took = time.perf_counter() - t0
    if received != [len(payload)]:
        raise RuntimeError(f"TCP copy lost bytes: {received} of {len(payload)}")
    return took


class TimedPuller:
    """Wraps an executor's puller: the start and end of each pull, per digest."""

    def __init__(self, inner: Any, node: str, record: Callable[[str, str, str, float], None]) -> None:
        self.inner = inner
        self.node = node
        self.record = record

    async def pull(self, digest: str, size: int, holders: list[int]) -> None:
        self.record(self.node, digest, "pull_start", trio.current_time())
        try:
            await self.inner.pull(digest, size, holders)
        finally:
            self.record(self.node, digest, "pull_end", trio.current_time())


class Timeline:
    """Times of each node's pull and install of each digest (from the executors' hooks)."""

    def __init__(self) -> None:
        self.events: dict[tuple[str, str, str], float] = {}

    def record(self, node: str, digest: str, what: str, at: float) -> None:
        self.events.setdefault((node, digest, what), at)

    def hook(self, node: ProvisioningNode) -> None:
        executor = node.executor
        executor.puller = TimedPuller(executor.puller, node.name, self.record)

        def on_action(action: Any, reason: str | None) -> None:
            if reason is None and type(action) in (Fetch, Install):
                self.record(node.name, action.digest, type(action).__name__.lower() + "_done", trio.current_time())

        executor.on_action = on_action

    def get(self, node: str, digest: str, what: str) -> float | None:
        return self.events.get((node, digest, what))


async def get(port: int) -> str | None:
    def fetch() -> str | None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
            return data.split(b"\r\n\r\n", 1)[1].decode()
        except (OSError, IndexError):
            return None
    return await trio.to_thread.run_sync(fetch)


async def until(predicate: Callable[[], Any], limit: float, what: str, tick: float = 0.05) -> None:
    with trio.move_on_after(limit):
        while not await predicate():
            await trio.sleep(tick)
        return
    raise TimeoutError(what)


@contextlib.asynccontextmanager
async def cluster(root: Path, names: list[str]) -> AsyncIterator[list[ProvisioningNode]]:
    """A ProvisioningNode per name on loopback channels of one fresh cluster, every status seen."""
    cluster_name, overrides = f"bench-prov-{uuid.uuid4().hex[:8]}", {"UDP": {"mcast_port": free_port()}}
    async with contextlib.AsyncExitStack() as stack:
        nodes = []
        for name in names:
            ch = await stack.enter_async_context(open_channel(
                "loopback", cluster=cluster_name, name=name, overrides=overrides, state_dir=root / "state"))
            sup = await stack.enter_async_context(Supervisor(
                NodeSpec(source="<node>", processes=(), base_dir=str(root / name)), name=name))
            settings = ProvisioningSettings(state_dir=root / name / "provisioning", policy=NODE_LOCAL,
                                            op_timeout=30.0, converge_timeout=180.0)
            nodes.append(await stack.enter_async_context(ProvisioningNode(ch, sup, settings, name=name)))
        with trio.fail_after(60):
            while not all(len(n.core.board.statuses()) == len(names) for n in nodes):
                await trio.sleep(0.05)
        yield nodes


# --------------------------------------------------------------------------- 1. operations

async def op_latency(node: ProvisioningNode, pid: str, count: int) -> list[float]:
    took = []
    for k in range(count):
        t0 = time.perf_counter()
        await node.set_config(pid, {f"k{k % 16}": str(k)})
        took.append(time.perf_counter() - t0)
    return took


async def op_throughput(node: ProvisioningNode, pid: str, count: int, concurrency: int) -> float:
    """ops/s with ``concurrency`` tasks each running set_config one after another."""
    per_task = max(1, count // concurrency)

    async def worker(w: int) -> None:
        for k in range(per_task):
            await node.set_config(pid, {f"w{w}": str(k)})

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for w in range(concurrency):
            nursery.start_soon(worker, w)
    return per_task * concurrency / (time.perf_counter() - t0)


async def operations(nodes: list[ProvisioningNode], count: int, concurrency: int) -> dict[str, Any]:
    node = nodes[0]
    await op_latency(node, PID, 10)                 # warm up both paths
    await op_latency(node, "node", 10)
    out: dict[str, Any] = {}
    for path, pid in (("replicated", PID), ("node-local", "node")):
        lat = await op_latency(node, pid, count)
        rate = await op_throughput(node, pid, count * 2, concurrency)
        out[path] = {"p50_ms": ms(statistics.median(lat)), "p99_ms": ms(percentile(lat, 99)),
                     "ops": count, "ops_per_s": round(rate, 1), "concurrency": concurrency}
    rep, loc = out["replicated"], out["node-local"]
    out["replicated_over_node_local"] = {"p50": round(rep["p50_ms"] / loc["p50_ms"], 2),
                                         "ops_per_s": round(rep["ops_per_s"] / loc["ops_per_s"], 3)}
    # every node applies the replicated changes: wait until they hold the last one
    want = nodes[0].core.replica("default").revision
    await until(lambda: _true(all(n.core.replica("default").revision == want for n in nodes)), 60,
                "every node at the last configuration revision")
    return out


async def _true(value: bool) -> bool:
    return value


# --------------------------------------------------------------------------- 2. distribution

async def distribution(nodes: list[ProvisioningNode], root: Path, timeline: Timeline, size_mib: float,
                       name: str) -> dict[str, Any]:
    """Install (not start) a data wheel of ``size_mib`` from the first node until every node has it;
    then uninstall it.  Each size is its own bundle ``name``: no upgrade in between."""
    size = int(size_mib * MiB)
    wheel = await trio.to_thread.run_sync(data_wheel, root / name, name, size)
    digest = await trio.to_thread.run_sync(lambda: hashlib.sha256(wheel.read_bytes()).hexdigest())
    wheel_bytes = wheel.stat().st_size
    tcp = min([await trio.to_thread.run_sync(tcp_copy, wheel) for _ in range(3)])
    t0 = trio.current_time()
    await nodes[0].install_bundle(wheel, group="default", progress=lambda p: None)
    total = trio.current_time() - t0
    await nodes[0].uninstall_bundle(name, group="default")
    per_node = {}
    pulls = []
    for n in nodes:
        start, end = timeline.get(n.name, digest, "pull_start"), timeline.get(n.name, digest, "pull_end")
        installed = timeline.get(n.name, digest, "install_done")
        row: dict[str, Any] = {"installed_after_s": round(installed - t0, 3) if installed else None}
        if start is not None and end is not None:
            pulls.append((start, end))
            row.update(pull_start_s=round(start - t0, 3), pull_s=round(end - start, 3),
                       pull_MBps=round(wheel_bytes / MiB / (end - start), 1),
                       install_s=round(installed - end, 3) if installed else None)
        else:                                       # the origin: it had the file
            row.update(install_s=round(installed - t0, 3) if installed else None)
        per_node[n.name] = row
    out: dict[str, Any] = {"wheel_MiB": round(wheel_bytes / MiB, 2), "total_s": round(total, 3),
                           "nodes": per_node, "tcp_copy_s": round(tcp, 4),
                           "tcp_copy_MBps": round(wheel_bytes / MiB / tcp, 1)}
    if pulls:
        first, last = min(s for s, _ in pulls), max(e for _, e in pulls)
        out["pulls_aggregate_MBps"] = round(len(pulls) * wheel_bytes / MiB / (last - first), 1)
        mean = statistics.mean(r["pull_MBps"] for r in per_node.values() if "pull_MBps" in r)
        out["pull_MBps_mean"] = round(mean, 1)
        out["pull_over_tcp"] = round(mean / out["tcp_copy_MBps"], 3)
        installs = [r["install_s"] for r in per_node.values() if r.get("install_s") is not None]
        out["install_s_median"] = round(statistics.median(installs), 3) if installs else None
    return out


# --------------------------------------------------------------------------- 3. start-to-healthy

async def start_to_healthy(nodes: list[ProvisioningNode], root: Path, ports: dict[str, int]) -> dict[str, Any]:
    wheel = await trio.to_thread.run_sync(
        lambda: greeter_wheel(root / "greeter", "5.0", port_var=PORT_VAR, pids=("org.example.hello", "node")))
    healthy_at: dict[str, float] = {}
    t0 = trio.current_time()

    def progress(p: Progress) -> None:
        if p.health == "ok":
            healthy_at.setdefault(p.node, trio.current_time() - t0)

    await nodes[0].install_bundle(wheel, group="default", start=True, progress=progress)
    total = trio.current_time() - t0
    await until(lambda: _all_serve(ports, "5.0 - -"), 30, "every greeter answering")
    await nodes[0].uninstall_bundle(BUNDLE_NAME, group="default")
    await until(lambda: _true(not any(n.supervisor.table() or n.executor.environments.list() for n in nodes)), 60,
                "the greeters stopped and removed")
    return {"total_s": round(total, 3), "healthy_seen_s": {k: round(v, 3) for k, v in sorted(healthy_at.items())},
            "health_interval_s": 1.0}


async def _all_serve(ports: dict[str, int], expected: str) -> bool:
    return [await get(p) for p in ports.values()] == [expected] * len(ports)


# --------------------------------------------------------------------------- 4. rollout

async def rollout(nodes: list[ProvisioningNode], root: Path, ports: dict[str, int], bad_port: int
                  ) -> dict[str, Any]:
    good = await trio.to_thread.run_sync(
        lambda: greeter_wheel(root / "plan-good", "6.0", port_var=PORT_VAR, pids=("org.example.hello", "node")))
    bad = await trio.to_thread.run_sync(
        lambda: greeter_wheel(root / "plan-bad", "7.0", port_var=BAD_PORT_VAR, pids=("org.example.hello", "node")))
    good_plan, bad_plan = root / "good.toml", root / "bad.toml"
    good_plan.write_text(PLAN.format(wheel=good, timeout="60s", nodes=len(nodes)))
    bad_plan.write_text(PLAN.format(wheel=bad, timeout="3s", nodes=len(nodes)))
    out: dict[str, Any] = {}
    for label, plan in (("healthy", good_plan), ("failing", bad_plan)):
        healthy: dict[int, float] = {}
        switched: dict[int, float] = {}
        t0 = trio.current_time()

        def progress(p: Progress, switched=switched, healthy=healthy, t0=t0) -> None:
            if p.batch is None:
                return
            if p.step == "switched":
                switched.setdefault(p.batch, trio.current_time() - t0)
            if p.health == "healthy":
                healthy.setdefault(p.batch, trio.current_time() - t0)

        result = await nodes[-1].apply_plan(plan, env="bench", progress=progress)
        total = trio.current_time() - t0
        row: dict[str, Any] = {"outcome": result.outcome, "total_s": round(total, 3),
                               "batches": result.batches, "health_timeout_s": result.health_timeout}
        if label == "healthy":
            bounds = [0.0] + [healthy[b] for b in sorted(healthy)]
            row["batch_s"] = [round(b - a, 3) for a, b in itertools.pairwise(bounds)]
            row["switched_at_s"] = [round(switched[b], 3) for b in sorted(switched)]
            await until(lambda: _all_serve(ports, "6.0 - -"), 30, "every node serving 6.0")
        else:
            row["reason"] = result.reason
            await until(lambda: _all_serve(ports, "6.0 - -"), 60, "every node serving 6.0 again")
            row["serving_previous_after_s"] = round(trio.current_time() - t0, 3)
        out[label] = row
    return out


# --------------------------------------------------------------------------- main

async def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    names = [f"n{i + 1}" for i in range(args.nodes)]
    ports = {name: free_tcp_port() for name in names}
    results: dict[str, Any] = {"nodes": args.nodes, "stack": "loopback"}
    timeline = Timeline()
    # the failing version's port: bound here, never listening and without SO_REUSEADDR, so its
    # server cannot bind it and its health check is refused (port 1 would not do: root may bind it)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    bad_port = blocker.getsockname()[1]
    with blocker, trio.fail_after(WAIT):
        async with cluster(root, names) as nodes:
            for n in nodes:
                timeline.hook(n)
                await n.set_config("node", {"port": str(ports[n.name]), "bad": str(bad_port)})
            if "operations" in args.only:
                log("operations ...")
                results["operations"] = await operations(nodes, args.ops, args.concurrency)
            if "distribution" in args.only:
                results["distribution"] = {}
                for k, size in enumerate(args.sizes):
                    log(f"distribution of {size:g} MiB ...")
                    results["distribution"][f"{size:g}MiB"] = await distribution(nodes, root, timeline, size,
                                                                                 f"{DATA_BUNDLE}-{k + 1}")
            if "healthy" in args.only:
                log("start-to-healthy ...")
                results["start_to_healthy"] = await start_to_healthy(nodes, root, ports)
            if "rollout" in args.only:
                log("rollout ...")
                results["rollout"] = await rollout(nodes, root, ports, bad_port)
    return results


def report(r: dict[str, Any]) -> list[str]:
    lines = [f"{r['nodes']} ProvisioningNodes in one process, loopback stack"]
    if "operations" in r:
        lines += report_operations(r["operations"])
    if "distribution" in r:
        lines += report_distribution(r["distribution"])
    if "start_to_healthy" in r:
        s = r["start_to_healthy"]
        lines.append(f"start-to-healthy (install+start the greeter, HTTP check every {s['health_interval_s']:g} s): "
                     f"{s['total_s']} s; healthy seen at "
                     + ", ".join(f"{k} +{v} s" for k, v in s["healthy_seen_s"].items()))
    if "rollout" in r:
        h, f = r["rollout"]["healthy"], r["rollout"]["failing"]
        lines.append(f"rollout, 1 role on {r['nodes']} nodes, batch 1: {h['outcome']} in {h['total_s']} s; per batch "
                     + ", ".join(f"{b} s" for b in h["batch_s"]))
        lines.append(f"rollout of a version failing its health check (health_timeout {f['health_timeout_s']:g} s): "
                     f"{f['outcome']} after {f['total_s']} s ({f['reason']}); previous version serving everywhere "
                     f"after {f['serving_previous_after_s']} s")
    return lines


def report_operations(o: dict[str, Any]) -> list[str]:
    lines = []
    lines.append("set_config until accepted     p50 ms   p99 ms   ops/s ({} in flight)".format(
        o["replicated"]["concurrency"]))
    for path in ("replicated", "node-local"):
        x = o[path]
        lines.append(f"  {path:<27} {x['p50_ms']:>7}  {x['p99_ms']:>7}   {x['ops_per_s']:>7}")
    ratio = o["replicated_over_node_local"]
    lines.append(f"  replicated / node-local: p50 x{ratio['p50']}, ops/s x{ratio['ops_per_s']}")
    return lines


def report_distribution(dist: dict[str, Any]) -> list[str]:
    lines = []
    lines.append("distribution (install, not started, from n1 until every node has it installed)")
    for size, d in dist.items():
        lines.append(f"  {size} wheel ({d['wheel_MiB']} MiB): total {d['total_s']} s; pull "
                     f"{d.get('pull_MBps_mean', '-')} MB/s per node (aggregate {d.get('pulls_aggregate_MBps', '-')}"
                     f" MB/s) vs one TCP connection {d['tcp_copy_MBps']} MB/s (x{d.get('pull_over_tcp', '-')}); "
                     f"venv+pip install median {d.get('install_s_median', '-')} s")
        for node, row in d["nodes"].items():
            pull = (f"pull {row['pull_s']} s (from +{row['pull_start_s']} s)" if "pull_s" in row
                    else "origin (no pull)")
            lines.append(f"    {node}: {pull}, install {row['install_s']} s, installed at +{row['installed_after_s']} s")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--sizes", default=None, help="bundle sizes in MiB, comma-separated (default 1,20)")
    parser.add_argument("--ops", type=int, default=None, help="set_config ops per latency run (default 200)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="fewer ops, one 1 MiB bundle")
    parser.add_argument("--only", default="operations,distribution,healthy,rollout",
                        help="the parts to run, comma-separated (default: all)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.sizes = [float(s) for s in (args.sizes or ("1" if args.quick else "1,20")).split(",")]
    args.ops = args.ops or (50 if args.quick else 200)
    args.only = set(args.only.split(","))
    with tempfile.TemporaryDirectory(prefix="groupcomm-bench-provisioning-") as tmp:
        results = trio.run(run, args, Path(tmp))
    print("\n".join(report(results)))
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
