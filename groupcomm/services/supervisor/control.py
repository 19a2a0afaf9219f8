"""The supervisor's control socket: how a supervised process talks to its supervisor (trio, server side).

A supervisor listens on a Unix stream socket (mode 0600; its path reaches the
children as ``GROUPCOMM_CONTROL``).  :mod:`.client` is the Python helper for
the other side; any language can speak the protocol.

Protocol
--------

Newline-delimited JSON, UTF-8, one object per line, each line at most
:data:`MAX_LINE` bytes (64 KiB) before its ``\\n``.  The client sends
requests, the server answers each with one line, in order::

    {"op": "status", "process": NAME}  ->  {"ok": true, "process": NAME, "status": {...}}
    {"op": "role",   "process": NAME}  ->  {"ok": true, "process": NAME, "role": ROLE, "epoch": EPOCH}
    {"op": "table"}                    ->  {"ok": true, "table": [{...}, ...]}
    {"op": "watch",  "process": NAME}  ->  {"ok": true, "process": NAME, "role": ROLE, "epoch": EPOCH}
                                           then, whenever the supervisor changes NAME's role:
                                           {"event": "role", "process": NAME, "role": ROLE, "epoch": EPOCH}

``status`` is the process's row in the supervisor's table, ``table`` every
row (their fields are the supervisor's; see docs/supervisor.rst).  ``ROLE`` is
a string, ``EPOCH`` the domain-controller term (an integer) or ``null``.  A
``watch`` answer carries the current role, so nothing is missed between
reading the environment and subscribing; the connection then only carries
events (anything the client sends on it closes it).

Errors are answered ``{"ok": false, "error": "why"}``.  An unknown ``op`` or
``process`` leaves the connection open; a line that is not a JSON object, not
UTF-8 or too long is answered and the connection closed.  An answer that would
exceed the line limit is replaced by an error.

Limits (constructor arguments, defaults in brackets): at most
``max_connections`` [64] connections at once (one more is answered
``too many connections`` and closed); each connection queues at most
``queue_lines`` [32] lines for sending, and a client that lets its queue
overflow, or does not take a line within ``send_timeout`` [5 s], is
disconnected -- a slow reader never slows the supervisor; a connection that
has not sent a complete request for ``idle_timeout`` [60 s] is closed (watch
connections excepted).  Only peers running as the supervisor's user or root
are served (``SO_PEERCRED``).

Use::

    async with ControlServer(path, view) as control:   # owns its nursery; unlinks the socket on exit
        ...
        control.role_changed("web", "domain-controller", 7)

``view`` is any object with the :class:`SupervisorView` methods.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Mapping, Sequence
from contextlib import nullcontext
from typing import Any, Protocol, Self

import trio

from groupcomm.services.unix_socket import UnixSocketServer, encode_line, error_line

__all__ = ["MAX_LINE", "ControlServer", "SupervisorView"]

MAX_LINE = 65536

_log = logging.getLogger(__name__)
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)     # the client went away


class SupervisorView(Protocol):
    """What the control socket asks the supervisor (the runner provides it)."""

    def status(self, process: str) -> Mapping[str, Any]:
        """The process's row as JSON-able values; KeyError if there is no such process."""
        ...

    def role(self, process: str) -> tuple[str, int | None]:
        """The process's role and its DC epoch (None when it has none); KeyError if unknown."""
        ...

    def table(self) -> Sequence[Mapping[str, Any]]:
        """Every row of the table, as JSON-able values."""
        ...


class _Closing(Exception):
    """The request was answered and the connection must close."""


class _Connection:
    def __init__(self, stream: trio.SocketStream, queue_lines: int) -> None:
        self.stream = stream
        self.scope = trio.CancelScope()
        self.outbox, self.pending = trio.open_memory_channel[bytes](queue_lines)
        self.watching: str | None = None

    def push(self, line: bytes) -> None:
        """Queue a line; a client that lets its queue overflow is disconnected."""
        try:
            self.outbox.send_nowait(line)
        except trio.WouldBlock:
            self.scope.cancel()
        except trio.ClosedResourceError:
            pass


