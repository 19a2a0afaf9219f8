"""The Totem core alone, in the simulator, no loss.

Prints:
  - ordered deliveries per CPU-second, 3 and 8 members, 100 B and 1 KiB payloads
    (every member keeps its send queue full: "as fast as flow control allows");
  - token rotations per second, busy and idle (virtual time) and CPU cost per token visit;
  - virtual time from a crash to the new regular configuration, default timers;
  - where the CPU time goes: the C core versus the Python simulator (cProfile).

With ``--scale``: only the cost per delivered message from 3 to 16 members
(3, 4, 6, 8, 12, 16 x 100 B and 1 KiB): ordered deliveries per CPU-second,
CPU-seconds per million deliveries, token rotations per virtual second,
messages per token visit, and a profile split per member count.

With ``--stack NAME`` (e.g. ``sim``) the throughput runs go through the
production layers (Multicast: TOTEM + FRAG + FD, Member) instead of the bare
ring, as SimCluster(stack=NAME) drives them.

Usage: python benchmarks/ring_sim.py [--seconds 0.5] [--mtu 1400] [--stack sim] [--scale] [--json]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import time

from groupcomm.events import Configuration
from groupcomm.core.ring import RingConfig
from groupcomm.testing import SimCluster

_BACKLOG = 300
_SCALE_BACKLOG = 2000
"""--scale keeps this many messages queued at each member (topped up every 2 virtual ms): enough that
the ring's flow control, not the top-up, limits 3 members at 100 B."""


def _top_up(sim: SimCluster, payload: bytes, backlog: int = _BACKLOG) -> None:
    for n in sim.live:
        ring = sim.ring(n)
        while ring.pending < backlog:
            sim.send(n, payload)


def _formed(members: int, config: RingConfig, seed: int = 1, stack: str | None = None) -> SimCluster:
    sim = SimCluster(nodes=members, seed=seed, config=config, stack=stack)
    sim.run_until(sim.converged, 5)
    return sim


def throughput(members: int, size: int, seconds: float, config: RingConfig, stack: str | None = None,
               backlog: int = _BACKLOG) -> dict:
    sim = _formed(members, config, stack=stack)
    payload = b"x" * size
    ring1 = sim.ring(1)
    delivered0 = ring1.stats()["messages_delivered"]
    total0 = sum(sim.ring(n).stats()["messages_delivered"] for n in sim.live)
    tokens0 = ring1.stats()["tokens_received"]
    v0 = sim.now
    cpu0 = time.process_time()
    while sim.now - v0 < seconds:
        _top_up(sim, payload, backlog)
        sim.run(0.002)
    cpu = time.process_time() - cpu0
    ordered = ring1.stats()["messages_delivered"] - delivered0
    total = sum(sim.ring(n).stats()["messages_delivered"] for n in sim.live) - total0
    rotations = ring1.stats()["tokens_received"] - tokens0
    return {
        "members": members,
        "size": size,
        "ordered_msgs_per_cpu_s": round(ordered / cpu),
        "deliveries_per_cpu_s": round(total / cpu),
        "deliveries": total,
        "cpu_s_per_million_ordered": round(cpu / ordered * 1e6, 1),
        "cpu_s_per_million_deliveries": round(cpu / total * 1e6, 2),
        "virtual_msgs_per_s": round(ordered / (sim.now - v0)),
        "busy_rotations_per_virtual_s": round(rotations / (sim.now - v0)),
        "msgs_per_rotation": round(ordered / max(rotations, 1), 1),
        "msgs_per_token_visit": round(ordered / max(rotations * members, 1), 1),
    }


def idle_rotations(members: int, config: RingConfig, seconds: float = 20.0) -> dict:
    sim = _formed(members, config)
    sim.run(2.0)
    ring1 = sim.ring(1)
    t0 = ring1.stats()["tokens_received"]
    p0 = sum(sim.ring(n).stats()["packets_sent"] for n in sim.live)
    cpu0 = time.process_time()
    sim.run(seconds)
    cpu = time.process_time() - cpu0
    rot = ring1.stats()["tokens_received"] - t0
    pk = sum(sim.ring(n).stats()["packets_sent"] for n in sim.live) - p0
    return {
        "members": members,
        "idle_rotations_per_s": round(rot / seconds, 2),
        "idle_packets_per_s_cluster": round(pk / seconds, 1),
        "cpu_us_per_idle_virtual_s": round(cpu / seconds * 1e6),
    }


def failover(members: int, seeds: range) -> dict:
    times = []
    for seed in seeds:
        sim = _formed(members, RingConfig(), seed)
        sim.run(1.0 + (seed % 7) * 0.013)
        victim = members if seed % 2 else 2
        t0 = sim.now
        sim.crash(victim)
        seen = {}

        def observe(node, ev, t0=t0, seen=seen, sim=sim):
            if isinstance(ev, Configuration) and not ev.transitional:
                seen.setdefault(node, sim.now - t0)

        sim.add_observer(observe)
        sim.run_until(sim.converged, 10, step=0.001)
        times.append(max(seen.values()))
    c = RingConfig()
    bound = c.token_timeout + 1.2 * c.token_timeout + 0.05
    return {
        "members": members,
        "crash_to_view_s_min": round(min(times), 3),
        "median": round(statistics.median(times), 3),
        "max": round(max(times), 3),
        "bound_token_plus_consensus_plus_50ms": round(bound, 3),
    }


