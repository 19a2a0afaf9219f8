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
from typing import Any, Protocol

from groupcomm.events import Direct, View
from groupcomm.layers.member import DirectDone, Member
from groupcomm.layers.rpc import (
    ALL,
    Mode,
    Reply,
    RequestDone,
    no_handler,
    reply_failed,
    reply_with,
)
from groupcomm.layers.spaces import (
    Merge,
    SpaceMessage,
    SpaceRequest,
    SpaceView,
    StateInstalled,
    StateRequest,
    Synced,
)

__all__ = ["ServiceApps", "SimDriver", "SimRequest"]


class SimDriver(Protocol):
    """What the simulated applications need of :class:`~groupcomm.testing.SimCluster`."""

    @property
    def now(self) -> float: ...
    @property
    def now_us(self) -> int: ...
    def layers(self, node: int) -> Member: ...
    def act(self, node: int, action: Callable[[Member, int], object]) -> None: ...

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

    def __init__(self, sim: SimDriver) -> None:
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
        self._sim.act(node, action)

    def crashed(self, node: int) -> None:
        app = self._app(node)
        app.views.append(None)
        for handle in app.pending.values():
            handle.abandoned = True
        app.pending.clear()

    def routes(self, node: int) -> dict[type, Callable[[Any], None]]:
        """Handlers for ``node``'s Member outputs other than packets and channel messages
        (for a :class:`~groupcomm.layers.router.Router`); each also tells the observers."""
        app = self._app(node)
        sim = self._sim

        def space_view(item: SpaceView) -> None:
            app.views.append(item)
            if node in item.members or node in item.left:
                app.events.setdefault(item.space, []).append(item)

        def space_message(item: SpaceMessage) -> None:
            app.events.setdefault(item.space, []).append(item.message)

        def request(item: SpaceRequest) -> None:
            sim.layers(node).reply(sim.now_us, item, self._answer(app, item))

        def state_request(item: StateRequest) -> None:
            provider = app.providers.get(item.space)
            sim.layers(node).provide_state(sim.now_us, item, provider() if provider else None)

        def state_installed(item: StateInstalled) -> None:
            app.events.setdefault(item.space, []).append(item)
            receiver = app.receivers.get(item.space)
            if receiver is not None:
                receiver(item.state)

        def request_done(item: RequestDone) -> None:
            handle = app.pending.pop(item.req_id, None)
            if handle is not None:
                handle.replies = item.replies
                handle.finished = sim.now

        def direct_done(item: DirectDone) -> None:
            box = app.sends.pop(item.token, None)
            if box is not None:
                box[1] = item.error or "ok"

        handlers: dict[type, Callable[[Any], None]] = {
            SpaceView: space_view, SpaceMessage: space_message, SpaceRequest: request,
            StateRequest: state_request, StateInstalled: state_installed, RequestDone: request_done,
            Direct: app.direct.append, DirectDone: direct_done, View: _ignore, Merge: _ignore, Synced: _ignore,
        }
        return {t: self._observed(node, handle) for t, handle in handlers.items()}

    def _observed(self, node: int, handle: Callable[[Any], None]) -> Callable[[Any], None]:
        observers = self._observers

        def run(item: Any) -> None:
            handle(item)
            for observe in observers:
                observe(node, item)
        return run

    @staticmethod
    def _answer(app: _App, request: SpaceRequest) -> Reply:
        handler = app.handlers.get(request.space)
        if handler is None:
            return no_handler(request.space)
        try:
            return reply_with(handler(request.payload, request.requester))
        except Exception as exc:                      # the requester gets the type and message
            return reply_failed(exc)


def _ignore(item: Any) -> None:
    """Views and merges: only the observers see them."""
