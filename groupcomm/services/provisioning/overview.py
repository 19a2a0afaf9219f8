"""What the provisioning API shows (sans-IO): a node's status, bundles per group, the cluster overview, the audit log.

Pure functions over a node's :class:`~.node_core.ProvisioningCore` (its
replicas, the plan record and the statuses every node published) and its
:class:`~.reconcile.Actual`; both drivers use them (the trio
:class:`~.node.ProvisioningNode` and the simulator).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from groupcomm.services.provisioning.ops import (
    PLANS,
    AdoptState,
    AdvanceRollout,
    BeginRollout,
    DeleteConfig,
    EndRollout,
    InstallBundle,
    Op,
    ReportHealth,
    SetConfig,
    SetEnvPolicy,
    SetGroupPolicy,
    StartBundle,
    StopBundle,
    UninstallBundle,
)
from groupcomm.services.provisioning.reconcile import Actual, actual_rows, merge
from groupcomm.services.provisioning.state import GroupState, HistoryEntry
from groupcomm.services.provisioning.status import NodeStatus, StatusRow, config_version

__all__ = [
    "AuditEntry",
    "BundleStatus",
    "ClusterRow",
    "ClusterStatus",
    "ConfigRow",
    "NodeBundle",
    "Progress",
    "audit_entries",
    "bundle_statuses",
    "cluster_status",
    "describe_op",
    "node_status",
]


@dataclass(frozen=True)
class Progress:
    """One step of a long operation on one node (what ``plan apply`` and ``bundle install`` show)."""

    node: str
    step: str
    """``fetching``, ``installed``, ``started``, ``failed``, ``switched``, ``healthy``..."""
    detail: str = ""
    batch: int | None = None
    """The rollout batch (1-based) the node is in, for a plan."""
    health: str = ""


@dataclass(frozen=True)
class NodeBundle:
    """A bundle on one node: what runs there."""

    node: str
    actual_version: str | None
    state: str
    healthy: bool | None
    reason: str


@dataclass(frozen=True)
class BundleStatus:
    """A bundle a group wants, and each of the group's nodes' actual row."""

    name: str
    version: str
    digest: str
    started: bool
    signed: bool
    nodes: tuple[NodeBundle, ...]


@dataclass(frozen=True)
class ClusterRow:
    """``cluster status``: one bundle on one node."""

    node: str
    role: str
    """``group`` or ``ENV/ROLE`` for a plan's bundle."""
    bundle: str
    desired: str | None
    actual: str | None
    state: str
    health: str
    in_sync: bool
    reason: str


@dataclass(frozen=True)
class ConfigRow:
    """``cluster status``: the version of one configuration PID on one node."""

    node: str
    pid: str
    version: str
    """:func:`~.status.config_version` of the values the node applies."""


@dataclass(frozen=True)
class ClusterStatus:
    """The overview: every node's bundles, configuration versions, and what is out of sync."""

    rows: tuple[ClusterRow, ...]
    configs: tuple[ConfigRow, ...]
    """The shared configuration PIDs (not those a node's sync policy keeps local), by node."""
    out_of_sync: tuple[str, ...]
    """One line per difference (a bundle not at its desired version or state, a PID whose version
    differs between nodes of a group, a node behind its group's revision)."""
    read_only: Mapping[str, tuple[str, ...]]
    """Node -> the groups its side of a partition cannot change now."""


@dataclass(frozen=True)
class AuditEntry:
    """One accepted change: what, when, from which node and user."""

    group: str
    revision: int
    time: str
    """When, by the proposing node's clock (UTC, ISO 8601)."""
    node: str
    user: str
    what: str
    op_id: str
    at: float
    """The same instant in seconds since the epoch."""


# --------------------------------------------------------------------------- a node's own status


def node_status(node: str, node_id: int, groups: Iterable[str], revisions: Mapping[str, int],
                desired: Mapping[str, GroupState], actual: Actual, *,
                plan_roles: Mapping[str, tuple[int, str]] | None = None,
                read_only: Iterable[str] = (), local_pids: Iterable[str] = ()) -> NodeStatus:
    """The :class:`~.status.NodeStatus` a node publishes (``desired`` as the core's ``desired()``).

    ``local_pids``: configuration PIDs its sync policy keeps on this node: their versions are
    not published (they differ between nodes by design)."""
    local = set(local_pids)
    plan = merge(desired)
    rows = []
    for row in actual_rows(desired, actual):
        wanted = plan.bundles.get(row.name)
        proc = actual.processes.get(row.name)
        healthy = None if proc is None else proc.state == "running"
        rows.append(StatusRow(row.name, wanted.group if wanted is not None else "", row.desired_version,
                              row.actual_version, row.state, healthy, row.reason[:2000]))
    return NodeStatus(node=node, node_id=node_id, groups=tuple(groups), revisions=dict(revisions),
                      rows=tuple(rows),
                      configs={pid: config_version(v) for pid, v in plan.configs.items() if pid not in local},
                      plan=dict(plan_roles or {}), read_only=tuple(read_only),
                      plan_bundles={name[len("plan."):]: tuple(sorted(state.bundles))
                                    for name, state in desired.items() if name.startswith("plan.")})


# --------------------------------------------------------------------------- views


def _health(row: StatusRow) -> str:
    if row.healthy is None:
        return "-"
    return "healthy" if row.healthy else "unhealthy"


def _in_sync(row: StatusRow) -> bool:
    if row.desired_version is None:
        return row.state == "missing"
    return row.actual_version == row.desired_version and row.state in ("installed", "started")


