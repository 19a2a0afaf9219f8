"""Apply a fault schedule to a SimCluster (shared by tests and benchmarks)."""

from __future__ import annotations

from groupcomm.errors import LocalProtocolError
from groupcomm.core.ring import RingConfig
from groupcomm.testing import SimCluster


def apply(sim: SimCluster, plan, big_every: int = 0) -> None:
    """Run the steps; with ``big_every`` every n-th message is large (several fragments)."""
    counter = 0
    for step in plan:
        kind, args = step.kind, step.args
        if kind == "send":
            node, count, safe = args
            for _ in range(count):
                counter += 1
                payload = b"m%d" % counter
                if big_every and counter % big_every == 0:
                    payload += b"." * (2500 + 700 * (counter % 5))
                try:
                    sim.send(node, payload, safe=safe)
                except LocalProtocolError:
                    break                    # crashed or queue full: the schedule goes on
        elif kind == "run":
            sim.run(args[0])
        elif kind == "crash":
            if args[0] in sim.live and len(sim.live) > 1:
                sim.crash(args[0])
        elif kind == "restart":
            if args[0] not in sim.live:
                sim.restart(args[0])
        elif kind == "leave":
            if args[0] in sim.live and len(sim.live) > 1:
                sim.leave(args[0])
        elif kind == "partition":
            groups: dict[int, set[int]] = {}
            for node, g in zip(sim.nodes, args[0]):
                groups.setdefault(g, set()).add(node)
            sim.partition(groups.values())
        elif kind == "heal":
            sim.heal()
        elif kind == "network":
            loss, dup, reorder = args
            sim.set_network(loss=loss, duplicate=dup, reorder=reorder)
        else:  # pragma: no cover
            raise ValueError(kind)


def settle(sim: SimCluster) -> None:
    """Heal everything and wait long enough that EVS's eventual properties must hold."""
    sim.heal()
    sim.set_network()
    sim.run(sim.settle_time)


def run_schedule(n: int, seed: int, plan, config: RingConfig | None = None, stack: str | None = None) -> SimCluster:
    sim = SimCluster(nodes=n, seed=seed, config=config, stack=stack)
    apply(sim, plan, big_every=3 if stack else 0)
    sim.check(settled=False)
    settle(sim)
    sim.check(settled=True)
    return sim
