"""Exactly one domain controller, proven in simulation (issue 11, item 3-4 and the proof).

Supervisors run the real NodeCore on SimCluster's real layers; processes are
simulated (groupcomm.services.supervisor.sim): they start and stop after random
latencies, may hang on their stop signal, die with their node and when their
lease lapses.  Every process instance is recorded with its lifetime.

Properties, under crashes, restarts, graceful stops, pauses (frozen supervisors),
partitions, merges, loss and one-way cuts:

* never two domain-controller instances alive at overlapping times, anywhere;
* an instance starts only on a node whose last ring view was a regular primary
  one and whose last space view put it first among the eligible members;
* a node that installs a configuration that is not primary has its instance
  gone within ``lease + kill_allowance``;
* once the network is stable: exactly one domain controller within the bound
  (settle + fencing + lease), and it stays; ``replicas = N`` -> exactly N.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from groupcomm.errors import ConfigError
from groupcomm.events import View
from groupcomm.layers.quorum import QuorumConfig
from groupcomm.layers.spaces import SpaceView
from groupcomm.services.supervisor.cluster import Fencing, placement_space
from groupcomm.services.supervisor.sim import ProcessModel, SimSupervisors, overlapping
from groupcomm.services.supervisor.spec import (
    DOMAIN_CONTROLLER,
    ClusterSettings,
    ProcessSpec,
)
from groupcomm.testing import SimCluster

SPACE = ClusterSettings.space
DC = ProcessSpec(name="dc", command=("dc",), role=DOMAIN_CONTROLLER, restart="always")
WEB = ProcessSpec(name="web", command=("web",), replicas=2, restart="always")


def cluster(n: int = 3, seed: int = 1, *, specs=(DC,), model: ProcessModel | None = None,
            settings_: ClusterSettings | None = None) -> tuple[SimCluster, SimSupervisors]:
    sim = SimCluster(n, seed=seed, stack="sim", quorum=QuorumConfig(expected_votes=n))
    fencing = Fencing.derive(settings_ or ClusterSettings(), sim.config.token_timeout, sim.config.consensus_timeout)
    sups = SimSupervisors(sim, {node: list(specs) for node in sim.nodes}, fencing=fencing,
                          model=model, seed=seed)
    return sim, sups


def failover_bound(sim: SimCluster, sups: SimSupervisors) -> float:
    """Detection and a new ring (the simulator's settle time), fencing, a lapsed lease, starting."""
    f = sups.fencing
    return sim.settle_time + f.fencing_delay + f.lease + 1.0


def one_dc(sups: SimSupervisors) -> bool:
    return len(sups.running("dc", DOMAIN_CONTROLLER)) == 1


def one_chosen_dc(sups: SimSupervisors) -> bool:
    """Exactly one controller runs, and its node holds the term (not an old one on its way out)."""
    running = sups.running("dc", DOMAIN_CONTROLLER)
    if len(running) != 1:
        return False
    core = sups.core(running[0].node)
    return core is not None and core.placement.lease_valid("dc", sups.sim.now_us)


# --------------------------------------------------------------------------- the checks


def check_safety(sups: SimSupervisors, *, eligible: dict[str, tuple[int, ...] | None] | None = None) -> None:
    sim = sups.sim
    pairs = overlapping(sups.instances, "dc", now=sim.now)
    assert not pairs, f"overlapping domain controllers: {pairs}"
    f = sups.fencing
    by_node: dict[int, list] = {}
    for t, node, item in sups.decisions:
        by_node.setdefault(node, []).append((t, item))
    allowed = (eligible or {}).get("dc")
    for inst in sups.instances:
        if inst.role != DOMAIN_CONTROLLER:
            continue
        seen = [(t, item) for t, item in by_node.get(inst.node, []) if t <= inst.started]
        rings = [item for _, item in seen if isinstance(item, View) and not item.transitional]
        assert rings and rings[-1].primary, f"{inst} started without a primary view ({rings[-1:]})"
        views = [item for _, item in seen if isinstance(item, SpaceView) and item.space == placement_space(SPACE, "dc")]
        assert views, f"{inst} started before any view of its space"
        first = next((m for m in views[-1].members if allowed is None or m in allowed), None)
        assert first == inst.node, f"{inst} started but {views[-1]} chooses {first}"
        end = inst.ended if inst.ended is not None else sim.now
        for t, item in by_node.get(inst.node, []):
            if inst.started < t < end and isinstance(item, View) and not item.transitional and not item.primary:
                assert end <= t + f.lease + f.kill_allowance + 1e-6, (
                    f"{inst} still ran {end - t:.3f}s after a non-primary view at {t:.3f}")


def check_epochs_increase(sups: SimSupervisors) -> None:
    """Each new term's epoch is larger than every earlier term's (the fencing token)."""
    runs = sorted((i for i in sups.instances if i.role == DOMAIN_CONTROLLER), key=lambda i: i.started)
    highest = -1
    for inst in runs:
        assert inst.epoch is not None
        assert inst.epoch >= highest, f"{inst} has a smaller epoch than an earlier term ({highest})"
        highest = max(highest, inst.epoch)


# --------------------------------------------------------------------------- scenarios


def test_one_domain_controller_starts_after_the_fencing_delay() -> None:
    _sim, sups = cluster()
    assert sups.run_until(lambda: one_dc(sups), 15)
    (inst,) = sups.running("dc")
    assert inst.started >= sups.fencing.fencing_delay      # no handover at a first start
    sups.run(10)
    assert len(sups.instances) == 1 and inst.alive
    check_safety(sups)


def test_crash_of_the_hosting_node_moves_it_within_the_bound() -> None:
    sim, sups = cluster(seed=3)
    assert sups.run_until(lambda: one_dc(sups), 15)
    old = sups.running("dc")[0]
    t0 = sim.now
    sups.crash(old.node)
    assert not old.alive                                   # its process died with it
    assert sups.run_until(lambda: one_dc(sups), failover_bound(sim, sups))
    new = sups.running("dc")[0]
    assert new.node != old.node and new.epoch > old.epoch
    assert new.started - t0 >= sups.fencing.fencing_delay
    check_safety(sups)


def test_frozen_supervisor_its_process_stops_when_the_lease_lapses_and_the_next_starts_after() -> None:
    sim, sups = cluster(seed=5)
    assert sups.run_until(lambda: one_dc(sups), 15)
    old = sups.running("dc")[0]
    t0 = sim.now
    sups.pause(old.node, 12.0)
    sups.run(2.0)
    assert old.alive                                       # within its lease
    assert sups.run_until(lambda: not old.alive, sups.fencing.lease + 1)
    assert old.why.startswith("lease")
    assert sups.run_until(lambda: one_dc(sups), failover_bound(sim, sups))
    new = sups.running("dc")[0]
    assert new.node != old.node and new.started > old.ended
    sups.run(15)                                            # the frozen one wakes up: still one
    assert one_dc(sups)
    check_safety(sups)
    assert t0 < new.started


def test_graceful_stop_hands_over_without_waiting_for_fencing() -> None:
    sim, sups = cluster(4, seed=2)
    assert sups.run_until(lambda: one_dc(sups), 15)
    old = sups.running("dc")[0]
    t0 = sim.now
    sups.stop(old.node)
    assert sups.run_until(lambda: one_dc(sups) and sups.running("dc")[0] is not old, 5)
    new = sups.running("dc")[0]
    assert new.started - t0 < sups.fencing.fencing_delay / 2, new.started - t0
    assert new.started >= old.ended
    check_safety(sups)


def test_minority_stops_at_once_majority_runs_one_and_one_remains_after_the_merge() -> None:
    sim, sups = cluster(5, seed=7)
    assert sups.run_until(lambda: one_dc(sups), 15)
    old = sups.running("dc")[0]
    others = [n for n in sim.nodes if n != old.node]
    minority, majority = [old.node, others[0]], others[1:]
    sim.partition([minority, majority])
    assert sups.run_until(lambda: not old.alive, sups.fencing.token_timeout * 4 + sups.fencing.lease)
    assert sups.run_until(lambda: one_dc(sups), failover_bound(sim, sups))
    assert sups.running("dc")[0].node in majority
    sim.heal()
    sups.run(20)
    assert one_dc(sups)
    check_safety(sups)
    check_epochs_increase(sups)


def test_a_member_joining_the_ring_does_not_move_the_domain_controller() -> None:
    """A client (``groupcomm ps``) joining and leaving the ring merges it twice; the space keeps
    its order (oldest first) across the merge, so the host and its process stay."""
    sim = SimCluster(4, seed=12, stack="sim", quorum=QuorumConfig(expected_votes=3, votes={4: 0}))
    fencing = Fencing.derive(ClusterSettings(), sim.config.token_timeout, sim.config.consensus_timeout)
    sups = SimSupervisors(sim, {1: [DC], 2: [DC], 3: [DC], 4: []}, fencing=fencing, seed=12)
    sups.crash(4)
    assert sups.run_until(lambda: one_dc(sups), 20)
    host = sups.running("dc")[0].node
    sups.crash(host)                 # it comes back as the newest member: the order is no longer by id
    sups.run(1.0)
    sups.restart(host)
    assert sups.run_until(lambda: one_dc(sups) and sups.running("dc")[0].node != host, 20)
    sups.run(3.0)
    (first,) = sups.running("dc")
    count = len(sups.instances)
    for _ in range(3):
        sups.restart(4)
        sups.run(2.0)
        sups.crash(4)
        sups.run(2.0)
    assert sups.running("dc") == [first] and len(sups.instances) == count
    check_safety(sups)


def test_a_node_alone_never_runs_the_domain_controller() -> None:
    sim, sups = cluster(3, seed=4)
    sim.partition([[1], [2], [3]])
    sups.run(30)
    assert sups.instances == []


def test_replicas_keep_n_instances_and_are_replaced_when_a_node_is_lost() -> None:
    sim, sups = cluster(4, seed=6, specs=(WEB,))
    assert sups.run_until(lambda: len(sups.running("web")) == 2, 15)
    lost = sups.running("web")[0].node
    sups.crash(lost)
    assert sups.run_until(lambda: len(sups.running("web")) == 2, sim.settle_time)
    assert lost not in {i.node for i in sups.running("web")}
    survivors = {i.node for i in sups.running("web")}
    sups.restart(lost)
    sups.run(sim.settle_time)
    assert len(sups.running("web")) == 2
    # minimal movement: the rejoined node takes back at most one instance
    assert len(survivors & {i.node for i in sups.running("web")}) >= 1


def test_eligible_nodes_only() -> None:
    spec = ProcessSpec(name="dc", command=("dc",), role=DOMAIN_CONTROLLER, eligible=("n2", "n3"))
    sim, sups = cluster(3, seed=8, specs=(spec,))
    assert sups.run_until(lambda: one_dc(sups), 15)
    assert sups.running("dc")[0].node in (2, 3)
    sups.crash(sups.running("dc")[0].node)
    assert sups.run_until(lambda: one_dc(sups), failover_bound(sim, sups))
    assert sups.running("dc")[0].node in (2, 3)
    check_safety(sups, eligible={"dc": (2, 3)})


def test_a_crashed_process_is_restarted_under_the_same_term() -> None:
    _sim, sups = cluster(seed=9)
    assert sups.run_until(lambda: one_dc(sups), 15)
    first = sups.running("dc")[0]
    assert sups.kill_process(first.node, "dc")
    assert sups.run_until(lambda: one_dc(sups), 3)
    again = sups.running("dc")[0]
    assert again.node == first.node and again.epoch == first.epoch and again.generation == first.generation + 1


def test_a_live_switch_controller_is_promoted_in_place_and_demoted_by_a_restart() -> None:
    spec = ProcessSpec(name="dc", command=("dc",), role=DOMAIN_CONTROLLER, restart="always", live_switch=True)
    sim, sups = cluster(3, seed=13, specs=(spec,))
    assert sups.run_until(lambda: one_dc(sups), 15)
    standbys = [i for i in sups.running("dc") if i.role == "standby"]
    (dc,) = sups.running("dc", DOMAIN_CONTROLLER)
    assert len(standbys) == 2 and dc.generation == 1            # promoted in place, not restarted
    assert {r.role for r in sups.table(dc.node)} == {DOMAIN_CONTROLLER}
    assert {r.role for n in sim.nodes if n != dc.node for r in sups.table(n)} == {"standby"}
    others = [n for n in sim.nodes if n != dc.node]
    sim.partition([[dc.node], others])                          # the controller's node is alone
    assert sups.run_until(lambda: not dc.alive, sups.fencing.lease + 1)
    assert sups.run_until(lambda: one_dc(sups) and sups.running("dc", DOMAIN_CONTROLLER)[0].node in others,
                          failover_bound(sim, sups))
    assert sups.run_until(lambda: len([i for i in sups.running("dc") if i.node == dc.node]) == 1, 5)
    assert [i.role for i in sups.running("dc") if i.node == dc.node] == ["standby"]   # restarted as one
    sim.heal()
    sups.run(15)
    assert one_dc(sups)
    check_safety(sups)


def test_fencing_delay_shorter_than_the_rule_is_refused_naming_the_values() -> None:
    with pytest.raises(ConfigError, match=r"fencing_delay \(2s\) is shorter than token_timeout \(1s\)"):
        Fencing.derive(ClusterSettings(fencing_delay=2.0), token_timeout=1.0)
    with pytest.raises(ConfigError, match="lease"):
        Fencing.derive(ClusterSettings(lease=0.5), token_timeout=1.0)
    f = Fencing.derive(ClusterSettings(), token_timeout=0.3)
    assert f.lease == pytest.approx(0.3 + 4 * 0.36)
    assert f.fencing_delay == pytest.approx(0.3 + 0.075 + f.lease + 0.5)


# --------------------------------------------------------------------------- fault schedules


def _step(n: int):
    node = st.integers(1, n)
    return st.one_of(
        st.builds(lambda t: ("run", t), st.sampled_from([0.05, 0.3, 1.0, 2.5, 5.0])),
        st.builds(lambda a: ("crash", a), node),
        st.builds(lambda a: ("restart", a), node),
        st.builds(lambda a: ("stop", a), node),
        st.builds(lambda a, s: ("pause", a, s), node, st.sampled_from([0.5, 2.0, 4.0, 8.0])),
        st.builds(lambda groups: ("partition", tuple(groups)), st.lists(st.integers(0, 2), min_size=n, max_size=n)),
        st.builds(lambda a, b, m: ("cut", a, b, m), node, node, st.booleans()),
        st.just(("heal",)),
        st.builds(lambda p: ("loss", p), st.sampled_from([0.0, 0.05, 0.2])),
        st.builds(lambda a, p: ("kill", a, p), node, st.sampled_from(["dc", "web"])),
    )


@st.composite
def supervisor_schedules(draw):
    n = draw(st.integers(3, 5))
    seed = draw(st.integers(0, 2**16))
    eligible = draw(st.one_of(st.none(), st.lists(st.integers(1, n), min_size=2, max_size=n, unique=True)))
    plan = draw(st.lists(_step(n), min_size=1, max_size=14))
    live_switch = draw(st.booleans())
    return n, seed, (tuple(sorted(eligible)) if eligible else None), plan, live_switch


def _apply(sim: SimCluster, sups: SimSupervisors, step: tuple) -> None:
    kind = step[0]
    live = set(sim.live)
    if kind == "run":
        sups.run(step[1])
    elif kind == "crash" and step[1] in sups.supervising and not sim.paused(step[1]):
        sups.crash(step[1])
    elif kind == "restart" and step[1] not in live:
        sups.restart(step[1])
    elif kind == "stop" and step[1] in sups.supervising and not sim.paused(step[1]):
        sups.stop(step[1])
    elif kind == "pause" and step[1] in live and not sim.paused(step[1]):
        sups.pause(step[1], step[2])
    elif kind == "partition":
        groups: dict[int, list[int]] = {}
        for node, g in zip(sim.nodes, step[1]):
            groups.setdefault(g, []).append(node)
        sim.partition(list(groups.values()))
    elif kind == "cut" and step[1] != step[2]:
        sim.cut(step[1], step[2], multicast_only=step[3])
    elif kind == "heal":
        sim.heal()
    elif kind == "loss":
        sim.set_network(loss=step[1])
    elif kind == "kill":
        sups.kill_process(step[1], step[2])


@settings(deadline=None, max_examples=max(6, settings().max_examples // 8))
@given(supervisor_schedules())
@example((5, 11, None, [("partition", (0, 0, 1, 1, 1)), ("run", 5.0), ("heal",), ("pause", 1, 8.0),
                        ("run", 5.0), ("crash", 3)], True))
@example((5, 44, None, [("stop", 4), ("loss", 0.0), ("crash", 3), ("crash", 4)], False))   # a soak run's find
@example((3, 3727, None, [("loss", 0.0), ("restart", 3), ("stop", 2), ("crash", 3), ("pause", 2, 8.0), ("heal",),
                          ("loss", 0.05), ("cut", 1, 1, False), ("run", 5.0), ("heal",), ("heal",), ("loss", 0.05),
                          ("kill", 2, "dc"), ("run", 0.3)], True))   # a standby restarted after its hand-over
@example((3, 3727, None, [("pause", 1, 0.5)], False))   # a hung old controller is not the chosen one
@example((3, 17036, (1, 2), [("kill", 3, "web"), ("run", 2.5), ("pause", 1, 4.0), ("kill", 2, "web"), ("stop", 2)],
          True))   # a standby left behind by a stopped supervisor was promoted too
@example((5, 281, None, [("run", 0.05), ("pause", 1, 4.0), ("pause", 5, 4.0)], True))   # stable = no pause either
@example((3, 2, (2, 3), [("stop", 2), ("run", 1.0), ("restart", 2), ("pause", 3, 4.0), ("cut", 1, 3, False),
                         ("run", 2.5)], False))
def test_exactly_one_domain_controller_under_any_fault_schedule(schedule) -> None:
    n, seed, eligible, plan, live_switch = schedule
    names = {node: f"n{node}" for node in range(1, n + 1)}
    dc = ProcessSpec(name="dc", command=("dc",), role=DOMAIN_CONTROLLER, restart="always", live_switch=live_switch,
                     eligible=tuple(names[e] for e in eligible) if eligible else ())
    web = ProcessSpec(name="web", command=("web",), replicas=2, restart="always")
    sim, sups = cluster(n, seed=seed, specs=(dc, web), model=ProcessModel(hang=0.2))
    sups.run(8.0)
    for step in plan:
        _apply(sim, sups, step)
        check_safety(sups, eligible={"dc": eligible})
    # The network becomes stable and every node runs again.
    sim.heal()
    sim.set_network()
    assert sups.run_until(lambda: not any(sim.paused(n) for n in sim.live), 10), "a pause did not end"
    assert sups.run_until(lambda: not sups.leaving, 30), f"graceful stops did not finish: {sups.leaving}"
    for node in sim.nodes:
        if node not in sim.live:
            sups.restart(node)
    assert sups.run_until(sim.converged, sim.settle_time), "the ring did not converge"
    sups.run(1.0)                                   # the spaces' merge round, if any
    assert sups.run_until(lambda: one_chosen_dc(sups) and len(sups.running("web")) == 2,
                          failover_bound(sim, sups) + sups.fencing.lease), (
        f"not exactly one DC / two replicas after stabilising: {sups.running('dc')} {sups.running('web')}")
    chosen = sups.running("dc", DOMAIN_CONTROLLER)[0]
    sups.run(6.0)
    assert sups.running("dc", DOMAIN_CONTROLLER) == [chosen], "the domain controller moved on a stable network"
    assert len(sups.running("web")) == 2
    check_safety(sups, eligible={"dc": eligible})
    check_epochs_increase(sups)


def test_runtime_changes_of_a_placed_process_keep_its_placement() -> None:
    """The runtime API: a new command restarts the controller under the same term; placement
    settings cannot change under a running placement; a runtime add places a new process."""
    from groupcomm.services.supervisor.local import Add, Change

    sim, sups = cluster(3, seed=14)
    assert sups.run_until(lambda: one_dc(sups), 15)
    (dc,) = sups.running("dc")
    sups.command(dc.node, Change(ProcessSpec(**{**DC.__dict__, "command": ("dc", "-v")})))
    assert sups.run_until(lambda: one_dc(sups) and sups.running("dc")[0] is not dc, 3)
    again = sups.running("dc")[0]
    assert again.node == dc.node and again.epoch == dc.epoch and again.generation == dc.generation + 1
    with pytest.raises(ValueError, match="eligible decide where it runs"):
        sups.command(dc.node, Change(ProcessSpec(**{**DC.__dict__, "eligible": ("n1",)})))
    for node in sim.nodes:
        sups.command(node, Add(WEB))
    assert sups.run_until(lambda: len(sups.running("web")) == 2, 5)
    check_safety(sups)
