"""Deployment-plan rollouts: the replicated record, what nodes want from it, and the driver (sans-IO).

**The record.**  :class:`PlansState` is the cluster's deployment record, a
pure value shaped like :class:`~.state.GroupState` (``group`` is always
:data:`~.ops.PLANS`, ``revision``, ``recent``, ``has_applied``, ``check``,
``apply``, ``snapshot``, ``restore``), so the same replica machinery accepts
its operations (the ``plan-*`` bodies of :mod:`.ops`) only in a regular
primary configuration.  Per environment it keeps a bounded history of
rollouts (:class:`RolloutRecord`: revision, plan digest and text, roles,
targets, batch size, health timeout, forced, rollback of, who started it,
outcome and reason, the batch reached, each target's health report).

**A rollout**, revision ``N`` of environment ``E``:

* :class:`~.ops.BeginRollout` creates it, *running*, batch index -1 (nobody
  switched).  Refused while another rollout of ``E`` runs, and by the
  promotion gate: if the plan's ``environments.E.requires`` names ``S``
  (:func:`.plan.plan_requires`), a rollout of the same plan digest must have
  succeeded on ``S`` (still in its history) unless ``force`` (recorded).  A
  rollback (``rollback_of = R``) is not gated but must restore a succeeded
  revision ``R`` of ``E`` with the same digest.
* :class:`~.ops.AdvanceRollout` ``batch=k`` switches batches ``0..k``: the
  targets in order, ``batch`` nodes each.
* :class:`~.ops.ReportHealth` records a switched target's health (a later
  report replaces an earlier one).
* :class:`~.ops.EndRollout` ends it: *succeeded* (only once every target is
  switched and reported healthy) or *rolled-back* (any time).

Reports, advances and ends naming a revision that is not the running one are
refused (a stale driver).

**Signatures.**  :class:`~.ops.SetEnvPolicy` gives an environment trusted
Ed25519 keys; from then on a BeginRollout of it (forced or a rollback too) is
refused unless every bundle it deploys carries a signature one of them
verifies (:func:`.signing.signed_message_for`): checked by every replica
alike, before any node installs anything.

**What a node wants** (:func:`desired_for`): for each environment, a
synthetic group state ``plan.<env>`` (:func:`.plan.role_state`: the role's
bundles at their versions, started, and its configuration) -- the running
revision's role if the node is switched, else the last succeeded revision's
role if the node was a target there, else nothing.  So while a rollout runs
every target is at the new revision (switched) or at the previous one; once
it succeeded every target is at the new one; once it was rolled back every
one is at the previous one again.  When a node plays roles in several
environments that want the same bundle or key differently, the environment
whose assignment comes from the most recently begun rollout wins (they come
first, for :func:`.reconcile.merge`; :attr:`RolloutRecord.begun` is the
record's own revision when the rollout began, the same on every member): a
node in both preprod and prod runs what was rolled out last.

**The driver** (:class:`RolloutDriver`), run by the one member the node core
chooses (the oldest member of the plans space in a regular primary view),
proposes the advances and ends; the targets themselves propose their health
reports (:func:`report_due`, :class:`HealthReporter`).

Bounds: :data:`HISTORY` rollouts per environment and :data:`MAX_ENV_BYTES`
encoded (the oldest dropped first, but never the running one nor the last
succeeded one, which nodes fall back to); :data:`MAX_ENVIRONMENTS`
environments; :data:`~.state.RECENT_OP_IDS` op_ids for duplicates.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Annotated, Literal

import msgspec

from groupcomm.services.provisioning.ops import (
    MAX_PLAN_BYTES,
    MAX_TARGETS,
    PLANS,
    AdvanceRollout,
    BeginRollout,
    BundleRef,
    ConfigKey,
    ConfigValue,
    Detail,
    Digest,
    EndRollout,
    EnvName,
    NodeName,
    Op,
    OpId,
    Pid,
    PlanBody,
    RawPublicKey,
    ReportHealth,
    Revision,
    RoleName,
    RoleTarget,
    SetEnvPolicy,
    UserName,
)
from groupcomm.services.provisioning.plan import (
    Assignment,
    PlanError,
    plan_requires,
    plan_state_name,
    role_state,
)
from groupcomm.services.provisioning.signing import signed_message_for, verify_raw
from groupcomm.services.provisioning.state import (
    RECENT_OP_IDS,
    WRONG_GROUP,
    GroupState,
    OpRefused,
    StateCorrupt,
)

__all__ = [
    "HISTORY",
    "MAX_ENVIRONMENTS",
    "MAX_ENV_BYTES",
    "RESEND_AFTER",
    "EnvHistory",
    "Health",
    "HealthReporter",
    "NodeStatus",
    "PlansState",
    "RolloutDriver",
    "RolloutRecord",
    "RolloutStatus",
    "awaiting_health",
    "current_assignments",
    "desired_for",
    "find_rollout",
    "history",
    "report_due",
    "rollback_to",
    "status",
]

HISTORY = 20
"""Rollouts kept per environment at most (the newest and the last succeeded one are always kept)."""
MAX_ENV_BYTES = 4 * 1024 * 1024
"""An environment's kept rollouts, encoded, at most (the oldest dropped first)."""
MAX_ENVIRONMENTS = 100
RESEND_AFTER = 5.0
"""Seconds after which a proposal that has not shown in the record is proposed again (same op_id)."""
_DETAIL = 1000
_PLAN_BODIES = (BeginRollout, ReportHealth, AdvanceRollout, EndRollout, SetEnvPolicy)

