"""An in-memory :class:`~groupcomm.services.sessions.asgi.SessionStore`: one node, no replication.

For tests and single-node deployments.  It keeps the contract of the replicated
store where it can: values are stored msgpack-encoded (so a request never shares
objects with the store, and an unencodable value fails at save), every save bumps
the version, one request at a time holds a session (a second request for it waits
until the first one is released), sessions expire after ``max_inactive`` seconds
without a request, and the limits are enforced with the documented policy: when
``max_sessions`` or ``max_bytes`` is reached, expired sessions are reaped first,
then new sessions are refused with :class:`SessionsFull`; a live session is never
evicted.  Runs under any async library anyio supports (trio, asyncio).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import msgpack

from groupcomm.services.sessions.asgi import SessionData
from groupcomm.services.sessions.errors import (
    SessionsFull,
    SessionTooLarge,
    SessionUnavailable,
)
from groupcomm.services.sessions.ids import new_session_id

_EMPTY = msgpack.packb({})


@dataclass
class _Entry:
    data: bytes
    version: int
    last_access: float


class _Gate:
    """One session's reservation: held by one request, others wait in turn."""

    def __init__(self) -> None:
        self.semaphore = anyio.Semaphore(1)     # not a Lock: release may come from another task
        self.waiting = 0
        self.held = False


class MemorySessionStore:
    """Sessions in a dict of this process (see the module doc)."""

    def __init__(
        self,
        node_name: str = "local",
        *,
        max_sessions: int = 100_000,
        max_bytes: int = 256 << 20,
        max_session_bytes: int = 256 << 10,
        max_inactive: float = 1800.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node_name = node_name
        self.max_sessions = max_sessions
        self.max_bytes = max_bytes
        self.max_session_bytes = max_session_bytes
        self.max_inactive = max_inactive
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._gates: dict[str, _Gate] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes_used(self) -> int:
        """Encoded bytes of every session held."""
        return self._bytes

    def session_ids(self) -> list[str]:
        """The ids of every session held."""
        return list(self._entries)

    def version(self, session_id: str) -> int | None:
        """The stored version of a session, None if there is none."""
        entry = self._entries.get(session_id)
        return entry.version if entry else None

    def values(self, session_id: str) -> dict | None:
        """A copy of a session's stored values, None if there is none (does not touch it)."""
        entry = self._entries.get(session_id)
        return msgpack.unpackb(entry.data) if entry else None

    async def load(self, session_id: str) -> SessionData | None:
        """The session, reserved for the caller until :meth:`release`; None if unknown or expired."""
        if self._live(session_id) is None:
            return None                              # unknown ids never make a gate
        await self._acquire(session_id)
        entry = self._live(session_id)               # it may have ended while we waited
        if entry is None:
            await self.release(session_id)
            return None
        entry.last_access = self._clock()
        return SessionData(session_id, msgpack.unpackb(entry.data), entry.version)

    async def create(self) -> SessionData:
        """A new empty session, reserved for the caller; SessionsFull at the limits."""
        if len(self._entries) >= self.max_sessions or self._bytes >= self.max_bytes:
            self.reap()
        if len(self._entries) >= self.max_sessions or self._bytes + len(_EMPTY) > self.max_bytes:
            raise SessionsFull(f"node {self.node_name} holds {len(self._entries)} sessions, {self._bytes} bytes")
        session_id = new_session_id()
        self._entries[session_id] = _Entry(_EMPTY, 0, self._clock())
        self._bytes += len(_EMPTY)
        await self._acquire(session_id)
        return SessionData(session_id, {}, 0)

    async def save(self, session: SessionData) -> None:
        """Store the values; ``session.version`` becomes the new version."""
        entry = self._entries.get(session.id)
        if entry is None:
            raise SessionUnavailable(f"session {session.id} ended while a request used it")
        data = msgpack.packb(session.values)
        if len(data) > self.max_session_bytes:
            raise SessionTooLarge(len(data), self.max_session_bytes)
        grown = len(data) - len(entry.data)
        if grown > 0 and self._bytes + grown > self.max_bytes:
            raise SessionsFull(f"node {self.node_name} has no room for {grown} more bytes")
        self._bytes += grown
        entry.data = data
        entry.version += 1
        entry.last_access = self._clock()
        session.version = entry.version

    async def invalidate(self, session_id: str) -> None:
        """Forget the session and release its reservation."""
        self._drop(session_id)
        await self.release(session_id)

    async def release(self, session_id: str) -> None:
        """Let the next request waiting for the session have it (no-op if not reserved)."""
        gate = self._gates.get(session_id)
        if gate is None or not gate.held:
            return
        gate.held = False
        gate.semaphore.release()
        if gate.waiting == 0:
            del self._gates[session_id]

    def reap(self) -> int:
        """Forget every expired session that no request holds; how many were forgotten."""
        now = self._clock()
        expired = [sid for sid, entry in self._entries.items()
                   if now - entry.last_access > self.max_inactive and sid not in self._gates]
        for session_id in expired:
            self._drop(session_id)
        return len(expired)

    def _live(self, session_id: str) -> _Entry | None:
        entry = self._entries.get(session_id)
        if entry is not None and self._clock() - entry.last_access > self.max_inactive \
                and session_id not in self._gates:
            self._drop(session_id)
            return None
        return entry

    def _drop(self, session_id: str) -> None:
        entry = self._entries.pop(session_id, None)
        if entry is not None:
            self._bytes -= len(entry.data)

    async def _acquire(self, session_id: str) -> None:
        gate = self._gates.setdefault(session_id, _Gate())
        gate.waiting += 1
        try:
            await gate.semaphore.acquire()
        except BaseException:                       # cancelled while waiting
            gate.waiting -= 1
            if not gate.held and gate.waiting == 0:
                self._gates.pop(session_id, None)
            raise
        gate.waiting -= 1
        gate.held = True
