"""The ``groupcomm`` command line.

- ``groupcomm demo``: real member processes on loopback, narrated (views, an
  ordered stream with agreement checked, kill -9, restart and merge).
- ``groupcomm simulate``: real ring cores on the simulated network in virtual
  time: a crash, a partition, the heal and the merge, then the EVS check.
- ``groupcomm node``: one member; ``groupcomm probe``: ask members for counters.
"""

from __future__ import annotations

import argparse
import json
import sys

from groupcomm.events import Configuration, Crashed, Delivery, Event
from groupcomm.testing import SimCluster


def _describe(node: int, event: Event, now: float) -> str:
    if isinstance(event, Configuration):
        kind = "transitional" if event.transitional else "regular view"
        return f"[{now:8.3f}s] node {node}: {kind} {event.ring_id} members={list(event.members)}"
    if isinstance(event, Delivery):
        mode = "safe" if event.safe else "agreed"
        return f"[{now:8.3f}s] node {node}: deliver {mode} from {event.sender}: {event.payload.decode(errors='replace')}"
    assert isinstance(event, Crashed)
    return f"[{now:8.3f}s] node {node}: CRASHED"


def simulate(nodes: int, seed: int, loss: float, verbose: bool) -> int:
    sim = SimCluster(nodes=nodes, seed=seed)
    shown = {"views": 0}

    def show(node: int, event: Event) -> None:
        if isinstance(event, Configuration) and not event.transitional:
            shown["views"] += 1
        if verbose or not isinstance(event, Delivery):
            print(_describe(node, event, sim.now))

    sim.add_observer(show)
    print(f"== {nodes} members start on a simulated network (seed {seed}, loss {loss:.0%})")
    sim.set_network(loss=loss)
    sim.run(0.5)
    print("== every member sends 5 messages, some safe")
    for i in range(5):
        for n in sim.nodes:
            sim.send(n, f"msg {i} from {n}".encode(), safe=(i % 2 == 1))
    sim.run(0.5)
    _print_orders(sim)
    victim = sim.nodes[-1]
    print(f"== crash node {victim}")
    t0 = sim.now
    sim.crash(victim)
    sim.run_until(sim.converged, 10)
    print(f"   new view after {sim.now - t0:.3f}s of virtual time")
    if nodes >= 3:
        left = set(sim.live[: len(sim.live) // 2])
        right = set(sim.live) - left
        print(f"== partition {sorted(left)} | {sorted(right)}; both sides keep sending")
        sim.partition([left, right])
        for n in sim.live:
            sim.send(n, f"during partition from {n}".encode())
        sim.run(3.0)
    print(f"== heal, restart node {victim}")
    sim.heal()
    sim.restart(victim)
    t0 = sim.now
    sim.run_until(sim.converged, 20)
    print(f"   merged into one view after {sim.now - t0:.3f}s")
    sim.set_network()
    sim.run(sim.settle_time)
    sim.check()
    print(f"== EVS check passed over {sum(len(sim.history(n)) for n in sim.nodes)} events")
    return 0


def _print_orders(sim: SimCluster) -> None:
    orders = {}
    for n in sim.live:
        orders[n] = [e.payload for e in sim.history(n) if isinstance(e, Delivery)]
    same = len({tuple(o) for o in orders.values()}) == 1
    first = next(iter(orders.values()))
    print(f"   {len(first)} messages delivered; identical order at all members: {same}")


def _event_line(event, as_json: bool) -> str:
    from groupcomm.events import Direct, Message, View
    from groupcomm.layers.spaces import Merge

    if isinstance(event, View):
        if as_json:
            return json.dumps({"view": list(event.members), "ring": str(event.ring_id), "transitional": event.transitional})
        kind = "transitional view" if event.transitional else "view"
        return f"{kind} {event.ring_id}: {list(event.members)}"
    if isinstance(event, Merge):
        if as_json:
            return json.dumps({"merge": str(event.ring_id), "components": [list(c) for c in event.components],
                               "primary": list(event.primary), "was_primary": event.was_primary})
        return (f"merge {event.ring_id}: components {[list(c) for c in event.components]}, "
                f"{'primary' if event.was_primary else 'winning'} side {list(event.primary)}")
    if isinstance(event, Direct):
        if as_json:
            return json.dumps({"direct_from": event.sender, "msg": event.payload.decode(errors="replace")})
        return f"{event.sender} (direct): {event.payload.decode(errors='replace')}"
    assert isinstance(event, Message), event
    if as_json:
        return json.dumps({"from": event.sender, "msg": event.payload.decode(errors="replace"), "safe": event.safe})
    return f"{event.sender}: {event.payload.decode(errors='replace')}"


def node(args: argparse.Namespace) -> int:
    """Run one member: print events, send every stdin line."""
    import trio

    from groupcomm.io.channel import open_channel
    from groupcomm.layers.fd import FdConfig

    overrides: dict[str, dict] = {"UDP": {}, "TOTEM": {}}
    for flag, layer, key in (("bind", "UDP", "bind_addr"), ("mcast_addr", "UDP", "mcast_addr"),
                             ("mcast_port", "UDP", "mcast_port"), ("ttl", "UDP", "mcast_ttl"),
                             ("token_timeout", "TOTEM", "token_timeout")):
        if getattr(args, flag) is not None:
            overrides[layer][key] = getattr(args, flag)
    if args.token_timeout is not None:
        overrides["TOTEM"].update(join=args.token_timeout / 15, merge=args.token_timeout / 5)
    fd_choice = {"lan": FdConfig(), "loopback": FdConfig.loopback(), "off": None}
    fd_kw = {} if args.fd is None else {"fd": fd_choice[args.fd]}

    async def run() -> None:
        async with open_channel(
            args.stack, cluster=args.cluster, name=args.name, overrides={k: v for k, v in overrides.items() if v}, **fd_kw
        ) as ch:
            print(json.dumps({"address": ch.address}) if args.json else f"joined as {ch.address}", flush=True)

            async def forward_stdin() -> None:
                stdin = trio.wrap_file(sys.stdin)
                async for line in stdin:
                    await ch.send(line.rstrip("\n").encode(), safe=args.safe)

            async with trio.open_nursery() as nursery:
                if not args.no_stdin:
                    nursery.start_soon(forward_stdin)
                async for event in ch.events():
                    print(_event_line(event, args.json), flush=True)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass
    return 0


def probe_command(args: argparse.Namespace) -> int:
    from groupcomm.config import build_stack, load_stack
    from groupcomm.io.channel import cluster_id_for
    from groupcomm.io.probe import format_table, probe

    overrides = {"UDP": {"mcast_port": args.mcast_port}} if args.mcast_port is not None else None
    udp = build_stack(load_stack(args.stack, overrides=overrides)).transport
    reports = probe(cluster_id_for(args.cluster), udp, args.timeout)
    if args.json:
        print(json.dumps(reports))
    elif reports:
        print(format_table(reports))
    else:
        print(f"no member of cluster {args.cluster!r} answered within {args.timeout} s")
    return 0 if reports else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="groupcomm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="a local cluster of real member processes on loopback, narrated")
    p.add_argument("--members", type=int, default=3, help="member processes (2..8, default 3)")
    p.add_argument("--messages", type=int, default=10, help="messages each member sends")
    p = sub.add_parser("simulate", help="a narrated cluster on the simulated network, in virtual time")
    p.add_argument("--nodes", type=int, default=5, help="members (2..32, default 5)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--loss", type=float, default=0.02, help="packet loss probability")
    p.add_argument("-v", "--verbose", action="store_true", help="print every delivery")
    p = sub.add_parser("node", help="run one member on UDP: print events, send stdin lines")
    p.add_argument("--stack", default="udp", help="a shipped stack (udp, loopback) or a .toml path")
    p.add_argument("--cluster", required=True)
    p.add_argument("--name", default=None, help="member name (the node id derives from it)")
    p.add_argument("--bind", default=None, help="local address (overrides the stack's UDP bind_addr)")
    p.add_argument("--mcast-addr", default=None)
    p.add_argument("--mcast-port", type=int, default=None)
    p.add_argument("--ttl", type=int, default=None, help="multicast TTL (0 = this host only)")
    p.add_argument("--token-timeout", type=float, default=None, help="seconds (overrides TOTEM token_timeout)")
    p.add_argument("--fd", choices=("lan", "loopback", "off"), default=None, help="failure detector tuning (default: the stack's)")
    p.add_argument("--safe", action="store_true", help="send stdin lines as safe messages")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--no-stdin", action="store_true")
    p = sub.add_parser("probe", help="ask the running members of a cluster for view and counters")
    p.add_argument("--stack", default="udp")
    p.add_argument("--cluster", required=True)
    p.add_argument("--mcast-port", type=int, default=None)
    p.add_argument("--timeout", type=float, default=1.0, help="seconds to collect answers")
    p.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "node":
        return node(args)
    if args.command == "probe":
        return probe_command(args)
    if args.command == "demo":
        from groupcomm.cli.demo import run_demo

        if not 2 <= args.members <= 8:
            parser.error("--members must be in 2..8")
        return 0 if run_demo(args.members, args.messages) else 1
    if not 2 <= args.nodes <= 32:
        parser.error("--nodes must be in 2..32")
    if not 0 <= args.loss < 1:
        parser.error("--loss must be in [0, 1)")
    return simulate(args.nodes, args.seed, args.loss, args.verbose)

