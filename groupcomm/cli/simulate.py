"""``groupcomm simulate``: real ring cores on the simulated network, in virtual time.

Narrates a crash, a partition, the heal and the merge, then runs the EVS check.
"""

from __future__ import annotations

import argparse
from typing import Any

from groupcomm.cli.errors import EXIT_OK, UsageError
from groupcomm.events import Configuration, Crashed, Delivery, Event

__all__ = ["add_parser", "run", "simulate"]


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "simulate", help="a narrated cluster on the simulated network, in virtual time",
        description="Run members on the deterministic simulated network: a crash, a partition, "
                    "the heal and the merge, then the EVS check.",
    )
    p.add_argument("--nodes", type=int, default=5, help="members (2..32, default 5)")
    p.add_argument("--seed", type=int, default=1, help="random seed of the simulated network (default 1)")
    p.add_argument("--loss", type=float, default=0.02, help="packet loss probability (default 0.02)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every delivery")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not 2 <= args.nodes <= 32:
        raise UsageError("--nodes must be in 2..32")
    if not 0 <= args.loss < 1:
        raise UsageError("--loss must be in [0, 1)")
    simulate(args.nodes, args.seed, args.loss, args.verbose)
    return EXIT_OK


def _describe(node: int, event: Event, now: float) -> str:
    if isinstance(event, Configuration):
        kind = "transitional" if event.transitional else "regular view"
        return f"[{now:8.3f}s] node {node}: {kind} {event.ring_id} members={list(event.members)}"
    if isinstance(event, Delivery):
        mode = "safe" if event.safe else "agreed"
        return f"[{now:8.3f}s] node {node}: deliver {mode} from {event.sender}: {event.payload.decode(errors='replace')}"
    assert isinstance(event, Crashed)
    return f"[{now:8.3f}s] node {node}: CRASHED"


def simulate(nodes: int, seed: int, loss: float, verbose: bool) -> None:
    """Narrate the scenario on stdout; raises EVSViolation if the check fails."""
    from groupcomm.testing import SimCluster

    sim = SimCluster(nodes=nodes, seed=seed)

    def show(node: int, event: Event) -> None:
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


def _print_orders(sim: Any) -> None:
    orders = {n: [e.payload for e in sim.history(n) if isinstance(e, Delivery)] for n in sim.live}
    same = len({tuple(o) for o in orders.values()}) == 1
    first = next(iter(orders.values()))
    print(f"   {len(first)} messages delivered; identical order at all members: {same}")
