"""Plain-ASGI session middleware: a cookie names the session, the store holds it.

:class:`SessionMiddleware` wraps any ASGI application (no framework needed).  Per
HTTP request it

1. reads the session cookie (``<id>.<node>``: the node part is a routing hint for a
   load balancer, never trusted) and, if it names a session, loads it from the
   store -- which may migrate the session to this node first;
2. runs the application with ``scope["session"]``, a :class:`RequestSession`
   (a ``MutableMapping`` of msgpack-able values; a new session is created only
   when the application writes to it);
3. holds the response back until its body is complete, then saves the session if
   it changed -- :meth:`SessionStore.save` returns only once the backups have the
   change -- sets or clears the cookie, and only then sends the response.  A
   client therefore never sees a response whose session change could be lost.

Streaming responses: the body is held back up to ``buffer_limit`` bytes (1 MiB by
default).  A longer response is committed when the limit is crossed: the session
is saved and the cookie set *before* the first body chunk leaves, then the rest
streams through.  Changes the application makes to the session while it streams
are saved before the last chunk is sent; if that save fails the response is
aborted (the client sees an incomplete response, never a silently lost change).
A session first created after the commit is not kept: its cookie can no longer
be set.

Failures (see :mod:`groupcomm.services.sessions.errors`):
:class:`SessionUnavailable` -> 503 with ``Retry-After``, :class:`SessionsFull` ->
503, :class:`SessionTooLarge` -> 500 with an error log line.  A cookie that is
malformed, forged or names an unknown session means "no session" (and the stale
cookie is cleared), never an error.  If the application raises, nothing is saved.
Websocket and lifespan scopes pass through untouched.
"""

from __future__ import annotations

import copy
import logging
import math
import re
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio

from groupcomm.services.sessions.errors import (
    SessionError,
    SessionsFull,
    SessionTooLarge,
    SessionUnavailable,
)
from groupcomm.services.sessions.ids import (
    cookie_value,
    parse_cookie_value,
    routing_hint,
)

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_BUFFER_LIMIT = 1 << 20
# A hostile request may repeat the cookie many times; each candidate may cost the
# store a remote lookup, so only the first few are tried.
MAX_COOKIE_CANDIDATES = 3
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")      # RFC 6265 cookie-name (an RFC 7230 token)
_SAME_SITE = {"lax": "Lax", "strict": "Strict", "none": "None"}


@dataclass
class SessionData:
    """One session as the store hands it to the middleware: its id, values and version."""

    id: str
    values: dict[str, Any] = field(default_factory=dict)
    version: int = 0


class SessionStore(Protocol):
    """What the middleware needs from a session store (in-memory or replicated)."""

    @property
    def node_name(self) -> str:
        """This node's name: the routing hint written into the cookie."""
        ...

    async def load(self, session_id: str) -> SessionData | None:
        """The session, held by this node from now on (it may migrate here), or None if unknown.

        The session stays reserved for this request until :meth:`release`: concurrent
        requests for one session are served one after the other.
        """
        ...

    async def create(self) -> SessionData:
        """A new empty session held by this node, reserved like a loaded one (may raise SessionsFull)."""
        ...

    async def save(self, session: SessionData) -> None:
        """Store the session's values (bumps ``session.version``); returns once replicated."""
        ...

    async def invalidate(self, session_id: str) -> None:
        """Forget the session everywhere (also releases it)."""
        ...

    async def release(self, session_id: str) -> None:
        """The request that loaded or created the session is over (called shielded from
        cancellation, also after a failed or cancelled request: it must not wait long)."""
        ...


class RequestSession(MutableMapping[str, Any]):
    """The session of one request, as ``scope["session"]``: a dict of msgpack-able values.

    Changes are detected by comparing with a copy taken at load, so nested changes
    (``session["cart"].append(x)``) count too.  :meth:`invalidate` ends the session;
    writing afterwards starts a new one under a new id.
    """

    def __init__(self, record: SessionData | None) -> None:
        self._record = record
        self._values: dict[str, Any] = dict(record.values) if record else {}
        self._saved = copy.deepcopy(self._values)
        self._doomed: list[str] = []          # ids to invalidate at commit

    @property
    def id(self) -> str | None:
        """The session id, or None while the session is new and not yet saved."""
        return self._record.id if self._record else None

    @property
    def modified(self) -> bool:
        """True if the values differ from what the store last had (for a new session: not empty)."""
        return self._values != self._saved

    def invalidate(self) -> None:
        """End the session: it is forgotten and its cookie cleared when the response is sent."""
        if self._record is not None:
            self._doomed.append(self._record.id)
        self._record = None
        self._values.clear()
        self._saved = {}

    # -- the middleware's side: what to invalidate, what to save, what the store has --------

    @property
    def record(self) -> SessionData | None:
        """The store's session these values belong to (None: new, or invalidated)."""
        return self._record

    def attach(self, record: SessionData) -> None:
        """The store created ``record`` for this new session's values (see :meth:`mark_saved`)."""
        self._record = record

    def pop_doomed(self) -> str | None:
        """The id of a session :meth:`invalidate` ended and the store must still forget (None: none left)."""
        return self._doomed.pop() if self._doomed else None

    def snapshot(self) -> dict[str, Any]:
        """A deep copy of the values, to hand to the store."""
        return copy.deepcopy(self._values)

    def mark_saved(self, snapshot: dict[str, Any]) -> None:
        """The store now has ``snapshot``: :attr:`modified` compares with it from now on."""
        self._saved = copy.deepcopy(snapshot)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._values[key] = value

    def __delitem__(self, key: str) -> None:
        del self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"RequestSession(id={self.id!r}, {self._values!r})"


