"""ServiceSpaces: named logical sub-groups with agreed views, and state transfer.

Sans-IO, one object per member, fed with what the ring delivers in total order
(:meth:`SpaceLayer.deliver`, :meth:`SpaceLayer.view`) and with local calls
(:meth:`join`, :meth:`leave`, :meth:`send`).  Because every member applies the
same deliveries in the same order, every member computes the same space views
at the same points of the total order; nothing else is exchanged.

Membership (like Corosync's CPG):

* ``JOIN``/``LEAVE`` are ring messages; a space's view changes where they are
  delivered.  A ring view that loses members removes them from every space at
  that point.
* After a ring view that *merges* members from different previous
  configurations (the transitional configuration is smaller than the regular
  one), the sides disagree about spaces.  Every member then multicasts one
  ``SYNC`` listing its own spaces and where it comes from; when the SYNC of
  every member has been delivered (a barrier in the total order), each
  space's membership is rebuilt from the claims, identically everywhere, and
  one view per changed space is emitted.

State transfer (virtual synchrony): a member that joins a space which already
has members is sent a snapshot taken at the exact point of the total order
where its join is delivered.  The provider is the oldest *ready* member of the
space (one that has state); the provider's application is asked for the
snapshot by a :class:`StateRequest` output at that point.  The joiner buffers
every later event of the space and, once the snapshot is complete, outputs
:class:`StateInstalled` followed by the buffered events.  If the provider
leaves first, the joiner multicasts ``STATE_REQ``; the next provider snapshots
where that is delivered, and the joiner drops the buffered events that came
before it (they are in the snapshot).  A joiner multicasts ``STATE_DONE`` once
installed, which makes it a provider candidate.

Which state survives a merge (docs/spaces.rst has the rule in plain words).
Every member knows, for each space, the *epoch* of the state its holders (the
``ready`` members) have: the most recent primary configuration (see
:mod:`groupcomm.layers.quorum`) whose state that is, None if it never was in
one.  Wherever a primary configuration's members agree (a view that merged
nobody, or the end of a SYNC), each space's epoch becomes that configuration.
A member holds the current state only once its transfer completed; while it
fetches, its application keeps the complete state it had before, if any
(``fallback``), never the one it was receiving.  In its SYNC each member
claims, per space, whether it holds the current state and the epoch of the
complete state its application has (or that it has none).  The source of a
space is the claimant whose complete state is the most recent (ties: a
current state, then the side :class:`Merge` ranks first); the members of its
side keep their state, every other member fetches it from the source.  When
no member holds the current state any more (after a SYNC or between merges),
the one with the most recent fallback takes over; if no member has any
complete state, a primary configuration starts the space over from nothing
(:class:`StateInstalled` with None) and a non-primary one waits for a member
that has it.  A space nobody had (every claimant is joining) starts from
nothing, like a new space for its first member.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from groupcomm.config import Duration, Size
from groupcomm.errors import ConfigError, LocalProtocolError
from groupcomm.events import Message, RingId, View
from groupcomm.layers.quorum import Quorum
from groupcomm.layers.wire import (
    MAX_SENIORITY,
    DataFrame,
    JoinFrame,
    LeaveFrame,
    MalformedFrame,
    RequestFrame,
    RingFrame,
    StateChunkFrame,
    StateDoneFrame,
    StateReqFrame,
    SyncFrame,
    check_space_name,
    decode_ring,
    encode,
)

__all__ = [
    "STATE_CHUNK_SIZE",
    "Merge",
    "RingSend",
    "SpaceLayer",
    "SpaceMessage",
    "SpaceRequest",
    "SpaceView",
    "SpacesConfig",
    "StateInstalled",
    "StateRequest",
    "Synced",
    "UnicastSend",
    "check_space_name",
]

# The frames of this layer (JOIN, LEAVE, SYNC, DATA, STATE_REQ, STATE_DONE and
# REQUEST on the ring; STATE_CHUNK over UNICAST) are declared in groupcomm.layers.wire.
STATE_CHUNK_SIZE = 256 << 10
"""Bytes of snapshot per unicast message; the driver paces chunks."""
_US = 1_000_000


@dataclass(frozen=True)
class SpacesConfig:
    """The SPACES layer: how long and how much a joiner waits for its snapshot."""

    state_transfer_timeout: Duration = 10.0
    """A joiner that gets no chunk of its snapshot for this long asks another member of the
    space for it (a ``STATE_REQ`` ring message, as when its provider leaves)."""
    snapshot_buffer_bytes: Size = 64 << 20
    """Payload bytes of the space's events a joiner holds while it waits for its snapshot;
    past this it gives that snapshot up, drops the messages the next one will cover, and
    asks another member."""
    snapshot_buffer_events: int = 100_000
    """Events a joiner holds while it waits for its snapshot; past this, as for
    ``snapshot_buffer_bytes``."""
    early_chunks: int = 1024
    """Snapshot chunks kept that arrived before this member reached the point of the order
    they were taken at; more are dropped (counted) and the transfer is asked again after
    ``state_transfer_timeout``."""
    early_chunk_bytes: Size = 64 << 20
    """Bytes of such early snapshot chunks kept, at most."""

    def __post_init__(self) -> None:
        if not self.state_transfer_timeout > 0:
            raise ConfigError("SPACES: state_transfer_timeout must be > 0")
        for name in ("snapshot_buffer_bytes", "snapshot_buffer_events", "early_chunks", "early_chunk_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"SPACES: {name} must be at least 1")


class SpaceView(NamedTuple):
    """A space's membership changed: ``members`` (oldest first), who ``joined`` and who ``left``."""

    members: tuple[int, ...]
    joined: tuple[int, ...]
    left: tuple[int, ...]
    space: str = ""
    view_id: tuple[int, int, int] = (0, 0, 0)
    """Where in the total order it was installed (a :data:`Point`); with ``space`` it names
    the view: every member that installs it sees the same ``members``."""


