"""The simulated network's faults do what they say: one-way cuts, partly deaf members, heal."""

from __future__ import annotations

import pytest

from groupcomm.errors import ConfigError
from groupcomm.events import Configuration, Delivery
from groupcomm.testing import SimCluster


def regular_views(sim: SimCluster, node: int) -> list[tuple[int, ...]]:
    return [e.members for e in sim.history(node) if isinstance(e, Configuration) and not e.transitional]


def formed(n: int = 3, seed: int = 1) -> SimCluster:
    sim = SimCluster(n, seed=seed)
    assert sim.run_until(sim.converged, timeout=10)
    return sim


def test_a_cut_is_one_way():
    sim = formed()
    sim.cut(1, 2)
    assert not sim._connected(1, 2) and sim._connected(2, 1) and sim._connected(1, 3)


def test_a_multicast_only_cut_keeps_point_to_point_packets():
    sim = formed()
    sim.cut(1, 2, multicast_only=True)
    assert not sim._connected(1, 2, multicast=True)
    assert sim._connected(1, 2, multicast=False)


def test_a_member_that_never_hears_another_is_excluded_and_heal_merges_it_back():
    sim = formed(3)
    sim.cut(2, 3)                      # 3 never hears 2; 2 hears 3
    sim.run(10.0)
    last = regular_views(sim, 1)[-1]
    assert len(last) == 2 and 1 in last
    sim.heal()
    assert sim.run_until(sim.converged, timeout=20)
    assert regular_views(sim, 1)[-1] == (1, 2, 3)
    sim.run(sim.settle_time)
    sim.check(settled=True)


def test_heal_repairs_cuts_and_the_run_counts_as_settled_only_after():
    sim = formed()
    sim.cut(1, 3)
    sim.run(sim.settle_time)
    assert not sim.settled()
    sim.heal()
    sim.run(sim.settle_time)
    assert sim.settled()


def test_a_partly_deaf_member_keeps_the_token_moving():
    sim = formed(3)
    sim.cut(1, 3, multicast_only=True)  # 3 misses 1's multicasts, not the token
    for i in range(20):
        sim.send(1, b"m%d" % i)
    sim.run(1.0)
    assert regular_views(sim, 1) == [(1, 2, 3)]          # the ring did not break at once
    assert [e.payload for e in sim.history(2) if isinstance(e, Delivery)] == [b"m%d" % i for i in range(20)]
    sim.heal()
    sim.run(sim.settle_time)
    sim.check(settled=True)


def test_a_cut_needs_two_known_nodes():
    sim = formed()
    with pytest.raises(ConfigError):
        sim.cut(1, 1)
    with pytest.raises(Exception, match="no node 9"):
        sim.cut(1, 9)
