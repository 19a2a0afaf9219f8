"""Provisioning nodes on :class:`~groupcomm.testing.SimCluster`, with a fake executor, in virtual time.

Each simulated node runs the real :class:`~.node_core.ProvisioningCore` fed by
the real layers of its simulated member (ring views, the provisioning spaces'
views, messages and state transfers, in delivery order).  What a node keeps on
disk -- its replicated states, its node-local overlay, its groups, its bundle
store and environments -- outlives its crashes; its processes die with it.

The executor is faked: a node carries out each reconcile pass
(:func:`~.reconcile.reconcile` of :meth:`~.node_core.ProvisioningCore.desired`
against what it has) after a small random delay -- a fetch puts the file in
its store, an install makes the environment, a start runs the process, which
*fails* when the bundle's version is in ``bad`` (its health check fails).
Nodes publish their status and run the rollout loop on timers, as the trio
driver does.

Everything the harness saw is recorded for the checks: every accepted
operation with the ring view it was delivered in and the state before and
after (:attr:`SimProvisioning.accepts`), every answer with its configuration
(:attr:`SimProvisioning.answers`)::

    sim = SimCluster(3, seed=1, stack="sim", quorum=QuorumConfig(expected_votes=3))
    prov = SimProvisioning(sim)
    prov.run_until(prov.settled, 20)
    op_id = prov.propose(1, InstallBundle("default", "hello", "1.0", digest, 10, "hello-1.0.tar.gz"))
    prov.run_until(lambda: prov.answer(1, op_id) is not None, 5)
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from groupcomm.events import View
from groupcomm.layers.spaces import SpaceMessage, SpaceView, Synced
from groupcomm.services.provisioning.node_core import (
    Answer,
    DesiredChanged,
    JoinSpace,
    LeaveSpace,
    MemoryMembership,
    Multicast,
    ProvisioningCore,
)
from groupcomm.services.provisioning.ops import PLANS, Body, Op
from groupcomm.services.provisioning.policy import SyncPolicy
from groupcomm.services.provisioning.reconcile import (
    Actual,
    ConfigChanged,
    EnvFact,
    Fetch,
    GcStore,
    Install,
    ProcessFact,
    Start,
    Stop,
    Uninstall,
    reconcile,
)
from groupcomm.services.provisioning.rollout import (
    HealthReporter,
    RolloutDriver,
)
from groupcomm.services.provisioning.state import (
    Accepted,
    GroupReplica,
    MemoryGroupStore,
    Rejected,
    ReplicatedState,
    group_space,
)
from groupcomm.services.provisioning.status import (
    CLUSTER_SPACE,
)
from groupcomm.testing.sim import SimCluster
from groupcomm.testing.stepping import SteppedHarness

__all__ = ["AcceptRecord", "AnswerRecord", "HostModel", "SimHost", "SimProvisioning"]

_US = 1_000_000
BAD_DETAIL = "health check failed"


@dataclass(frozen=True)
class HostModel:
    """How the fake executor and the driver's timers behave (virtual seconds)."""

    action_delay: tuple[float, float] = (0.02, 0.2)
    """How long one reconcile pass's actions take (fetch, install, start, stop ...)."""
    reconcile_interval: float = 1.0
    """A reconcile pass also runs this often without a change."""
    status_interval: float = 1.0
    """How often a node publishes its status (and after every view of the cluster space)."""
    rollout_interval: float = 0.5
    """How often a node runs :meth:`~.node_core.ProvisioningCore.rollout_tick`."""


@dataclass
class SimHost:
    """What a simulated node has: ``store`` and ``envs`` are on its disk, ``processes`` die with it."""

    store: set[str] = field(default_factory=set)
    envs: set[EnvFact] = field(default_factory=set)
    processes: dict[str, ProcessFact] = field(default_factory=dict)

    def actual(self) -> Actual:
        return Actual(frozenset(self.store), frozenset(self.envs), dict(self.processes))


@dataclass(frozen=True)
class AcceptRecord:
    """An operation accepted at ``node`` (in ``space``), the ring view it came with, the state around it."""

    time: float
    node: int
    space: str
    view: View | None
    accepted: Accepted
    before: ReplicatedState
    after: ReplicatedState


@dataclass(frozen=True)
class AnswerRecord:
    """What ``node`` decided about an operation, and in which ring view."""

    time: float
    node: int
    op_id: str
    result: Accepted | Rejected
    view: View | None
    members: tuple[int, ...] = ()
    """The space's members at the deciding node when it delivered the operation."""
    space_view: tuple[int, int, int] | None = None
    """The :attr:`~groupcomm.layers.spaces.SpaceView.view_id` of the space view the deciding node
    delivered the operation in (None: not decided on a delivery).  The members of one space view
    deliver the same messages in one ring configuration, so with :attr:`view` it tells copies of
    an operation apart (a resend has the same op_id)."""


