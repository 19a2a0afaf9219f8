"""The provisioning agent of one node (trio): :class:`ProvisioningNode`, the Python API of the service.

::

    async with open_channel("udp", cluster="shop", name="n1") as ch, \\
            Supervisor([], name="n1") as sup, \\
            ProvisioningNode(ch, sup, ProvisioningSettings(state_dir="/var/lib/groupcomm/n1")) as node:
        await node.join_group("web")
        await node.install_bundle("dist/hello-2.0-py3-none-any.whl", group="web", start=True)
        await node.set_config("hello", {"greeting": "hi"}, group="web")
        print(node.cluster_status(group="web"))

It runs a :class:`~.node_core.ProvisioningCore` on the channel (views and the
provisioning spaces' messages in one delivery order, through
:meth:`Channel.add_observer <groupcomm.io.channel.Channel.add_observer>` and
:meth:`Channel.claim_space <groupcomm.io.channel.Channel.claim_space>`), and
three loops: the **reconciler** (the node's desired state against what it has;
the :class:`~.executor.Executor` fetches, installs, starts and stops bundles as
supervised processes), the **publisher** (this node's status in the cluster
space, coalesced) and the **rollout loop** (health reports of this node as a
rollout target; the rollout driver's steps on the node that drives).

Durable state, all under ``settings.state_dir``: ``provisioning.sqlite3``
(every group's and the plan record's state and history, the node's groups,
the node-local overlay), ``store/`` (content-addressed bundle files) and
``envs/`` (one environment per bundle version).  A restarted node reloads it,
rejoins its groups and is brought up to date by state transfer.

Every operation returns the revision it made once it was *accepted*: delivered
in a regular primary configuration, the same decision at every member.
Anything else raises :class:`Refused` with the reason every member gives
(e.g. the read-only minority side of a partition).
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import math
import os
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import trio

from groupcomm.errors import (
    ChannelClosed,
    GroupcommError,
    LocalProtocolError,
    NotOperational,
)
from groupcomm.events import View
from groupcomm.layers.rpc import ALL
from groupcomm.layers.spaces import (
    SpaceMessage,
    SpaceView,
    StateInstalled,
    StateRequest,
    Synced,
)
from groupcomm.services.provisioning.bundle import read_bundle
from groupcomm.services.provisioning.environments import Environments
from groupcomm.services.provisioning.executor import Executor, ExecutorSettings
from groupcomm.services.provisioning.fetching import ChannelPuller, serve_blobs
from groupcomm.services.provisioning.node_core import (
    DEFAULT_GROUP,
    Answer,
    DesiredChanged,
    JoinSpace,
    LeaveSpace,
    Multicast,
    NotInGroup,
    ProvisioningCore,
)
from groupcomm.services.provisioning.ops import (
    PLANS,
    BeginRollout,
    DeleteConfig,
    InstallBundle,
    MalformedOp,
    Op,
    SetConfig,
    SetEnvPolicy,
    SetGroupPolicy,
    StartBundle,
    StopBundle,
    UninstallBundle,
    check_group_name,
)
from groupcomm.services.provisioning.overview import (
    AuditEntry,
    BundleStatus,
    ClusterStatus,
    Progress,
    audit_entries,
    bundle_statuses,
    cluster_status,
    describe_op,
)
from groupcomm.services.provisioning.plan import (
    Plan,
    PlanDiff,
    begin_rollout,
    choose_targets,
    diff,
    load_plan,
    planned_assignments,
    resolve,
)
from groupcomm.services.provisioning.policy import SyncPolicy
from groupcomm.services.provisioning.reconcile import merge, reconcile
from groupcomm.services.provisioning.rollout import (
    RolloutStatus,
    current_assignments,
    find_rollout,
    rollback_to,
)
from groupcomm.services.provisioning.rollout import history as rollout_history
from groupcomm.services.provisioning.rollout import status as rollout_status
from groupcomm.services.provisioning.signing import PublicKey, read_signature
from groupcomm.services.provisioning.state import (
    SPACE_PREFIX,
    Accepted,
    GroupState,
    OpRefused,
    SqliteGroupStore,
)
from groupcomm.services.provisioning.status import CLUSTER_SPACE, NodeStatus, StatusRow
from groupcomm.services.provisioning.store import Store

__all__ = ["GroupInfo", "NoAnswer", "NotConverged", "ProvisioningError", "ProvisioningNode", "ProvisioningSettings", "Refused"]

logger = logging.getLogger("groupcomm.provisioning")

_CHANNEL_GONE = (ChannelClosed, LocalProtocolError, NotOperational)


class ProvisioningError(GroupcommError):
    """Base of the provisioning service's errors."""


