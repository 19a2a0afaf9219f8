"""A supervisor's part in its group (trio): publish its table, keep the cluster's, answer requests.

:class:`RemoteTable` is what :class:`~.runner.Supervisor` runs when it is given
a channel.  It joins the supervisor space, multicasts the node's table there
(coalesced, at most every ``publish_interval``, and again after every view of
the space), folds the space's messages into a :class:`~.table.ClusterTable`
and answers :class:`~.table.TableRequest` and :class:`~.table.CommandRequest`
in the space and on the channel scope (so ``groupcomm ps``, which does not
join the space, can ask).  The wire schema is in :mod:`.table`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from groupcomm.errors import (
    ChannelClosed,
    DeliveryOverflow,
    LocalProtocolError,
    NotOperational,
)
from groupcomm.layers.spaces import SpaceView
from groupcomm.services.supervisor.local import ProcessRow
from groupcomm.services.supervisor.table import (
    ClusterTable,
    CommandReply,
    CommandRequest,
    MalformedMessage,
    Row,
    TableMessage,
    TableReply,
    TableRequest,
    decode,
    encode,
    row_of,
)

__all__ = ["PUBLISH_INTERVAL", "RemoteTable"]

PUBLISH_INTERVAL = 0.1
"""Seconds between two publications of a node's table (changes in between are coalesced)."""

logger = logging.getLogger("groupcomm.supervisor")

_GROUP_ERRORS = (ChannelClosed, DeliveryOverflow, LocalProtocolError, NotOperational)


class RemoteTable:
    """The group side of one supervisor.

    ``rows()`` returns the node's current table; ``command(verb, process)``
    carries out a start/stop/restart (raising KeyError for an unknown process).
    """

    def __init__(self, channel: Any, space_name: str, *, node: str,
                 rows: Callable[[], tuple[ProcessRow, ...]], command: Callable[[str, str], None],
                 publish_interval: float = PUBLISH_INTERVAL) -> None:
        self.channel = channel
        self.space_name = space_name
        self.space: Any = None
        """The joined :class:`~groupcomm.io.space.Space` (after :meth:`start`)."""
        self.node = node
        self.cluster = ClusterTable()
        self.malformed_requests = 0
        """Requests that were not one valid supervisor request (answered with an error)."""
        self._rows = rows
        self._command = command
        self._interval = publish_interval
        self._dirty = trio.Event()
        self._changed = trio.Event()
        self._closed = False
        self._publishing = trio.CancelScope()
        self.failure: str | None = None
        """Why the group side stopped working (the channel closed or left the group), if it did;
        the local supervision goes on."""

    @property
    def malformed(self) -> int:
        """Space messages and requests dropped as malformed."""
        return self.cluster.malformed + self.malformed_requests

    async def start(self, nursery: trio.Nursery) -> None:
        """Join the space, register the request handlers and start publishing."""
        self.space = await self.channel.join_space(self.space_name)
        self.space.on_request(self._answer)
        self.channel.on_request(self._answer)
        nursery.start_soon(self._guarded, self._receive)
        nursery.start_soon(self._guarded, self._publish)
        self.table_changed()

    async def stop(self, timeout: float) -> None:
        """Stop answering and leave the space (bounded by ``timeout``)."""
        self._closed = True
        self._publishing.cancel()                 # nothing is sent after (or while) leaving
        if self.space is None or self.space.left:
            return
        with trio.move_on_after(timeout):
            with contextlib.suppress(LocalProtocolError, ChannelClosed, NotOperational):
                await self.space.leave()          # the channel may have closed under us

    def table_changed(self) -> None:
        """The node's table changed: publish it soon."""
        self._dirty.set()

    def cluster_table(self) -> dict[str, tuple[Row, ...]]:
        """``{node: rows}`` of every supervisor in the space's view (this node's rows are current)."""
        tables = self.cluster.tables()
        tables[self.node] = self._wire_rows()
        return dict(sorted(tables.items()))

    async def wait_changed(self) -> None:
        """Until the cluster table changes (a table received or a view)."""
        await self._changed.wait()

    # ------------------------------------------------------------------ tasks

    def _wire_rows(self) -> tuple[Row, ...]:
        return tuple(row_of(r) for r in self._rows())

    async def _guarded(self, task: Callable[[], Awaitable[None]]) -> None:
        """Run ``task``; the channel failing under it ends the group side, not the supervisor."""
        try:
            await task()
        except _GROUP_ERRORS as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            logger.error("supervisor of node %r: the group side stopped (%s); local supervision goes on",
                         self.node, self.failure)

    async def _publish(self) -> None:
        with self._publishing:
            while True:
                await self._dirty.wait()
                self._dirty = trio.Event()
                message = TableMessage(node=self.node, member=self.channel.address, rows=self._wire_rows())
                await self.space.send(encode(message))
                await trio.sleep(self._interval)

    async def _receive(self) -> None:
        async for event in self.space.events():
            if type(event) is SpaceView:                 # drop leavers' tables, tell joiners ours
                self.cluster.view(event.members)
                self.table_changed()
            else:
                self.cluster.message(event.sender, event.payload)
            self._changed.set()
            self._changed = trio.Event()

    async def _answer(self, request: Any) -> bytes:
        try:
            message = decode(request.payload)
        except MalformedMessage as exc:
            self.malformed_requests += 1
            raise ValueError(f"not a supervisor request: {exc}") from None
        if self._closed:
            raise RuntimeError(f"the supervisor of node {self.node!r} is stopping")
        if type(message) is TableRequest:
            return encode(TableReply(node=self.node, member=self.channel.address, rows=self._wire_rows()))
        if type(message) is CommandRequest:
            return encode(self._carry_out(message))
        self.malformed_requests += 1
        raise ValueError(f"not a supervisor request: {type(message).__name__}")

    def _carry_out(self, request: CommandRequest) -> CommandReply:
        if request.node != self.node:
            return CommandReply(node=self.node, mine=False, ok=False)
        try:
            self._command(request.verb, request.process)
        except KeyError:
            return CommandReply(node=self.node, mine=True, ok=False, unknown=True,
                                error=f"no process {request.process!r} on node {self.node!r}")
        except (ValueError, RuntimeError) as exc:
            return CommandReply(node=self.node, mine=True, ok=False, error=str(exc))
        row = next((r for r in self._wire_rows() if r.name == request.process), None)
        return CommandReply(node=self.node, mine=True, ok=True, row=row)
