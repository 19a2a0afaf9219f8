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
snapshot at delivery time instead.

A space's events share the channel's slow-consumer policy: past
``max_pending_events`` undelivered events in one space the member leaves the
group, and :meth:`Space.events` raises
:class:`~groupcomm.errors.DeliveryOverflow` once it has handed out the rest.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from groupcomm.errors import ChannelClosed, DeliveryOverflow, LocalProtocolError, MemberUnreachable
from groupcomm.events import Message
from groupcomm.layers.member import DirectDone
from groupcomm.layers.rpc import ALL, Mode, Reply, RequestDone
from groupcomm.layers.spaces import SpaceMessage, SpaceRequest, SpaceView, StateInstalled, StateRequest

if TYPE_CHECKING:
    from groupcomm.io.channel import Channel

__all__ = ["Space", "Services", "Request", "Handler"]

Request = SpaceRequest
"""What a request handler receives: ``space``, ``requester``, ``req_id``, ``payload``."""
Handler = Callable[[Request], Awaitable[bytes]]


class Space:
    """A ServiceSpace this member has joined."""

    def __init__(self, services: Services, name: str) -> None:
        self._services = services
        self.name = name
        self.view: SpaceView | None = None
        """The latest view of the space (members oldest first)."""
        self._send, self._recv = trio.open_memory_channel[Any](math.inf)
        self._joined = trio.Event()
        self._iterating = False
        self._pending = 0
        self._provider: Callable[[], bytes | None] | None = None
        self._receiver: Callable[[bytes | None], None] | None = None
        self.left = False

    @property
    def members(self) -> tuple[int, ...]:
        return self.view.members if self.view else ()

    async def send(self, payload: bytes, *, safe: bool = False) -> None:
        """Multicast ``payload`` to the members of this space, in the total order."""
        self._check()
        await self._services.channel._send_layer(lambda now, member: member.space_send(now, self.name, payload, safe))

    async def events(self) -> AsyncIterator[Message | SpaceView]:
        """Messages and space views, in the total order, until this member leaves the space."""
        self._iterating = True
        async for item in self._recv:
            self._pending -= 1
            t = type(item)
            if t is StateRequest:
                self._services._provide(self, item)
            elif t is StateInstalled:
                if self._receiver is not None:
                    self._receiver(item.state)
            else:
                yield item
        if self._services.channel._overflow:
            raise DeliveryOverflow(
                f"space {self.name!r}: more than {self._services.channel._max_pending} undelivered events; "
                "the member left the group so the others are not held up"
            )

    def _put(self, item: Any) -> None:
        """Queue an event for :meth:`events`; past ``max_pending_events`` the channel's overflow policy applies."""
        self._pending += 1
        self._send.send_nowait(item)
        channel = self._services.channel
        if self._pending > channel._max_pending and not channel._overflow:
            channel._overflow = True
            channel._leave()

    async def leave(self) -> None:
        """Leave the space; returns once the leave is delivered (this member's last view)."""
        self._check()
        services = self._services
        services.channel._call_layer(lambda now, member: member.leave_space(now, self.name))
        with trio.move_on_after(services.channel._join_wait()):
            while not self.left:
                await services._changed.wait()

    def on_request(self, handler: Handler) -> None:
        """``async def handler(request) -> bytes`` answers requests to this space."""
        self._services.handlers[self.name] = handler

    def state_provider(self, fn: Callable[[], bytes | None]) -> None:
        self._provider = fn

    def state_receiver(self, fn: Callable[[bytes | None], None]) -> None:
        self._receiver = fn

    async def request(self, payload: bytes, *, to: int | list[int] | tuple[int, ...] | None = None,
                      mode: Mode = ALL, timeout: float = 2.0) -> dict[int, Reply]:
        """Ask the space's members (``to=None``, through the ring) or ``to`` (point to point)."""
        self._check()
        return await self._services.request(self.name, payload, to=to, mode=mode, timeout=timeout)

    def _check(self) -> None:
        if self.left:
            raise LocalProtocolError(f"this member left space {self.name!r}")