class Refused(ProvisioningError):
    """The cluster did not accept an operation; the message is the reason every member gives."""


class NotConverged(ProvisioningError):
    """An accepted change that does not run on every node it should (the message names them)."""


class NoAnswer(ProvisioningError):
    """An operation's delivery was not seen within ``op_timeout`` (this node left the group?)."""


@dataclass(frozen=True)
class ProvisioningSettings:
    """A provisioning agent's settings (every timer in seconds, every limit in bytes)."""

    state_dir: str | os.PathLike[str]
    """Where the node keeps its durable state (created if missing)."""
    policy: SyncPolicy = field(default_factory=SyncPolicy)
    """Which changes replicate (see :mod:`.policy`)."""
    store_quota: int | None = None
    """The most bytes the bundle store may hold (None: no limit)."""
    op_timeout: float = 30.0
    """How long an operation may wait for its own delivery."""
    publish_interval: float = 0.2
    """Status publications are coalesced to at most one per interval."""
    reconcile_interval: float = 1.0
    """The reconciler also runs this often without a change (to see processes' health)."""
    republish_interval: float = 5.0
    """A node publishes its status at least this often (and after every change)."""
    rollout_interval: float = 0.5
    """How often the rollout loop looks at health and the driver's deadlines."""
    converge_timeout: float = 600.0
    """How long ``install_bundle(progress=...)`` waits for the group's nodes."""
    retry_failed_after: float = 60.0
    """A bundle file whose fetch, install or start failed is tried again after this long."""
    health_wait: float = 30.0
    """How long ``install_bundle(start=True, progress=...)`` waits for started processes to be healthy."""
    python: str | None = None
    """The interpreter bundle environments are made with (None: this one)."""


@dataclass(frozen=True)
class GroupInfo:
    """A group as this node sees it."""

    name: str
    joined: bool
    members: tuple[str, ...]
    revision: int | None
    writable: bool | None


ProgressCallback = Callable[[Progress], object]
"""Called (in the trio thread) with each node's steps of a long operation."""


