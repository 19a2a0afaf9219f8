"""A session record, its wire form, and the bounded table of records a node keeps.

:class:`Session` is immutable: every change makes a new record (``version + 1``
on a data change).  Its ``data`` is the msgpack of the session's dict, so a
backup stores and forwards it without decoding it.  :func:`encode_session` /
:func:`decode_session` are its wire form (msgspec, one validating decoder that
raises only :class:`MalformedSession`).  The errors are those of
:mod:`.errors` (``SessionsFull``, ``SessionTooLarge``) so the middleware maps them.

Times (``created``, ``last_access``) are seconds on a clock the cluster shares
(the wall clock in the driver, virtual time in the simulator); a session
expires ``max_inactive`` seconds after its last access.

:class:`SessionTable` holds the sessions a node holds or backs up, within
:class:`Limits`.  The policy when a limit is reached:

* a payload over ``max_session_bytes`` is refused with :class:`SessionTooLarge`
  before anything changes;
* a put that would exceed ``max_sessions`` or ``max_bytes`` first reaps the
  expired sessions; if it still does not fit it is refused with
  :class:`TableFull`, a ``SessionsFull`` (the middleware answers 503).  A live
  session is never evicted to make room.

Byte accounting is exact: :attr:`SessionTable.used_bytes` is the sum of the
encoded sizes of the records in the table.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, NamedTuple

import msgspec

from groupcomm.services.sessions.errors import (
    SessionError,
    SessionsFull,
    SessionTooLarge,
)

__all__ = [
    "DEFAULT_MAX_INACTIVE",
    "DEFAULT_MAX_SESSION_BYTES",
    "MAX_PAYLOAD_BYTES",
    "Limits",
    "MalformedSession",
    "Session",
    "SessionTable",
    "TableFull",
    "decode_session",
    "encode_session",
    "encode_values",
]

KiB = 1024
MiB = 1024 * KiB

MAX_PAYLOAD_BYTES = 16 * MiB
"""No record carries more payload than this, whatever :attr:`Limits.max_session_bytes` says."""
DEFAULT_MAX_SESSION_BYTES = 64 * KiB
"""Payload limit of one session unless configured otherwise (:attr:`Limits.max_session_bytes`)."""
DEFAULT_MAX_INACTIVE = 1800.0
"""Seconds of inactivity after which a session expires unless configured otherwise (30 minutes)."""
_MAX_TIME = 1e11           # seconds: beyond year 5000 on the Unix clock; rejects inf
_MAX_INACTIVE = 1e9        # seconds: about 31 years


class MalformedSession(SessionError):
    """A session record (or its data) that is not valid: it is dropped, never half-used."""


class TableFull(SessionsFull):
    """:class:`SessionsFull` from a :class:`SessionTable`; ``reaped`` lists the expired sessions
    it removed while looking for room (the caller tells their owners and backups)."""

    def __init__(self, message: str, reaped: list[str]) -> None:
        super().__init__(message)
        self.reaped = reaped


SessionId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{21}[AQgw]\Z")]
Payload = Annotated[bytes, msgspec.Meta(max_length=MAX_PAYLOAD_BYTES)]
Counter = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Seconds = Annotated[float, msgspec.Meta(ge=0, le=_MAX_TIME)]
Inactive = Annotated[float, msgspec.Meta(gt=0, le=_MAX_INACTIVE)]

_encoder = msgspec.msgpack.Encoder()
_values_decoder = msgspec.msgpack.Decoder(dict[str, Any])


def encode_values(values: Mapping[str, Any], limit: int) -> bytes:
    """The msgpack of ``values`` (str keys; msgpack-able values, else TypeError); SessionTooLarge over ``limit``."""
    if not all(isinstance(key, str) for key in values):
        raise TypeError("session keys must be str")
    data = _encoder.encode(dict(values))
    if len(data) > limit:
        raise SessionTooLarge(len(data), limit)
    return data


class Session(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """One session: its id, its data (msgpack of a dict), ``version`` (+1 per data change), the
    holder ``epoch`` (+1 per change of holder), and its times in seconds."""

    id: SessionId
    data: Payload
    version: Counter
    epoch: Counter
    created: Seconds
    last_access: Seconds
    max_inactive: Inactive = DEFAULT_MAX_INACTIVE

    @classmethod
    def new(
        cls,
        session_id: str,
        *,
        now: float,
        values: Mapping[str, Any] | None = None,
        epoch: int = 0,
        max_inactive: float = DEFAULT_MAX_INACTIVE,
        limit: int = DEFAULT_MAX_SESSION_BYTES,
    ) -> Session:
        """A new session (version 0) created at ``now``; SessionTooLarge if ``values`` is over ``limit``."""
        data = encode_values(values or {}, limit)
        return cls(session_id, data, 0, epoch, now, now, max_inactive)

    def values(self) -> dict[str, Any]:
        """The session's dict, decoded from :attr:`data` (MalformedSession if it is not one)."""
        try:
            return _values_decoder.decode(self.data)
        except msgspec.DecodeError as exc:
            raise MalformedSession(f"session {self.id}: {exc}") from None

    def with_values(self, values: Mapping[str, Any], *, now: float, limit: int = DEFAULT_MAX_SESSION_BYTES) -> Session:
        """This session with new data, accessed at ``now``, ``version + 1``."""
        data = encode_values(values, limit)
        return msgspec.structs.replace(self, data=data, version=self.version + 1, last_access=now)

    def touched(self, now: float) -> Session:
        """This session accessed at ``now`` (data and version unchanged)."""
        return msgspec.structs.replace(self, last_access=now)

    def with_epoch(self, epoch: int) -> Session:
        """This session under a new holder epoch."""
        return msgspec.structs.replace(self, epoch=epoch)

    @property
    def expires_at(self) -> float:
        """When the session expires unless accessed again."""
        return self.last_access + self.max_inactive

    def expired(self, now: float) -> bool:
        """Whether the session has expired at ``now`` (``now >= expires_at``)."""
        return now >= self.expires_at