class SessionMiddleware:
    """Wrap ``app`` so that HTTP requests carry a replicated session (see the module doc)."""

    def __init__(
        self,
        app: ASGIApp,
        store: SessionStore,
        *,
        cookie_name: str = "GCSESSION",
        cookie_path: str = "/",
        secure: bool = False,
        same_site: str = "lax",
        max_age: int | None = None,
        routing_hint: bool = True,
        buffer_limit: int = DEFAULT_BUFFER_LIMIT,
    ) -> None:
        if not _TOKEN.match(cookie_name):
            raise ValueError(f"cookie_name {cookie_name!r} is not a valid cookie name")
        if not cookie_path.startswith("/") or any(c in cookie_path for c in ";\r\n\0"):
            raise ValueError(f"cookie_path {cookie_path!r} must start with / and have no ; or control characters")
        if same_site.lower() not in _SAME_SITE:
            raise ValueError(f"same_site must be lax, strict or none, not {same_site!r}")
        if same_site.lower() == "none" and not secure:
            raise ValueError("same_site='none' needs secure=True (browsers drop such cookies otherwise)")
        if max_age is not None and max_age <= 0:
            raise ValueError("max_age must be a positive number of seconds, or None for a browser-session cookie")
        if buffer_limit < 0:
            raise ValueError("buffer_limit must be >= 0")
        self.app = app
        self.store = store
        self.cookie_name = cookie_name
        self.cookie_path = cookie_path
        self.secure = secure
        self.same_site = _SAME_SITE[same_site.lower()]
        self.max_age = max_age
        self.routing_hint = routing_hint
        self.buffer_limit = buffer_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            record, sent_value = await self._load(scope)
        except SessionError as exc:
            await _send_error(send, exc, None)
            return
        session = RequestSession(record)
        reserved = {record.id} if record else set()
        try:
            response = _Response(session, sent_value, send, reserved, buffer_limit=self.buffer_limit,
                                 store_changes=self._commit, cookie_header=self._cookie_header)
            await self.app({**scope, "session": session}, receive, response.send)
            await response.finish()
        finally:
            # also when the request was cancelled (client gone): the next request must not wait forever
            with anyio.CancelScope(shield=True):
                for session_id in reserved:
                    await self.store.release(session_id)

    async def _load(self, scope: Scope) -> tuple[SessionData | None, str | None]:
        """The session named by the request's cookie and that cookie's value, or (None, a value sent)."""
        values = _cookie_values(scope.get("headers", ()), self.cookie_name)
        for value in values[:MAX_COOKIE_CANDIDATES]:
            parsed = parse_cookie_value(value)
            if parsed is None:
                continue
            record = await self.store.load(parsed[0])
            if record is not None:
                return record, value
        return None, (values[0] if values else None)

    async def _commit(self, session: RequestSession, reserved: set[str], *, may_create: bool) -> None:
        """Invalidate what the app ended, then save (or create) the session if it changed."""
        while (doomed := session.pop_doomed()) is not None:
            reserved.discard(doomed)                  # invalidate releases it
            await self.store.invalidate(doomed)
        if not session.modified:
            return
        record = session.record
        if record is None:
            if not may_create:
                log.warning("session created after the response started streaming: not kept (no cookie)")
                return
            created = await self.store.create()
            reserved.add(created.id)
            try:
                await self._save(session, created)
            except Exception:
                reserved.discard(created.id)
                await self.store.invalidate(created.id)     # no empty orphan left behind
                raise
            session.attach(created)
        else:
            await self._save(session, record)

    async def _save(self, session: RequestSession, record: SessionData) -> None:
        snapshot = session.snapshot()
        record.values = snapshot
        await self.store.save(record)
        session.mark_saved(snapshot)

    def _cookie_header(self, session: RequestSession, sent_value: str | None) -> tuple[bytes, bytes] | None:
        """The Set-Cookie header this response needs, if any."""
        if session.id is not None:
            hint = routing_hint(self.store.node_name) if self.routing_hint else ""
            value = cookie_value(session.id, hint)
            if value == sent_value and self.max_age is None:
                return None
            attributes = [f"{self.cookie_name}={value}", f"Path={self.cookie_path}"]
            if self.max_age is not None:
                attributes.append(f"Max-Age={self.max_age}")
        elif sent_value is not None:
            attributes = [f"{self.cookie_name}=", f"Path={self.cookie_path}", "Max-Age=0",
                          "Expires=Thu, 01 Jan 1970 00:00:00 GMT"]
        else:
            return None
        attributes.append("HttpOnly")
        if self.secure:
            attributes.append("Secure")
        attributes.append(f"SameSite={self.same_site}")
        return b"set-cookie", "; ".join(attributes).encode("latin-1")


