"""The sans-IO core of one node's supervised processes.

:class:`LocalSupervisor` is fed with the time (``now``, integer microseconds,
as the protocol layers are) and with events -- a process started or exited, a
probe answered, a spec added, changed or removed, a stop/start/restart
command -- and returns the actions its driver must carry out: start a process
(a new *generation*), send a signal, run a probe, publish the table.  It owns
the process table and decides everything; it never sleeps, reads a clock or
touches a process.

Rules (docs/supervisor.rst):

* at most one generation of a process is alive at a time: a restart waits for
  the old generation's exit before starting the next;
* ``restart`` policy as systemd/supervisord: ``always`` restarts whenever it
  ends, ``on-failure`` after a non-zero exit, a death by signal, a failed start
  or a failed health check, ``never`` leaves it ended (``stopped`` after exit 0,
  else ``failed``);
* automatic restarts wait a back-off: ``initial``, doubled per failure up to
  ``max``, back to ``initial`` when the process ran healthy ``reset_after``;
* ``failures`` probe failures in a row stop the process (counted as a failure);
* a stop sends ``stop_signal`` and SIGKILL after ``stop_grace``; a stopped
  process is only started again by a start/restart command.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Literal

from groupcomm.services.supervisor.spec import ProcessSpec

__all__ = [
    "Action",
    "Add",
    "Change",
    "Event",
    "Exited",
    "LocalSupervisor",
    "ProbeResult",
    "ProcessRow",
    "Remove",
    "Restart",
    "RunProbe",
    "SendSignal",
    "Start",
    "StartFailed",
    "StartProcess",
    "Started",
    "State",
    "Stop",
    "TableChanged",
    "micros",
]

State = Literal["starting", "running", "unhealthy", "backoff", "stopping", "stopped", "failed"]


def micros(seconds: float) -> int:
    """Seconds (a Duration) as integer microseconds."""
    return round(seconds * 1_000_000)


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Started:
    """The driver started generation ``generation`` of ``name`` as ``pid``."""

    name: str
    generation: int
    pid: int


@dataclass(frozen=True)
class StartFailed:
    """The driver could not start the generation (no such program, bad cwd ...)."""

    name: str
    generation: int
    error: str


@dataclass(frozen=True)
class Exited:
    """The generation ended: ``status`` >= 0 is an exit code, ``-N`` death by signal N."""

    name: str
    generation: int
    status: int


@dataclass(frozen=True)
class ProbeResult:
    """The answer to a :class:`RunProbe`."""

    name: str
    generation: int
    outcome: Literal["ok", "failed", "timeout"]
    detail: str = ""


@dataclass(frozen=True)
class Add:
    """Supervise a new process; ``start=None`` starts it unless the cluster places it."""

    spec: ProcessSpec
    start: bool | None = None


@dataclass(frozen=True)
class Change:
    """Replace a process's spec; a live process is restarted with the new one."""

    spec: ProcessSpec


@dataclass(frozen=True)
class Remove:
    """Stop a process and forget it."""

    name: str


@dataclass(frozen=True)
class Start:
    """Run a stopped, failed or backing-off process now."""

    name: str


@dataclass(frozen=True)
class Stop:
    """Stop a process and keep it stopped."""

    name: str


@dataclass(frozen=True)
class Restart:
    """Stop a process if alive, then start it at once (no back-off)."""

    name: str


Event = Started | StartFailed | Exited | ProbeResult | Add | Change | Remove | Start | Stop | Restart


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class StartProcess:
    """Start ``spec`` as generation ``generation``; answer with Started or StartFailed, later Exited."""

    name: str
    generation: int
    spec: ProcessSpec


@dataclass(frozen=True)
class SendSignal:
    """Send ``signal`` (a name such as ``"SIGTERM"``) to the process group of ``pid``."""

    name: str
    generation: int
    pid: int
    signal: str


@dataclass(frozen=True)
class RunProbe:
    """Run the spec's health probe against ``pid``; answer with ProbeResult within its timeout."""

    name: str
    generation: int
    pid: int
    spec: ProcessSpec


@dataclass(frozen=True)
class TableChanged:
    """The process table changed (publish it)."""

    rows: tuple[ProcessRow, ...]


Action = StartProcess | SendSignal | RunProbe | TableChanged