@dataclass
class _Disk:
    store: MemoryGroupStore = field(default_factory=MemoryGroupStore)
    local: MemoryGroupStore = field(default_factory=MemoryGroupStore)
    membership: MemoryMembership = field(default_factory=MemoryMembership)
    host: SimHost = field(default_factory=SimHost)


@dataclass
class _Node:
    core: ProvisioningCore
    incarnation: int
    view: View | None = None
    busy: bool = False
    """A reconcile pass is being carried out."""
    again: bool = False
    """The desired state changed during the pass: run another one after it."""
    space_views: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    """Space -> the view_id of the last view of it this incarnation installed."""


class SimProvisioning(SteppedHarness):
    """A provisioning node on every node of ``sim`` (built with ``stack=...``).

    ``names``: node id -> node name (default ``n<ID>``); ``policies``: node id ->
    its :class:`~.policy.SyncPolicy` (default: everything ``cluster``);
    ``bad``: bundle versions whose processes fail their health check.  Drive
    time with :meth:`run` / :meth:`run_until`; faults with :meth:`crash`,
    :meth:`restart` (instead of ``sim.crash``/``sim.restart``) and ``sim``'s
    partitions, loss and cuts.
    """

    def __init__(self, sim: SimCluster, names: Mapping[int, str] | None = None, *,
                 policies: Mapping[int, SyncPolicy] | None = None, model: HostModel | None = None,
                 bad: Collection[str] = (), seed: int = 0, step: float = 0.01) -> None:
        self.sim = sim
        self.model = model or HostModel()
        self.bad = frozenset(bad)
        self.step = step
        self.names = {n: (names or {}).get(n, f"n{n}") for n in sim.nodes}
        self.ids = {name: n for n, name in self.names.items()}
        self.policies = dict(policies or {})
        self.disks = {n: _Disk() for n in sim.nodes}
        """Each node's disk (outlives its crashes)."""
        self._rng = random.Random(seed)
        self._nodes: dict[int, _Node] = {}
        self._incarnations = dict.fromkeys(sim.nodes, 0)
        self._timers: list[tuple[int, int, int, int, Callable[[], None]]] = []
        self._order = 0
        self._deferred: list[tuple[int, int, Callable[[], None]]] = []
        # the space's members and space view at the node delivering an op (see AnswerRecord)
        self._delivering: tuple[tuple[int, ...], tuple[int, int, int] | None] = ((), None)
        self.accepts: list[AcceptRecord] = []
        """Every operation accepted anywhere, in delivery order."""
        self.answers: dict[int, dict[str, AnswerRecord]] = {n: {} for n in sim.nodes}
        """Node -> op_id -> the answer it delivered (the last one, across its incarnations)."""
        self.answer_log: list[AnswerRecord] = []
        """Every answer, in order."""
        sim.services.add_observer(self._observe)
        for node in sim.nodes:
            if node in sim.live:
                self._boot(node)

    # ------------------------------------------------------------------ API

    def core(self, node: int) -> ProvisioningCore | None:
        """The running core of ``node`` (None while it is crashed)."""
        entry = self._nodes.get(node)
        return entry.core if entry is not None else None

    @property
    def running(self) -> tuple[int, ...]:
        """Nodes whose provisioning core runs."""
        return tuple(sorted(self._nodes))

    def propose(self, node: int, body: Body, *, user: str = "") -> str:
        """Propose ``body`` at ``node``; its op_id (see :meth:`answer`).

        Raises what :meth:`~.node_core.ProvisioningCore.propose` raises (a policy refusal, another group)."""
        core = self._entry(node).core
        op = Op(core.next_op_id(), core.node, user, self.sim.now, body)
        self._apply(node, core.propose(op))
        return op.op_id

    def answer(self, node: int, op_id: str) -> Accepted | Rejected | None:
        """What ``node`` decided about ``op_id`` (None: not delivered there yet)."""
        rec = self.answers[node].get(op_id)
        return rec.result if rec is not None else None

    def join_group(self, node: int, group: str) -> None:
        self._apply(node, self._entry(node).core.join_group(group))

    def leave_group(self, node: int, group: str) -> None:
        self._apply(node, self._entry(node).core.leave_group(group))

    def crash(self, node: int) -> None:
        """Crash ``node``: its core and its processes die; its disk stays."""
        self.sim.crash(node)
        self._nodes.pop(node, None)
        self.disks[node].host.processes.clear()
        self._deferred = [d for d in self._deferred if d[0] != node]

    def restart(self, node: int) -> None:
        """Start a crashed node again: a new core on its disk, which rejoins its groups."""
        self.sim.restart(node)
        self._boot(node)

    def desired(self, node: int) -> dict[str, Any]:
        """What ``node`` wants (:meth:`~.node_core.ProvisioningCore.desired`)."""
        return self._entry(node).core.desired()

    def actual(self, node: int) -> Actual:
        """What ``node`` has."""
        return self.disks[node].host.actual()

    def primary_history(self, group: str) -> list[tuple[int, Op]]:
        """(revision, op) of every operation accepted in ``group`` (or :data:`~.ops.PLANS`), by revision
        then first delivery, each once."""
        space = CLUSTER_SPACE if group == PLANS else group_space(group)
        seen: dict[tuple[int, str], tuple[int, int, Op]] = {}
        for i, rec in enumerate(self.accepts):
            if rec.space == space:
                key = (rec.accepted.revision, rec.accepted.op.op_id)
                seen.setdefault(key, (rec.accepted.revision, i, rec.accepted.op))
        return [(rev, op) for rev, _, op in sorted(seen.values(), key=lambda t: (t[0], t[1]))]

    def replicas(self, space: str) -> dict[int, GroupReplica]:
        """Node -> its replica of ``space`` (a group's space or the cluster space), for running nodes in it."""
        out = {}
        for node, entry in self._nodes.items():
            replica = _replica_of(entry.core, space)
            if replica is not None:
                out[node] = replica
        return out

    def converging(self, node: int) -> bool:
        """Whether ``node`` still has something to do to have what it wants."""
        entry = self._nodes.get(node)
        if entry is None:
            return False
        return entry.busy or bool(reconcile(entry.core.desired(), self.disks[node].host.actual()))

    def settled(self) -> bool:
        """The ring converged; every running node is in each of its spaces and agrees with the other
        members there, has nothing left to do (reconcile), and no rollout runs."""
        sim = self.sim
        if not sim.converged() or self._deferred or set(self._nodes) != set(sim.live):
            return False
        spaces = {CLUSTER_SPACE} | {group_space(g) for e in self._nodes.values() for g in e.core.groups}
        for space in spaces:
            replicas = self.replicas(space)
            if len({r.state.snapshot() for r in replicas.values()}) > 1:
                return False
            for node, r in replicas.items():
                if set(r.members) != set(replicas) or not r.writable or node not in r.members:
                    return False
        for node, entry in self._nodes.items():
            if self.converging(node):
                return False
            if any(h.running is not None for h in entry.core.plans_state.envs.values()):
                return False
        return True

    # ------------------------------------------------------------------ time

    def _after_step(self) -> None:
        now = self.sim.now_us
        while self._timers and self._timers[0][0] <= now:
            _, _, node, incarnation, fire = heapq.heappop(self._timers)
            entry = self._nodes.get(node)
            if entry is not None and entry.incarnation == incarnation:
                fire()
        self._flush()

    def _flush(self) -> None:
        while self._deferred:
            deferred, self._deferred = self._deferred, []
            for node, incarnation, act in deferred:
                entry = self._nodes.get(node)
                if entry is not None and entry.incarnation == incarnation and node in self.sim.live:
                    act()

    def _later(self, node: int, delay: float, fire: Callable[[], None]) -> None:
        self._order += 1
        heapq.heappush(self._timers, (self.sim.now_us + max(1, round(delay * _US)), self._order, node,
                                      self._nodes[node].incarnation, fire))

    def _every(self, node: int, interval: float, fire: Callable[[], None]) -> None:
        def tick() -> None:
            fire()
            if node in self._nodes:
                self._later(node, interval, tick)
        self._later(node, self._rng.uniform(0.0, interval), tick)

    # ------------------------------------------------------------------ nodes

    def _entry(self, node: int) -> _Node:
        entry = self._nodes.get(node)
        if entry is None:
            raise KeyError(f"node {node} is not running")
        return entry

    def _boot(self, node: int) -> None:
        disk = self.disks[node]
        name = self.names[node]
        core = ProvisioningCore(name, node, disk.store, disk.local, disk.membership,
                                policy=self.policies.get(node), user="sim")
        core.op_counter_base = self.sim.now_us * 1000           # never repeats across incarnations
        clock = lambda: self.sim.now                         # Op.at: virtual time
        core.driver = RolloutDriver(name, core.next_op_id, user="sim", wall_clock=clock)
        core.reporter = HealthReporter(name, core.next_op_id, user="sim", wall_clock=clock)
        self._incarnations[node] += 1
        self._nodes[node] = _Node(core, self._incarnations[node])
        m = self.model
        self._every(node, m.reconcile_interval, lambda: self._reconcile(node))
        self._every(node, m.status_interval, lambda: self._publish(node))
        self._every(node, m.rollout_interval, lambda: self._rollout(node))
        self._apply(node, core.start())

    def _observe(self, node: int, item: Any) -> None:
        entry = self._nodes.get(node)
        if entry is None:
            return
        core = entry.core
        t = type(item)
        if t is View:
            entry.view = item
            self._apply(node, core.ring_view(item))
        elif t is Synced:
            self._apply(node, core.synced())
        elif t is SpaceView:
            entry.space_views[item.space] = item.view_id
            self._apply(node, core.space_view(item))
            if item.space == CLUSTER_SPACE:
                self._defer(node, lambda: self._publish(node))
        elif t is SpaceMessage:
            replica = _replica_of(core, item.space)
            before = replica.state if replica is not None else None
            members = replica.members if replica is not None else ()
            actions = core.message(item.space, item.message.sender, item.message.payload)
            for action in actions:
                if type(action) is Answer and type(action.result) is Accepted:
                    self.accepts.append(AcceptRecord(self.sim.now, node, item.space, entry.view, action.result,
                                                     before, replica.state))
            self._delivering = (tuple(members), entry.space_views.get(item.space))
            self._apply(node, actions)
            self._delivering = ((), None)

    def _provide(self, node: int, space: str) -> bytes | None:
        entry = self._nodes.get(node)
        return entry.core.state_request(space) if entry is not None else None

    def _install(self, node: int, space: str, data: bytes | None) -> None:
        entry = self._nodes.get(node)
        if entry is not None:
            self._apply(node, entry.core.install_state(space, data))

    def _defer(self, node: int, act: Callable[[], None]) -> None:
        self._deferred.append((node, self._nodes[node].incarnation, act))

    def _apply(self, node: int, actions: list) -> None:
        entry = self._nodes.get(node)
        if entry is None:
            return
        services = self.sim.services
        for action in actions:
            t = type(action)
            if t is Multicast:
                self._defer(node, lambda a=action: services.send(node, a.space, a.payload, a.safe))
            elif t is Answer:
                members, space_view = self._delivering
                rec = AnswerRecord(self.sim.now, node, action.op_id, action.result, entry.view, members, space_view)
                self.answers[node][action.op_id] = rec
                self.answer_log.append(rec)
            elif t is DesiredChanged:
                self._defer(node, lambda: self._reconcile(node))
            elif t is JoinSpace:
                space = action.space
                services.state_provider(node, space, lambda s=space: self._provide(node, s))
                services.state_receiver(node, space, lambda data, s=space: self._install(node, s, data))
                self._defer(node, lambda s=space: services.join(node, s))
            elif t is LeaveSpace:
                self._defer(node, lambda s=action.space: services.leave(node, s))

    # ------------------------------------------------------------------ the loops

    def _publish(self, node: int) -> None:
        entry = self._nodes.get(node)
        if entry is not None:
            status = entry.core.status(self.disks[node].host.actual())
            self._apply(node, entry.core.publish(status))

    def _rollout(self, node: int) -> None:
        entry = self._nodes.get(node)
        if entry is not None:
            self._apply(node, entry.core.rollout_tick(self.sim.now, self.disks[node].host.actual()))

    def _reconcile(self, node: int) -> None:
        """Start a reconcile pass unless one is being carried out (then run another after it)."""
        entry = self._nodes.get(node)
        if entry is None:
            return
        if entry.busy:
            entry.again = True
            return
        host = self.disks[node].host
        actions = reconcile(entry.core.desired(), host.actual())
        entry.again = False
        if not actions:
            return
        entry.busy = True

        def done() -> None:
            for action in actions:
                self._carry_out(host, action)
            entry.busy = False
            self._reconcile(node)
            self._rollout(node)
        self._later(node, self._rng.uniform(*self.model.action_delay), done)

    def _carry_out(self, host: SimHost, action: object) -> None:
        t = type(action)
        if t is Fetch:
            host.store.add(action.digest)
        elif t is Install:
            host.envs.add(EnvFact(action.name, action.version, action.digest))
        elif t is Start:
            failed = action.version in self.bad
            host.processes[action.name] = ProcessFact(action.version, action.digest,
                                                      "failed" if failed else "running",
                                                      detail=BAD_DETAIL if failed else "")
        elif t is Stop:
            host.processes.pop(action.name, None)
        elif t is Uninstall:
            host.envs = {e for e in host.envs if (e.name, e.version) != (action.name, action.version)}
        elif t is GcStore:
            host.store &= set(action.keep)
        elif t is ConfigChanged:
            pass                                   # simulated bundles read no configuration


def _replica_of(core: ProvisioningCore, space: str) -> GroupReplica | None:
    if space == CLUSTER_SPACE:
        return core.plans
    for group in core.groups:
        if group_space(group) == space:
            return core.replicas[group]
    return None