class _Response:
    """The send side of one request: holds the response back until the session is saved."""

    def __init__(self, session: RequestSession, sent_value: str | None, send: Send, reserved: set[str], *,
                 buffer_limit: int, store_changes: Callable[..., Awaitable[None]],
                 cookie_header: Callable[[RequestSession, str | None], tuple[bytes, bytes] | None]) -> None:
        self.buffer_limit = buffer_limit
        self.store_changes = store_changes
        """The middleware's commit: invalidate what the app ended, save (or create) the session."""
        self.cookie_header = cookie_header
        self.session = session
        self.sent_value = sent_value
        self.downstream = send
        self.reserved = reserved
        self.start: Message | None = None
        self.held: list[Message] = []
        self.held_bytes = 0
        self.committed = False
        self.replaced = False                        # an error response went out instead of the app's

    async def send(self, message: Message) -> None:
        if self.replaced:
            return
        if self.committed:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                await self._save_late()
            await self.downstream(message)
            return
        kind = message["type"]
        if kind == "http.response.start":
            self.start = message
        elif self.start is None:
            await self.downstream(message)           # e.g. early hints; or a protocol error for the server
        elif kind == "http.response.body":
            self.held.append(message)
            self.held_bytes += len(message.get("body", b""))
            if not message.get("more_body", False) or self.held_bytes > self.buffer_limit:
                await self._commit()
        else:                                        # trailers, pathsend...: the body is over
            self.held.append(message)
            await self._commit()

    async def finish(self) -> None:
        """The app returned: pass on what it left unfinished (it is the server's to judge); nothing is saved."""
        if not self.committed and not self.replaced and self.start is not None:
            self.committed = True
            await self.downstream(self.start)
            for message in self.held:
                await self.downstream(message)

    async def _commit(self) -> None:
        assert self.start is not None
        try:
            await self.store_changes(self.session, self.reserved, may_create=True)
        except SessionError as exc:
            self.replaced = True
            await _send_error(self.downstream, exc, self.session.id)
            return
        self.committed = True
        start = self.start
        header = self.cookie_header(self.session, self.sent_value)
        if header is not None:
            start = {**start, "headers": [*start.get("headers", ()), header]}
        await self.downstream(start)
        for message in self.held:
            await self.downstream(message)
        self.held = []

    async def _save_late(self) -> None:
        try:
            await self.store_changes(self.session, self.reserved, may_create=False)
        except SessionError:
            log.exception("session %s: saving the changes made while streaming failed; response aborted",
                          self.session.id)
            raise


def _cookie_values(headers: Any, name: str) -> list[str]:
    """Every value the Cookie headers give ``name``, in order (lenient: junk is skipped)."""
    found = []
    for key, raw in headers:
        if bytes(key).lower() != b"cookie":
            continue
        for part in bytes(raw).decode("latin-1").split(";"):
            key_text, sep, value = part.partition("=")
            if sep and key_text.strip() == name:
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                found.append(value)
    return found


async def _send_error(send: Send, exc: SessionError, session_id: str | None) -> None:
    """Answer with the HTTP error that stands for the store's ``exc``."""
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"cache-control", b"no-store")]
    if isinstance(exc, SessionUnavailable):
        status, text = 503, "session temporarily unavailable on this node, retry"
        headers.append((b"retry-after", str(max(1, math.ceil(exc.retry_after))).encode()))
    elif isinstance(exc, SessionsFull):
        status, text = 503, "no room for a new session on this node"
    elif isinstance(exc, SessionTooLarge):
        status, text = 500, "session too large"
        log.error("session %s not saved: %s (the application stores too much in it)", session_id, exc)
    else:
        status, text = 500, "session store error"
        log.error("session %s: %s", session_id, exc)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": text.encode() + b"\n", "more_body": False})
