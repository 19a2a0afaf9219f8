"""One node's part of a replicated session store, sans-IO: :class:`SessionCore`.

Both drivers run it -- the trio :class:`~.driver.ReplicatedSessionStore` and
the simulator's harness (:mod:`.sim`).  Feed it, in delivery order, the ring
views, the end of SYNC rounds, the views of the application's space, the
space's multicasts and the frames other members sent to this one; call its
operations (:meth:`~SessionCore.load`, :meth:`~SessionCore.create`,
:meth:`~SessionCore.save`, :meth:`~SessionCore.invalidate`,
:meth:`~SessionCore.release`, :meth:`~SessionCore.leave`) with a token of
yours; then :meth:`~SessionCore.take` its actions: :class:`Send` a frame to a
member, :class:`Announce` one to the space, and :class:`Done` (an operation's
result, by token).  Call :meth:`~SessionCore.tick` at
:meth:`~SessionCore.next_deadline`.

How it works (docs/sessions.rst has the user's view):

* **Holder.**  Exactly one member holds a session and serves its requests, one
  request at a time (a request *reserves* it until :meth:`release`).  Every
  change of holder gives the session a larger *holder epoch*.
* **Index.**  A session's bucket (:func:`~.buckets.bucket_of`) has an *owner*
  (:class:`~.buckets.BucketMap` over the space's members) that knows who holds
  each of the bucket's sessions.  After every view of the space each member
  reports what it keeps of each owner's buckets (:class:`~.wire.Holdings`); an
  owner rebuilds its index from the reports of every member of the view and
  answers each with a :class:`~.wire.Verdict` (the records that lost: an older
  second holder after a merge, copies of an older epoch).  A member serves a
  bucket's sessions only once the bucket's owner answered it in this view.
* **Migration.**  A request for a session held elsewhere asks the owner
  (:class:`~.wire.Acquire`); the owner serializes these per session (one move
  at a time), picks the next epoch and asks the holder -- or, when the holder
  is gone, the copy with the highest (epoch, version): that is fail-over -- to
  hand its record over (:class:`~.wire.Handoff`); the keeper waits until no
  request of its own uses it, then sends it (:class:`~.wire.Transfer`).  The
  new holder tells the owner (:class:`~.wire.Acquired`).  In a primary
  component an owner does not wait for a request to fail a session over: right
  after its rebuild it moves each session without a holder to its best copy,
  which then replicates it to K backups again.
* **Replication.**  A save is acknowledged once the session's K backups
  (:attr:`SessionSettings.backups`, chosen by the strategy) have the new
  version.  After a view change, a migration or new tags, the holder pushes
  copies to its new backups and then drops the copies no longer needed.
* **Views.**  Every frame carries the space view its sender was in; frames of
  a view this node has left are dropped, those of a view it has not installed
  yet are kept until it does.  Everything in flight at a view change is
  redone in the new view (acquires re-asked, copies re-pushed) or failed by
  its deadline (:attr:`SessionSettings.request_timeout`).
* **Partitions.**  Only a primary component serves sessions (see
  :attr:`SessionCore.serving`); after a merge nothing is served until the
  spaces' SYNC round ended and the owners rebuilt the index: of two holders
  the one with the larger (epoch, version) keeps the session.  Epochs start at
  ``ring_seq << 16`` in every new ring, so a holder made by a later primary
  component always wins.  The two sides of a partition may share a ring seq,
  so the rule that keeps epochs apart is that **no holder is made outside a
  primary component**: no create, no move, no fail-over there (owners ignore
  Acquire and Evacuate while not primary).
* **Tombstones.**  A session that ended (invalidated, expired) is remembered
  with its epoch for ``max_inactive + copy_grace``; members report these with
  their holdings, so a copy kept by a member that was away does not bring the
  session back.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from groupcomm.events import RingId, View
from groupcomm.layers.spaces import SpaceView
from groupcomm.services.sessions.buckets import BucketMap, bucket_of
from groupcomm.services.sessions.errors import (
    SessionError,
    SessionsFull,
    SessionUnavailable,
)
from groupcomm.services.sessions.ids import new_session_id
from groupcomm.services.sessions.record import (
    MalformedSession,
    Session,
    SessionTable,
    TableFull,
    decode_session,
    encode_session,
)
from groupcomm.services.sessions.settings import SessionSettings
from groupcomm.services.sessions.wire import (
    Acquire,
    Acquired,
    Drop,
    Evacuate,
    Forget,
    Forgotten,
    Frame,
    Handoff,
    Held,
    Hello,
    Holdings,
    MalformedFrame,
    Missing,
    NotFound,
    Register,
    Registered,
    Replicate,
    Replicated,
    Transfer,
    Verdict,
    ViewId,
    decode_frame,
    encode_frame,
)

__all__ = ["Announce", "CoreAction", "Done", "Send", "SessionCore"]

_EPOCH_SHIFT = 16
_MAX_EPOCH = 2**63 - 1
_PAST_VIEWS = 32


@dataclass(frozen=True)
class Send:
    """Send ``payload`` (a sessions frame) to member ``dest`` of the space."""

    dest: int
    payload: bytes


@dataclass(frozen=True)
class Announce:
    """Multicast ``payload`` (a sessions frame) in the space."""

    payload: bytes


@dataclass(frozen=True)
class Done:
    """The operation of ``token`` is over: ``result`` is its value or a :class:`SessionError`."""

    token: int
    result: Any


CoreAction = Send | Announce | Done


@dataclass(eq=False)
class _Op:
    kind: str                    # load, create, save, invalidate, leave
    token: int
    sid: str
    deadline: float
    done: bool = False
    waiting: set[int] = field(default_factory=set)     # invalidate: members yet to answer


@dataclass(eq=False)
class _Holding:
    """A session this node holds."""

    busy: int | None = None                              # the token of the request using it
    queue: deque = field(default_factory=deque)          # _Op (loads) and Handoff frames, in turn
    acked: set[int] = field(default_factory=set)         # backups that have the current (epoch, version)
    sent: set[int] = field(default_factory=set)          # backups sent the current record in this view
    stale: set[int] = field(default_factory=set)         # members with older copies, to drop
    save: _Op | None = None
    register: _Op | None = None
    evacuating: bool = False
    replicated_access: float = 0.0


@dataclass(eq=False)
class _Entry:
    """The owner's index entry of one session."""

    holder: int | None
    epoch: int
    version: int
    copies: dict[int, tuple[int, int]] = field(default_factory=dict)
    lock: tuple[int, int] | None = None                   # (requester, target) of the move under way
    queue: deque = field(default_factory=deque)           # requesters waiting for the lock


