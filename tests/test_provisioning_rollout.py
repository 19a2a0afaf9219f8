"""Deployment-plan rollouts (groupcomm.services.provisioning.rollout): the replicated record
(begin / advance / report / end, refusals, the promotion gate and its recorded override,
bounded history, snapshots), what each node wants from it (desired_for), the driver's
decisions on a fake clock (batches, unhealthy reports, timeouts, nodes that leave, resends,
take-over), health reports, status/history rows and rollback; and a Hypothesis property over
random schedules: a rollout either completes on every target node or leaves every one at the
previous revision."""

from __future__ import annotations

import itertools

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from groupcomm.events import RingId, View
from groupcomm.layers.spaces import SpaceView
from groupcomm.services.provisioning import rollout
from groupcomm.services.provisioning.ops import (
    PLANS,
    AdvanceRollout,
    BeginRollout,
    BundleRef,
    EndRollout,
    InstallBundle,
    Op,
    ReportHealth,
    RoleTarget,
    encode_op,
)
from groupcomm.services.provisioning.plan import (
    diff,
    plan_state_name,
    planned_assignments,
    role_state,
)
from groupcomm.services.provisioning.reconcile import merge
from groupcomm.services.provisioning.rollout import (
    HISTORY,
    RESEND_AFTER,
    Health,
    HealthReporter,
    PlansState,
    RolloutDriver,
    awaiting_health,
    current_assignments,
    desired_for,
    find_rollout,
    history,
    report_due,
    rollback_to,
    status,
)
from groupcomm.services.provisioning.state import (
    RECENT_OP_IDS,
    WRONG_GROUP,
    Accepted,
    GroupReplica,
    MemoryGroupStore,
    OpRefused,
    StateCorrupt,
)

PLAN_TEXT = """\
[plan]
name = "shop"
[roles.web]
bundles = ["hello.whl"]
[roles.app]
bundles = ["app.tar.gz"]
[environments.preprod]
roles = { web = { group = "w", nodes = 2 } }
[environments.prod]
requires = "preprod"
roles = { web = { group = "w", nodes = 2 } }
"""

_ids = itertools.count(1)


def op(body, node: str = "lead", op_id: str | None = None) -> Op:
    return Op(op_id or f"{node}:{next(_ids)}", node, "alice", 1000.0, body)


def roles(version: str = "1.0", digest: str = "a") -> dict:
    return {
        "web": ((BundleRef("hello", version, digest * 64, 10, f"hello-{version}.tar.gz"),),
                {"hello": {"greeting": f"hi {version}"}}),
        "app": ((BundleRef("app", version, digest * 64, 10, f"app-{version}.tar.gz"),), {}),
    }


def begin(env: str = "preprod", nodes: tuple[str, ...] = ("n1", "n2", "n3"), *, version: str = "1.0",
          digest: str = "a", batch: int = 1, timeout: float = 10.0, force: bool = False,
          rollback_of: int = 0, plan_digest: str | None = None) -> BeginRollout:
    targets = tuple(RoleTarget(n, "web" if i % 2 == 0 else "app") for i, n in enumerate(nodes))
    return BeginRollout(env=env, plan_digest=plan_digest or digest * 64, plan=PLAN_TEXT,
                        roles=roles(version, digest), targets=targets, batch=batch, health_timeout=timeout,
                        force=force, rollback_of=rollback_of)


def apply_all(state: PlansState, *bodies) -> PlansState:
    for body in bodies:
        state = state.apply(op(body))
    return state


def succeed(state: PlansState, body: BeginRollout) -> PlansState:
    """Begin ``body`` and take it to success by hand."""
    state = apply_all(state, body)
    run = state.running(body.env)
    for k in range(run.batches):
        state = apply_all(state, AdvanceRollout(body.env, run.revision, k))
    for t in body.targets:
        state = apply_all(state, ReportHealth(body.env, run.revision, t.node, True))
    return apply_all(state, EndRollout(body.env, run.revision, True))


