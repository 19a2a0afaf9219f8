"""A small plain-ASGI demo application: a counter per session, idempotent increments.

Meant to run wrapped in :class:`~groupcomm.services.sessions.asgi.SessionMiddleware`
(``groupcomm sessions-node`` and ``groupcomm sessions-demo`` serve it):

* ``GET /`` -> ``{"node": NAME, "counter": N, "session": ID}`` (``session`` is null
  while the client has none: reading never creates a session);
* ``POST /incr`` with header ``x-request-id: TOKEN`` -> increments the session's
  counter once per distinct token and answers ``{"node", "counter", "applied"}``.
  The session remembers the last :data:`REMEMBERED_REQUESTS` tokens it applied, so
  a client that retries an increment whose answer it never got (connection reset,
  503) with the same token never counts it twice (``"applied": false``).  A
  missing or malformed token is a 400;
* ``GET /stats`` -> the store's counters (``stats()``) as JSON, 404 without one;
* ``GET /healthz`` -> 200 ``ok`` (never touches the session store).

The lifespan protocol is answered (startup and shutdown complete at once).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

__all__ = ["MAX_REQUEST_ID_CHARS", "REMEMBERED_REQUESTS", "demo_app"]

REMEMBERED_REQUESTS = 64
"""How many applied request ids a session keeps (older ones may be counted again if retried)."""
MAX_REQUEST_ID_CHARS = 128
"""Longest ``x-request-id`` accepted (a session keeps up to 64 of them: bounded size)."""

_REQUEST_ID = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_REQUEST_ID_CHARS}}}")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def demo_app(node_name: str, stats: Callable[[], Mapping[str, Any]] | None = None) -> ASGIApp:
    """The demo application of node ``node_name``; ``stats`` (e.g. ``store.stats``) feeds ``GET /stats``."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return                                   # websockets: not served (the server closes it)
        route = (scope["method"], scope["path"])
        if route == ("GET", "/healthz"):
            await _answer(send, 200, b"ok\n", b"text/plain; charset=utf-8")
        elif route == ("GET", "/"):
            session = scope["session"]
            await _json(send, 200, {"node": node_name, "counter": session.get("counter", 0),
                                    "session": session.id})
        elif route == ("POST", "/incr"):
            await _incr(scope, send, node_name)
        elif route == ("GET", "/stats"):
            if stats is None:
                await _json(send, 404, {"error": "this node's store keeps no statistics"})
            else:
                await _json(send, 200, dict(stats()))
        elif scope["path"] in _ROUTES:
            await _answer(send, 405, b"method not allowed\n", b"text/plain; charset=utf-8",
                          [(b"allow", _ROUTES[scope["path"]])])
        else:
            await _answer(send, 404, b"not found\n", b"text/plain; charset=utf-8")

    return app


_ROUTES = {"/": b"GET", "/incr": b"POST", "/stats": b"GET", "/healthz": b"GET"}


async def _incr(scope: Scope, send: Send, node_name: str) -> None:
    request_id = _header(scope, b"x-request-id")
    if request_id is None or not _REQUEST_ID.fullmatch(request_id):
        await _json(send, 400, {"error": f"POST /incr needs an x-request-id header of 1..{MAX_REQUEST_ID_CHARS} "
                                         "characters A-Z a-z 0-9 . _ : -"})
        return
    session = scope["session"]
    applied_ids: list[str] = list(session.get("applied", []))
    counter: int = session.get("counter", 0)
    applied = request_id not in applied_ids
    if applied:
        counter += 1
        applied_ids = [*applied_ids, request_id][-REMEMBERED_REQUESTS:]
        session["counter"] = counter
        session["applied"] = applied_ids
    await _json(send, 200, {"node": node_name, "counter": counter, "applied": applied})


def _header(scope: Scope, name: bytes) -> str | None:
    """The first value of header ``name`` (lower case), or None."""
    for key, value in scope.get("headers", ()):
        if bytes(key).lower() == name:
            return bytes(value).decode("latin-1").strip()
    return None


async def _json(send: Send, status: int, body: Mapping[str, Any]) -> None:
    await _answer(send, status, json.dumps(body, default=str).encode() + b"\n", b"application/json")


async def _answer(send: Send, status: int, body: bytes, content_type: bytes,
                  extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", content_type), (b"cache-control", b"no-store"), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