class SpaceMessage(NamedTuple):
    """A message for ``space`` (delivered here because this member is in it)."""

    space: str
    message: Message


class SpaceRequest(NamedTuple):
    """A request multicast to ``space`` (``space == ""``: to the whole channel)."""

    space: str
    requester: int
    req_id: int
    payload: bytes

    @property
    def sender(self) -> int:
        """The requester (the name messages use)."""
        return self.requester


class StateRequest(NamedTuple):
    """Provider side: take a snapshot of ``space`` now and pass it to :meth:`SpaceLayer.provide`."""

    space: str
    joiner: int
    point: tuple[int, int, int]


class StateInstalled(NamedTuple):
    """Joiner side: replace the state of ``space`` with ``state`` (None: nobody had any)."""

    space: str
    state: bytes | None


class Synced(NamedTuple):
    """The SYNC round after a merging ring view ended (every member's claims delivered): from here on
    every member of ``ring_id`` has the same spaces (and views).  Output at the same point of the total
    order everywhere, also when no space changed, after the :class:`Merge` (if any) and the space views
    the round changed."""

    ring_id: RingId


class Merge(NamedTuple):
    """After a merge: the sides (members whose state agreed before) and which one was primary.

    If no side was primary, ``primary`` is the side whose members were most
    recently in a primary configuration with every state transfer complete
    (ties: the lowest node id) and ``was_primary`` is False.  Each space takes
    its state from the member the merge rule picks (see the module docstring);
    that is a member of ``primary`` whenever ``primary`` holds the space's
    latest state.
    """

    ring_id: RingId
    components: tuple[tuple[int, ...], ...]
    primary: tuple[int, ...]
    was_primary: bool
    """Whether ``primary`` really was a primary component (False: it won by recency)."""


class RingSend(NamedTuple):
    """Submit ``payload`` to the ring with this layer's kind."""

    payload: bytes
    safe: bool


class UnicastSend(NamedTuple):
    """Send ``payload`` to ``dest`` over the reliable unicast layer."""

    dest: int
    payload: bytes


Point = tuple[int, int, int]
"""A point of the total order: (ring representative, ring seq, deliveries so far in that ring)."""


_ASKED = -1
"""``_Incoming.provider`` while a ``STATE_REQ`` is on its way (None: nobody here has the state)."""
_NO_EPOCH = RingId(0, 0)
"""An epoch on the wire that names no primary configuration."""


@dataclass
class _Incoming:
    """A state transfer this member is waiting for."""

    provider: int | None                                     # _ASKED, or None: wait for a member with state
    cuts: dict[Point, int] = field(default_factory=dict)     # snapshot point -> buffer index there
    buffer: list = field(default_factory=list)
    chunks: dict[Point, list] = field(default_factory=dict)
    held: int = 0                                            # payload bytes in ``buffer``
    deadline: int | None = None                              # ask again then (None: arm at the next tick)


@dataclass
class _Sync:
    """One SYNC round after a merge."""

    ring_ids: set[RingId]
    waiting: set[int]
    claims: dict[str, list[int]] = field(default_factory=dict)
    ready: dict[str, set[int]] = field(default_factory=dict)
    epochs: dict[str, dict[int, RingId | None]] = field(default_factory=dict)   # claimants with a complete state
    without: dict[str, set[int]] = field(default_factory=dict)   # members of the space on their side with none
    seniority: dict[str, dict[int, int]] = field(default_factory=dict)   # claimant -> position on its side
    origin: dict[int, tuple] = field(default_factory=dict)   # member -> (prev ring, prev primary, last primary seq)


