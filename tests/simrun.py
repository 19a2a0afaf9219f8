"""Apply a fault schedule to a SimCluster (shared by tests and benchmarks)."""

from __future__ import annotations

from hypothesis import currently_in_test_context, event

from groupcomm.errors import LocalProtocolError
from groupcomm.core.ring import RingConfig
from groupcomm.testing import SimCluster


def apply(sim: SimCluster, plan, big_every: int = 0) -> None:
    """Run the steps; with ``big_every`` every n-th message is large (several fragments).

    Reports what the schedule exercised as Hypothesis events (see
    ``pytest --hypothesis-show-statistics``): how many sends were accepted, and
    whether traffic met a partition, a crash or a lossy network.
    """
    counter = accepted = big = 0
    faults: set[str] = set()
    traffic_in_fault: set[str] = set()
    for step in plan:
        kind, args = step.kind, step.args
        if kind == "warm":
            sim.run_until(sim.converged, timeout=10)
        elif kind == "send":
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
                accepted += 1
                big += len(payload) > 2000
                traffic_in_fault |= faults
        elif kind == "run":
            sim.run(args[0])
        elif kind == "crash":
            if args[0] in sim.live and len(sim.live) > 1:
                sim.crash(args[0])
                faults.add("crash")
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
            if len(groups) > 1:
                faults.add("partition")
        elif kind == "cut":
            src, dest, multicast_only = args
            if src != dest:
                sim.cut(src, dest, multicast_only=multicast_only)
                faults.add("one-way link")
        elif kind == "heal":
            sim.heal()
            faults.discard("partition")
            faults.discard("one-way link")
        elif kind == "network":
            loss, dup, reorder = args
            sim.set_network(loss=loss, duplicate=dup, reorder=reorder)
            faults.discard("loss")
            if loss or dup:
                faults.add("loss")
        else:  # pragma: no cover
            raise ValueError(kind)
    if currently_in_test_context():              # replayed regression schedules run outside Hypothesis
        event(f"sends accepted: {'none' if not accepted else '1-9' if accepted < 10 else '10+'}")
        if big_every:
            event(f"fragmented messages: {'none' if not big else 'some'}")
        for fault in ("partition", "one-way link", "crash", "loss"):
            event(f"traffic during {fault}: {'yes' if fault in traffic_in_fault else 'no'}")


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
