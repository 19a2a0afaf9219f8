"""An in-memory :class:`~groupcomm.services.sessions.asgi.SessionStore`: one node, no replication.

For tests and single-node deployments.  It keeps the contract of the replicated
store: the records are :class:`~groupcomm.services.sessions.record.Session` (values
msgpack-encoded, so a request never shares objects with the store and an
unencodable value fails at save; every save is ``version + 1``) in a
:class:`~groupcomm.services.sessions.record.SessionTable` within its
:class:`~groupcomm.services.sessions.record.Limits` (its policy: expired sessions
are reaped first, then new sessions are refused with ``SessionsFull``; a live
session is never evicted); one request at a time holds a session (a second
request for it waits until the first is released); a session expires
``max_inactive`` seconds after its last request.  Runs under any async library
anyio supports (trio, asyncio).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio

from groupcomm.services.sessions.asgi import SessionData
from groupcomm.services.sessions.errors import SessionUnavailable
from groupcomm.services.sessions.ids import new_session_id
from groupcomm.services.sessions.record import (
    DEFAULT_MAX_INACTIVE,
    Limits,
    Session,
    SessionTable,
)


class _Gate:
    """One session's reservation: held by one request, others wait in turn."""

    def __init__(self) -> None:
        self.semaphore = anyio.Semaphore(1)     # not a Lock: release may come from another task
        self.waiting = 0
        self.held = False


class MemorySessionStore:
    """Sessions in a :class:`SessionTable` of this process (see the module doc)."""

    def __init__(
        self,
        node_name: str = "local",
        *,
        limits: Limits | None = None,
        max_inactive: float = DEFAULT_MAX_INACTIVE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.node_name = node_name
        self.max_inactive = max_inactive
        self._table = SessionTable(limits)
        self._clock = clock
        self._gates: dict[str, _Gate] = {}

    def __len__(self) -> int:
        return len(self._table)

    @property
    def used_bytes(self) -> int:
        """Encoded bytes of every session held."""
        return self._table.used_bytes

    def session_ids(self) -> list[str]:
        """The ids of every session held."""
        return self._table.ids()

    def version(self, session_id: str) -> int | None:
        """The stored version of a session, None if there is none."""
        session = self._table.get(session_id)
        return session.version if session else None

    def values(self, session_id: str) -> dict | None:
        """A copy of a session's stored values, None if there is none (does not touch it)."""
        session = self._table.get(session_id)
        return session.values() if session else None

    async def load(self, session_id: str) -> SessionData | None:
        """The session, reserved for the caller until :meth:`release`; None if unknown or expired."""
        if self._live(session_id) is None:
            return None                              # unknown ids never make a gate
        await self._acquire(session_id)
        session = self._live(session_id)             # it may have ended while we waited
        if session is None:
            await self.release(session_id)
            return None
        now = self._clock()
        self._table.put(session.touched(now), now)
        return SessionData(session_id, session.values(), session.version)

    async def create(self) -> SessionData:
        """A new empty session, reserved for the caller; SessionsFull (TableFull) at the limits."""
        now = self._clock()
        session = Session.new(new_session_id(), now=now, max_inactive=self.max_inactive,
                              limit=self._table.limits.max_session_bytes)
        self._table.put(session, now)
        await self._acquire(session.id)
        return SessionData(session.id, {}, session.version)

    async def save(self, session: SessionData) -> None:
        """Store the values; ``session.version`` becomes the new version."""
        stored = self._table.get(session.id)
        if stored is None:
            raise SessionUnavailable(f"session {session.id} ended while a request used it")
        now = self._clock()
        changed = stored.with_values(session.values, now=now, limit=self._table.limits.max_session_bytes)
        self._table.put(changed, now)
        session.version = changed.version

    async def invalidate(self, session_id: str) -> None:
        """Forget the session and release its reservation."""
        self._table.remove(session_id)
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

    def reap(self) -> list[str]:
        """Forget every expired session; their ids."""
        return self._table.reap(self._clock())

    def _live(self, session_id: str) -> Session | None:
        session = self._table.get(session_id)
        if session is not None and session.expired(self._clock()):
            self._table.remove(session_id)
            return None
        return session

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
