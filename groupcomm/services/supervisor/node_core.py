"""One node's supervisor as a single sans-IO object: local processes plus cluster placement.

:class:`NodeCore` joins :class:`~.local.LocalSupervisor` (keeps processes
alive) and :class:`~.cluster.ClusterPlacement` (decides where placed processes
run): a :class:`~.cluster.Run` becomes a local ``Start``, a
:class:`~.cluster.Halt` a local ``Stop``, and a placed process that the
placement does not allow here is never started (a start the local supervisor
asks for then fails at once, so a restart after the lease guard killed the
process cannot revive it).  Both drivers use it: the trio
:class:`~.runner.Supervisor` and the simulation (:mod:`.sim`).

A ``live_switch`` domain controller runs as a standby wherever it can be
hosted; the placement's :class:`~.cluster.Run` then promotes the running
process in place (:class:`Promote`: the driver sets its lease and tells it its
role), and a :class:`~.cluster.Halt` restarts it as a standby -- a demoted
controller never runs on.

Actions returned: the local supervisor's (:class:`~.local.StartProcess`,
:class:`~.local.SendSignal`, :class:`~.local.RunProbe`,
:class:`~.local.TableChanged`) and the placement's that need the group
(:class:`~.cluster.Renew`, :class:`~.cluster.Publish`,
:class:`~.cluster.JoinSpace`, :class:`~.cluster.LeaveSpace`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from groupcomm.events import View
from groupcomm.layers.spaces import SpaceView
from groupcomm.services.supervisor.cluster import (
    ClusterPlacement,
    Fencing,
    Halt,
    PlacementAction,
    Run,
)
from groupcomm.services.supervisor.local import (
    Add,
    Change,
    Event,
    LocalSupervisor,
    ProcessRow,
    Remove,
    Restart,
    Start,
    StartFailed,
    StartProcess,
    Stop,
    TableChanged,
)
from groupcomm.services.supervisor.spec import (
    DOMAIN_CONTROLLER,
    STANDBY,
    ClusterSettings,
    ProcessSpec,
)

__all__ = ["Grant", "NodeCore", "Promote"]


@dataclass(frozen=True)
class Grant:
    """What a placed process is started with: its role, epoch and lease (µs, the core's clock)."""

    role: str
    epoch: int | None
    lease_until: int | None


@dataclass(frozen=True)
class Promote:
    """Make the running standby ``name`` the domain controller of ``epoch``: set its lease
    until ``lease_until`` (the core's clock), then tell it its role."""

    name: str
    role: str
    epoch: int
    lease_until: int
    generation: int


class NodeCore:
    """Local supervision and cluster placement of one node; feed it events, carry out its actions."""

    def __init__(self, specs: Iterable[ProcessSpec], *, me: int, fencing: Fencing,
                 node_id: Callable[[str], int], space: str = ClusterSettings.space, now: int = 0) -> None:
        specs = tuple(specs)
        self.local = LocalSupervisor(specs, now=now)
        self.placement = ClusterPlacement(me, fencing, node_id=node_id, space=space)
        self._initial: list = list(self.local.initial_actions())
        for spec in specs:
            if spec.cluster_placed:
                self._initial += self.placement.add(now, spec)
        self._removing: set[str] = set()
        self._promoted: dict[str, int] = {}        # standby -> the generation promoted
        self._halted: dict[str, int] = {}          # standby -> the generation demoted (restarting)

    def initial_actions(self) -> list:
        out, self._initial = self._initial, []
        return out

    # ------------------------------------------------------------------ inputs

    def handle(self, now: int, event: Event) -> list:
        """A local event (process started/exited, probe result, or a command)."""
        if isinstance(event, Add) and event.spec.cluster_placed:
            out = list(self.local.handle(now, Add(event.spec, False)))
            return self._settle(now, out + self.placement.add(now, event.spec))
        if isinstance(event, Change) and (event.spec.cluster_placed or event.spec.name in self.placement.names):
            self._check_change(event.spec)
        if isinstance(event, Remove) and event.name in self.placement.names:
            self._removing.add(event.name)
            return self._settle(now, self._placement(now, self.placement.remove(now, event.name)))
        return self._settle(now, self.local.handle(now, event))

    def _check_change(self, spec: ProcessSpec) -> None:
        """Placement settings cannot change under a running placement: they decide where it runs."""
        old = self.local.spec(spec.name)
        fields = ("role", "eligible", "replicas", "live_switch")
        changed = [f for f in fields if getattr(old, f) != getattr(spec, f)]
        if changed:
            raise ValueError(f"process {spec.name!r}: {', '.join(changed)} decide where it runs and cannot "
                             "change while it is placed; remove it and add it again")

    def ring_view(self, now: int, view: View) -> list:
        return self._settle(now, self._placement(now, self.placement.ring_view(now, view)))

    def space_view(self, now: int, view: SpaceView) -> list:
        return self._settle(now, self._placement(now, self.placement.space_view(now, view)))

    def space_message(self, now: int, space: str, sender: int, payload: bytes) -> list:
        return self._settle(now, self._placement(now, self.placement.space_message(now, space, sender, payload)))

    def tick(self, now: int, tokens: int | None = None) -> list:
        out = self._placement(now, self.placement.tick(now, tokens))
        return self._settle(now, out + self.local.tick(now))

    def leave(self, now: int) -> list:
        """Stop gracefully: hand over every placed process (then :attr:`done_leaving`)."""
        return self._settle(now, self._placement(now, self.placement.leave(now)))

    @property
    def done_leaving(self) -> bool:
        return self.placement.done_leaving

    def next_deadline(self) -> int | None:
        times = [t for t in (self.local.next_deadline(), self.placement.next_deadline()) if t is not None]
        return min(times, default=None)

    def grant(self, name: str) -> Grant | None:
        """The role, epoch and lease of placed process ``name`` (None: not placed)."""
        if name not in self.placement.names:
            return None
        lease = self.placement.lease_until(name)
        if self.local.spec(name).standby and lease is None:
            return Grant(STANDBY, None, None)
        return Grant(self.placement.role(name), self.placement.epoch(name), lease)

    def table(self) -> tuple[ProcessRow, ...]:
        """The process table, with the role each live placed process runs with now."""
        return tuple(self._with_role(row) for row in self.local.table())

    def _with_role(self, row: ProcessRow) -> ProcessRow:
        if row.name not in self.placement.names or row.pid is None:
            return row
        if self.local.spec(row.name).standby:
            role = DOMAIN_CONTROLLER if self._promoted.get(row.name) == row.generation else STANDBY
        else:
            role = self.placement.role(row.name)
        return row if role == row.role else dataclasses.replace(row, role=role)

    # ------------------------------------------------------------------ plumbing

    def _placement(self, now: int, actions: list[PlacementAction]) -> list:
        out: list = []
        for action in actions:
            if isinstance(action, Run):
                out += self._run(now, action)
            elif isinstance(action, Halt):
                out += self._halt(now, action.name)
            else:
                out.append(action)
        return out

    def _may_start(self, start: StartProcess, now: int) -> bool:
        """A placed process starts only while placed here (a standby: while it may be promoted here)."""
        name, placement = start.name, self.placement
        if name not in placement.names or placement.is_leaving(name):
            return False
        return (start.spec.standby and placement.can_host(name)) or placement.lease_valid(name, now)

    def _run(self, now: int, run: Run) -> list:
        live = self.local.live()
        if (self.local.spec(run.name).standby and run.name in live and run.name not in self._halted
                and run.epoch is not None and run.lease_until is not None):
            self._promoted[run.name] = live[run.name]
            return [Promote(run.name, DOMAIN_CONTROLLER, run.epoch, run.lease_until, live[run.name]),
                    TableChanged(self.table())]
        return self.local.handle(now, Start(run.name))

    def _halt(self, now: int, name: str) -> list:
        live = self.local.live()
        self._promoted.pop(name, None)
        if self.local.spec(name).standby and name in live and not self.placement.is_leaving(name):
            self._halted[name] = live[name]                  # demoted: it runs again as a standby
            return self.local.handle(now, Restart(name))
        return self.local.handle(now, Stop(name))

    def _settle(self, now: int, actions: list) -> list:
        """Refuse starts the placement does not allow; report halted processes that are gone."""
        out: list = []
        pending = list(actions)
        while pending:
            action = pending.pop(0)
            if isinstance(action, TableChanged):
                action = TableChanged(self.table())
            if isinstance(action, StartProcess) and action.spec.cluster_placed and not self._may_start(action, now):
                pending += self.local.handle(now, StartFailed(action.name, action.generation,
                                                              "not placed on this node now"))
                pending += self.local.handle(now, Stop(action.name))
                continue
            out.append(action)
        live = self.local.live()
        gone = {name for name, generation in self._halted.items() if live.get(name, generation + 1) > generation}
        for name in gone:
            del self._halted[name]
        for name in self.placement.awaiting_stop():
            if name not in live or name in gone:
                done = self._placement(now, self.placement.stopped(now, name))
                if name in self._removing and name not in self.placement.names:
                    self._removing.discard(name)
                    done += self.local.handle(now, Remove(name))
                out += self._settle(now, done)
        return out
