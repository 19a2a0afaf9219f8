"""One provisioning node's part of the cluster, sans-IO: its groups' replicas, the plan record, statuses.

:class:`ProvisioningCore` is what both drivers run -- the trio
:class:`~.node.ProvisioningNode` and the simulator's harness (:mod:`.sim`).
Feed it, in delivery order, the ring views, the views and messages of the
provisioning spaces and their state transfers; it answers with actions
(:data:`CoreAction`) for the driver to carry out: join or leave a space,
multicast a payload in one, and the answers to operations (:class:`Answer`)
the driver's callers wait for.

The spaces (see :mod:`.state` and :mod:`.status`):

* :data:`~.status.CLUSTER_SPACE`, joined by every node: the deployment-plan
  record (a replica of :class:`~.rollout.PlansState`) and each node's
  published :class:`~.status.NodeStatus`;
* ``groupcomm.provisioning/G`` for each group ``G`` the node is in (a
  :class:`~.state.GroupReplica`).

A node's groups are its own choice, kept in membership order by the driver's
store (:class:`Membership`) and rejoined at start.  Which state each group's
bundles and configuration take *on this node* is :meth:`ProvisioningCore.desired`:
the plan-derived states first (``plan.ENV``: a deployment plan wins over
changes made by hand), then each group in membership order as the node's
sync policy (:mod:`.policy`) lets it through, over the node-local overlay.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from groupcomm.events import View
from groupcomm.layers.spaces import SpaceView
from groupcomm.services.provisioning.ops import PLANS, MalformedOp, Op, check_group_name
from groupcomm.services.provisioning.overview import node_status
from groupcomm.services.provisioning.policy import LOCAL, Refusal, SyncPolicy
from groupcomm.services.provisioning.reconcile import Actual
from groupcomm.services.provisioning.rollout import (
    HealthReporter,
    PlansState,
    RolloutDriver,
    awaiting_health,
    current_assignments,
    desired_for,
)
from groupcomm.services.provisioning.state import (
    Accepted,
    Adopt,
    GroupReplica,
    GroupState,
    GroupStore,
    OpRefused,
    Rejected,
    StateChanged,
    group_space,
)
from groupcomm.services.provisioning.status import (
    CLUSTER_SPACE,
    OP_FRAME,
    STATUS_FRAME,
    NodeStatus,
    StatusBoard,
    decode_status,
    encode_status,
)

__all__ = [
    "DEFAULT_GROUP",
    "Answer",
    "CoreAction",
    "DesiredChanged",
    "JoinSpace",
    "LeaveSpace",
    "Membership",
    "MemoryMembership",
    "Multicast",
    "NotInGroup",
    "ProvisioningCore",
]

DEFAULT_GROUP = "default"
"""The group every node is in unless it leaves it."""
MAX_ANSWERS = 4096
"""Answers to operations kept for callers that have not collected theirs yet."""


class NotInGroup(OpRefused):
    """An operation on a group this node is not in."""


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class JoinSpace:
    space: str


@dataclass(frozen=True)
class LeaveSpace:
    space: str


@dataclass(frozen=True)
class Multicast:
    """Multicast ``payload`` in ``space``; ``safe``: with safe delivery (``space_send(..., safe=True)``).

    Operations and offers are safe: a replica accepts what it delivers in a regular configuration, and
    only safe delivery makes that every member of the configuration's business (an agreed operation
    can be delivered and accepted by a side that a partition cuts off just after, and never by the
    primary side that goes on: an Accepted answer, lost)."""

    space: str
    payload: bytes
    safe: bool = False


@dataclass(frozen=True)
class Answer:
    """What became of operation ``op_id`` (delivered here: every member decided alike)."""

    op_id: str
    result: Accepted | Rejected


@dataclass(frozen=True)
class DesiredChanged:
    """Something :meth:`ProvisioningCore.desired` depends on changed: reconcile again."""


CoreAction = JoinSpace | LeaveSpace | Multicast | Answer | DesiredChanged


# --------------------------------------------------------------------------- membership store


class Membership(Protocol):
    """Where a node keeps the list of groups it is in."""

    def load_groups(self) -> list[str] | None:
        """The groups, in membership order (None: never saved, a fresh node)."""

    def save_groups(self, groups: list[str]) -> None: ...


class MemoryMembership:
    def __init__(self) -> None:
        self.groups: list[str] | None = None

    def load_groups(self) -> list[str] | None:
        return None if self.groups is None else list(self.groups)

    def save_groups(self, groups: list[str]) -> None:
        self.groups = list(groups)


# --------------------------------------------------------------------------- the core


class ProvisioningCore:
    """One node's provisioning state machine (see the module docstring).

    ``store``: the replicated states (every group's and the plan record);
    ``local_store``: the node-local overlay of each group (sync policy "node");
    ``membership``: the node's groups; ``node_id``: its member address; ``user``:
    whom the operations the core proposes itself (rollout steps, health
    reports) are recorded as."""

    def __init__(self, node: str, node_id: int, store: GroupStore, local_store: GroupStore,
                 membership: Membership, *, policy: SyncPolicy | None = None, user: str = "") -> None:
        self.node = node
        self.node_id = node_id
        self.policy = policy if policy is not None else SyncPolicy()
        self._store = store
        self._local_store = local_store
        self._membership = membership
        groups = membership.load_groups()
        if groups is None:
            groups = [DEFAULT_GROUP]
            membership.save_groups(groups)
        self._groups: list[str] = groups
        self.replicas: dict[str, GroupReplica] = {g: self._replica(g) for g in groups}
        self.local: dict[str, GroupState] = {g: local_store.load(g)[0] for g in groups}
        self.plans = GroupReplica(PLANS, store, state_type=PlansState, space=CLUSTER_SPACE, node=node,
                                  node_id=node_id)
        self.board = StatusBoard()
        self.answers: OrderedDict[str, Accepted | Rejected] = OrderedDict()
        self.dropped = 0
        """Malformed messages received in the provisioning spaces (counted, ignored)."""
        self._by_space: dict[str, GroupReplica] = {r.space: r for r in self.replicas.values()}
        self._by_space[CLUSTER_SPACE] = self.plans
        self._counter = 0
        self._ring_view: View | None = None
        self._came_along: tuple[int, ...] | None = None
        self._merging = False
        self.driver = RolloutDriver(node, self.next_op_id, user=user)
        self.reporter = HealthReporter(node, self.next_op_id, user=user)

    def _replica(self, group: str) -> GroupReplica:
        return GroupReplica(group, self._store, node=self.node, node_id=self.node_id)

    # ------------------------------------------------------------------ what the node is in

    @property
    def groups(self) -> list[str]:
        """This node's groups, in membership order."""
        return list(self._groups)

    def start(self) -> list[CoreAction]:
        """Join the cluster space and every group's space."""
        return [JoinSpace(CLUSTER_SPACE)] + [JoinSpace(group_space(g)) for g in self._groups]

    def spaces(self) -> set[str]:
        """The provisioning spaces this node is in (or joining)."""
        return set(self._by_space)

    def join_group(self, group: str) -> list[CoreAction]:
        """Join ``group`` (a group exists while a node is in it: creating one is joining it).

        Raises :class:`~groupcomm.errors.ConfigError` for a name that is not a group name."""
        check_group_name(group)
        if group in self._groups:
            return []
        self._groups.append(group)
        self._membership.save_groups(self._groups)
        replica = self.replicas[group] = self._replica(group)
        self._by_space[replica.space] = replica
        self.local[group] = self._local_store.load(group)[0]
        if self._ring_view is not None:              # the configuration it joins in, as it stands now
            replica.ring_view(self._ring_view)
            if not self._merging:
                replica.synced()
        return [JoinSpace(replica.space), DesiredChanged()]

    def leave_group(self, group: str) -> list[CoreAction]:
        """Leave ``group``: its bundles are no longer wanted here (the group's state stays stored)."""
        if group not in self._groups:
            raise NotInGroup(f"node {self.node!r} is not in group {group!r}")
        self._groups.remove(group)
        self._membership.save_groups(self._groups)
        replica = self.replicas.pop(group)
        del self._by_space[replica.space]
        self.local.pop(group, None)
        return [LeaveSpace(replica.space), DesiredChanged()]

    def replica(self, group: str) -> GroupReplica:
        """The replica of ``group``; :class:`NotInGroup` if this node is not in it."""
        replica = self.replicas.get(group)
        if replica is None:
            raise NotInGroup(f"node {self.node!r} is not in group {group!r} (join it first: "
                             f"groupcomm group join {group})")
        return replica

    # ------------------------------------------------------------------ proposing

    def next_op_id(self) -> str:
        """A fresh op_id (the driver seeds :attr:`op_counter` from its clock: never repeats)."""
        self._counter += 1
        return f"{self.node}:{self.op_counter_base + self._counter}"

    op_counter_base = 0
    """Set by the driver to a value that never repeats across restarts (its clock in ns)."""

    def propose(self, op: Op) -> list[CoreAction]:
        """Multicast ``op`` in its group's space (or the cluster space for a plan op).

        A change the sync policy keeps local is applied to the node-local overlay
        at once and answered here (Accepted with the overlay's revision).  Raises
        :class:`~.state.OpRefused` (a policy refusal, another group) and
        :class:`~.ops.MalformedOp` for an invalid op."""
        if op.group == PLANS:
            return [Multicast(CLUSTER_SPACE, OP_FRAME + self.plans.propose(op), safe=True)]
        replica = self.replica(op.group)
        decision = self.policy.outbound(op.group, op.body)
        if isinstance(decision, Refusal):
            raise OpRefused(decision.reason)
        if decision == LOCAL:
            state = self.local[op.group].apply(op)
            self._local_store.save(op.group, state, [])
            self.local[op.group] = state
            return [self._answer(op.op_id, Accepted(op, state.revision)), DesiredChanged()]
        return [Multicast(replica.space, OP_FRAME + replica.propose(op), safe=True)]

    def publish(self, status: NodeStatus) -> list[CoreAction]:
        """Multicast this node's status in the cluster space."""
        return [Multicast(CLUSTER_SPACE, encode_status(status))]

    # ------------------------------------------------------------------ inputs, in delivery order

    def ring_view(self, view: View) -> list[CoreAction]:
        self._ring_view = view
        if view.transitional:
            self._came_along = tuple(view.members)
        else:
            # The spaces layer's rule for a SYNC round (see GroupReplica.ring_view).
            if self._came_along is None or self._came_along != tuple(view.members):
                self._merging = True
            self._came_along = None
        for replica in self._by_space.values():
            replica.ring_view(view)
        return [DesiredChanged()]

    def synced(self) -> list[CoreAction]:
        """The spaces' SYNC round after a merging ring view ended."""
        self._merging = False
        for replica in self._by_space.values():
            replica.synced()
        return [DesiredChanged()]

    def space_view(self, view: SpaceView) -> list[CoreAction]:
        replica = self._by_space.get(view.space)
        if replica is None:
            return []
        actions = self._outputs(replica, replica.space_view(view))
        if view.space == CLUSTER_SPACE:
            self.board.view(view.members)
        return actions + [DesiredChanged()]

    def message(self, space: str, sender: int, payload: bytes) -> list[CoreAction]:
        replica = self._by_space.get(space)
        if replica is None:
            return []
        frame, body = payload[:1], payload[1:]
        if frame == STATUS_FRAME and space == CLUSTER_SPACE:
            try:
                self.board.update(sender, decode_status(body))
            except MalformedOp:
                self.dropped += 1
            return []
        if frame != OP_FRAME:
            self.dropped += 1
            return []
        return self._outputs(replica, replica.message(sender, body))

    def state_request(self, space: str) -> bytes | None:
        """The snapshot a joiner of ``space`` gets (None: not a space of this node)."""
        replica = self._by_space.get(space)
        return replica.state_request() if replica is not None else None

    def install_state(self, space: str, data: bytes | None) -> list[CoreAction]:
        replica = self._by_space.get(space)
        if replica is None:
            return []
        return self._outputs(replica, replica.install_state(data))

    def _outputs(self, replica: GroupReplica, outputs: Iterable[object]) -> list[CoreAction]:
        actions: list[CoreAction] = []
        for out in outputs:
            t = type(out)
            if t is Accepted:
                actions.append(self._answer(out.op.op_id, out))
            elif t is Rejected:
                actions.append(self._answer(out.op_id, out))
            elif t is StateChanged:
                actions.append(DesiredChanged())
            elif t is Adopt:
                actions.append(Multicast(replica.space, OP_FRAME + out.payload, safe=True))
        return actions

    def _answer(self, op_id: str, result: Accepted | Rejected) -> Answer:
        self.answers[op_id] = result
        while len(self.answers) > MAX_ANSWERS:
            self.answers.popitem(last=False)
        return Answer(op_id, result)

    # ------------------------------------------------------------------ derived

    @property
    def plans_state(self) -> PlansState:
        return self.plans.state

    def is_rollout_driver(self) -> bool:
        """Whether this node drives rollouts now: the oldest member of the cluster space, in a
        regular primary configuration (the next oldest takes over when it goes)."""
        members = self.plans.members
        return bool(members) and members[0] == self.node_id and self.plans.writable

    def desired(self) -> dict[str, GroupState]:
        """What this node wants, in the order :func:`~.reconcile.merge` gives precedence:
        deployment plans first, then its groups in membership order (each as its sync policy
        lets it through, over its node-local overlay)."""
        wanted: dict[str, GroupState] = dict(desired_for(self.node, self.plans.state))
        for group in self._groups:
            wanted[group] = self.policy.effective(group, self.replicas[group].state, self.local[group])
        return wanted

    def group_states(self) -> Mapping[str, GroupState]:
        """The replicated state of each of this node's groups."""
        return {g: self.replicas[g].state for g in self._groups}

    def plan_roles(self) -> dict[str, tuple[int, str]]:
        """Env -> (the rollout revision, the role) this node runs from each environment."""
        plans = self.plans.state
        out = {}
        for env in sorted(plans.envs):
            a = current_assignments(plans, env).get(self.node)
            if a is not None:
                out[env] = (a.state.revision, a.role)
        return out

    def plan_digests(self) -> set[str]:
        """Every bundle file the plan record references (kept in the store: others may pull them)."""
        return {ref.digest for hist in self.plans.state.envs.values() for r in hist.revisions
                for refs, _ in r.roles.values() for ref in refs}

    def live_nodes(self) -> list[str]:
        """The names of the cluster space's members that published a status."""
        return [s.node for s in self.board.statuses()]

    def rollout_tick(self, now: float, actual: Actual) -> list[CoreAction]:
        """Drive rollouts (on the driving node) and report this node's health as a target.

        ``now``: a monotonic clock in seconds; ``actual``: what this node has (for its health)."""
        plans = self.plans.state
        ops = self.reporter.step(now, plans, plan_health(self.node, plans, actual))
        if self.is_rollout_driver():
            ops += self.driver.step(now, plans, self.live_nodes())
        actions: list[CoreAction] = []
        for op in ops:
            actions += self.propose(op)
        return actions

    def status(self, actual: Actual) -> NodeStatus:
        """This node's status to publish, given what it has (``actual``)."""
        return node_status(self.node, self.node_id, self._groups,
                           {g: r.revision for g, r in self.replicas.items()}, self.desired(), actual,
                           plan_roles=self.plan_roles(), read_only=self.read_only_groups(),
                           local_pids=self.local_config_pids())

    def local_config_pids(self) -> set[str]:
        """Configuration PIDs this node's sync policy does not share in some group it is in."""
        out = set()
        for g in self._groups:
            for pid in set(self.replicas[g].state.configs) | set(self.local[g].configs):
                if self.policy.route(g, "configs", pid) != "shared":
                    out.add(pid)
        return out

    def read_only_groups(self) -> list[str]:
        return [g for g in self._groups if not self.replicas[g].writable]


def plan_health(node: str, plans: PlansState, actual: Actual) -> dict[str, tuple[bool | None, str]]:
    """Env -> (healthy, detail) of ``node``'s role in each running rollout it is switched to.

    True once every bundle of the role runs healthy at the wanted file; False
    when one failed (fetch or install failed, its process failed); None while
    it is still converging (starting, in back-off, not there yet)."""
    out: dict[str, tuple[bool | None, str]] = {}
    for env, assignment in awaiting_health(node, plans).items():
        verdict: bool | None = True
        detail = ""
        for name, want in sorted(assignment.state.bundles.items()):
            if want.digest in actual.failed:
                verdict, detail = False, f"{name} {want.version}: {actual.failed[want.digest]}"
                break
            proc = actual.processes.get(name)
            if proc is None or proc.digest != want.digest:
                verdict, detail = None, f"{name} {want.version} not running yet"
                continue
            if proc.state == "failed":
                verdict, detail = False, f"{name} {want.version} failed" + (f": {proc.detail}" if proc.detail else "")
                break
            if proc.state != "running" and verdict is True:
                verdict, detail = None, f"{name} {want.version} {proc.state}"
        out[env] = (verdict, detail)
    return out
