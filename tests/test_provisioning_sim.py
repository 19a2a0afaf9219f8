"""The provisioning service proven in simulation (issue 12, Proof: "Simulation (Hypothesis)").

Every simulated node runs the real ProvisioningCore on SimCluster's real layers
(groupcomm.services.provisioning.sim); the executor is faked (a node has what
it wants after a small delay; a bundle version in ``bad`` fails its health
check).  Fixed scenarios first, then the property over random schedules of
group, bundle, configuration and plan operations with partitions, merges,
crashes and restarts:

(a) after stabilisation every live node's replicated state of each of its groups
    is the same, is what the last accepted operation made, and every accepted
    operation turned a state some earlier acceptance made into the next one;
(b) no operation is accepted in a configuration that is not regular and primary;
(c) every rollout ends with every target at the new revision or every one at
    the previous one, and the (fake) nodes run exactly that;
(d) two nodes that delivered an operation in the same configuration decided alike.
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from groupcomm.events import RingId, View
from groupcomm.layers.quorum import QuorumConfig
from groupcomm.services.provisioning.node_core import DEFAULT_GROUP
from groupcomm.services.provisioning.ops import (
    PLANS,
    AdoptState,
    BeginRollout,
    BundleRef,
    DeleteConfig,
    InstallBundle,
    SetConfig,
    StartBundle,
    StopBundle,
    UninstallBundle,
)
from groupcomm.services.provisioning.plan import (
    EnvRole,
    EnvSpec,
    PlanError,
    choose_targets,
    plan_state_name,
    role_state,
)
from groupcomm.services.provisioning.policy import SyncPolicy
from groupcomm.services.provisioning.rollout import desired_for, rollback_to
from groupcomm.services.provisioning.sim import AnswerRecord, SimProvisioning
from groupcomm.services.provisioning.state import (
    READ_ONLY,
    Accepted,
    GroupState,
    OpRefused,
    Rejected,
    group_space,
)
from groupcomm.services.provisioning.status import CLUSTER_SPACE
from groupcomm.testing import SimCluster

PLAN_TEXT = """\
[plan]
name = "shop"
[roles.web]
bundles = ["web.whl"]
[roles.app]
bundles = ["app.tar.gz"]
[environments.preprod]
roles = { web = { group = "default", nodes = 2 }, app = { group = "default", nodes = 1 } }
"""
ENV = "preprod"


def digest(name: str, version: str) -> str:
    return hashlib.sha256(f"{name}-{version}".encode()).hexdigest()


def install(name: str, version: str = "1.0", group: str = DEFAULT_GROUP) -> InstallBundle:
    return InstallBundle(group, name, version, digest(name, version), 10, f"{name}-{version}.tar.gz")


def cluster(n: int = 3, seed: int = 1, **kw) -> tuple[SimCluster, SimProvisioning]:
    sim = SimCluster(n, seed=seed, stack="sim", quorum=QuorumConfig(expected_votes=n))
    prov = SimProvisioning(sim, seed=seed, **kw)
    assert prov.run_until(prov.settled, 20), "the cluster did not settle"
    return sim, prov


def decided(prov: SimProvisioning, op_id: str, nodes) -> bool:
    return all(prov.answer(n, op_id) is not None for n in nodes)


def accept(prov: SimProvisioning, node: int, body, nodes=None) -> str:
    """Propose ``body`` at ``node`` and wait until every one of ``nodes`` accepted it."""
    nodes = prov.running if nodes is None else nodes
    op_id = prov.propose(node, body)
    assert prov.run_until(lambda: decided(prov, op_id, nodes), 5), f"{op_id} not delivered"
    for n in nodes:
        assert type(prov.answer(n, op_id)) is Accepted, (n, prov.answer(n, op_id))
    return op_id


def runs(prov: SimProvisioning, node: int, name: str, version: str) -> bool:
    proc = prov.actual(node).processes.get(name)
    return proc is not None and proc.version == version and proc.state == "running"


def rollout_body(prov: SimProvisioning, node: int, version: str, *, batch: int = 1,
                 timeout: float = 5.0) -> BeginRollout:
    """web on the two oldest members of the default group, app on the next (choose_targets)."""
    core = prov.core(node)
    members = [prov.names[m] for m in core.replica(DEFAULT_GROUP).members]
    spec = EnvSpec(ENV, (EnvRole("web", DEFAULT_GROUP, 2), EnvRole("app", DEFAULT_GROUP, 1)), batch, timeout, None)
    targets = choose_targets(spec, {DEFAULT_GROUP: members})
    roles = {r: ((BundleRef(r, version, digest(r, version), 10, f"{r}-{version}.tar.gz"),), {r: {"v": version}})
             for r in ("web", "app")}
    return BeginRollout(env=ENV, plan_digest=digest("plan", version), plan=PLAN_TEXT, roles=roles,
                        targets=targets, batch=batch, health_timeout=timeout)


def last_rollout(prov: SimProvisioning, node: int):
    return prov.core(node).plans_state.envs[ENV].revisions[-1]


# --------------------------------------------------------------------------- the checks


def check_decisions(prov: SimProvisioning) -> None:
    """(b) and (d): accepted only in a regular primary view; one decision per op and configuration."""
    for rec in prov.accepts:
        assert rec.view is not None and rec.view.primary and not rec.view.transitional, (
            f"{rec.accepted.op.op_id} accepted at n{rec.node} in {rec.view}")
    by_config: dict[tuple, tuple[str, object]] = {}
    deliveries: dict[tuple, int] = {}
    for rec in prov.answer_log:
        # One copy of an op: its k-th delivery at a node in a ring configuration and space view (the
        # members of both deliver the same messages in the same order).  A rollout driver resends with the
        # same op_id; a member that joined the space since delivers only the later copies, and the space's
        # member list alone does not tell (a restarted member has the id of its old incarnation).
        view = rec.view
        where = (rec.op_id, view.ring_id if view else None, view.transitional if view else None,
                 view.members if view else None, rec.space_view)
        nth = deliveries[(*where, rec.node)] = deliveries.get((*where, rec.node), 0) + 1
        key = (*where, nth)
        verdict = "accepted" if type(rec.result) is Accepted else rec.result.reason
        first = by_config.setdefault(key, (verdict, rec))
        assert first[0] == verdict, f"{rec.op_id}: n{first[1].node} {first[0]!r}, n{rec.node} {verdict!r}"


def check_replicas(prov: SimProvisioning) -> None:
    """(a): the members of each space agree, on what the last acceptance made; each acceptance
    turned a state made by an earlier one (or the empty state) into the next."""
    known: dict[str, set[bytes]] = {}
    for rec in prov.accepts:
        made = known.setdefault(rec.space, {type(rec.before)(rec.before.group).snapshot()})
        op = rec.accepted.op
        if type(op.body) is AdoptState:
            assert rec.after.snapshot() in made, f"{op.op_id} adopted a state no acceptance made"
            assert rec.after.revision > rec.before.revision
        else:
            assert rec.before.snapshot() in made, f"{op.op_id} accepted at n{rec.node} on an unknown state"
            assert rec.before.apply(op) == rec.after and rec.after.revision == rec.accepted.revision
        made.add(rec.after.snapshot())
    spaces = {CLUSTER_SPACE} | {group_space(g) for n in prov.running for g in prov.core(n).groups}
    for space in spaces:
        replicas = prov.replicas(space)
        states = {r.state.snapshot() for r in replicas.values()}
        assert len(states) == 1, f"{space}: members disagree"
        last = [rec.after for rec in prov.accepts if rec.space == space]
        state = next(iter(replicas.values())).state
        if last:
            assert state == last[-1], f"{space}: at revision {state.revision}, the last acceptance made " \
                                      f"revision {last[-1].revision}"
        # the primary history, replayed by revision, makes it (when it is one line: no adoption, no restart
        # of a group from scratch)
        group = PLANS if space == CLUSTER_SPACE else space.removeprefix(group_space(""))
        history = prov.primary_history(group)
        if [r for r, _ in history] == list(range(1, len(history) + 1)) and \
                not any(type(o.body) is AdoptState for _, o in history):
            replay = type(state)(group)
            for _, o in history:
                replay = replay.apply(o)
            assert replay == state, f"{space}: the primary history replayed is not the replicas' state"
        for node, r in replicas.items():
            if space != CLUSTER_SPACE:      # the cluster policy: the node acts on the replicated state
                group = space.removeprefix(group_space(""))
                assert prov.desired(node)[group] == r.state


def check_rollouts(prov: SimProvisioning) -> None:
    """(c): no rollout runs; the last one of each environment left every target at its revision
    (succeeded) or at the previous succeeded one (rolled back), and the nodes run exactly that."""
    assert len({prov.core(n).plans_state.snapshot() for n in prov.running}) == 1
    state = prov.core(prov.running[0]).plans_state
    for env, hist in state.envs.items():
        last = hist.revisions[-1]
        assert last.outcome in ("succeeded", "rolled-back"), f"{env}: revision {last.revision} {last.outcome}"
        # computed here from the records, not with rollout's own helpers
        kept = last if last.outcome == "succeeded" else next(
            (r for r in reversed(hist.revisions[:-1]) if r.outcome == "succeeded"), None)
        for t in last.targets:
            role = next((k.role for k in kept.targets if k.node == t.node), None) if kept is not None else None
            expected = role_state(env, kept.revision, *kept.roles[role]) if role is not None else None
            want = desired_for(t.node, state).get(plan_state_name(env))
            assert want == expected, f"{env} revision {last.revision} {last.outcome}: {t.node} wants {want}"
            for name, b in (expected.bundles.items() if expected is not None else ()):
                assert runs(prov, prov.ids[t.node], name, b.version), (t.node, name, b.version)


# --------------------------------------------------------------------------- scenarios


def test_install_and_start_on_a_group_of_three_runs_everywhere() -> None:
    _sim, prov = cluster(3, seed=1)
    accept(prov, 1, install("hello"))
    accept(prov, 2, StartBundle(DEFAULT_GROUP, "hello"))
    assert prov.run_until(lambda: prov.settled() and all(runs(prov, n, "hello", "1.0") for n in prov.running), 10)
    accept(prov, 3, install("hello", "2.0"))                  # an upgrade keeps it started
    assert prov.run_until(lambda: prov.settled() and all(runs(prov, n, "hello", "2.0") for n in prov.running), 10)
    check_decisions(prov)
    check_replicas(prov)


def test_an_uninstall_made_while_a_node_was_crashed_reaches_it_when_it_restarts() -> None:
    sim, prov = cluster(3, seed=2)
    accept(prov, 1, install("hello"))
    accept(prov, 1, install("other"))
    accept(prov, 1, StartBundle(DEFAULT_GROUP, "other"))
    assert prov.run_until(lambda: prov.settled() and runs(prov, 3, "other", "1.0"), 10)
    prov.crash(3)
    assert prov.run_until(lambda: sim.converged() and prov.core(1).replica(DEFAULT_GROUP).writable, 10)
    accept(prov, 2, UninstallBundle(DEFAULT_GROUP, "other"), nodes=[1, 2])
    assert prov.disks[3].store.load(DEFAULT_GROUP)[0].revision == 3             # its disk missed it
    assert {e.name for e in prov.actual(3).envs} == {"hello", "other"}
    prov.restart(3)
    assert prov.run_until(prov.settled, 20)
    assert "other" not in prov.core(3).replica(DEFAULT_GROUP).state.bundles
    assert {e.name for e in prov.actual(3).envs} == {"hello"} and not prov.actual(3).processes
    check_decisions(prov)
    check_replicas(prov)


def test_a_minority_side_is_read_only_and_changes_nothing_anywhere() -> None:
    sim, prov = cluster(3, seed=3)
    accept(prov, 1, install("hello"))
    before = {n: prov.core(n).replica(DEFAULT_GROUP).state for n in prov.running}
    plans_before = prov.core(1).plans_state
    rollout = rollout_body(prov, 3, "1.0")
    sim.partition([[1, 2], [3]])
    assert prov.run_until(lambda: not prov.core(3).replica(DEFAULT_GROUP).writable
                          and set(prov.core(1).replica(DEFAULT_GROUP).members) == {1, 2}, 10)
    bodies = [install("other"), StartBundle(DEFAULT_GROUP, "hello"), StopBundle(DEFAULT_GROUP, "hello"),
              SetConfig(DEFAULT_GROUP, "org.x", "port", "80"), UninstallBundle(DEFAULT_GROUP, "hello"),
              DeleteConfig(DEFAULT_GROUP, "org.x", "port"), rollout]
    ops = [prov.propose(3, body) for body in bodies]
    assert prov.run_until(lambda: all(decided(prov, o, [3]) for o in ops), 5)
    assert [prov.answer(3, o) for o in ops] == [Rejected(o, READ_ONLY) for o in ops]
    prov.run(2.0)
    for n in prov.running:
        assert prov.core(n).replica(DEFAULT_GROUP).state == before[n]
        assert prov.core(n).plans_state == plans_before
    sim.heal()
    assert prov.run_until(prov.settled, 20)
    assert not [rec for rec in prov.accepts if rec.accepted.op.op_id in ops]
    assert prov.core(3).replica(DEFAULT_GROUP).state == before[1]
    check_decisions(prov)
    check_replicas(prov)


def test_a_node_policy_change_stays_local() -> None:
    policy = SyncPolicy.from_toml({"default": {"configs": {"mode": "node"}}})
    _sim, prov = cluster(3, seed=4, policies={2: policy})
    op_id = prov.propose(2, SetConfig(DEFAULT_GROUP, "org.x", "port", "81"))
    assert type(prov.answer(2, op_id)) is Accepted                  # answered locally, at once
    prov.run(2.0)
    assert not prov.accepts and all(prov.answer(n, op_id) is None for n in (1, 3))
    assert prov.desired(2)[DEFAULT_GROUP].configs == {"org.x": {"port": "81"}}
    for n in prov.running:
        assert prov.core(n).replica(DEFAULT_GROUP).state == GroupState(DEFAULT_GROUP)
    for n in (1, 3):
        assert prov.desired(n)[DEFAULT_GROUP].configs == {}
    # the cluster's configuration does not reach node 2 (mode node), its bundles do
    accept(prov, 1, SetConfig(DEFAULT_GROUP, "org.x", "port", "80"))
    accept(prov, 1, install("hello"))
    assert prov.desired(2)[DEFAULT_GROUP].configs == {"org.x": {"port": "81"}}
    assert "hello" in prov.desired(2)[DEFAULT_GROUP].bundles
    assert prov.desired(1)[DEFAULT_GROUP].configs == {"org.x": {"port": "80"}}


def test_a_rollout_of_two_batches_succeeds() -> None:
    _sim, prov = cluster(3, seed=5)
    body = rollout_body(prov, 1, "1.0", batch=2)
    accept(prov, 2, body)
    assert last_rollout(prov, 1).batches == 2
    assert prov.run_until(lambda: last_rollout(prov, 1).outcome != "running", 30)
    run = last_rollout(prov, 1)
    assert run.outcome == "succeeded" and run.batch_reached == 1, run.reason
    assert prov.run_until(prov.settled, 10)
    for t in run.targets:
        assert runs(prov, prov.ids[t.node], t.role, "1.0")
    check_rollouts(prov)
    check_decisions(prov)
    check_replicas(prov)


def succeed_first(prov: SimProvisioning) -> None:
    accept(prov, 1, rollout_body(prov, 1, "1.0"))
    assert prov.run_until(lambda: last_rollout(prov, 1).outcome == "succeeded", 30)


def test_a_rollout_whose_new_version_fails_rolls_every_target_back() -> None:
    _sim, prov = cluster(3, seed=6, bad={"2.0"})
    succeed_first(prov)
    accept(prov, 3, rollout_body(prov, 3, "2.0"))
    assert prov.run_until(lambda: last_rollout(prov, 1).outcome != "running", 30)
    run = last_rollout(prov, 1)
    assert run.outcome == "rolled-back" and "health check failed" in run.reason, run.reason
    assert prov.run_until(prov.settled, 10)
    for t in run.targets:
        assert runs(prov, prov.ids[t.node], t.role, "1.0"), t
        first = prov.core(1).plans_state.envs[ENV].get(1)
        assert desired_for(t.node, prov.core(1).plans_state)[plan_state_name(ENV)] == \
            first.assignment(ENV, t.node).state
    check_rollouts(prov)
    check_decisions(prov)
    check_replicas(prov)


def test_plan_rollback_restores_the_previous_succeeded_revision_on_every_target() -> None:
    _sim, prov = cluster(3, seed=10)
    succeed_first(prov)
    accept(prov, 2, rollout_body(prov, 2, "2.0"))
    assert prov.run_until(lambda: last_rollout(prov, 1).outcome == "succeeded", 30)
    back = rollback_to(prov.core(3).plans_state, ENV)
    assert back.rollback_of == 1
    accept(prov, 3, back)
    assert prov.run_until(lambda: last_rollout(prov, 1).outcome != "running", 30)
    run = last_rollout(prov, 1)
    assert run.outcome == "succeeded" and run.revision == 3 and run.rollback_of == 1, run.reason
    assert prov.run_until(prov.settled, 10)
    for t in run.targets:
        assert runs(prov, prov.ids[t.node], t.role, "1.0"), t
    check_rollouts(prov)
    check_decisions(prov)
    check_replicas(prov)


def test_the_driving_node_crashes_mid_rollout_and_another_member_ends_it() -> None:
    sim, prov = cluster(3, seed=7)
    succeed_first(prov)
    accept(prov, 1, rollout_body(prov, 1, "2.0", timeout=3.0))
    (driver,) = [n for n in prov.running if prov.core(n).is_rollout_driver()]
    assert prov.run_until(lambda: last_rollout(prov, driver).batch_reached >= 0, 10)
    prov.crash(driver)
    others = [n for n in sim.nodes if n != driver]
    assert prov.run_until(lambda: last_rollout(prov, others[0]).outcome != "running", 30)
    ended = last_rollout(prov, others[0])
    assert ended.ended_by != prov.names[driver]
    prov.restart(driver)
    assert prov.run_until(prov.settled, 20)
    check_rollouts(prov)
    check_decisions(prov)
    check_replicas(prov)


def test_a_full_cluster_cold_start_with_the_oldest_store_first_keeps_the_newest_state() -> None:
    sim, prov = cluster(3, seed=8)
    accept(prov, 1, install("hello"))
    oldest = 2
    prov.crash(oldest)
    rest = [n for n in sim.nodes if n != oldest]
    assert prov.run_until(lambda: sim.converged() and prov.core(1).replica(DEFAULT_GROUP).writable, 10)
    accept(prov, 1, StartBundle(DEFAULT_GROUP, "hello"), nodes=rest)
    accept(prov, 3, install("other"), nodes=rest)
    newest = prov.core(1).replica(DEFAULT_GROUP).state
    for n in rest:
        prov.crash(n)
    prov.restart(oldest)
    prov.run(1.0)
    assert prov.core(oldest).replica(DEFAULT_GROUP).revision == 1
    for n in rest:
        prov.restart(n)
        prov.run(0.2)
    assert prov.run_until(prov.settled, 30)
    for n in sim.nodes:
        assert prov.core(n).replica(DEFAULT_GROUP).state == newest
        assert runs(prov, n, "hello", "1.0") and "other" in {e.name for e in prov.actual(n).envs}
    # The newer stores' claims (AdoptState) replaced it: claims are not operations, nobody accepted one.
    assert not [rec for rec in prov.accepts if type(rec.accepted.op.body) is AdoptState]
    check_decisions(prov)
    check_replicas(prov)


# --------------------------------------------------------------------------- the property

GROUPS = (DEFAULT_GROUP, "web", "db")
BAD = "9.9"
"""A version whose processes fail their health check."""


def _op(group: str, kind: str, name: str, version: str):
    if kind == "install":
        return install(name, version, group)
    if kind == "uninstall":
        return UninstallBundle(group, name)
    if kind == "start":
        return StartBundle(group, name)
    if kind == "stop":
        return StopBundle(group, name)
    if kind == "set-config":
        return SetConfig(group, "org." + name, "v", version)
    return DeleteConfig(group, "org." + name, "v")


def _step(n: int):
    node = st.integers(1, n)
    op = st.builds(lambda a, g, k, b, v: ("op", a, g, k, b, v), node,
                   st.sampled_from([DEFAULT_GROUP, DEFAULT_GROUP, "web"]),
                   st.sampled_from(["install", "install", "uninstall", "start", "stop", "set-config",
                                    "delete-config"]),
                   st.sampled_from(["hello", "other"]), st.sampled_from(["1.0", "2.0", BAD]))
    return st.one_of(
        op, op, op,
        st.builds(lambda t: ("run", t), st.sampled_from([0.05, 0.3, 1.0, 3.0])),
        st.builds(lambda a: ("crash", a), node),
        st.builds(lambda a: ("restart", a), node),
        st.builds(lambda order: ("outage", tuple(order)), st.permutations(range(1, n + 1))),
        st.builds(lambda groups, t: ("partition", tuple(groups), t),
                  st.lists(st.integers(0, 2), min_size=n, max_size=n), st.sampled_from([0.0, 0.001, 0.003, 0.01])),
        st.just(("heal",)),
        st.builds(lambda a, g: ("join", a, g), node, st.sampled_from(GROUPS[1:])),
        st.builds(lambda a, g: ("leave", a, g), node, st.sampled_from(GROUPS)),
        st.builds(lambda a, v, b: ("plan", a, v, b), node, st.sampled_from(["1.0", "2.0", BAD]),
                  st.integers(1, 2)),
        st.builds(lambda a: ("rollback", a), node),
    )


@st.composite
def provisioning_schedules(draw):
    n = draw(st.integers(3, 5))
    seed = draw(st.integers(0, 2**16))
    plan = draw(st.lists(_step(n), min_size=1, max_size=12))
    return n, seed, plan


def _apply(sim: SimCluster, prov: SimProvisioning, step: tuple) -> None:
    kind = step[0]
    running = prov.running
    if kind == "run":
        prov.run(step[1])
    elif kind == "crash" and step[1] in running:
        prov.crash(step[1])
    elif kind == "restart" and step[1] not in running:
        prov.restart(step[1])
    elif kind == "partition":
        # an operation in flight while the configuration changes (delivered in the transitional one, or not)
        writer = next((w for w in running if DEFAULT_GROUP in prov.core(w).groups), None)
        if writer is not None:
            prov.propose(writer, SetConfig(DEFAULT_GROUP, "org.split", "v", str(sim.now)))
            prov.run(step[2])
        groups: dict[int, list[int]] = {}
        for node, g in zip(sim.nodes, step[1]):
            groups.setdefault(g, []).append(node)
        sim.partition(list(groups.values()))
    elif kind == "outage":
        # every node goes down one after the other while the rest go on writing, then they come
        # back in the same order: the oldest disk first (a cold start)
        order = [node for node in step[1] if node in running]
        for i, node in enumerate(order):
            prov.crash(node)
            prov.run(1.5)
            writer = next((w for w in prov.running if DEFAULT_GROUP in prov.core(w).groups), None)
            if writer is not None:
                prov.propose(writer, SetConfig(DEFAULT_GROUP, "org.outage", "v", str(i)))
                prov.run(0.5)
        for node in order:
            prov.restart(node)
            prov.run(1.0)       # one at a time: each joins a space the earlier ones started (Adopt)
    elif kind == "heal":
        sim.heal()
    elif kind == "join" and step[1] in running:
        prov.join_group(step[1], step[2])
    elif kind == "leave" and step[1] in running and step[2] in prov.core(step[1]).groups:
        prov.leave_group(step[1], step[2])
    elif kind == "op" and step[1] in running and step[2] in prov.core(step[1]).groups:
        prov.propose(step[1], _op(*step[2:]))
    elif kind == "plan" and step[1] in running and DEFAULT_GROUP in prov.core(step[1]).groups:
        try:
            body = rollout_body(prov, step[1], step[2], batch=step[3], timeout=3.0)
        except PlanError:
            return                                  # too few members in view to choose targets
        prov.propose(step[1], body)
    elif kind == "rollback" and step[1] in running:
        try:
            body = rollback_to(prov.core(step[1]).plans_state, ENV)
        except OpRefused:
            return                                  # nothing to roll back to (or a rollout runs)
        prov.propose(step[1], body)
    if kind != "run":
        prov.run(0.1)


@settings(deadline=None, max_examples=max(6, settings().max_examples // 4))
@given(provisioning_schedules())
# a soak run's find: an op delivered (agreed) and accepted by n1, n4 in the old regular view, never by the
# primary side of the partition that followed: an Accepted answer, lost (ops are multicast safe since)
@example((5, 186, [("op", 5, DEFAULT_GROUP, "install", "hello", "1.0"), ("run", 3.0), ("run", 3.0),
                   ("partition", (1, 0, 0, 2, 0), 0.003), ("op", 4, DEFAULT_GROUP, "set-config", "other", "2.0"),
                   ("partition", (2, 0, 1, 2, 0), 0.01)]))
# a soak run's find: n1 (web's only member) crashed; n4 joined web while n1 rejoined after its restart: the
# views' "joined" lists differ between the two, so each must await claims relative to its own previous view
@example((5, 2000, [("run", 0.05), ("run", 0.05), ("op", 5, DEFAULT_GROUP, "set-config", "other", "1.0"),
                    ("plan", 1, "2.0", 1), ("rollback", 4), ("crash", 1), ("rollback", 4), ("join", 4, "web")]))
# soak finds: operations delivered in a merged ring before the spaces' SYNC round ended were decided by each
# side on its own state (one accepted, the other refused): every member refuses them alike now ("merging")
@example((4, 11738, [("restart", 4), ("plan", 2, "1.0", 2), ("leave", 2, DEFAULT_GROUP), ("crash", 1),
                     ("crash", 4), ("join", 1, "web")]))
@example((3, 580, [("restart", 1), ("heal",), ("crash", 3), ("plan", 1, "1.0", 1), ("crash", 3),
                   ("partition", (0, 1, 0), 0.0), ("restart", 1)]))
# a soak find, a check artifact: n1-n3 refused a rollout step ("merging") before the restarted n4 was back in
# the cluster space; the driver's resend (same op_id) was accepted by all four.  Copies were told apart by the
# space's member list, which still named n4's old incarnation at n1-n3: they are told apart by space view now
@example((4, 518, [("op", 4, DEFAULT_GROUP, "set-config", "hello", "1.0"), ("run", 1.0), ("restart", 1),
                   ("plan", 4, "1.0", 2), ("partition", (0, 0, 0, 0), 0.0), ("restart", 1), ("crash", 4)]))
def test_replicated_state_and_rollouts_under_any_fault_schedule(schedule) -> None:
    run_schedule(schedule)


def test_the_decision_check_tells_copies_of_an_op_apart_by_space_view() -> None:
    """Two decisions of one copy (same ring configuration and space view) must agree; a resend's copy,
    delivered in a later space view by a member that joined since, is another copy."""
    view = View((1, 2, 3, 4), RingId(1, 9), False)
    first, later = (1, 9, 6), (1, 9, 7)

    def check(*decisions: tuple[int, str, tuple[int, int, int]]) -> None:
        log = [AnswerRecord(0.0, node, "n1:2", Rejected("n1:2", reason), view, (1, 2, 3, 4), space_view)
               for node, reason, space_view in decisions]
        check_decisions(SimpleNamespace(accepts=[], answer_log=log))

    check((1, "merging", first), (2, "merging", first), (4, "other", later), (1, "other", later))
    with pytest.raises(AssertionError, match="n1:2"):
        check((1, "merging", first), (2, "other", first))
    with pytest.raises(AssertionError, match="n1:2"):
        check((1, "merging", first), (1, "other", later), (4, "merging", later))


def test_founders_that_receive_a_transfer_keep_their_newer_stored_state() -> None:
    """A soak run's find: n1, n3 accept two ops while n2 is cut off, crash, and restart together; n2 (revision
    0) is still in the space.  Every node ends at revision 0: the accepted ops are lost."""
    run_schedule((3, 0, [("partition", (1, 0, 1), 0.0), ("run", 0.05), ("run", 0.05),
                         ("op", 1, DEFAULT_GROUP, "install", "hello", "1.0"), ("crash", 1), ("crash", 3)]))


def run_schedule(schedule) -> None:
    n, seed, plan = schedule
    sim = SimCluster(n, seed=seed, stack="sim", quorum=QuorumConfig(expected_votes=n))
    prov = SimProvisioning(sim, seed=seed, bad={BAD})
    assert prov.run_until(prov.settled, 20)
    for node in sim.nodes[: seed % n + 1]:           # some nodes are in group "web" from the start
        prov.join_group(node, "web")
    for step in plan:
        _apply(sim, prov, step)
    sim.heal()
    for node in sim.nodes:
        if node not in prov.running:
            prov.restart(node)          # together: they may start spaces together (founders)
    assert prov.run_until(prov.settled, 60), "the cluster did not settle"
    check_decisions(prov)
    check_replicas(prov)
    check_rollouts(prov)


def test_nodes_restarting_together_with_different_disks_end_with_the_newest_state() -> None:
    """A soak run's find (seed 45477): after an outage two nodes come back at the same time and start the
    spaces together (every member of the first view is joining: nobody provides a state), one with a newer
    disk than the other."""
    sim, prov = cluster(3, seed=9)
    prov.crash(3)
    assert prov.run_until(lambda: sim.converged() and prov.core(1).replica(DEFAULT_GROUP).writable, 10)
    accept(prov, 1, install("hello"), nodes=[1, 2])
    newest = prov.core(1).replica(DEFAULT_GROUP).state
    prov.crash(1)
    prov.crash(2)
    prov.restart(1)
    prov.restart(3)                                   # node 3's disk is older than node 1's
    assert prov.run_until(lambda: sim.converged() and set(prov.core(1).replica(DEFAULT_GROUP).members) == {1, 3},
                          10)
    prov.run(2.0)
    prov.restart(2)
    assert prov.run_until(prov.settled, 30), "the cluster did not settle"
    for n in sim.nodes:
        assert prov.core(n).replica(DEFAULT_GROUP).state == newest, n
    check_decisions(prov)
    check_replicas(prov)
