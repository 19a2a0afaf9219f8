"""A group's desired state, replicated by ordered operations in a primary component (sans-IO).

Every group ``G`` is the space ``groupcomm.provisioning/G`` (:func:`group_space`).
Its desired state (:class:`GroupState`: which bundles at which version, started
or not, and the configuration key/values) changes only by operations
(:mod:`.ops`) multicast in that space.  Each member's :class:`GroupReplica` is
fed, in delivery order, the ring views, the space's views and messages, and
the space's state transfers, and decides about every operation where it is
delivered:

* **Accepted** when delivered in a *regular, primary* ring configuration (the
  ring :class:`~groupcomm.events.View`'s ``primary`` flag; anything delivered
  between a transitional view and its regular one is in the transitional
  configuration and never accepted): the revision goes up by one, the
  operation is applied, persisted and appended to the history.
* **Rejected** otherwise, with a reason: :data:`READ_ONLY` (a minority side of a
  partition is read-only and says so), :data:`DUPLICATE` (the ``op_id`` was
  accepted already: a retried proposal, applied once), :data:`WRONG_GROUP`, or
  what the state refuses (:class:`OpRefused`: e.g. uninstalling a bundle the
  group does not have).

Every member of the space delivers the same operations at the same points of
the total order with the same configuration and the same state, so every
member makes the same decision.  Malformed payloads are counted
(:attr:`GroupReplica.dropped`) and ignored, identically everywhere.

Nothing is merged: only a primary component writes.  A node that was offline
or on the minority side gets the primary side's state (and history) through
the space's state transfer when it joins or after the merge
(:mod:`groupcomm.layers.spaces`: the most recent primary side's state wins), so
an uninstall made while it was away is simply in what it receives.  The first
member of a space keeps the state it loaded from its store (a node starting
alone resumes where it stopped; see :class:`GroupReplica` for the cold-start
caveat); a transfer of ``None`` (no member of a primary configuration had any
state) starts the group over from the empty state at revision 0.

Bounds: :data:`RECENT_OP_IDS` op_ids are remembered for duplicates (part of the
replicated state, so every member answers a retry alike; a retry is recognised
while fewer than that many operations were accepted since the original); the
history keeps the last ``history_limit`` accepted operations
(:data:`DEFAULT_HISTORY`), in memory and in the store; a group holds at most
:data:`MAX_BUNDLES` bundles and :data:`MAX_CONFIG_KEYS` configuration keys.

Persistence: :class:`SqliteGroupStore` (one SQLite file per node, WAL,
``synchronous=FULL``): the snapshot of each group and its history, written in
one transaction per accepted operation or installed state.
:class:`MemoryGroupStore` is the same in memory (tests, the simulator).
"""

from __future__ import annotations

import sqlite3
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Protocol, Self

import msgspec

from groupcomm.errors import GroupcommError
from groupcomm.events import View
from groupcomm.layers.spaces import SpaceView
from groupcomm.services.provisioning.ops import (
    BundleName,
    ConfigKey,
    ConfigValue,
    DeleteConfig,
    Digest,
    FileName,
    GroupName,
    InstallBundle,
    MalformedOp,
    Op,
    OpId,
    Pid,
    SetConfig,
    Size,
    StartBundle,
    StopBundle,
    UninstallBundle,
    Version,
    decode_op,
    encode_op,
)

__all__ = [
    "DEFAULT_HISTORY",
    "DUPLICATE",
    "READ_ONLY",
    "RECENT_OP_IDS",
    "SPACE_PREFIX",
    "WRONG_GROUP",
    "Accepted",
    "BundleDesired",
    "GroupReplica",
    "GroupState",
    "GroupStore",
    "HistoryEntry",
    "MemoryGroupStore",
    "OpRefused",
    "Rejected",
    "ReplicaOutput",
    "SqliteGroupStore",
    "StateChanged",
    "StateCorrupt",
    "group_space",
]

SPACE_PREFIX = "groupcomm.provisioning/"
RECENT_OP_IDS = 4096
"""How many accepted op_ids a group remembers to recognise a retried operation."""
DEFAULT_HISTORY = 1000
"""How many accepted operations a replica keeps (memory and store) for the audit log."""
MAX_BUNDLES = 1000
MAX_CONFIG_KEYS = 10_000
"""Configuration keys of a group, all PIDs together."""

READ_ONLY = "read-only: this side of the partition is not primary"
DUPLICATE = "duplicate: this operation was accepted already"
WRONG_GROUP = "wrong group: the operation names another group"


def group_space(group: str) -> str:
    """The space of group ``group``."""
    return SPACE_PREFIX + group


class OpRefused(GroupcommError):
    """The state refuses an operation (the message is the reason, as every member gives it)."""


