"""Supervisors on :class:`~groupcomm.testing.SimCluster` with simulated processes, in virtual time.

Each simulated node runs the real :class:`~.node_core.NodeCore` (local
supervision and cluster placement) fed by the real layers of its simulated
member.  Processes are simulated: they start and stop after random latencies,
may ignore their stop signal (``hang``), die with their node (the parent-death
signal), and die when their lease lapses (the lease guard) -- whatever their
supervisor is doing, so a paused supervisor's process stops on its own.

Every process instance is recorded with when it started and ended
(:attr:`SimSupervisors.instances`); :func:`overlapping` finds domain
controllers that ran at the same time::

    sim = SimCluster(3, seed=1, stack="sim", quorum=QuorumConfig(expected_votes=3))
    sups = SimSupervisors(sim, {n: [dc_spec] for n in sim.nodes}, fencing=fencing)
    sups.run(10.0)
    assert len(sups.running("dc")) == 1 and not overlapping(sups.instances, "dc")
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from groupcomm.events import View
from groupcomm.layers.spaces import SpaceMessage, SpaceView
from groupcomm.services.supervisor.cluster import (
    Fencing,
    JoinSpace,
    LeaveSpace,
    Publish,
    Renew,
)
from groupcomm.services.supervisor.local import (
    Exited,
    ProbeResult,
    ProcessRow,
    RunProbe,
    SendSignal,
    Started,
    StartProcess,
    TableChanged,
)
from groupcomm.services.supervisor.node_core import NodeCore, Promote
from groupcomm.services.supervisor.spec import (
    DOMAIN_CONTROLLER,
    ClusterSettings,
    ProcessSpec,
)
from groupcomm.testing.sim import SimCluster
from groupcomm.testing.stepping import SteppedHarness

__all__ = ["ProcessModel", "SimInstance", "SimSupervisors", "overlapping"]

_US = 1_000_000


@dataclass(frozen=True)
class ProcessModel:
    """How simulated processes behave (seconds)."""

    start_latency: tuple[float, float] = (0.005, 0.05)
    """From the supervisor's start to the process reporting as started."""
    stop_latency: tuple[float, float] = (0.0, 0.1)
    """From its stop signal to its exit (unless it hangs)."""
    guard_latency: tuple[float, float] = (0.0, 0.05)
    """From the lease lapsing to the guard's kill taking effect (within ``kill_allowance``)."""
    hang: float = 0.0
    """Probability that an instance ignores its stop signal (it dies at SIGKILL)."""


@dataclass
class SimInstance:
    """One simulated process instance (a generation) and when it ran (virtual seconds)."""

    node: int
    name: str
    generation: int
    role: str
    epoch: int | None
    started: float
    lease_until: float | None = None
    ended: float | None = None
    hang: bool = False
    why: str = ""

    @property
    def alive(self) -> bool:
        return self.ended is None


def overlapping(instances: Iterable[SimInstance], name: str, *, now: float = float("inf"),
                role: str = DOMAIN_CONTROLLER) -> list[tuple[SimInstance, SimInstance]]:
    """Pairs of ``name`` instances with ``role`` whose lifetimes overlap (a running one ends at ``now``)."""
    runs = sorted((i for i in instances if i.name == name and i.role == role), key=lambda i: i.started)
    pairs = []
    for a_index, a in enumerate(runs):
        a_end = a.ended if a.ended is not None else now
        for b in runs[a_index + 1:]:
            if b.started >= a_end:
                break
            pairs.append((a, b))
    return pairs


@dataclass
class _Node:
    core: NodeCore
    pending_exits: list[Exited] = field(default_factory=list)
    table: tuple[ProcessRow, ...] = ()