_decoder = msgspec.msgpack.Decoder(Session)


def decode_session(raw: bytes) -> Session:
    """The :class:`Session` in ``raw``; :class:`MalformedSession` for anything invalid."""
    try:
        session = _decoder.decode(raw)
    except (msgspec.DecodeError, TypeError) as exc:
        raise MalformedSession(str(exc)) from None
    if not (math.isfinite(session.created) and math.isfinite(session.last_access)
            and math.isfinite(session.max_inactive)):
        raise MalformedSession("session times must be finite numbers")
    return session


def encode_session(session: Session) -> bytes:
    """The wire form of ``session``; MalformedSession if it is not valid (a receiver would drop it)."""
    raw = _encoder.encode(session)
    decode_session(raw)              # the same checks every receiver makes, before anyone is bothered
    return raw


@dataclass(frozen=True)
class Limits:
    """What one node keeps at most (held and backup copies together)."""

    max_session_bytes: int = DEFAULT_MAX_SESSION_BYTES
    """Payload (:attr:`Session.data`) of one session."""
    max_sessions: int = 100_000
    """Sessions in the table."""
    max_bytes: int = 256 * MiB
    """Sum of the encoded sizes of the sessions in the table."""

    def __post_init__(self) -> None:
        for name in ("max_session_bytes", "max_sessions", "max_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive integer, not {value!r}")
        if self.max_session_bytes > MAX_PAYLOAD_BYTES:
            raise ValueError(f"Limits.max_session_bytes must be at most {MAX_PAYLOAD_BYTES}")


class _Entry(NamedTuple):
    session: Session
    size: int        # len(encode_session(session))
    seq: int         # matches the live heap entry; older heap entries are stale


class SessionTable:
    """The sessions a node holds or backs up, by id, within :class:`Limits` (see the module's policy)."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._entries: dict[str, _Entry] = {}
        self._deadlines: list[tuple[float, int, str]] = []   # heap of (expires_at, seq, id)
        self._bytes = 0
        self._seq = 0

    @property
    def used_bytes(self) -> int:
        """The sum of the encoded sizes of the sessions in the table."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._entries

    def get(self, session_id: str) -> Session | None:
        """The session ``session_id`` (expired or not), or None."""
        entry = self._entries.get(session_id)
        return entry.session if entry else None

    def ids(self) -> list[str]:
        """The ids in the table, in insertion order of their current records."""
        return list(self._entries)

    def sessions(self) -> Iterator[Session]:
        """The sessions in the table."""
        return (entry.session for entry in list(self._entries.values()))

    def put(self, session: Session, now: float) -> list[str]:
        """Insert or replace ``session``; return the ids of the expired sessions reaped to make room.

        SessionTooLarge (payload over the limit) or MalformedSession change nothing; TableFull (a
        SessionsFull) means it does not fit even after reaping (the reaped ids are on the exception).
        """
        if len(session.data) > self.limits.max_session_bytes:
            raise SessionTooLarge(len(session.data), self.limits.max_session_bytes)
        size = len(encode_session(session))
        reaped: list[str] = []
        if not self._fits(session.id, size):
            reaped = self.reap(now)
            if not self._fits(session.id, size):
                raise TableFull(
                    f"no room for session {session.id} ({size} bytes): {len(self)} sessions, "
                    f"{self._bytes} bytes of {self.limits.max_sessions} / {self.limits.max_bytes}", reaped)
        old = self._entries.pop(session.id, None)
        if old is not None:
            self._bytes -= old.size
        self._seq += 1
        self._entries[session.id] = _Entry(session, size, self._seq)
        self._bytes += size
        heapq.heappush(self._deadlines, (session.expires_at, self._seq, session.id))
        self._compact()
        return reaped

    def remove(self, session_id: str) -> Session | None:
        """Remove ``session_id``; the removed session or None."""
        entry = self._entries.pop(session_id, None)
        if entry is None:
            return None
        self._bytes -= entry.size
        self._compact()
        return entry.session

    def reap(self, now: float) -> list[str]:
        """Remove every session expired at ``now``; their ids, soonest expiry first."""
        reaped = []
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, seq, session_id = heapq.heappop(heap)
            entry = self._entries.get(session_id)
            if entry is not None and entry.seq == seq:
                del self._entries[session_id]
                self._bytes -= entry.size
                reaped.append(session_id)
        return reaped

    def _fits(self, session_id: str, size: int) -> bool:
        old = self._entries.get(session_id)
        count = len(self._entries) + (old is None)
        total = self._bytes - (old.size if old else 0) + size
        return count <= self.limits.max_sessions and total <= self.limits.max_bytes

    def _compact(self) -> None:
        # replaced and removed sessions leave stale heap entries; keep them under half the heap
        if len(self._deadlines) > 2 * len(self._entries) + 64:
            self._deadlines = [(e.session.expires_at, e.seq, sid) for sid, e in self._entries.items()]
            heapq.heapify(self._deadlines)