class SessionCore:
    """One member's sessions, copies and index part (see the module doc)."""

    def __init__(self, me: int, name: str, settings: SessionSettings | None = None,
                 tags: Mapping[str, str] | None = None, *,
                 new_id: Callable[[], str] = new_session_id) -> None:
        self.me = me
        self.new_id = new_id
        """Makes the id of each created session (a simulation passes a seeded one)."""
        self.name = name
        self.settings = settings or SessionSettings()
        self.my_tags = dict(tags or {})
        self.table = SessionTable(self.settings.limits)
        self.held: dict[str, _Holding] = {}
        self.index: dict[str, _Entry] = {}
        self.view_id: ViewId | None = None
        self.members: tuple[int, ...] = ()
        self.bucket_map: BucketMap | None = None
        self.ready: set[int] = set()
        self.tags: dict[int, dict[str, str]] = {me: self.my_tags}
        self.names: dict[int, str] = {me: name}
        self.primary = False
        self.merging = False
        self.ring_seq = 0
        self.leaving = False
        self.stats: dict[str, int] = dict.fromkeys(
            ("migrations_in", "migrations_out", "failovers", "evacuated", "created", "invalidated",
             "expired", "saves", "rebuilds", "malformed", "stale_frames"), 0)
        self._out: list[CoreAction] = []
        self._inbox: deque[tuple[int, Frame]] = deque()
        self._draining = False
        self._past: deque[ViewId] = deque(maxlen=_PAST_VIEWS)
        self._future: deque[tuple[int, Frame]] = deque()
        self._came_along: tuple[int, ...] | None = None
        self._ring_id: RingId | None = None
        self._ops: dict[int, _Op] = {}
        self._parked: list[_Op] = []
        self._acquiring: dict[str, list[_Op]] = {}
        self._leave_op: _Op | None = None
        self._handed: set[str] = set()           # handed off while stopping, not yet taken up by the new holder
        self._now = 0.0
        self._next_scan = 0.0
        # owner side, for the current view
        self._reports: dict[int, list[Held]] = {}
        self._buried_reports: dict[str, int] = {}
        self.tombstones: OrderedDict[str, tuple[int, float]] = OrderedDict()
        """Sessions forgotten here (invalidated or expired) -> (their epoch, until when it is kept): a copy
        of such a session kept by a member that was away when it ended must not bring it back."""
        self._reported: set[int] = set()
        self._owner_ready = False
        self._owner_backlog: list[tuple[int, Frame]] = []

    # ------------------------------------------------------------------ observation

    @property
    def serving(self) -> bool:
        """Whether requests may be served here now: a regular primary ring view, no SYNC round
        under way, in the space, not stopping (a bucket is served once its owner indexed it)."""
        return self.primary and not self.merging and self.view_id is not None and not self.leaving

    @property
    def indexed(self) -> bool:
        """:attr:`serving`, and every bucket's owner has indexed this member's holdings in this view."""
        return self.serving and len(self.ready) == self.settings.buckets

    def counters(self) -> dict[str, int]:
        """Counters and sizes for operators (``held``, ``copies``, ``index`` and the event counters)."""
        return {**self.stats, "held": len(self.held), "copies": len(self.table) - len(self.held),
                "index": len(self.index), "bytes": self.table.used_bytes}

    def pending_work(self) -> bool:
        """Whether anything is under way: an operation, a move, a copy not yet acknowledged."""
        if any(not op.done for op in self._ops.values()) or self._acquiring or self._parked:
            return True
        if any(entry.lock is not None or entry.queue for entry in self.index.values()):
            return True
        for sid, holding in self.held.items():
            if holding.queue or holding.stale & set(self.members) or _live(holding.save) or \
                    _live(holding.register):
                return True
            if not set(self._backups(sid)) <= holding.acked:
                return True
        return False

    def take(self) -> list[CoreAction]:
        """The actions since the last call, in order."""
        out, self._out = self._out, []
        return out

    def next_deadline(self) -> float | None:
        """When :meth:`tick` must be called next (None: no timer)."""
        deadlines = [op.deadline for op in self._ops.values() if not op.done]
        if self.table:
            deadlines.append(self._next_scan)
        return min(deadlines) if deadlines else None

    # ------------------------------------------------------------------ inputs in delivery order

    def ring_view(self, view: View, now: float) -> None:
        """A ring view (transitional or regular)."""
        self._now = now
        if view.transitional:
            self._came_along = tuple(view.members)
            return
        # the spaces layer's rule: a regular view starts a SYNC round unless the transitional
        # view just before had the same members
        if self._came_along is None or self._came_along != tuple(view.members):
            self.merging = True
        self._came_along = None
        self.primary = bool(view.primary)
        self.ring_seq = view.ring_id.seq
        self._ring_id = view.ring_id
        if not self.primary:
            self._fail_all("this side of the partition is not primary")
        self._kick()
        self._drain()

    def synced(self, now: float) -> None:
        """The spaces' SYNC round after a merging ring view ended.

        It also starts a new round of the index (named after the ring): a member that
        was cut off and came back before it saw the others leave keeps its old space
        view (its members did not change, for it), while the others install a new one
        in which it joins -- the view ids differ, the round after the SYNC does not."""
        self._now = now
        self.merging = False
        if self.view_id is not None and self._ring_id is not None:
            self._new_round((self._ring_id.rep, self._ring_id.seq, -1), self.members, joined=True)
        self._kick()
        self._drain()

    def space_view(self, view: SpaceView, now: float) -> None:
        """A view of this application's space."""
        self._now = now
        if self.me not in view.members:
            self._stopped()
            return
        self._new_round(tuple(view.view_id), tuple(view.members), joined=bool(view.joined))

    def _new_round(self, round_id: ViewId, members: tuple[int, ...], *, joined: bool) -> None:
        """Start the index over for the members of a new view (every member starts the same round
        at the same point of the total order)."""
        if self.view_id is not None:
            self._past.append(self.view_id)
        self.view_id = round_id
        self.members = members
        self.bucket_map = BucketMap(self.members, self.settings.buckets)
        for gone in set(self.tags) - set(self.members):
            self.tags.pop(gone, None)
            self.names.pop(gone, None)
        self.tags[self.me] = self.my_tags
        self.ready = set()
        self._reports, self._reported = {}, set()
        self._buried_reports = {}
        self._owner_ready = False
        self._owner_backlog = []
        self.index = {}
        if joined:
            self._announce(Hello(self.view_id, self.name, self.my_tags))
        self._redo_in_flight()
        self._report_holdings()
        future, self._future = self._future, deque()
        for sender, frame in future:
            self._inbox.append((sender, frame))
        self._drain()

    def space_message(self, sender: int, payload: bytes, now: float) -> None:
        """A multicast in the space (a :class:`~.wire.Hello`)."""
        self._now = now
        frame = self._decode(payload)
        if type(frame) is Hello and sender in self.members:
            tags = dict(frame.tags)
            changed = self.tags.get(sender) != tags
            self.tags[sender], self.names[sender] = tags, frame.name
            if changed and sender != self.me:
                for sid in list(self.held):
                    self._replicate_missing(sid)
        self._drain()

    def receive(self, sender: int, payload: bytes, now: float) -> None:
        """A frame ``sender`` sent to this member (malformed ones are counted and dropped)."""
        self._now = now
        frame = self._decode(payload)
        if frame is None or type(frame) is Hello:
            return
        self._inbox.append((sender, frame))
        self._drain()

    def tick(self, now: float) -> None:
        """Fail operations past their deadline; expire sessions."""
        self._now = now
        for op in list(self._ops.values()):
            if not op.done and op.deadline <= now:
                if op.kind == "leave":
                    self._finish(op, None)
                else:
                    self._fail(op, SessionUnavailable(f"{op.kind} of a session timed out",
                                                      retry_after=self.settings.retry_after))
        if now >= self._next_scan:
            self._next_scan = now + 1.0
            self._expire(now)
        self._drain()

    # ------------------------------------------------------------------ operations

    def load(self, token: int, session_id: str, now: float) -> None:
        """Reserve the session for a request, here (it may migrate): Done(record or None)."""
        self._now = now
        op = self._new_op("load", token, session_id)
        self._try(op)

    def create(self, token: int, now: float) -> None:
        """A new empty session held and reserved here: Done(record) (or SessionsFull, SessionUnavailable)."""
        self._now = now
        op = self._new_op("create", token, "")
        self._try(op)

    def save(self, token: int, session_id: str, values: Mapping[str, Any], now: float) -> None:
        """Store ``values`` as the session's data (version + 1): Done(record) once the backups have it."""
        self._now = now
        op = self._new_op("save", token, session_id)
        holding = self.held.get(session_id)
        if holding is None or _live(holding.save):
            self._fail(op, SessionUnavailable(f"session {session_id} is not held here (moved away)",
                                              retry_after=self.settings.retry_after))
            return
        record = self.table.get(session_id)
        try:
            updated = record.with_values(values, now=now, limit=self.settings.limits.max_session_bytes)
            self._put(updated)
        except (SessionError, TypeError, ValueError) as exc:
            self._fail(op, exc)
            return
        self.stats["saves"] += 1
        holding.acked, holding.sent, holding.save = set(), set(), op
        holding.replicated_access = now
        self._replicate_missing(session_id)
        self._drain()

    def invalidate(self, token: int, session_id: str, now: float) -> None:
        """Forget the session everywhere: Done(None) once its owner and copies forgot it."""
        self._now = now
        op = self._new_op("invalidate", token, session_id)
        holding = self.held.pop(session_id, None)
        if holding is None:
            self._finish(op, None)
            return
        record = self.table.remove(session_id)
        self.stats["invalidated"] += 1
        self._forget(session_id, record.epoch if record else 0, holding, op)
        self._after_gone(holding)
        self._drain()

    def release(self, session_id: str, now: float) -> None:
        """The request that loaded or created the session is over."""
        self._now = now
        holding = self.held.get(session_id)
        if holding is None or holding.busy is None:
            return
        holding.busy = None
        if _live(holding.save):
            self._fail(holding.save, self._unavailable("released before its save was acknowledged"))
        holding.save = None
        record = self.table.get(session_id)
        if record is not None and now - holding.replicated_access >= self.settings.max_inactive / 4:
            holding.replicated_access = now
            for backup in holding.acked:                 # refresh the copies' clocks (reads are not saves)
                self._send(backup, Replicate(self.view_id, encode_session(record)))
        self._next_in_turn(session_id)
        self._drain()

    def leave(self, token: int, now: float) -> None:
        """Stop gracefully: hand every held session to another member; Done(None) when none is left
        (or after :attr:`SessionSettings.evacuation_timeout`).  Then leave the space."""
        self._now = now
        op = _Op("leave", token, "", now + self.settings.evacuation_timeout)
        self._ops[token] = op
        self._leave_op = op
        self.leaving = True
        for parked in self._parked:
            self._fail(parked, SessionUnavailable("this node is stopping", retry_after=self.settings.retry_after))
        self._parked = []
        for sid in list(self.held):
            if self.held[sid].busy is None:
                self._evacuate(sid)
        self._check_left()
        self._drain()

    # ------------------------------------------------------------------ operation plumbing

    def _new_op(self, kind: str, token: int, sid: str) -> _Op:
        if token in self._ops and not self._ops[token].done:
            raise ValueError(f"token {token} is already in use")
        op = _Op(kind, token, sid, self._now + self.settings.request_timeout)
        self._ops[token] = op
        return op

    def _finish(self, op: _Op, result: Any) -> None:
        if op.done:
            return
        op.done = True
        self._ops.pop(op.token, None)
        self._out.append(Done(op.token, result))

    def _fail(self, op: _Op, error: Exception) -> None:
        if op.done:
            return
        self._finish(op, error)
        if op.kind == "create" and op.sid:
            holding = self.held.get(op.sid)
            if holding is not None and holding.register is op:     # nobody will use or release it
                holding.register = None
                del self.held[op.sid]
                record = self.table.remove(op.sid)
                if self.view_id is not None:
                    self._forget(op.sid, record.epoch if record else _MAX_EPOCH, holding, None)

    def _unavailable(self, why: str) -> SessionUnavailable:
        return SessionUnavailable(why, retry_after=self.settings.retry_after)

    def _fail_all(self, why: str) -> None:
        for op in list(self._ops.values()):
            if op.kind != "leave":
                self._fail(op, self._unavailable(why))
        self._parked = []

    def _try(self, op: _Op) -> None:
        """Run a load or create now, or park it until this node serves the session's bucket."""
        if op.done:
            return
        if self.leaving:
            self._fail(op, self._unavailable("this node is stopping"))
            return
        if not self.primary and self.view_id is not None and not self.merging:
            self._fail(op, self._unavailable("this side of the partition is not primary"))
            return
        if op.kind == "create" and not op.sid:
            op.sid = self.new_id()
        if not self.serving or bucket_of(op.sid, self.settings.buckets) not in self.ready:
            self._parked.append(op)
            return
        if op.kind == "create":
            self._create(op)
        else:
            self._load(op)
        self._drain()

    def _kick(self) -> None:
        parked, self._parked = self._parked, []
        for op in parked:
            self._try(op)

    def _load(self, op: _Op) -> None:
        sid = op.sid
        holding = self.held.get(sid)
        if holding is not None:
            if holding.busy is None and not holding.queue:
                self._reserve(sid, holding, op)
            else:
                holding.queue.append(op)
            return
        waiting = self._acquiring.get(sid)
        if waiting is not None:
            waiting.append(op)
            return
        self._acquiring[sid] = [op]
        self._send(self._owner(sid), Acquire(self.view_id, sid))

    def _create(self, op: _Op) -> None:
        epoch = self._fresh_epoch(0)
        record = Session.new(op.sid, now=self._now, epoch=epoch, max_inactive=self.settings.max_inactive,
                             limit=self.settings.limits.max_session_bytes)
        try:
            self._put(record)
        except SessionError as exc:
            self._fail(op, exc)
            return
        holding = _Holding(busy=op.token, register=op, replicated_access=self._now)
        self.held[op.sid] = holding
        self.stats["created"] += 1
        self._send(self._owner(op.sid), Register(self.view_id, op.sid, epoch))

    def _reserve(self, sid: str, holding: _Holding, op: _Op) -> None:
        record = self.table.get(sid)
        if record is None:                     # cannot happen: held records are in the table
            self._fail(op, self._unavailable("session record missing"))
            return
        if record.expired(self._now):
            self._expire_one(sid)
            self._finish(op, None)
            return
        touched = record.touched(self._now)
        try:
            self._put(touched)
        except SessionError:
            touched = record
        holding.busy = op.token
        self._finish(op, touched)

    def _next_in_turn(self, sid: str) -> None:
        """The session is free: give it to the next request or hand-off waiting for it."""
        holding = self.held.get(sid)
        if holding is None:
            return
        if self.leaving and not holding.evacuating:
            self._evacuate(sid)
        while holding.queue and holding.busy is None and self.held.get(sid) is holding:
            item = holding.queue.popleft()
            if type(item) is Handoff:
                self._hand_off(sid, holding, item)
                return
            if not item.done:
                if self.leaving:
                    self._fail(item, self._unavailable("this node is stopping"))
                else:
                    self._reserve(sid, holding, item)

    # ------------------------------------------------------------------ frames

    def _decode(self, payload: bytes) -> Frame | None:
        try:
            return decode_frame(payload)
        except MalformedFrame:
            self.stats["malformed"] += 1
            return None

    def _send(self, dest: int, frame: Frame) -> None:
        if dest == self.me:
            self._inbox.append((dest, frame))
        else:
            self._out.append(Send(dest, encode_frame(frame)))

    def _announce(self, frame: Frame) -> None:
        self._out.append(Announce(encode_frame(frame)))

    def _drain(self) -> None:
        if self._draining:
            return
        self._draining = True
        try:
            while self._inbox:
                sender, frame = self._inbox.popleft()
                self._dispatch(sender, frame)
        finally:
            self._draining = False

    def _dispatch(self, sender: int, frame: Frame) -> None:
        view = tuple(frame.view)
        if view != self.view_id:
            if view in self._past:
                self.stats["stale_frames"] += 1
            elif len(self._future) < self.settings.max_buffered_frames:
                self._future.append((sender, frame))
            else:
                self.stats["stale_frames"] += 1
            return
        if sender not in self.members:
            self.stats["stale_frames"] += 1
            return
        handler = self._HANDLERS.get(type(frame))
        if handler is not None:
            handler(self, sender, frame)

    # -- member side -----------------------------------------------------------------

    def _on_verdict(self, owner: int, frame: Verdict) -> None:
        for drop in frame.drops:
            record = self.table.get(drop.id)
            if record is not None and (record.epoch, record.version) <= (drop.epoch, drop.version):
                holding = self.held.pop(drop.id, None)
                self.table.remove(drop.id)
                if holding is not None:
                    self._after_gone(holding)
        if not frame.last:
            return
        assert self.bucket_map is not None
        mine = set(self.bucket_map.buckets_of(owner))
        self.ready |= mine
        for sid, holding in list(self.held.items()):
            if bucket_of(sid, self.settings.buckets) in mine:
                if holding.register is not None:
                    op, holding.register = holding.register, None
                    self._finish(op, self.table.get(sid))
                self._replicate_missing(sid)
        self._kick()

    def _on_registered(self, owner: int, frame: Registered) -> None:
        holding = self.held.get(frame.id)
        if holding is None or holding.register is None:
            return
        op, holding.register = holding.register, None
        if frame.ok:
            self._finish(op, self.table.get(frame.id))
        else:                                               # an id already taken: try another
            self.held.pop(frame.id, None)
            self.table.remove(frame.id)
            op.sid = ""
            self._try(op)

    def _on_not_found(self, owner: int, frame: NotFound) -> None:
        for op in self._acquiring.pop(frame.id, []):
            self._finish(op, None)

    def _on_handoff(self, owner: int, frame: Handoff) -> None:
        holding = self.held.get(frame.id)
        if holding is not None:
            if holding.busy is None and not any(not getattr(i, "done", False) for i in holding.queue):
                self._hand_off(frame.id, holding, frame)
            else:
                holding.queue.append(frame)
            return
        record = self.table.get(frame.id)
        if record is None:
            self._send(owner, Missing(self.view_id, frame.id))
            return
        # fail-over: this copy becomes the session (the holder is gone)
        self._send(frame.to, Transfer(self.view_id, encode_session(record.with_epoch(frame.epoch)),
                                      sorted(set(frame.copies) | {self.me})))

    def _hand_off(self, sid: str, holding: _Holding, frame: Handoff) -> None:
        record = self.table.get(sid)
        del self.held[sid]
        # members sent a copy that have not acknowledged it yet may keep it too: the new holder
        # updates and drops them with the others (else an older copy is left over, unknown)
        copies = sorted(holding.acked | holding.sent | holding.stale | {self.me})
        if frame.to != self.me:
            self.stats["migrations_out"] += 1
            if holding.evacuating:
                self.stats["evacuated"] += 1
            if self.leaving:
                self._handed.add(sid)            # the new holder drops this copy once it has the session
        self._send(frame.to, Transfer(self.view_id, encode_session(record.with_epoch(frame.epoch)), copies))
        self._after_gone(holding)

    def _after_gone(self, holding: _Holding) -> None:
        """A session left this node (handed off, invalidated, dropped): its waiting requests ask again."""
        if _live(holding.save):
            self._fail(holding.save, self._unavailable("the session moved during the save"))
        if _live(holding.register):
            self._fail(holding.register, self._unavailable("the session was dropped"))
        for item in holding.queue:
            if type(item) is not Handoff and not item.done:
                self._parked.append(item)
        holding.queue.clear()
        self._kick()
        self._check_left()

    def _on_transfer(self, keeper: int, frame: Transfer) -> None:
        try:
            record = decode_session(frame.record)
        except MalformedSession:
            self.stats["malformed"] += 1
            return
        sid = record.id
        owner = self._owner(sid)
        current = self.table.get(sid)
        if sid in self.held and current is not None and (current.epoch, current.version) >= \
                (record.epoch, record.version):
            self._send(owner, Acquired(self.view_id, sid, current.epoch, True))
            return
        try:
            self._put(record)
        except SessionError:
            self._send(owner, Acquired(self.view_id, sid, record.epoch, False))
            for op in self._acquiring.pop(sid, []):
                self._fail(op, SessionsFull("no room here for the session"))
            return
        holding = _Holding(stale=set(frame.copies) - {self.me}, replicated_access=self._now)
        self.held[sid] = holding
        if keeper != self.me:
            self.stats["migrations_in"] += 1
        self._send(owner, Acquired(self.view_id, sid, record.epoch, True))
        waiting = self._acquiring.pop(sid, [])
        for op in waiting:
            if not op.done:
                holding.queue.append(op)
        if self.leaving:
            self._evacuate(sid)
        else:
            self._next_in_turn(sid)
        self._replicate_missing(sid)

    def _on_replicate(self, holder: int, frame: Replicate) -> None:
        try:
            record = decode_session(frame.record)
        except MalformedSession:
            self.stats["malformed"] += 1
            return
        sid = record.id
        mine = self.table.get(sid)
        ok = True
        buried = self.tombstones.get(sid)
        if buried is not None and record.epoch <= buried[0]:
            ok = False                                      # the session ended: no copy of it again
        elif mine is not None and (mine.epoch, mine.version) > (record.epoch, record.version):
            ok = False
        elif sid in self.held:
            if mine is not None and (mine.epoch, mine.version) == (record.epoch, record.version):
                ok = False                                  # two holders of one epoch: never acknowledge
            else:
                holding = self.held.pop(sid)                # a newer holder exists: this one is stale
                self._after_gone(holding)
        if ok:
            try:
                self._put(record)
            except SessionError:
                ok = False
        self._send(holder, Replicated(self.view_id, sid, record.epoch, record.version, ok))
        if sid in self._handed:                      # the new holder has it (and made this node a backup)
            self._handed.discard(sid)
            self._check_left()

    def _on_replicated(self, backup: int, frame: Replicated) -> None:
        holding = self.held.get(frame.id)
        record = self.table.get(frame.id)
        if holding is None or record is None or (frame.epoch, frame.version) != (record.epoch, record.version):
            return
        if not frame.ok:
            if _live(holding.save):
                self._fail(holding.save, self._unavailable(
                    f"backup {backup} refused a copy of the session (no room, or a newer copy)"))
            holding.save = None
            return
        holding.acked.add(backup)
        self._replication_progress(frame.id, holding)

    def _on_drop(self, sender: int, frame: Drop) -> None:
        record = self.table.get(frame.id)
        if record is not None and frame.id not in self.held and \
                (record.epoch, record.version) <= (frame.epoch, frame.version):
            self.table.remove(frame.id)
            if frame.id in self._handed:
                self._handed.discard(frame.id)
                self._check_left()

    def _on_forget(self, sender: int, frame: Forget) -> None:
        if self._is_owner(frame.id) and not self._owner_ready:
            self._owner_backlog.append((sender, frame))      # the index is being rebuilt
            return
        record = self.table.get(frame.id)
        if record is not None and frame.id not in self.held and record.epoch <= frame.epoch:
            self.table.remove(frame.id)
        self._bury(frame.id, frame.epoch)
        entry = self.index.get(frame.id)
        if entry is not None and self._is_owner(frame.id) and entry.lock is None and \
                (entry.holder == sender or entry.epoch <= frame.epoch):
            del self.index[frame.id]
        self._send(sender, Forgotten(self.view_id, frame.id))

    def _on_forgotten(self, sender: int, frame: Forgotten) -> None:
        op = self._ops_by_sid("invalidate", frame.id)
        if op is not None:
            op.waiting.discard(sender)
            if not op.waiting:
                self._finish(op, None)

    # -- owner side ------------------------------------------------------------------

    def _on_owner_frame(self, sender: int, frame: Frame) -> None:
        sid = frame.id
        if not self._is_owner(sid):
            self.stats["stale_frames"] += 1
            return
        if not self._owner_ready:
            self._owner_backlog.append((sender, frame))
            return
        t = type(frame)
        if t is Acquire:
            self._owner_move(sid, sender)
        elif t is Evacuate:
            self._owner_move(sid, frame.to)
        elif t is Register:
            entry = self.index.get(sid)
            if entry is not None and entry.holder not in (None, sender):
                self._send(sender, Registered(self.view_id, sid, False))
            else:
                self.index[sid] = _Entry(sender, frame.epoch, 0)
                self._send(sender, Registered(self.view_id, sid, True))
        elif t is Acquired:
            self._owner_acquired(sid, sender, frame)
        elif t is Missing:
            self._owner_missing(sid, sender)
        elif t is Forget:
            self._on_forget(sender, frame)

    def _owner_move(self, sid: str, requester: int) -> None:
        if not self.primary:
            # no new holder outside a primary component (see the module doc: epochs); the requester's
            # request times out, an evacuating node leaves its sessions to their copies
            self.stats["stale_frames"] += 1
            return
        entry = self.index.get(sid)
        if entry is None:
            self._send(requester, NotFound(self.view_id, sid))
            return
        if entry.lock is not None:
            entry.queue.append(requester)
            return
        self._start_move(sid, entry, requester)

    def _start_move(self, sid: str, entry: _Entry, requester: int) -> None:
        if entry.holder is not None:
            target = entry.holder
        elif entry.copies:
            target = max(entry.copies, key=lambda m: (entry.copies[m], m == requester, -m))
            self.stats["failovers"] += 1
        else:
            del self.index[sid]
            self._send(requester, NotFound(self.view_id, sid))
            for waiting in entry.queue:
                self._send(waiting, NotFound(self.view_id, sid))
            return
        epoch = self._fresh_epoch(entry.epoch + 1)
        entry.lock = (requester, target)
        copies = sorted(m for m in entry.copies if m != target)
        self._send(target, Handoff(self.view_id, sid, requester, epoch, copies))

    def _owner_acquired(self, sid: str, sender: int, frame: Acquired) -> None:
        entry = self.index.get(sid)
        if entry is None:
            if frame.ok:
                self.index[sid] = _Entry(sender, frame.epoch, 0)
            return
        if entry.lock is None or entry.lock[0] != sender:
            if frame.ok and entry.lock is None:
                entry.holder, entry.epoch = sender, max(entry.epoch, frame.epoch)
            return
        _, target = entry.lock
        entry.lock = None
        if frame.ok:
            entry.holder, entry.epoch, entry.copies = sender, frame.epoch, {}
        else:                                        # the keeper still has its record, as a copy
            previous = entry.copies.get(target, (entry.epoch, entry.version))
            entry.holder = None
            entry.copies[target] = previous
        self._next_move(sid, entry)

    def _owner_missing(self, sid: str, sender: int) -> None:
        entry = self.index.get(sid)
        if entry is None:
            return
        if entry.holder == sender:
            entry.holder = None
        entry.copies.pop(sender, None)
        if entry.lock is not None and entry.lock[1] == sender:
            requester, _ = entry.lock
            entry.lock = None
            self._start_move(sid, entry, requester)
        else:
            self._next_move(sid, entry)

    def _next_move(self, sid: str, entry: _Entry) -> None:
        while entry.queue and entry.lock is None and self.index.get(sid) is entry:
            self._start_move(sid, entry, entry.queue.popleft())

    def _on_holdings(self, sender: int, frame: Holdings) -> None:
        if self._owner_ready or sender in self._reported:
            return
        mine = self.bucket_map.buckets_of(self.me) if self.bucket_map else ()
        owned = set(mine)
        entries = [e for e in frame.entries if bucket_of(e.id, self.settings.buckets) in owned]
        self._reports.setdefault(sender, []).extend(entries)
        for gone in frame.buried:
            if bucket_of(gone.id, self.settings.buckets) in owned:
                self._buried_reports[gone.id] = max(gone.epoch, self._buried_reports.get(gone.id, 0))
        if frame.last:
            self._reported.add(sender)
            if self._reported >= set(self.members):
                self._rebuild()

    def _rebuild(self) -> None:
        """Every member reported: make the index of this owner's buckets, answer every member."""
        self.stats["rebuilds"] += 1
        by_session: dict[str, list[tuple[int, Held]]] = {}
        for member, entries in self._reports.items():
            for held in entries:
                by_session.setdefault(held.id, []).append((member, held))
        drops: dict[int, list[Held]] = {m: [] for m in self.members}
        index: dict[str, _Entry] = {}
        buried, self._buried_reports = self._buried_reports, {}
        for sid, epoch in buried.items():
            self._bury(sid, epoch)
        for sid, keepers in by_session.items():
            if sid in buried:
                ended = [(member, held) for member, held in keepers if held.epoch <= buried[sid]]
                for member, held in ended:                  # records of a session that ended
                    drops[member].append(held)
                keepers = [k for k in keepers if k not in ended]
                if not keepers:
                    continue
            best_member, best = max(keepers, key=lambda k: (k[1].epoch, k[1].version, k[1].holder, -k[0]))
            holder = best_member if best.holder else None
            copies = {}
            for member, held in keepers:
                if member == holder:
                    continue
                if held.holder or held.epoch < best.epoch:
                    drops[member].append(held)
                else:
                    copies[member] = (held.epoch, held.version)
            index[sid] = _Entry(holder, best.epoch, best.version, copies if holder is None else {})
        self.index = index
        self._reports = {}
        self._owner_ready = True
        batch = self.settings.holdings_batch
        for member in self.members:
            items = drops[member]
            for start in range(0, max(len(items), 1), batch):
                chunk = items[start:start + batch]
                self._send(member, Verdict(self.view_id, chunk, start + batch >= len(items)))
        # a session whose holder is gone becomes its best copy's now, not at its next request:
        # the new holder makes K copies again, so a later crash of that copy loses nothing.  Only
        # in a primary component: both sides of a partition start their epochs at the same ring
        # seq, so a copy promoted on a minority side could outrank the primary side's holder
        for sid, entry in index.items() if self.primary else ():
            if entry.holder is None and entry.copies and entry.lock is None:
                best = max(entry.copies, key=lambda m: (entry.copies[m], -m))
                self._start_move(sid, entry, best)
        backlog, self._owner_backlog = self._owner_backlog, []
        for sender, frame in backlog:
            self._on_owner_frame(sender, frame)

    # ------------------------------------------------------------------ view changes

    def _report_holdings(self) -> None:
        """Tell every owner of this view what this node keeps of its buckets."""
        assert self.bucket_map is not None
        per_owner: dict[int, list[Held]] = {m: [] for m in self.members}
        buried: dict[int, list[Held]] = {m: [] for m in self.members}
        for record in self.table.sessions():
            owner = self.bucket_map.owner_of(record.id)
            per_owner[owner].append(Held(record.id, record.id in self.held, record.epoch, record.version))
        for sid, (epoch, _) in self.tombstones.items():
            buried[self.bucket_map.owner_of(sid)].append(Held(sid, False, epoch, 0))
        batch = self.settings.holdings_batch
        for owner, entries in per_owner.items():
            gone = buried[owner]
            count = max(len(entries), len(gone), 1)
            for start in range(0, count, batch):
                self._send(owner, Holdings(self.view_id, entries[start:start + batch], start + batch >= count,
                                           gone[start:start + batch]))

    def _redo_in_flight(self) -> None:
        """A new view: what was under way is asked again in it (or waits for the index)."""
        for sid, ops in list(self._acquiring.items()):
            live = [op for op in ops if not op.done]
            if live:
                self._acquiring[sid] = live
                self._send(self._owner(sid), Acquire(self.view_id, sid))
            else:
                del self._acquiring[sid]
        for holding in self.held.values():
            # a member sent a copy in the last view may keep it unacknowledged, and one that left the
            # view keeps its copy: both are stale (updated, then dropped, once in the view)
            members = set(self.members)
            holding.stale |= (holding.sent - holding.acked) | (holding.acked - members)
            holding.sent = set()
            holding.acked &= members
            holding.queue = deque(i for i in holding.queue if type(i) is not Handoff)
            if holding.evacuating:
                holding.evacuating = False
        for op in list(self._ops.values()):
            if op.kind == "invalidate" and not op.done:
                op.waiting = (op.waiting & set(self.members)) | {self._owner(op.sid)}
                for member in op.waiting:
                    self._send(member, Forget(self.view_id, op.sid, _MAX_EPOCH))
        if self.leaving:
            for sid, holding in self.held.items():
                if holding.busy is None:
                    self._evacuate(sid)

    def _stopped(self) -> None:
        """This node is no longer in the space."""
        self.view_id = None
        self.members = ()
        self.ready = set()
        for op in list(self._ops.values()):
            if op.kind == "leave":
                self._finish(op, None)
            else:
                self._fail(op, self._unavailable("this node left the application's space"))
        self._parked = []

    # ------------------------------------------------------------------ replication

    def _backups(self, sid: str) -> tuple[int, ...]:
        return self.settings.strategy.backups(sid, self.me, self.members, self.settings.backups, self.tags)

    def _replicate_missing(self, sid: str) -> None:
        """Push the current record to the backups that lack it (once its bucket is indexed here)."""
        holding = self.held.get(sid)
        record = self.table.get(sid)
        if holding is None or record is None or self.view_id is None or \
                bucket_of(sid, self.settings.buckets) not in self.ready:
            return
        raw = None
        backups = self._backups(sid)
        # members with older copies get the current record too, before they are dropped: a save
        # is acknowledged only once no member keeps an older copy, which a primary side cut off
        # from the holder and its backups could otherwise fail the session over to
        for backup in (*backups, *sorted(holding.stale & set(self.members) - set(backups))):
            if backup not in holding.acked and backup not in holding.sent:
                raw = raw or encode_session(record)
                holding.sent.add(backup)
                self._send(backup, Replicate(self.view_id, raw))
        self._replication_progress(sid, holding)

    def _replication_progress(self, sid: str, holding: _Holding) -> None:
        backups = set(self._backups(sid))
        present = holding.stale & set(self.members)
        if not backups | present <= holding.acked:
            return
        record = self.table.get(sid)
        extra = holding.acked - backups
        for member in extra:
            self._send(member, Drop(self.view_id, sid, record.epoch, record.version))
        holding.acked &= backups
        holding.stale -= present                     # those out of the view: when they are back
        if _live(holding.save):
            self._finish(holding.save, record)
        holding.save = None

    def _forget(self, sid: str, epoch: int, holding: _Holding, op: _Op | None) -> None:
        self._bury(sid, epoch)
        targets = (holding.acked | holding.stale | set(self._backups(sid)) | {self._owner(sid)})
        targets &= set(self.members)
        for member in targets:
            self._send(member, Forget(self.view_id, sid, epoch))
        if op is not None:
            op.waiting = set(targets)
            if not targets:
                self._finish(op, None)

    # ------------------------------------------------------------------ evacuation and expiry

    def _bury(self, sid: str, epoch: int) -> None:
        """Remember that ``sid`` ended at ``epoch`` for as long as a copy of it could outlive it."""
        until = self._now + self.settings.max_inactive + self.settings.copy_grace
        previous = self.tombstones.pop(sid, None)
        self.tombstones[sid] = (max(epoch, previous[0] if previous else 0), until)
        while len(self.tombstones) > self.settings.limits.max_sessions:      # bounded like the table
            self.tombstones.popitem(last=False)

    def _evacuate(self, sid: str) -> None:
        holding = self.held.get(sid)
        if holding is None or holding.evacuating or self.view_id is None:
            return
        others = [m for m in self.members if m != self.me]
        if not others:
            return
        order = self.settings.strategy.backups(sid, self.me, self.members, 1, self.tags) or (others[0],)
        holding.evacuating = True
        self._send(self._owner(sid), Evacuate(self.view_id, sid, order[0]))

    def _check_left(self) -> None:
        op = self._leave_op
        if op is None or op.done:
            return
        if (not self.held and not self._handed) or len(self.members) <= 1:
            self._finish(op, None)

    def _expire(self, now: float) -> None:
        for sid in [sid for sid, h in self.held.items() if h.busy is None]:
            record = self.table.get(sid)
            if record is not None and record.expired(now):
                self._expire_one(sid)
        grace = self.settings.copy_grace
        while self.tombstones and next(iter(self.tombstones.values()))[1] <= now:
            self.tombstones.popitem(last=False)
        for record in list(self.table.sessions()):
            if record.id not in self.held and now >= record.expires_at + grace:
                self.table.remove(record.id)

    def _expire_one(self, sid: str) -> None:
        holding = self.held.pop(sid, None)
        record = self.table.remove(sid)
        if holding is None:
            return
        self.stats["expired"] += 1
        if self.view_id is not None:
            self._forget(sid, record.epoch if record else 0, holding, None)
        self._after_gone(holding)

    def _put(self, record: Session) -> None:
        """Store ``record``; expired sessions reaped to make room are forgotten like expired ones."""
        try:
            reaped = self.table.put(record, self._now)
        except TableFull as exc:
            self._reaped(exc.reaped)
            raise
        self._reaped(reaped)

    def _reaped(self, reaped: Iterable[str]) -> None:
        for sid in reaped:
            holding = self.held.pop(sid, None)
            if holding is not None:
                self.stats["expired"] += 1
                if self.view_id is not None:
                    self._forget(sid, _MAX_EPOCH, holding, None)
                self._after_gone(holding)

    # ------------------------------------------------------------------ helpers

    def _owner(self, sid: str) -> int:
        assert self.bucket_map is not None
        return self.bucket_map.owner_of(sid)

    def _is_owner(self, sid: str) -> bool:
        return self.bucket_map is not None and self.bucket_map.owner_of(sid) == self.me

    def _fresh_epoch(self, at_least: int) -> int:
        base = self.ring_seq << _EPOCH_SHIFT
        return min(max(at_least, base), _MAX_EPOCH)

    def _ops_by_sid(self, kind: str, sid: str) -> _Op | None:
        for op in self._ops.values():
            if op.kind == kind and op.sid == sid and not op.done:
                return op
        return None

    _HANDLERS: ClassVar[dict[type, Callable[..., None]]] = {  # frame type -> handler(self, sender, frame)
        Holdings: _on_holdings,
        Verdict: _on_verdict,
        Register: _on_owner_frame,
        Registered: _on_registered,
        Acquire: _on_owner_frame,
        Evacuate: _on_owner_frame,
        NotFound: _on_not_found,
        Handoff: _on_handoff,
        Missing: _on_owner_frame,
        Transfer: _on_transfer,
        Acquired: _on_owner_frame,
        Replicate: _on_replicate,
        Replicated: _on_replicated,
        Forget: _on_forget,
        Forgotten: _on_forgotten,
        Drop: _on_drop,
    }


def _live(op: _Op | None) -> bool:
    return op is not None and not op.done

