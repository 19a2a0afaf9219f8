"""A group's desired state, replicated by ordered operations in a primary component (sans-IO).

Every group ``G`` is the space ``groupcomm.provisioning/G`` (:func:`group_space`).
Its desired state (:class:`GroupState`: which bundles at which version, started
or not, the configuration key/values, and the keys bundles must be signed by)
changes only by operations (:mod:`.ops`) multicast in that space.  Each
member's :class:`GroupReplica` is fed, in delivery order, the ring views, the
space's views and messages, and the space's state transfers, and decides about
every operation where it is delivered:

* **Accepted** when delivered in a *regular, primary* ring configuration (the
  ring :class:`~groupcomm.events.View`'s ``primary`` flag; anything delivered
  between a transitional view and its regular one is in the transitional
  configuration and never accepted): the revision goes up by one, the
  operation is applied, persisted and appended to the history.
* **Rejected** otherwise, with a reason: :data:`READ_ONLY` (a minority side of a
  partition is read-only and says so), :data:`DUPLICATE` (the ``op_id`` was
  accepted already: a retried proposal, applied once), :data:`WRONG_GROUP`, or
  what the state refuses (:class:`OpRefused`: e.g. uninstalling a bundle the
  group does not have, a bundle no trusted key signed, a plan operation).

Every member of the space delivers the same operations at the same points of
the total order with the same configuration and the same state, so every
member makes the same decision.  Malformed payloads are counted
(:attr:`GroupReplica.dropped`) and ignored, identically everywhere.

Signatures: once a ``SetGroupPolicy`` with trusted keys is accepted, the group
refuses every ``InstallBundle`` whose ``signature`` no trusted key verifies
over :func:`.signing.signed_message_for` (name, version, digest).  The check is
part of the replicated decision, so every member refuses alike before anything
is installed.  A policy does not touch the bundles the group already has
(uninstall them, or install signed versions over them); an empty key list
lifts the requirement.

Nothing is merged: only a primary component writes.  A node that was offline
or on the minority side gets the primary side's state (and history) through
the space's state transfer when it joins or after the merge
(:mod:`groupcomm.layers.spaces`: the most recent primary side's state wins), so
an uninstall made while it was away is simply in what it receives.  The first
member of a space keeps the state it loaded from its store (a node starting
alone resumes where it stopped); a transfer of ``None`` (no member of a primary
configuration had any state) starts the group over from the empty state at
revision 0.

Cold start (every node restarted): the first node to join the space may have
an older store than a later joiner.  A joiner whose own state has a higher
revision than the one it receives installs the received one anyway (it must be
identical to the others at that point of the order) and offers its own with an
``AdoptState`` operation (the :class:`Adopt` output, which the driver
multicasts in the space).  It is accepted like any operation, in a regular
primary configuration, if its revision is higher than the group's then; the
group's state becomes the offered one.  Revisions only grow, by one per
accepted operation, along the one line of primary components (a primary
component starts from the state of the previous one, by transfer), so the
highest revision stored anywhere is the latest state.  Operations accepted
between the restart and the adoption, on the older line, are replaced by the
adopted state if it is still newer (and the adoption is refused, keeping
them, otherwise): offer early, i.e. multicast :class:`Adopt` at once.

Bounds: :data:`RECENT_OP_IDS` op_ids are remembered for duplicates (part of the
replicated state, so every member answers a retry alike; a retry is recognised
while fewer than that many operations were accepted since the original); the
history keeps the last ``history_limit`` accepted operations
(:data:`DEFAULT_HISTORY`), in memory and in the store (an accepted adoption is
recorded without the snapshot it carried); a group holds at most
:data:`MAX_BUNDLES` bundles, :data:`MAX_CONFIG_KEYS` configuration keys and
:data:`MAX_CONFIG_BYTES` of configuration.  A group at all its bounds at once
(long op_ids, names and versions) has a snapshot larger than
:data:`~.ops.MAX_STATE_BYTES`, so it cannot be offered by ``AdoptState``: the
replica then logs why and offers nothing (the group keeps the older state, as
before the cold-start fix).  Real groups are far below that (1000 bundles with
ordinary names and 4096 op_ids like ``node-12:1234567``: about 190 KiB; at
every bound at once: about 1.5 MiB).

Generic: :class:`GroupReplica` replicates any :class:`ReplicatedState` (its
``state_type``), so the cluster's deployment-plan record (:mod:`.rollout`)
is replicated by the same code in its own space.

Persistence: :class:`SqliteGroupStore` (one SQLite file per node, WAL,
``synchronous=FULL``): the snapshot of each group (or other replicated record)
and its history, written in one transaction per accepted operation or
installed state.  :class:`MemoryGroupStore` is the same in memory (tests, the
simulator).
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Protocol, Self

import msgspec

from groupcomm.errors import GroupcommError
from groupcomm.events import View
from groupcomm.layers.spaces import SpaceView
from groupcomm.services.provisioning.ops import (
    MAX_STATE_BYTES,
    MAX_TRUSTED_KEYS,
    AdoptState,
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
    RawPublicKey,
    SetConfig,
    SetGroupPolicy,
    Size,
    StartBundle,
    StopBundle,
    UninstallBundle,
    Version,
    decode_op,
    encode_op,
)
from groupcomm.services.provisioning.signing import signed_message_for, verify_raw

__all__ = [
    "DEFAULT_HISTORY",
    "DUPLICATE",
    "MAX_BUNDLES",
    "MAX_CONFIG_BYTES",
    "MAX_CONFIG_KEYS",
    "MERGING",
    "READ_ONLY",
    "RECENT_OP_IDS",
    "SPACE_PREFIX",
    "WRONG_GROUP",
    "Accepted",
    "Adopt",
    "BundleDesired",
    "GroupReplica",
    "GroupState",
    "GroupStore",
    "HistoryEntry",
    "MemoryGroupStore",
    "OpRefused",
    "Rejected",
    "ReplicaOutput",
    "ReplicatedState",
    "SqliteGroupStore",
    "StateChanged",
    "StateCorrupt",
    "adopt_state",
    "group_space",
]

_log = logging.getLogger("groupcomm.provisioning")

SPACE_PREFIX = "groupcomm.provisioning/"
RECENT_OP_IDS = 4096
"""How many accepted op_ids a group remembers to recognise a retried operation."""
DEFAULT_HISTORY = 1000
"""How many accepted operations a replica keeps (memory and store) for the audit log."""
MAX_BUNDLES = 1000
MAX_CONFIG_KEYS = 10_000
"""Configuration keys of a group, all PIDs together."""
MAX_CONFIG_BYTES = 256 * 1024
"""Configuration of a group, all PIDs together: the sum of len(pid) + len(key) + UTF-8 len(value)."""

READ_ONLY = "read-only: this side of the partition is not primary"
DUPLICATE = "duplicate: this operation was accepted already"
MERGING = "merging: the sides of a partition are being joined; retry"
STARTING = "starting: the stored states of the members that started the group together are being compared"
WRONG_GROUP = "wrong group: the operation names another group"

_GROUP_BODIES = (InstallBundle, UninstallBundle, StartBundle, StopBundle, SetConfig, DeleteConfig,
                 SetGroupPolicy, AdoptState)


def group_space(group: str) -> str:
    """The space of group ``group``."""
    return SPACE_PREFIX + group


class OpRefused(GroupcommError):
    """The state refuses an operation (the message is the reason, as every member gives it)."""


class StateCorrupt(GroupcommError):
    """A snapshot or stored state that does not decode or violates its bounds."""


class ReplicatedState(Protocol):
    """A value :class:`GroupReplica` replicates (:class:`GroupState`; the plans record).

    A pure value: :meth:`apply` returns a new one.  ``state_type(name)`` is the
    empty state of ``name`` at revision 0; :attr:`revision` goes up by one per
    applied operation; :attr:`recent` holds the recently applied op_ids (part of
    the value, so every member recognises a retry alike).  ``AdoptState``
    operations never reach :meth:`apply`: the replica handles them
    (:func:`adopt_state`)."""

    @property
    def group(self) -> str: ...

    @property
    def revision(self) -> int: ...

    @property
    def recent(self) -> tuple[str, ...]: ...

    def has_applied(self, op_id: str) -> bool:
        """Whether ``op_id`` is among the recently applied operations."""

    def check(self, op: Op) -> None:
        """Raise :class:`OpRefused` if :meth:`apply` would refuse ``op``."""

    def apply(self, op: Op) -> ReplicatedState:
        """The state after ``op`` (``self`` for a recent op_id); :class:`OpRefused` if refused."""

    def snapshot(self) -> bytes:
        """This state as bytes."""

    @staticmethod
    def restore(data: bytes) -> ReplicatedState:
        """The state in ``data`` (from :meth:`snapshot`); :class:`StateCorrupt` if it is not valid."""


def adopt_state(current: ReplicatedState, body: AdoptState, state_type: type) -> ReplicatedState:
    """The state an ``AdoptState`` turns ``current`` into: the offered snapshot, decoded with
    ``state_type.restore``, if it names the same group and its revision is higher.

    Raises :class:`OpRefused` otherwise (also for a snapshot that does not decode)."""
    try:
        offered = state_type.restore(body.state)
    except StateCorrupt as exc:
        raise OpRefused(f"adopt: the offered state does not decode: {exc}") from None
    if offered.group != current.group:
        raise OpRefused(f"adopt: the offered state is of {offered.group!r}, not {current.group!r}")
    if offered.revision <= current.revision:
        raise OpRefused(f"adopt: the offered revision {offered.revision} is not newer than "
                        f"revision {current.revision} of {current.group!r}")
    return offered


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

    ``recent``: the last :data:`RECENT_OP_IDS` accepted op_ids, oldest first.
    ``trusted_keys``: raw Ed25519 keys (set by ``SetGroupPolicy``); while any,
    only bundles signed by one of them are accepted.  (It is the last field:
    snapshots from before it decode, with no keys.)"""

    group: GroupName
    revision: Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)] = 0
    bundles: Annotated[dict[BundleName, BundleDesired], msgspec.Meta(max_length=MAX_BUNDLES)] = {}
    configs: dict[Pid, dict[ConfigKey, ConfigValue]] = {}
    recent: Annotated[tuple[OpId, ...], msgspec.Meta(max_length=RECENT_OP_IDS)] = ()
    trusted_keys: Annotated[tuple[RawPublicKey, ...], msgspec.Meta(max_length=MAX_TRUSTED_KEYS)] = ()

    def has_applied(self, op_id: str) -> bool:
        """Whether ``op_id`` is among the recently accepted operations."""
        return op_id in self.recent

    @property
    def config_bytes(self) -> int:
        """The size of the configuration as :data:`MAX_CONFIG_BYTES` counts it."""
        return sum(_entry_bytes(pid, key, value)
                   for pid, keys in self.configs.items() for key, value in keys.items())

    def check(self, op: Op) -> None:
        """Raise :class:`OpRefused` if :meth:`apply` would refuse ``op`` (duplicates are not refused)."""
        body = op.body
        t = type(body)
        if t not in _GROUP_BODIES:
            raise OpRefused(f"not a group operation: {body.__struct_config__.tag}")
        if body.group != self.group:
            raise OpRefused(WRONG_GROUP)
        if t is InstallBundle:
            if body.name not in self.bundles and len(self.bundles) >= MAX_BUNDLES:
                raise OpRefused(f"group {self.group!r} already has {MAX_BUNDLES} bundles")
            self._check_signature(body)
        elif t is UninstallBundle or t is StartBundle or t is StopBundle:
            if body.name not in self.bundles:
                raise OpRefused(f"no bundle {body.name!r} in group {self.group!r}")
        elif t is SetConfig:
            self._check_config_bounds(body)
        elif t is DeleteConfig:
            if body.key not in self.configs.get(body.pid, {}):
                raise OpRefused(f"no configuration key {body.key!r} in {body.pid!r} of group {self.group!r}")
        elif t is AdoptState:
            adopt_state(self, body, GroupState)
        # SetGroupPolicy: any key list is accepted (the schema bounds it)

    def _check_signature(self, body: InstallBundle) -> None:
        if not self.trusted_keys:
            return
        message = signed_message_for(body.name, body.version, body.digest)
        if verify_raw(message, body.signature, self.trusted_keys) is None:
            what = "is not signed" if not body.signature else "has a signature no trusted key verifies"
            raise OpRefused(f"bundle {body.name} {body.version} (sha256 {body.digest[:12]}) {what}: "
                            f"group {self.group!r} accepts only bundles signed by one of its "
                            f"{len(self.trusted_keys)} trusted keys")

    def _check_config_bounds(self, body: SetConfig) -> None:
        old = self.configs.get(body.pid, {}).get(body.key)
        if old is None and sum(map(len, self.configs.values())) >= MAX_CONFIG_KEYS:
            raise OpRefused(f"group {self.group!r} already has {MAX_CONFIG_KEYS} configuration keys")
        grows = _entry_bytes(body.pid, body.key, body.value) - (
            0 if old is None else _entry_bytes(body.pid, body.key, old))
        # a state over the bound (stored before it existed) may still shrink
        if grows > 0 and self.config_bytes + grows > MAX_CONFIG_BYTES:
            raise OpRefused(f"configuration of group {self.group!r} would exceed {MAX_CONFIG_BYTES} bytes "
                            f"(pid + key + value, all keys together)")

    def apply(self, op: Op) -> GroupState:
        """The state after ``op``: revision + 1 and the change (``self`` again for a duplicate op_id).

        Raises :class:`OpRefused` (nothing changed) for what :meth:`check` refuses.
        Installing a bundle the group has replaces its file and keeps whether it is started.
        ``AdoptState`` gives the offered state itself (:func:`adopt_state`: its own revision)."""
        if self.has_applied(op.op_id):
            return self
        body = op.body
        t = type(body)
        if t is AdoptState and body.group == self.group:
            return adopt_state(self, body, GroupState)
        self.check(op)
        bundles, configs, trusted_keys = self.bundles, self.configs, self.trusted_keys
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
        elif t is DeleteConfig:
            keys = {k: v for k, v in configs[body.pid].items() if k != body.key}
            configs = {p: v for p, v in configs.items() if p != body.pid}
            if keys:
                configs[body.pid] = keys
        elif t is SetGroupPolicy:
            trusted_keys = tuple(dict.fromkeys(body.trusted_keys))
        else:                               # check() let through a body this method does not know
            raise AssertionError(f"GroupState.apply: unhandled {t.__name__}")
        recent = (self.recent + (op.op_id,))[-RECENT_OP_IDS:]
        return GroupState(self.group, self.revision + 1, bundles, configs, recent, trusted_keys)

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


