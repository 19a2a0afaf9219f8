"""A member's durable state: the ring seqs it may use and what its quorum rule remembers.

Each member has a directory of its own, ``<root>/<cluster>/<name>``: several
members may run as one user on one host, so the cluster and the member's name
key it.  The root is the QUORUM layer's ``state_dir``, else
``$XDG_STATE_HOME/groupcomm``, else ``~/.local/state/groupcomm``.

The state is one SQLite database, ``node.sqlite3``, in WAL mode with
``synchronous = FULL``: every write is on disk (the WAL fsynced) when it
returns, and a crash mid-write leaves the previous value.  The database is
opened in exclusive locking mode, so a second live member with the same
cluster and name is refused instead of sharing (and corrupting) the state.
The writes are rare (a start, a change of what the quorum rule remembers, a
new block of ring seqs) and the table is a handful of rows, so the cost is a
few fsyncs per membership change at most.

Ring seqs.  A ring id is ``(representative, ring seq)``; a member that
restarts must never present one it used before (Corosync PR #495).  The
member reserves a block of ring seqs in the database before it uses any of
them: at start it takes ``reserved + 1`` as its floor and reserves a block
above it, and :class:`RingSeqLease` checks the ring's highest seq before the
driver acts on the ring's outputs (so before a packet carrying a new ring seq
is sent or a view delivered) and reserves a new block, fsynced, when the
ring has used half of the current one.  The wall clock plays no part, so a
clock that steps back changes nothing.  A new directory starts at the clock
floor, so a member whose directory was lost, or that ran before without one,
still starts above the seqs it used.

With the C socket pump the ring's packets leave from the pump's thread and the
check runs when the pump hands its views to Python.  The block covers the
steps of 4 between rings; a jump past it (a join from a member whose seqs are
far ahead, say one whose directory is newer) can be used before it is
reserved, and a crash at that moment leaves the reservation below it.  The
members that saw the ring carry its seq in their joins, so a restarted member
does not form it again in practice; the trio driver has no such gap.

When no directory can be created or written (a read-only file system, a
permission), the member starts from the clock floor, as before state
directories existed, and what the quorum rule remembers lives in memory only;
a warning says so.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from groupcomm.errors import ConfigError
from groupcomm.layers.quorum import MemoryStore, QuorumMemory, QuorumStore

__all__ = ["MemberState", "RingSeqLease", "StateDir", "clock_floor", "default_root", "member_dir",
           "open_member_state"]

logger = logging.getLogger("groupcomm.state")

DB_NAME = "node.sqlite3"
RING_SEQ_BLOCK = 1 << 24
"""Ring seqs reserved at a time (a new ring takes 4 above the highest seen)."""
_SCHEMA = 1


def clock_floor(clock: Callable[[], float] = time.time) -> int:
    """The ring seq floor from the wall clock (4 per millisecond): the fallback without a state directory."""
    return int(clock() * 1000) * 4


def default_root() -> Path:
    """``$XDG_STATE_HOME/groupcomm``, or ``~/.local/state/groupcomm``."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "groupcomm"


def member_dir(root: str | os.PathLike, cluster: str, name: str) -> Path:
    """The state directory of member ``name`` of ``cluster`` under ``root`` (names are escaped)."""
    return Path(root) / _component(cluster) / _component(name)


def _component(text: str) -> str:
    escaped = quote(text, safe="-_.@+=,")
    if escaped in (".", ".."):
        return escaped.replace(".", "%2E")
    return escaped or "%"                          # quote() never makes a lone "%"


class StateDirInUse(ConfigError):
    """Another live member holds this state directory (same cluster and name on this host)."""


