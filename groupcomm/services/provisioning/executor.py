"""Carrying out the reconciler's actions on this node (trio): the :class:`Executor`.

::

    executor = Executor(store, environments, supervisor, ChannelPuller(space, store),
                        holders=lambda group: members_of(group))
    await executor.refresh()                      # once: scan the store and the environments
    while True:                                   # on every change of the desired state or of actual()
        configs = merge(desired).configs
        for action in reconcile(desired, executor.actual()):
            nursery.start_soon(functools.partial(executor.run, action, configs=configs))

or simply ``await executor.converge(desired)`` (runs the actions of each
round concurrently until there are none).

What each action does (everything blocking -- pip, tar, SHA-256, file
writes, scans -- runs in worker threads; at most
:attr:`ExecutorSettings.max_fetches` fetches and
:attr:`ExecutorSettings.max_installs` installs at once; a second ``run`` of a
fetch, install or gc already running waits for the first and returns None;
starts, stops, configuration changes and uninstalls of one bundle run one
after the other):

* :class:`~.reconcile.Fetch` -- ``puller.pull(digest, size, holders(group))``
  (a :class:`~.fetching.ChannelPuller`: verified by SHA-256 when stored).
  While it runs the digest is in ``actual().fetching``.
* :class:`~.reconcile.Install` -- :func:`~.bundle.read_bundle` of the store
  blob (a blob has no suffix: the kind is read from the content, and a wheel
  gets its canonical file name from its own metadata), checked to be the
  bundle, version and SHA-256 the action names, then
  :meth:`~.environments.Environments.install`.
* :class:`~.reconcile.Start` -- writes the configuration file and starts
  ``bundle.<name>`` with :meth:`~.bundle.Bundle.process_spec` plus the
  configuration variables (:mod:`.configfiles`, the contract bundles rely
  on): ``Supervisor.add``; when the process exists, ``Supervisor.change``
  (a live one is stopped and started with the new spec: the upgrade), and a
  stopped or failed one is started.
* :class:`~.reconcile.Stop` -- ``Supervisor.remove``, then waits until the
  process is gone (its stop grace, then SIGKILL by the supervisor).
* :class:`~.reconcile.Uninstall` -- :meth:`~.environments.Environments.remove`.
* :class:`~.reconcile.GcStore` -- :meth:`~.store.Store.gc`, keeping also the
  digests being fetched and those :meth:`Executor.pin` protects.
* :class:`~.reconcile.ConfigChanged` -- the configuration file is rewritten
  with every PID the bundle reads, then ``Supervisor.change`` with the new
  variables: the process is **restarted** (see :mod:`.configfiles`).

A fetch, install or start that fails puts the digest in ``actual().failed``
with the reason (so :func:`~.reconcile.actual_rows` shows it); it is not
tried again until :meth:`Executor.retry_failed` clears it.  ``run`` returns
the reason (None when the action was done).

**What the executor remembers** of the processes it started (version, digest,
the configuration given, the spec) is kept **in memory only**: the
supervisor's processes end with the node's agent, and the executor lives as
long as the supervisor it drives, so after a restart both start empty.
Processes named ``bundle.*`` are the executor's: one it did not start (no
memory) is reported with version ``""``, so the reconciler replaces or stops
it.  An installed environment whose bundle file is gone from the store and
was not read since this executor started cannot be started (its manifest is
in the file): the environment is removed, so the next round fetches and
installs it again.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from groupcomm.services.provisioning.bundle import (
    Bundle,
    BundleError,
    Limits,
    read_bundle,
)
from groupcomm.services.provisioning.configfiles import (
    CONFIG_FILE_VAR,
    ENV_BUDGET,
    config_environment,
    config_file,
    given_config,
    write_config,
)
from groupcomm.services.provisioning.environments import (
    Environments,
    Installed,
    InstallError,
)
from groupcomm.services.provisioning.fetching import BlobPuller, PullFailed
from groupcomm.services.provisioning.reconcile import (
    PROCESS_PREFIX,
    Action,
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
    merge,
    process_name,
    reconcile,
)
from groupcomm.services.provisioning.state import GroupState
from groupcomm.services.provisioning.store import Store, StoreError
from groupcomm.services.supervisor.spec import ProcessSpec

if TYPE_CHECKING:
    from groupcomm.services.supervisor.runner import Supervisor

__all__ = ["Executor", "ExecutorSettings"]

_DEFAULT_GRACE = ProcessSpec.stop_grace     # how long a process not started here may take to stop

Configs = Mapping[str, Mapping[str, str]]
"""PID -> key -> value: the merged configuration (``reconcile.merge(desired).configs``)."""


@dataclass(frozen=True)
class ExecutorSettings:
    """Bounds and choices of an :class:`Executor`."""

    max_fetches: int = 2
    """Fetches running at once."""
    max_installs: int = 1
    """Installs (venv + pip, or extraction) running at once."""
    stop_slack: float = 10.0
    """Seconds beyond a process's stop grace a Stop waits for it to be gone."""
    env_budget: int = ENV_BUDGET
    """Bytes the per-key configuration variables of one process may take."""
    log_directory: str | None = None
    """Where the bundles' log files go (None: the supervisor's default, ``logs`` under its base)."""
    limits: Limits = field(default_factory=Limits)
    """Bounds for reading bundle files."""


