"""The trio driver of :class:`~.local.LocalSupervisor`: real processes, probes and log files.

::

    async with Supervisor("node.toml", name="n1") as sup:
        sup.add(spec)                     # runtime API: add / change / remove
        sup.restart("web")                # commands: start / stop / restart
        print(sup.table())

Leaving the ``async with`` stops every process (stop signal, SIGKILL after its
grace) and waits for them.  ``python -m groupcomm.services.supervisor.runner
NODE.toml`` runs one until SIGINT or SIGTERM.

Given a ``channel``, the supervisor also takes part in its group
(:mod:`.remote`): it joins the node file's ``[cluster] space``, publishes its
table there, keeps the cluster's (:meth:`Supervisor.cluster_table`) and
answers ``groupcomm ps`` and ``groupcomm start|stop|restart``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Self

import trio

from groupcomm.errors import ConfigError
from groupcomm.services.supervisor.cluster import Fencing
from groupcomm.services.supervisor.control import ControlServer
from groupcomm.services.supervisor.local import (
    Action,
    Add,
    Change,
    Event,
    Exited,
    LocalSupervisor,
    ProbeResult,
    ProcessRow,
    Remove,
    Restart,
    RunProbe,
    SendSignal,
    Start,
    Started,
    StartFailed,
    StartProcess,
    Stop,
    TableChanged,
)
from groupcomm.services.supervisor.logfile import RotatingLog
from groupcomm.services.supervisor.node_core import NodeCore
from groupcomm.services.supervisor.placing import GROUP_ACTIONS, PlacementLink
from groupcomm.services.supervisor.probes import ProbeTarget, run_probe
from groupcomm.services.supervisor.remote import RemoteTable
from groupcomm.services.supervisor.spawn import Child, spawn
from groupcomm.services.supervisor.spec import (
    DOMAIN_CONTROLLER,
    NodeSpec,
    ProcessSpec,
    load_node_file,
    signal_number,
)
from groupcomm.services.supervisor.table import Row, row_of

__all__ = ["Supervisor", "main", "serve"]

_SHUTDOWN_SLACK = 5.0       # seconds beyond the longest stop_grace that leaving may take
_LEAVE_TIMEOUT = 2.0        # seconds to leave the supervisor space when the supervisor ends


class Supervisor:
    """Keep a node's processes alive; an async context manager owning its nursery.

    ``source`` is a node file's path, a parsed :class:`NodeSpec` or process
    specs.  ``name`` is the node's name (default: the node file's ``node``,
    else the host name); children see it as ``GROUPCOMM_NODE``.
    ``on_table`` is called with the new table after every change.
    ``channel`` (a joined :class:`~groupcomm.io.channel.Channel`): take part in its
    group (see :mod:`.remote`); the supervisor answers the channel's channel-wide
    requests, so give it a channel of its own.
    """

    def __init__(self, source: str | os.PathLike[str] | NodeSpec | Iterable[ProcessSpec], *,
                 name: str | None = None, on_table: Callable[[tuple[ProcessRow, ...]], Any] | None = None,
                 channel: Any = None) -> None:
        if isinstance(source, (str, os.PathLike)):
            source = load_node_file(source)
        if not isinstance(source, NodeSpec):
            source = NodeSpec(source="<node>", processes=tuple(source))
        self.node_spec = source
        self.name = name or source.node or socket.gethostname()
        self.base_dir = Path(source.base_dir or os.getcwd())
        self._on_table = on_table
        self._core: LocalSupervisor | NodeCore | None = None
        self._local: LocalSupervisor | None = None
        self.placement: PlacementLink | None = None
        """Cluster placement (domain controllers, replicas), once entered with a channel."""
        self._children: dict[str, tuple[int, Child]] = {}
        self._logs: dict[str, RotatingLog] = {}
        self._queue: list[Event] = []
        self._busy = False
        self._ticking = False
        self._wake = trio.Event()
        self._changed = trio.Event()
        self._rows: tuple[ProcessRow, ...] = ()
        self._anchor = 0
        self._nursery_manager: Any = None
        self._nursery: trio.Nursery | None = None
        self.channel = channel
        """The channel of the group this supervisor takes part in (None: local only)."""
        self.control: ControlServer | None = None
        """The control socket its processes reach it on (``GROUPCOMM_CONTROL``), once entered."""
        self.remote: RemoteTable | None = None
        """The group side (:mod:`.remote`), once entered with a channel."""

    # ------------------------------------------------------------------ lifetime

    async def __aenter__(self) -> Self:
        self._anchor = time.time_ns() // 1000 - round(trio.current_time() * 1_000_000)
        if self.channel is None:
            self._core = self._local = LocalSupervisor(self.node_spec.processes, now=self.now())
        else:
            self._core = self._cluster_core()
            self._local = self._core.local
        self._rows = self._core.table()
        self._nursery_manager = trio.open_nursery()
        self._nursery = await self._nursery_manager.__aenter__()
        try:
            self._nursery.start_soon(self._timer)
            self.control = await self._nursery.start(self._serve_control)
            if self.channel is not None:
                self.remote = RemoteTable(self.channel, self.node_spec.cluster.space, node=self.name,
                                          rows=self.table, command=self._command)
                await self.remote.start(self._nursery)
                assert isinstance(self._core, NodeCore)
                self.placement = PlacementLink(self.channel, self._core, lease=self.fencing.lease,
                                               wake=self._wake_up, role_changed=self.control.role_changed)
                self.placement.start(self._nursery)
            self._apply(self._core.initial_actions())
        except BaseException as e:
            await self._close(type(e), e, e.__traceback__)
            raise
        return self

    async def _serve_control(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with ControlServer(control_path(), _ControlView(self)) as control:
            task_status.started(control)
            await trio.sleep_forever()

    def _cluster_core(self) -> NodeCore:
        from groupcomm.io.channel import node_id_for

        channel = self.channel
        placed = [p.name for p in self.node_spec.processes if p.cluster_placed]
        if placed and not channel.quorum_config.fixed_members:
            raise ConfigError(
                f"{self.node_spec.source}: process {placed[0]!r} is placed by the cluster, which needs the "
                "cluster's members listed: set [cluster] members = [...] in the node file (or the stack's "
                "QUORUM expected_members); with 'highest seen' every visitor (groupcomm ps) adds a vote "
                "for good and a first start into a partition can make both sides primary")
        ring = channel.ring_config
        self.fencing = Fencing.derive(self.node_spec.cluster, ring.token_timeout, ring.consensus_timeout)
        return NodeCore(self.node_spec.processes, me=channel.address, fencing=self.fencing,
                        node_id=lambda name: node_id_for(channel.cluster, name),
                        space=self.node_spec.cluster.space, now=self.now())

    async def __aexit__(self, *exc: object) -> bool:
        return await self._close(*exc)

    async def _close(self, *exc: object) -> bool:
        try:
            await self._hand_over()
            await self._stop_everything()
            if self.remote is not None:
                with trio.CancelScope(shield=True):
                    await self.remote.stop(_LEAVE_TIMEOUT)

        finally:
            assert self._nursery is not None
            self._nursery.cancel_scope.cancel()
            for log in self._logs.values():
                log.close()
            if self.placement is not None:
                self.placement.close()
            closed = await self._nursery_manager.__aexit__(*exc)
        return bool(closed)

    async def _hand_over(self) -> None:
        """With placement: halt the placed processes, tell the group, leave their spaces."""
        core, link = self._core, self.placement
        if link is None or not isinstance(core, NodeCore):
            return
        placed = [n for n in core.local.names if core.local.spec(n).cluster_placed]
        longest = max((core.local.spec(n).stop_grace for n in placed), default=0.0)
        with trio.CancelScope(shield=True):
            with trio.move_on_after(longest + _SHUTDOWN_SLACK):
                self._apply(core.leave(self.now()))
                while not (core.done_leaving and link.left_every_space()):
                    self._reap_ended()
                    self._wake_up()
                    await trio.sleep(0.01)

    async def _stop_everything(self) -> None:
        """Stop every process and reap it, whether or not the caller is being cancelled."""
        core = self._local
        assert core is not None
        longest = max((core.spec(n).stop_grace for n in core.names), default=0.0)
        with trio.CancelScope(shield=True):
            with trio.move_on_after(longest + _SHUTDOWN_SLACK):
                for name in core.names:
                    self._feed(Stop(name))
                while core.live():
                    self._reap_ended()
                    self._apply(self._core_tick())
                    await trio.sleep(0.01)
            for name, (_, child) in list(self._children.items()):     # still here: kill and reap
                child.signal_group(signal.SIGKILL)
                with trio.move_on_after(1.0):
                    await child.wait()

    def _reap_ended(self) -> None:
        for name, (generation, child) in list(self._children.items()):
            status = child.poll()
            if status is not None:
                self._exited(name, generation, child, status)

    # ------------------------------------------------------------------ public API

    def now(self) -> int:
        """The core's clock: microseconds since the epoch, advancing monotonically."""
        return self._anchor + round(trio.current_time() * 1_000_000)

    def table(self) -> tuple[ProcessRow, ...]:
        """The process table (``since`` and ``retry_at`` in microseconds since the epoch)."""
        return self._rows

    @property
    def space(self) -> Any:
        """The supervisor space (a :class:`~groupcomm.io.space.Space`) when attached to a group, else None."""
        return self.remote.space if self.remote is not None else None

    def cluster_table(self) -> dict[str, tuple[Row, ...]]:
        """``{node: rows}`` of every supervisor in the supervisor space's view (only this node's
        when not attached to a group); ``since`` in microseconds since the epoch."""
        if self.remote is None:
            return {self.name: tuple(row_of(r) for r in self._rows)}
        return self.remote.cluster_table()

    def row(self, name: str) -> ProcessRow:
        for row in self._rows:
            if row.name == name:
                return row
        raise KeyError(name)

    def add(self, spec: ProcessSpec, *, start: bool | None = None) -> None:
        """Supervise a new process (started unless ``start=False`` or the cluster places it)."""
        self._feed(Add(spec, start))

    def change(self, spec: ProcessSpec) -> None:
        """Replace the spec of ``spec.name``; a live process restarts with it."""
        self._feed(Change(spec))

    def remove(self, name: str) -> None:
        """Stop the process and forget it."""
        self._feed(Remove(name))

    def start(self, name: str) -> None:
        self._feed(Start(name))

    def stop(self, name: str) -> None:
        self._feed(Stop(name))

    def restart(self, name: str) -> None:
        self._feed(Restart(name))

    def _command(self, verb: str, name: str) -> None:
        """A start/stop/restart from the group; KeyError for an unknown process."""
        {"start": self.start, "stop": self.stop, "restart": self.restart}[verb](name)

    async def wait_until(self, predicate: Callable[[dict[str, ProcessRow]], bool]) -> dict[str, ProcessRow]:
        """Wait until ``predicate({name: row})`` holds; returns those rows."""
        while True:
            rows = {r.name: r for r in self._rows}
            if predicate(rows):
                return rows
            await self._changed.wait()

    # ------------------------------------------------------------------ the loop

    def _feed(self, event: Event) -> None:
        """Hand an event to the core and carry out what it says (re-entrant calls are queued)."""
        assert self._core is not None, "use the Supervisor inside 'async with'"
        if self._busy:
            self._queue.append(event)
            return
        self._apply(self._core.handle(self.now(), event))

    def _apply(self, actions: list[Action]) -> None:
        """Carry out ``actions`` (and the queued events'), then let the timer look at the core's
        deadline again -- unless the timer itself is the caller: it looks anyway, and waking it
        would make it spin."""
        assert self._core is not None
        self._busy = True
        try:
            while True:
                for action in actions:
                    self._do(action)
                if not self._queue:
                    break
                actions = self._core.handle(self.now(), self._queue.pop(0))
        finally:
            self._busy = False
        if not self._ticking:
            self._wake.set()

    def _wake_up(self) -> None:
        self._wake.set()

    def _core_tick(self) -> list:
        core, link = self._core, self.placement
        if link is None or not isinstance(core, NodeCore):
            assert self._local is not None
            return self._local.tick(self.now())
        now = self.now()
        return link.feed(now) + core.tick(now, link.tokens())

    async def _timer(self) -> None:
        assert self._core is not None
        while True:
            deadline = self._core.next_deadline()
            with trio.move_on_at((deadline - self._anchor) / 1_000_000 if deadline is not None else float("inf")):
                await self._wake.wait()
            self._wake = trio.Event()
            self._ticking = True
            try:
                self._apply(self._core_tick())
            finally:
                self._ticking = False

    def _do(self, action: Action) -> None:
        if isinstance(action, GROUP_ACTIONS):
            assert self.placement is not None
            self.placement.act(self.now(), action)
            return
        match action:
            case StartProcess():
                self._start(action)
            case SendSignal():
                entry = self._children.get(action.name)
                if entry is not None and entry[0] == action.generation:
                    entry[1].signal_group(signal_number(action.signal))
            case RunProbe():
                assert self._nursery is not None
                self._nursery.start_soon(self._probe, action)
            case TableChanged():
                self._rows = action.rows
                self._changed.set()
                self._changed = trio.Event()
                if self.remote is not None:
                    self.remote.table_changed()
                if self._on_table is not None:
                    self._on_table(action.rows)

    # ------------------------------------------------------------------ processes

    def _env(self, spec: ProcessSpec, generation: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update(spec.env)
        env.update(GROUPCOMM_NODE=self.name, GROUPCOMM_PROCESS=spec.name, GROUPCOMM_ROLE=spec.role,
                   GROUPCOMM_GENERATION=str(generation))
        if self.control is not None:
            env["GROUPCOMM_CONTROL"] = self.control.path
        return env

    def _cwd(self, spec: ProcessSpec) -> str:
        return str(self.base_dir / spec.cwd) if spec.cwd else str(self.base_dir)

    def _log(self, spec: ProcessSpec) -> RotatingLog:
        path = self.base_dir / spec.log.directory / f"{spec.name}.log"
        log = self._logs.get(spec.name)
        if log is None or log.path != path or (log.max_bytes, log.keep) != (spec.log.max_bytes, spec.log.keep):
            if log is not None:
                log.close()
            log = self._logs[spec.name] = RotatingLog(path, spec.log.max_bytes, spec.log.keep)
        return log

    def _start(self, action: StartProcess) -> None:
        spec = action.spec
        env = self._env(spec, action.generation)
        argv, pass_fds, lease = list(spec.command), (), None
        if self.placement is not None and spec.cluster_placed:
            launch = self.placement.launch(self.now(), spec.name, spec.command)
            argv, pass_fds, lease = launch.argv, launch.pass_fds, launch.lease
            env.update(launch.env)
        try:
            log = self._log(spec)
            try:
                child = spawn(argv, env=env, cwd=self._cwd(spec), capture=True, pass_fds=pass_fds)
            finally:
                if lease is not None:
                    lease.child_started()
        except (OSError, ValueError) as e:
            self._feed(StartFailed(spec.name, action.generation, f"{type(e).__name__}: {e}"))
            return
        log.write(f"--- {_stamp()} supervisor: started {spec.name} generation {action.generation} "
                  f"pid {child.pid}\n".encode())
        self._children[spec.name] = (action.generation, child)
        assert self._nursery is not None
        self._nursery.start_soon(self._pump, child, log)
        self._nursery.start_soon(self._wait, spec.name, action.generation, child)
        self._feed(Started(spec.name, action.generation, child.pid))

    async def _wait(self, name: str, generation: int, child: Child) -> None:
        status = await child.wait()
        self._exited(name, generation, child, status)

    def _exited(self, name: str, generation: int, child: Child, status: int) -> None:
        entry = self._children.get(name)
        if entry is None or entry[1] is not child:
            return                                   # reported already
        del self._children[name]
        log = self._logs.get(name)
        if log is not None:
            log.write(f"--- {_stamp()} supervisor: {name} generation {generation} pid {child.pid} "
                      f"ended with status {status}\n".encode())
        if self.placement is not None:
            self.placement.close_lease(name)
        self._feed(Exited(name, generation, status))

    async def _pump(self, child: Child, log: RotatingLog) -> None:
        stream = child.output
        assert stream is not None
        try:
            while data := await stream.receive_some(65536):
                log.write(data)
        finally:
            await stream.aclose()

    async def _probe(self, action: RunProbe) -> None:
        health = action.spec.health
        assert health is not None
        target = ProbeTarget(self.name, action.name, action.pid, action.generation)
        outcome, detail = await run_probe(health, target, env=self._env(action.spec, action.generation),
                                          cwd=self._cwd(action.spec))
        if self._local is not None and action.name in self._local.names:
            self._feed(ProbeResult(action.name, action.generation, outcome, detail))


def control_path() -> Path:
    """Where this supervisor's control socket goes: ``$XDG_RUNTIME_DIR/groupcomm`` (else a
    private directory in the temp dir), one socket per supervisor."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "groupcomm" if runtime else Path(tempfile.gettempdir()) / f"groupcomm-{os.getuid()}"
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    if base.stat().st_uid != os.getuid():
        raise PermissionError(f"{base} belongs to another user; set XDG_RUNTIME_DIR")
    return base / f"supervisor-{os.getpid()}-{next(_control_sockets)}.sock"


_control_sockets = itertools.count(1)


class _ControlView:
    """What the control socket shows of a :class:`Supervisor`."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._sup = supervisor

    def status(self, process: str) -> dict[str, Any]:
        return dataclasses.asdict(self._sup.row(process))

    def role(self, process: str) -> tuple[str, int | None]:
        row = self._sup.row(process)
        core = self._sup._core
        grant = core.grant(process) if isinstance(core, NodeCore) else None
        if grant is None:
            return row.role, None
        return row.role, grant.epoch if row.role == DOMAIN_CONTROLLER else None

    def table(self) -> list[dict[str, Any]]:
        return [dataclasses.asdict(row) for row in self._sup.table()]


def _stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# --------------------------------------------------------------------------- running one from a node file


def describe(row: ProcessRow) -> str:
    """One line about a process's state, as ``serve`` prints it."""
    pid = f" pid {row.pid}" if row.pid else ""
    why = f" ({row.detail})" if row.detail else ""
    return f"{row.name}: {row.state}{pid}{why}"


async def serve(node: str | os.PathLike[str] | NodeSpec, *, name: str | None = None,
                announce: Callable[[str], Any] | None = None, channel: Any = None,
                attach: Callable[[Supervisor], AbstractAsyncContextManager[Any]] | None = None,
                task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Run a supervisor until SIGINT or SIGTERM, then stop its processes; print state changes.

    ``channel``: attach it to that channel's group (see :class:`Supervisor`).
    ``attach(supervisor)``: an async context manager that lives inside the
    supervisor's lifetime (entered once it runs, exited before it stops its
    processes): the provisioning agent."""
    shown: dict[str, tuple[str, int | None]] = {}

    def changed(rows: tuple[ProcessRow, ...]) -> None:
        for row in rows:
            if shown.get(row.name) != (row.state, row.pid) and announce is not None:
                announce(describe(row))
            shown[row.name] = (row.state, row.pid)

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with Supervisor(node, name=name, on_table=changed, channel=channel) as sup:
            if announce is not None:
                where = f" in space {sup.space.name!r} as member {channel.address}" if channel is not None else ""
                announce(f"supervising {len(sup.table())} process(es) on node {sup.name!r}{where}")
            async with contextlib.AsyncExitStack() as stack:
                if attach is not None:
                    await stack.enter_async_context(attach(sup))
                task_status.started(sup)
                async for _ in signals:
                    break
            if announce is not None:
                announce("stopping...")


def main(argv: list[str] | None = None) -> int:
    """``python -m groupcomm.services.supervisor.runner NODE.toml [--name NODE]``."""
    import argparse



    parser = argparse.ArgumentParser(prog="python -m groupcomm.services.supervisor.runner")
    parser.add_argument("node_file")
    parser.add_argument("--name", default=None)
    args = parser.parse_args(argv)
    try:
        node = load_node_file(args.node_file)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trio.run(lambda: serve(node, name=args.name, announce=lambda line: print(line, flush=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
