"""Which state of a space survives a merge, and who takes over when the holders go.

Direct, deterministic scenarios (seeded SimCluster, virtual time) for the rule
of docs/spaces.rst, "Which state survives a merge": the source is the member
whose complete state has the most recent epoch, whatever the ``Merge`` ranking
says; on a tie a current state goes before one kept by a member that was
fetching; when every holder goes the most recent kept state takes over; with no
complete state anywhere a primary view starts the space over, a non-primary
one waits; a space first joined during a merge starts from nothing.

Writes made outside a primary view go through ``sim.services.send`` directly
(the :class:`ReplicatedDict` refuses them): they change a state without
changing its epoch, so which copy wins becomes visible in the replicas.
"""

from __future__ import annotations

import json

import pytest

from groupcomm.events import View
from groupcomm.layers.spaces import Merge, StateInstalled, StateRequest
from groupcomm.testing import SimCluster
from tests.test_spaces_sim import (
    ReplicatedDict,
    Trigger,
    check_views_agree,
    cluster,
    last_view,
    merges_seen,
    space_messages,
)


def installs(sim: SimCluster, node: int, space: str = "kv") -> list[bytes | None]:
    """The states ``node``'s receiver was given for ``space``, in order."""
    return [e.state for e in sim.services.events(node, space) if type(e) is StateInstalled]


class Installs:
    """The states each member's receiver is given from now on."""

    def __init__(self, sim: SimCluster, space: str = "kv") -> None:
        self.sim, self.space = sim, space
        self.start = {n: len(installs(sim, n, space)) for n in sim.nodes}

    def __getitem__(self, node: int) -> list[bytes | None]:
        return installs(self.sim, node, self.space)[self.start[node]:]


def views_are(sim: SimCluster, *groups: tuple[int, ...]) -> bool:
    return all(sim.view(n) is not None and sim.view(n).members == g for g in groups for n in g)


def split(sim: SimCluster, *groups: tuple[int, ...], timeout: float = 20) -> None:
    """Partition into ``groups`` and wait until every member's ring view is its group."""
    sim.partition([list(g) for g in groups])
    assert sim.run_until(lambda: views_are(sim, *groups), timeout=timeout), [sim.view(n) for n in sim.live]


def raw_write(sim: SimCluster, node: int, key: str, value: str) -> None:
    """An update sent whatever the view (outside a primary one it leaves the epoch as it is)."""
    sim.services.send(node, "kv", f"{key}={value}".encode(), safe=True)


def test_the_most_recent_state_wins_over_the_side_the_merge_ranks_first() -> None:
    # 1 and 4 hold "kv".  1 writes b in the primary {1, 2, 3}; 4 is cut off with the older state.
    # 2 is later primary with 3 and 5 (no "kv" there), then merges with 4: the side {2, 4} was
    # primary more recently than 1, so Merge ranks it first, but its copy of "kv" is older.
    sim = cluster(5)
    kv = ReplicatedDict(sim)
    for n in (1, 4):
        sim.services.join(n, "kv")
    sim.run(0.3)
    assert kv.write(1, "a", "1")
    sim.run(0.3)
    split(sim, (1, 2, 3), (4, 5))
    assert sim.run_until(lambda: kv.primary[1], timeout=10) and kv.write(1, "b", "2")
    sim.run(0.3)
    split(sim, (1,), (2, 3, 5), (4,))
    split(sim, (1,), (2, 4), (3, 5))
    sim.run(0.5)
    assert kv.data[1] == {"a": "1", "b": "2"} and kv.data[4] == {"a": "1"}
    merges, got = merges_seen(sim), Installs(sim)
    split(sim, (1, 2, 4), (3, 5))
    assert sim.run_until(lambda: kv.data[4] == {"a": "1", "b": "2"}, timeout=20), kv.data
    sim.run(0.5)
    assert {(m.components, m.primary) for m in merges} == {(((2, 4), (1,)), (2, 4))}   # the ranking disagrees
    assert kv.data[1] == kv.data[4] == {"a": "1", "b": "2"}
    assert got[1] == []                                            # 1 kept its state: no snapshot
    assert [json.loads(s) for s in got[4]] == [{"a": "1", "b": "2"}]
    epoch = sim.ring(1).member.spaces.state_epoch("kv")
    assert epoch == sim.ring(4).member.spaces.state_epoch("kv") == sim.view(1).ring_id   # a primary view now
    assert kv.write(4, "c", "3")
    sim.run(0.3)
    assert kv.data[1] == kv.data[4] == {"a": "1", "b": "2", "c": "3"}
    check_views_agree(sim)


