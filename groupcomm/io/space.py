"""ServiceSpaces and request-reply on trio: the application side of :mod:`groupcomm.layers.spaces`.

A :class:`Space` is what :meth:`Channel.join_space
<groupcomm.io.channel.Channel.join_space>` returns::

    space = await ch.join_space("webapp-1")
    await space.send(b"...")                   # totally ordered, only to the space's members
    async for event in space.events(): ...      # Message | SpaceView(members, joined, left)
    replies = await space.request(b"...", mode=groupcomm.ALL, timeout=2.0)
    await space.leave()

State transfer: ``space.state_provider(fn)`` registers ``fn() -> bytes``, called
at the exact point of the total order where a joiner's join is delivered
(from this member's :meth:`Space.events`, so everything before that point has
been handed to the application, and nothing after); ``space.state_receiver(fn)``
registers ``fn(state: bytes | None)``, called on the joiner before
:meth:`Space.events` yields anything that came after the snapshot (and again
after a merge, when this member's side was not primary: replace the local
state).  A member that never iterates :meth:`Space.events` is asked for its
snapshot soon after the join is delivered instead, in a task of the channel
(unless messages before the join still wait for it: then when its iteration
reaches the join).

User callbacks never run inside the channel's receive task (see
:func:`run_callback`): async ones run as tasks, plain functions in a worker
thread (``trio.to_thread``), so a slow one does not hold up the ring.  One
that raises is logged (logger ``groupcomm.spaces``) and counted
(``Channel.stats()["callback_failures"]``); a request handler's error also
goes back to the requester as an error reply.  A provider that fails does not
answer: after ``state_transfer_timeout`` the joiner asks another member.

A space's events share the channel's slow-consumer policy: past
``max_pending_events`` undelivered events or ``max_pending_bytes`` bytes of
payload in one space the member leaves the group, and :meth:`Space.events`
raises :class:`~groupcomm.errors.DeliveryOverflow` once it has handed out the
rest.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import trio

from groupcomm.errors import ChannelClosed, DeliveryOverflow, LocalProtocolError, MemberUnreachable, QueueFull
from groupcomm.events import Message
from groupcomm.layers.member import DirectDone, Member
from groupcomm.layers.rpc import ALL, NONE, ONE_WAY, Mode, Reply, RequestDone, no_handler, reply_failed, reply_with
from groupcomm.layers.spaces import SpaceMessage, SpaceRequest, SpaceView, StateInstalled, StateRequest



class ChannelSurface(Protocol):
    """What spaces and requests need of the channel that drives the Member
    (:class:`~groupcomm.io.channel.Channel` provides it)."""

    @property
    def address(self) -> int: ...
    @property
    def join_timeout(self) -> float: ...
    @property
    def max_pending_events(self) -> int: ...
    @property
    def max_pending_bytes(self) -> int: ...
    @property
    def overflowed(self) -> bool: ...
    @property
    def overflow_reason(self) -> str: ...
    def call_member(self, action: Callable[[int, Member], object], *, quiet: bool = False) -> None: ...
    async def call_member_when_room(self, action: Callable[[int, Member], object]) -> None: ...
    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: object) -> None: ...
    def leave_on_overflow(self, reason: str = ...) -> None: ...

__all__ = ["ChannelSurface", "Space", "Services", "Request", "Handler", "run_callback"]

logger = logging.getLogger("groupcomm.spaces")

Request = SpaceRequest
"""What a request handler receives: ``space``, ``requester``, ``req_id``, ``payload``."""
Handler = Callable[[Request], Awaitable[bytes]] | Callable[[Request], bytes]


async def run_callback(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a user callback off the event loop and return its result.

    An ``async def`` function is awaited in the calling task; a plain function
    runs in a worker thread (``trio.to_thread.run_sync``), so a slow one (a
    large state being serialised, a blocking call) does not stall the ring.  A
    plain function runs while the caller waits and must not call the channel
    (use an async callback for that).  An awaitable a plain function returns is
    awaited too.
    """
    if _is_async(fn):
        return await fn(*args)
    value = await trio.to_thread.run_sync(functools.partial(fn, *args))
    if inspect.isawaitable(value):
        value = await value
    return value


