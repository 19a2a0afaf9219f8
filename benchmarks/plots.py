"""Pictures of a throughput sweep's results (benchmarks/sweep.py), from the results file alone.

    python benchmarks/plots.py results.json --out docs/_static/performance
    python benchmarks/plots.py results.json --table     # the figures as reStructuredText tables

Writes ``throughput.png`` (delivered messages/s per member by message size,
one line per transport, mtu and socket driver; the raw-UDP baseline of each
transport kind dashed; Corosync udpu's two points marked) and, for each
message size, ``latency-SIZE.png`` (self-delivery latency CDFs at low load and
at 50 % of the peak rate, one line per run; Corosync's p50/p99 at low load
marked).  Needs matplotlib (``pip install -e '.[bench]'``); draws with the Agg
backend (no display needed), at 100 dpi.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COROSYNC_MSGS_PER_S = {100: 87_000, 1024: 46_000}
"""Used when a results file does not carry them (same figures as throughput.ANCHORS)."""
COROSYNC_LATENCY_US = {"p50": 115, "p99": 170}

DPI = 100


def require_matplotlib(who: str) -> None:
    """Exit 2 with one line if matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"{who}: matplotlib is not installed (pip install -e '.[bench]' or pip install matplotlib)",
              file=sys.stderr)
        raise SystemExit(2) from None


def label(run: dict) -> str:
    where = "netns, MTU 1500" if run["transport"] == "netns" else "loopback"
    return f"{where}, ring mtu {run['mtu']}, {run['pump']} pump" + (", key" if run.get("key") else "")


