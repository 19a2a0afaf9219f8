"""Session stores on :class:`~groupcomm.testing.SimCluster`, in virtual time.

Each simulated node runs the real :class:`~.core.SessionCore` fed by the real
layers of its simulated member: ring views, the end of SYNC rounds, the
application space's views and multicasts, and the frames other members sent
it (point-to-point requests in the space, answered at once with an empty
reply).  Sessions live in memory: a crashed node loses what it held, a
restarted one starts empty, as a real process would.

Operations are asynchronous as in the trio driver: each returns a token whose
result appears in :attr:`SimSessions.results`.  :meth:`SimSessions.increment`
runs a whole request of the demo counter (load or create, save ``counter+1``,
release) and records whether it was acknowledged::

    sim = SimCluster(3, seed=1, stack="sim", quorum=QuorumConfig(expected_votes=3))
    store = SimSessions(sim, SessionSettings(backups=1))
    store.run_until(store.ready, 20)
    req = store.increment(1, None)                 # creates a session on node 1
    store.run_until(lambda: req.finished, 10)
    again = store.increment(2, req.sid)            # migrates it to node 2
"""

from __future__ import annotations

import base64
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from groupcomm.errors import (
    LocalProtocolError,
    MemberUnreachable,
    NotOperational,
    QueueFull,
)
from groupcomm.events import View
from groupcomm.layers.rpc import ALL
from groupcomm.layers.spaces import SpaceMessage, SpaceView, Synced
from groupcomm.services.sessions.core import Announce, Done, Send, SessionCore
from groupcomm.services.sessions.errors import SessionError
from groupcomm.services.sessions.settings import SessionSettings, session_space
from groupcomm.testing.stepping import SteppedHarness

__all__ = ["PENDING", "Increment", "SimSessions"]

_US = 1_000_000
PENDING = object()
"""The result of an operation that has not finished."""


@dataclass
class Increment:
    """One request of the counter app: its node, session, outcome and the counter it saved."""

    node: int
    sid: str | None
    started: float
    phase: str = "load"                        # load, create, save, done
    token: int = 0
    acked: bool | None = None                  # None: not finished
    counter: int | None = None                 # the counter the save wrote (acknowledged or not)
    error: str = ""
    lost: bool = False                         # the session was not found
    finished_at: float | None = None
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.acked is not None


@dataclass
class _Node:
    core: SessionCore
    incarnation: int