class StateCorrupt(GroupcommError):
    """A snapshot or stored state that does not decode or violates its bounds."""


# --------------------------------------------------------------------------- the value


class BundleDesired(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """A bundle the group wants installed: which file, and whether it should run."""

    version: Version
    digest: Digest
    size: Size
    filename: FileName
    started: bool = False


class GroupState(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """One group's desired state, a pure value: :meth:`apply` returns a new one.

    ``recent``: the last :data:`RECENT_OP_IDS` accepted op_ids, oldest first."""

    group: GroupName
    revision: Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)] = 0
    bundles: Annotated[dict[BundleName, BundleDesired], msgspec.Meta(max_length=MAX_BUNDLES)] = {}
    configs: dict[Pid, dict[ConfigKey, ConfigValue]] = {}
    recent: Annotated[tuple[OpId, ...], msgspec.Meta(max_length=RECENT_OP_IDS)] = ()

    def has_applied(self, op_id: str) -> bool:
        """Whether ``op_id`` is among the recently accepted operations."""
        return op_id in self.recent

    def check(self, op: Op) -> None:
        """Raise :class:`OpRefused` if :meth:`apply` would refuse ``op`` (duplicates are not refused)."""
        body = op.body
        if body.group != self.group:
            raise OpRefused(WRONG_GROUP)
        t = type(body)
        if t is InstallBundle:
            if body.name not in self.bundles and len(self.bundles) >= MAX_BUNDLES:
                raise OpRefused(f"group {self.group!r} already has {MAX_BUNDLES} bundles")
        elif t is UninstallBundle or t is StartBundle or t is StopBundle:
            if body.name not in self.bundles:
                raise OpRefused(f"no bundle {body.name!r} in group {self.group!r}")
        elif t is SetConfig:
            if (body.key not in self.configs.get(body.pid, {})
                    and sum(map(len, self.configs.values())) >= MAX_CONFIG_KEYS):
                raise OpRefused(f"group {self.group!r} already has {MAX_CONFIG_KEYS} configuration keys")
        elif t is DeleteConfig and body.key not in self.configs.get(body.pid, {}):
            raise OpRefused(f"no configuration key {body.key!r} in {body.pid!r} of group {self.group!r}")

    def apply(self, op: Op) -> GroupState:
        """The state after ``op``: revision + 1 and the change (``self`` again for a duplicate op_id).

        Raises :class:`OpRefused` (nothing changed) for what :meth:`check` refuses.
        Installing a bundle the group has replaces its file and keeps whether it is started."""
        if self.has_applied(op.op_id):
            return self
        self.check(op)
        body = op.body
        bundles, configs = self.bundles, self.configs
        t = type(body)
        if t is InstallBundle:
            old = bundles.get(body.name)
            bundles = {**bundles, body.name: BundleDesired(body.version, body.digest, body.size, body.filename,
                                                           old.started if old is not None else False)}
        elif t is UninstallBundle:
            bundles = {k: v for k, v in bundles.items() if k != body.name}
        elif t is StartBundle or t is StopBundle:
            bundles = {**bundles, body.name: msgspec.structs.replace(bundles[body.name],
                                                                     started=t is StartBundle)}
        elif t is SetConfig:
            configs = {**configs, body.pid: {**configs.get(body.pid, {}), body.key: body.value}}
        else:                                                   # DeleteConfig
            keys = {k: v for k, v in configs[body.pid].items() if k != body.key}
            configs = {p: v for p, v in configs.items() if p != body.pid}
            if keys:
                configs[body.pid] = keys
        recent = (self.recent + (op.op_id,))[-RECENT_OP_IDS:]
        return GroupState(self.group, self.revision + 1, bundles, configs, recent)

    def snapshot(self) -> bytes:
        """This state as bytes (msgpack)."""
        return _encoder.encode(self)

    @staticmethod
    def restore(data: bytes) -> GroupState:
        """The state in ``data`` (from :meth:`snapshot`); :class:`StateCorrupt` if it is not valid."""
        try:
            return _state_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise StateCorrupt(f"group state: {exc}") from None


