"""The Totem C core alone: no Python in the measured loop.

Compiles benchmarks/core_alone.c together with groupcomm/_ring.c and runs it
for 3 and 8 members x 100 B and 1 KiB payloads, at the default mtu (1400) and
at a loopback-sized datagram (--mtu 65000).  In each run every member of the
ring is simulated in one process on one CPU, over a deterministic in-memory
network with a fixed one-way latency and a virtual clock, while every member
keeps its send queue full.

What the figures mean:
  - ordered msgs/CPU-s: messages put in total order (delivered at ring 1) per
    CPU-second spent running *all* members (plus the small simulated
    network and the order check);
  - deliveries/CPU-s: deliveries at all rings per CPU-second;
  - msgs/rotation: messages ordered per token rotation (flow control window;
    at mtu 65000 it is members x 300, the send backlog each member keeps).
Since all members share one CPU and the harness is included, this is an upper
bound of the core's own CPU cost per message, not a network throughput.  Each
run also checks that all rings delivered the same messages in the same order
("order verified") and reports idle token rotations and packet rates.

Usage: python benchmarks/core_alone.py [--seconds 1.0] [--idle-seconds 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(outdir: str, cc: str = "gcc") -> str:
    exe = os.path.join(outdir, "core_alone")
    cmd = [cc, "-O2", "-std=gnu11", "-Igroupcomm", "groupcomm/_ring.c", "benchmarks/core_alone.c", "-o", exe]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"build failed: {' '.join(cmd)}")
    return exe


def run_one(exe: str, members: int, payload: int, mtu: int, args: argparse.Namespace) -> dict:
    cmd = [
        exe,
        "--members", str(members),
        "--payload", str(payload),
        "--mtu", str(mtu),
        "--seconds", str(args.seconds),
        "--idle-seconds", str(args.idle_seconds),
        "--latency-us", str(args.latency_us),
        "--json",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    result: dict = {"members": members, "payload": payload, "mtu": mtu}
    if lines and lines[-1].startswith("{"):
        result.update(json.loads(lines[-1]))
        lines = lines[:-1]
    result["order_verified"] = proc.returncode == 0 and any(l.startswith("order verified") for l in lines)
    result["returncode"] = proc.returncode
    result["report"] = lines
    if proc.returncode != 0:
        result["stderr"] = proc.stderr.strip()
        # A command that reproduces the run after the temporary directory is gone.
        result["command"] = (
            "gcc -O2 -std=gnu11 -Igroupcomm groupcomm/_ring.c benchmarks/core_alone.c -o /tmp/core_alone && "
            + " ".join(["/tmp/core_alone"] + cmd[1:])
        )
    return result


def _fmt(v, spec: str = ",.0f") -> str:
    return "-" if v is None else format(v, spec)


def print_table(results: list[dict]) -> None:
    head = (
        f"{'members':>7} {'payload':>7} {'mtu':>6} {'ordered msgs/CPU-s':>19} "
        f"{'deliveries/CPU-s':>17} {'msgs/rotation':>13} {'order':>8} "
        f"{'idle tok/s':>10} {'idle pkt/s':>10} {'idle CPU us/s':>13}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        print(
            f"{r['members']:>7} {r['payload']:>7} {r['mtu']:>6} "
            f"{_fmt(r.get('ordered_msgs_per_cpu_s')):>19} "
            f"{_fmt(r.get('deliveries_per_cpu_s')):>17} "
            f"{_fmt(r.get('msgs_per_rotation'), '.1f'):>13} "
            f"{'verified' if r['order_verified'] else 'FAILED':>8} "
            f"{_fmt(r.get('idle_tokens_per_s'), '.1f'):>10} "
            f"{_fmt(r.get('idle_packets_per_s'), '.1f'):>10} "
            f"{_fmt(r.get('idle_cpu_us_per_virtual_s'), '.1f'):>13}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="virtual seconds of the busy phase (default 1.0)")
    ap.add_argument("--idle-seconds", type=float, default=10.0, help="virtual seconds of the idle phase (default 10)")
    ap.add_argument("--latency-us", type=int, default=100, help="one-way network latency, virtual us (default 100)")
    ap.add_argument("--members", type=int, nargs="+", default=[3, 8])
    ap.add_argument("--payloads", type=int, nargs="+", default=[100, 1024])
    ap.add_argument("--mtus", type=int, nargs="+", default=[1400, 65000])
    ap.add_argument("--cc", default="gcc", help="C compiler (default gcc)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each run's phase lines")
    ap.add_argument("--json", action="store_true", help="print all results as one JSON line at the end")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="core_alone.") as tmp:
        exe = build(tmp, args.cc)
        results = []
        for mtu in args.mtus:
            for members in args.members:
                for payload in args.payloads:
                    r = run_one(exe, members, payload, mtu, args)
                    results.append(r)
                    if args.verbose or r["returncode"] != 0:
                        print(f"# members={members} payload={payload} mtu={mtu}")
                        for line in r["report"]:
                            print(f"#   {line}")
                    if r["returncode"] != 0:
                        print(f"#   FAILED (exit {r['returncode']}); reproduce from the repo root with: {r['command']}")
                        for line in r.get("stderr", "").splitlines():
                            print(f"#   stderr: {line}")

    print(
        f"Totem C core alone: all members in one process on one CPU, busy {args.seconds:g} virtual s, "
        f"idle {args.idle_seconds:g} virtual s, latency {args.latency_us} us (upper bound of core CPU cost)"
    )
    print_table(results)
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "report"} for r in results]))
    return 0 if all(r["order_verified"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