def want(env: str, revision: int, body: BeginRollout, node: str):
    role = next(t.role for t in body.targets if t.node == node)
    return role_state(env, revision, *body.roles[role])


# --------------------------------------------------------------------------- the record


def test_begin_advance_report_end_and_what_nodes_want() -> None:
    state = PlansState()
    assert (state.group, state.revision) == (PLANS, 0)
    first = begin(batch=2)
    started = op(first, op_id="lead:begin")
    state = state.apply(started)
    run = state.running("preprod")
    assert find_rollout(state, "preprod", "lead:begin") is run and run.op_id == "lead:begin"
    assert find_rollout(state, "preprod", "other") is None and find_rollout(state, "prod", "lead:begin") is None
    assert (run.revision, run.outcome, run.batch_reached, run.batches, run.origin_node, run.user) == \
        (1, "running", -1, 2, "lead", "alice")
    assert state.revision == 1
    assert desired_for("n1", state) == {}                      # nobody is switched yet
    state = apply_all(state, AdvanceRollout("preprod", 1, 0))
    assert desired_for("n1", state) == {"plan.preprod": want("preprod", 1, first, "n1")}
    assert desired_for("n2", state)["plan.preprod"].bundles["app"].started
    assert desired_for("n3", state) == {}
    assert awaiting_health("n2", state) == {"preprod": state.running("preprod").assignment("preprod", "n2")}
    assert awaiting_health("n3", state) == {}
    state = apply_all(state, ReportHealth("preprod", 1, "n1", True), ReportHealth("preprod", 1, "n2", True),
                      AdvanceRollout("preprod", 1, 1), ReportHealth("preprod", 1, "n3", True, "ok"))
    assert state.running("preprod").health["n3"] == Health(True, "ok", 1000.0)
    state = apply_all(state, EndRollout("preprod", 1, True, "every target healthy"))
    assert state.running("preprod") is None
    done = state.envs["preprod"].revisions[-1]
    assert (done.outcome, done.reason, done.ended_by) == ("succeeded", "every target healthy", "lead")
    assert {n: desired_for(n, state)["plan.preprod"] for n in ("n1", "n2", "n3")} == \
        {n: want("preprod", 1, first, n) for n in ("n1", "n2", "n3")}
    assert state.revision == 7
    # a second rollout: switched nodes get the new one, the others keep the first
    second = begin(nodes=("n1", "n2", "n4"), version="2.0", digest="b")
    state = apply_all(state, second, AdvanceRollout("preprod", 2, 0))
    assert desired_for("n1", state)["plan.preprod"] == want("preprod", 2, second, "n1")
    assert desired_for("n2", state)["plan.preprod"] == want("preprod", 1, first, "n2")
    assert desired_for("n3", state)["plan.preprod"] == want("preprod", 1, first, "n3")    # dropped later
    assert "plan.preprod" not in desired_for("n4", state)
    # current_assignments and diff: what the running rollout would still change
    current = current_assignments(state, "preprod")
    assert set(current) == {"n1", "n2", "n3"}
    d = diff(current, planned_assignments("preprod", 2, second.roles, second.targets))
    assert [(n.node, n.old_role, n.new_role, n.changed) for n in d.nodes] == [
        ("n1", "web", "web", False), ("n2", "app", "app", True), ("n3", "web", None, True), ("n4", None, "web", True)]
    # rolled back: everyone at the first revision again
    state = apply_all(state, EndRollout("preprod", 2, False, "n1 (web) unhealthy: boom"))
    assert {n: desired_for(n, state).get("plan.preprod") for n in ("n1", "n2", "n3", "n4")} == \
        {"n1": want("preprod", 1, first, "n1"), "n2": want("preprod", 1, first, "n2"),
         "n3": want("preprod", 1, first, "n3"), "n4": None}


