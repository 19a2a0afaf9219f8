"""Fail-over time of real processes on loopback: kill -9 -> new view at the survivors.

    python benchmarks/failover.py [--members 3] [--runs 3] [--pump c] [--key PATH | --key-compare] [--json]

Runs the default stack (token 1 s, LAN failure detector) and the tuned loopback
stack (token 0.3 s, failure detector 20 ms heartbeats / 80 ms silence / 30 ms
verification), reporting the median and max over runs, and whether any
survivor installed more than one view after the kill (flapping).  ``--pump``
picks the socket driver of every member (the stacks' ``GROUPCOMM_PUMP``);
``--key`` gives every member that cluster key (``GROUPCOMM_KEY_FILE``);
``--key-compare`` runs each stack without a key and with a fresh one.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from workers import free_port  # noqa: E402

STACKS = {
    "default (udp stack)": ["--stack", "udp", "--ttl", "0"],
    "tuned (loopback stack)": ["--stack", "loopback"],
    "udp stack, no FD": ["--stack", "udp", "--ttl", "0", "--fd", "off"],
}


class Node:
    def __init__(self, name: str, cluster: str, port: int, extra: list[str], pump: str, key: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "groupcomm", "node", "--json", "--no-stdin", "--cluster", cluster,
             "--name", name, "--mcast-port", str(port), *extra],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "GROUPCOMM_PUMP": pump, "GROUPCOMM_KEY_FILE": key},
        )
        self.views: list[tuple[float, frozenset]] = []
        self.address: int | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            e = json.loads(line)
            if "address" in e:
                self.address = e["address"]
            elif "view" in e and not e["transitional"]:
                self.views.append((time.monotonic(), frozenset(e["view"])))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def wait(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.002)
    return False


def one_run(members: int, extra: list[str], pump: str, key: str) -> tuple[float, bool]:
    cluster, port = f"fo-{uuid.uuid4().hex[:8]}", free_port()
    nodes = [Node(f"n{i}", cluster, port, extra, pump, key) for i in range(members)]
    try:
        assert wait(lambda: all(n.address for n in nodes), 10)
        everyone = frozenset(n.address for n in nodes)
        assert wait(lambda: all(n.views and n.views[-1][1] == everyone for n in nodes), 20), "no common view"
        time.sleep(1.0)
        victim, survivors = nodes[-1], nodes[:-1]
        before = [len(n.views) for n in survivors]
        t0 = time.monotonic()
        victim.proc.send_signal(signal.SIGKILL)
        target = everyone - {victim.address}
        assert wait(lambda: all(n.views[-1][1] == target for n in survivors), 30), "survivors did not agree"
        took = max(next(t for t, v in n.views[b:] if v == target) for n, b in zip(survivors, before)) - t0
        time.sleep(1.0)
        flapped = any(len(n.views) - b > 1 for n, b in zip(survivors, before))
        return took, flapped
    finally:
        for n in nodes:
            n.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pump", choices=("trio", "c"), default="trio",
                        help="socket driver of every member: trio (Python) or c (the C socket pump)")
    parser.add_argument("--only", default="", help="run only the stacks whose name contains this (e.g. loopback)")
    parser.add_argument("--key", default="", metavar="PATH", help="cluster key file of every member")
    parser.add_argument("--key-compare", action="store_true", help="each stack without a key, then with one")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import tempfile

    from groupcomm.config.keys import new_key_file, write_key_file

    tmp = tempfile.TemporaryDirectory()
    fresh = f"{tmp.name}/cluster.key"
    write_key_file(fresh, new_key_file())
    keys = {"": "", ", key": fresh} if args.key_compare else {", key" if args.key else "": args.key}
    results = {}
    for (stack, extra), (label, key) in ((s, k) for s in STACKS.items() for k in keys.items()):
        name = stack + label
        if args.only not in name:
            continue
        runs = [one_run(args.members, extra, args.pump, key) for _ in range(args.runs)]
        times = [t for t, _ in runs]
        results[name] = {
            "median_s": round(statistics.median(times), 3),
            "max_s": round(max(times), 3),
            "flapping_runs": sum(f for _, f in runs),
        }
        r = results[name]
        print(f"{name:>28}: kill -9 -> new view at all survivors: median {r['median_s']} s, "
              f"max {r['max_s']} s over {args.runs} runs; runs with extra views: {r['flapping_runs']}")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
