"""A blocking facade over :func:`groupcomm.open_channel`, for programs without trio.

::

    with groupcomm.blocking.connect(cluster="orders", name="node-1") as ch:
        ch.send(b"hello")
        for event in ch.events(timeout=5.0):
            print(event)

A background thread runs trio and the channel; calls cross over with
``trio.from_thread``.  Events wait in an unbounded queue for the caller; the
channel's own ``max_pending_events`` policy still applies.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import trio

from groupcomm.errors import ChannelClosed
from groupcomm.events import Direct, Message, View
from groupcomm.io.channel import Channel, open_channel
from groupcomm.layers.spaces import Merge

__all__ = ["BlockingChannel", "connect"]

_END = object()


class BlockingChannel:
    """A channel served by a background trio thread. Create it with :func:`connect`."""

    def __init__(self, stack: str = "udp", **kwargs: Any) -> None:
        self._events: queue.Queue = queue.Queue()
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
                async with trio.open_nursery() as nursery:

                    async def pump() -> None:
                        try:
                            async for event in ch.events():
                                self._events.put(event)
                        except BaseException as exc:  # DeliveryOverflow reaches the caller
                            self._events.put(exc)
                            raise
                        finally:
                            self._events.put(_END)

                    nursery.start_soon(pump)
                    await self._stop.wait()
                    nursery.cancel_scope.cancel()

        try:
            trio.run(main)
        except BaseException as exc:
            self._error = _sole_error(exc)
        finally:
            self._ready.set()
            self._events.put(_END)

    def _call(self, fn, *args, **kwargs):
        if self._token is None or self._channel is None or not self._thread.is_alive():
            raise ChannelClosed("the blocking channel is closed")
        try:
            return trio.from_thread.run(lambda: fn(*args, **kwargs), trio_token=self._token)
        except trio.RunFinishedError:
            raise ChannelClosed("the blocking channel is closed") from None

    def send(self, payload: bytes, *, safe: bool = False) -> None:
        """Send in total order; blocks while the send queue is full."""
        self._call(self._require().send, payload, safe=safe)

    def events(self, timeout: float | None = None) -> Iterator[Message | View | Merge | Direct]:
        """The channel's events (as :meth:`Channel.events <groupcomm.Channel.events>`) as they come.

        Stops after ``timeout`` seconds without one, or at close.
        """
        while True:
            try:
                event = self._events.get(timeout=timeout)
            except queue.Empty:
                return
            if event is _END:
                self._events.put(_END)
                return
            if isinstance(event, BaseException):
                raise event
            yield event

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