def test_a_node_in_two_environments_runs_what_was_rolled_out_last() -> None:
    # n1 plays web in preprod and in prod: the environment rolled out last comes first (wins the merge).
    pre, prod = begin("preprod", ("n1",), version="1.0"), begin("prod", ("n1",), version="2.0", digest="b", force=True)
    state = succeed(succeed(PlansState(), pre), prod)
    assert list(desired_for("n1", state)) == ["plan.prod", "plan.preprod"]
    assert merge(desired_for("n1", state)).bundles["hello"].desired.version == "2.0"
    state = succeed(state, begin("preprod", ("n1",), version="3.0", digest="c"))
    assert list(desired_for("n1", state)) == ["plan.preprod", "plan.prod"]
    assert merge(desired_for("n1", state)).bundles["hello"].desired.version == "3.0"


def test_an_environment_that_requires_signatures_refuses_unsigned_bundles_forced_or_not() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from groupcomm.services.provisioning.ops import SetEnvPolicy
    from groupcomm.services.provisioning.signing import signed_message_for

    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    state = apply_all(PlansState(), SetEnvPolicy("prod", (raw,)))
    assert state.trusted_keys == {"prod": (raw,)}

    def signed(body: BeginRollout, signer) -> BeginRollout:
        roles = {role: (tuple(msgspec.structs.replace(r, signature=signer.sign(
                    signed_message_for(r.name, r.version, r.digest))) for r in refs), configs)
                 for role, (refs, configs) in body.roles.items()}
        return msgspec.structs.replace(body, roles=roles)

    unsigned = begin("prod", force=True)
    for body, why in ((unsigned, "is not signed: environment 'prod'"),
                      (signed(unsigned, other), "is not signed by a trusted key")):
        with pytest.raises(OpRefused, match=why):
            state.apply(op(body))
    assert begin("preprod") and state.apply(op(begin("preprod"))).running("preprod")    # other envs: free
    assert state.apply(op(signed(unsigned, key))).running("prod")
    lifted = apply_all(state, SetEnvPolicy("prod", ()))
    assert lifted.trusted_keys == {} and lifted.apply(op(unsigned)).running("prod")
    assert PlansState.restore(lifted.snapshot()) == lifted


def test_refusals_name_the_reason_and_change_nothing() -> None:
    state = apply_all(PlansState(), begin(batch=2))

    def refused(body, match: str) -> None:
        with pytest.raises(OpRefused, match=match):
            state.apply(op(body))

    refused(begin(), r"a rollout of 'preprod' is running \(revision 1\)")
    refused(AdvanceRollout("preprod", 7, 0), r"stale: revision 7 of 'preprod' is not the running rollout "
                                             r"\(revision 1 is running\)")
    refused(ReportHealth("prod", 1, "n1", True), r"\(none is running\)")
    refused(ReportHealth("preprod", 1, "n1", True), "node 'n1' is not switched to revision 1")
    refused(ReportHealth("preprod", 1, "n9", True), "node 'n9' is not a target")
    refused(AdvanceRollout("preprod", 1, 2), r"has 2 batches \(batch 2 asked\)")
    refused(EndRollout("preprod", 1, True), "not every batch is switched")
    refused(InstallBundle("web", "x", "1", "a" * 64, 1, "x.whl"), WRONG_GROUP)
    state = apply_all(state, AdvanceRollout("preprod", 1, 1))
    refused(AdvanceRollout("preprod", 1, 0), "batch 0 of revision 1 of 'preprod' is switched already")
    state = apply_all(state, ReportHealth("preprod", 1, "n1", True), ReportHealth("preprod", 1, "n2", False, "x"))
    refused(EndRollout("preprod", 1, True), "cannot succeed: not healthy: n2, n3")
    refused(BeginRollout(env="e2", plan_digest="a" * 64, plan=PLAN_TEXT, roles=roles(), targets=(), batch=1,
                         health_timeout=1.0), "no target nodes")
    refused(begin(env="e2", nodes=("n1", "n1")), "names a target node twice")
    refused(msgspec.structs.replace(begin(env="e2"), targets=(RoleTarget("n1", "db"),)),
            "targets roles it does not define: db")
    # a duplicate op_id is applied once
    o = op(EndRollout("preprod", 1, False, "stop"))
    after = state.apply(o)
    assert after.apply(o) is after and after.revision == state.revision + 1


