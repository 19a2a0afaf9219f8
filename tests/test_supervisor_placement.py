"""Placement of cluster-placed processes: the domain controller's host and replicas (pure functions)."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, strategies as st

from groupcomm.services.supervisor.placement import dc_host, replica_hosts

nodes = st.lists(st.integers(1, 2**32 - 1), min_size=0, max_size=12, unique=True)


def test_the_dc_runs_on_the_longest_standing_eligible_member_of_a_primary_view():
    assert dc_host((30, 10, 20), None, primary=True) == 30            # oldest first, not lowest id
    assert dc_host((30, 10, 20), {10, 20}, primary=True) == 10
    assert dc_host((30, 10, 20), {99}, primary=True) is None
    assert dc_host((30, 10, 20), None, primary=False) is None          # never outside a primary view
    assert dc_host((), None, primary=True) is None


@given(members=nodes, data=st.data())
def test_every_member_computes_the_same_dc_and_it_is_eligible(members, data):
    eligible = set(data.draw(st.lists(st.sampled_from(members), unique=True))) if members else set()
    host = dc_host(members, eligible, primary=True)
    assert host == dc_host(list(members), frozenset(eligible), primary=True)
    assert host is None if not eligible else host in eligible and host == next(m for m in members if m in eligible)


def test_replicas_go_to_n_eligible_members_and_nowhere_outside_a_primary_view():
    hosts = replica_hosts("web", [1, 2, 3, 4, 5], None, 3, primary=True)
    assert len(hosts) == 3 and len(set(hosts)) == 3 and set(hosts) <= {1, 2, 3, 4, 5}
    assert set(replica_hosts("web", [1, 2, 3, 4, 5], {2, 4}, 3, primary=True)) == {2, 4}   # fewer if fewer eligible
    assert replica_hosts("web", [1, 2, 3], None, 2, primary=False) == ()
    with pytest.raises(ValueError, match="replicas"):
        replica_hosts("web", [1], None, 0, primary=True)


@given(members=nodes, replicas=st.integers(1, 6), order=st.randoms(use_true_random=False))
def test_replica_placement_does_not_depend_on_the_order_members_are_listed(members, replicas, order):
    shuffled = list(members)
    order.shuffle(shuffled)
    assert set(replica_hosts("db", members, None, replicas, primary=True)) == \
        set(replica_hosts("db", shuffled, None, replicas, primary=True))


@given(members=nodes.filter(lambda m: len(m) >= 2), replicas=st.integers(1, 6), data=st.data())
def test_a_member_leaving_moves_only_its_own_instances(members, replicas, data):
    gone = data.draw(st.sampled_from(members))
    before = set(replica_hosts("db", members, None, replicas, primary=True))
    after = set(replica_hosts("db", [m for m in members if m != gone], None, replicas, primary=True))
    assert before - {gone} <= after                      # every instance not on the leaver stays put
    assert len(after - before) <= (1 if gone in before else 0)


@given(members=nodes, replicas=st.integers(1, 6), newcomer=st.integers(1, 2**32 - 1))
def test_a_member_joining_takes_over_at_most_one_instance(members, replicas, newcomer):
    assume(newcomer not in members)
    before = set(replica_hosts("db", members, None, replicas, primary=True))
    after = set(replica_hosts("db", [*members, newcomer], None, replicas, primary=True))
    assert after - before <= {newcomer} and len(before - after) <= 1
