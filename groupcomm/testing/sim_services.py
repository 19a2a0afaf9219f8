"""Spaces, request-reply and state transfer on :class:`~groupcomm.testing.SimCluster`.

``sim.services`` (a :class:`ServiceApps`) plays the application of every
simulated member: it joins and leaves spaces, sends, makes requests, answers
them with the handlers you register, and takes and installs state snapshots
with your provider and receiver functions.  Handlers are plain functions here
(virtual time does not pass while they run); the trio Channel runs the same
layers with async handlers.

Registrations outlive crashes (they are the application's code); a restarted
member must join its spaces again, as a restarted process would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from groupcomm.errors import NotOperational
from groupcomm.events import Direct, View
from groupcomm.layers.member import DirectDone
from groupcomm.layers.rpc import ALL, Mode, Reply, RequestDone
from groupcomm.layers.spaces import Merge, SpaceMessage, SpaceRequest, SpaceView, StateInstalled, StateRequest

if TYPE_CHECKING:
    from groupcomm.layers.member import Member
    from groupcomm.testing.sim import SimCluster

__all__ = ["ServiceApps", "SimRequest"]

_US = 1_000_000


@dataclass
class SimRequest:
    """A request made in the simulation; ``replies`` is set once it completes."""

    node: int
    space: str
    payload: bytes
    mode: Mode
    started: float
    timeout: float
    req_id: int = 0
    replies: dict[int, Reply] | None = None
    finished: float | None = None
    abandoned: bool = False
    """The requesting member crashed or left first."""

    @property
    def done(self) -> bool:
        return self.replies is not None


@dataclass
class _App:
    handlers: dict[str, Callable[[bytes, int], bytes]] = field(default_factory=dict)
    providers: dict[str, Callable[[], bytes | None]] = field(default_factory=dict)
    receivers: dict[str, Callable[[bytes | None], None]] = field(default_factory=dict)
    views: list[SpaceView | None] = field(default_factory=list)     # None marks a crash
    events: dict[str, list] = field(default_factory=dict)
    pending: dict[int, SimRequest] = field(default_factory=dict)
    direct: list[Direct] = field(default_factory=list)
    sends: dict[int, list] = field(default_factory=dict)      # send_to token -> [dest, outcome]


class ServiceApps:
    """The application side of every simulated member."""

    def __init__(self, sim: SimCluster) -> None:
        self._sim = sim
        self._apps: dict[int, _App] = {}
        self._observers: list[Callable[[int, Any], None]] = []
        self.requests: list[SimRequest] = []
        """Every request made, in order."""

    def _app(self, node: int) -> _App:
        return self._apps.setdefault(node, _App())

    # -- registration -------------------------------------------------------------

    def on_request(self, node: int, space: str, handler: Callable[[bytes, int], bytes]) -> None:
        """``handler(payload, requester) -> bytes`` answers requests to ``space`` ("" = channel) at ``node``."""
        self._app(node).handlers[space] = handler

    def state_provider(self, node: int, space: str, fn: Callable[[], bytes | None]) -> None:
        self._app(node).providers[space] = fn

    def state_receiver(self, node: int, space: str, fn: Callable[[bytes | None], None]) -> None:
        self._app(node).receivers[space] = fn

    def add_observer(self, observe: Callable[[int, Any], None]) -> None:
        """``observe(node, event)`` for every view, space event, state install and merge, in order."""
        self._observers.append(observe)

    # -- actions --------------------------------------------------------------------

    def join(self, node: int, space: str) -> None:
        self._act(node, lambda member, now: member.join_space(now, space))

    def leave(self, node: int, space: str) -> None:
        self._act(node, lambda member, now: member.leave_space(now, space))

    def send(self, node: int, space: str, payload: bytes, safe: bool = False) -> None:
        self._act(node, lambda member, now: member.space_send(now, space, payload, safe))

    def request(self, node: int, space: str, payload: bytes, *, to: Iterable[int] | None = None,
                mode: Mode = ALL, timeout: float = 2.0) -> SimRequest:
        handle = SimRequest(node, space, bytes(payload), mode, self._sim.now, timeout)
        targets = None if to is None else tuple(to)

        def start(member: Member, now: int) -> None:
            handle.req_id = member.request(now, space, payload, to=targets, mode=mode,
                                           timeout_us=int(timeout * _US))
            self._app(node).pending[handle.req_id] = handle

        self._act(node, start)
        self.requests.append(handle)
        self._sim._flush(self._sim._member(node))   # NONE completes at once
        return handle

    def send_to(self, node: int, dest: int, payload: bytes) -> list:
        """A point-to-point message; returns ``[dest, outcome]``: outcome None until acknowledged
        (``"ok"``) or failed (the reason)."""
        box: list = [dest, None]

        def start(member: Member, now: int) -> None:
            self._app(node).sends[member.send_to(now, dest, payload)] = box

        self._act(node, start)
        return box

    def direct(self, node: int) -> list[Direct]:
        """Point-to-point messages ``node`` received, in order."""
        return list(self._app(node).direct)

    # -- observation -------------------------------------------------------------------

    def views(self, node: int) -> list[SpaceView | None]:
        """Every space view ``node`` installed, in order (``None`` where it crashed)."""
        return list(self._app(node).views)

    def events(self, node: int, space: str) -> list:
        """The events ``node``'s application saw for ``space`` (Message, SpaceView, StateInstalled)."""
        return list(self._app(node).events.get(space, []))

    # -- driven by the simulator ----------------------------------------------------------

    def _act(self, node: int, action: Callable[[Member, int], None]) -> None:
        sim = self._sim
        m = sim._member(node)
        if m.ring is None:
            raise NotOperational(f"node {node} is crashed")
        action(m.ring.member, sim._now)  # type: ignore[union-attr]
        sim._quiet_since = sim._now
        sim._flush(m)

    def crashed(self, node: int) -> None:
        app = self._app(node)
        app.views.append(None)
        for handle in app.pending.values():
            handle.abandoned = True
        app.pending.clear()

    def output(self, node: int, item: Any) -> None:
        """One output of ``node``'s Member other than packets and channel messages."""
        app = self._app(node)
        t = type(item)
        member = self._sim._member(node).ring.member  # type: ignore[union-attr]
        now = self._sim._now
        if t is SpaceView:
            app.views.append(item)
            if node in item.members or node in item.left:
                app.events.setdefault(item.space, []).append(item)
        elif t is SpaceMessage:
            app.events.setdefault(item.space, []).append(item.message)
        elif t is SpaceRequest:
            member.reply(now, item, self._answer(app, item))
        elif t is StateRequest:
            provider = app.providers.get(item.space)
            member.provide_state(now, item, provider() if provider else None)
        elif t is StateInstalled:
            app.events.setdefault(item.space, []).append(item)
            receiver = app.receivers.get(item.space)
            if receiver is not None:
                receiver(item.state)
        elif t is RequestDone:
            handle = app.pending.pop(item.req_id, None)
            if handle is not None:
                handle.replies = item.replies
                handle.finished = self._sim.now
        elif t is Direct:
            app.direct.append(item)
        elif t is DirectDone:
            box = app.sends.pop(item.token, None)
            if box is not None:
                box[1] = item.error or "ok"
        elif t not in (View, Merge):
            raise AssertionError(f"unexpected output {item!r}")
        for observe in self._observers:
            observe(node, item)

    @staticmethod
    def _answer(app: _App, request: SpaceRequest) -> Reply:
        handler = app.handlers.get(request.space)
        if handler is None:
            return Reply(False, None, f"LookupError: no request handler for space {request.space!r}", "error")
        try:
            return Reply(True, bytes(handler(request.payload, request.requester)), None, "ok")
        except Exception as exc:                      # the requester gets the type and message
            return Reply(False, None, f"{type(exc).__name__}: {exc}", "error")