def test_promotion_gate_and_its_recorded_override() -> None:
    state = PlansState()
    with pytest.raises(OpRefused, match=r"promotion gate: 'prod' requires that plan aaaaaaaaaaaa succeeded on "
                                        r"'preprod' first \(force overrides it, recorded\)"):
        state.apply(op(begin("prod")))
    forced = apply_all(state, begin("prod", force=True))
    assert forced.running("prod").force and status(forced, "prod")[0].forced
    # preprod fails with the digest: still gated; succeeds: prod accepts the same digest, not another
    state = apply_all(state, begin("preprod"), AdvanceRollout("preprod", 1, 0), EndRollout("preprod", 1, False))
    with pytest.raises(OpRefused, match="promotion gate"):
        state.apply(op(begin("prod")))
    state = succeed(state, begin("preprod"))
    assert state.succeeded_with("preprod", "a" * 64)
    accepted = apply_all(state, begin("prod"))
    assert not accepted.running("prod").force
    with pytest.raises(OpRefused, match="promotion gate"):
        state.apply(op(begin("prod", digest="b")))
    # a plan text that does not parse cannot pass a gate
    broken = msgspec.structs.replace(begin("prod"), plan="[plan")
    with pytest.raises(OpRefused, match="the plan does not parse"):
        state.apply(op(broken))


def test_rollback_to_restores_a_succeeded_revision_ungated() -> None:
    state = succeed(PlansState(), begin("prod", force=True))                         # revision 1
    with pytest.raises(OpRefused, match="no succeeded revision before the current one"):
        rollback_to(state, "prod")
    state = succeed(state, begin("prod", version="2.0", digest="b", force=True))     # revision 2
    state = apply_all(state, begin("prod", version="3.0", digest="c", force=True))   # revision 3, running
    with pytest.raises(OpRefused, match="is running"):
        rollback_to(state, "prod")
    state = apply_all(state, EndRollout("prod", 3, False, "bad"))
    back = rollback_to(state, "prod")
    assert (back.rollback_of, back.plan_digest, back.targets, back.force) == \
        (1, "a" * 64, begin("prod").targets, False)
    assert rollback_to(state, "prod", to=1) == back
    with pytest.raises(OpRefused, match=r"revision 3 of 'prod' is not a succeeded revision in its history "
                                        r"\(succeeded: 1, 2\)"):
        rollback_to(state, "prod", to=3)
    with pytest.raises(OpRefused, match="revision 2 is what 'prod' runs now"):
        rollback_to(state, "prod", to=2)
    with pytest.raises(OpRefused, match="has no rollouts"):
        rollback_to(state, "nowhere")
    state = succeed(state, back)                 # not gated although prod requires preprod
    last = state.envs["prod"].revisions[-1]
    assert (last.revision, last.rollback_of, last.outcome) == (4, 1, "succeeded")
    assert desired_for("n1", state)["plan.prod"].bundles["hello"].version == "1.0"
    # the record refuses a rollback that restores no succeeded revision, or another digest
    with pytest.raises(OpRefused, match="revision 3 of 'prod' is not a succeeded revision"):
        state.apply(op(msgspec.structs.replace(back, rollback_of=3, plan_digest="c" * 64)))
    with pytest.raises(OpRefused, match="rollback: revision 2 of 'prod' deployed plan bbbbbbbbbbbb"):
        state.apply(op(msgspec.structs.replace(back, rollback_of=2)))