def profile(members: int, size: int, seconds: float, config: RingConfig, stack: str | None = None,
            backlog: int = _BACKLOG) -> dict:
    prof = cProfile.Profile()
    prof.enable()
    run = throughput(members, size, seconds, config, stack, backlog)
    prof.disable()
    stats = pstats.Stats(prof)
    total = sum(v[2] for v in stats.stats.values())
    core = sum(v[2] for k, v in stats.stats.items() if "_ring_cffi.gc_ring_" in k[2])
    take_py = sum(v[2] for k, v in stats.stats.items() if k[0].endswith("ring.py") and k[2] == "take")
    sim_py = sum(v[2] for k, v in stats.stats.items() if k[0].endswith("sim.py"))
    layers_py = sum(v[2] for k, v in stats.stats.items() if "/groupcomm/layers/" in k[0])
    top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:8]
    return {
        "members": members,
        "size": size,
        "c_core_share": round(core / total, 3),
        "c_core_us_per_delivery": round(core / run["deliveries"] * 1e6, 3),
        "ring_take_python_share": round(take_py / total, 3),
        "simulator_python_share": round(sim_py / total, 3),
        "layers_python_share": round(layers_py / total, 3),
        "top_functions_by_self_time": [f"{k[2]} ({k[0].rsplit('/', 1)[-1]}): {v[2] / total:.1%}" for k, v in top],
    }


SCALE_MEMBERS = (3, 4, 6, 8, 12, 16)
SCALE_SIZES = (100, 1024)
SCALE_PROFILED = (3, 8, 16)


def scale(seconds: float, config: RingConfig, stack: str | None) -> dict:
    """Cost per delivered message from 3 to 16 members, and where the CPU goes at each size of ring."""
    rows, profiles = [], []
    for members in SCALE_MEMBERS:
        for size in SCALE_SIZES:
            r = throughput(members, size, seconds, config, stack, _SCALE_BACKLOG)
            rows.append(r)
            print(
                f"{members:2d} members, {size:5d} B: {r['ordered_msgs_per_cpu_s']:>7,} ordered msgs/CPU-s, "
                f"{r['cpu_s_per_million_ordered']:>6} CPU-s per M ordered, "
                f"{r['cpu_s_per_million_deliveries']:>5} CPU-s per M deliveries; "
                f"{r['busy_rotations_per_virtual_s']:>5,} rotations/virtual-s, "
                f"{r['msgs_per_token_visit']} msgs per token visit", flush=True)
    for members, size in ((m, s) for m in SCALE_PROFILED for s in SCALE_SIZES):
        p = profile(members, size, seconds, config, stack, _SCALE_BACKLOG)
        profiles.append(p)
        print(f"profile {members:2d} members, {size:5d} B: C core {p['c_core_share']:.0%} "
              f"({p['c_core_us_per_delivery']} µs per delivery), Ring.take "
              f"{p['ring_take_python_share']:.0%}, simulator Python {p['simulator_python_share']:.0%}, "
              f"layers Python {p['layers_python_share']:.0%}; top: "
              + "; ".join(p["top_functions_by_self_time"][:4]), flush=True)
    return {"throughput": rows, "profiles": profiles}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="virtual seconds per throughput run")
    parser.add_argument("--mtu", type=int, default=1400)
    parser.add_argument("--stack", default=None, help="run the throughput through these production layers (e.g. sim)")
    parser.add_argument("--scale", action="store_true", help="only the scale table: 3..16 members (see the doc)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    config = RingConfig(mtu=args.mtu)
    if args.scale:
        results = {"mtu": args.mtu, "stack": args.stack, "scale": scale(args.seconds, config, args.stack)}
        if args.json:
            print(json.dumps(results))
        return
    results: dict = {"mtu": args.mtu, "stack": args.stack, "throughput": [], "idle": [], "failover": [],
                     "profile": None}
    for members in (3, 8):
        for size in (100, 1024):
            r = throughput(members, size, args.seconds, config, args.stack)
            results["throughput"].append(r)
            print(
                f"{members} members, {size:5d} B: {r['ordered_msgs_per_cpu_s']:>9,} ordered msgs/CPU-s "
                f"({r['deliveries_per_cpu_s']:,} deliveries/CPU-s over all members); "
                f"{r['busy_rotations_per_virtual_s']:,} rotations/virtual-s busy, {r['msgs_per_rotation']} msgs/rotation",
                flush=True,
            )
    for members in (3, 8):
        r = idle_rotations(members, config)
        results["idle"].append(r)
        print(
            f"{members} members idle: {r['idle_rotations_per_s']} rotations/s, "
            f"{r['idle_packets_per_s_cluster']} packets/s for the whole cluster, "
            f"{r['cpu_us_per_idle_virtual_s']} µs CPU per virtual second (core + simulator)"
        )
    for members in (3, 8):
        r = failover(members, range(10))
        results["failover"].append(r)
        print(
            f"{members} members, crash -> new regular configuration (virtual, default timers, 10 seeds): "
            f"min {r['crash_to_view_s_min']} s, median {r['median']} s, max {r['max']} s "
            f"(bound token + consensus + 50 ms = {r['bound_token_plus_consensus_plus_50ms']} s)"
        )
    p = profile(3, 100, args.seconds, config, args.stack)
    results["profile"] = p
    print(
        f"profile (3 members, 100 B): C core {p['c_core_share']:.0%} of CPU, "
        f"Ring.take (copying outputs into Python objects) {p['ring_take_python_share']:.0%}, "
        f"simulator Python {p['simulator_python_share']:.0%}"
    )
    for line in p["top_functions_by_self_time"]:
        print("   ", line)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