def bundle_statuses(state: GroupState, statuses: Iterable[NodeStatus]) -> list[BundleStatus]:
    """The bundles of ``state`` (a group's desired state), each with the rows of the group's nodes."""
    members = [s for s in statuses if state.group in s.groups]
    out = []
    for name, want in sorted(state.bundles.items()):
        nodes = []
        for s in members:
            row = next((r for r in s.rows if r.name == name), None)
            if row is None:
                nodes.append(NodeBundle(s.node, None, "missing", None, "not reported yet"))
            else:
                nodes.append(NodeBundle(s.node, row.actual_version, row.state, row.healthy, row.reason))
        out.append(BundleStatus(name, want.version, want.digest, want.started, bool(state.trusted_keys),
                                tuple(nodes)))
    return out


def cluster_status(statuses: Iterable[NodeStatus], *, group: str | None = None,
                   env: str | None = None) -> ClusterStatus:
    """The overview of every node that published a status (those of ``group`` / in ``env`` only)."""
    chosen = []
    for s in statuses:
        if group is not None and group not in s.groups:
            continue
        if env is not None and env not in s.plan:
            continue
        chosen.append(s)
    rows: list[ClusterRow] = []
    out_of_sync: list[str] = []
    for s in chosen:
        for r in s.rows:
            source = r.source
            if env is not None:
                if r.name not in s.plan_bundles.get(env, ()):
                    continue                       # not a bundle of env's role (ties: another env won it)
                role = f"{env}/{s.plan[env][1]}"
            elif source.startswith("plan."):
                e = source[len("plan."):]
                role = f"{e}/{s.plan[e][1]}" if e in s.plan else source
            else:
                role = source or "-"
                if group is not None and source not in ("", group):
                    continue
            ok = _in_sync(r)
            rows.append(ClusterRow(s.node, role, r.name, r.desired_version, r.actual_version, r.state,
                                   _health(r), ok, r.reason))
            if not ok:
                out_of_sync.append(f"{s.node}: {r.name} wants {r.desired_version or 'nothing'}, has "
                                   f"{r.actual_version or 'nothing'} ({r.state}{': ' + r.reason if r.reason else ''})")
    groups = sorted({g for s in chosen for g in s.groups if group is None or g == group})
    for g in groups:
        members = [s for s in chosen if g in s.groups]
        newest = max((s.revisions.get(g, 0) for s in members), default=0)
        for s in members:
            if s.revisions.get(g, 0) < newest:
                out_of_sync.append(f"{s.node}: group {g} at revision {s.revisions.get(g, 0)}, "
                                   f"others at {newest}")
    pids = sorted({pid for s in chosen for pid in s.configs})
    for pid in pids:
        versions = {s.configs[pid] for s in chosen if pid in s.configs}
        if len(versions) > 1:
            holders = ", ".join(f"{s.node}={s.configs[pid]}" for s in chosen if pid in s.configs)
            out_of_sync.append(f"configuration {pid} differs between nodes: {holders}")
    configs = tuple(ConfigRow(s.node, pid, version) for s in chosen for pid, version in sorted(s.configs.items()))
    return ClusterStatus(tuple(rows), configs, tuple(out_of_sync),
                         {s.node: s.read_only for s in chosen if s.read_only})


# --------------------------------------------------------------------------- audit


def describe_op(op: Op) -> str:
    """One line saying what ``op`` changed."""
    b = op.body
    t = type(b)
    if t is InstallBundle:
        return f"install {b.name} {b.version} ({b.digest[:12]}{', signed' if b.signature else ''})"
    if t is UninstallBundle:
        return f"uninstall {b.name}"
    if t is StartBundle:
        return f"start {b.name}"
    if t is StopBundle:
        return f"stop {b.name}"
    if t is SetConfig:
        return f"config set {b.pid} {b.key}={b.value[:80]}"
    if t is DeleteConfig:
        return f"config delete {b.pid} {b.key}"
    if t is SetGroupPolicy:
        return f"require signatures from {len(b.trusted_keys)} key(s)" if b.trusted_keys else "accept unsigned bundles"
    if t is AdoptState:
        return "adopt a newer stored state (cold start)"
    if t is BeginRollout:
        what = f"rollback to revision {b.rollback_of}" if b.rollback_of else "apply plan"
        return (f"{what} on {b.env} ({b.plan_digest[:12]}, {len(b.targets)} node(s), batch {b.batch}"
                f"{', forced past the promotion gate' if b.force else ''})")
    if t is SetEnvPolicy:
        return (f"environment {b.env}: require signatures from {len(b.trusted_keys)} key(s)" if b.trusted_keys
                else f"environment {b.env}: accept unsigned bundles")
    if t is ReportHealth:
        return f"{b.env} revision {b.revision}: {b.node} {'healthy' if b.healthy else 'unhealthy: ' + b.detail}"
    if t is AdvanceRollout:
        return f"{b.env} revision {b.revision}: switch batch {b.batch + 1}"
    if t is EndRollout:
        return f"{b.env} revision {b.revision}: {'succeeded' if b.succeeded else 'rolled back: ' + b.reason}"
    return t.__name__


def _iso(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def audit_entries(histories: Mapping[str, Iterable[HistoryEntry]]) -> list[AuditEntry]:
    """Group (or ``@plans``) -> accepted history, as one list, oldest first."""
    out = [AuditEntry(group if group != PLANS else "plans", e.revision, _iso(e.op.at), e.op.origin_node, e.op.user,
                      describe_op(e.op), e.op.op_id, e.op.at)
           for group, entries in histories.items() for e in entries]
    out.sort(key=lambda a: (a.at, a.group, a.revision))
    return out