def test_on_an_epoch_tie_a_current_state_goes_before_one_kept_while_fetching() -> None:
    # Nobody is primary after the first write (expected votes 4 of 3 members present).  3 adds y
    # outside a primary view: same epoch, newer content.  2 loses a merge to 1 and is fetching
    # 1's copy when 1 is cut off and 3 merges in: 2 offers the state it kept, 3 its current one.
    sim = cluster(3, expected=4)
    kv = ReplicatedDict(sim)
    for n in (1, 2, 3):
        sim.services.join(n, "kv")
    sim.run(0.3)
    assert kv.write(1, "a", "1")
    sim.run(0.3)
    split(sim, (1,), (2,), (3,))
    raw_write(sim, 3, "y", "3")
    sim.run(0.3)
    assert kv.data[3] == {"a": "1", "y": "3"}
    fetching: list[bool] = []

    def cut(node: int) -> None:                                    # 2 was told to fetch 1's copy
        fetching.append(not sim.ring(2).member.spaces.holds_state("kv") and sim.ring(2).member.spaces.has_state("kv"))
        sim.partition([[1], [2, 3]])

    trigger, got = Trigger(sim), Installs(sim)
    trigger.arm(Merge, cut, node=2)
    sim.partition([[1, 2], [3]])
    assert sim.run_until(lambda: trigger.fired, timeout=20)
    assert fetching == [True]                                      # 2 keeps {a} while it fetches
    assert sim.run_until(lambda: views_are(sim, (1,), (2, 3)), timeout=20)
    assert sim.run_until(lambda: kv.data[2] == {"a": "1", "y": "3"}, timeout=20), kv.data
    sim.run(0.5)
    assert kv.data[2] == kv.data[3] == {"a": "1", "y": "3"}
    assert got[3] == []                                            # 3's current state is the source
    assert [json.loads(s) for s in got[2]] == [{"a": "1", "y": "3"}]   # 1's copy never arrived
    check_views_agree(sim)


def test_a_member_cut_off_mid_transfer_whose_kept_state_is_newest_is_the_source() -> None:
    # 1 and 2 hold "kv" as of the primary {1, 2, 4} (a, b); 3 has only a.  2 loses the merge
    # with 1 (a tie: 1 has the lower id) and is fetching when 1 is cut off and 3 merges in.  2's
    # kept state is the newest: 2 stops fetching and keeps it, 3 copies it, later updates reach both.
    sim = cluster(4)
    kv = ReplicatedDict(sim)
    for n in (1, 2, 3):
        sim.services.join(n, "kv")
    sim.run(0.3)
    assert kv.write(1, "a", "1")
    sim.run(0.3)
    split(sim, (1, 2, 4), (3,))
    assert sim.run_until(lambda: kv.primary[1], timeout=10) and kv.write(1, "b", "2")
    sim.run(0.3)
    split(sim, (1,), (2,), (3,), (4,))
    fetching: list[bool] = []

    def cut(node: int) -> None:
        fetching.append(not sim.ring(2).member.spaces.holds_state("kv") and sim.ring(2).member.spaces.has_state("kv"))
        sim.partition([[1], [2, 3], [4]])

    trigger, got = Trigger(sim), Installs(sim)
    trigger.arm(Merge, cut, node=2)
    sim.partition([[1, 2], [3], [4]])
    assert sim.run_until(lambda: trigger.fired, timeout=20)
    assert fetching == [True]
    assert sim.run_until(lambda: views_are(sim, (1,), (2, 3), (4,)), timeout=20)
    assert sim.run_until(lambda: kv.data[3] == {"a": "1", "b": "2"}, timeout=20), kv.data
    sim.run(0.5)
    assert kv.data[2] == {"a": "1", "b": "2"} and got[2] == []
    assert [json.loads(s) for s in got[3]] == [{"a": "1", "b": "2"}]
    assert sim.ring(2).member.spaces.holds_state("kv") and sim.ring(3).member.spaces.holds_state("kv")
    raw_write(sim, 3, "z", "9")                                    # 2 no longer waits for a snapshot
    raw_write(sim, 2, "w", "8")
    sim.run(0.5)
    assert kv.data[2] == kv.data[3] == {"a": "1", "b": "2", "z": "9", "w": "8"}
    check_views_agree(sim)


