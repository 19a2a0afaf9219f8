"""The cluster view of processes, sans-IO: the wire schema and the cluster-wide table.

Every supervisor attached to a group is a member of the supervisor space
(``[cluster] space`` of the node file, ``groupcomm.supervisor`` by default).
It multicasts a :class:`TableMessage` there whenever its table changes (at
most every ``publish_interval``, coalesced) and again after every view of the
space, so joiners and the sides of a merge learn each other's tables.  Each
member keeps a :class:`ClusterTable`: the last table of every member of the
space's current view.

Requests (answered by each supervisor in the space, and on the channel scope
for clients outside it such as ``groupcomm ps``) carry a :class:`TableRequest`
or a :class:`CommandRequest`; the answers are :class:`TableReply` and
:class:`CommandReply`.

Everything a peer sends is decoded by :func:`decode` only: msgpack arrays
whose first item is the message kind, with every string, list and integer
bounded.  Anything else raises :class:`MalformedMessage`, which the receiver
counts and drops.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

from groupcomm.services.supervisor.local import ProcessRow

__all__ = [
    "MAX_MESSAGE",
    "MAX_ROWS",
    "ClusterTable",
    "CommandReply",
    "CommandRequest",
    "MalformedMessage",
    "Row",
    "TableMessage",
    "TableReply",
    "TableRequest",
    "Verb",
    "decode",
    "encode",
    "row_of",
]

MAX_MESSAGE = 1 << 20
"""Bytes of one encoded message; longer ones are malformed without being parsed."""
MAX_ROWS = 4096
"""Processes in one node's table."""
MAX_NAME = 255
"""Characters of a node or process name (and of a state or role)."""
MAX_DETAIL = 2048
"""Characters of a row's ``detail`` or of an error."""

Name = Annotated[str, Meta(max_length=MAX_NAME)]
Text = Annotated[str, Meta(max_length=MAX_DETAIL)]
Count = Annotated[int, Meta(ge=0, le=(1 << 63) - 1)]
Micros = Annotated[int, Meta(ge=0, le=(1 << 63) - 1)]
Pid = Annotated[int, Meta(gt=0, lt=1 << 31)]
Member = Annotated[int, Meta(ge=0, lt=1 << 32)]
Verb = Literal["start", "stop", "restart"]


class _Message(Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """Base of every supervisor message: a msgpack array whose first item is the kind (the tag)."""


class Row(Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """One process as the cluster sees it (a subset of :class:`~.local.ProcessRow`)."""

    name: Name
    state: Name
    pid: Pid | None
    restarts: Count
    since: Micros
    """When it entered ``state``: microseconds since the epoch, on the publishing node's clock."""
    role: Name
    detail: Text
    generation: Count


Rows = Annotated[tuple[Row, ...], Meta(max_length=MAX_ROWS)]


class TableMessage(_Message, tag="table"):
    """Space message: ``node``'s table (``member`` is its channel address)."""

    node: Name
    member: Member
    rows: Rows


class TableRequest(_Message, tag="ask"):
    """Request: every supervisor answers with its table."""


class TableReply(_Message, tag="tabled"):
    """Answer to :class:`TableRequest`."""

    node: Name
    member: Member
    rows: Rows


class CommandRequest(_Message, tag="cmd"):
    """Request: the supervisor of ``node`` starts, stops or restarts ``process``; the others
    answer ``mine=False`` without acting."""

    node: Name
    verb: Verb
    process: Name


class CommandReply(_Message, tag="done"):
    """Answer to :class:`CommandRequest`.  ``mine``: this supervisor is ``node``'s; then ``ok``
    says whether the command was accepted (``error`` why not; ``unknown``: no such process
    there) and ``row`` is the process's row after it."""

    node: Name
    mine: bool
    ok: bool
    error: Text = ""
    unknown: bool = False
    row: Row | None = None


Message = TableMessage | TableRequest | TableReply | CommandRequest | CommandReply

_decoder = msgspec.msgpack.Decoder(Message)
_encoder = msgspec.msgpack.Encoder()


class MalformedMessage(ValueError):
    """Bytes that are not one valid supervisor message; the receiver counts and drops them."""


def encode(message: Message) -> bytes:
    """The bytes of ``message``."""
    return _encoder.encode(message)


def decode(data: bytes) -> Message:
    """The one message in ``data``; raises :class:`MalformedMessage` for anything else."""
    if len(data) > MAX_MESSAGE:
        raise MalformedMessage(f"{len(data)} bytes, more than {MAX_MESSAGE}")
    try:
        return _decoder.decode(data)
    except msgspec.MsgspecError as exc:
        raise MalformedMessage(str(exc)) from None


def row_of(row: ProcessRow) -> Row:
    """The wire row of a local table row (texts cut to their bounds)."""
    return Row(name=row.name[:MAX_NAME], state=row.state, pid=row.pid, restarts=row.restarts,
               since=max(0, row.since), role=row.role[:MAX_NAME], detail=row.detail[:MAX_DETAIL],
               generation=row.generation)


class ClusterTable:
    """The last table each member of the supervisor space published, as of the space's view.

    Feed it the space's events in order: :meth:`view` with each view's members,
    :meth:`message` with each message's sender and bytes.  Tables of members
    that left the view are dropped; a table from a sender outside the view, or
    whose ``member`` is not its sender, is dropped and counted like a
    malformed one (``malformed``).
    """

    def __init__(self) -> None:
        self._tables: dict[int, TableMessage] = {}
        self._members: frozenset[int] = frozenset()
        self.malformed = 0
        """Messages dropped: undecodable, the wrong kind, or not matching their sender."""

    def view(self, members: Iterable[int]) -> None:
        """A new view of the space: forget the tables of members no longer in it."""
        self._members = frozenset(members)
        for member in [m for m in self._tables if m not in self._members]:
            del self._tables[member]

    def message(self, sender: int, data: bytes) -> bool:
        """A message of the space from ``sender``; returns whether it was a table taken in."""
        try:
            message = decode(data)
        except MalformedMessage:
            self.malformed += 1
            return False
        if type(message) is not TableMessage or message.member != sender or sender not in self._members:
            self.malformed += 1
            return False
        self._tables[sender] = message
        return True

    def tables(self) -> dict[str, tuple[Row, ...]]:
        """``{node: rows}``, nodes sorted by name (two members claiming one name: the higher
        address's table wins; :meth:`members` shows both)."""
        out: dict[str, tuple[Row, ...]] = {}
        for member in sorted(self._tables):
            table = self._tables[member]
            out[table.node] = table.rows
        return dict(sorted(out.items()))

    def members(self) -> dict[int, str]:
        """``{member address: node name}`` of the tables held."""
        return {member: table.node for member, table in sorted(self._tables.items())}
