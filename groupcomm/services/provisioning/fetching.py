"""Pulling bundle files between members' stores over a channel or space (trio).

The trio side of :mod:`.transfer`:

* :func:`serve_blobs` -- the request handler that answers other members'
  :class:`~.transfer.Have` and :class:`~.transfer.ChunkRequest` from a
  :class:`~.store.Store` (file reads in worker threads, at most
  ``concurrency`` at once).  Register it where the pullers ask:
  ``space.on_request(serve_blobs(store))`` (or ``channel.on_request``).
* :class:`ChannelPuller` -- ``await puller.pull(digest, size, holders)``:
  asks ``holders`` (member ids) :class:`~.transfer.Have` over
  ``requester.request(payload, to=member)``, pulls the chunks windowed from
  the members that have the blob, and stores it through
  ``store.open_writer`` (verified by SHA-256 at commit).  Members that do not
  answer in time, refuse or send wrong bytes are dropped; it raises
  :class:`PullFailed` (the reason names every member and what went wrong)
  when nobody could serve it.  ``on_progress(digest, done, total)`` is called
  as bytes are written.

``requester`` is anything with ``async request(payload, *, to, mode, timeout)``:
a :class:`~groupcomm.io.space.Space` or a :class:`~groupcomm.io.channel.Channel`;
the members answering must have :func:`serve_blobs` registered on the same
space (or channel).  The :class:`~.transfer.Puller` and the writer run in a
worker thread (writes, hashing and the fsync at commit stay off the trio
thread), one call at a time.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import trio

from groupcomm.errors import GroupcommError
from groupcomm.layers.rpc import ALL
from groupcomm.services.provisioning.store import BlobWriter, Store
from groupcomm.services.provisioning.transfer import (
    CHUNK,
    Ask,
    Puller,
    Server,
    StoreReader,
)

__all__ = ["BlobPuller", "ChannelPuller", "Progress", "PullFailed", "Requester", "drive_pull", "serve_blobs"]

Progress = Callable[[str, int, int], Any]
"""``on_progress(digest, bytes_done, bytes_total)``."""


class PullFailed(GroupcommError):
    """No member could serve the blob (the message says why, member by member)."""


class Requester(Protocol):
    """What a :class:`ChannelPuller` sends its requests through (a Space or a Channel)."""

    async def request(self, payload: bytes, *, to: Any = None, mode: Any = ALL,
                      timeout: float = 2.0) -> dict[int, Any]: ...


class BlobPuller(Protocol):
    """What an :class:`~.executor.Executor` fetches blobs with."""

    async def pull(self, digest: str, size: int, holders: list[int]) -> None:
        """Get blob ``digest`` of ``size`` bytes into the store from ``holders``; PullFailed if not."""


def serve_blobs(store: Store, *, max_chunk: int = CHUNK,
                concurrency: int = 4) -> Callable[[Any], Awaitable[bytes]]:
    """An ``on_request`` handler answering transfer requests from ``store``.

    A malformed request raises :class:`~.transfer.MalformedTransfer` (the
    requester gets an error reply)."""
    server = Server(StoreReader(store), max_chunk=max_chunk)
    limiter: list[trio.CapacityLimiter] = []

    async def handle(request: Any) -> bytes:
        if not limiter:
            limiter.append(trio.CapacityLimiter(concurrency))
        return await trio.to_thread.run_sync(server.answer, bytes(request.payload), limiter=limiter[0])

    handle.server = server  # type: ignore[attr-defined]  # its counters, for tests and stats
    return handle


def _now_us() -> int:
    return int(trio.current_time() * 1_000_000)


async def drive_pull(requester: Requester, puller: Puller, *, request_timeout: float,
                     on_progress: Progress | None = None) -> None:
    """Carry out ``puller``'s asks over ``requester`` until it is done or failed.

    Every :class:`~.transfer.Ask` is one point-to-point request; its outcome
    (the answer, or the error: left, timeout, error reply) is fed back; the
    puller's deadlines are ticked.  Puller calls run in a worker thread."""
    send, receive = trio.open_memory_channel[tuple[int, bytes | None, str | None]](math.inf)
    last = (-1, -1)

    async def ask(a: Ask) -> None:
        try:
            replies = await requester.request(a.payload, to=a.member, mode=ALL, timeout=request_timeout)
        except Exception as e:  # noqa: BLE001 -- the channel closed, a bad target: this member is dropped
            send.send_nowait((a.token, None, f"request failed: {type(e).__name__}: {e}"))
            return
        reply = replies.get(a.member)
        if reply is not None and reply.ok:
            send.send_nowait((a.token, reply.value, None))
        else:
            send.send_nowait((a.token, None, reply.error if reply is not None else "no reply"))

    async with trio.open_nursery() as nursery:
        while True:
            for a in puller.take():
                nursery.start_soon(ask, a)
            if on_progress is not None and puller.progress != last:
                last = puller.progress
                on_progress(puller.digest, *last)
            if puller.finished:
                break
            deadline = puller.next_deadline()
            outcome = None
            # no deadline: nothing in flight, which a running Puller never is; look again in a second
            with trio.move_on_at(deadline / 1e6 if deadline is not None else trio.current_time() + 1.0):
                outcome = await receive.receive()
            if outcome is not None:
                await trio.to_thread.run_sync(puller.answered, _now_us(), *outcome)
            else:
                await trio.to_thread.run_sync(puller.tick, _now_us())
        nursery.cancel_scope.cancel()


class ChannelPuller:
    """Pulls blobs into ``store`` from other members over ``requester`` (see the module docstring).

    ``chunk``: bytes per request; ``window``: chunks in flight or buffered at
    most; ``timeout``: seconds a member has to answer one request;
    ``retries``: new attempts after a verification failure."""

    def __init__(self, requester: Requester, store: Store, *, chunk: int = CHUNK, window: int = 4,
                 timeout: float = 10.0, retries: int = 2, on_progress: Progress | None = None) -> None:
        self.requester = requester
        self.store = store
        self.chunk = chunk
        self.window = window
        self.timeout = timeout
        self.retries = retries
        self.on_progress = on_progress

    async def pull(self, digest: str, size: int, holders: Sequence[int]) -> None:
        """Store blob ``digest`` (``size`` bytes) from ``holders``; :class:`PullFailed` if nobody could."""
        writers: list[BlobWriter] = []

        def open_writer() -> BlobWriter:
            writers.append(self.store.open_writer(digest, size))
            return writers[-1]

        puller = Puller(digest, size, holders, open_writer, now=_now_us(), chunk=self.chunk, window=self.window,
                        timeout_us=round(self.timeout * 1_000_000), retries=self.retries)
        try:
            await drive_pull(self.requester, puller, request_timeout=self.timeout, on_progress=self.on_progress)
        finally:
            for writer in writers:      # cancelled mid-pull: free the temporary file and the quota
                writer.abort()
        if puller.state != "done":
            raise PullFailed(puller.reason)
