"""throughput.py over a matrix of transports, message sizes and socket drivers; results as JSON, plots.

    python benchmarks/sweep.py --out results.json --plot docs/_static/performance     # ~4 min
    python benchmarks/sweep.py --quick --out /tmp/quick.json                          # ~1 min

The matrix: transports {loopback with the ring's mtu 64000, loopback with mtu
1400, network namespaces on a bridge over veth pairs with MTU 1500 and the
ring's mtu 1400 (needs root; skipped with a note otherwise)} x sizes (default
100, 1024, 4096 B) x pumps (default trio and c), 3 members each.  Every run is
one ``benchmarks/throughput.py`` run (same phases and figures); the raw-UDP
baseline is measured once per transport kind and size and attached to each run
of that kind and size.  The results file is rewritten after every run (a
stopped sweep keeps what it measured).  ``--plot DIR`` draws the pictures with
``benchmarks/plots.py`` (needs matplotlib: ``pip install -e '.[bench]'``); the
same pictures come from a results file alone with
``python benchmarks/plots.py results.json --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import plots
import throughput
from netlab import Loopback, NetLab, available

TRANSPORTS = {"loopback-64000": ("loopback", 64000), "loopback-1400": ("loopback", 1400), "netns-1500": ("netns", 1400)}
"""Name -> (where the members run, the ring's mtu).  netns-1500: veth MTU 1500, ring mtu 1400 (fits it)."""

MESSAGES = {100: 150_000, 1024: 40_000, 4096: 15_000, 16384: 5_000}
"""Messages per run by size: about 1-3 s of full load each on a 2-core machine."""


def messages_for(size: int, scale: float) -> int:
    nearest = min(MESSAGES, key=lambda s: abs(s - size))
    return max(3000, int(MESSAGES[nearest] * scale))


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(throughput.ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=False)
        dirty = subprocess.run(["git", "-C", str(throughput.ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=False)
        return out.stdout.strip() + ("+uncommitted" if dirty.stdout.strip() else "")
    except OSError:
        return ""


def meta(argv: list[str]) -> dict:
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["python", "benchmarks/sweep.py", *argv]),
        "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "commit": git_commit(), "load_average_1min_at_start": round(os.getloadavg()[0], 2),
        "corosync_udpu_msgs_per_s": {str(k): v for k, v in throughput.ANCHORS.items()},
        "corosync_latency_us": throughput.COROSYNC_LATENCY_US,
    }


def run_args(options, size: int, mtu: int, pump: str) -> argparse.Namespace:
    """throughput.py's options for one run of the matrix."""
    args = throughput.parser().parse_args([])
    args.members, args.size, args.mtu, args.pump = options.members, size, mtu, pump
    args.messages = messages_for(size, 0.3 if options.quick else 1.0)
    args.latency_samples = 200 if options.quick else 600
    args.half_load_seconds = 1.0 if options.quick else 2.0
    args.baseline_seconds = 1.0 if options.quick else 2.0
    args.baseline = False                       # measured once per transport kind and size below
    args.key = options.key
    args.timeout = options.timeout
    return args


def sweep(options, out: Path) -> dict:
    results = {"meta": meta(sys.argv[1:]), "runs": [], "skipped": [], "failed": []}
    wanted = [TRANSPORTS[name] + (name,) for name in options.transports]
    netns_reason = available() if any(kind == "netns" for kind, _, _ in wanted) else ""
    baselines: dict[tuple[str, int], float] = {}
    lab_netns = None
    try:
        for kind, mtu, name in wanted:
            if kind == "netns":
                if netns_reason:
                    results["skipped"].append(f"{name}: {netns_reason}")
                    print(f"skipped {name}: {netns_reason}", flush=True)
                    continue
                lab_netns = lab_netns or NetLab(options.members)
                lab = lab_netns
            else:
                lab = Loopback(options.members)
            for size in options.sizes:
                for pump in options.pumps:
                    args = run_args(options, size, mtu, pump)
                    try:
                        summary = throughput.run(args, lab)
                    except throughput.RunFailed as exc:
                        results["failed"].append({"name": name, "size": size, "pump": pump, "error": str(exc)})
                        print(f"FAILED {name} {size} B {pump}: {exc}", flush=True)
                        write(results, out)
                        continue
                    if options.baseline:
                        if (kind, size) not in baselines:
                            baselines[kind, size] = throughput.baseline(args, lab)
                        summary["raw_udp_datagrams_per_s"] = round(baselines[kind, size])
                    summary["name"] = name
                    results["runs"].append(summary)
                    print(throughput.describe(summary), flush=True)
                    write(results, out)
    finally:
        if lab_netns is not None:
            lab_netns.close()
    results["meta"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write(results, out)
    return results


def write(results: dict, out: Path) -> None:
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("throughput-sweep.json"), help="results file (JSON)")
    p.add_argument("--plot", type=Path, metavar="DIR", help="also draw the pictures into DIR (needs matplotlib)")
    p.add_argument("--quick", action="store_true", help="sizes 100 and 1024, shorter phases (about a minute)")
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="comma-separated message sizes (default 100,1024,4096; --quick: 100,1024)")
    p.add_argument("--pumps", type=lambda s: s.split(","), default=["trio", "c"], help="comma-separated: trio,c")
    p.add_argument("--transports", type=lambda s: s.split(","), default=list(TRANSPORTS),
                   help=f"comma-separated, of {', '.join(TRANSPORTS)}")
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--timeout", type=float, default=90, help="seconds one run may take before it counts as failed")
    p.add_argument("--key", default="", metavar="PATH", help="cluster key file: seal every datagram")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="raw UDP datagrams/s per transport kind and size")
    options = p.parse_args()
    if options.sizes is None:
        options.sizes = [100, 1024] if options.quick else [100, 1024, 4096]
    unknown = [t for t in options.transports if t not in TRANSPORTS] + [x for x in options.pumps if x not in ("trio", "c")]
    if unknown:
        p.error(f"unknown transport or pump: {', '.join(unknown)}")
    if options.plot:
        plots.require_matplotlib("sweep.py --plot")   # before minutes of measuring, not after
    throughput.stop_on_sigterm()
    results = sweep(options, options.out)
    print(f"results: {options.out}" + (f" ({len(results['failed'])} runs FAILED)" if results["failed"] else ""),
          flush=True)
    if options.plot:
        for path in plots.plot_all(results, options.plot):
            print(f"picture: {path}", flush=True)


if __name__ == "__main__":
    main()