def _entry_bytes(pid: str, key: str, value: str) -> int:
    return len(pid) + len(key) + len(value.encode())


class HistoryEntry(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """An accepted operation and the revision it made (an ``AdoptState`` without its snapshot)."""

    revision: int
    op: Op


class _Transfer(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """What a state transfer carries: the state's snapshot and the history tail."""

    state: bytes
    history: list[HistoryEntry]
    founders: tuple[int, ...] = ()
    """Founders whose stored state has not been delivered yet (see :class:`GroupReplica`)."""


_encoder = msgspec.msgpack.Encoder()
_state_decoder = msgspec.msgpack.Decoder(GroupState)
_transfer_decoder = msgspec.msgpack.Decoder(_Transfer)


# --------------------------------------------------------------------------- stores


class GroupStore(Protocol):
    """Where a replica keeps its group's state and history (the node's own copy).

    ``state_type`` (a :class:`ReplicatedState` class) decodes what is stored and
    makes the empty state."""

    def load(self, group: str, state_type: type = GroupState) -> tuple[ReplicatedState, list[HistoryEntry]]:
        """The stored state and history of ``group`` (the empty state at revision 0 if none)."""

    def save(self, group: str, state: ReplicatedState, new_history: Sequence[HistoryEntry]) -> None:
        """Store ``state`` and append ``new_history``, atomically."""

    def replace(self, group: str, state: ReplicatedState, history: Sequence[HistoryEntry]) -> None:
        """Store ``state`` with exactly ``history`` (after a state transfer), atomically."""


class MemoryGroupStore:
    """A :class:`GroupStore` in memory (tests, the simulator); keeps the last ``history_limit`` rows."""

    def __init__(self, history_limit: int = DEFAULT_HISTORY) -> None:
        self.history_limit = history_limit
        self._groups: dict[str, tuple[ReplicatedState, list[HistoryEntry]]] = {}

    def load(self, group: str, state_type: type = GroupState) -> tuple[ReplicatedState, list[HistoryEntry]]:
        if group not in self._groups:
            return state_type(group), []
        state, history = self._groups[group]
        if not isinstance(state, state_type):
            raise StateCorrupt(f"the stored state of {group!r} is a {type(state).__name__}, "
                               f"not a {state_type.__name__}")
        return state, list(history)

    def save(self, group: str, state: ReplicatedState, new_history: Sequence[HistoryEntry]) -> None:
        _, history = self._groups.get(group, (None, []))
        self._groups[group] = (state, (history + list(new_history))[-self.history_limit:])

    def replace(self, group: str, state: ReplicatedState, history: Sequence[HistoryEntry]) -> None:
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

    Tables: ``group_state(grp, revision, state)`` (the state's ``snapshot()``)
    and ``group_history(grp, revision, op)`` (encoded :class:`~.ops.Op`; the last
    ``history_limit`` per group).  ``grp`` is the replicated record's name: a
    group, or ``@plans`` for the deployment-plan record.  Use from one thread."""

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
        """The records with a stored state (groups, and ``@plans`` if stored here)."""
        return [row[0] for row in self._db.execute("SELECT grp FROM group_state ORDER BY grp")]

    def load(self, group: str, state_type: type = GroupState) -> tuple[ReplicatedState, list[HistoryEntry]]:
        row = self._db.execute("SELECT state FROM group_state WHERE grp = ?", (group,)).fetchone()
        if row is None:
            return state_type(group), []
        state = state_type.restore(bytes(row[0]))
        if state.group != group:
            raise StateCorrupt(f"the stored state of {group!r} names {state.group!r}")
        history = []
        for revision, data in self._db.execute(
                "SELECT revision, op FROM group_history WHERE grp = ? ORDER BY revision", (group,)):
            try:
                history.append(HistoryEntry(revision, decode_op(bytes(data))))
            except MalformedOp as exc:
                raise StateCorrupt(f"{group!r} history revision {revision}: {exc}") from None
        return state, history

    def save(self, group: str, state: ReplicatedState, new_history: Sequence[HistoryEntry]) -> None:
        self._write(group, state, new_history, replace=False)

    def replace(self, group: str, state: ReplicatedState, history: Sequence[HistoryEntry]) -> None:
        self._write(group, state, history, replace=True)

    def _write(self, group: str, state: ReplicatedState, rows: Iterable[HistoryEntry], *, replace: bool) -> None:
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
    """``op`` was accepted here and made ``revision`` (an ``AdoptState`` comes without its snapshot)."""

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

    state: ReplicatedState


@dataclass(frozen=True)
class Adopt:
    """Multicast ``payload`` in the replica's space: an encoded ``AdoptState`` operation (``op_id``)
    offering this node's stored state at ``revision``, newer than the one it just received."""

    payload: bytes
    op_id: str
    revision: int


ReplicaOutput = Accepted | Rejected | StateChanged | Adopt


# --------------------------------------------------------------------------- the replica


class GroupReplica:
    """One node's replica of one group's desired state; feed it what the group delivers, in order.

    ``store``: where the state is loaded from at construction and saved to before
    an output reports a change.  Driver's duties: join :attr:`space`; pass every
    ring :class:`~groupcomm.events.View` to :meth:`ring_view`, the space's views
    to :meth:`space_view` and messages to :meth:`message`; answer the space's
    state requests with :meth:`state_request` and hand a received state to
    :meth:`install_state`; multicast in the space what :meth:`propose` returns
    and the payload of every :class:`Adopt` output.

    ``state_type``: the :class:`ReplicatedState` replicated (:class:`GroupState`;
    the plans record passes its own, with ``space``: default
    :func:`group_space` of ``group``).  ``node``: this node's name, for the op_ids
    of the ``AdoptState`` operations it proposes; ``clock``: their ``Op.at``
    (wall-clock seconds, for people; default 0.0).

    Cold start: a joiner whose own (stored) state is newer than the one it
    receives installs the received one and returns an :class:`Adopt` offering
    its own; the group takes it if it is still newer where it is delivered
    (see the module docstring).  A state too large for an ``AdoptState``
    (:data:`~.ops.MAX_STATE_BYTES`), or a record whose name is no valid group
    name, is not offered: the replica logs why and keeps the received state.

    Founders: when several members start the space together (its first view
    has only joiners, e.g. after a full outage), nobody transfers a state and
    each would keep its own stored one.  With ``node_id`` (this member's id)
    each founder then starts from the empty state, multicasts its stored one
    (an ``AdoptState`` *claim*, also when it is empty) and refuses every
    operation (:data:`STARTING`) until the claim of every founder still in the
    space has been delivered; the claim with the highest revision wins (the
    newest along the one line of primary components), the same at every member
    since all see the same claims in the same order.  Claims are not
    operations: they are not answered and not in the history.
    """

    def __init__(self, group: str, store: GroupStore, *, history_limit: int = DEFAULT_HISTORY,
                 state_type: type = GroupState, space: str | None = None, node: str = "-",
                 node_id: int | None = None, clock: Callable[[], float] | None = None) -> None:
        if history_limit < 1:
            raise ValueError("history_limit must be >= 1")
        self.group = group
        self.space = space if space is not None else group_space(group)
        self.state_type = state_type
        self.node = node
        self.node_id = node_id
        self._clock = clock
        self._founders: set[int] | None = None      # members whose claim is awaited (None: settled)
        self._claim_sent = False                    # this member claimed when it joined
        self._store = store
        state, history = store.load(group, state_type)
        self._state: ReplicatedState = state
        self._history: deque[HistoryEntry] = deque(history, maxlen=history_limit)
        self._own: tuple[ReplicatedState, list[HistoryEntry]] = (state, list(history))   # kept while founding
        self._primary = False
        self._transitional = False
        self._came_along: tuple[int, ...] | None = None   # the members of the last transitional view
        self._merging = False
        self.members: tuple[int, ...] = ()
        """The space's members (oldest first), from its last view."""
        self.dropped = 0
        """Malformed operations received (counted and ignored)."""

    @property
    def state(self) -> ReplicatedState:
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
        """Whether an operation delivered now would be accepted (a regular primary configuration,
        founders' stored states compared)."""
        return self._primary and not self._transitional and self._founders is None and not self._merging

    @property
    def read_only_reason(self) -> str | None:
        """Why this side refuses writes now (None: it accepts them)."""
        if self._founders is not None:
            return STARTING
        if self._merging:
            return MERGING
        return None if self.writable else READ_ONLY

    # ------------------------------------------------------------------ inputs in total order

    def ring_view(self, view: View) -> list[ReplicaOutput]:
        """A ring configuration (transitional or regular).

        A regular view that merges members from different configurations (the
        spaces layer's rule: no transitional view just before, or one with other
        members) joins sides whose states may differ: until the spaces' SYNC
        round ends (:meth:`synced`) every operation is refused alike (:data:`MERGING`)."""
        if view.transitional:
            self._transitional = True
            self._came_along = tuple(view.members)
        else:
            self._transitional = False
            self._primary = bool(view.primary)
            # The spaces layer's own rule for starting a SYNC round (groupcomm.layers.spaces).
            if self._came_along is None or self._came_along != tuple(view.members):
                self._merging = True
            self._came_along = None
        return []

    def synced(self) -> list[ReplicaOutput]:
        """The spaces' SYNC round after a merging ring view ended (:class:`~groupcomm.layers.spaces.Synced`)."""
        self._merging = False
        return []

    def space_view(self, view: SpaceView) -> list[ReplicaOutput]:
        """A view of a space (only this group's space matters).

        With ``node_id``: a member already in the space awaits the claim of every
        member the view adds (relative to its own previous view: the views' own
        ``joined`` lists differ between members after a merge); a member joining
        the space claims its stored state at once and awaits everybody's -- if
        others had a state, its transfer replaces what it awaits with what its
        provider awaited at that point."""
        if view.space != self.space:
            return []
        me = self.node_id
        before = set(self.members) if me is not None and me in self.members else set()
        self.members = tuple(view.members)
        if me is None or me not in view.members:
            return []
        if before:
            # Joined relative to this member's previous view, or as the view says (a node that came back
            # quickly is in "joined" though it never left this member's view).
            pending = (self._founders or set()) | (set(view.members) - before) | (set(view.joined) - {me})
            self._founders = pending & set(view.members)
            return self._settle_if_claimed()
        own = self._state                             # joining: claim what this node stored
        self._own = (own, list(self._history))
        self._founders = set(view.members)
        self._state = self.state_type(self.group)
        self._history.clear()
        self._claim_sent = True
        return [self._claim(own)]

    def _claim(self, own: ReplicatedState) -> Adopt:
        """This member's claim: its stored state (the empty one if that cannot be offered)."""
        return self._offer(own, 0, kind="claim") or self._offer(self.state_type(self.group), 0, kind="claim")

    def _claimed(self, sender: int, op: Op) -> list[ReplicaOutput]:
        """An AdoptState while founders' states are compared: a founder's claim, or a joiner's
        offer; the newest wins (it is not an operation: no answer, no history)."""
        assert self._founders is not None
        self._founders.discard(sender)
        try:
            state = adopt_state(self._state, op.body, self.state_type)
        except OpRefused:
            pass                                      # not newer than the best so far
        else:
            self._state = state
            own_state, own_history = self._own
            same = state.revision == own_state.revision and state.snapshot() == own_state.snapshot()
            self._history.clear()
            self._history.extend(own_history if same else [])
        return self._settle_if_claimed()

    def _settle_if_claimed(self) -> list[ReplicaOutput]:
        if self._founders:
            return []
        self._founders = None
        self._claim_sent = False
        self._store.replace(self.group, self._state, list(self._history))
        return [StateChanged(self._state)]

    def message(self, sender: int, payload: bytes) -> list[ReplicaOutput]:
        """An operation multicast in the space by ``sender``: accept or reject it here."""
        try:
            op = decode_op(payload)
        except MalformedOp:
            self.dropped += 1
            return []
        claim = self._founders is not None and type(op.body) is AdoptState and op.group == self.group
        if self._merging and not claim:
            return [Rejected(op.op_id, MERGING)]      # every side refuses alike: their states may differ
        if self._founders is not None:
            return self._claimed(sender, op) if claim else [Rejected(op.op_id, STARTING)]
        if not self.writable:
            return [Rejected(op.op_id, READ_ONLY)]
        if op.group != self.group:
            return [Rejected(op.op_id, WRONG_GROUP)]
        if self._state.has_applied(op.op_id):
            return [Rejected(op.op_id, DUPLICATE)]
        try:
            if type(op.body) is AdoptState:
                state = adopt_state(self._state, op.body, self.state_type)
                op = msgspec.structs.replace(op, body=AdoptState(op.body.group, b""))   # history stays small
            else:
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
        return _encoder.encode(_Transfer(self._state.snapshot(), list(self._history),
                                         tuple(sorted(self._founders or ()))))

    def install_state(self, data: bytes | None) -> list[ReplicaOutput]:
        """Replace the state with a transferred one (None: the group starts over, empty, at revision 0).

        Also returns an :class:`Adopt` if the state replaced had a higher revision
        (see the class docstring).  Raises :class:`StateCorrupt` if ``data`` does
        not decode (the provider is a member running this code: that is a bug,
        not a network error)."""
        founders: tuple[int, ...] = ()
        if data is None:
            state, history = self.state_type(self.group), []
        else:
            try:
                transfer = _transfer_decoder.decode(data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise StateCorrupt(f"state transfer of {self.group!r}: {exc}") from None
            state = self.state_type.restore(transfer.state)
            if state.group != self.group:
                raise StateCorrupt(f"state transfer for group {self.group!r} carries group {state.group!r}")
            history = transfer.history[-(self._history.maxlen or 1):]
            founders = transfer.founders
        own = self._state
        if self._founders is not None and self._own[0].revision > own.revision:
            own = self._own[0]                        # founding: what this node stored, not the reset state
        else:
            self._own = (own, list(self._history))
        self._store.replace(self.group, state, history)
        self._state = state
        self._history.clear()
        self._history.extend(history)
        outputs: list[ReplicaOutput] = [StateChanged(state)]
        if self.node_id is not None:
            # Every member awaits this member's claim (the provider's view added it): it was made when
            # this member joined, or is made now (a member of the side that lost a merge).
            self._founders = set(founders) | {self.node_id}
            if not self._claim_sent:
                outputs.append(self._claim(own))
            self._claim_sent = False
        elif own.revision > state.revision:
            adopt = self._offer(own, state.revision)
            if adopt is not None:
                outputs.append(adopt)
        return outputs

    def _offer(self, own: ReplicatedState, received: int, *, kind: str = "adopt") -> Adopt | None:
        snapshot = own.snapshot()
        if len(snapshot) > MAX_STATE_BYTES:
            _log.warning("%s: not offering stored revision %d over the received revision %d: its snapshot "
                         "of %d bytes exceeds %d", self.group, own.revision, received, len(snapshot),
                         MAX_STATE_BYTES)
            return None
        # The same snapshot offered twice is the same operation: a content-derived op_id makes it a duplicate.
        op_id = f"{self.node}:{kind}:{own.revision}:{hashlib.sha256(snapshot).hexdigest()[:16]}"
        op = Op(op_id, self.node, "", self._clock() if self._clock is not None else 0.0,
                AdoptState(self.group, snapshot))
        try:
            payload = encode_op(op)
        except MalformedOp as exc:
            _log.warning("%s: not offering stored revision %d over the received revision %d: %s",
                         self.group, own.revision, received, exc)
            return None
        _log.info("%s: offering stored revision %d over the received revision %d (%s)",
                  self.group, own.revision, received, op_id)
        return Adopt(payload, op_id, own.revision)

    # ------------------------------------------------------------------ local

    def propose(self, op: Op) -> bytes:
        """The payload to multicast in :attr:`space` for ``op`` (its answer comes with its delivery).

        Raises :class:`OpRefused` for an operation on another group and
        :class:`~.ops.MalformedOp` for an invalid one; a read-only side still
        multicasts (every member rejects it alike)."""
        if op.group != self.group:
            raise OpRefused(WRONG_GROUP)
        return encode_op(op)