class Services:
    """Routes the Member's space and request outputs to Space objects and handlers (owned by a Channel)."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.spaces: dict[str, Space] = {}
        self.handlers: dict[str, Handler] = {}
        self._waiting: dict[int, tuple[trio.Event, list]] = {}
        self._direct: dict[int, tuple[trio.Event, list]] = {}
        self.closed = False
        self._changed = trio.Event()

    async def join(self, name: str) -> Space:
        if name in self.spaces:
            raise LocalProtocolError(f"already in space {name!r}")
        space = Space(self, name)
        self.spaces[name] = space
        try:
            self.channel._call_layer(lambda now, member: member.join_space(now, name))
        except BaseException:
            del self.spaces[name]
            raise
        with trio.fail_after(self.channel._join_wait()):
            await space._joined.wait()
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

        await channel._send_layer(start)
        try:
            with trio.move_on_after(timeout + 0.5):      # the layer's own deadline fires first
                await done.wait()
        finally:
            self._waiting.pop(req_id, None)
            if not box:
                channel._call_layer(lambda now, member: member.cancel_request(req_id), quiet=True)
        if not box:
            if self.closed:
                raise ChannelClosed("the channel closed before the request completed")
            return {m: Reply(False, None, "no answer before the timeout", "timeout") for m in targets or ()}
        return box[0]

    async def send_to(self, dest: int, payload: bytes) -> None:
        done, box = trio.Event(), []

        def start(now: int, member) -> None:
            self._direct[member.send_to(now, dest, payload)] = (done, box)

        await self.channel._send_layer(start)
        await done.wait()
        if not box:
            raise ChannelClosed("channel closed before the message was acknowledged")
        if box[0] is not None:
            raise MemberUnreachable(f"send_to member {dest}: {box[0]}")

    # -- outputs of the Member, in order --------------------------------------------------

    def output(self, item: Any) -> None:
        if self.closed:
            return                                  # the member left: nobody reads any more
        t = type(item)
        if t is SpaceView:
            space = self.spaces.get(item.space)
            if space is None:
                return
            me = self.channel.address
            if me in item.joined and not space._joined.is_set():
                space._joined.set()
            space.view = item
            space._put(item)
            if me in item.left:
                space.left = True
                space._send.close()
                del self.spaces[item.space]
            self._wake()
        elif t is SpaceMessage:
            space = self.spaces.get(item.space)
            if space is not None:
                space._put(item.message)
        elif t is SpaceRequest:
            self.channel._spawn(self._serve, item)
        elif t is StateRequest:
            space = self.spaces.get(item.space)
            if space is None or not space._iterating:
                self._provide(space, item)
            else:
                space._put(item)
        elif t is StateInstalled:
            space = self.spaces.get(item.space)
            if space is not None:
                if space._iterating or space._receiver is None:
                    space._put(item)
                else:
                    space._receiver(item.state)
        elif t is DirectDone:
            waiting = self._direct.pop(item.token, None)
            if waiting is not None:
                waiting[1].append(item.error)
                waiting[0].set()
        elif t is RequestDone:
            waiting = self._waiting.get(item.req_id)
            if waiting is not None:
                waiting[1].append(item.replies)
                waiting[0].set()

    def close(self) -> None:
        self.closed = True
        for space in self.spaces.values():
            space._send.close()
        for done, _ in [*self._waiting.values(), *self._direct.values()]:
            done.set()
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _provide(self, space: Space | None, request: StateRequest) -> None:
        state = None
        if space is not None and space._provider is not None:
            state = space._provider()
        self.channel._call_layer(lambda now, member: member.provide_state(now, request, state), quiet=True)

    async def _serve(self, request: Request) -> None:
        handler = self.handlers.get(request.space)
        if handler is None:
            reply = Reply(False, None, f"LookupError: no request handler for space {request.space!r}", "error")
        else:
            try:
                value = handler(request)
                if inspect.isawaitable(value):                # plain functions work too
                    value = await value
                if not isinstance(value, (bytes, bytearray, memoryview)):
                    raise TypeError(f"request handler returned {type(value).__name__}, not bytes")
                reply = Reply(True, bytes(value), None, "ok")
            except Exception as exc:                     # travels back: type and message
                reply = Reply(False, None, f"{type(exc).__name__}: {exc}", "error")
        try:
            self.channel._call_layer(lambda now, member: member.reply(now, request, reply))
        except ChannelClosed:
            pass