def series(runs: list[dict]) -> dict[str, list[dict]]:
    """Runs grouped by label, each group sorted by size, in first-seen order."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(label(run), []).append(run)
    return {k: sorted(v, key=lambda r: r["size"]) for k, v in groups.items()}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _colors(runs: list[dict]) -> dict[str, object]:
    """One colour per transport and mtu (the socket driver is told by the line style)."""
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    keys: list[str] = []
    for r in runs:
        if _where(r) not in keys:
            keys.append(_where(r))
    by_where = {k: cmap(i % 10) for i, k in enumerate(keys)}
    return {label(r): by_where[_where(r)] for r in runs}


def _where(run: dict) -> str:
    return f"{run['transport']}-{run['mtu']}"


def _style(name: str) -> dict:
    return {"linestyle": "-" if "c pump" in name else "--", "marker": "o" if "loopback" in name else "s"}


def throughput_figure(results: dict, path: Path) -> Path:
    plt = _pyplot()
    runs = results["runs"]
    groups = series(runs)
    colors = _colors(runs)
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, group in groups.items():
        ax.plot([r["size"] for r in group], [r["msgs_per_s_per_member"] for r in group], label=name,
                color=colors[name], **_style(name))
    for kind in sorted({r["transport"] for r in runs}):
        base: dict[int, float] = {}
        for r in runs:
            if r["transport"] == kind and "raw_udp_datagrams_per_s" in r:
                base[r["size"]] = r["raw_udp_datagrams_per_s"]
        if base:
            sizes = sorted(base)
            ax.plot(sizes, [base[s] for s in sizes], color="black" if kind == "netns" else "grey", linestyle=":",
                    marker="x", linewidth=2, label=f"raw UDP datagrams/s, {kind} (one sender -> one receiver)")
    anchors = {int(k): v for k, v in results.get("meta", {}).get("corosync_udpu_msgs_per_s",
                                                                  COROSYNC_MSGS_PER_S).items()}
    ax.scatter(list(anchors), list(anchors.values()), marker="*", s=220, color="crimson", zorder=5,
               label="Corosync 3.1.7 udpu (netns, MTU 1500)")
    ax.scatter(list(anchors), [2 * v for v in anchors.values()], marker="*", s=180, facecolors="none",
               edgecolors="crimson", zorder=5, label="2x Corosync (issue 14's goal)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    sizes = sorted({r["size"] for r in runs} | set(anchors))
    ax.set_xticks(sizes, [f"{s} B" if s < 1024 else f"{s // 1024} KiB" for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("message size")
    ax.set_ylabel("delivered messages/s per member")
    ax.set_title(_title("Throughput, 3 members all sending", results))
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def latency_figure(results: dict, size: int, path: Path) -> Path:
    plt = _pyplot()
    runs = [r for r in results["runs"] if r["size"] == size]
    colors = _colors(results["runs"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharey=True)
    phases = (("latency_cdf_low", "low load (one message in flight per member)"),
              ("latency_cdf_half", "50 % of the measured peak rate"))
    for ax, (key, title) in zip(axes, phases):
        for r in runs:
            points = r.get(key) or []
            if points:
                name = label(r)
                ax.plot([p[1] for p in points], [p[0] for p in points], label=name, color=colors[name],
                        linestyle=_style(name)["linestyle"])
        ax.set_xscale("log")
        ax.set_xlabel("self-delivery latency (µs)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    corosync = results.get("meta", {}).get("corosync_latency_us", COROSYNC_LATENCY_US)
    for q, value in (("p50", corosync["p50"]), ("p99", corosync["p99"])):
        axes[0].axvline(value, color="crimson", linestyle=":", linewidth=1.5)
        axes[0].text(value, 0.55, f"Corosync {q} ", color="crimson", fontsize=7, rotation=90,
                     ha="right", va="center")
    axes[0].set_ylabel("fraction of messages")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(_title(f"Self-delivery latency, {size} B messages, 3 members", results))
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _title(what: str, results: dict) -> str:
    started = results.get("meta", {}).get("started", "")[:10]
    return f"{what}{f' ({started})' if started else ''}"


def plot_all(results: dict, out: Path) -> list[Path]:
    """Every picture of ``results`` into directory ``out``; returns their paths."""
    require_matplotlib("plots")
    out.mkdir(parents=True, exist_ok=True)
    paths = [throughput_figure(results, out / "throughput.png")]
    for size in sorted({r["size"] for r in results["runs"]}):
        paths.append(latency_figure(results, size, out / f"latency-{size}.png"))
    return paths


def rst_tables(results: dict) -> str:
    """The runs' figures as two reStructuredText list-tables (throughput, latency)."""
    def where(r: dict) -> str:
        return ("netns MTU 1500" if r["transport"] == "netns" else "loopback") + f", ring {r['mtu']}"

    def table(title: str, header: list[str], rows: list[list[str]]) -> str:
        lines = [f".. list-table:: {title}", "   :header-rows: 1", ""]
        for row in [header, *rows]:
            lines.append("   * - " + row[0])
            lines.extend(f"     - {cell}" for cell in row[1:])
        return "\n".join(lines)

    runs = sorted(results["runs"], key=lambda r: (r["transport"] != "netns", -r["mtu"], r["size"], r["pump"]))
    throughput_rows = [[
        where(r), r["pump"], f"{r['size']:,}", f"{r['msgs_per_s_per_member']:,}",
        f"{r['ratio_to_corosync_udpu']}x" if "ratio_to_corosync_udpu" in r else "",
        str(r["mb_per_s_per_member"]), str(r["cpu_s_per_million_deliveries"]), str(r["datagrams_per_message"]),
        str(r["retransmissions"]), "yes" if r["order_identical"] else "**NO**",
        f"{r['raw_udp_datagrams_per_s']:,}" if "raw_udp_datagrams_per_s" in r else "",
    ] for r in runs]
    latency_rows = [[
        where(r), r["pump"], f"{r['size']:,}",
        f"{r['latency_us_p50']:,.0f} / {r['latency_us_p99']:,.0f} / {r['latency_us_p999']:,.0f}",
        f"{r['half_load_msgs_per_s_per_member']:,}",
        f"{r['half_load_latency_us_p50']:,.0f} / {r['half_load_latency_us_p99']:,.0f}",
    ] for r in runs]
    return table("Throughput (3 members, all sending)",
                 ["transport, ring mtu", "pump", "size (B)", "msgs/s per member", "x Corosync", "MB/s per member",
                  "CPU-s per M deliveries", "datagrams per message", "retransmissions", "same order",
                  "raw UDP datagrams/s"], throughput_rows) + "\n\n" + table(
        "Self-delivery latency (µs)",
        ["transport, ring mtu", "pump", "size (B)", "low load p50 / p99 / p999", "50 % load: msgs/s per member",
         "50 % load p50 / p99"], latency_rows) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="a results file written by benchmarks/sweep.py")
    p.add_argument("--out", type=Path, metavar="DIR", help="write the pictures into DIR")
    p.add_argument("--table", action="store_true", help="print the figures as reStructuredText tables")
    args = p.parse_args()
    if not (args.out or args.table):
        p.error("say --out DIR, --table or both")
    results = json.loads(args.results.read_text())
    if args.table:
        print(rst_tables(results))
    if args.out:
        require_matplotlib("plots.py")
        for path in plot_all(results, args.out):
            print(path)


if __name__ == "__main__":
    main()