Outcome = Literal["running", "succeeded", "rolled-back"]
Roles = dict[RoleName, tuple[tuple[BundleRef, ...], dict[Pid, dict[ConfigKey, ConfigValue]]]]


def _clip(text: str) -> str:
    return text if len(text) <= _DETAIL else text[:_DETAIL - 3] + "..."


# --------------------------------------------------------------------------- the record


class Health(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """A target's last health report (``at``: the reporter's wall clock)."""

    healthy: bool
    detail: Detail = ""
    at: float = 0.0


class RolloutRecord(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """One rollout (revision) of an environment."""

    revision: Revision
    plan_digest: Digest
    plan: Annotated[str, msgspec.Meta(max_length=MAX_PLAN_BYTES)]
    roles: Annotated[Roles, msgspec.Meta(max_length=100)]
    targets: Annotated[tuple[RoleTarget, ...], msgspec.Meta(max_length=MAX_TARGETS)]
    batch: Annotated[int, msgspec.Meta(ge=1, le=MAX_TARGETS)]
    health_timeout: float
    force: bool
    rollback_of: Revision
    origin_node: NodeName
    user: UserName
    at: float
    outcome: Outcome = "running"
    reason: Detail = ""
    batch_reached: Annotated[int, msgspec.Meta(ge=-1, le=MAX_TARGETS)] = -1
    """The last switched batch (0-based; -1: none)."""
    health: Annotated[dict[NodeName, Health], msgspec.Meta(max_length=MAX_TARGETS)] = {}
    ended_at: float = 0.0
    ended_by: Annotated[str, msgspec.Meta(max_length=100)] = ""
    op_id: Annotated[str, msgspec.Meta(max_length=200)] = ""
    """The op_id of the BeginRollout that started it (:func:`find_rollout`)."""
    begun: Revision = 0
    """The plan record's revision made by its BeginRollout (orders rollouts across environments)."""

    @property
    def batches(self) -> int:
        """How many batches the targets make."""
        return max(1, math.ceil(len(self.targets) / self.batch))

    @property
    def switched(self) -> tuple[RoleTarget, ...]:
        """The targets switched to this revision so far."""
        return self.targets[:(self.batch_reached + 1) * self.batch]

    def batch_of(self, node: str) -> int | None:
        """The batch ``node`` is in (None: not a target)."""
        for i, t in enumerate(self.targets):
            if t.node == node:
                return i // self.batch
        return None

    def role_of(self, node: str) -> str | None:
        """The role ``node`` gets (None: not a target)."""
        return next((t.role for t in self.targets if t.node == node), None)

    def is_switched(self, node: str) -> bool:
        b = self.batch_of(node)
        return b is not None and b <= self.batch_reached

    def assignment(self, env: str, node: str) -> Assignment | None:
        """What ``node`` gets from this revision (None: not a target)."""
        role = self.role_of(node)
        if role is None:
            return None
        return Assignment(role, role_state(env, self.revision, *self.roles[role]))


class EnvHistory(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """An environment's kept rollouts, oldest first; ``last_revision``: the highest revision ever given."""

    last_revision: Revision = 0
    revisions: tuple[RolloutRecord, ...] = ()

    @property
    def running(self) -> RolloutRecord | None:
        """The running rollout (always the newest record), if any."""
        if self.revisions and self.revisions[-1].outcome == "running":
            return self.revisions[-1]
        return None

    @property
    def last_succeeded(self) -> RolloutRecord | None:
        """The newest succeeded rollout (what the environment's targets run when none is running)."""
        return next((r for r in reversed(self.revisions) if r.outcome == "succeeded"), None)

    def get(self, revision: int) -> RolloutRecord | None:
        return next((r for r in self.revisions if r.revision == revision), None)


class PlansState(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """The cluster's deployment record, a pure value: :meth:`apply` returns a new one.

    ``recent``: the last :data:`~.state.RECENT_OP_IDS` accepted op_ids, oldest first."""

    group: Annotated[str, msgspec.Meta(max_length=100)] = PLANS
    revision: Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)] = 0
    envs: Annotated[dict[EnvName, EnvHistory], msgspec.Meta(max_length=MAX_ENVIRONMENTS)] = {}
    recent: Annotated[tuple[OpId, ...], msgspec.Meta(max_length=RECENT_OP_IDS)] = ()
    trusted_keys: Annotated[dict[EnvName, tuple[RawPublicKey, ...]], msgspec.Meta(max_length=MAX_ENVIRONMENTS)] = {}
    """Env -> the keys one of which must have signed every bundle a rollout of it deploys."""

    def has_applied(self, op_id: str) -> bool:
        """Whether ``op_id`` is among the recently accepted operations."""
        return op_id in self.recent

    def running(self, env: str) -> RolloutRecord | None:
        """The running rollout of ``env``, if any."""
        hist = self.envs.get(env)
        return hist.running if hist is not None else None

    def succeeded_with(self, env: str, plan_digest: str) -> bool:
        """Whether a rollout of ``plan_digest`` succeeded on ``env`` (among its kept rollouts)."""
        hist = self.envs.get(env)
        return hist is not None and any(r.outcome == "succeeded" and r.plan_digest == plan_digest
                                        for r in hist.revisions)

    def check(self, op: Op) -> None:
        """Raise :class:`~.state.OpRefused` if :meth:`apply` would refuse ``op`` (duplicates are not refused)."""
        body = op.body
        if body.group != self.group:
            raise OpRefused(WRONG_GROUP)
        if type(body) not in _PLAN_BODIES:
            raise OpRefused(f"not a deployment-plan operation: {type(body).__name__}")
        if type(body) is BeginRollout:
            self._check_signatures(body)
            self._check_begin(body)
            return
        if type(body) is SetEnvPolicy:
            if body.trusted_keys and body.env not in self.trusted_keys and len(self.trusted_keys) >= MAX_ENVIRONMENTS:
                raise OpRefused(f"the cluster already has {MAX_ENVIRONMENTS} environments with trusted keys")
            return
        run = self.running(body.env)
        if run is None or run.revision != body.revision:
            now = f"revision {run.revision} is" if run is not None else "none is"
            raise OpRefused(f"stale: revision {body.revision} of {body.env!r} is not the running rollout "
                            f"({now} running)")
        t = type(body)
        if t is ReportHealth:
            if run.role_of(body.node) is None:
                raise OpRefused(f"node {body.node!r} is not a target of revision {run.revision} of {body.env!r}")
            if not run.is_switched(body.node):
                raise OpRefused(f"node {body.node!r} is not switched to revision {run.revision} of "
                                f"{body.env!r} yet")
        elif t is AdvanceRollout:
            if body.batch >= run.batches:
                raise OpRefused(f"revision {run.revision} of {body.env!r} has {run.batches} batches "
                                f"(batch {body.batch} asked)")
            if body.batch <= run.batch_reached:
                raise OpRefused(f"batch {body.batch} of revision {run.revision} of {body.env!r} is switched already")
        elif body.succeeded:
            if run.batch_reached < run.batches - 1:
                raise OpRefused(f"revision {run.revision} of {body.env!r} cannot succeed: not every batch "
                                "is switched")
            waiting = [t.node for t in run.targets if not (h := run.health.get(t.node)) or not h.healthy]
            if waiting:
                raise OpRefused(_clip(f"revision {run.revision} of {body.env!r} cannot succeed: not healthy: "
                                      + ", ".join(waiting)))

    def _check_signatures(self, body: BeginRollout) -> None:
        """Every bundle must be signed by a trusted key of the environment, if it has any (a forced
        rollout and a rollback too: the gate is about promotion, this is about what runs)."""
        keys = self.trusted_keys.get(body.env)
        if not keys:
            return
        for role, (refs, _) in sorted(body.roles.items()):
            for ref in refs:
                message = signed_message_for(ref.name, ref.version, ref.digest)
                if not ref.signature or verify_raw(message, ref.signature, keys) is None:
                    state = "is not signed" if not ref.signature else "is not signed by a trusted key"
                    raise OpRefused(f"bundle {ref.name} {ref.version} (sha256 {ref.digest[:12]}) of role "
                                    f"{role!r} {state}: environment {body.env!r} deploys only bundles "
                                    f"signed by one of its {len(keys)} trusted key(s)")

    def _check_begin(self, body: BeginRollout) -> None:
        env = body.env
        hist = self.envs.get(env)
        if hist is None and len(self.envs) >= MAX_ENVIRONMENTS:
            raise OpRefused(f"the cluster already has {MAX_ENVIRONMENTS} environments")
        run = hist.running if hist is not None else None
        if run is not None:
            raise OpRefused(f"a rollout of {env!r} is running (revision {run.revision}): wait for it to end")
        if not body.targets:
            raise OpRefused(f"the rollout of {env!r} has no target nodes")
        nodes = [t.node for t in body.targets]
        if len(set(nodes)) != len(nodes):
            raise OpRefused(f"the rollout of {env!r} names a target node twice")
        missing = sorted({t.role for t in body.targets} - set(body.roles))
        if missing:
            raise OpRefused(f"the rollout of {env!r} targets roles it does not define: {', '.join(missing)}")
        if body.rollback_of:
            old = hist.get(body.rollback_of) if hist is not None else None
            if old is None or old.outcome != "succeeded":
                raise OpRefused(f"rollback: revision {body.rollback_of} of {env!r} is not a succeeded "
                                "revision in its history")
            if old.plan_digest != body.plan_digest:
                raise OpRefused(f"rollback: revision {body.rollback_of} of {env!r} deployed plan "
                                f"{old.plan_digest[:12]}, not {body.plan_digest[:12]}")
            return
        if body.force:
            return
        try:
            required = plan_requires(body.plan, env)
        except PlanError as e:
            raise OpRefused(_clip(f"the plan does not parse: {e}")) from None
        if required is not None and not self.succeeded_with(required, body.plan_digest):
            raise OpRefused(f"promotion gate: {env!r} requires that plan {body.plan_digest[:12]} succeeded "
                            f"on {required!r} first (force overrides it, recorded)")

    def apply(self, op: Op) -> PlansState:
        """The record after ``op``: revision + 1 and the change (``self`` again for a duplicate op_id).

        Raises :class:`~.state.OpRefused` (nothing changed) for what :meth:`check` refuses."""
        if self.has_applied(op.op_id):
            return self
        self.check(op)
        body = op.body
        envs = dict(self.envs)
        t = type(body)
        trusted = self.trusted_keys
        if t is SetEnvPolicy:
            trusted = {e: k for e, k in trusted.items() if e != body.env}
            if body.trusted_keys:
                trusted[body.env] = tuple(dict.fromkeys(body.trusted_keys))
        elif t is BeginRollout:
            hist = envs.get(body.env, EnvHistory())
            record = RolloutRecord(
                revision=hist.last_revision + 1, plan_digest=body.plan_digest, plan=body.plan,
                roles=body.roles, targets=body.targets, batch=body.batch, health_timeout=body.health_timeout,
                force=body.force, rollback_of=body.rollback_of, origin_node=op.origin_node, user=op.user, at=op.at,
                op_id=op.op_id, begun=self.revision + 1)
            envs[body.env] = _trim(EnvHistory(record.revision, (*hist.revisions, record)))
        else:
            hist = envs[body.env]
            run = hist.revisions[-1]
            if t is ReportHealth:
                run = msgspec.structs.replace(
                    run, health={**run.health, body.node: Health(body.healthy, body.detail, op.at)})
            elif t is AdvanceRollout:
                run = msgspec.structs.replace(run, batch_reached=body.batch)
            else:
                run = msgspec.structs.replace(run, outcome="succeeded" if body.succeeded else "rolled-back",
                                              reason=body.reason, ended_at=op.at, ended_by=op.origin_node)
            envs[body.env] = _trim(EnvHistory(hist.last_revision, (*hist.revisions[:-1], run)))
        recent = (*self.recent, op.op_id)[-RECENT_OP_IDS:]
        return PlansState(self.group, self.revision + 1, envs, recent, trusted)

    def snapshot(self) -> bytes:
        """This record as bytes (msgpack)."""
        return _encoder.encode(self)

    @staticmethod
    def restore(data: bytes) -> PlansState:
        """The record in ``data`` (from :meth:`snapshot`); :class:`~.state.StateCorrupt` if it is not valid."""
        try:
            state = _decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise StateCorrupt(f"plans state: {exc}") from None
        if state.group != PLANS:
            raise StateCorrupt(f"plans state: names group {state.group!r}, not {PLANS!r}")
        for env, hist in state.envs.items():
            if any(r.outcome == "running" for r in hist.revisions[:-1]):
                raise StateCorrupt(f"plans state: environment {env!r} has a running rollout that is not its newest")
            if any(r.revision > hist.last_revision for r in hist.revisions):
                raise StateCorrupt(f"plans state: environment {env!r} has a revision above its last one")
        return state


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(PlansState)


def _trim(hist: EnvHistory) -> EnvHistory:
    """Drop the oldest rollouts beyond :data:`HISTORY` or :data:`MAX_ENV_BYTES`, keeping the newest
    record and the last succeeded one."""
    records = list(hist.revisions)
    keep = {id(records[-1])} if records else set()
    ok = hist.last_succeeded
    if ok is not None:
        keep.add(id(ok))
    sizes = [len(_encoder.encode(r)) for r in records]
    total = sum(sizes)
    i = 0
    while i < len(records) and (len(records) > HISTORY or total > MAX_ENV_BYTES):
        if id(records[i]) in keep:
            i += 1
            continue
        total -= sizes.pop(i)
        records.pop(i)
    return hist if len(records) == len(hist.revisions) else EnvHistory(hist.last_revision, tuple(records))


# --------------------------------------------------------------------------- what nodes want


def _source(hist: EnvHistory, node: str) -> RolloutRecord | None:
    """The rollout ``node``'s assignment in this environment comes from (None: it has none)."""
    run = hist.running
    if run is not None and run.is_switched(node):
        return run
    ok = hist.last_succeeded
    return ok if ok is not None and ok.role_of(node) is not None else None


def _assignment(env: str, hist: EnvHistory, node: str) -> Assignment | None:
    record = _source(hist, node)
    return record.assignment(env, node) if record is not None else None


def desired_for(node: str, plans: PlansState) -> dict[str, GroupState]:
    """``plan.<env>`` -> the desired state ``node`` gets from each environment, the most recently
    begun rollout first (see the module docstring)."""
    sources = []
    for env in sorted(plans.envs):
        record = _source(plans.envs[env], node)
        if record is not None:
            sources.append((-record.begun, env, record))
    sources.sort(key=lambda s: s[:2])
    out: dict[str, GroupState] = {}
    for _, env, record in sources:
        a = record.assignment(env, node)
        if a is not None:
            out[plan_state_name(env)] = a.state
    return out


def current_assignments(plans: PlansState, env: str) -> dict[str, Assignment]:
    """Node -> what it has from ``env`` now (the ``current`` side of :func:`.plan.diff`)."""
    hist = plans.envs.get(env)
    if hist is None:
        return {}
    nodes = [t.node for r in (hist.last_succeeded, hist.running) if r is not None for t in r.targets]
    out = {}
    for node in dict.fromkeys(nodes):
        a = _assignment(env, hist, node)
        if a is not None:
            out[node] = a
    return out


def awaiting_health(node: str, plans: PlansState) -> dict[str, Assignment]:
    """Env -> the role ``node`` is switched to in that environment's running rollout: the bundles whose
    health the node should report (:func:`report_due`)."""
    out = {}
    for env, hist in sorted(plans.envs.items()):
        run = hist.running
        if run is not None and run.is_switched(node):
            a = run.assignment(env, node)
            if a is not None:
                out[env] = a
    return out


def report_due(node: str, plans: PlansState, env: str, healthy: bool | None, detail: str = "") -> ReportHealth | None:
    """The health report ``node`` should propose for ``env`` now, if any.

    ``healthy``: True once every bundle of its role (:func:`awaiting_health`) runs
    at the wanted version and passes its health check; False when one failed
    (fetch, install or start failed, the process failed, the health check
    fails; ``detail`` says which); None while still converging (nothing to
    report).  A report is due when the node is switched to the running
    revision and the record does not already hold the same verdict."""
    run = plans.running(env)
    if run is None or healthy is None or not run.is_switched(node):
        return None
    last = run.health.get(node)
    if last is not None and last.healthy == healthy:
        return None
    return ReportHealth(env, run.revision, node, healthy, _clip(detail))


# --------------------------------------------------------------------------- proposing


@dataclass
class _Sent:
    op: Op
    at: float


class _Proposals:
    """Remembers what was proposed per key; the same body is re-proposed (same op_id) only after a while."""

    def __init__(self, node: str, user: str, new_op_id: Callable[[], str], wall_clock: Callable[[], float],
                 resend_after: float) -> None:
        self.node, self.user = node, user
        self._new_op_id, self._wall_clock = new_op_id, wall_clock
        self.resend_after = resend_after
        self.sent: dict[object, _Sent] = {}

    def propose(self, key: object, body: PlanBody, now: float) -> list[Op]:
        prev = self.sent.get(key)
        if prev is not None and prev.op.body == body:
            if now - prev.at < self.resend_after:
                return []
            self.sent[key] = _Sent(prev.op, now)
            return [prev.op]
        op = Op(self._new_op_id(), self.node, self.user, self._wall_clock(), body)
        self.sent[key] = _Sent(op, now)
        return [op]

    def keep_only(self, keys: Collection[object]) -> None:
        self.sent = {k: v for k, v in self.sent.items() if k in keys}


class RolloutDriver:
    """The decisions of the member that drives rollouts (sans-IO).

    Call :meth:`step` whenever the record changes, the plans space's members
    change, and on a timer (every second or so); propose (multicast) every
    :class:`~.ops.Op` it returns.  For each running rollout it proposes:

    * ``AdvanceRollout(0)`` when nobody is switched yet;
    * the next batch once every switched target reported healthy and is a member;
    * ``EndRollout(succeeded)`` when the last batch is switched and all are healthy;
    * ``EndRollout(rolled back)`` on any unhealthy report of a switched target
      (the reason names the node and its detail), or when the batch switched last
      has not become healthy within ``health_timeout`` of when *this driver first
      saw it switched* (a switched target that left the members counts as not
      healthy; the reason names each node and why).

    A driver that takes over (a new instance, on another member) restarts the
    clock of the current batch: a rollout is never cut short by a clock it did
    not see, at the cost of at most one more ``health_timeout``.

    Idempotent: a step without new input proposes nothing; a proposal that has
    not shown in the record after ``resend_after`` seconds is proposed again with
    the same op_id (replicas apply an op_id once), and a refused or stale
    proposal is simply superseded by the next decision."""

    def __init__(self, node: str, new_op_id: Callable[[], str], *, user: str = "",
                 wall_clock: Callable[[], float] = time.time, resend_after: float = RESEND_AFTER) -> None:
        self.node = node
        self._proposals = _Proposals(node, user, new_op_id, wall_clock, resend_after)
        self._seen: dict[tuple[str, int, int], float] = {}

    def step(self, now: float, plans: PlansState, members: Collection[str]) -> list[Op]:
        """The operations to propose now (``now``: a monotonic clock, seconds; ``members``: live node names)."""
        ops: list[Op] = []
        live: set[tuple[str, int]] = set()
        for env, hist in sorted(plans.envs.items()):
            run = hist.running
            if run is None:
                continue
            key = (env, run.revision)
            live.add(key)
            body = self._decide(now, env, run, members)
            if body is not None:
                ops += self._proposals.propose(key, body, now)
        self._proposals.keep_only(live)
        self._seen = {k: v for k, v in self._seen.items() if (k[0], k[1]) in live}
        return ops

    def _decide(self, now: float, env: str, run: RolloutRecord, members: Collection[str]) -> PlanBody | None:
        k = run.batch_reached
        if k < 0:
            return AdvanceRollout(env, run.revision, 0)
        since = self._seen.setdefault((env, run.revision, k), now)
        switched = run.switched
        for t in switched:
            h = run.health.get(t.node)
            if h is not None and not h.healthy:
                return EndRollout(env, run.revision, False,
                                  _clip(f"{t.node} ({t.role}) unhealthy: {h.detail or 'no detail'}"))
        waiting = [t.node for t in switched
                   if t.node not in members or not (h := run.health.get(t.node)) or not h.healthy]
        if not waiting:
            if k >= run.batches - 1:
                return EndRollout(env, run.revision, True, "every target healthy")
            return AdvanceRollout(env, run.revision, k + 1)
        if now - since >= run.health_timeout:
            why = ", ".join(f"{n} ({'left the cluster' if n not in members else 'no healthy report'})"
                            for n in waiting)
            return EndRollout(env, run.revision, False,
                              _clip(f"batch {k + 1}/{run.batches} not healthy within "
                                    f"{run.health_timeout:g}s: {why}"))
        return None


class HealthReporter:
    """A target node's health reports (sans-IO): :func:`report_due` with the driver's resend rule.

    Call :meth:`step` whenever the record or the node's actual state changes and on
    a timer; propose every :class:`~.ops.Op` it returns."""

    def __init__(self, node: str, new_op_id: Callable[[], str], *, user: str = "",
                 wall_clock: Callable[[], float] = time.time, resend_after: float = RESEND_AFTER) -> None:
        self.node = node
        self._proposals = _Proposals(node, user, new_op_id, wall_clock, resend_after)

    def step(self, now: float, plans: PlansState, health: Mapping[str, tuple[bool | None, str]]) -> list[Op]:
        """``health``: env -> (healthy or None while converging, detail) for the envs of :func:`awaiting_health`."""
        ops: list[Op] = []
        live = set()
        for env in sorted(health):
            healthy, detail = health[env]
            body = report_due(self.node, plans, env, healthy, detail)
            if body is not None:
                key = (env, body.revision)
                live.add(key)
                ops += self._proposals.propose(key, body, now)
        self._proposals.keep_only(live)
        return ops


# --------------------------------------------------------------------------- status, history, rollback


@dataclass(frozen=True)
class NodeStatus:
    """One target of a rollout."""

    node: str
    role: str
    batch: int
    switched: bool
    health: Literal["healthy", "unhealthy", "waiting", "not switched"]
    detail: str


@dataclass(frozen=True)
class RolloutStatus:
    """A row of ``plan status`` / ``plan history``."""

    env: str
    revision: int
    plan_digest: str
    outcome: Outcome
    reason: str
    batch: int
    """The last switched batch, 0-based (-1: none)."""
    batches: int
    batch_size: int
    health_timeout: float
    nodes: tuple[NodeStatus, ...]
    forced: bool
    rollback_of: int
    origin_node: str
    user: str
    started_at: float
    ended_at: float | None

    @property
    def digest_prefix(self) -> str:
        return self.plan_digest[:12]


def _row(env: str, r: RolloutRecord) -> RolloutStatus:
    nodes = []
    for i, t in enumerate(r.targets):
        h = r.health.get(t.node)
        switched = r.is_switched(t.node)
        health = ("not switched" if not switched else "waiting" if h is None
                  else "healthy" if h.healthy else "unhealthy")
        nodes.append(NodeStatus(t.node, t.role, i // r.batch, switched, health, h.detail if h else ""))
    return RolloutStatus(env, r.revision, r.plan_digest, r.outcome, r.reason, r.batch_reached, r.batches, r.batch,
                         r.health_timeout, tuple(nodes), r.force, r.rollback_of, r.origin_node, r.user, r.at,
                         r.ended_at if r.outcome != "running" else None)


def status(plans: PlansState, env: str | None = None) -> list[RolloutStatus]:
    """The newest rollout of each environment (or of ``env``), environments in name order."""
    envs = sorted(plans.envs) if env is None else [env] if env in plans.envs else []
    return [_row(e, plans.envs[e].revisions[-1]) for e in envs if plans.envs[e].revisions]


def find_rollout(plans: PlansState, env: str, op_id: str) -> RolloutRecord | None:
    """The rollout of ``env`` that the BeginRollout ``op_id`` started (None: not accepted, or no longer kept):
    what ``plan apply`` watches until its outcome is no longer ``running``."""
    hist = plans.envs.get(env)
    return next((r for r in reversed(hist.revisions) if r.op_id == op_id), None) if hist is not None else None


def history(plans: PlansState, env: str) -> list[RolloutStatus]:
    """The kept rollouts of ``env``, newest first (empty for an unknown environment)."""
    hist = plans.envs.get(env)
    return [_row(env, r) for r in reversed(hist.revisions)] if hist is not None else []


def rollback_to(plans: PlansState, env: str, to: int | None = None) -> BeginRollout:
    """The rollout that restores revision ``to`` of ``env`` (default: the last succeeded one before the
    current one): its plan, roles, targets, batch size and health timeout, with ``rollback_of = to``.

    Raises :class:`~.state.OpRefused` when a rollout of ``env`` runs or there is no such revision."""
    hist = plans.envs.get(env)
    if hist is None:
        raise OpRefused(f"environment {env!r} has no rollouts")
    run = hist.running
    if run is not None:
        raise OpRefused(f"a rollout of {env!r} is running (revision {run.revision}): wait for it to end")
    succeeded = [r for r in hist.revisions if r.outcome == "succeeded"]
    current = succeeded[-1] if succeeded else None
    if to is None:
        if len(succeeded) < 2:
            raise OpRefused(f"{env!r} has no succeeded revision before the current one"
                            + (f" ({current.revision})" if current else "") + " in its history")
        target = succeeded[-2]
    else:
        found = hist.get(to)
        if found is None or found.outcome != "succeeded":
            kept = ", ".join(str(r.revision) for r in succeeded) or "none"
            raise OpRefused(f"revision {to} of {env!r} is not a succeeded revision in its history "
                            f"(succeeded: {kept})")
        if found is current:
            raise OpRefused(f"revision {to} is what {env!r} runs now")
        target = found
    return BeginRollout(env=env, plan_digest=target.plan_digest, plan=target.plan, roles=target.roles,
                        targets=target.targets, batch=target.batch, health_timeout=target.health_timeout,
                        rollback_of=target.revision)