class SpaceLayer:
    """All spaces as one member sees them."""

    def __init__(self, me: int, quorum: Quorum | None = None, config: SpacesConfig | None = None) -> None:
        self.me = me
        self.quorum = quorum or Quorum()
        self.config = config = config or SpacesConfig()
        self._timeout = max(1, round(config.state_transfer_timeout * _US))
        self.spaces: dict[str, list[int]] = {}
        self.ready: dict[str, set[int]] = {}
        # The epoch of each space's state: the most recent primary configuration whose
        # state the members in ``ready`` have (None: none; see the module docstring).
        self.epochs: dict[str, RingId | None] = {}
        # Members fetching a space's state whose applications still hold the complete state
        # they had before (from the side that lost a merge), with its epoch: the state to
        # fall back on if no member holds the space's current state any more.
        self.fallback: dict[str, dict[int, RingId | None]] = {}
        self.mine: set[str] = set()              # spaces this member is in (its own JOIN delivered)
        self.requested: set[str] = set()         # spaces this member asked to be in
        self.members: tuple[int, ...] = ()
        self.ring_id = RingId(0, 0)
        self.primary = False
        # The last configuration in which this member's space state agreed with
        # every other member's (a view that merged nobody, or a completed SYNC
        # barrier), whether it was primary, and the last primary one in which
        # it had completed every transfer.  Merges rank the sides by these, not
        # by the previous view: a merge interrupted by another leaves members of
        # one view with different states.
        self.stable_ring = RingId(0, 0)
        self.stable_primary = False
        self.last_primary_seq = -1
        self._trans: tuple[int, ...] | None = None
        self._trans_ring = RingId(0, 0)
        self._n = 0                             # deliveries in this ring view (see Point)
        self._sync: _Sync | None = None
        self._incoming: dict[str, _Incoming] = {}
        self._early: dict[tuple[str, Point], list] = {}        # snapshot chunks that beat their point
        self._early_count = self._early_bytes = 0
        self._tried: dict[tuple[str, int], set[int]] = {}      # (space, joiner) -> providers asked, in agreement
        self._out: list = []
        self.dropped = 0
        self.transfers_retried = 0
        """Snapshots this member asked for again (no chunk for ``state_transfer_timeout``, or its buffer was full)."""

    # -- local calls ------------------------------------------------------------

    def join(self, space: str) -> None:
        check_space_name(space)
        if space in self.requested:
            raise LocalProtocolError(f"already in space {space!r} (or joining it)")
        self.requested.add(space)
        self._out.append(RingSend(encode(JoinFrame(space)), False))

    def leave(self, space: str) -> None:
        if space not in self.requested:
            raise LocalProtocolError(f"not in space {space!r}")
        self.requested.discard(space)
        self._out.append(RingSend(encode(LeaveFrame(space)), False))

    def send(self, space: str, payload: bytes, safe: bool = False) -> bytes:
        """The ring message that carries ``payload`` to ``space`` (the caller submits it)."""
        return encode(DataFrame(space, bytes(payload)))

    def request(self, space: str, req_id: int, payload: bytes) -> bytes:
        """The ring message of a request to every member of ``space`` ("" = the channel)."""
        return encode(RequestFrame(space, req_id, bytes(payload)))

    def provide(self, request: StateRequest, state: bytes | None) -> None:
        """Answer a :class:`StateRequest`: stream ``state`` to the joiner in chunks."""
        space, joiner, point = request
        if state is None:
            self._out.append(UnicastSend(joiner, encode(StateChunkFrame(space, point, 0, True, None))))
            return
        view = memoryview(bytes(state))
        count = max(1, -(-len(view) // STATE_CHUNK_SIZE))
        for i in range(count):
            chunk = bytes(view[i * STATE_CHUNK_SIZE : (i + 1) * STATE_CHUNK_SIZE])
            self._out.append(UnicastSend(joiner, encode(StateChunkFrame(space, point, i, i == count - 1, chunk))))

    def take(self) -> list:
        out, self._out = self._out, []
        return out

    def tick(self, now: int) -> None:
        """Arm the state-transfer timers started since the last call; ask again where one is due.
        A member waiting for someone to have the state at all (no provider) has no timer: a
        member that gets the state, or a merge, makes it ask."""
        for space, incoming in self._incoming.items():
            if incoming.provider is None:
                incoming.deadline = None
                continue
            if incoming.deadline is not None and now >= incoming.deadline:
                self._ask_again(space, incoming, drop=False)
            if incoming.deadline is None:
                incoming.deadline = now + self._timeout

    def next_deadline(self) -> int | None:
        """When :meth:`tick` must next be called (None: no transfer is waiting)."""
        return min((i.deadline for i in self._incoming.values() if i.deadline is not None and i.provider is not None),
                   default=None)

    def holds_state(self, space: str) -> bool:
        """Whether this member holds the current state of ``space`` (its transfer, if any, completed)."""
        return self.me in self.ready.get(space, ())

    def has_state(self, space: str) -> bool:
        """Whether this member's application holds a complete state of ``space``: the current one,
        or, while it fetches that, the one it had before."""
        return self.holds_state(space) or self.me in self.fallback.get(space, {})

    @property
    def merging(self) -> bool:
        """A SYNC round after a merge is under way: until it ends, members' space states may differ."""
        return self._sync is not None

    def state_epoch(self, space: str) -> RingId | None:
        """The most recent primary configuration whose state the state holders of ``space`` have
        (None: no primary one, or ``space`` has no members here)."""
        return self.epochs.get(space)

    # -- inputs in total order ---------------------------------------------------------

    def view(self, view: View) -> None:
        """A ring configuration (transitional or regular), in delivery order."""
        if view.transitional:
            # Deliveries between here and the regular view happen in the
            # transitional configuration: only its members share them, so they
            # get points of their own (the new ring's id, counted negative).
            self._trans = view.members
            self._trans_ring = view.ring_id
            self._n = 0
            return
        gone = set(self.members) - set(view.members)
        merged = self._trans is None or tuple(self._trans) != tuple(view.members)
        came_with_me = self._trans if self._trans is not None else (self.me,)
        self._trans = None
        self.members, self.ring_id = tuple(view.members), view.ring_id
        self.primary = self.quorum.view(view.members, came_with_me)
        self._n = 0
        self._forget_before(view)
        sync = self._sync
        if gone and not merged and sync is None:
            # After a merge (or during a SYNC round a merge started) the sides'
            # space state differs; the SYNC barrier removes departed members
            # for everyone at one point instead.
            self._remove(gone)
        if merged:
            self._sync = _Sync({view.ring_id}, set(view.members))
            self._out.append(RingSend(encode(self._claim(view.ring_id)), False))
        elif sync is not None:
            sync.ring_ids.add(view.ring_id)             # the same members go on with the same round
            sync.waiting -= gone
            for name in sync.claims:
                sync.claims[name] = [m for m in sync.claims[name] if m not in gone]
            self._n += 1                                # the barrier, if it completes here, is its own point
            self._maybe_finish_sync()
        else:
            self._stable()
        self._check_providers()

    def _claim(self, ring_id: RingId) -> SyncFrame:
        """This member's SYNC: its spaces, whose state it holds, and the epoch of each state."""
        spaces, epochs, waiting = [], [], []
        for name in sorted(self.requested):
            ready = self.holds_state(name)
            spaces.append((name, ready))
            if ready:
                epochs.append((name, tuple(self.epochs.get(name) or _NO_EPOCH)))
            elif self.me in self.fallback.get(name, {}):
                epochs.append((name, tuple(self.fallback[name][self.me] or _NO_EPOCH)))
            elif self.me in self.spaces.get(name, ()):
                waiting.append(name)
        seniority = [(name, self.spaces[name].index(self.me)) for name, _ in spaces
                     if self.me in self.spaces.get(name, ())]
        return SyncFrame(tuple(ring_id), spaces, tuple(self.stable_ring), self.stable_primary,
                         self.last_primary_seq, epochs, waiting, seniority)

    def _stable(self) -> None:
        """Every member of this view now has the same space state (a regular view)."""
        self.stable_ring, self.stable_primary = self.ring_id, self.primary
        if not self.primary:
            return
        for space in sorted(self.spaces):
            if not self.ready.get(space):
                self._no_holder(space)
            self.epochs[space] = self.ring_id
        if not self._incoming:
            self.last_primary_seq = self.ring_id.seq

    def _in_primary(self) -> bool:
        """Whether deliveries here are in a primary configuration (not a transitional one)."""
        return self.primary and self._trans is None

    def deliver(self, sender: int, payload: bytes, safe: bool) -> RingFrame | None:
        """A ring message of this layer, in total order; returns its frame (None: malformed, counted
        in :attr:`dropped` and ignored, identically at every member)."""
        self._n += 1
        try:
            frame = decode_ring(payload)
        except MalformedFrame:
            self.dropped += 1
            return None
        t = type(frame)
        if t is DataFrame:
            self._space_event(frame.space, SpaceMessage(frame.space, Message(sender, frame.payload, safe)))
        elif t is RequestFrame:
            scope = frame.scope
            self._space_event(scope, SpaceRequest(scope, sender, frame.req_id, frame.payload), always=scope == "")
        elif t is JoinFrame:
            self._join(sender, frame.space)
        elif t is LeaveFrame:
            self._leave(sender, frame.space)
        elif t is SyncFrame:
            self._sync_claim(sender, RingId(*frame.ring_id), frame)
        elif t is StateReqFrame:
            self._state_req(sender, frame.space)
        else:                                                # StateDoneFrame
            self._tried.pop((frame.space, sender), None)
            self.fallback.get(frame.space, {}).pop(sender, None)
            if sender in self.spaces.get(frame.space, ()):
                self.ready.setdefault(frame.space, set()).add(sender)
                incoming = self._incoming.get(frame.space)
                if incoming is not None and incoming.provider is None:   # a member has the state now
                    self._ask(frame.space, incoming)
        return frame

    def state_chunk(self, sender: int, frame: StateChunkFrame) -> None:
        """A snapshot chunk that arrived over unicast (decoded by the member's unicast decoder)."""
        space, point, index, last, chunk = frame.space, frame.point, frame.index, frame.last, frame.chunk
        incoming = self._incoming.get(space)
        if incoming is None or point not in incoming.cuts:
            # The provider may reach the point before we do (unicast overtakes
            # the ring): keep the chunk until we get there, or drop it as late.
            size = len(chunk) if chunk is not None else 0
            config = self.config
            if (point[1] >= self.ring_id.seq and self._early_count < config.early_chunks
                    and self._early_bytes + size <= config.early_chunk_bytes):
                self._early.setdefault((space, point), []).append((index, last, chunk))
                self._early_count += 1
                self._early_bytes += size
            else:
                self.dropped += 1
            return
        self._chunk(space, incoming, point, index, last, chunk)

    def _chunk(self, space: str, incoming: _Incoming, point: Point, index: int, last: bool, chunk) -> None:
        parts = incoming.chunks.setdefault(point, [])
        if index != len(parts):
            self.dropped += 1
            return
        parts.append(chunk)
        incoming.deadline = None                             # progress: the timeout starts again
        if last:
            self._install(space, incoming, point)

    def _expect(self, space: str, incoming: _Incoming, point: Point, cut: int) -> None:
        """The snapshot taken at ``point`` covers the buffer up to ``cut``; it may be here already."""
        incoming.cuts[point] = cut
        early = self._early.pop((space, point), ())
        self._early_count -= len(early)
        self._early_bytes -= sum(len(chunk) for _, _, chunk in early if chunk is not None)
        for index, last, chunk in early:
            if self._incoming.get(space) is incoming:
                self._chunk(space, incoming, point, index, last, chunk)

    def _forget_before(self, view: View) -> None:
        """A regular view: drop early chunks of older rings and the providers tried for joiners that left."""
        seq = view.ring_id.seq
        self._early = {key: chunks for key, chunks in self._early.items() if key[1][1] >= seq}
        self._early_count = sum(len(chunks) for chunks in self._early.values())
        self._early_bytes = sum(len(c) for chunks in self._early.values() for _, _, c in chunks if c is not None)
        members = set(view.members)
        self._tried = {key: tried for key, tried in self._tried.items() if key[1] in members}

    # -- membership ---------------------------------------------------------------


    def _emit_view(self, space: str, members: list[int], joined: Iterable[int], left: Iterable[int]) -> None:
        view = SpaceView(tuple(members), tuple(joined), tuple(left), space, self._point())
        if space in self.mine or self.me in view.left:
            self._space_event(space, view, always=self.me in view.left or self.me in view.joined)
        else:
            self._out.append(view)                           # tracked by everyone, for observers

    def _join(self, sender: int, space: str) -> None:
        if self._sync is not None:
            claims = self._sync.claims.setdefault(space, [])
            if sender not in claims:
                claims.append(sender)
            return
        members = self.spaces.setdefault(space, [])
        if sender in members:
            return
        had_members = bool(members)
        members.append(sender)
        ready = self.ready.setdefault(space, set())
        if sender == self.me:
            self.mine.add(space)
        if not had_members:                                  # a new space: its state starts here
            ready.add(sender)
            self.epochs[space] = self.ring_id if self._in_primary() else None
        self._emit_view(space, members, (sender,), ())
        if had_members:
            self._start_transfer(space, sender)

    def _leave(self, sender: int, space: str) -> None:
        sync = self._sync
        if sync is not None:
            claims = sync.claims.get(space, [])
            if sender in claims:
                claims.remove(sender)
            sync.ready.get(space, set()).discard(sender)         # its state went with it
            sync.epochs.get(space, {}).pop(sender, None)
            sync.without.get(space, set()).discard(sender)
            return
        members = self.spaces.get(space, [])
        if sender not in members:
            return
        members.remove(sender)
        self.ready.get(space, set()).discard(sender)
        self.fallback.get(space, {}).pop(sender, None)
        self._tried.pop((space, sender), None)
        if sender == self.me:
            self._incoming.pop(space, None)
        self._emit_view(space, members, (), (sender,))
        if sender == self.me:
            self.mine.discard(space)
        if not members:
            self._forget(space)
        self._check_providers()

    def _remove(self, gone: set[int]) -> None:
        for space in sorted(self.spaces):
            members = self.spaces[space]
            left = [m for m in members if m in gone]
            if not left:
                continue
            members[:] = [m for m in members if m not in gone]
            self.ready[space] -= gone
            for member in gone:
                self.fallback.get(space, {}).pop(member, None)
            self._emit_view(space, members, (), left)
            if not members:
                self._forget(space)

    def _forget(self, space: str) -> None:
        """``space`` has no members left here."""
        del self.spaces[space]
        self.ready.pop(space, None)
        self.epochs.pop(space, None)
        self.fallback.pop(space, None)

    # -- merges --------------------------------------------------------------------

    def _sync_claim(self, sender: int, ring_id: RingId, frame: SyncFrame) -> None:
        sync = self._sync
        if sync is None or ring_id not in sync.ring_ids or sender not in sync.waiting:
            return                                           # stale: from an older round
        sync.waiting.discard(sender)
        sync.origin[sender] = (RingId(*frame.stable_ring), bool(frame.stable_primary), frame.last_primary_seq)
        for name in list(sync.claims):
            if sender in sync.claims[name]:
                sync.claims[name].remove(sender)
        for name, ready in frame.spaces:
            sync.claims.setdefault(name, []).append(sender)
            if ready:
                sync.ready.setdefault(name, set()).add(sender)
        for name, epoch in frame.epochs:
            epoch = RingId(*epoch)
            sync.epochs.setdefault(name, {})[sender] = epoch if epoch != _NO_EPOCH else None
        for name in frame.waiting:
            sync.without.setdefault(name, set()).add(sender)
        for name, position in frame.seniority:
            sync.seniority.setdefault(name, {})[sender] = position
        self._maybe_finish_sync()

    def _maybe_finish_sync(self) -> None:
        sync = self._sync
        if sync is None or sync.waiting:
            return
        self._sync = None
        ranked = _rank_components(sync.origin)
        if sum(1 for comp in ranked if tuple(sync.origin[comp[0]][0]) != (0, 0)) > 1:   # fresh members are no side
            winner = ranked[0]
            self._out.append(Merge(
                self.ring_id, tuple(tuple(sorted(c)) for c in ranked), tuple(sorted(winner)),
                any(sync.origin[m][1] for m in winner),
            ))
        rank_of = {m: i for i, comp in enumerate(ranked) for m in comp}
        for space in sorted(set(self.spaces) | set(sync.claims)):
            before = self.spaces.get(space, [])
            claims = sync.claims.get(space, [])
            # Each side keeps its order (oldest first), the sides in merge rank, newcomers last.
            seniority = sync.seniority.get(space, {})
            after = sorted((m for m in claims if m in rank_of),
                           key=lambda m: (rank_of[m], seniority.get(m, MAX_SENIORITY), claims.index(m)))
            if space in self.mine and self.me not in after:
                self.mine.discard(space)
            if self.me in after:
                self.mine.add(space)
            else:
                self._incoming.pop(space, None)
            joined = [m for m in after if m not in before]
            left = [m for m in before if m not in after]
            if after:
                self.spaces[space] = after
            elif space in self.spaces:
                self._forget(space)
            if tuple(after) != tuple(before):                 # the order (seniority) may change too
                self._emit_view(space, after, joined, left)
            if after:
                self._settle(space, after, sync, rank_of)
        self._out.append(Synced(self.ring_id))
        self._stable()
        self._check_providers()

    def _settle(self, space: str, after: list[int], sync: _Sync, rank_of: dict[int, int]) -> None:
        """The end of a SYNC: whose state ``space`` keeps (see the module docstring), and the transfers."""
        epochs = sync.epochs.get(space, {})
        current = sync.ready.get(space, set())
        holders = [m for m in after if m in epochs]           # their applications hold a complete state
        if holders:
            source = max(holders, key=lambda m: (_recency(epochs[m]), m in current, -rank_of[m], -m))
            epoch = epochs[source]
            keep = {m for m in holders if rank_of[m] == rank_of[source] and epochs[m] == epoch
                    and (m in current) == (source in current)}
            self.ready[space] = keep
            self.epochs[space] = epoch
            self.fallback[space] = {m: epochs[m] for m in holders if m not in keep}
            if self.me in keep:
                self._stop_fetching(space)
            for member in after:
                if member not in keep:
                    self._start_transfer(space, member)
            return
        self.fallback.pop(space, None)
        if not any(m in sync.without.get(space, ()) for m in after):   # a new space: it starts here
            self.ready[space] = set(after)
            self.epochs[space] = self.ring_id if self._in_primary() else None
            incoming = self._incoming.pop(space, None)
            if incoming is not None:
                self._finish(space, None, incoming.buffer)
            return
        # Members of the space without any complete state: the state is elsewhere (or lost).
        self.ready[space] = set()
        self.epochs[space] = None
        if self._in_primary():
            self._lose(space)
        elif self.me in after:
            incoming = self._incoming.setdefault(space, _Incoming(None))
            incoming.provider = None
            incoming.cuts.clear()
            incoming.chunks.clear()

    # -- state transfer ---------------------------------------------------------------

    def _provider(self, space: str, joiner: int) -> int | None:
        ready = self.ready.get(space, set())
        for m in self.spaces.get(space, []):
            if m != joiner and m in ready:
                return m
        return None

    def _point(self) -> Point:
        if self._trans is not None:
            return (self._trans_ring.rep, self._trans_ring.seq, -self._n)
        return (self.ring_id.rep, self.ring_id.seq, self._n)

    def _start_transfer(self, space: str, joiner: int) -> None:
        """At this point of the order ``joiner`` needs the state of ``space``."""
        provider = self._choose_provider(space, joiner, again=False)
        if provider is None and self._no_holder(space) and joiner not in self.ready[space]:
            provider = self._choose_provider(space, joiner, again=False)
        if provider is None:
            if joiner == self.me and joiner not in self.ready.get(space, ()):
                self._incoming[space] = _Incoming(None)          # wait for a member that has the state
            return
        if joiner == self.me:
            # Snapshots asked before this point (on another side of a merge) no longer count.
            incoming = self._incoming.setdefault(space, _Incoming(provider))
            incoming.provider = provider
            incoming.deadline = None
            incoming.cuts.clear()
            incoming.chunks.clear()
            self._expect(space, incoming, self._point(), len(incoming.buffer))
        elif provider == self.me:
            self._out.append(StateRequest(space, joiner, self._point()))

    def _no_holder(self, space: str) -> bool:
        """Nobody here holds the current state of ``space``.  The member whose application holds the
        most recent complete state of it (see :attr:`fallback`) becomes its holder; if none does,
        a primary configuration starts the space over.  False: nothing changed (wait)."""
        members = self.spaces[space]
        fallback = {m: epoch for m, epoch in self.fallback.get(space, {}).items() if m in members}
        if fallback:
            best = max(fallback, key=lambda m: (_recency(fallback[m]), -members.index(m)))
            del self.fallback[space][best]
            self.ready[space] = {best}
            self.epochs[space] = self.ring_id if self._in_primary() else fallback[best]
            if best == self.me:
                self._stop_fetching(space)
            else:
                incoming = self._incoming.get(space)
                if incoming is not None and incoming.provider is None:
                    self._ask(space, incoming)
            return True
        if self._in_primary():
            self._lose(space)
            return True
        return False

    def _stop_fetching(self, space: str) -> None:
        """This member keeps the state its application has (the one it had before its transfer)."""
        incoming = self._incoming.pop(space, None)
        if incoming is not None:
            # Messages since then were for the state being fetched; views and requests still count.
            self._out.extend(e for e in incoming.buffer if type(e) is not SpaceMessage)

    def _lose(self, space: str) -> None:
        """Nobody in this primary configuration has the state of ``space``: it starts over from
        nothing here, for every member of it."""
        had = self.ready.get(space, set())
        self.ready[space] = set(self.spaces[space])
        self.epochs[space] = self.ring_id
        incoming = self._incoming.pop(space, None)
        if incoming is not None or (self.me in self.spaces[space] and self.me not in had):
            self._finish(space, None, incoming.buffer if incoming is not None else [])

    def _state_req(self, sender: int, space: str) -> None:
        """``sender`` lost its provider: the next one snapshots here."""
        if sender in self.ready.get(space, set()) or sender not in self.spaces.get(space, []):
            return
        provider = self._choose_provider(space, sender, again=True)
        if provider is None and self._no_holder(space):
            if sender in self.ready[space]:
                return                                       # it had a state to fall back on, or none exists
            provider = self._choose_provider(space, sender, again=True)
        if provider is None:                                 # nobody here has the state: wait for one
            incoming = self._incoming.get(space) if sender == self.me else None
            if incoming is not None:
                incoming.provider = None
            return
        if sender == self.me:
            incoming = self._incoming.get(space)
            if incoming is not None:
                incoming.provider = provider
                self._expect(space, incoming, self._point(), len(incoming.buffer))
        elif provider == self.me:
            self._out.append(StateRequest(space, sender, self._point()))

    def _choose_provider(self, space: str, joiner: int, *, again: bool) -> int | None:
        """The provider for ``joiner`` (:meth:`_provider`); ``again``: not one asked before for this
        transfer, unless all were.  Every member computes the same: it only depends on the order."""
        key = (space, joiner)
        tried = self._tried.get(key, set()) if again else set()
        provider = self._untried_provider(space, joiner, tried)
        if provider is None and tried:                   # every one was asked: start over
            tried = set()
            provider = self._provider(space, joiner)
        if provider is None:
            self._tried.pop(key, None)
        else:
            self._tried[key] = tried | {provider}
        return provider

    def _untried_provider(self, space: str, joiner: int, tried: set[int]) -> int | None:
        """What :meth:`_provider` picks when the members in ``tried`` do not count as ready."""
        ready = self.ready.get(space)
        hidden = ready & tried if ready else set()
        if not hidden:
            return self._provider(space, joiner)
        ready -= hidden
        try:
            return self._provider(space, joiner)
        finally:
            ready |= hidden

    def _ask_again(self, space: str, incoming: _Incoming, *, drop: bool) -> None:
        """Ask for the snapshot again (everyone picks a provider not tried yet where the request is
        delivered).  ``drop``: give up the snapshots asked so far, and with them the buffered
        messages (the new snapshot covers them); until the request is delivered, none are kept."""
        self.transfers_retried += 1
        if drop:
            incoming.cuts.clear()
            incoming.chunks.clear()
            incoming.buffer = [e for e in incoming.buffer if type(e) is not SpaceMessage]
            incoming.held = sum(map(_payload_size, incoming.buffer))
        self._ask(space, incoming)

    def _check_providers(self) -> None:
        """A joiner whose provider is gone asks again (a ring message, so everyone agrees where)."""
        for space, incoming in self._incoming.items():
            provider = incoming.provider
            if provider is not None and provider != _ASKED and provider not in self.spaces.get(space, []):
                self._ask(space, incoming)

    def _ask(self, space: str, incoming: _Incoming) -> None:
        """Multicast a ``STATE_REQ``: where it is delivered, everyone picks a provider for this member."""
        incoming.provider = _ASKED
        incoming.deadline = None
        self._out.append(RingSend(encode(StateReqFrame(space)), False))

    def _install(self, space: str, incoming: _Incoming, point: Point) -> None:
        parts = incoming.chunks[point]
        state = None if parts == [None] else b"".join(parts)
        del self._incoming[space]
        self.ready.setdefault(space, set()).add(self.me)
        if self._sync is None and self._in_primary() and not self._incoming:
            self.last_primary_seq = self.ring_id.seq        # this member's state is the primary's again
        cut = incoming.cuts[point]
        # The snapshot covers the messages before the cut, not the views and
        # requests: those still reach the application, ahead of the state.
        self._out.extend(e for e in incoming.buffer[:cut] if type(e) is not SpaceMessage)
        self._finish(space, state, incoming.buffer[cut:])
        self._out.append(RingSend(encode(StateDoneFrame(space)), False))

    def _finish(self, space: str, state: bytes | None, later: list) -> None:
        self._out.append(StateInstalled(space, state))
        self._out.extend(later)

    # -- space events ------------------------------------------------------------------

    def _space_event(self, space: str, event, *, always: bool = False) -> None:
        if space not in self.mine and not always:
            return
        incoming = self._incoming.get(space)
        if incoming is None:
            self._out.append(event)
            return
        if not incoming.cuts and type(event) is SpaceMessage:
            return                                           # the snapshot we asked for will cover it
        incoming.buffer.append(event)
        incoming.held += _payload_size(event)
        config = self.config
        if incoming.cuts and (incoming.held > config.snapshot_buffer_bytes
                              or len(incoming.buffer) > config.snapshot_buffer_events):
            self._ask_again(space, incoming, drop=True)


def _payload_size(event) -> int:
    """Bytes an event buffered for a joiner holds (its payload)."""
    t = type(event)
    if t is SpaceMessage:
        return len(event.message.payload)
    if t is SpaceRequest:
        return len(event.payload)
    return 0


def _recency(epoch: RingId | None) -> tuple[int, int]:
    """Orders epochs: later primary configurations first (by ring seq); None is the oldest."""
    return (epoch.seq, epoch.rep) if epoch is not None else (-1, -1)


def _rank_components(origin: dict[int, tuple]) -> list[list[int]]:
    """The sides of a merge, best first: primary, then most recently primary, then lowest id.

    A side is the members whose last stable configuration is the same (so
    their space state is the same); a fresh member is a side of its own.
    """
    groups: dict[tuple, list[int]] = {}
    for member, (stable_ring, _, _) in origin.items():
        key = tuple(stable_ring) if tuple(stable_ring) != (0, 0) else ("fresh", member)
        groups.setdefault(key, []).append(member)
    def score(members: list[int]) -> tuple:
        was_primary = any(origin[m][1] for m in members)
        last = max(origin[m][2] for m in members)
        return (not was_primary, -last, min(members))
    return sorted((sorted(g) for g in groups.values()), key=score)
