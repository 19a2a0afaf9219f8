"""Request-reply bookkeeping, sans-IO: who must answer, who did, when to stop.

A request goes to every member of a space (multicast through the ring, so it
takes its place in the total order and reaches exactly the members of the
space at that point) or to chosen members (over reliable unicast).  Replies
come back over unicast.  :class:`RpcTracker` holds the requester's side: it
fixes the expected repliers, collects replies, completes the slot of a
member that leaves as ``"left"`` at once, and completes everything still open
as ``"timeout"`` at the deadline.  It is driven by integer-microsecond time
like every sans-IO layer here.

Response modes:

``ALL``
    every expected member answered or left.
``FIRST``
    the first answer (ok or error); members that left do not count.
``MAJORITY``
    answers from a majority of the expected members.
``NONE``
    do not wait: the result is empty at once.  Such a request is one-way: it
    carries :data:`ONE_WAY` as its id (see :meth:`RpcTracker.new_id`), and a
    member that receives it runs its handler but sends no reply.

A result maps each member whose slot is complete to its :class:`Reply`;
when a mode is satisfied early, members still pending are not in it, and at
the timeout every pending member is there as ``"timeout"``.
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from groupcomm.layers.histogram import Histogram

__all__ = [
    "Mode", "ALL", "FIRST", "MAJORITY", "NONE", "ONE_WAY", "Reply", "RequestDone", "RpcTracker",
    "no_handler", "reply_failed", "reply_with",
]


class Mode(enum.Enum):
    """How many replies a request waits for."""

    ALL = "all"
    FIRST = "first"
    MAJORITY = "majority"
    NONE = "none"


ALL, FIRST, MAJORITY, NONE = Mode.ALL, Mode.FIRST, Mode.MAJORITY, Mode.NONE

ONE_WAY = 0
"""The id of every ``NONE`` request: nobody waits for its replies, so none is sent."""


class Reply(NamedTuple):
    """One member's answer: ``status`` is ``"ok"``, ``"error"``, ``"left"`` or ``"timeout"``."""

    ok: bool
    value: bytes | None
    error: str | None
    status: str


LEFT = Reply(False, None, "the member left before answering", "left")
TIMEOUT = Reply(False, None, "no answer before the timeout", "timeout")


def no_handler(scope: str) -> Reply:
    """The reply of a member that has no handler for ``scope`` (a space name, "" = the channel)."""
    return Reply(False, None, f"LookupError: no request handler for space {scope!r}", "error")