@dataclass(frozen=True)
class ProcessRow:
    """One line of the process table."""

    name: str
    state: State
    pid: int | None
    """The live generation's pid (None when none is alive or it is not started yet)."""
    generation: int
    """How many times the process was started."""
    restarts: int
    """Starts after the first one."""
    since: int
    """When it entered ``state`` (the driver's clock, microseconds)."""
    last_exit: int | None
    """The last generation's status (``-N``: killed by signal N), None before any exit."""
    role: str
    retry_at: int | None = None
    """``backoff``: when the next start is due."""
    failures: int = 0
    """Health probe failures in a row."""
    detail: str = ""
    """Why it is in this state, in words (the last exit, probe failure or start error)."""


# --------------------------------------------------------------------------- the core


@dataclass
class _Proc:
    spec: ProcessSpec
    state: State = "stopped"
    since: int = 0
    generation: int = 0
    restarts: int = 0
    live: bool = False                 # a started generation has not exited yet
    pid: int | None = None
    last_exit: int | None = None
    detail: str = ""
    delay: int = 0                     # the next back-off delay (µs); 0 = initial
    retry_at: int | None = None
    healthy_since: int | None = None
    failures: int = 0
    probe_at: int | None = None
    probing: bool = False
    # stopping
    then: Literal["", "stop", "restart", "remove", "fail", "backoff"] = ""
    kill_at: int | None = None
    signalled: bool = False            # stop_signal sent to this generation
    pending_spec: ProcessSpec | None = None