@dataclass(frozen=True)
class _Started:
    """What the executor started a bundle's process with."""

    version: str
    digest: str
    config: dict[str, dict[str, str]]
    bundle: Bundle
    home: Path
    spec: ProcessSpec


class Executor:
    """Carries out reconcile actions on ``store``, ``environments`` and ``supervisor`` (a running
    :class:`~groupcomm.services.supervisor.runner.Supervisor`).

    ``puller``: fetches blobs (a :class:`~.fetching.ChannelPuller`; None: no fetching, a
    Fetch fails).  ``holders(group)``: the member ids to fetch a file of ``group`` from
    (this member excluded).  ``on_action(action, reason)``: called after each action
    that ran (``reason`` None when it was done).  Call :meth:`refresh` once before
    :meth:`actual`.
    """

    def __init__(self, store: Store, environments: Environments, supervisor: Supervisor,
                 puller: BlobPuller | None = None, *,
                 holders: Callable[[str], Sequence[int]] = lambda group: (),
                 settings: ExecutorSettings = ExecutorSettings(),
                 on_action: Callable[[Action, str | None], Any] | None = None) -> None:
        if settings.max_fetches < 1 or settings.max_installs < 1:
            raise ValueError("max_fetches and max_installs must be at least 1")
        self.store = store
        self.environments = environments
        self.supervisor = supervisor
        self.puller = puller
        self.holders = holders
        self.settings = settings
        self.on_action = on_action
        self._fetch_slots = trio.Semaphore(settings.max_fetches)
        self._install_slots = trio.Semaphore(settings.max_installs)
        self._scan_lock = trio.Lock()
        self._scanned = False
        self._digests: frozenset[str] = frozenset()
        self._installed: dict[tuple[str, str, str], Installed] = {}
        self._bundles: dict[str, Bundle] = {}            # digest -> read bundle (manifest), while installed
        self._started: dict[str, _Started] = {}          # bundle name -> what its process was started with
        self._fetching: set[str] = set()
        self._failed: dict[str, str] = {}
        self._pinned: set[str] = set()
        self._running: dict[tuple[Any, ...], trio.Event] = {}
        self._locks: dict[str, trio.Lock] = {}

    # ------------------------------------------------------------------ what this node has

    async def refresh(self) -> None:
        """Scan the store and the environments again (in a worker thread)."""
        async with self._scan_lock:
            digests, envs = await trio.to_thread.run_sync(self._scan)
            self._digests = frozenset(digests)
            self._installed = {(e.name, e.version, e.sha256): e for e in envs}
            self._scanned = True

    def _scan(self) -> tuple[set[str], list[Installed]]:
        return self.store.digests(), self.environments.list()

    def actual(self) -> Actual:
        """What this node has now, for :func:`~.reconcile.reconcile` and :func:`~.reconcile.actual_rows`."""
        if not self._scanned:
            raise RuntimeError("call 'await executor.refresh()' once before actual()")
        processes: dict[str, ProcessFact] = {}
        for row in self.supervisor.table():
            if not row.name.startswith(PROCESS_PREFIX):
                continue
            name = row.name[len(PROCESS_PREFIX):]
            started = self._started.get(name)
            if started is None:
                processes[name] = ProcessFact.from_row(row, "", "")
            else:
                processes[name] = ProcessFact.from_row(row, started.version, started.digest, started.config)
        return Actual(store=self._digests,
                      envs=frozenset(EnvFact(*key) for key in self._installed),
                      processes=processes,
                      fetching=frozenset(self._fetching),
                      failed=dict(self._failed))

    def retry_failed(self, digests: Sequence[str] | None = None) -> list[str]:
        """Forget the failures of ``digests`` (None: all), so they are tried again; those forgotten."""
        cleared = [d for d in (list(self._failed) if digests is None else digests) if d in self._failed]
        for digest in cleared:
            del self._failed[digest]
        return cleared

    def pin(self, digest: str) -> None:
        """Keep blob ``digest`` through GcStore (e.g. a file put in the store whose install op is on its
        way) until :meth:`unpin`."""
        self._pinned.add(digest)

    def unpin(self, digest: str) -> None:
        self._pinned.discard(digest)

    # ------------------------------------------------------------------ running actions

    async def run(self, action: Action, *, configs: Configs) -> str | None:
        """Carry out ``action``; None when done, else why not.  ``configs``: the merged
        configuration (``reconcile.merge(desired).configs``), delivered by Start and ConfigChanged."""
        match action:
            case Fetch():
                reason = await self._once(("fetch", action.digest), lambda: self._fetch(action))
            case Install():
                reason = await self._once(("install", action.digest), lambda: self._install(action))
            case Start():
                reason = await self._locked(action.name, lambda: self._start(action, configs))
            case Stop():
                reason = await self._locked(action.name, lambda: self._stop(action))
            case ConfigChanged():
                reason = await self._locked(action.name, lambda: self._config_changed(action, configs))
            case Uninstall():
                reason = await self._locked(action.name, lambda: self._uninstall(action))
            case GcStore():
                reason = await self._once(("gc",), lambda: self._gc(action))
            case _:
                raise TypeError(f"not a reconcile action: {action!r}")
        if self.on_action is not None:
            self.on_action(action, reason)
        return reason

    async def converge(self, desired: Mapping[str, GroupState], *, rounds: int = 20) -> list[Action]:
        """Run the actions of :func:`~.reconcile.reconcile` round after round (each round's
        concurrently) until there are none or a round changed nothing; the actions left."""
        configs = merge(desired).configs
        for _ in range(rounds):
            before = self.actual()
            actions = reconcile(desired, before)
            if not actions:
                return []
            async with trio.open_nursery() as nursery:
                for action in actions:
                    nursery.start_soon(functools.partial(self.run, action, configs=configs))
            if self.actual() == before:
                break
        return reconcile(desired, self.actual())

    async def _once(self, key: tuple[Any, ...], work: Callable[[], Awaitable[str | None]]) -> str | None:
        """Run ``work`` unless the same action is running: then wait for it and return None."""
        running = self._running.get(key)
        if running is not None:
            await running.wait()
            return None
        done = self._running[key] = trio.Event()
        try:
            return await work()
        finally:
            del self._running[key]
            done.set()

    async def _locked(self, name: str, work: Callable[[], Awaitable[str | None]]) -> str | None:
        """Run ``work`` while no other action on bundle ``name`` runs."""
        lock = self._locks.setdefault(name, trio.Lock())
        async with lock:
            return await work()

    def _fail(self, digest: str, reason: str) -> str:
        self._failed[digest] = reason
        return reason

    # -- fetch, install

    async def _fetch(self, action: Fetch) -> str | None:
        digest = action.digest
        if digest in self._failed:
            return self._failed[digest]
        self._fetching.add(digest)
        try:
            async with self._fetch_slots:
                if await trio.to_thread.run_sync(self.store.has, digest):
                    return None
                if self.puller is None:
                    return self._fail(digest, "fetch failed: this node has no way to fetch files")
                holders = [int(m) for m in self.holders(action.group)]
                if not holders:
                    return self._fail(digest, f"fetch failed: no other member of group {action.group!r} "
                                              "to fetch it from")
                try:
                    await self.puller.pull(digest, action.size, holders)
                except (PullFailed, StoreError, OSError) as e:
                    return self._fail(digest, f"fetch failed: {e}")
                return None
        finally:
            self._fetching.discard(digest)
            await self.refresh()

    async def _install(self, action: Install) -> str | None:
        digest = action.digest
        if digest in self._failed:
            return self._failed[digest]
        try:
            async with self._install_slots:
                bundle = await trio.to_thread.run_sync(self._read_blob, digest)
                if (bundle.name, bundle.version) != (action.name, action.version):
                    return self._fail(digest, f"install failed: the file is bundle {bundle.name!r} version "
                                              f"{bundle.version}, the desired state says {action.name!r} "
                                              f"version {action.version}")
                await trio.to_thread.run_sync(self.environments.install, bundle)
                self._bundles[digest] = bundle
                return None
        except (BundleError, InstallError, StoreError, OSError) as e:
            return self._fail(digest, f"install failed: {e}")
        finally:
            await self.refresh()

    def _read_blob(self, digest: str) -> Bundle:
        """The bundle in blob ``digest`` (blocking); BundleError if it is not one or not that blob."""
        bundle = read_bundle(self.store.path(digest), limits=self.settings.limits)
        if bundle.sha256 != digest:
            raise BundleError(f"{bundle.path}: SHA-256 is {bundle.sha256}, the store names it {digest}")
        return bundle

    # -- processes

    async def _start(self, action: Start, configs: Configs) -> str | None:
        digest = action.digest
        if digest in self._failed:
            return self._failed[digest]
        installed = self._installed.get((action.name, action.version, digest))
        if installed is None:
            await self.refresh()
            installed = self._installed.get((action.name, action.version, digest))
            if installed is None:
                return f"start: {action.name} {action.version} ({digest[:12]}) is not installed"
        try:
            bundle = self._bundles.get(digest)
            if bundle is None:
                if not await trio.to_thread.run_sync(self.store.has, digest):
                    await trio.to_thread.run_sync(self.environments.remove, action.name, action.version)
                    await self.refresh()
                    return (f"start: the file of {action.name} {action.version} ({digest[:12]}) is gone from "
                            "the store: its environment was removed, to be fetched and installed again")
                bundle = self._bundles[digest] = await trio.to_thread.run_sync(self._read_blob, digest)
            given = given_config(bundle.manifest.config, configs)
            spec = await trio.to_thread.run_sync(self._prepare, bundle, installed.home, given)
        except (BundleError, StoreError, OSError) as e:
            return self._fail(digest, f"start failed: {e}")
        await self._launch(spec)
        self._started[action.name] = _Started(action.version, digest, given, bundle, installed.home, spec)
        return None

    def _prepare(self, bundle: Bundle, home: Path, given: Configs) -> ProcessSpec:
        """Write the configuration file and build the process's spec (blocking)."""
        path = write_config(config_file(home), given, bundle=bundle.name)
        env = {**config_environment(given, budget=self.settings.env_budget), CONFIG_FILE_VAR: str(path)}
        spec = bundle.process_spec(home, home / "bin" / "python", process_name(bundle.name), environ=env)
        spec = replace(spec, env=types.MappingProxyType({**spec.env, **env}))
        if self.settings.log_directory is not None:
            spec = replace(spec, log=replace(spec.log, directory=self.settings.log_directory))
        return spec

    async def _launch(self, spec: ProcessSpec) -> None:
        """Add the process, or give the existing one the new spec (and start it if it is not live)."""
        sup = self.supervisor
        try:
            row = sup.row(spec.name)
        except KeyError:
            sup.add(spec)
            return
        try:
            sup.change(spec)
        except KeyError:                      # being removed: wait until it is gone, then add
            await self._gone(spec.name, spec.stop_grace)
            sup.add(spec)
            return
        if row.state in ("stopped", "failed"):
            sup.start(spec.name)

    async def _gone(self, process: str, grace: float) -> bool:
        """Wait until ``process`` is no longer supervised (at most its grace plus the slack)."""
        with trio.move_on_after(grace + self.settings.stop_slack):
            await self.supervisor.wait_until(lambda rows: process not in rows)
            return True
        return False

    async def _stop(self, action: Stop) -> str | None:
        process = process_name(action.name)
        started = self._started.get(action.name)
        grace = started.spec.stop_grace if started is not None else _DEFAULT_GRACE
        try:
            self.supervisor.remove(process)
        except KeyError:
            pass                                # not supervised (any more)
        if not await self._gone(process, grace):
            return f"stop: {process} is still stopping"
        self._started.pop(action.name, None)
        return None

    async def _config_changed(self, action: ConfigChanged, configs: Configs) -> str | None:
        started = self._started.get(action.name)
        if started is None:
            return None                         # stopped meanwhile
        given = given_config(started.bundle.manifest.config, configs)
        if given == started.config:
            return None                         # delivered already (another PID's change restarted it)
        try:
            spec = await trio.to_thread.run_sync(self._prepare, started.bundle, started.home, given)
        except (BundleError, OSError) as e:
            return self._fail(started.digest, f"configuration failed: {e}")
        await self._launch(spec)
        self._started[action.name] = replace(started, config=given, spec=spec)
        return None

    # -- environments, store

    async def _uninstall(self, action: Uninstall) -> str | None:
        try:
            await trio.to_thread.run_sync(self.environments.remove, action.name, action.version)
        except (OSError, ValueError) as e:
            return f"uninstall of {action.name} {action.version} failed: {e}"
        finally:
            for digest, bundle in list(self._bundles.items()):
                if (bundle.name, bundle.version) == (action.name, action.version):
                    del self._bundles[digest]
            await self.refresh()
        return None

    async def _gc(self, action: GcStore) -> str | None:
        keep = set(action.keep) | self._pinned | self._fetching
        try:
            await trio.to_thread.run_sync(self.store.gc, keep)
        except OSError as e:
            return f"store gc failed: {e}"
        finally:
            await self.refresh()
        return None
