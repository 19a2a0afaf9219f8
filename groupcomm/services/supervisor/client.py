"""The supervised process's side: who am I, and what does my supervisor say (blocking, no trio).

::

    from groupcomm.services.supervisor import client

    me = client.identity()              # node, process, role, epoch from the environment
    client.status()                     # my row in my supervisor's table
    client.table()                      # every row
    for role in client.role_changes():  # my current role, then every change (blocks)
        ...
    watch = client.watch_role(callback)  # the same in a daemon thread; watch.close() stops it

A supervisor starts its processes with ``GROUPCOMM_NODE``, ``GROUPCOMM_PROCESS``,
``GROUPCOMM_ROLE``, ``GROUPCOMM_DC_EPOCH`` (the domain-controller term, when the
process has one), ``GROUPCOMM_GENERATION`` and ``GROUPCOMM_CONTROL`` (the
control socket, :mod:`.control` documents its protocol) in the environment.

Role changes: a process whose spec says ``live_switch = true`` keeps running
when the supervisor changes its role and learns the new one through
:func:`role_changes` / :func:`watch_role`.  Any other process is restarted with
its new role in ``GROUPCOMM_ROLE`` and ``GROUPCOMM_DC_EPOCH``, so reading
:func:`identity` at start-up is all it needs.

Errors: :class:`NotSupervised` (no supervisor's environment),
:class:`SupervisorGone` (cannot reach it, or it closed the connection),
:class:`ControlError` (it answered with an error).
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Self

from groupcomm.errors import GroupcommError

__all__ = [
    "ControlError",
    "Identity",
    "NotSupervised",
    "Role",
    "RoleWatch",
    "SupervisorGone",
    "identity",
    "role",
    "role_changes",
    "status",
    "table",
    "watch_role",
]

MAX_LINE = 65536          # the protocol's line limit (control.MAX_LINE; not imported: that module needs trio)
TIMEOUT = 5.0             # seconds a request may take


class NotSupervised(GroupcommError):
    """This process was not started by a supervisor (its environment lacks ``GROUPCOMM_*``)."""


class SupervisorGone(GroupcommError):
    """The supervisor cannot be reached, or closed the connection."""


class ControlError(GroupcommError):
    """The supervisor answered a request with an error (e.g. no such process)."""


@dataclass(frozen=True)
class Identity:
    """Who this process is, as its supervisor started it."""

    node: str
    process: str
    role: str
    epoch: int | None          # the domain-controller term (a fencing token), if it has one
    generation: int | None
    control: str | None        # the control socket's path


@dataclass(frozen=True)
class Role:
    """A process's role and domain-controller epoch, as the supervisor says now."""

    process: str
    role: str
    epoch: int | None


def identity(environ: Mapping[str, str] | None = None) -> Identity:
    """This process's identity from its environment (NotSupervised without one)."""
    env = os.environ if environ is None else environ
    node, process = env.get("GROUPCOMM_NODE"), env.get("GROUPCOMM_PROCESS")
    if not node or not process:
        raise NotSupervised("not started by a groupcomm supervisor (GROUPCOMM_NODE/GROUPCOMM_PROCESS unset)")
    return Identity(node=node, process=process, role=env.get("GROUPCOMM_ROLE", ""),
                    epoch=_integer(env.get("GROUPCOMM_DC_EPOCH")), generation=_integer(env.get("GROUPCOMM_GENERATION")),
                    control=env.get("GROUPCOMM_CONTROL") or None)


def status(process: str | None = None, *, path: str | None = None, timeout: float = TIMEOUT) -> dict[str, Any]:
    """The row of ``process`` (default: this one) in the supervisor's table."""
    name = _process(process)
    return _request({"op": "status", "process": name}, path, timeout)["status"]


def role(process: str | None = None, *, path: str | None = None, timeout: float = TIMEOUT) -> Role:
    """The current role of ``process`` (default: this one)."""
    return _role(_request({"op": "role", "process": _process(process)}, path, timeout))