@pytest.mark.parametrize("primary", [False, True], ids=["in-a-minority", "in-a-primary-view"])
@pytest.mark.parametrize("newer", [2, 3])
def test_when_the_holder_goes_mid_transfer_the_most_recent_kept_state_takes_over(newer: int, primary: bool) -> None:
    # 1 holds the newest "kv" (a, b, c); ``newer`` kept an older one (a, b), ``older`` the oldest (a).
    # They merge, 1 is the source, and goes once both were told to fetch its copy, before it
    # arrives: ``newer``'s state takes over (whatever the ids or the order of the members).
    older = 5 - newer
    sim = cluster(5)
    kv = ReplicatedDict(sim)
    for n in (1, 2, 3):
        sim.services.join(n, "kv")
    sim.run(0.3)
    assert kv.write(1, "a", "1")
    sim.run(0.3)
    split(sim, (1, newer, 4), (older, 5))
    assert sim.run_until(lambda: kv.primary[1], timeout=10) and kv.write(1, "b", "2")
    sim.run(0.3)
    kept_epoch = sim.ring(newer).member.spaces.state_epoch("kv")
    assert kept_epoch == sim.view(newer).ring_id
    split(sim, (1, 4, 5), (2,), (3,))
    big = "c" * 500_000                           # 1's snapshot takes a while to stream
    assert sim.run_until(lambda: kv.primary[1], timeout=10) and kv.write(1, "c", big)
    sim.run(0.5)
    assert (kv.data[1], kv.data[newer], kv.data[older]) == ({"a": "1", "b": "2", "c": big}, {"a": "1", "b": "2"},
                                                            {"a": "1"})
    got, merged, fetching = Installs(sim), set(), []

    def strike(node: int, event) -> None:
        if type(event) is Merge and node in (2, 3) and not fetching:
            merged.add(node)
            if merged == {2, 3}:                 # both were told to fetch 1's copy: 1 goes
                fetching.extend(n for n in (2, 3) if not sim.ring(n).member.spaces.holds_state("kv"))
                sim.partition([[1], [2, 3, 4, 5]] if primary else [[1], [2, 3], [4, 5]])

    sim.services.add_observer(strike)
    if primary:
        sim.heal()                            # then 1 goes alone: a view that only loses it
    else:
        sim.partition([[1, 2, 3], [4, 5]])
    rest = (2, 3, 4, 5) if primary else (2, 3)
    assert sim.run_until(lambda: fetching, timeout=20) and fetching == [2, 3]
    assert sim.run_until(lambda: views_are(sim, rest), timeout=20)
    sim.run(1.0)
    assert got[newer] == [] and sim.ring(newer).member.spaces.holds_state("kv")
    assert kv.data[2] == kv.data[3] == {"a": "1", "b": "2"}, kv.data
    assert [json.loads(s) for s in got[older]] == [{"a": "1", "b": "2"}]
    # The state taken over keeps its epoch in a minority; a primary view makes it its own.
    expected = sim.view(2).ring_id if primary else kept_epoch
    assert sim.ring(2).member.spaces.state_epoch("kv") == sim.ring(3).member.spaces.state_epoch("kv") == expected
    check_views_agree(sim)


def cut_off_joiners(sim: SimCluster, kv: ReplicatedDict) -> None:
    """1 holds "kv" = {a}; 2 and 3 join and are cut off alone before a snapshot reaches them."""
    sim.services.join(1, "kv")
    sim.run(0.3)
    assert kv.write(1, "a", "1")
    sim.run(0.3)
    trigger = Trigger(sim)
    for joiner, groups in ((2, ((1, 3, 4, 5), (2,))), (3, ((1, 4, 5), (2,), (3,)))):
        trigger.arm(StateRequest, lambda node, groups=groups: sim.partition([list(g) for g in groups]), node=1)
        sim.services.join(joiner, "kv")
        assert sim.run_until(lambda: trigger.fired, timeout=5)
        assert sim.run_until(lambda groups=groups: views_are(sim, *groups), timeout=20)
        trigger.fired = 0
    sim.run(1.0)
    assert not any(sim.ring(n).member.spaces.has_state("kv") for n in (2, 3))
    assert installs(sim, 2) == installs(sim, 3) == []


