"""The replicated session store on a trio :class:`~groupcomm.io.channel.Channel`.

:class:`ReplicatedSessionStore` runs a :class:`~.core.SessionCore` for one web
application: it joins the application's space on the channel, feeds the core
the channel's views and the frames other members send, and carries out what the
core asks (frames as point-to-point requests in the space).  It is the store
:class:`~.asgi.SessionMiddleware` takes, and a Python API of its own::

    async with open_channel(...) as channel, ReplicatedSessionStore(channel, "shop") as store:
        app = SessionMiddleware(shop_app, store)          # HTTP
        async with store.session(session_id) as session:  # or directly (None: a new session)
            session.values["cart"] = [...]               # saved (replicated) when the block ends

Leaving the ``async with`` stops gracefully: the sessions this node holds are
handed to other members, then the node leaves the space.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Self

import trio

from groupcomm.errors import (
    ChannelClosed,
    LocalProtocolError,
    MemberUnreachable,
    NotOperational,
    QueueFull,
)
from groupcomm.events import View
from groupcomm.layers.rpc import NONE
from groupcomm.layers.spaces import SpaceMessage, SpaceView, StateRequest, Synced
from groupcomm.services.sessions.asgi import SessionData
from groupcomm.services.sessions.core import Announce, Done, Send, SessionCore
from groupcomm.services.sessions.errors import SessionError
from groupcomm.services.sessions.record import Session
from groupcomm.services.sessions.settings import SessionSettings, session_space

__all__ = ["ReplicatedSessionStore"]

log = logging.getLogger(__name__)

_CHANNEL_GONE = (ChannelClosed, LocalProtocolError, NotOperational)
_FRAME_TIMEOUT_US = 30_000_000        # unused with mode NONE (no reply awaited): views decide failures


class ReplicatedSessionStore:
    """Sessions of application ``app`` kept by the members of its space (see the module doc).

    ``settings``: :class:`~.settings.SessionSettings` (K backups, limits, timers);
    ``tags``: this node's failure domains for :class:`~.buckets.TagAware`
    (e.g. ``{"host": "h1", "rack": "r2"}``); ``name``: the routing hint written
    into cookies (default: the channel's node name); ``clock``: seconds on a
    clock the nodes share (session times; default the wall clock).
    """

    def __init__(self, channel: Any, app: str, settings: SessionSettings | None = None, *,
                 tags: Mapping[str, str] | None = None, name: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.channel = channel
        self.app = app
        self.space = session_space(app)
        self.settings = settings or SessionSettings()
        self.node_name = name or str(getattr(channel, "name", "") or channel.address)
        self.core = SessionCore(channel.address, self.node_name, self.settings, tags)
        self._clock = clock
        self._tokens = 0
        self._waiting: dict[int, list[Any]] = {}          # token -> [event, result]
        self._sends: deque[Send | Announce | StateRequest] = deque()
        self._send_wake = trio.Event()
        self._timer_wake = trio.Event()
        self._open = False
        self._exit: contextlib.AsyncExitStack | None = None

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            self.channel.claim_space(self.space, on_request=self._on_request)
            stack.callback(self.channel.release_space, self.space)
            nursery = await stack.enter_async_context(trio.open_nursery())
            stack.callback(nursery.cancel_scope.cancel)
            self._open = True
            view = self.channel.view
            if view is not None:                                   # installed before we looked
                self._feed(lambda now: self.core.ring_view(view, now))
                merging: list[bool] = []
                self.channel.call_member(lambda now, m: merging.append(m.spaces.merging), quiet=True)
                if merging and not merging[0]:
                    self._feed(self.core.synced)
            self.channel.add_observer(self._observe)
            self.channel.call_member(lambda now, m: m.join_space(now, self.space))
            nursery.start_soon(self._send_loop)
            nursery.start_soon(self._timer_loop)
        except BaseException:
            await stack.aclose()
            raise
        self._exit = stack
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self._open and exc[0] is None:
                await self.stop()
        finally:
            self._open = False
            if self._exit is not None:
                await self._exit.aclose()

    async def stop(self) -> None:
        """Hand every held session to other members, then leave the space (bounded by
        :attr:`~.settings.SessionSettings.evacuation_timeout`)."""
        if not self._open:
            return
        with trio.move_on_after(self.settings.evacuation_timeout + 1):
            await self._call(lambda token, now: self.core.leave(token, now))
            await self._flush_sends()
        with contextlib.suppress(*_CHANNEL_GONE):
            self.channel.call_member(lambda now, m: m.leave_space(now, self.space), quiet=True)
        self._open = False

    # ------------------------------------------------------------------ the SessionStore protocol

    async def load(self, session_id: str) -> SessionData | None:
        """The session, held (and reserved) here from now on, or None if the cluster has no such session."""
        record = await self._call(lambda token, now: self.core.load(token, session_id, now))
        return None if record is None else _data(record)

    async def create(self) -> SessionData:
        """A new empty session held and reserved here."""
        return _data(await self._call(lambda token, now: self.core.create(token, now)))

    async def save(self, session: SessionData) -> None:
        """Store ``session.values``; returns once the K backups have them (``session.version`` grows)."""
        values = dict(session.values)
        record = await self._call(lambda token, now: self.core.save(token, session.id, values, now))
        session.version = record.version

    async def invalidate(self, session_id: str) -> None:
        """End the session everywhere (this also releases it)."""
        await self._call(lambda token, now: self.core.invalidate(token, session_id, now))

    async def release(self, session_id: str) -> None:
        """The request that reserved the session is over."""
        if self._open:
            self._feed(lambda now: self.core.release(session_id, now))

    # ------------------------------------------------------------------ Python API

    @contextlib.asynccontextmanager
    async def session(self, session_id: str | None = None, *, create: bool = True) -> AsyncIterator[SessionData]:
        """Hold one session for the block: loaded (or created, for None or an unknown id when
        ``create``), saved when the block ends if its values changed, released in any case.

        Raises :class:`KeyError` for an unknown id without ``create``; the store's
        errors (:class:`~.errors.SessionUnavailable`, ...) otherwise."""
        data = await self.load(session_id) if session_id is not None else None
        if data is None:
            if not create:
                raise KeyError(f"no session {session_id!r}")
            data = await self.create()
        before = copy.deepcopy(data.values)
        try:
            yield data
            if data.values != before or data.version == 0:
                await self.save(data)
        finally:
            with trio.CancelScope(shield=True):
                await self.release(data.id)

    def stats(self) -> dict[str, int]:
        """Counters of this node: held, copies, index, bytes, migrations_in/out, failovers, evacuated, ..."""
        return self.core.counters()

    # ------------------------------------------------------------------ plumbing

    async def _call(self, start: Callable[[int, float], None]) -> Any:
        if not self._open:
            raise ChannelClosed("the session store is closed")
        self._tokens += 1
        token = self._tokens
        slot: list[Any] = [trio.Event(), None]
        self._waiting[token] = slot
        self._feed(lambda now: start(token, now))
        try:
            await slot[0].wait()
        finally:
            self._waiting.pop(token, None)
        result = slot[1]
        if isinstance(result, (SessionError, TypeError, ValueError)):
            raise result
        return result

    def _feed(self, step: Callable[[float], None]) -> None:
        """Give the core one input now, then act on its outputs."""
        try:
            step(self._clock())
        except Exception:       # a bug in the core must not take the channel (the node's membership) down
            self.core.stats["internal_errors"] = self.core.stats.get("internal_errors", 0) + 1
            log.exception("session store %s: the core failed on an input", self.app)
        for action in self.core.take():
            if type(action) is Done:
                slot = self._waiting.get(action.token)
                if slot is not None:
                    slot[1] = action.result
                    slot[0].set()
            else:
                self._sends.append(action)
                self._send_wake.set()
        self._timer_wake.set()

    def _observe(self, item: Any) -> None:
        """Channel observer: ring views, SYNC ends, this space's views and multicasts (in order)."""
        if not self._open:
            return
        t = type(item)
        core = self.core
        if t is View:
            self._feed(lambda now: core.ring_view(item, now))
        elif t is Synced:
            self._feed(core.synced)
        elif t is SpaceView and item.space == self.space:
            self._feed(lambda now: core.space_view(item, now))
        elif t is SpaceMessage and item.space == self.space:
            self._feed(lambda now: core.space_message(item.message.sender, item.message.payload, now))
        elif t is StateRequest and item.space == self.space:
            # sessions move by their own frames, not by state transfer: a joiner starts with none
            self._sends.append(item)
            self._send_wake.set()

    async def _on_request(self, request: Any) -> bytes:
        if self._open:
            self._feed(lambda now: self.core.receive(request.requester, request.payload, now))
        return b""

    async def _send_loop(self) -> None:
        space = self.space
        while True:
            await self._send_wake.wait()
            self._send_wake = trio.Event()
            while self._sends:
                action = self._sends.popleft()
                if type(action) is StateRequest:
                    with contextlib.suppress(*_CHANNEL_GONE):
                        self.channel.provide_state(action, None)
                    continue
                if type(action) is Send:
                    dest, payload = action.dest, action.payload

                    def send(now: int, m: Any, d: int = dest, p: bytes = payload) -> None:
                        m.request(now, space, p, to=(d,), mode=NONE, timeout_us=_FRAME_TIMEOUT_US)
                else:
                    payload = action.payload

                    def send(now: int, m: Any, p: bytes = payload) -> None:
                        m.space_send(now, space, p)
                try:
                    try:
                        self.channel.call_member(send)
                    except QueueFull:
                        await self.channel.call_member_when_room(send)
                except MemberUnreachable:
                    continue                  # it left: the view change that follows redoes what matters
                except _CHANNEL_GONE:
                    return
            await trio.lowlevel.checkpoint()

    async def _flush_sends(self) -> None:
        with trio.move_on_after(1.0):
            while self._sends:
                await trio.sleep(0.01)

    async def _timer_loop(self) -> None:
        while True:
            deadline = self.core.next_deadline()
            wait = math.inf if deadline is None else max(0.0, deadline - self._clock())
            with trio.move_on_after(wait):
                await self._timer_wake.wait()
                self._timer_wake = trio.Event()
                continue
            self._feed(self.core.tick)


def _data(record: Session) -> SessionData:
    return SessionData(record.id, record.values(), record.version)