def table(*, path: str | None = None, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
    """Every row of the supervisor's table."""
    return _request({"op": "table"}, path, timeout)["table"]


def role_changes(process: str | None = None, *, path: str | None = None, timeout: float = TIMEOUT) -> RoleWatch:
    """An iterator of ``process``'s role: the current one first, then each change (blocks between)."""
    return RoleWatch(_process(process), _path(path), timeout)


def watch_role(callback: Callable[[Role], Any], process: str | None = None, *,
               on_gone: Callable[[SupervisorGone], Any] | None = None, path: str | None = None,
               timeout: float = TIMEOUT) -> RoleWatch:
    """Call ``callback(role)`` from a daemon thread: the current role, then each change.

    Connects before returning (errors raise here).  When the supervisor goes
    away the thread calls ``on_gone(error)`` and ends; ``close()`` on the
    returned watch stops it quietly.
    """
    watch = role_changes(process, path=path, timeout=timeout)

    def run() -> None:
        try:
            for change in watch:
                callback(change)
        except SupervisorGone as e:
            if on_gone is not None:
                on_gone(e)

    watch.thread = threading.Thread(target=run, name=f"groupcomm-watch-{watch.process}", daemon=True)
    watch.thread.start()
    return watch


class RoleWatch:
    """A ``watch`` connection: iterate for :class:`Role` values; ``close()`` (or ``with``) ends it."""

    def __init__(self, process: str, path: str, timeout: float) -> None:
        self.process = process
        self.thread: threading.Thread | None = None
        self._closed = False
        self._sock = _connect(path, timeout)
        try:
            self._file = self._sock.makefile("rb")
            first = _exchange(self._sock, self._file, {"op": "watch", "process": process})
        except BaseException:
            self._sock.close()
            raise
        self._sock.settimeout(None)                  # events come when they come
        self._next: Role | None = _role(first)

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Role:
        if self._next is not None:
            current, self._next = self._next, None
            return current
        if self._closed:
            raise StopIteration
        try:
            message = _read(self._file)
        except SupervisorGone:
            if self._closed:
                raise StopIteration from None
            self._closed = True                      # the supervisor ended it: nothing left to close
            self._release()
            raise
        if message.get("event") != "role":
            raise ControlError(message.get("error", f"unexpected message {message!r}"))
        return _role(message)

    def close(self) -> None:
        """End the watch; a thread blocked in it stops (without calling ``on_gone``)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)    # wakes a reader blocked in another thread
        except OSError:
            pass
        if self.thread is None or self.thread is threading.current_thread():
            self._release()
        else:
            self.thread.join(timeout=TIMEOUT)
            self._release()

    def _release(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- the wire


def _integer(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None


def _process(process: str | None) -> str:
    if process is not None:
        return process
    name = os.environ.get("GROUPCOMM_PROCESS")
    if not name:
        raise NotSupervised("no process name given and GROUPCOMM_PROCESS is unset")
    return name


def _path(path: str | None) -> str:
    if path is not None:
        return path
    found = os.environ.get("GROUPCOMM_CONTROL")
    if not found:
        raise NotSupervised("GROUPCOMM_CONTROL is unset: this process has no supervisor to ask")
    return found


def _connect(path: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        raise SupervisorGone(f"no supervisor answers at {path}: {e.strerror or e}") from e
    return sock


def _request(request: dict[str, Any], path: str | None, timeout: float) -> dict[str, Any]:
    with _connect(_path(path), timeout) as sock, sock.makefile("rb") as file:
        return _exchange(sock, file, request)


def _exchange(sock: socket.socket, file: Any, request: dict[str, Any]) -> dict[str, Any]:
    try:
        sock.sendall(json.dumps(request, separators=(",", ":")).encode() + b"\n")
    except OSError as e:
        raise SupervisorGone(f"the supervisor closed the connection: {e}") from e
    answer = _read(file)
    if answer.get("ok") is not True:
        raise ControlError(str(answer.get("error", f"unexpected answer {answer!r}")))
    return answer


def _read(file: Any) -> dict[str, Any]:
    try:
        line = file.readline(MAX_LINE + 1)
    except TimeoutError:
        raise SupervisorGone("the supervisor did not answer in time") from None
    except (OSError, ValueError) as e:             # ValueError: closed by close() meanwhile
        raise SupervisorGone(f"the connection to the supervisor broke: {e}") from e
    if not line:
        raise SupervisorGone("the supervisor closed the connection")
    if not line.endswith(b"\n"):
        raise ControlError("the supervisor's answer is longer than the protocol allows")
    try:
        message = json.loads(line)
    except ValueError:
        raise ControlError(f"the supervisor's answer is not JSON: {line[:80]!r}") from None
    if not isinstance(message, dict):
        raise ControlError(f"the supervisor's answer is not a JSON object: {line[:80]!r}")
    return message


def _role(message: dict[str, Any]) -> Role:
    epoch = message.get("epoch")
    return Role(process=str(message.get("process")), role=str(message.get("role")),
                epoch=epoch if isinstance(epoch, int) else None)