def test_history_is_bounded_but_keeps_the_last_succeeded(monkeypatch: pytest.MonkeyPatch) -> None:
    state = succeed(PlansState(), begin())
    for i in range(HISTORY + 5):
        state = apply_all(state, begin(version=f"2.{i}", digest="b"), EndRollout("preprod", i + 2, False, "no"))
    hist = state.envs["preprod"]
    assert len(hist.revisions) == HISTORY and hist.revisions[0].revision == 1
    assert hist.last_revision == HISTORY + 6 and hist.revisions[1].revision == 8
    assert hist.revisions[-1].revision == HISTORY + 6
    assert desired_for("n1", state)["plan.preprod"].bundles["hello"].version == "1.0"
    assert [r.revision for r in history(state, "preprod")][:2] == [HISTORY + 6, HISTORY + 5]
    # the byte bound: only the newest record and the last succeeded one fit
    monkeypatch.setattr(rollout, "MAX_ENV_BYTES", 1)
    state = apply_all(state, begin(version="9", digest="c"))
    assert [r.revision for r in state.envs["preprod"].revisions] == [1, HISTORY + 7]


def test_recent_op_ids_are_bounded() -> None:
    state = apply_all(PlansState(), begin(nodes=("n1",)), AdvanceRollout("preprod", 1, 0))
    for i in range(RECENT_OP_IDS + 3):
        state = state.apply(op(ReportHealth("preprod", 1, "n1", i % 2 == 0), op_id=f"r{i}"))
    assert len(state.recent) == RECENT_OP_IDS and not state.has_applied("r0") and state.has_applied("r5")


def test_snapshot_round_trip_and_corrupt_snapshots() -> None:
    state = succeed(PlansState(), begin())
    state = apply_all(state, begin(version="2.0", digest="b"), AdvanceRollout("preprod", 2, 0))
    assert PlansState.restore(state.snapshot()) == state
    for bad in (b"", b"\x93junk", msgspec.msgpack.encode(["web", 0, {}, []])):
        with pytest.raises(StateCorrupt):
            PlansState.restore(bad)
    hist = state.envs["preprod"]
    twice = msgspec.structs.replace(state, envs={"preprod": msgspec.structs.replace(
        hist, revisions=(hist.revisions[-1], hist.revisions[-1]))})
    with pytest.raises(StateCorrupt, match="running rollout that is not its newest"):
        PlansState.restore(twice.snapshot())


def test_status_and_history_rows() -> None:
    state = succeed(PlansState(), begin("preprod"))
    state = apply_all(state, begin("prod", nodes=("n1", "n2", "n3", "n4"), batch=2),
                      AdvanceRollout("prod", 1, 0), ReportHealth("prod", 1, "n2", False, "port in use"))
    assert [r.env for r in status(state)] == ["preprod", "prod"]
    (row,) = status(state, "prod")
    assert (row.revision, row.digest_prefix, row.outcome, row.batch, row.batches, row.batch_size, row.forced,
            row.origin_node, row.user, row.ended_at) == (1, "a" * 12, "running", 0, 2, 2, False, "lead", "alice",
                                                         None)
    assert [(n.node, n.role, n.batch, n.switched, n.health, n.detail) for n in row.nodes] == [
        ("n1", "web", 0, True, "waiting", ""), ("n2", "app", 0, True, "unhealthy", "port in use"),
        ("n3", "web", 1, False, "not switched", ""), ("n4", "app", 1, False, "not switched", "")]
    assert status(state, "nowhere") == [] and history(state, "nowhere") == []
    (pre,) = history(state, "preprod")
    assert pre.outcome == "succeeded" and pre.ended_at == 1000.0


# --------------------------------------------------------------------------- reports and the driver


