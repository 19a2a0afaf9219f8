"""The provisioning reconciler: desired state versus what this node has -> actions (sans-IO).

:func:`reconcile` is a pure function.  Its inputs:

* ``desired``: the :class:`~.state.GroupState` of every group this node is in,
  a mapping whose **iteration order is the node's membership order**;
* ``actual``: an :class:`Actual` -- the digests in the store, the installed
  environments, the supervised processes this reconciler owns (named
  :func:`process_name`: ``bundle.<name>``) with what the driver started them
  with, and the fetches in flight and failures the driver remembers.

Its output is a list of actions (:data:`Action`) for a driver to carry out,
after which it calls :func:`reconcile` again, until the list is empty.

**Merging groups.**  The bundles of all groups are merged by name, the
configurations by (PID, key).  When two groups want the same bundle
differently (another version, file or started flag) or the same key with
another value, the group listed **first** in ``desired`` wins; every such
case is a :class:`Conflict` in :attr:`Plan.conflicts` (and in the reason of the
bundle's :class:`BundleRow`).

**Rules.**  Every action is emitted only when its precondition holds in
``actual`` as given, so the actions of one call never depend on each other
and the driver may do them in any order; a change that needs several steps
(fetch, install, start; stop, uninstall) takes several calls.

* :class:`Fetch` a wanted file that is neither in the store nor installed,
  nor being fetched, nor failed.
* :class:`Install` a wanted file that is in the store, once no other file of
  the same name and version is installed (environments are removed by name
  and version).
* :class:`Start` a bundle that should run once its environment is installed
  (and no other file of that name and version is: it is about to be removed);
  ``upgrade`` when a process of another version or file exists (the driver
  calls ``Supervisor.change``: old stopped, new started), else the driver
  calls ``Supervisor.add``.  An old version keeps running until the new one is
  installed.
* :class:`Stop` (``Supervisor.remove``) a process whose bundle is no longer
  wanted or should not run, or that runs the wanted version while another
  file of that version is installed and the wanted file is here to replace it
  (in the store or installed): environments are removed by name and version.
* :class:`Uninstall` an environment (name, version) no group wants, only
  while no process of that name and version exists.
* :class:`GcStore` when the store holds a digest that no group's desired
  state references (``keep`` is every desired digest of every group,
  conflicts' losers included: another node may fetch them from here).
* :class:`ConfigChanged` for each configuration PID a started process was
  given with values other than the merged ones now.

Actions come in this order: stops, uninstalls, fetches, installs, starts,
configuration changes, store gc.  A failed fetch or install (the driver puts
the digest in :attr:`Actual.failed`) is not retried until the driver clears
it; a process the supervisor reports ``failed`` is left to the supervisor.
Given the same inputs after the driver did all actions, :func:`reconcile`
returns no action: it is idempotent.

:func:`actual_rows` gives this node's actual table, one :class:`BundleRow` per
bundle, to publish next to the desired state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from groupcomm.services.provisioning.state import BundleDesired, GroupState

__all__ = [
    "PROCESS_PREFIX",
    "Action",
    "Actual",
    "BundleRow",
    "BundleState",
    "ConfigChanged",
    "Conflict",
    "EnvFact",
    "Fetch",
    "GcStore",
    "Install",
    "Plan",
    "ProcessFact",
    "Start",
    "Stop",
    "Uninstall",
    "Wanted",
    "actual_rows",
    "merge",
    "process_name",
    "reconcile",
]

PROCESS_PREFIX = "bundle."
"""The supervisor process of bundle ``N`` is named ``bundle.N``."""

Configs = Mapping[str, Mapping[str, str]]
"""PID -> key -> value."""


def process_name(bundle: str) -> str:
    """The supervisor process name of ``bundle``."""
    return PROCESS_PREFIX + bundle


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class EnvFact:
    """An installed environment."""

    name: str
    version: str
    digest: str


class _RowLike(Protocol):
    state: str
    pid: int | None
    detail: str


@dataclass(frozen=True)
class ProcessFact:
    """A process this reconciler owns, as the supervisor reports it plus what the driver started it with.

    ``config``: for each configuration PID the bundle reads (its manifest's
    ``config``), the values it was given (empty when the PID had none)."""

    version: str
    digest: str
    state: str = "running"
    pid: int | None = None
    detail: str = ""
    config: Configs = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: _RowLike, version: str, digest: str, config: Configs | None = None) -> ProcessFact:
        """From a supervisor :class:`~groupcomm.services.supervisor.local.ProcessRow` (or alike)."""
        return cls(version, digest, row.state, row.pid, row.detail, config or {})


@dataclass(frozen=True)
class Actual:
    """What this node has."""

    store: frozenset[str] = frozenset()
    """Digests in the store."""
    envs: frozenset[EnvFact] = frozenset()
    """Installed environments."""
    processes: Mapping[str, ProcessFact] = field(default_factory=dict)
    """By *bundle* name (the process is :func:`process_name` of it)."""
    fetching: frozenset[str] = frozenset()
    """Digests being fetched now."""
    failed: Mapping[str, str] = field(default_factory=dict)
    """Digest -> why its fetch or install failed (not retried while here)."""


# --------------------------------------------------------------------------- merging


@dataclass(frozen=True)
class Wanted:
    """A bundle as the merged desired state wants it, and the group it comes from."""

    name: str
    desired: BundleDesired
    group: str


@dataclass(frozen=True)
class Conflict:
    """Groups that disagree about a bundle (``pid`` empty) or a configuration key; ``winner`` decides."""

    what: str
    """The bundle name, or ``PID/key``."""
    winner: str
    loser: str
    winner_value: str
    loser_value: str

    def __str__(self) -> str:
        return (f"conflict on {self.what}: group {self.loser!r} wants {self.loser_value}, "
                f"group {self.winner!r} (earlier in the membership) wins with {self.winner_value}")


@dataclass(frozen=True)
class Plan:
    """The merged desired state of this node."""

    bundles: dict[str, Wanted]
    configs: dict[str, dict[str, str]]
    conflicts: tuple[Conflict, ...]
    keep: frozenset[str]
    """Every digest some group's desired state references."""