def test_members_without_any_state_merging_in_a_minority_wait_for_it() -> None:
    sim = cluster(5)
    kv = ReplicatedDict(sim)
    cut_off_joiners(sim, kv)
    split(sim, (1, 4, 5), (2, 3))                 # a merge where nobody has the state: not primary
    sim.run(1.0)
    assert [set(sim.ring(n).member.spaces.spaces["kv"]) for n in (2, 3)] == [{2, 3}, {2, 3}]
    assert installs(sim, 2) == installs(sim, 3) == []        # no "nobody has state": they wait
    assert not any(sim.ring(n).member.spaces.holds_state("kv") for n in (2, 3))
    assert [sim.ring(n).member.spaces.state_epoch("kv") for n in (2, 3)] == [None, None]
    assert kv.write(1, "b", "2")
    sim.run(0.5)
    assert kv.data[2] == kv.data[3] == {}
    sim.heal()
    assert sim.run_until(lambda: kv.data[2] == kv.data[3] == {"a": "1", "b": "2"}, timeout=20), kv.data
    assert [len(installs(sim, n)) for n in (2, 3)] == [1, 1] and installs(sim, 2)[0] is not None
    check_views_agree(sim)


def test_members_without_any_state_merging_into_a_primary_view_start_the_space_over() -> None:
    sim = cluster(5)
    kv = ReplicatedDict(sim)
    cut_off_joiners(sim, kv)
    split(sim, (1,), (2, 3, 4, 5))                # primary, and nobody there has the state
    sim.run(1.0)
    assert installs(sim, 2) == installs(sim, 3) == [None]
    assert all(sim.ring(n).member.spaces.holds_state("kv") for n in (2, 3))
    assert sim.ring(2).member.spaces.state_epoch("kv") == sim.view(2).ring_id
    assert kv.write(3, "new", "1")
    sim.run(0.5)
    assert kv.data[2] == kv.data[3] == {"new": "1"}
    sim.heal()                                    # that state wins: it is the most recent
    assert sim.run_until(lambda: kv.data[1] == {"new": "1"}, timeout=20), kv.data
    check_views_agree(sim)


def join_during_the_merge(sim: SimCluster, watcher: int, joiner: int) -> None:
    """``joiner`` joins "new" once ``watcher`` has seen the next configuration but before ``joiner``
    has: its claim in the merge's SYNC names the space that nobody has yet."""
    trigger, behind = Trigger(sim), []

    def join(node: int) -> None:
        behind.append(sim.view(joiner).ring_id != trigger.last.ring_id)
        sim.services.join(joiner, "new")

    trigger.arm(View, join, node=watcher)
    sim.heal()
    assert sim.run_until(lambda: trigger.fired, timeout=20)
    assert behind == [True]                       # the joiner has not seen the new configuration yet
    assert sim.run_until(sim.converged, timeout=20)
    sim.run(0.5)


@pytest.mark.parametrize("primary", [False, True])
def test_a_space_first_joined_during_a_merge_starts_from_nothing(primary: bool) -> None:
    sim = cluster(3, expected=3 if primary else 7)
    split(sim, (1,), (2, 3))
    join_during_the_merge(sim, watcher=2, joiner=1)
    spaces = sim.ring(1).member.spaces
    assert last_view(sim, 1, "new").members == (1,) and spaces.holds_state("new")
    assert installs(sim, 1, "new") == []          # the first member of a new space gets no state
    assert spaces.state_epoch("new") == (sim.view(1).ring_id if primary else None)
    sim.services.send(1, "new", b"first")
    sim.run(0.3)
    assert space_messages(sim, 1, "new") == [b"first"]
    sim.services.state_provider(1, "new", lambda: b"since the merge")
    sim.services.join(2, "new")
    sim.run(0.5)
    assert installs(sim, 2, "new") == [b"since the merge"]
    check_views_agree(sim)