class _SqliteMembership:
    """The node's groups, in one table of the node's SQLite file."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS node_groups (position INTEGER PRIMARY KEY, grp TEXT NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS node_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    def load_groups(self) -> list[str] | None:
        if self._db.execute("SELECT value FROM node_meta WHERE key = 'groups-saved'").fetchone() is None:
            return None
        return [g for (g,) in self._db.execute("SELECT grp FROM node_groups ORDER BY position")]

    def save_groups(self, groups: list[str]) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM node_groups")
            db.executemany("INSERT INTO node_groups (position, grp) VALUES (?, ?)", list(enumerate(groups)))
            db.execute("INSERT OR REPLACE INTO node_meta (key, value) VALUES ('groups-saved', '1')")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._db.close()


class _ClusterRequester:
    """Requests in the cluster space (what the blob puller sends through)."""

    def __init__(self, channel: Any) -> None:
        self._channel = channel

    async def request(self, payload: bytes, *, to: Any = None, mode: Any = ALL, timeout: float = 2.0) -> dict:
        return await self._channel.space_request(CLUSTER_SPACE, payload, to=to, mode=mode, timeout=timeout)


class ProvisioningNode:
    """A node's provisioning agent on a joined ``channel``, starting bundles through ``supervisor``."""

    def __init__(self, channel: Any, supervisor: Any, settings: ProvisioningSettings, *,
                 name: str | None = None) -> None:
        self.channel = channel
        self.supervisor = supervisor
        self.settings = settings
        self.name: str = name or getattr(supervisor, "name", None) or channel.name
        self.core: ProvisioningCore
        self.store: Store
        self.executor: Executor
        self._inbox: list[Any] = []
        self._wake = trio.Event()
        self._reconcile_wake = trio.Event()
        self._publish_wake = trio.Event()
        self._waiting: dict[str, trio.Event] = {}
        self._changed = trio.Event()
        self._sends_send, self._sends_recv = trio.open_memory_channel[tuple[str, bytes, bool]](math.inf)
        self._exit = contextlib.AsyncExitStack()
        self._view_seen = False
        self._failed_at: dict[str, float] = {}

    # ------------------------------------------------------------------ life

    async def __aenter__(self) -> Self:
        async with contextlib.AsyncExitStack() as stack:
            await self._open(stack)
            self._exit = stack.pop_all()
        return self

    async def _open(self, stack: contextlib.AsyncExitStack) -> None:
        root = Path(self.settings.state_dir)
        await trio.to_thread.run_sync(lambda: root.mkdir(parents=True, exist_ok=True))
        db = root / "provisioning.sqlite3"
        store = SqliteGroupStore(db)
        stack.callback(store.close)
        local = SqliteGroupStore(root / "local.sqlite3")
        stack.callback(local.close)
        membership = _SqliteMembership(db)
        stack.callback(membership.close)
        core = self.core = ProvisioningCore(self.name, self.channel.address, store, local, membership,
                                            policy=self.settings.policy, user=_user())
        core.op_counter_base = time.time_ns()
        self.store = Store(root / "store", quota=self.settings.store_quota)
        envs = Environments(root / "envs", **({"python": self.settings.python} if self.settings.python else {}))
        me = self.channel.address
        self.executor = Executor(
            self.store, envs, self.supervisor, ChannelPuller(_ClusterRequester(self.channel), self.store),
            holders=lambda group: [m for m in self.core.board.members if m != me],
            settings=ExecutorSettings(log_directory=str(root / "logs")))
        await self.executor.refresh()
        self.channel.claim_space(CLUSTER_SPACE, on_request=serve_blobs(self.store))
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)         # runs first on exit
        view = self.channel.view
        if view is not None:                                # installed before we looked
            self._inbox.append(view)
            merging: list[bool] = []
            self.channel.call_member(lambda now, m: merging.append(m.spaces.merging), quiet=True)
            if merging and not merging[0]:                  # ... and its SYNC round over too
                self._inbox.append(Synced(view.ring_id))
        self.channel.add_observer(self._observe)
        self._act(core.start())
        self._wake.set()
        for task in (self._core_loop, self._send_loop, self._reconcile_loop, self._publish_loop,
                     self._rollout_loop):
            nursery.start_soon(task)

    async def __aexit__(self, *exc: object) -> bool:
        return bool(await self._exit.__aexit__(*exc))

    # ------------------------------------------------------------------ channel side

    def _observe(self, item: Any) -> None:
        t = type(item)
        if t is not View and t is not Synced:
            if t not in (SpaceView, SpaceMessage, StateRequest, StateInstalled):
                return
            if item.space != CLUSTER_SPACE and not item.space.startswith(SPACE_PREFIX):
                return
        self._inbox.append(item)
        self._wake.set()

    async def _core_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            inbox, self._inbox = self._inbox, []
            core = self.core
            for item in inbox:
                t = type(item)
                if t is View:
                    self._act(core.ring_view(item))
                elif t is Synced:
                    self._act(core.synced())
                elif t is SpaceView:
                    self._act(core.space_view(item))
                    if item.space == CLUSTER_SPACE:
                        self._view_seen = True
                        self._publish_wake.set()
                elif t is SpaceMessage:
                    self._act(core.message(item.space, item.message.sender, item.message.payload))
                elif t is StateRequest:
                    if item.space == CLUSTER_SPACE or item.space in core.spaces():
                        with contextlib.suppress(*_CHANNEL_GONE):
                            self.channel.provide_state(item, core.state_request(item.space))
                else:
                    self._act(core.install_state(item.space, item.state))
            self._changed.set()
            self._changed = trio.Event()

    def _act(self, actions: list) -> None:
        for action in actions:
            t = type(action)
            if t is Answer:
                waiter = self._waiting.pop(action.op_id, None)
                if waiter is not None:
                    waiter.set()
            elif t is DesiredChanged:
                self._reconcile_wake.set()
            elif t is Multicast:
                self._sends_send.send_nowait((action.space, action.payload, action.safe))
            elif t is JoinSpace:
                space = action.space
                self.channel.claim_space(space)
                self.channel.call_member(lambda now, m, s=space: m.join_space(now, s), quiet=True)
            elif t is LeaveSpace:
                space = action.space
                self.channel.call_member(lambda now, m, s=space: m.leave_space(now, s), quiet=True)

    async def _send_loop(self) -> None:
        async for space, payload, safe in self._sends_recv:
            try:
                await self.channel.call_member_when_room(
                    lambda now, m, s=space, p=payload, f=safe: m.space_send(now, s, p, f))
            except _CHANNEL_GONE:
                return

    async def _until(self, predicate: Callable[[], bool], timeout: float, what: str, *,
                     tick: float = math.inf) -> None:
        """Wait until ``predicate()`` holds, checked after every delivery (and every ``tick`` s)."""
        with trio.move_on_after(timeout):
            while not predicate():
                with trio.move_on_after(tick):
                    await self._changed.wait()
            return
        raise NoAnswer(f"{what}: not done within {timeout:g} s")

    # ------------------------------------------------------------------ proposing

    async def submit(self, body: Any, *, user: str | None = None, op_id: str | None = None) -> int:
        """Propose one operation body (:mod:`.ops`); the revision it made once accepted.

        Raises :class:`Refused` (with the reason every member gives) or :class:`NoAnswer`."""
        core = self.core
        op = Op(op_id or core.next_op_id(), self.name, user if user is not None else _user(), time.time(), body)
        done = self._waiting[op.op_id] = trio.Event()
        try:
            actions = core.propose(op)
        except (OpRefused, MalformedOp) as exc:
            self._waiting.pop(op.op_id, None)
            raise Refused(str(exc)) from None
        self._act(actions)
        try:
            with trio.move_on_after(self.settings.op_timeout):
                await done.wait()
        finally:
            self._waiting.pop(op.op_id, None)
        result = core.answers.get(op.op_id)
        if result is None:
            raise NoAnswer(f"operation {op.op_id} ({describe_op(op)}) was not delivered within "
                           f"{self.settings.op_timeout:g} s")
        if type(result) is not Accepted:
            raise Refused(result.reason)
        return result.revision

    # ------------------------------------------------------------------ groups

    async def create_group(self, group: str) -> None:
        """Create ``group`` by joining it (a group exists while a node is in it)."""
        await self.join_group(group)

    async def join_group(self, group: str) -> None:
        """Join ``group``; returns once this node is a member of its space (its state arriving)."""
        check_group_name(group)
        self._act(self.core.join_group(group))
        me = self.core.node_id
        await self._until(lambda: group in self.core.replicas and me in self.core.replicas[group].members,
                          self.settings.op_timeout, f"joining group {group!r}")

    async def leave_group(self, group: str) -> None:
        """Leave ``group``: its bundles are stopped and removed here (unless another group wants them)."""
        try:
            self._act(self.core.leave_group(group))
        except NotInGroup as exc:
            raise Refused(str(exc)) from None

    def _replica(self, group: str) -> Any:
        try:
            return self.core.replica(group)
        except NotInGroup as exc:
            raise Refused(str(exc)) from None

    def groups(self) -> list[GroupInfo]:
        """Every group this node is in or hears of from the others' statuses, by name."""
        core = self.core
        statuses = core.board.statuses()
        names = set(core.groups) | {g for s in statuses for g in s.groups}
        out = []
        for g in sorted(names):
            replica = core.replicas.get(g)
            out.append(GroupInfo(g, replica is not None, tuple(core.board.members_of(g)),
                                 replica.revision if replica is not None else None,
                                 replica.writable if replica is not None else None))
        return out

    # ------------------------------------------------------------------ bundles

    async def install_bundle(self, path: str | os.PathLike[str], *, group: str = DEFAULT_GROUP,
                             signature: str | os.PathLike[str] | None = None, start: bool = False,
                             progress: ProgressCallback | None = None, user: str | None = None) -> int:
        """Install (or upgrade to) bundle file ``path`` on ``group`` (``start``: and start it).

        The file is put in this node's store; the group's members pull it from
        here.  ``signature``: its detached signature file (default ``path + '.sig'``
        when that exists).  With ``progress``, also waits until every member of
        the group has it installed (started, with ``start``) or failed, calling
        ``progress(Progress)`` as they go (at most ``settings.converge_timeout``)."""
        self._replica(group)                                   # not in the group: before any work
        path = Path(path)
        bundle = await trio.to_thread.run_sync(read_bundle, path)
        sig_path = Path(signature) if signature is not None else path.with_name(path.name + ".sig")
        sig = b""
        if signature is not None or await trio.to_thread.run_sync(sig_path.exists):
            sig = await trio.to_thread.run_sync(read_signature, sig_path)
        self.executor.pin(bundle.sha256)
        await trio.to_thread.run_sync(self.store.put_file, path, bundle.sha256)
        await self.executor.refresh()
        body = InstallBundle(group, bundle.name, bundle.version, bundle.sha256, bundle.size, path.name, sig)
        revision = await self.submit(body, user=user)
        if start:
            revision = await self.submit(StartBundle(group, bundle.name), user=user)
        if progress is not None:
            problems = await self.wait_bundle(group, bundle.name, bundle.version, started=start, progress=progress)
            if problems:
                raise NotConverged(f"{bundle.name} {bundle.version} was accepted on group {group!r} (revision "
                                   f"{revision}) but does not run everywhere: " + "; ".join(problems))
        return revision

    async def wait_bundle(self, group: str, name: str, version: str, *, started: bool = False,
                          progress: ProgressCallback | None = None, timeout: float | None = None) -> list[str]:
        """Wait until every member of ``group`` has ``name`` at ``version`` (installed; with
        ``started``, started and healthy, or still unhealthy after ``settings.health_wait``) or
        failed it; one line per node where it does not run as asked.  ``progress`` sees each
        node's steps.  :class:`NoAnswer` after ``timeout`` (default ``settings.converge_timeout``)."""
        seen: dict[str, tuple] = {}
        goal = "started" if started else "installed"
        running_since: list[float] = []

        def done() -> bool:
            rows = self._rows_of(group, name)
            for node, row in rows.items():
                key = (row.state, row.actual_version, row.healthy) if row is not None else None
                if progress is not None and seen.get(node) != key:
                    seen[node] = key
                    step = row.state if row is not None else "waiting"
                    health = "" if row is None or row.healthy is None else ("ok" if row.healthy else "failing")
                    detail = f"{name} {row.actual_version or version}" if row is not None else name
                    if row is not None and row.reason:
                        detail += f": {row.reason}"
                    progress(Progress(node, step, detail, health=health))
            if not rows or not all(row is not None and row.desired_version == version
                                   and ((row.state == goal and row.actual_version == version)
                                        or row.state == "failed") for row in rows.values()):
                return False
            if not started or all(row.healthy or row.state == "failed" for row in rows.values()):
                return True
            # every process runs: give their health checks health_wait to pass, then tell what is
            if not running_since:
                running_since.append(trio.current_time())
            return trio.current_time() - running_since[0] >= self.settings.health_wait

        await self._until(done, timeout if timeout is not None else self.settings.converge_timeout,
                          f"{name} {version} on group {group!r}", tick=1.0)
        return [f"{node}: {row.state if row is not None else 'missing'}"
                + (f" ({row.reason})" if row is not None and row.reason else "")
                for node, row in sorted(self._rows_of(group, name).items())
                if row is None or row.state == "failed" or (started and not row.healthy)]

    def _rows_of(self, group: str, name: str) -> dict[str, StatusRow | None]:
        return {s.node: next((r for r in s.rows if r.name == name), None)
                for s in self.core.board.statuses() if group in s.groups}

    async def start_bundle(self, name: str, *, group: str = DEFAULT_GROUP, user: str | None = None) -> int:
        """Make bundle ``name`` of ``group`` run (as a supervised process with its health check)."""
        return await self.submit(StartBundle(group, name), user=user)

    async def stop_bundle(self, name: str, *, group: str = DEFAULT_GROUP, user: str | None = None) -> int:
        """Stop bundle ``name`` of ``group`` (it stays installed)."""
        return await self.submit(StopBundle(group, name), user=user)

    async def uninstall_bundle(self, name: str, *, group: str = DEFAULT_GROUP, user: str | None = None) -> int:
        """Remove bundle ``name`` from ``group`` (stopped and uninstalled on every member, also on
        members that are down now: they apply it when they return)."""
        return await self.submit(UninstallBundle(group, name), user=user)

    def bundles(self, group: str = DEFAULT_GROUP) -> list[BundleStatus]:
        """The bundles ``group`` wants, with each member's actual row."""
        return bundle_statuses(self._replica(group).state, self.core.board.statuses())

    async def require_signatures(self, group: str, keys: Sequence[PublicKey], *, user: str | None = None) -> int:
        """From now on ``group`` accepts only bundles signed by one of ``keys`` (empty: any bundle)."""
        return await self.submit(SetGroupPolicy(group, tuple(k.raw for k in keys)), user=user)

    async def require_plan_signatures(self, env: str, keys: Sequence[PublicKey], *, user: str | None = None) -> int:
        """From now on rollouts of environment ``env`` deploy only bundles signed by one of ``keys``
        (empty: any bundle)."""
        check_group_name(env, "environment")
        return await self.submit(SetEnvPolicy(env, tuple(k.raw for k in keys)), user=user)

    # ------------------------------------------------------------------ configuration

    async def set_config(self, pid: str, values: Mapping[str, str], *, group: str = DEFAULT_GROUP,
                         user: str | None = None) -> int:
        """Set keys of configuration ``pid`` on ``group`` (one operation per key, in order)."""
        if not values:
            raise Refused("config set needs at least one key=value")
        revision = 0
        for key, value in values.items():
            revision = await self.submit(SetConfig(group, pid, key, str(value)), user=user)
        return revision

    async def delete_config(self, pid: str, key: str | None = None, *, group: str = DEFAULT_GROUP,
                            user: str | None = None) -> int:
        """Delete one key of ``pid`` on ``group``, or every key (the whole PID)."""
        keys = [key] if key is not None else sorted(self.get_config(pid, group=group))
        if not keys:
            raise Refused(f"no configuration {pid!r} in group {group!r}")
        revision = 0
        for k in keys:
            revision = await self.submit(DeleteConfig(group, pid, k), user=user)
        return revision

    def get_config(self, pid: str, *, group: str = DEFAULT_GROUP) -> dict[str, str]:
        """The keys of ``pid`` this node applies for ``group`` (its sync policy applied)."""
        return dict(self._effective(group).configs.get(pid, {}))

    def configs(self, group: str = DEFAULT_GROUP) -> dict[str, dict[str, str]]:
        """Every configuration PID this node applies for ``group`` (its sync policy applied)."""
        return {pid: dict(v) for pid, v in sorted(self._effective(group).configs.items())}

    def _effective(self, group: str) -> GroupState:
        core = self.core
        return core.policy.effective(group, self._replica(group).state, core.local[group])

    # ------------------------------------------------------------------ plans

    async def plan_diff(self, plan_path: str | os.PathLike[str], *, env: str) -> PlanDiff:
        """What applying the plan to ``env`` would change, node by node."""
        begin, _ = await self._begin(plan_path, env, batch=None, force=False)
        current = current_assignments(self.core.plans_state, env)
        new = planned_assignments(env, 0, begin.roles, begin.targets)
        nodes = set(current) | set(new)
        return diff({n: current.get(n) for n in nodes}, {n: new.get(n) for n in nodes})

    async def _begin(self, plan_path: str | os.PathLike[str], env: str, *, batch: int | None,
                     force: bool) -> tuple[BeginRollout, Plan]:
        plan = await trio.to_thread.run_sync(load_plan, plan_path)
        resolved = await trio.to_thread.run_sync(resolve, plan, env)
        spec = plan.environment(env)
        targets = choose_targets(spec, {placed.group: self._group_order(placed.group) for placed in spec.roles})
        return begin_rollout(plan, env, resolved, targets, batch=batch, force=force), plan

    def _group_order(self, group: str) -> list[str]:
        """The members of ``group`` by name, oldest first when this node is in it."""
        core = self.core
        replica = core.replicas.get(group)
        if replica is not None:
            names = [core.board.name_of(m) for m in replica.members]
            return [n for n in names if n is not None]
        return core.board.members_of(group)

    async def apply_plan(self, plan_path: str | os.PathLike[str], *, env: str, batch: int | None = None,
                         force: bool = False, progress: ProgressCallback | None = None,
                         user: str | None = None) -> RolloutStatus:
        """Roll the plan out to ``env`` in batches; waits until it succeeded or was rolled back.

        The bundle files go into this node's store (the targets pull them from here).
        ``force``: past the promotion gate (recorded).  Raises :class:`Refused` when
        the record refuses it (a rollout of ``env`` running, the gate)."""
        begin, plan = await self._begin(plan_path, env, batch=batch, force=force)
        for role in plan.environment(env).roles:
            for file, digest in zip(plan.roles[role.role].bundles, plan.roles[role.role].bundle_digests, strict=True):
                self.executor.pin(digest)
                await trio.to_thread.run_sync(self.store.put_file, file, digest)
        await self.executor.refresh()
        return await self._rollout(begin, progress, user)

    async def rollback_plan(self, env: str, *, to: int | None = None, progress: ProgressCallback | None = None,
                            user: str | None = None) -> RolloutStatus:
        """Roll ``env`` back to revision ``to`` (default: the last succeeded one before the current)."""
        try:
            begin = rollback_to(self.core.plans_state, env, to)
        except OpRefused as exc:
            raise Refused(str(exc)) from None
        return await self._rollout(begin, progress, user)

    async def _rollout(self, begin: BeginRollout, progress: ProgressCallback | None, user: str | None
                       ) -> RolloutStatus:
        op_id = self.core.next_op_id()
        await self.submit(begin, user=user, op_id=op_id)
        env = begin.env
        seen: dict[str, tuple] = {}

        def row() -> RolloutStatus | None:
            record = find_rollout(self.core.plans_state, env, op_id)
            if record is None:
                return None
            return next((r for r in rollout_history(self.core.plans_state, env) if r.revision == record.revision),
                        None)

        def ended() -> bool:
            now = row()
            if now is None:
                return True                         # trimmed from the record: long over
            if progress is not None:
                for n in now.nodes:
                    key = (n.switched, n.health, n.detail)
                    if seen.get(n.node) != key:
                        seen[n.node] = key
                        step = "switched" if n.switched else "waiting"
                        progress(Progress(n.node, step, n.detail or n.role, batch=n.batch + 1, health=n.health))
            return now.outcome != "running"

        await self._until(ended, math.inf, f"the rollout of {env!r}")
        result = row()
        if result is None:
            raise NoAnswer(f"the rollout of {env!r} (operation {op_id}) is no longer in the record")
        return result

    def plan_status(self, env: str | None = None) -> list[RolloutStatus]:
        """The newest rollout of each environment (or of ``env``)."""
        return rollout_status(self.core.plans_state, env)

    def plan_history(self, env: str) -> list[RolloutStatus]:
        """The kept rollouts of ``env``, newest first."""
        return rollout_history(self.core.plans_state, env)

    # ------------------------------------------------------------------ overview and audit

    def cluster_status(self, *, group: str | None = None, env: str | None = None) -> ClusterStatus:
        """Every node's bundles (desired and actual, health), configuration versions and what is
        out of sync; of ``group`` or ``env`` only if given."""
        return cluster_status(self.core.board.statuses(), group=group, env=env)

    def history(self, *, group: str | None = None) -> list[AuditEntry]:
        """The accepted changes (what, when, from which node and user) of ``group``, or of every
        group of this node and the plan record; oldest first."""
        core = self.core
        if group is not None:
            histories = {group: self._replica(group).history}
        else:
            histories = {g: r.history for g, r in core.replicas.items()}
            histories[PLANS] = core.plans.history
        return audit_entries(histories)

    # ------------------------------------------------------------------ the loops

    async def _reconcile_loop(self) -> None:
        while True:
            with trio.move_on_after(self.settings.reconcile_interval):
                await self._reconcile_wake.wait()
            self._reconcile_wake = trio.Event()
            for digest in self.core.plan_digests():
                self.executor.pin(digest)
            self._retry_old_failures()
            desired = self.core.desired()
            configs = merge(desired).configs
            before = self.executor.actual()
            actions = reconcile(desired, before)
            if actions:
                async with trio.open_nursery() as nursery:
                    for action in actions:
                        nursery.start_soon(self._run_action, action, configs)
                if self.executor.actual() != before:
                    self._reconcile_wake.set()      # again at once: the next step may be ready
            self._publish_wake.set()

    def _retry_old_failures(self) -> None:
        """Forget failures older than ``retry_failed_after`` (the next round tries again)."""
        now = trio.current_time()
        failed = self.executor.actual().failed
        for digest in list(self._failed_at):
            if digest not in failed:
                del self._failed_at[digest]
        for digest in failed:
            since = self._failed_at.setdefault(digest, now)
            if now - since >= self.settings.retry_failed_after:
                del self._failed_at[digest]
                self.executor.retry_failed([digest])

    async def _run_action(self, action: Any, configs: Any) -> None:
        try:
            reason = await self.executor.run(action, configs=configs)
        except Exception:
            logger.exception("provisioning: %r failed", action)
            return
        if reason is not None:
            logger.warning("provisioning: %s", reason)

    async def _publish_loop(self) -> None:
        """Publish this node's status when it changed, after a view of the cluster space, and every
        ``republish_interval``; at most once per ``publish_interval``."""
        last: NodeStatus | None = None
        while True:
            with trio.move_on_after(self.settings.republish_interval) as idle:
                await self._publish_wake.wait()
            self._publish_wake = trio.Event()
            status = self.status()
            if status != last or idle.cancelled_caught or self._view_seen:
                self._view_seen = False
                self._act(self.core.publish(status))
                last = status
            await trio.sleep(self.settings.publish_interval)

    async def _rollout_loop(self) -> None:
        while True:
            await trio.sleep(self.settings.rollout_interval)
            self._act(self.core.rollout_tick(trio.current_time(), self.executor.actual()))

    # ------------------------------------------------------------------ status

    def status(self) -> NodeStatus:
        """This node's status as it publishes it."""
        return self.core.status(self.executor.actual())


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
