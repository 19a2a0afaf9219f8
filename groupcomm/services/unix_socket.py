"""A local control socket (trio): the listening half both services' control servers share.

:class:`UnixSocketServer` owns a Unix stream socket at ``path``, mode 0600:

* it refuses to replace a path that is not a socket, or a socket someone
  listens on (``EADDRINUSE``), and removes a dead one (nobody answers);
* on exit it unlinks the socket only if it is still its own (same inode);
* it accepts connections while fewer than ``max_connections`` are served, from
  peers whose uid (``SO_PEERCRED``) is in ``peer_uids`` (default: this user and
  root); a refused peer is handed to ``refuse(stream, reason)`` (which answers
  and closes it), an accepted one to ``serve(stream, uid)`` in the server's
  nursery; running out of descriptors or memory is logged and retried.

Both servers speak newline-delimited JSON: :func:`encode_line` makes one line
within the server's line limit, :func:`error_line` an ``{"ok": false, ...}``
answer.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any, Self

import trio

__all__ = ["UnixSocketServer", "encode_line", "error_line", "peer_uid"]

_log = logging.getLogger(__name__)
_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


def encode_line(message: Mapping[str, Any], limit: int, *, log: logging.Logger, where: str) -> bytes:
    """``message`` as one compact JSON line (newline included).

    ValueError (its text is the answer's error) if it is not JSON -- logged to ``log`` as an error
    of ``where`` (e.g. ``"control socket /run/x.sock"``) -- or longer than ``limit`` bytes."""
    try:
        line = json.dumps(message, separators=(",", ":"), allow_nan=False).encode() + b"\n"
    except (TypeError, ValueError) as e:
        log.error("%s: cannot encode %r: %s", where, message, e)
        raise ValueError("internal error: the answer is not JSON") from None
    if len(line) > limit + 1:
        raise ValueError(f"answer too long ({len(line) - 1} bytes, the limit is {limit})")
    return line


def error_line(why: str, kind: str | None = None) -> bytes:
    """An error answer line: ``{"ok": false, "error": why}``, with ``"kind": kind`` if given."""
    answer: dict[str, Any] = {"ok": False, "error": why}
    if kind is not None:
        answer["kind"] = kind
    return json.dumps(answer, separators=(",", ":")).encode() + b"\n"


def peer_uid(stream: trio.SocketStream) -> int | None:
    """The uid of the process at the other end of a Unix stream (None: unknown)."""
    try:
        creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    return struct.unpack("3i", creds)[1]


class UnixSocketServer:
    """The listening socket of a control server (see the module docstring); ``what`` names the
    server in errors and logs ("supervisor", "provisioning agent")."""

    def __init__(self, path: str | os.PathLike[str], *, what: str,
                 serve: Callable[[trio.SocketStream, int], Awaitable[Any]],
                 refuse: Callable[[trio.SocketStream, str], Awaitable[Any]],
                 max_connections: int, peer_uids: Collection[int] | None = None) -> None:
        self.path = os.fspath(path)
        self.what = what
        self.max_connections = max_connections
        self.peer_uids = frozenset((os.getuid(), 0) if peer_uids is None else peer_uids)
        self._serve = serve
        self._refuse = refuse
        self._served = 0
        self._listener: trio.SocketListener | None = None
        self._inode: tuple[int, int] | None = None
        self._nursery_manager: Any = None
        self._nursery: trio.Nursery | None = None

    @property
    def connections(self) -> int:
        """How many connections are served now."""
        return self._served

    async def __aenter__(self) -> Self:
        await self._remove_stale()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(self.path)
            os.chmod(self.path, 0o600)
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            sock.listen(min(self.max_connections, socket.SOMAXCONN))
        except BaseException:
            sock.close()
            self._unlink()
            raise
        self._listener = trio.SocketListener(sock)
        self._nursery_manager = trio.open_nursery()
        self._nursery = await self._nursery_manager.__aenter__()
        self._nursery.start_soon(self._accept, self._nursery)
        return self

    async def __aexit__(self, *exc: object) -> bool:
        assert self._nursery is not None and self._listener is not None
        self._nursery.cancel_scope.cancel()
        try:
            return bool(await self._nursery_manager.__aexit__(*exc))
        finally:
            await self._listener.aclose()
            self._unlink()

    async def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(errno.EEXIST, "not a socket; refusing to replace it", self.path)
        try:
            with trio.fail_after(2.0):
                probe = await trio.open_unix_socket(self.path)
        except (OSError, trio.TooSlowError):
            os.unlink(self.path)                       # nobody listens: a dead server's socket
            return
        await probe.aclose()
        raise OSError(errno.EADDRINUSE, f"another {self.what} is listening on this socket", self.path)

    def _unlink(self) -> None:
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:  # never another server's socket
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    async def _accept(self, nursery: trio.Nursery) -> None:
        assert self._listener is not None
        while True:
            try:
                stream = await self._listener.accept()
            except OSError as e:
                if e.errno not in _RESOURCE_ERRORS:
                    raise
                _log.warning("%s socket %s: accept failed (%s); retrying", self.what, self.path, e)
                await trio.sleep(0.1)
                continue
            uid = peer_uid(stream)
            if self._served >= self.max_connections:
                await self._refuse(stream, "too many connections")
            elif uid is None:
                await self._refuse(stream, "cannot identify the peer")
            elif uid not in self.peer_uids:
                await self._refuse(stream, "permission denied")
            else:
                self._served += 1
                nursery.start_soon(self._served_by, stream, uid)

    async def _served_by(self, stream: trio.SocketStream, uid: int) -> None:
        try:
            await self._serve(stream, uid)
        finally:
            self._served -= 1