def test_report_due_once_switched_and_when_the_verdict_changes() -> None:
    state = apply_all(PlansState(), begin(nodes=("n1", "n2")))
    assert report_due("n1", state, "preprod", True) is None                # not switched
    state = apply_all(state, AdvanceRollout("preprod", 1, 0))
    assert report_due("n1", state, "preprod", None) is None                # still converging
    assert report_due("n2", state, "preprod", True) is None                # not switched
    assert report_due("n1", state, "nowhere", True) is None
    due = report_due("n1", state, "preprod", True, "x" * 2000)
    assert due == ReportHealth("preprod", 1, "n1", True, "x" * 997 + "...")
    state = apply_all(state, due)
    assert report_due("n1", state, "preprod", True, "other detail") is None
    assert report_due("n1", state, "preprod", False, "died") == ReportHealth("preprod", 1, "n1", False, "died")
    # the reporter proposes once, resends the same op_id after a while, and forgets when delivered
    clock = iter(range(100))
    reporter = HealthReporter("n1", lambda: f"n1:{next(clock)}", wall_clock=lambda: 5.0)
    (first,) = reporter.step(0.0, state, {"preprod": (False, "died")})
    assert first.body == ReportHealth("preprod", 1, "n1", False, "died") and first.at == 5.0
    assert reporter.step(1.0, state, {"preprod": (False, "died")}) == []
    assert reporter.step(RESEND_AFTER, state, {"preprod": (False, "died")}) == [first]
    state = state.apply(first)
    assert reporter.step(20.0, state, {"preprod": (False, "died")}) == []


class Harness:
    """A record, one driver, a fake clock, and members."""

    def __init__(self, body: BeginRollout, members: set[str] | None = None) -> None:
        self.state = apply_all(PlansState(), body)
        self.now = 0.0
        self.members = members if members is not None else {t.node for t in body.targets}
        self.ids = itertools.count()
        self.driver = self.new_driver("d0")

    def new_driver(self, node: str) -> RolloutDriver:
        return RolloutDriver(node, lambda: f"{node}:{next(self.ids)}", wall_clock=lambda: 0.0)

    def step(self) -> list:
        return [o.body for o in self.driver.step(self.now, self.state, self.members)]

    def deliver(self, *bodies) -> None:
        self.state = apply_all(self.state, *bodies)


def test_driver_advances_batch_by_batch_and_succeeds() -> None:
    h = Harness(begin(nodes=("n1", "n2", "n3"), batch=2))
    assert h.step() == [AdvanceRollout("preprod", 1, 0)]
    assert h.step() == []                                                  # idempotent
    h.deliver(AdvanceRollout("preprod", 1, 0))
    assert h.step() == []                                                  # waiting for health
    h.deliver(ReportHealth("preprod", 1, "n1", True))
    assert h.step() == []
    h.deliver(ReportHealth("preprod", 1, "n2", True))
    assert h.step() == [AdvanceRollout("preprod", 1, 1)]
    h.deliver(AdvanceRollout("preprod", 1, 1), ReportHealth("preprod", 1, "n3", True))
    assert h.step() == [EndRollout("preprod", 1, True, "every target healthy")]
    h.deliver(EndRollout("preprod", 1, True, "every target healthy"))
    assert h.step() == [] and h.state.envs["preprod"].revisions[-1].outcome == "succeeded"


def test_driver_rolls_back_on_an_unhealthy_report_naming_node_and_detail() -> None:
    h = Harness(begin(nodes=("n1", "n2")))
    h.deliver(AdvanceRollout("preprod", 1, 0), ReportHealth("preprod", 1, "n1", False, "health check: 503"))
    assert h.step() == [EndRollout("preprod", 1, False, "n1 (web) unhealthy: health check: 503")]


def test_driver_times_out_a_batch_and_names_who_is_missing() -> None:
    h = Harness(begin(nodes=("n1", "n2", "n3"), batch=2, timeout=10.0))
    h.deliver(AdvanceRollout("preprod", 1, 0), ReportHealth("preprod", 1, "n1", True))
    assert h.step() == []                      # the clock of batch 0 starts now (0.0)
    h.now = 9.9
    assert h.step() == []
    h.now = 10.0
    assert h.step() == [EndRollout("preprod", 1, False, "batch 1/2 not healthy within 10s: n2 (no healthy report)")]


