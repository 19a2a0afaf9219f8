"""A blocking facade over :func:`groupcomm.open_channel`, for programs without trio.

::

    with groupcomm.blocking.connect(cluster="orders", name="node-1") as ch:
        ch.send(b"hello")
        for event in ch.events(timeout=5.0):
            print(event)

A background thread runs trio and the channel; calls cross over with
``trio.from_thread``.  Events stay in the channel's own queue until
:meth:`BlockingChannel.events` asks for them (one batch at a time), so the
channel's slow-consumer limits (``max_pending_events``, ``max_pending_bytes``)
apply to the blocking caller as they do to a trio one.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterator
from typing import Any

import trio

from groupcomm.errors import ChannelClosed
from groupcomm.events import Direct, Message, View
from groupcomm.io.channel import Channel, open_channel
from groupcomm.layers.spaces import Merge

__all__ = ["BlockingChannel", "connect"]


class BlockingChannel:
    """A channel served by a background trio thread. Create it with :func:`connect`."""

    def __init__(self, stack: str = "udp", **kwargs: Any) -> None:
        self._batch: deque = deque()                # taken from the channel, not yet handed out
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._channel: Channel | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=self._serve, args=(stack, kwargs), name="groupcomm", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _serve(self, stack: str, kwargs: dict) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            async with open_channel(stack, **kwargs) as ch:
                self._channel = ch
                self._ready.set()
                await self._stop.wait()

        try:
            trio.run(main)
        except BaseException as exc:
            self._error = _sole_error(exc)
        finally:
            self._ready.set()

    def _call(self, fn, *args, **kwargs):
        return self._call_async(lambda: fn(*args, **kwargs))

    def _call_async(self, fn, *args):
        if self._token is None or self._channel is None or not self._thread.is_alive():
            raise ChannelClosed("the blocking channel is closed")
        try:
            return trio.from_thread.run(fn, *args, trio_token=self._token)
        except trio.RunFinishedError:
            raise ChannelClosed("the blocking channel is closed") from None

    def send(self, payload: bytes, *, safe: bool = False) -> None:
        """Send in total order; blocks while the send queue is full."""
        self._call(self._require().send, payload, safe=safe)

    def events(self, timeout: float | None = None) -> Iterator[Message | View | Merge | Direct]:
        """The channel's events (as :meth:`Channel.events <groupcomm.Channel.events>`) as they come.

        Stops after ``timeout`` seconds without one, or at close; raises
        :class:`~groupcomm.errors.DeliveryOverflow` if the member left the group
        because this caller fell too far behind.
        """
        batch = self._batch
        while True:
            if not batch:
                try:
                    batch.extend(self._call_async(self._next_batch, timeout))
                except ChannelClosed:
                    return
                if not batch:
                    return                        # the timeout passed, or the channel closed
            yield batch.popleft()

    async def _next_batch(self, timeout: float | None) -> list:
        with trio.move_on_after(math.inf if timeout is None else timeout):
            return await self._require().receive_batch()
        return []

    @property
    def view(self) -> View | None:
        return self._require().view

    @property
    def address(self) -> int:
        return self._require().address

    def _require(self) -> Channel:
        if self._channel is None:
            raise ChannelClosed("the blocking channel is closed")
        return self._channel

    def close(self) -> None:
        """Leave the group and stop the background thread."""
        token, stop = self._token, self._stop
        if token is not None and stop is not None and self._thread.is_alive():
            try:
                trio.from_thread.run_sync(stop.set, trio_token=token)
            except trio.RunFinishedError:
                pass
        self._thread.join(timeout=10)

    def __enter__(self) -> BlockingChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sole_error(exc: BaseException) -> BaseException:
    """The one error inside trio's exception groups (cancellations aside), so that a
    blocking caller catches e.g. ConfigError for an unbindable address; else ``exc``."""
    found: list[BaseException] = []
    pending = [exc]
    while pending:
        e = pending.pop()
        if isinstance(e, BaseExceptionGroup):
            pending.extend(e.exceptions)
        elif not isinstance(e, trio.Cancelled):
            found.append(e)
    return found[0] if len(found) == 1 else exc


def connect(stack: str = "udp", **kwargs: Any) -> BlockingChannel:
    """Join a cluster from ordinary (non-trio) code; same arguments as :func:`groupcomm.open_channel`."""
    return BlockingChannel(stack, **kwargs)