def reply_with(value: object) -> Reply:
    """The reply carrying a handler's return value; raises TypeError unless it is bytes-like."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"request handler returned {type(value).__name__}, not bytes")
    return Reply(True, bytes(value), None, "ok")


def reply_failed(exc: Exception) -> Reply:
    """The reply for a handler that raised: the requester gets the type and the message."""
    return Reply(False, None, f"{type(exc).__name__}: {exc}", "error")


class RequestDone(NamedTuple):
    """Request ``req_id`` is complete with these replies."""

    req_id: int
    replies: dict[int, Reply]


@dataclass(slots=True)
class _Pending:
    mode: Mode
    deadline: int
    scope: str                                    # the space ("" = the channel) whose leavers fail slots
    targets: tuple[int, ...] | None              # None until our own multicast is delivered
    replies: dict[int, Reply] = field(default_factory=dict)
    early: dict[int, Reply] = field(default_factory=dict)   # answers that beat our own delivery
    started: int = 0


class RpcTracker:
    """The requester's side of every request this member has in flight."""

    def __init__(self) -> None:
        self._pending: dict[int, _Pending] = {}
        self._deadlines: list[tuple[int, int]] = []      # heap of (deadline, req_id); finished ones linger
        self._out: list[RequestDone] = []
        self._out_started: list[int] = []           # the start time of each of _out
        self._next_id = 0
        self.latency = Histogram()
        """Seconds from each request's start to its completion (timeouts and ``NONE`` included)."""

    def new_id(self, mode: Mode | None = None) -> int:
        """The id of a new request: :data:`ONE_WAY` for ``mode`` NONE, else one not used before."""
        if mode is NONE:
            return ONE_WAY
        self._next_id += 1
        return self._next_id

    def start(self, now: int, req_id: int, mode: Mode, timeout_us: int, scope: str,
              targets: Iterable[int] | None) -> None:
        """Track ``req_id``; ``targets=None`` means "the members that receive our multicast".

        A ``NONE`` request completes at once (empty) and is not tracked."""
        if mode is NONE:
            self._out.append(RequestDone(req_id, {}))
            self._out_started.append(now)
            return
        deadline = now + timeout_us
        pending = _Pending(mode, deadline, scope, None if targets is None else tuple(targets), started=now)
        self._pending[req_id] = pending
        heapq.heappush(self._deadlines, (deadline, req_id))
        self._check(req_id)

    def fix_targets(self, req_id: int, members: Iterable[int]) -> None:
        """Our multicast request was delivered; ``members`` received it."""
        pending = self._pending.get(req_id)
        if pending is None or pending.targets is not None:
            return
        pending.targets = tuple(members)
        for member, reply in pending.early.items():
            if member in pending.targets:
                pending.replies[member] = reply
        pending.early.clear()
        self._check(req_id)

    def reply(self, req_id: int, member: int, reply: Reply) -> None:
        pending = self._pending.get(req_id)
        if pending is None:
            return                                 # late, cancelled or forged: nobody waits
        if pending.targets is None:
            pending.early[member] = reply
            return
        if member in pending.targets and member not in pending.replies:
            pending.replies[member] = reply
            self._check(req_id)

    def left(self, scope: str | None, members: Iterable[int]) -> None:
        """``members`` left ``scope`` (``None``: left the cluster, so every scope)."""
        gone = set(members)
        for req_id, pending in list(self._pending.items()):
            if scope is not None and pending.scope != scope:
                continue
            if pending.targets is None:
                continue
            for member in pending.targets:
                if member in gone and member not in pending.replies:
                    pending.replies[member] = LEFT
            self._check(req_id)

    def cancel(self, req_id: int) -> None:
        self._pending.pop(req_id, None)

    def tick(self, now: int) -> None:
        deadlines, pending_of = self._deadlines, self._pending
        while deadlines and deadlines[0][0] <= now:
            deadline, req_id = heapq.heappop(deadlines)
            pending = pending_of.get(req_id)
            if pending is None or pending.deadline != deadline:
                continue                                   # finished (or cancelled) before its deadline
            for member in pending.targets or ():
                pending.replies.setdefault(member, TIMEOUT)
            self._complete(req_id)

    def next_deadline(self) -> int | None:
        deadlines, pending_of = self._deadlines, self._pending
        while deadlines:
            deadline, req_id = deadlines[0]
            pending = pending_of.get(req_id)
            if pending is not None and pending.deadline == deadline:
                return deadline
            heapq.heappop(deadlines)                       # finished: drop it now
        return None

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def take(self, now: int | None = None) -> list[RequestDone]:
        """The requests completed since the last call; ``now`` (microseconds) times them into :attr:`latency`."""
        out, self._out = self._out, []
        started, self._out_started = self._out_started, []
        if now is not None:
            for t in started:
                self.latency.observe((now - t) / 1e6)
        return out

    def _check(self, req_id: int) -> None:
        pending = self._pending[req_id]
        if pending.targets is None:
            return
        n = len(pending.targets)
        if len(pending.replies) >= n:
            self._complete(req_id)
            return
        mode = pending.mode
        if mode is ALL:
            return
        answered = sum(1 for r in pending.replies.values() if r.status in ("ok", "error"))
        if (mode is FIRST and answered >= 1) or (mode is MAJORITY and answered >= n // 2 + 1):
            self._complete(req_id)

    def _complete(self, req_id: int) -> None:
        pending = self._pending.pop(req_id)
        self._out.append(RequestDone(req_id, pending.replies))      # the slot is gone: no copy needed
        self._out_started.append(pending.started)