def _describe(d: BundleDesired) -> str:
    return f"{d.version} ({d.digest[:12]}, {'started' if d.started else 'stopped'})"


def merge(desired: Mapping[str, GroupState]) -> Plan:
    """Merge the groups' desired states; the first group (iteration order) wins a conflict."""
    bundles: dict[str, Wanted] = {}
    configs: dict[str, dict[str, str]] = {}
    conflicts: list[Conflict] = []
    keep: set[str] = set()
    for group, state in desired.items():
        for name, want in state.bundles.items():
            keep.add(want.digest)
            first = bundles.get(name)
            if first is None:
                bundles[name] = Wanted(name, want, group)
            elif (first.desired.version, first.desired.digest, first.desired.started) != \
                    (want.version, want.digest, want.started):
                conflicts.append(Conflict(name, first.group, group, _describe(first.desired), _describe(want)))
        for pid, keys in state.configs.items():
            merged = configs.setdefault(pid, {})
            for key, value in keys.items():
                if key not in merged:
                    merged[key] = value
                elif merged[key] != value:
                    winner = next(g for g, s in desired.items() if s.configs.get(pid, {}).get(key) == merged[key])
                    conflicts.append(Conflict(f"{pid}/{key}", winner, group, repr(merged[key]), repr(value)))
    return Plan(bundles, configs, tuple(conflicts), frozenset(keep))


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Fetch:
    """Get the file ``digest`` into the store (from a member of ``group``)."""

    digest: str
    size: int
    filename: str
    group: str


@dataclass(frozen=True)
class Install:
    """Install the stored file ``digest`` as bundle ``name`` ``version``."""

    name: str
    version: str
    digest: str


@dataclass(frozen=True)
class Start:
    """Supervise ``process_name(name)`` from the environment of ``version``/``digest``.

    ``upgrade``: a process of another version or file exists (``Supervisor.change``), else ``add``."""

    name: str
    version: str
    digest: str
    upgrade: bool = False


@dataclass(frozen=True)
class Stop:
    """Stop and forget ``process_name(name)`` (``Supervisor.remove``)."""

    name: str


@dataclass(frozen=True)
class Uninstall:
    """Remove every environment of ``name`` ``version`` (``Environments.remove``)."""

    name: str
    version: str


@dataclass(frozen=True)
class GcStore:
    """Remove every store blob not in ``keep`` (``Store.gc``)."""

    keep: frozenset[str]


@dataclass(frozen=True)
class ConfigChanged:
    """Configuration PID ``pid`` of started bundle ``name`` has other values than it was given."""

    name: str
    pid: str


Action = Fetch | Install | Start | Stop | Uninstall | GcStore | ConfigChanged
_ORDER = (Stop, Uninstall, Fetch, Install, Start, ConfigChanged, GcStore)