class StateDir:
    """One member's durable state (see the module docstring); a :class:`~groupcomm.layers.quorum.QuorumStore`."""

    def __init__(self, path: Path, connection: sqlite3.Connection) -> None:
        self.path = path
        self._db = connection

    @classmethod
    def open(cls, path: str | os.PathLike) -> StateDir:
        """Create or open the state in directory ``path`` and hold it until :meth:`close`.

        Raises :class:`StateDirInUse` when another member holds it, ``OSError``
        or ``sqlite3.Error`` when it cannot be created or written.
        """
        path = Path(path)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        db = sqlite3.connect(path / DB_NAME, timeout=0, isolation_level=None)
        try:
            db.execute("PRAGMA locking_mode = EXCLUSIVE")
            db.execute("PRAGMA synchronous = FULL")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise sqlite3.OperationalError(f"{path / DB_NAME}: WAL journal refused ({mode})")
            db.execute("BEGIN IMMEDIATE")            # takes the lock, held until close
            db.execute("CREATE TABLE IF NOT EXISTS node_state (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
            db.execute("CREATE TABLE IF NOT EXISTS seal_peers (node INTEGER PRIMARY KEY, incarnation INTEGER NOT NULL)")
            db.execute("INSERT OR IGNORE INTO node_state VALUES ('schema', ?)", (_SCHEMA,))
            db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            db.close()
            if "locked" in str(exc):
                raise StateDirInUse(f"state directory {path} is in use by another member "
                                    "(one with the same cluster and name on this host?)") from None
            raise
        except BaseException:
            db.close()
            raise
        _fsync_dir(path)
        return cls(path, db)

    def close(self) -> None:
        self._db.close()

    # -- ring seqs ----------------------------------------------------------------

    @property
    def ring_seq_reserved(self) -> int | None:
        """The highest ring seq reserved so far (None: never started here)."""
        return self._get("ring_seq_reserved")

    def reserve_ring_seqs(self, upto: int) -> None:
        """Reserve every ring seq up to ``upto``; on disk when it returns."""
        self._set({"ring_seq_reserved": upto})

    # -- the seal (groupcomm.core.seal) ----------------------------------------------

    def next_incarnation(self, now_us: int) -> int:
        """This start's seal incarnation: above every earlier one (even if the clock stepped back)."""
        last = self._get("seal_incarnation")
        incarnation = max(now_us, (last or 0) + 1)
        self._set({"seal_incarnation": incarnation})
        return incarnation

    def load_peer_incarnations(self) -> dict[int, int]:
        """The newest incarnation heard from each sender when this member last saved them."""
        rows = self._db.execute("SELECT node, incarnation FROM seal_peers").fetchall()
        return {int(node): int(inc) for node, inc in rows}

    def save_peer_incarnations(self, incarnations: dict[int, int]) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM seal_peers")
            db.executemany("INSERT INTO seal_peers VALUES (?, ?)", incarnations.items())
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # -- QuorumStore --------------------------------------------------------------

    def load_quorum(self) -> QuorumMemory | None:
        expected = self._get("quorum_expected")
        if expected is None:
            return None
        return QuorumMemory(expected, bool(self._get("quorum_seen_all")), self._get("quorum_configured") or 0)

    def save_quorum(self, memory: QuorumMemory) -> None:
        self._set({"quorum_expected": memory.expected, "quorum_seen_all": int(memory.seen_all),
                   "quorum_configured": memory.configured})

    # -- plumbing -------------------------------------------------------------------

    def _get(self, key: str) -> int | None:
        row = self._db.execute("SELECT value FROM node_state WHERE key = ?", (key,)).fetchone()
        return None if row is None else int(row[0])

    def _set(self, values: dict[str, int]) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT OR REPLACE INTO node_state VALUES (?, ?)", values.items())
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")                        # synchronous = FULL: the WAL is fsynced here


def _fsync_dir(path: Path) -> None:
    """Make the directory entries (the database and its WAL) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RingSeqLease:
    """A ring whose ring seqs are reserved in the state directory before the driver acts on them.

    It stands in for the member's ring (``member.ring = RingSeqLease(member.ring, ...)``):
    every call goes to the ring, and :meth:`take` first makes sure the ring's
    highest ring seq is reserved.
    """

    def __init__(self, ring, state: StateDir, reserved: int, block: int = RING_SEQ_BLOCK) -> None:
        self.ring = ring
        self._state = state
        self._reserved = reserved
        self._block = block
        # The hot path goes straight to the ring.
        self.receive = ring.receive
        self.submit = ring.submit
        self.tick = ring.tick
        self.next_deadline = ring.next_deadline

    def __getattr__(self, name: str):
        return getattr(self.ring, name)

    @property
    def reserved(self) -> int:
        """The highest ring seq reserved on disk."""
        return self._reserved

    def take(self, *args, **kwargs) -> list:
        seq = self.ring.ring_seq
        if seq > self._reserved - self._block // 2:
            self._reserved = seq + self._block
            self._state.reserve_ring_seqs(self._reserved)
        return self.ring.take(*args, **kwargs)


@dataclass
class MemberState:
    """What a starting member gets from its state directory (see :func:`open_member_state`)."""

    floor: int
    """The ring seq floor of this incarnation: above every ring seq it may have used before."""
    quorum: QuorumStore
    """Where its quorum rule keeps what it remembers."""
    state: StateDir | None
    """The open state directory (None: the clock floor and memory only)."""
    incarnation: int = 0
    """This start's seal incarnation (microseconds; above every earlier one kept here)."""

    def peer_incarnations(self) -> dict[int, int]:
        """What the seal heard from each sender before this start (empty without a directory)."""
        return self.state.load_peer_incarnations() if self.state is not None else {}

    def save_peer_incarnations(self, incarnations: dict[int, int]) -> None:
        if self.state is not None:
            self.state.save_peer_incarnations(incarnations)

    def lease(self, ring):
        """``ring`` with its ring seqs reserved before use (unchanged without a state directory)."""
        if self.state is None:
            return ring
        return RingSeqLease(ring, self.state, self.state.ring_seq_reserved or self.floor)

    @staticmethod
    def unlease(ring):
        """The ring :meth:`lease` wrapped (what the C pump's detach expects back)."""
        return ring.ring if isinstance(ring, RingSeqLease) else ring

    def close(self) -> None:
        if self.state is not None:
            self.state.close()


def open_member_state(root: str | os.PathLike | None, cluster: str, name: str | None, *,
                      clock: Callable[[], float] = time.time) -> MemberState:
    """Open member ``name`` of ``cluster``'s state under ``root`` (None: :func:`default_root`),
    take this incarnation's ring seq floor and reserve a block above it.

    ``name`` None: the member has no identity that outlives this process, so
    there is nothing to keep (the clock floor, memory only).  A directory that
    cannot be written falls back to the same, with a warning; one held by
    another live member raises :class:`StateDirInUse`.
    """
    now_us = int(clock() * 1_000_000)
    if name is None:
        return MemberState(clock_floor(clock), MemoryStore(), None, now_us)
    path = member_dir(root if root else default_root(), cluster, name)
    state = None
    try:
        state = StateDir.open(path)
        reserved = state.ring_seq_reserved
        floor = reserved + 1 if reserved is not None else clock_floor(clock)
        state.reserve_ring_seqs(floor + RING_SEQ_BLOCK)
        incarnation = state.next_incarnation(now_us)
    except StateDirInUse:
        raise
    except (OSError, sqlite3.Error) as exc:
        if state is not None:
            state.close()
        logger.warning("state directory %s cannot be used (%s): ring ids start from the wall clock, which must "
                       "not step back, and the quorum rule forgets what it learnt when this member stops",
                       path, exc)
        return MemberState(clock_floor(clock), MemoryStore(), None, now_us)
    return MemberState(floor, state, state, incarnation)