class SimSupervisors(SteppedHarness):
    """Supervisors on every node of ``sim`` (built with ``stack=...``), each with its process specs.

    ``nodes``: node id -> the specs of its node file; ``names``: node id -> node
    name (default ``n<ID>``, what ``eligible`` lists).  Drive time with
    :meth:`run`, faults with the methods below or ``sim`` itself (partitions,
    loss, one-way cuts); :meth:`crash` and :meth:`restart` must be used instead
    of ``sim.crash``/``sim.restart`` so processes die with their node.
    """

    def __init__(self, sim: SimCluster, nodes: Mapping[int, Iterable[ProcessSpec]], *, fencing: Fencing,
                 names: Mapping[int, str] | None = None, model: ProcessModel | None = None, seed: int = 0,
                 space: str = ClusterSettings.space, step: float = 0.01) -> None:
        self.sim = sim
        self.fencing = fencing
        self.model = model or ProcessModel()
        self.space = space
        self.step = step
        self._specs = {n: tuple(specs) for n, specs in nodes.items()}
        self.names = {n: (names or {}).get(n, f"n{n}") for n in self._specs}
        self._ids = {name: n for n, name in self.names.items()}
        self._rng = random.Random(seed)
        self._nodes: dict[int, _Node] = {}
        self._timers: list[tuple[int, int, Callable[[], None]]] = []
        self._order = 0
        self._deferred: list[tuple[int, Callable[[], None]]] = []
        self._leaving: set[int] = set()
        self.instances: list[SimInstance] = []
        """Every process instance ever started, in start order."""
        self.decisions: list[tuple[float, int, View | SpaceView]] = []
        """(time, node, view) for every ring view and placement space view a node's supervisor acted on."""
        sim.services.add_observer(self._observe)
        for node in self._specs:
            self._boot(node)

    # ------------------------------------------------------------------ faults and control

    def crash(self, node: int) -> None:
        """Crash ``node``: its supervisor and every process it started die at once."""
        self.sim.crash(node)
        self._nodes.pop(node, None)
        self._leaving.discard(node)
        self._deferred = [(n, act) for n, act in self._deferred if n != node]   # died with it
        for inst in self._live(node):
            self._end(inst, "node crashed")

    def restart(self, node: int) -> None:
        """Start a crashed node's supervisor again (a new incarnation)."""
        self.sim.restart(node)
        self._boot(node)

    def stop(self, node: int) -> None:
        """Stop ``node``'s supervisor gracefully: hand its placed processes over, then leave."""
        entry = self._nodes[node]
        self._leaving.add(node)
        self._apply(node, entry.core.leave(self.sim.now_us))

    def pause(self, node: int, seconds: float) -> None:
        """Freeze ``node``'s supervisor and ring (not its processes) for ``seconds``."""
        self.sim.pause(node, seconds)

    def command(self, node: int, event: Any) -> None:
        """Hand ``node``'s supervisor a local event or runtime command (``Add``, ``Change``,
        ``Remove``, ``Start``, ``Stop``, ``Restart`` of :mod:`.local`); its errors propagate."""
        self._apply(node, self._nodes[node].core.handle(self.sim.now_us, event))

    def kill_process(self, node: int, name: str) -> bool:
        """Kill ``name``'s live instance on ``node`` (SIGKILL from outside); False if none runs."""
        for inst in self._live(node):
            if inst.name == name:
                self._die(inst, -9, "killed")
                return True
        return False

    # ------------------------------------------------------------------ observation

    def running(self, name: str, role: str | None = None) -> list[SimInstance]:
        """The live instances of ``name`` (with ``role``, if given)."""
        return [i for i in self.instances if i.alive and i.name == name and (role is None or i.role == role)]

    def table(self, node: int) -> tuple[ProcessRow, ...]:
        entry = self._nodes.get(node)
        return entry.table if entry is not None else ()

    def core(self, node: int) -> NodeCore | None:
        entry = self._nodes.get(node)
        return entry.core if entry is not None else None

    @property
    def leaving(self) -> tuple[int, ...]:
        """Nodes handing over before they leave (after :meth:`stop`)."""
        return tuple(self._leaving)

    @property
    def supervising(self) -> tuple[int, ...]:
        """Nodes whose supervisor is running."""
        return tuple(self._nodes)

    # ------------------------------------------------------------------ time

    def _after_step(self) -> None:
        now = self.sim.now_us
        while self._timers and self._timers[0][0] <= now:
            _, _, fire = heapq.heappop(self._timers)
            fire()
        for inst in self.instances:
            if inst.alive and inst.lease_until is not None and now / _US >= inst.lease_until:
                self._die(inst, -9, "lease lapsed (guard)")
        for node, entry in list(self._nodes.items()):
            if self.sim.paused(node):
                continue
            while entry.pending_exits and node in self._nodes:
                self._apply(node, entry.core.handle(now, entry.pending_exits.pop(0)))
            if node not in self._nodes:
                continue
            ring = self.sim.ring(node)
            tokens = ring.stats()["tokens_received"] if ring is not None else None
            self._apply(node, entry.core.tick(now, tokens))
        deferred, self._deferred = self._deferred, []
        for node, act in deferred:
            if node in self._nodes and not self.sim.paused(node):
                act()
            elif node in self._nodes:
                self._deferred.append((node, act))
        for node in list(self._leaving):
            entry = self._nodes.get(node)
            if (entry is not None and entry.core.done_leaving and not any(n == node for n, _ in self._deferred)
                    and not self._in_any_space(node)):
                self.sim.leave(node)
                self._nodes.pop(node, None)
                self._leaving.discard(node)
                for inst in self._live(node):        # the supervisor exits: what it left dies with it
                    self._end(inst, "supervisor exited")

    def _in_any_space(self, node: int) -> bool:
        prefix = f"{self.space}/"
        views = [v for v in self.sim.services.views(node) if v is not None and v.space.startswith(prefix)]
        latest: dict[str, SpaceView] = {}
        for v in views:
            latest[v.space] = v
        return any(node in v.members for v in latest.values())

    def _later(self, delay: float, fire: Callable[[], None]) -> None:
        self._order += 1
        heapq.heappush(self._timers, (self.sim.now_us + max(1, round(delay * _US)), self._order, fire))

    # ------------------------------------------------------------------ supervisors

    def _boot(self, node: int) -> None:
        core = NodeCore(self._specs[node], me=node, fencing=self.fencing, node_id=self._node_id,
                        space=self.space, now=self.sim.now_us)
        self._nodes[node] = _Node(core)
        self._apply(node, core.initial_actions())

    def _node_id(self, name: str) -> int:
        return self._ids.get(name, 0)

    def _observe(self, node: int, item: Any) -> None:
        entry = self._nodes.get(node)
        if entry is None:
            return
        now = self.sim.now_us
        t = type(item)
        if t is View:
            self.decisions.append((self.sim.now, node, item))
            self._apply(node, entry.core.ring_view(now, item))
        elif t is SpaceView:
            if item.space.startswith(f"{self.space}/"):
                self.decisions.append((self.sim.now, node, item))
            self._apply(node, entry.core.space_view(now, item))
        elif t is SpaceMessage:
            self._apply(node, entry.core.space_message(now, item.space, item.message.sender, item.message.payload))

    def _apply(self, node: int, actions: list) -> None:
        entry = self._nodes.get(node)
        if entry is None:
            return
        services = self.sim.services
        for action in actions:
            t = type(action)
            if t is StartProcess:
                self._spawn(node, entry, action)
            elif t is SendSignal:
                self._signal(node, action)
            elif t is RunProbe:
                probe = ProbeResult(action.name, action.generation, "ok")
                self._later(0.001, lambda n=node, p=probe: self._feed(n, p))
            elif t is TableChanged:
                entry.table = action.rows
            elif t is Promote:
                for inst in self._live(node):
                    if inst.name == action.name and inst.generation == action.generation:   # its run starts here
                        inst.role, inst.epoch, inst.started = action.role, action.epoch, self.sim.now
                        inst.lease_until = action.lease_until / _US + self._rng.uniform(*self.model.guard_latency)
            elif t is Renew:
                for inst in self._live(node):
                    if inst.name == action.name and inst.lease_until is not None:
                        inst.lease_until = max(inst.lease_until, action.until / _US)
            elif t is Publish:
                self._deferred.append((node, lambda n=node, a=action: services.send(n, a.space, a.payload)))
            elif t is JoinSpace:
                self._deferred.append((node, lambda n=node, a=action: services.join(n, a.space)))
            elif t is LeaveSpace:
                self._deferred.append((node, lambda n=node, a=action: services.leave(n, a.space)))

    def _feed(self, node: int, event: Any) -> None:
        entry = self._nodes.get(node)
        if entry is None:
            return
        if self.sim.paused(node):
            entry.pending_exits.append(event)
            return
        try:
            actions = entry.core.handle(self.sim.now_us, event)
        except KeyError:
            return                                  # the process was removed meanwhile
        self._apply(node, actions)

    # ------------------------------------------------------------------ simulated processes

    def _live(self, node: int) -> list[SimInstance]:
        return [i for i in self.instances if i.alive and i.node == node]

    def _spawn(self, node: int, entry: _Node, action: StartProcess) -> None:
        grant = entry.core.grant(action.name)
        role = grant.role if grant is not None else action.spec.role
        lease = grant.lease_until / _US if grant is not None and grant.lease_until is not None else None
        inst = SimInstance(node, action.name, action.generation, role, grant.epoch if grant else None,
                           self.sim.now, lease, hang=self._rng.random() < self.model.hang)
        if lease is not None:
            inst.lease_until = lease + self._rng.uniform(*self.model.guard_latency)
        self.instances.append(inst)
        self._later(self._rng.uniform(*self.model.start_latency),
                    lambda: inst.alive and self._feed(node, Started(inst.name, inst.generation, 10_000 + len(self.instances))))

    def _signal(self, node: int, action: SendSignal) -> None:
        for inst in self._live(node):
            if inst.name == action.name and inst.generation == action.generation:
                if action.signal == "SIGKILL":
                    self._die(inst, -9, "SIGKILL")
                elif not inst.hang:
                    self._later(self._rng.uniform(*self.model.stop_latency),
                                lambda i=inst: i.alive and self._die(i, 0, "stopped"))

    def _die(self, inst: SimInstance, status: int, why: str) -> None:
        """The instance ends while its supervisor lives: it is told (as waitpid would)."""
        if inst.alive:
            self._end(inst, why)
            self._feed(inst.node, Exited(inst.name, inst.generation, status))

    def _end(self, inst: SimInstance, why: str) -> None:
        """The instance ends (its supervisor is gone too, or tells it through :meth:`_die`)."""
        if inst.alive:
            inst.ended = self.sim.now
            inst.why = why