def _is_async(fn: Callable[..., Any]) -> bool:
    """An ``async def`` function (or partial of one), or an object with an ``async def __call__``."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


class Space:
    """A ServiceSpace this member has joined."""

    def __init__(self, services: Services, name: str) -> None:
        self._services = services
        self._channel = services.channel
        self.name = name
        self.view: SpaceView | None = None
        """The latest view of the space (members oldest first)."""
        self._send, self._recv = trio.open_memory_channel[Any](math.inf)
        self._joined = trio.Event()
        self._iterating = False
        self._pending = 0
        self._pending_bytes = 0
        self._pending_messages = 0
        self._provider: Callable[[], bytes | None] | None = None
        self._receiver: Callable[[bytes | None], None] | None = None
        # Callbacks of a member that does not iterate events(): run in order by one task.
        self._later: deque[Callable[[], Awaitable[None]]] = deque()
        self._later_done: trio.Event | None = None      # set when the task ran them all
        self.left = False

    @property
    def members(self) -> tuple[int, ...]:
        return self.view.members if self.view else ()

    async def send(self, payload: bytes, *, safe: bool = False) -> None:
        """Multicast ``payload`` to the members of this space, in the total order.

        Waits while the send queue is full; raises TypeError unless ``payload`` is
        bytes-like and PayloadTooLarge over FRAG's ``max_message`` (as ``Channel.send``).
        """
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
        self._check()
        payload = bytes(payload)
        await self._channel.call_member_when_room(lambda now, member: member.space_send(now, self.name, payload, safe))

    async def events(self) -> AsyncIterator[Message | SpaceView]:
        """Messages and space views, in the total order, until this member leaves the space.

        The state provider and receiver run from here (see :meth:`state_provider`):
        while one runs, this iterator hands out nothing later.
        """
        self._iterating = True
        if self._later_done is not None:          # callbacks started before anyone iterated come first
            await self._later_done.wait()
        async for item in self._recv:
            self._pending -= 1
            t = type(item)
            if t is Message:
                self._pending_bytes -= len(item.payload)
                self._pending_messages -= 1
                yield item
            elif t is StateRequest:
                await self._provide(item)
            elif t is StateInstalled:
                await self._install(item)
            else:
                yield item
        if self._channel.overflowed:
            raise DeliveryOverflow(
                f"space {self.name!r}: {self._channel.overflow_reason}; "
                "the member left the group so the others are not held up"
            )

    async def leave(self) -> None:
        """Leave the space; returns once the leave is delivered (this member's last view)."""
        self._check()
        self._channel.call_member(lambda now, member: member.leave_space(now, self.name))
        with trio.move_on_after(self._channel.join_timeout):
            while not self.left:
                await self._services.changed()

    def on_request(self, handler: Handler) -> None:
        """``async def handler(request) -> bytes`` answers requests to this space, each in a task
        of its own (a plain function runs in a worker thread, see :func:`run_callback`).  If it
        raises, the requester gets an error reply and the failure is counted."""
        self._services.handlers[self.name] = handler

    def state_provider(self, fn: Callable[[], bytes | None] | Callable[[], Awaitable[bytes | None]]) -> None:
        """``fn() -> bytes`` returns this member's state for a joiner (see :func:`run_callback`).

        It is called from :meth:`events` when the iteration reaches the joiner's join: the
        application has handled exactly the events before it, and :meth:`events` hands out
        nothing later until ``fn`` returned.  It must read the state the application builds from
        :meth:`events`, and nothing else may change that state meanwhile (a plain ``fn`` runs in
        a worker thread while other tasks go on).  A member that does not iterate :meth:`events`
        (with none of its messages waiting) is asked soon after the join is delivered, in a task,
        so its snapshot may be later than the join; one that has not started iterating while
        messages before the join wait for it is asked when its iteration reaches the join.  If ``fn`` raises, nothing is sent: the failure is logged and counted, and the
        joiner asks another member after ``state_transfer_timeout``.
        """
        self._provider = fn

    def state_receiver(self, fn: Callable[[bytes | None], None] | Callable[[bytes | None], Awaitable[None]]) -> None:
        """``fn(state)`` replaces this member's state (``None``: nobody had any), from :meth:`events`
        before anything later is handed out.  If it raises, the failure is logged and counted and
        the space goes on: what state the application keeps then is its own affair."""
        self._receiver = fn

    async def request(self, payload: bytes, *, to: int | list[int] | tuple[int, ...] | None = None,
                      mode: Mode = ALL, timeout: float = 2.0) -> dict[int, Reply]:
        """Ask the space's members (``to=None``, through the ring) or ``to`` (point to point)."""
        self._check()
        return await self._services.request(self.name, payload, to=to, mode=mode, timeout=timeout)

    # -- the driver's side: Services feeds the space here, in the order the Member hands
    # -- outputs out; applications never call these ------------------------------------------

    def deliver(self, item: Message | SpaceView | StateRequest | StateInstalled) -> None:
        """Driver side: one output of the Member for this space, in order."""
        t = type(item)
        if t is SpaceView:
            self._view(item, self._channel.address)
        elif t is StateRequest:
            self._state_request(item)
        elif t is StateInstalled:
            self._state_installed(item)
        else:
            self._put(item)

    async def wait_joined(self) -> None:
        """Driver side: until the view in which this member joined the space is delivered."""
        await self._joined.wait()

    def shut(self) -> None:
        """Driver side: the channel closed: end :meth:`events`, without waiting for callbacks still queued."""
        self._send.close()
        if self._later_done is not None:
            self._later_done.set()

    def _put(self, item: Any) -> None:
        """Queue an event for :meth:`events`; past ``max_pending_events`` or ``max_pending_bytes``
        the channel's overflow policy applies (a snapshot to install does not count: it is the state)."""
        self._pending += 1
        if type(item) is Message:
            self._pending_bytes += len(item.payload)
            self._pending_messages += 1
        self._send.send_nowait(item)
        channel = self._channel
        if self._pending > channel.max_pending_events:
            channel.leave_on_overflow(f"more than {channel.max_pending_events} undelivered events in space "
                                      f"{self.name!r} (max_pending_events)")
        elif self._pending_bytes > channel.max_pending_bytes:
            channel.leave_on_overflow(f"more than {channel.max_pending_bytes} bytes of undelivered messages in "
                                      f"space {self.name!r} (max_pending_bytes)")

    def _view(self, view: SpaceView, me: int) -> None:
        if me in view.joined:
            self._joined.set()
        self.view = view
        self._put(view)
        if me in view.left:
            self._close()

    def _close(self) -> None:
        self.left = True
        self._send.close()

    def _state_request(self, request: StateRequest) -> None:
        if self._iterating or (self._provider is not None and self._pending_messages):
            # Answered from events() at its place in the order: also when the application has
            # not started iterating yet but messages before the join wait for it (its state
            # lags the join: a snapshot now would miss them).
            self._put(request)
        else:
            self._run_later(functools.partial(self._provide, request))

    def _state_installed(self, installed: StateInstalled) -> None:
        if self._iterating or self._receiver is None:
            self._put(installed)
        else:
            self._run_later(functools.partial(self._install, installed))

    async def _provide(self, request: StateRequest) -> None:
        state = None
        if self._provider is not None:
            try:
                state = await run_callback(self._provider)
                if state is not None and not isinstance(state, (bytes, bytearray, memoryview)):
                    raise TypeError(f"state provider returned {type(state).__name__}, not bytes")
            except Exception as exc:
                # No answer: "None" would tell the joiner nobody had state.  Its
                # state-transfer timeout asks another member instead.
                self._services.callback_failed(f"state provider of space {self.name!r}", exc)
                return
        self._services.provide(request, state)

    async def _install(self, installed: StateInstalled) -> None:
        if self._receiver is None:
            return
        try:
            await run_callback(self._receiver, installed.state)
        except Exception as exc:
            self._services.callback_failed(f"state receiver of space {self.name!r}", exc)

    def _run_later(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` in a task of the channel, after the ones queued before it."""
        if self._services.closed:
            return
        self._later.append(callback)
        if self._later_done is None:
            self._later_done = trio.Event()
            self._channel.start_soon(self._run_queued)

    async def _run_queued(self) -> None:
        try:
            while self._later:
                await self._later.popleft()()
        finally:
            self._later.clear()
            done, self._later_done = self._later_done, None
            if done is not None:
                done.set()

    def _check(self) -> None:
        if self.left:
            raise LocalProtocolError(f"this member left space {self.name!r}")


class Services:
    """The application side of a Channel's spaces and requests: Space objects, handlers, waiting callers."""

    def __init__(self, channel: ChannelSurface) -> None:
        self.channel = channel
        self.spaces: dict[str, Space] = {}
        self.handlers: dict[str, Handler] = {}
        self.claimed: set[str] = set()
        """Spaces whose state transfers an observer of the channel answers (Channel.claim_space)."""
        self._waiting: dict[int, tuple[trio.Event, list]] = {}
        self._direct: dict[int, tuple[trio.Event, list]] = {}
        self.closed = False
        self.callback_failures = 0
        """User callbacks (handlers, state providers and receivers) that raised."""
        self._changed = trio.Event()

    async def join(self, name: str) -> Space:
        if name in self.spaces:
            raise LocalProtocolError(f"already in space {name!r}")
        space = Space(self, name)
        self.spaces[name] = space
        try:
            self.channel.call_member(lambda now, member: member.join_space(now, name))
        except BaseException:
            del self.spaces[name]
            raise
        with trio.fail_after(self.channel.join_timeout):
            await space.wait_joined()
        return space

    async def request(self, scope: str, payload: bytes, *, to, mode: Mode, timeout: float) -> dict[int, Reply]:
        if not isinstance(mode, Mode):
            raise TypeError(f"mode must be groupcomm.ALL, FIRST, MAJORITY or NONE, not {mode!r}")
        if not (isinstance(timeout, (int, float)) and timeout > 0 and math.isfinite(timeout)):
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
        targets = None if to is None else ((to,) if isinstance(to, int) else tuple(to))
        done = trio.Event()
        box: list = []
        channel = self.channel
        req_id = 0

        def start(now: int, member) -> None:
            nonlocal req_id
            req_id = member.request(now, scope, bytes(payload), to=targets, mode=mode, timeout_us=int(timeout * 1e6))
            self._waiting[req_id] = (done, box)

        if mode is NONE:                               # one-way: the result is empty at once
            await channel.call_member_when_room(
                lambda now, member: member.request(now, scope, bytes(payload), to=targets, mode=mode,
                                                   timeout_us=int(timeout * 1e6)))
            return {}
        try:
            channel.call_member(start)                   # done.wait() below is the checkpoint
        except QueueFull:
            await channel.call_member_when_room(start)
        try:
            with trio.move_on_after(timeout + 0.5):      # the layer's own deadline fires first
                await done.wait()
        finally:
            self._waiting.pop(req_id, None)
            if not box:
                channel.call_member(lambda now, member: member.cancel_request(req_id), quiet=True)
        if not box:
            if self.closed:
                raise ChannelClosed("the channel closed before the request completed")
            return {m: Reply(False, None, "no answer before the timeout", "timeout") for m in targets or ()}
        return box[0]

    async def send_to(self, dest: int, payload: bytes) -> None:
        done, box = trio.Event(), []

        def start(now: int, member) -> None:
            self._direct[member.send_to(now, dest, payload)] = (done, box)

        await self.channel.call_member_when_room(start)
        await done.wait()
        if not box:
            raise ChannelClosed("channel closed before the message was acknowledged")
        if box[0] is not None:
            raise MemberUnreachable(f"send_to member {dest}: {box[0]}")

    def provide(self, request: StateRequest, state: bytes | None) -> None:
        """Hand a snapshot (or None) to the Member for the joiner ``request`` names."""
        self.channel.call_member(lambda now, member: member.provide_state(now, request, state), quiet=True)

    async def changed(self) -> None:
        """Wait until a space view changes."""
        await self._changed.wait()

    def callback_failed(self, what: str, exc: Exception, *, answered: bool = False) -> None:
        """Count and log a user callback that raised (``answered``: the requester was told, so
        only at debug level)."""
        self.callback_failures += 1
        level = logging.DEBUG if answered else logging.ERROR
        logger.log(level, "%s raised %s: %s", what, type(exc).__name__, exc, exc_info=exc)

    # -- the Member's space and request outputs (see groupcomm.layers.router) ----------------

    def routes(self) -> dict[type, Callable[[Any], None]]:
        """Handlers for the Member outputs this object acts on, for a :class:`~groupcomm.layers.router.Router`."""
        return {
            SpaceView: self._space_view,
            SpaceMessage: self._space_message,
            SpaceRequest: self._request,
            StateRequest: self._state_request,
            StateInstalled: self._state_installed,
            DirectDone: self._direct_done,
            RequestDone: self._request_done,
        }

    def _space_view(self, view: SpaceView) -> None:
        space = self.spaces.get(view.space)
        if self.closed or space is None:
            return
        space.deliver(view)
        if space.left:
            del self.spaces[view.space]
        self._changed.set()
        self._changed = trio.Event()

    def _space_message(self, item: SpaceMessage) -> None:
        space = self.spaces.get(item.space)
        if space is not None and not self.closed:
            space.deliver(item.message)

    def _request(self, request: SpaceRequest) -> None:
        if not self.closed:
            self.channel.start_soon(self._serve, request)

    def _state_request(self, request: StateRequest) -> None:
        if self.closed:
            return
        space = self.spaces.get(request.space)
        if space is None:
            if request.space not in self.claimed:
                self.provide(request, None)
        else:
            space.deliver(request)

    def _state_installed(self, installed: StateInstalled) -> None:
        space = self.spaces.get(installed.space)
        if space is not None and not self.closed:
            space.deliver(installed)

    def _direct_done(self, done: DirectDone) -> None:
        waiting = self._direct.pop(done.token, None)
        if waiting is not None and not self.closed:
            waiting[1].append(done.error)
            waiting[0].set()

    def _request_done(self, done: RequestDone) -> None:
        waiting = self._waiting.get(done.req_id)
        if waiting is not None and not self.closed:
            waiting[1].append(done.replies)
            waiting[0].set()

    def close(self) -> None:
        self.closed = True
        for space in self.spaces.values():
            space.shut()
        for done, _ in [*self._waiting.values(), *self._direct.values()]:
            done.set()
        self._changed.set()

    async def _serve(self, request: Request) -> None:
        handler = self.handlers.get(request.space)
        if request.req_id == ONE_WAY:                   # mode NONE: the handler runs, nobody waits for a reply
            await self._run_one_way(handler, request)
            return
        if handler is None:
            reply = no_handler(request.space)
        else:
            try:
                reply = reply_with(await run_callback(handler, request))
            except Exception as exc:                     # travels back: type and message
                scope = f"space {request.space!r}" if request.space else "the channel"
                self.callback_failed(f"request handler of {scope}", exc, answered=True)
                reply = reply_failed(exc)
        self.channel.call_member(lambda now, member: member.reply(now, request, reply), quiet=True)

    async def _run_one_way(self, handler: Handler | None, request: Request) -> None:
        if handler is None:
            return
        try:
            await run_callback(handler, request)
        except Exception as exc:
            scope = f"space {request.space!r}" if request.space else "the channel"
            self.callback_failed(f"request handler of {scope} (one-way request)", exc)