def test_a_switched_target_that_left_counts_as_not_healthy() -> None:
    h = Harness(begin(nodes=("n1", "n2"), timeout=10.0))
    h.deliver(AdvanceRollout("preprod", 1, 0), ReportHealth("preprod", 1, "n1", True))
    h.members.discard("n1")
    assert h.step() == []                      # no advance while n1 is away
    h.members.add("n1")
    h.step()
    h.members.discard("n1")
    h.now = 10.0
    assert h.step() == [EndRollout("preprod", 1, False, "batch 1/2 not healthy within 10s: n1 (left the cluster)")]


def test_driver_resends_with_the_same_op_id_and_supersedes_a_changed_decision() -> None:
    h = Harness(begin(nodes=("n1", "n2")))
    (first,) = h.driver.step(0.0, h.state, h.members)
    assert h.driver.step(RESEND_AFTER - 0.1, h.state, h.members) == []
    assert h.driver.step(RESEND_AFTER, h.state, h.members) == [first]       # lost? the same op again
    h.state = h.state.apply(first)
    h.state = h.state.apply(first)                                          # delivered twice: applied once
    assert h.state.running("preprod").batch_reached == 0 and h.state.revision == 2
    h.deliver(ReportHealth("preprod", 1, "n1", False, "boom"))
    (end,) = h.driver.step(RESEND_AFTER + 1, h.state, h.members)
    assert end.body.reason == "n1 (web) unhealthy: boom" and end.op_id != first.op_id


def test_a_driver_that_takes_over_restarts_the_batch_clock() -> None:
    h = Harness(begin(nodes=("n1", "n2"), timeout=10.0))
    h.deliver(AdvanceRollout("preprod", 1, 0))
    assert h.step() == []                                     # old driver saw batch 0 at 0.0
    h.now = 8.0
    h.driver = h.new_driver("d1")                             # the old one is gone
    assert h.step() == []                                     # d1 sees batch 0 first at 8.0
    h.now = 17.9
    assert h.step() == []
    h.now = 18.0
    assert h.step()[0].succeeded is False
    # a taken-over rollout that is healthy just continues
    h2 = Harness(begin(nodes=("n1", "n2")))
    h2.deliver(AdvanceRollout("preprod", 1, 0), ReportHealth("preprod", 1, "n1", True))
    h2.driver = h2.new_driver("d1")
    assert h2.step() == [AdvanceRollout("preprod", 1, 1)]


# --------------------------------------------------------------------------- the replica


def test_group_replica_replicates_the_plans_record() -> None:
    replicas = [GroupReplica(PLANS, MemoryGroupStore(), state_type=PlansState, space="groupcomm.provisioning")
                for _ in range(2)]
    for r in replicas:
        r.ring_view(View((1, 2), RingId(1, 4), False, True))
        r.synced()                                   # the spaces' SYNC round after the first view ended
        r.space_view(SpaceView((1, 2), (1, 2), (), "groupcomm.provisioning", (1, 4, 0)))
    o = op(begin())
    for r in replicas:
        out = r.message(1, encode_op(o))
        assert out[0] == Accepted(o, 1)
    assert replicas[0].state == replicas[1].state and replicas[0].state.running("preprod").revision == 1
    fresh = GroupReplica(PLANS, MemoryGroupStore(), state_type=PlansState, space="groupcomm.provisioning")
    fresh.install_state(replicas[0].state_request())
    assert fresh.state == replicas[0].state


# --------------------------------------------------------------------------- the property

NODES = ("n1", "n2", "n3", "n4", "n5", "n6")

# an action: (what, a number: an index or a time step, a health verdict); delivering and driving are
# drawn more often so that schedules get far into rollouts
KINDS = ("tick", "drive", "drive", "report", "report_all", "report_all", "deliver", "deliver", "deliver",
         "deliver", "duplicate", "lose", "takeover", "leave", "rejoin")
actions = st.tuples(st.sampled_from(KINDS), st.integers(0, 20), st.sampled_from([True, True, True, False, None]))