class LocalSupervisor:
    """One node's processes: feed it events and the time, carry out the actions it returns."""

    def __init__(self, specs: tuple[ProcessSpec, ...] | list[ProcessSpec] = (), *, now: int = 0) -> None:
        self._procs: dict[str, _Proc] = {}
        self._changed = False
        out: list[Action] = []
        for spec in specs:
            self._add(spec, None, now, out)
        self._initial = out

    # ------------------------------------------------------------------ public

    def initial_actions(self) -> list[Action]:
        """The starts the specs given to the constructor need (returned once)."""
        out, self._initial = self._initial, []
        return self._finish(out)

    def handle(self, now: int, event: Event) -> list[Action]:
        """Apply one event; raises KeyError for an unknown name, ValueError for a duplicate Add."""
        out: list[Action] = []
        match event:
            case Started():
                self._started(now, event, out)
            case StartFailed():
                self._ended(now, event.name, event.generation, None, f"start failed: {event.error}", out)
            case Exited():
                self._ended(now, event.name, event.generation, event.status, _exit_words(event.status), out)
            case ProbeResult():
                self._probed(now, event, out)
            case Add():
                self._add(event.spec, event.start, now, out)
            case Change():
                self._change(now, event.spec, out)
            case Remove():
                self._remove(now, event.name, out)
            case Start():
                self._start_command(now, event.name, out)
            case Stop():
                self._stop_command(now, event.name, out)
            case Restart():
                self._restart_command(now, event.name, out)
            case _:
                raise TypeError(f"not a supervisor event: {event!r}")
        out += self._due(now)
        return self._finish(out)

    def tick(self, now: int) -> list[Action]:
        """Do what is due at ``now`` (back-off starts, probes, SIGKILLs)."""
        return self._finish(self._due(now))

    def next_deadline(self) -> int | None:
        """The earliest time :meth:`tick` has something to do, or None."""
        times = []
        for p in self._procs.values():
            if p.state == "backoff" and p.retry_at is not None:
                times.append(p.retry_at)
            if p.live and p.kill_at is not None:
                times.append(p.kill_at)
            if p.live and not p.then and p.probe_at is not None and not p.probing:
                times.append(p.probe_at)
        return min(times, default=None)

    def table(self) -> tuple[ProcessRow, ...]:
        """The process table, sorted by name."""
        return tuple(self._row(name, p) for name, p in sorted(self._procs.items()))

    def row(self, name: str) -> ProcessRow:
        return self._row(name, self._procs[name])

    def spec(self, name: str) -> ProcessSpec:
        """The spec in force (a change waiting for the old generation's exit is not yet)."""
        return self._procs[name].spec

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._procs))

    def live(self) -> dict[str, int]:
        """``{name: generation}`` of every generation started and not yet exited."""
        return {n: p.generation for n, p in self._procs.items() if p.live}

    # ------------------------------------------------------------------ bookkeeping

    def _row(self, name: str, p: _Proc) -> ProcessRow:
        return ProcessRow(name=name, state=p.state, pid=p.pid if p.live else None, generation=p.generation,
                          restarts=p.restarts, since=p.since, last_exit=p.last_exit, role=p.spec.role,
                          retry_at=p.retry_at if p.state == "backoff" else None, failures=p.failures,
                          detail=p.detail)

    def _finish(self, out: list[Action]) -> list[Action]:
        if self._changed:
            self._changed = False
            out.append(TableChanged(self.table()))
        return out

    def _set(self, p: _Proc, state: State, now: int, detail: str | None = None) -> None:
        if p.state != state:
            p.state = state
            p.since = now
        if detail is not None:
            p.detail = detail
        self._changed = True

    def _proc(self, name: str) -> _Proc:
        try:
            return self._procs[name]
        except KeyError:
            raise KeyError(f"no supervised process {name!r}") from None

    # ------------------------------------------------------------------ starting

    def _launch(self, name: str, p: _Proc, now: int, out: list[Action]) -> None:
        assert not p.live
        if p.generation:
            p.restarts += 1
        p.generation += 1
        p.live, p.pid = True, None
        p.retry_at = None
        p.healthy_since = None
        p.failures, p.probe_at, p.probing = 0, None, False
        p.then, p.kill_at, p.signalled = "", None, False
        self._set(p, "starting", now, "")
        out.append(StartProcess(name, p.generation, p.spec))

    def _started(self, now: int, ev: Started, out: list[Action]) -> None:
        p = self._procs.get(ev.name)
        if p is None or not p.live or p.generation != ev.generation or p.pid is not None:
            return
        p.pid = ev.pid
        self._changed = True
        if p.then:                               # stopped before it was even running
            self._signal_stop(ev.name, p, now, out)
            return
        if p.spec.health is None:
            p.healthy_since = now
            self._set(p, "running", now)
        else:
            p.probe_at = now + micros(p.spec.health.interval)

    # ------------------------------------------------------------------ ending

    def _ended(self, now: int, name: str, generation: int, status: int | None, words: str,
               out: list[Action]) -> None:
        p = self._procs.get(name)
        if p is None or not p.live or p.generation != generation:
            return
        stable = p.healthy_since is not None and now - p.healthy_since >= micros(p.spec.backoff.reset_after)
        p.live, p.pid, p.kill_at, p.probing, p.probe_at, p.healthy_since = False, None, None, False, None, None
        p.last_exit = status
        then, p.then = p.then, ""
        if p.pending_spec is not None:
            p.spec, p.pending_spec = p.pending_spec, None
        if stable:
            p.delay = 0
        if then == "remove":
            del self._procs[name]
            self._changed = True
        elif then == "stop":
            self._set(p, "stopped", now, words)
        elif then == "restart":
            self._launch(name, p, now, out)
        elif then == "fail":
            self._set(p, "failed", now, p.detail)
        elif then == "backoff":
            self._back_off(name, p, now, out, p.detail)
        else:
            failed = status is None or status != 0
            if p.spec.restart == "always" or (p.spec.restart == "on-failure" and failed):
                self._back_off(name, p, now, out, words)
            else:
                self._set(p, "failed" if failed else "stopped", now, words)

    def _back_off(self, name: str, p: _Proc, now: int, out: list[Action], detail: str) -> None:
        initial, most = micros(p.spec.backoff.initial), micros(p.spec.backoff.max)
        delay = min(max(p.delay, initial), most)
        p.delay = min(delay * 2, most)
        p.retry_at = now + delay
        self._set(p, "backoff", now, detail)

    # ------------------------------------------------------------------ health

    def _probed(self, now: int, ev: ProbeResult, out: list[Action]) -> None:
        p = self._procs.get(ev.name)
        if p is None or not p.live or p.generation != ev.generation or not p.probing:
            return
        p.probing = False
        health = p.spec.health
        assert health is not None
        if p.then:                                # already stopping; the answer no longer matters
            return
        p.probe_at = now + micros(health.interval)
        if ev.outcome == "ok":
            p.failures = 0
            if p.state != "running":
                p.healthy_since = now
                self._set(p, "running", now, "")
            return
        p.failures += 1
        p.healthy_since = None
        words = f"health probe {ev.outcome}" + (f": {ev.detail}" if ev.detail else "")
        if p.failures < health.failures:
            self._set(p, "unhealthy" if p.state != "starting" else "starting", now, words)
            return
        words = f"unhealthy: {p.failures} probe failures in a row ({words})"
        p.detail = words
        self._changed = True
        self._begin_stop(ev.name, p, now, "fail" if p.spec.restart == "never" else "backoff", out)

    # ------------------------------------------------------------------ stopping

    def _begin_stop(self, name: str, p: _Proc, now: int, then: str, out: list[Action]) -> None:
        assert p.live
        p.then = then                            # type: ignore[assignment]
        p.probe_at = None
        self._set(p, "stopping", now)
        if p.pid is not None and not p.signalled:
            self._signal_stop(name, p, now, out)

    def _signal_stop(self, name: str, p: _Proc, now: int, out: list[Action]) -> None:
        assert p.pid is not None
        p.signalled = True
        p.kill_at = now + micros(p.spec.stop_grace)
        out.append(SendSignal(name, p.generation, p.pid, p.spec.stop_signal))

    def _due(self, now: int) -> list[Action]:
        out: list[Action] = []
        for name, p in list(self._procs.items()):
            if p.state == "backoff" and p.retry_at is not None and now >= p.retry_at:
                self._launch(name, p, now, out)
            elif p.live and p.kill_at is not None and now >= p.kill_at:
                p.kill_at = None
                assert p.pid is not None
                out.append(SendSignal(name, p.generation, p.pid, "SIGKILL"))
            elif (p.live and not p.then and p.pid is not None and p.probe_at is not None
                  and not p.probing and now >= p.probe_at):
                p.probing = True
                p.probe_at = None
                out.append(RunProbe(name, p.generation, p.pid, p.spec))
        return out

    # ------------------------------------------------------------------ commands

    def _add(self, spec: ProcessSpec, start: bool | None, now: int, out: list[Action]) -> None:
        if spec.name in self._procs:
            raise ValueError(f"process {spec.name!r} is already supervised")
        p = _Proc(spec=spec, since=now)
        self._procs[spec.name] = p
        self._changed = True
        if start if start is not None else (not spec.cluster_placed or spec.standby):
                self._launch(spec.name, p, now, out)

    def _change(self, now: int, spec: ProcessSpec, out: list[Action]) -> None:
        p = self._proc(spec.name)
        if p.then == "remove":
            raise KeyError(f"process {spec.name!r} is being removed")
        if spec == (p.pending_spec or p.spec):
            return
        self._changed = True
        if not p.live:
            p.spec = spec
            p.delay = 0
            if p.state == "backoff":              # start the new spec at once
                self._launch(spec.name, p, now, out)
            return
        p.pending_spec = spec
        if p.then in ("", "backoff", "fail"):
            self._begin_stop(spec.name, p, now, "restart", out)

    def _remove(self, now: int, name: str, out: list[Action]) -> None:
        p = self._proc(name)
        if p.live:
            if p.then:
                p.then = "remove"
                self._changed = True
            else:
                self._begin_stop(name, p, now, "remove", out)
        else:
            del self._procs[name]
            self._changed = True

    def _start_command(self, now: int, name: str, out: list[Action]) -> None:
        p = self._proc(name)
        if p.then == "remove":
            raise KeyError(f"process {name!r} is being removed")
        if p.live:
            if p.then == "stop":
                p.then = "restart"
            return
        p.delay = 0
        self._launch(name, p, now, out)

    def _stop_command(self, now: int, name: str, out: list[Action]) -> None:
        p = self._proc(name)
        if p.live:
            if p.then == "remove":
                return
            if p.then:
                p.then = "stop"
            else:
                self._begin_stop(name, p, now, "stop", out)
            return
        if p.state == "backoff":
            p.retry_at = None
            self._set(p, "stopped", now, "stopped by command")

    def _restart_command(self, now: int, name: str, out: list[Action]) -> None:
        p = self._proc(name)
        if p.then == "remove":
            raise KeyError(f"process {name!r} is being removed")
        p.delay = 0
        if p.live:
            if p.then:
                p.then = "restart"
            else:
                self._begin_stop(name, p, now, "restart", out)
        else:
            self._launch(name, p, now, out)


def _exit_words(status: int) -> str:
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exited with status {status}"

