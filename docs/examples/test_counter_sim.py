"""Tutorial, step 3: the counter under SimCluster, with partitions and crashes.

The same :class:`Counter` runs on simulated members (the production layers
over a deterministic network, in virtual time); Hypothesis draws the faults.
Run it with ``python -m pytest docs/examples/test_counter_sim.py``.
"""

from __future__ import annotations

from counter import Counter
from hypothesis import given, settings
from hypothesis import strategies as st

import groupcomm
from groupcomm.layers.spaces import SpaceMessage
from groupcomm.testing import SimCluster

SPACE = "counter"


class SimCounters:
    """The application of every simulated member: one Counter each, in the space ``counter``.

    Increments are refused outside a primary view, so the sides of a
    partition cannot both count; after the partition heals, the members of
    the non-primary side fetch the primary side's state.
    """

    def __init__(self, sim: SimCluster) -> None:
        self.sim = sim
        self.counters = {node: Counter() for node in sim.nodes}
        self.primary = dict.fromkeys(sim.nodes, False)
        self.joined: set[int] = set()
        self.accepted = 0
        for node in sim.nodes:
            sim.services.state_provider(node, SPACE, lambda node=node: self.counters[node].snapshot())
            sim.services.state_receiver(node, SPACE, lambda state, node=node: self.counters[node].restore(state))
        sim.services.add_observer(self._observe)

    def _observe(self, node: int, event: object) -> None:
        if isinstance(event, groupcomm.View) and not event.transitional:
            self.primary[node] = event.primary
        elif isinstance(event, SpaceMessage) and event.space == SPACE:
            self.counters[node].apply(event.message.payload)

    def join(self, node: int) -> None:
        self.sim.services.join(node, SPACE)
        self.joined.add(node)

    def add(self, node: int) -> bool:
        """Add 1 at ``node`` if it may write: it is in the space and in a primary view."""
        if node not in self.joined or not self.primary[node]:
            return False
        self.sim.services.send(node, SPACE, b"1", safe=True)
        self.accepted += 1
        return True

    def crash(self, node: int) -> None:
        self.sim.crash(node)                 # the process dies with its state
        self.counters[node] = Counter()
        self.primary[node] = False
        self.joined.discard(node)

    def values(self) -> dict[int, int]:
        return {node: self.counters[node].value for node in sorted(self.joined)}


def start(nodes: int = 4, seed: int = 0) -> tuple[SimCluster, SimCounters]:
    sim = SimCluster(nodes, seed=seed, stack="sim", quorum=groupcomm.QuorumConfig(expected_votes=nodes))
    app = SimCounters(sim)
    assert sim.run_until(sim.converged, timeout=10), "no ring formed"
    for node in sim.nodes:
        app.join(node)
    sim.run(0.3)
    return sim, app


def test_a_member_that_restarts_gets_the_count() -> None:
    sim, app = start()
    for _ in range(5):
        assert app.add(1)
    sim.run(0.5)
    assert app.values() == {1: 5, 2: 5, 3: 5, 4: 5}
    app.crash(4)
    sim.run(0.5)
    sim.restart(4)
    assert sim.run_until(sim.converged, timeout=10)
    app.join(4)
    sim.run(0.5)
    assert app.values() == {1: 5, 2: 5, 3: 5, 4: 5}      # 4 got a snapshot, not a replay


def test_the_minority_side_cannot_count_and_adopts_the_majority_state() -> None:
    sim, app = start()
    sim.partition([{1, 2, 3}, {4}])
    assert sim.run_until(lambda: not app.primary[4] and app.primary[1], timeout=10)
    assert app.add(1) and not app.add(4)
    sim.run(0.5)
    sim.heal()
    assert sim.run_until(sim.converged, timeout=20)
    sim.run(1.0)
    assert app.values() == {1: 1, 2: 1, 3: 1, 4: 1}


operations = st.lists(
    st.tuples(st.sampled_from(["add", "add", "partition", "heal", "crash", "restart", "join"]),
              st.integers(1, 4), st.integers(0, 9)),
    min_size=3, max_size=15,
)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), ops=operations)
def test_replicas_agree_after_any_partitions_and_crashes(seed: int, ops: list) -> None:
    sim, app = start(seed=seed)
    for op, node, arg in ops:
        live = node in sim.live
        if op == "add" and live:
            app.add(node)
        elif op == "partition":
            cut = 1 + arg % 3                       # {1..cut} | {cut+1..4}
            sim.partition([[n for n in sim.nodes if n <= cut], [n for n in sim.nodes if n > cut]])
        elif op == "heal":
            sim.heal()
        elif op == "crash" and live and len(sim.live) > 1:
            app.crash(node)
        elif op == "restart" and not live:
            sim.restart(node)
        elif op == "join" and live and node not in app.joined:
            app.join(node)
        sim.run(0.05 + arg / 20)
    # Heal everything, bring every member back into the space, let it settle.
    sim.heal()
    for node in sim.nodes:
        if node not in sim.live:
            sim.restart(node)
    assert sim.run_until(sim.converged, timeout=sim.settle_time)
    for node in sim.nodes:
        if node not in app.joined:
            app.join(node)
    sim.run(2.0)
    values = app.values()
    assert len(set(values.values())) == 1, values        # every replica holds the same count
    assert 0 <= values[1] <= app.accepted                # and never counts what nobody added
