"""Shared plumbing of the benchmarks that start member processes on loopback."""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    """A port (UDP unless ``kind`` says otherwise) nobody on 127.0.0.1 uses right now."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_tcp_port() -> int:
    """A TCP port nobody on 127.0.0.1 uses right now."""
    return free_port(socket.SOCK_STREAM)


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile (0..100) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


def ms(seconds: float) -> float:
    """Seconds as milliseconds, rounded for a report."""
    return round(seconds * 1000, 3)


def log(line: str) -> None:
    """Progress on stderr (stdout carries the report)."""
    print(line, file=sys.stderr, flush=True)


def run_workers(script: str, count: int, args: list[str], timeout: float) -> list[dict]:
    """Run ``script --worker --index i *args`` for each i; each prints one JSON object last.

    Kills (only) the processes it started if any fails or runs past ``timeout``.
    """
    state = tempfile.TemporaryDirectory(prefix="groupcomm-bench-")      # the members' state directories
    env = {**os.environ, "GROUPCOMM_STATE_DIR": state.name, "XDG_STATE_HOME": state.name}
    procs = [
        subprocess.Popen([sys.executable, script, "--worker", "--index", str(i), *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for i in range(count)
    ]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            if p.returncode != 0:
                raise SystemExit(f"worker failed:\n{err[-3000:]}")
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        state.cleanup()
    return results


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The hidden options a benchmark passes to its own worker processes."""
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--cluster", default="", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)


def run_if_worker(args: argparse.Namespace, worker) -> bool:
    """In a worker process, run ``worker(args)`` under trio and return True."""
    if not args.worker:
        return False
    import trio

    trio.run(worker, args)
    return True