def reconcile(desired: Mapping[str, GroupState], actual: Actual) -> list[Action]:
    """The actions that bring ``actual`` closer to ``desired`` (see the module docstring)."""
    plan = merge(desired)
    installed = {(e.name, e.version, e.digest) for e in actual.envs}
    actions: list[Action] = []

    def stale_env(name: str, version: str, digest: str) -> bool:
        """Another file of this name and version is installed (removal is by name and version)."""
        return any(e.name == name and e.version == version and e.digest != digest for e in actual.envs)

    for name, proc in actual.processes.items():
        wanted = plan.bundles.get(name)
        if wanted is None or not wanted.desired.started:
            actions.append(Stop(name))
            continue
        d = wanted.desired
        if (proc.version == d.version and stale_env(name, d.version, d.digest) and d.digest not in actual.failed
                and (d.digest in actual.store or (name, d.version, d.digest) in installed)):
            actions.append(Stop(name))     # its version's environments must make room for the wanted file

    in_use = {(name, p.version) for name, p in actual.processes.items()}
    for name, version in sorted({(e.name, e.version) for e in actual.envs}):
        wanted = plan.bundles.get(name)
        needed = (wanted is not None and wanted.desired.version == version
                  and not stale_env(name, version, wanted.desired.digest))
        if not needed and (name, version) not in in_use:
            actions.append(Uninstall(name, version))

    fetches: set[str] = set()
    for name, wanted in sorted(plan.bundles.items()):
        d = wanted.desired
        if (name, d.version, d.digest) in installed or d.digest in actual.failed:
            continue
        if d.digest not in actual.store:
            if d.digest not in actual.fetching and d.digest not in fetches:
                fetches.add(d.digest)
                actions.append(Fetch(d.digest, d.size, d.filename, wanted.group))
        elif not stale_env(name, d.version, d.digest):
            actions.append(Install(name, d.version, d.digest))

    for name, wanted in sorted(plan.bundles.items()):
        d = wanted.desired
        if not d.started or (name, d.version, d.digest) not in installed or stale_env(name, d.version, d.digest):
            continue
        proc = actual.processes.get(name)
        if proc is None or (proc.version, proc.digest) != (d.version, d.digest):
            actions.append(Start(name, d.version, d.digest, upgrade=proc is not None))
            continue
        for pid, given in sorted(proc.config.items()):
            if dict(given) != plan.configs.get(pid, {}):
                actions.append(ConfigChanged(name, pid))

    if actual.store - plan.keep:
        actions.append(GcStore(plan.keep))
    actions.sort(key=lambda a: _ORDER.index(type(a)))
    return actions


# --------------------------------------------------------------------------- the actual table


BundleState = Literal["missing", "fetching", "installed", "started", "failed"]


@dataclass(frozen=True)
class BundleRow:
    """One bundle of this node's actual table."""

    name: str
    desired_version: str | None
    """The merged desired version (None: no group wants it; it is being removed)."""
    actual_version: str | None
    """The running version, else the installed one (the desired one if several), else None."""
    state: BundleState
    reason: str


def actual_rows(desired: Mapping[str, GroupState], actual: Actual) -> list[BundleRow]:
    """This node's actual table: every bundle wanted, installed or running here, by name."""
    plan = merge(desired)
    conflicts: dict[str, list[str]] = {}
    for c in plan.conflicts:
        conflicts.setdefault(c.what, []).append(str(c))
    names = set(plan.bundles) | set(actual.processes) | {e.name for e in actual.envs}
    rows = []
    for name in sorted(names):
        wanted = plan.bundles.get(name)
        d = wanted.desired if wanted is not None else None
        proc = actual.processes.get(name)
        versions = sorted({e.version for e in actual.envs if e.name == name})
        notes = list(conflicts.get(name, []))
        state: BundleState
        if proc is not None:
            actual_version: str | None = proc.version
            state = "failed" if proc.state == "failed" else "started"
            notes.insert(0, f"process {proc.state}" + (f": {proc.detail}" if proc.detail else ""))
        else:
            actual_version = (d.version if d is not None and d.version in versions
                              else versions[-1] if versions else None)
            if d is not None and d.digest in actual.failed:
                state = "failed"
                notes.insert(0, actual.failed[d.digest])
            elif d is not None and (name, d.version, d.digest) in {(e.name, e.version, e.digest)
                                                                    for e in actual.envs}:
                state = "installed"
            elif versions:
                state = "installed"
                if d is not None:
                    notes.insert(0, f"waiting for {d.version} ({d.digest[:12]})")
            elif d is not None and d.digest in actual.fetching:
                state = "fetching"
            else:
                state = "missing"
                if d is not None and d.digest in actual.store:
                    notes.insert(0, "in the store, not installed yet")
        if d is None:
            notes.append("no group wants it: being removed")
        elif d.started and state == "installed":
            notes.append("not started yet")
        elif not d.started and state in ("started", "failed") and proc is not None:
            notes.append("should be stopped")
        rows.append(BundleRow(name, d.version if d is not None else None, actual_version, state, "; ".join(notes)))
    return rows