class ControlServer:
    """The control socket at ``path``, answering from ``view``: an async context manager owning its nursery."""

    def __init__(self, path: str | os.PathLike[str], view: SupervisorView, *, max_connections: int = 64,
                 max_line: int = MAX_LINE, queue_lines: int = 32, send_timeout: float = 5.0,
                 idle_timeout: float = 60.0, peer_uids: Collection[int] | None = None) -> None:
        self.path = os.fspath(path)
        self.view = view
        self.max_connections = max_connections
        self.max_line = max_line
        self.queue_lines = queue_lines
        self.send_timeout = send_timeout
        self.idle_timeout = idle_timeout
        self.peer_uids = frozenset((os.getuid(), 0) if peer_uids is None else peer_uids)
        self._connections: set[_Connection] = set()
        self._server = UnixSocketServer(self.path, what="supervisor", serve=self._serve_stream,
                                        refuse=self._refuse, max_connections=max_connections,
                                        peer_uids=self.peer_uids)

    @property
    def connections(self) -> int:
        """How many clients are connected now."""
        return len(self._connections)

    # ------------------------------------------------------------------ lifetime

    async def __aenter__(self) -> Self:
        await self._server.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> bool:
        return await self._server.__aexit__(*exc)

    # ------------------------------------------------------------------ events

    def role_changed(self, process: str, role: str, epoch: int | None) -> None:
        """Tell every watcher of ``process`` its new role (never blocks)."""
        line = self._encode({"event": "role", "process": process, "role": role, "epoch": epoch})
        for conn in list(self._connections):
            if conn.watching == process:
                conn.push(line)

    # ------------------------------------------------------------------ connections

    async def _refuse(self, stream: trio.SocketStream, reason: str) -> None:
        with trio.move_on_after(0.5):
            try:
                await stream.send_all(error_line(reason))
            except (trio.BrokenResourceError, OSError):
                pass
        await stream.aclose()

    async def _serve_stream(self, stream: trio.SocketStream, uid: int) -> None:
        conn = _Connection(stream, self.queue_lines)
        self._connections.add(conn)
        await self._serve(conn)

    async def _serve(self, conn: _Connection) -> None:
        try:
            with conn.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._send, conn)
                    try:
                        await self._receive(conn)
                    except _BROKEN:
                        conn.scope.cancel()
                    finally:
                        conn.outbox.close()             # the sender drains what is queued, then ends
        finally:
            self._connections.discard(conn)
            await conn.stream.aclose()

    async def _send(self, conn: _Connection) -> None:
        try:
            async for line in conn.pending:
                with trio.move_on_after(self.send_timeout) as timer:
                    await conn.stream.send_all(line)
                if timer.cancelled_caught:             # the client does not read
                    conn.scope.cancel()
                    return
        except _BROKEN:
            conn.scope.cancel()

    async def _receive(self, conn: _Connection) -> None:
        buffer = bytearray()
        idle_at = trio.current_time() + self.idle_timeout    # a complete request is due by then
        while True:
            with trio.move_on_at(idle_at) if conn.watching is None else nullcontext() as idle:
                data = await conn.stream.receive_some(65536)
            if idle is not None and idle.cancelled_caught:
                conn.push(error_line("idle for too long"))
                return
            if not data:
                return
            if conn.watching is not None:
                return                                 # a watch connection takes no more requests
            buffer += data
            while (end := buffer.find(b"\n")) >= 0:
                line = bytes(buffer[:end])
                del buffer[:end + 1]
                idle_at = trio.current_time() + self.idle_timeout
                try:
                    conn.push(self._answer(conn, line))
                except _Closing as e:
                    conn.push(error_line(str(e)))
                    return
                if conn.watching is not None:
                    if buffer:
                        return
                    break
            if len(buffer) > self.max_line:
                conn.push(error_line(f"line too long (over {self.max_line} bytes)"))
                return

    # ------------------------------------------------------------------ requests

    def _answer(self, conn: _Connection, line: bytes) -> bytes:
        if len(line) > self.max_line:
            raise _Closing(f"line too long (over {self.max_line} bytes)")
        try:
            request = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError):
            raise _Closing("malformed request: not JSON") from None
        if not isinstance(request, dict):
            raise _Closing("malformed request: not a JSON object")
        op, process = request.get("op"), request.get("process")
        if op not in ("status", "role", "table", "watch"):
            return error_line(f"unknown op {op!r} (status, role, table, watch)")
        if op != "table" and not isinstance(process, str):
            return error_line(f"op {op!r} needs a \"process\" name")
        try:
            if op == "status":
                answer = {"ok": True, "process": process, "status": dict(self.view.status(process))}
            elif op == "table":
                answer = {"ok": True, "table": [dict(row) for row in self.view.table()]}
            else:
                role, epoch = self.view.role(process)
                answer = {"ok": True, "process": process, "role": role, "epoch": epoch}
        except KeyError:
            return error_line(f"no process {process!r}")
        except Exception:                              # noqa: BLE001 -- a bug in the view must not end the server
            _log.exception("control socket %s: answering %r failed", self.path, op)
            return error_line("internal error")
        try:
            encoded = self._encode(answer)
        except ValueError as e:
            return error_line(str(e))
        if op == "watch":
            conn.watching = process
        return encoded

    def _encode(self, message: Mapping[str, Any]) -> bytes:
        """One protocol line; ValueError if it is not JSON or too long."""
        return encode_line(message, self.max_line, log=_log, where=f"control socket {self.path}")