class SimSessions(SteppedHarness):
    """A session store on every live node of ``sim`` for application ``app``."""

    def __init__(self, sim: Any, settings: SessionSettings | None = None, *, app: str = "shop",
                 tags: Mapping[int, Mapping[str, str]] | None = None, step: float = 0.01,
                 id_seed: int = 0) -> None:
        self.sim = sim
        self._ids = random.Random(id_seed)      # session ids from a seed: a run repeats exactly
        self.settings = settings or SessionSettings()
        self.space = session_space(app)
        self.tags = {n: dict((tags or {}).get(n, {})) for n in sim.nodes}
        self.step = step
        self._timers: list = []
        self._nodes: dict[int, _Node] = {}
        self._incarnations = dict.fromkeys(sim.nodes, 0)
        self._deferred: list[tuple[int, int, Any, bool]] = []
        self._tokens = 0
        self._requests: dict[int, Increment] = {}      # token -> the increment waiting for it
        self.results: dict[int, Any] = {}
        """Token -> the operation's result (a record, None, or a SessionError); PENDING until done."""
        self.increments: list[Increment] = []
        """Every increment started, in order."""
        self.left: set[int] = set()
        """Nodes that stopped gracefully (left the space)."""
        self.checks: list[Callable[[], None]] = []
        """Called after every step of the simulation (a test's invariant checks)."""
        sim.services.add_observer(self._observe)
        for node in sim.nodes:
            sim.services.on_request(node, self.space, self._handler(node))
            if node in sim.live:
                self._boot(node)

    # ------------------------------------------------------------------ API

    def core(self, node: int) -> SessionCore | None:
        """The running core of ``node`` (None while crashed or stopped)."""
        entry = self._nodes.get(node)
        return entry.core if entry is not None else None

    @property
    def running(self) -> tuple[int, ...]:
        return tuple(sorted(self._nodes))

    def load(self, node: int, sid: str) -> int:
        return self._op(node, lambda core, token, now: core.load(token, sid, now))

    def create(self, node: int) -> int:
        return self._op(node, lambda core, token, now: core.create(token, now))

    def save(self, node: int, sid: str, values: Mapping[str, Any]) -> int:
        return self._op(node, lambda core, token, now: core.save(token, sid, values, now))

    def invalidate(self, node: int, sid: str) -> int:
        return self._op(node, lambda core, token, now: core.invalidate(token, sid, now))

    def release(self, node: int, sid: str) -> None:
        entry = self._nodes[node]
        entry.core.release(sid, self.sim.now)
        self._apply(node, entry.core.take())

    def increment(self, node: int, sid: str | None) -> Increment:
        """Start a counter request at ``node`` for ``sid`` (None: a new session)."""
        inc = Increment(node, sid, self.sim.now)
        self.increments.append(inc)
        if node not in self._nodes:
            self._end(inc, False, "node down")
            return inc
        if sid is None:
            inc.phase = "create"
            inc.token = self.create(node)
        else:
            inc.token = self.load(node, sid)
        self._requests[inc.token] = inc
        self._advance(inc)
        return inc

    def crash(self, node: int) -> None:
        """Crash ``node``: it loses the sessions and copies in its memory."""
        self.sim.crash(node)
        self._nodes.pop(node, None)
        self._fail_requests(node, "node crashed")

    def restart(self, node: int) -> None:
        """Start ``node`` again, empty (a node that stopped gracefully: its process exits first)."""
        if node in self.left and node in self.sim.live:
            self.sim.crash(node)
        self.sim.restart(node)
        self.left.discard(node)
        self._boot(node)

    def stop(self, node: int) -> None:
        """Stop ``node`` gracefully: it evacuates its sessions, then leaves the space."""
        entry = self._nodes[node]
        self._tokens += 1
        token = self._tokens
        self.results[token] = PENDING
        self._leaving = getattr(self, "_leaving", {})
        self._leaving[token] = node
        entry.core.leave(token, self.sim.now)
        self._apply(node, entry.core.take())

    def ready(self) -> bool:
        """Every running node is in the space's view, the same one, primary, and indexed."""
        cores = [e.core for e in self._nodes.values()]
        if not cores:
            return False
        views = {c.view_id for c in cores}
        return (len(views) == 1 and None not in views and all(c.indexed for c in cores)
                and set(cores[0].members) == set(self._nodes))

    def settled(self) -> bool:
        """:meth:`ready`, no operation or migration under way, and every held session has its backups."""
        if not self.ready():
            return False
        for entry in self._nodes.values():
            core = entry.core
            if core.pending_work():
                return False
        return all(inc.finished for inc in self.increments)

    # ------------------------------------------------------------------ plumbing

    def _op(self, node: int, start: Any) -> int:
        entry = self._nodes[node]
        self._tokens += 1
        token = self._tokens
        self.results[token] = PENDING
        start(entry.core, token, self.sim.now)
        self._apply(node, entry.core.take())
        return token

    def _advance(self, inc: Increment) -> None:
        """Move ``inc`` on after its current operation finished."""
        while inc.acked is None:
            result = self.results.get(inc.token, PENDING)
            if result is PENDING:
                return
            self._requests.pop(inc.token, None)
            if inc.phase in ("load", "create"):
                if isinstance(result, SessionError):
                    self._end(inc, False, type(result).__name__)
                    return
                if result is None:
                    inc.lost = True
                    self._end(inc, False, "not found")
                    return
                inc.sid = result.id
                values = result.values()
                values["counter"] = values.get("counter", 0) + 1
                inc.counter = values["counter"]
                inc.values = values
                inc.phase = "save"
                if inc.node not in self._nodes:
                    self._end(inc, False, "node down")
                    return
                inc.token = self.save(inc.node, inc.sid, values)
                self._requests[inc.token] = inc
            elif inc.phase == "save":
                ok = not isinstance(result, SessionError)
                if inc.node in self._nodes:
                    self.release(inc.node, inc.sid)
                self._end(inc, ok, "" if ok else type(result).__name__)

    def _end(self, inc: Increment, acked: bool, error: str) -> None:
        inc.acked, inc.error, inc.phase, inc.finished_at = acked, error, "done", self.sim.now

    def _fail_requests(self, node: int, why: str) -> None:
        for token, inc in list(self._requests.items()):
            if inc.node == node:
                self._requests.pop(token)
                self.results[token] = None
                self._end(inc, False, why)

    def _boot(self, node: int) -> None:
        self._incarnations[node] += 1
        core = SessionCore(node, f"n{node}", self.settings, self.tags.get(node), new_id=self._new_id)
        self._nodes[node] = _Node(core, self._incarnations[node])
        self._defer(node, lambda: self.sim.services.join(node, self.space))

    def _new_id(self) -> str:
        return base64.urlsafe_b64encode(self._ids.randbytes(16)).rstrip(b"=").decode()

    def _handler(self, node: int) -> Any:
        def handle(payload: bytes, requester: int) -> bytes:
            entry = self._nodes.get(node)
            if entry is not None:
                entry.core.receive(requester, payload, self.sim.now)
                self._apply(node, entry.core.take())
            return b""
        return handle

    def _observe(self, node: int, item: Any) -> None:
        entry = self._nodes.get(node)
        if entry is None:
            return
        core = entry.core
        t = type(item)
        now = self.sim.now
        if t is View:
            core.ring_view(item, now)
        elif t is Synced:
            core.synced(now)
        elif t is SpaceView:
            if item.space != self.space:
                return
            core.space_view(item, now)
            if node not in item.members and node in self._nodes and core.leaving:
                self._nodes.pop(node, None)
                self.left.add(node)
        elif t is SpaceMessage:
            if item.space != self.space:
                return
            core.space_message(item.message.sender, item.message.payload, now)
        else:
            return
        self._apply(node, core.take())

    def _apply(self, node: int, actions: list) -> None:
        for action in actions:
            t = type(action)
            if t is Done:
                self.results[action.token] = action.result
                leaving = getattr(self, "_leaving", {})
                if action.token in leaving:
                    self._defer(node, lambda: self.sim.services.leave(node, self.space), leave=True)
                inc = self._requests.get(action.token)
                if inc is not None:
                    self._advance(inc)
            elif t is Send:
                dest, payload = action.dest, action.payload
                self._defer(node, lambda d=dest, p=payload: self.sim.act(
                    node, lambda m, now: _request(m, now, self.space, p, d)))
            elif t is Announce:
                payload = action.payload
                self._defer(node, lambda p=payload: self._announce(node, p))

    def _announce(self, node: int, payload: bytes) -> None:
        try:
            self.sim.services.send(node, self.space, payload)
        except LocalProtocolError:
            pass                # a stopping node left the space already: nobody to tell

    def _defer(self, node: int, act: Any, *, leave: bool = False) -> None:
        """Carry ``act`` out after this step, if ``node`` is still up then (``leave``: the space's
        leave of a stopping node, carried out even once it is out of the view)."""
        entry = self._nodes.get(node)
        if entry is not None:
            self._deferred.append((node, entry.incarnation, act, leave))

    def _after_step(self) -> None:
        now = self.sim.now
        for node, entry in list(self._nodes.items()):
            deadline = entry.core.next_deadline()
            if deadline is not None and deadline <= now:
                entry.core.tick(now)
                self._apply(node, entry.core.take())
        while self._deferred:
            deferred, self._deferred = self._deferred, []
            for node, incarnation, act, leave in deferred:
                entry = self._nodes.get(node)
                live = entry is not None and entry.incarnation == incarnation and node in self.sim.live
                if live or (leave and entry is None and node in self.left and node in self.sim.live):
                    act()
        for check in self.checks:
            check()


def _request(member: Any, now: int, space: str, payload: bytes, dest: int) -> None:
    """Send a frame as a point-to-point request in the space (its empty reply is ignored)."""
    try:
        member.request(now, space, payload, to=(dest,), mode=ALL, timeout_us=30 * _US)
    except (MemberUnreachable, QueueFull, NotOperational):
        pass                    # the member left the view or the queue is full: the view change redoes it