@given(
    old_targets=st.lists(st.sampled_from(NODES), min_size=1, max_size=4, unique=True),
    new_targets=st.lists(st.sampled_from(NODES), min_size=1, max_size=5, unique=True),
    batch=st.integers(1, 3),
    schedule=st.lists(actions, min_size=20, max_size=80),
    final_health=st.lists(st.sampled_from([True, True, False, None]), min_size=len(NODES), max_size=len(NODES)),
)
def test_a_rollout_ends_all_new_or_all_previous(old_targets, new_targets, batch, schedule, final_health) -> None:
    env, timeout = "prod", 10.0
    old = begin(env, tuple(old_targets), force=True)
    new = begin(env, tuple(new_targets), version="2.0", digest="b", batch=batch, timeout=timeout, force=True)
    state = succeed(PlansState(), old)
    state = state.apply(op(new))
    revision = state.running(env).revision
    previous = {n: want(env, 1, old, n) if n in old_targets else None for n in NODES}
    wanted = {n: want(env, revision, new, n) if n in new_targets else None for n in NODES}
    name = plan_state_name(env)
    ids = itertools.count()
    now = 0.0
    members = set(NODES)
    drivers = [RolloutDriver("d0", lambda: f"d:{next(ids)}", wall_clock=lambda: 0.0)]
    reporters = {n: HealthReporter(n, lambda n=n: f"{n}:{next(ids)}", wall_clock=lambda: 0.0) for n in NODES}
    pending: list[Op] = []

    def deliver(o: Op) -> None:
        nonlocal state
        try:
            state = state.apply(o)
        except OpRefused:
            return
        check()

    def check() -> None:
        run = state.envs[env].revisions[-1]
        assert run.revision == revision
        for n in NODES:
            got = desired_for(n, state).get(name)
            if run.outcome == "succeeded":
                assert got == wanted[n]
            elif run.outcome == "rolled-back":
                assert got == previous[n]
            elif n in new_targets and run.is_switched(n):
                assert got == wanted[n]
            else:
                assert got == previous[n]
        if run.outcome == "succeeded":
            assert all(run.health[t].healthy for t in new_targets)

    def report(n: str, healthy: bool | None) -> None:
        if awaiting_health(n, state):
            pending.extend(reporters[n].step(now, state, {env: (healthy, "detail" if healthy is False else "")}))

    for kind, arg, healthy in schedule:
        if kind == "tick":
            now += (0.5, 1.0, 3.0, 6.0)[arg % 4]
        elif kind == "drive":
            pending.extend(drivers[-1].step(now, state, members))
        elif kind == "report":
            report(NODES[arg % len(NODES)], healthy)
        elif kind == "report_all":
            for n in NODES:
                report(n, healthy)
        elif kind in ("deliver", "duplicate", "lose") and pending:
            o = pending[arg % len(pending)]
            if kind != "duplicate":
                pending.remove(o)
            if kind != "lose":
                deliver(o)
        elif kind == "takeover":
            drivers.append(RolloutDriver(f"d{len(drivers)}", lambda: f"d:{next(ids)}", wall_clock=lambda: 0.0))
        elif kind == "leave":
            members.discard(NODES[arg % len(NODES)])
        elif kind == "rejoin":
            members.add(NODES[arg % len(NODES)])

    # then the network heals and time goes on: the rollout ends within a bounded number of steps
    members = set(NODES)
    batches = state.envs[env].revisions[-1].batches
    for _ in range(int((batches + 1) * (timeout + RESEND_AFTER + 2))):
        if state.running(env) is None:
            break
        now += 1.0
        for i, n in enumerate(NODES):
            report(n, final_health[i])
        pending.extend(drivers[-1].step(now, state, members))
        while pending:
            deliver(pending.pop(0))
    else:
        pytest.fail("the rollout did not end")
    run = state.envs[env].revisions[-1]
    assert run.outcome in ("succeeded", "rolled-back")
    at = wanted if run.outcome == "succeeded" else previous
    assert {n: desired_for(n, state).get(name) for n in NODES} == at