class HistoryEntry(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """An accepted operation and the revision it made."""

    revision: int
    op: Op


class _Transfer(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """What a state transfer carries: the state and the history tail."""

    state: GroupState
    history: list[HistoryEntry]


_encoder = msgspec.msgpack.Encoder()
_state_decoder = msgspec.msgpack.Decoder(GroupState)
_transfer_decoder = msgspec.msgpack.Decoder(_Transfer)


# --------------------------------------------------------------------------- stores


class GroupStore(Protocol):
    """Where a replica keeps its group's state and history (the node's own copy)."""

    def load(self, group: str) -> tuple[GroupState, list[HistoryEntry]]:
        """The stored state and history of ``group`` (the empty state at revision 0 if none)."""

    def save(self, group: str, state: GroupState, new_history: Sequence[HistoryEntry]) -> None:
        """Store ``state`` and append ``new_history``, atomically."""

    def replace(self, group: str, state: GroupState, history: Sequence[HistoryEntry]) -> None:
        """Store ``state`` with exactly ``history`` (after a state transfer), atomically."""


class MemoryGroupStore:
    """A :class:`GroupStore` in memory (tests, the simulator); keeps the last ``history_limit`` rows."""

    def __init__(self, history_limit: int = DEFAULT_HISTORY) -> None:
        self.history_limit = history_limit
        self._groups: dict[str, tuple[GroupState, list[HistoryEntry]]] = {}

    def load(self, group: str) -> tuple[GroupState, list[HistoryEntry]]:
        state, history = self._groups.get(group, (GroupState(group), []))
        return state, list(history)

    def save(self, group: str, state: GroupState, new_history: Sequence[HistoryEntry]) -> None:
        _, history = self._groups.get(group, (None, []))
        self._groups[group] = (state, (history + list(new_history))[-self.history_limit:])

    def replace(self, group: str, state: GroupState, history: Sequence[HistoryEntry]) -> None:
        self._groups[group] = (state, list(history)[-self.history_limit:])


_SCHEMA = """
CREATE TABLE IF NOT EXISTS group_state (
    grp TEXT PRIMARY KEY,
    revision INTEGER NOT NULL,
    state BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS group_history (
    grp TEXT NOT NULL,
    revision INTEGER NOT NULL,
    op BLOB NOT NULL,
    PRIMARY KEY (grp, revision)
);
"""


class SqliteGroupStore:
    """A :class:`GroupStore` in one SQLite file (WAL, ``synchronous=FULL``: a returned save survives a crash).

    Tables: ``group_state(grp, revision, state)`` (the :meth:`GroupState.snapshot`)
    and ``group_history(grp, revision, op)`` (encoded :class:`~.ops.Op`; the last
    ``history_limit`` per group).  Use from one thread."""

    def __init__(self, path: str | Path, history_limit: int = DEFAULT_HISTORY) -> None:
        self.path = Path(path)
        self.history_limit = history_limit
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def groups(self) -> list[str]:
        """The groups with a stored state."""
        return [row[0] for row in self._db.execute("SELECT grp FROM group_state ORDER BY grp")]

    def load(self, group: str) -> tuple[GroupState, list[HistoryEntry]]:
        row = self._db.execute("SELECT state FROM group_state WHERE grp = ?", (group,)).fetchone()
        if row is None:
            return GroupState(group), []
        state = GroupState.restore(bytes(row[0]))
        if state.group != group:
            raise StateCorrupt(f"the stored state of group {group!r} names group {state.group!r}")
        history = []
        for revision, data in self._db.execute(
                "SELECT revision, op FROM group_history WHERE grp = ? ORDER BY revision", (group,)):
            try:
                history.append(HistoryEntry(revision, decode_op(bytes(data))))
            except MalformedOp as exc:
                raise StateCorrupt(f"group {group!r} history revision {revision}: {exc}") from None
        return state, history

    def save(self, group: str, state: GroupState, new_history: Sequence[HistoryEntry]) -> None:
        self._write(group, state, new_history, replace=False)

    def replace(self, group: str, state: GroupState, history: Sequence[HistoryEntry]) -> None:
        self._write(group, state, history, replace=True)

    def _write(self, group: str, state: GroupState, rows: Iterable[HistoryEntry], *, replace: bool) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("INSERT OR REPLACE INTO group_state (grp, revision, state) VALUES (?, ?, ?)",
                       (group, state.revision, state.snapshot()))
            if replace:
                db.execute("DELETE FROM group_history WHERE grp = ?", (group,))
            db.executemany("INSERT OR REPLACE INTO group_history (grp, revision, op) VALUES (?, ?, ?)",
                           [(group, e.revision, encode_op(e.op)) for e in rows])
            db.execute("DELETE FROM group_history WHERE grp = ? AND revision NOT IN "
                       "(SELECT revision FROM group_history WHERE grp = ? ORDER BY revision DESC LIMIT ?)",
                       (group, group, self.history_limit))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


# --------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class Accepted:
    """``op`` was accepted here and made ``revision``."""

    op: Op
    revision: int


@dataclass(frozen=True)
class Rejected:
    """The operation ``op_id`` was not applied, for ``reason`` (the same at every member)."""

    op_id: str
    reason: str


@dataclass(frozen=True)
class StateChanged:
    """The desired state is now ``state`` (after an accepted operation or a state transfer)."""

    state: GroupState


ReplicaOutput = Accepted | Rejected | StateChanged


# --------------------------------------------------------------------------- the replica


class GroupReplica:
    """One node's replica of one group's desired state; feed it what the group delivers, in order.

    ``store``: where the state is loaded from at construction and saved to before
    an output reports a change.  Driver's duties: join :attr:`space`; pass every
    ring :class:`~groupcomm.events.View` to :meth:`ring_view`, the space's views
    to :meth:`space_view` and messages to :meth:`message`; answer the space's
    state requests with :meth:`state_request` and hand a received state to
    :meth:`install_state`; multicast what :meth:`propose` returns in the space.

    Cold start: the first member of the space keeps the state it loaded, and
    every later joiner receives that one, even if a node that joins later has a
    newer copy in its store -- start the node that stopped last first, or let
    the members compare :attr:`revision` before joining.
    """

    def __init__(self, group: str, store: GroupStore, *, history_limit: int = DEFAULT_HISTORY) -> None:
        if history_limit < 1:
            raise ValueError("history_limit must be >= 1")
        self.group = group
        self.space = group_space(group)
        self._store = store
        state, history = store.load(group)
        self._state = state
        self._history: deque[HistoryEntry] = deque(history, maxlen=history_limit)
        self._primary = False
        self._transitional = False
        self.members: tuple[int, ...] = ()
        """The space's members (oldest first), from its last view."""
        self.dropped = 0
        """Malformed operations received (counted and ignored)."""

    @property
    def state(self) -> GroupState:
        return self._state

    @property
    def revision(self) -> int:
        return self._state.revision

    @property
    def history(self) -> list[HistoryEntry]:
        """The last accepted operations, oldest first."""
        return list(self._history)

    @property
    def writable(self) -> bool:
        """Whether an operation delivered now would be accepted (a regular primary configuration)."""
        return self._primary and not self._transitional

    @property
    def read_only_reason(self) -> str | None:
        """Why this side refuses writes now (None: it accepts them)."""
        return None if self.writable else READ_ONLY

    # ------------------------------------------------------------------ inputs in total order

    def ring_view(self, view: View) -> list[ReplicaOutput]:
        """A ring configuration (transitional or regular)."""
        if view.transitional:
            self._transitional = True
        else:
            self._transitional = False
            self._primary = bool(view.primary)
        return []

    def space_view(self, view: SpaceView) -> list[ReplicaOutput]:
        """A view of a space (only this group's space matters)."""
        if view.space == self.space:
            self.members = tuple(view.members)
        return []

    def message(self, sender: int, payload: bytes) -> list[ReplicaOutput]:
        """An operation multicast in the space by ``sender``: accept or reject it here."""
        try:
            op = decode_op(payload)
        except MalformedOp:
            self.dropped += 1
            return []
        if not self.writable:
            return [Rejected(op.op_id, READ_ONLY)]
        if self._state.has_applied(op.op_id):
            return [Rejected(op.op_id, DUPLICATE)]
        try:
            state = self._state.apply(op)
        except OpRefused as exc:
            return [Rejected(op.op_id, str(exc))]
        entry = HistoryEntry(state.revision, op)
        self._store.save(self.group, state, [entry])
        self._state = state
        self._history.append(entry)
        return [Accepted(op, state.revision), StateChanged(state)]

    # ------------------------------------------------------------------ state transfer

    def state_request(self) -> bytes:
        """The snapshot a joiner of the space gets (state and history), taken now."""
        return _encoder.encode(_Transfer(self._state, list(self._history)))

    def install_state(self, data: bytes | None) -> list[ReplicaOutput]:
        """Replace the state with a transferred one (None: the group starts over, empty, at revision 0).

        Raises :class:`StateCorrupt` if ``data`` does not decode (the provider is a
        member running this code: that is a bug, not a network error)."""
        if data is None:
            transfer = _Transfer(GroupState(self.group), [])
        else:
            try:
                transfer = _transfer_decoder.decode(data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise StateCorrupt(f"state transfer of group {self.group!r}: {exc}") from None
            if transfer.state.group != self.group:
                raise StateCorrupt(f"state transfer for group {self.group!r} carries group "
                                   f"{transfer.state.group!r}")
        history = transfer.history[-(self._history.maxlen or 1):]
        self._store.replace(self.group, transfer.state, history)
        self._state = transfer.state
        self._history.clear()
        self._history.extend(history)
        return [StateChanged(transfer.state)]

    # ------------------------------------------------------------------ local

    def propose(self, op: Op) -> bytes:
        """The payload to multicast in :attr:`space` for ``op`` (its answer comes with its delivery).

        Raises :class:`OpRefused` for an operation on another group and
        :class:`~.ops.MalformedOp` for an invalid one; a read-only side still
        multicasts (every member rejects it alike)."""
        if op.body.group != self.group:
            raise OpRefused(WRONG_GROUP)
        return encode_op(op)
