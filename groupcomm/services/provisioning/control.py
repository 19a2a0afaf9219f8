"""The provisioning agent's control socket: how the ``groupcomm group|bundle|config|plan|cluster``
commands reach the local agent (trio; server and client).

Every provisioning agent listens on a Unix stream socket (mode 0600) named
after its node, :func:`default_socket`; :func:`find_socket` finds the one to
use.  The server is a thin shell over the agent's Python API
(``ProvisioningNode``): one request per API method, the same names and
arguments.

Protocol
--------

Newline-delimited JSON, UTF-8, one object per line.  A request line is at most
:data:`MAX_LINE` bytes (64 KiB), an answer line at most :data:`MAX_ANSWER`
(16 MiB: a cluster's status or audit log is larger than a request).  The
client sends a request, the server answers it; a connection may carry several
requests, one after the other::

    {"op": "join_group", "group": "web"}       ->  {"ok": true, "result": null}
    {"op": "bundles", "group": "web"}          ->  {"ok": true, "result": [{...}, ...]}
    {"op": "apply_plan", "plan_path": "/abs/plan.toml", "env": "prod", "batch": 2, "force": false}
                                               ->  {"progress": {...}}   (any number of them)
                                                   {"ok": true, "result": {...}}

Requests and their arguments (:data:`REQUESTS`; a missing optional argument
takes its default, an unknown one is an error): ``create_group``,
``join_group``, ``leave_group`` (group); ``groups``; ``install_bundle`` (path,
group, signature = null, start = false); ``start_bundle``, ``stop_bundle``,
``uninstall_bundle`` (name, group); ``bundles`` (group); ``set_config`` (pid,
values: object of strings, group); ``delete_config`` (pid, key = null, group);
``get_config`` (pid, group); ``configs`` (group); ``require_plan_signatures`` (env, keys);
``require_signatures``
(group, keys: list of ``ed25519 <base64> [comment]`` lines); ``plan_diff``
(plan_path, env); ``apply_plan`` (plan_path, env, batch = null, force =
false); ``plan_status`` (env = null); ``plan_history`` (env);
``rollback_plan`` (env, to = null); ``cluster_status`` (group = null, env =
null); ``history`` (group = null).  File paths must be absolute (the agent
does not share the client's working directory).  Results are the API's values
as JSON (:func:`to_json`: structs and dataclasses become objects).  The API
methods that take a ``user`` keyword (the audit log's "who") get the user name
of the peer (``SO_PEERCRED``), not the agent's own.

The long operations (``install_bundle``, ``apply_plan``, ``rollback_plan``)
stream ``{"progress": EVENT}`` lines before their answer.  Progress is
advisory: when a client reads too slowly for its queue (``queue_lines``), the
events that do not fit are dropped, never the answer.

Errors are answered ``{"ok": false, "error": "why", "kind": KIND}``: ``kind``
is ``"usage"`` when the request cannot work as given (a malformed request, a
bad argument, a configuration error such as a bad plan file: the agent raised
:class:`~groupcomm.errors.ConfigError`) and ``"failed"`` when it was refused
or failed (any other :class:`~groupcomm.errors.GroupcommError`, e.g. a
read-only minority side; the message is the reason).  Anything else the agent
raises is logged and answered ``internal error``; the server keeps running.
A request line that is not a JSON object, not UTF-8 or too long is answered
and the connection closed; other errors leave it open.

Limits (constructor arguments, defaults in brackets): at most
``max_connections`` [16] connections at once (one more is answered ``too many
connections`` and closed); a line must be taken by the client within
``send_timeout`` [5 s] or it is disconnected (which cancels its request's
call: the agent's API is cancellation-safe, what the cluster accepted stays
accepted); a connection that sends no complete request for ``idle_timeout``
[60 s] is closed.  Only peers running as the agent's user or root are served
(``SO_PEERCRED``), as on the supervisor's control socket.

Use::

    async with ProvisioningControlServer(default_socket(node.name), node):
        ...                                         # unlinks the socket on exit

    client = ProvisioningClient(find_socket(None))
    await client.join_group("web")
    result = await client.apply_plan("plan.toml", env="prod", progress=print)
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import logging
import os
import pwd
import tempfile
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import msgspec
import trio

from groupcomm.errors import ConfigError, GroupcommError
from groupcomm.services.unix_socket import UnixSocketServer, encode_line, error_line

__all__ = [
    "MAX_ANSWER",
    "MAX_LINE",
    "REQUESTS",
    "AgentUnreachable",
    "ProvisioningClient",
    "ProvisioningControlServer",
    "RequestFailed",
    "RequestInvalid",
    "SocketNotFound",
    "default_socket",
    "find_socket",
    "socket_dir",
    "to_json",
]

MAX_LINE = 65536
"""The longest request line, in bytes (without its newline)."""
MAX_ANSWER = 16 << 20
"""The longest answer or progress line, in bytes (without its newline)."""
SOCKET_PREFIX = "provisioning-"
SOCKET_SUFFIX = ".sock"

_log = logging.getLogger(__name__)
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


# --------------------------------------------------------------------------- errors (client side)


class AgentUnreachable(GroupcommError):
    """No provisioning agent answers on the socket, or it closed the connection."""


class RequestFailed(GroupcommError):
    """The agent refused or failed a request (``kind: failed``); the message is its reason."""


class RequestInvalid(ConfigError):
    """The agent could not take a request as given (``kind: usage``): a bad argument or file."""


class SocketNotFound(ConfigError):
    """No agent's socket, or several and none chosen (:func:`find_socket`)."""


# --------------------------------------------------------------------------- where the sockets are


def socket_dir(*, create: bool = False) -> Path:
    """The directory of the agents' sockets: ``$XDG_RUNTIME_DIR/groupcomm``, else a private
    (0700) ``groupcomm-<uid>`` directory in the temp dir -- the supervisor's rule."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "groupcomm" if runtime else Path(tempfile.gettempdir()) / f"groupcomm-{os.getuid()}"
    if create:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
    if base.exists() and base.stat().st_uid != os.getuid():
        raise PermissionError(f"{base} belongs to another user; set XDG_RUNTIME_DIR")
    return base


def default_socket(node_name: str, *, create_dir: bool = False) -> Path:
    """The control socket of the agent of ``node_name``: ``<socket_dir>/provisioning-<node>.sock``."""
    if not node_name or "/" in node_name or "\0" in node_name or node_name in (".", ".."):
        raise ConfigError(f"node name {node_name!r} cannot name a socket file")
    return socket_dir(create=create_dir) / f"{SOCKET_PREFIX}{node_name}{SOCKET_SUFFIX}"


def _running() -> dict[str, Path]:
    base = socket_dir()
    found = {}
    if base.is_dir():
        for path in sorted(base.glob(f"{SOCKET_PREFIX}*{SOCKET_SUFFIX}")):
            if path.is_socket():
                found[path.name[len(SOCKET_PREFIX):-len(SOCKET_SUFFIX)]] = path
    return found


def find_socket(node: str | None) -> Path:
    """The socket of ``node``'s agent, or with ``node=None`` the only agent's on this host.

    Raises :class:`SocketNotFound` naming the agents found when there is no such
    socket, none at all, or several and ``node`` is None."""
    running = _running()
    names = ", ".join(running) or "none"
    if node is not None:
        path = default_socket(node)
        if not path.is_socket():
            raise SocketNotFound(f"no provisioning agent of node {node!r} on this host (no socket {path}; "
                                 f"agents found: {names})")
        return path
    if len(running) == 1:
        return next(iter(running.values()))
    if not running:
        raise SocketNotFound(f"no provisioning agent runs on this host (no socket in {socket_dir()}); start one "
                             "with 'groupcomm supervise NODE.toml --cluster C' (a node file with [provisioning])")
    raise SocketNotFound(f"several provisioning agents run on this host ({names}); choose one with --node")


# --------------------------------------------------------------------------- values as JSON


def to_json(value: Any) -> Any:
    """``value`` as JSON-able builtins: msgspec structs and dataclasses become objects (also the
    array-like structs), mappings objects with string keys, sequences and sets lists, paths and
    enums their value, bytes hex."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, msgspec.Struct):
        return {name: to_json(getattr(value, name)) for name in value.__struct_fields__}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, enum.Enum):
        return to_json(value.value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, (set, frozenset)):
        return sorted((to_json(v) for v in value), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return msgspec.to_builtins(value)          # datetime, UUID, Decimal...


# --------------------------------------------------------------------------- requests


class _BadRequest(Exception):
    """The request cannot be served as given (answered kind "usage", the connection stays open)."""


class _Closing(Exception):
    """Answer this error and close the connection."""


_REQUIRED = object()


def _string(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _BadRequest(f"{name!r} must be a non-empty string")
    return value


def _absolute(name: str, value: Any) -> str:
    if not os.path.isabs(_string(name, value)):
        raise _BadRequest(f"{name!r} must be an absolute path (got {value!r})")
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _BadRequest(f"{name!r} must be true or false")
    return value


def _count(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _BadRequest(f"{name!r} must be a non-negative integer")
    return value


def _strings(name: str, value: Any) -> dict[str, str]:
    if (not isinstance(value, dict) or not value
            or not all(isinstance(k, str) and k and isinstance(v, str) for k, v in value.items())):
        raise _BadRequest(f"{name!r} must be a non-empty object of strings")
    return value


def _lines(name: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _BadRequest(f"{name!r} must be a list of strings")
    return value


def _optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    def checked(name: str, value: Any) -> Any:
        return None if value is None else check(name, value)
    return checked


def _public_keys(lines: list[str]) -> list[Any]:
    # imported here: signing needs cryptography, which the other requests do not
    from groupcomm.services.provisioning.signing import parse_public_key

    return [parse_public_key(line, where=f"key {n}") for n, line in enumerate(lines, 1)]


Progress = Callable[[Any], None]
Call = Callable[[Any, dict[str, Any], Progress], Any]


@dataclasses.dataclass(frozen=True)
class Request:
    """One request of the protocol: its arguments (name -> (check, default)) and the API call it makes."""

    params: Mapping[str, tuple[Callable[[str, Any], Any], Any]]
    call: Call
    streams: bool = False

    def arguments(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """The checked arguments of ``request`` (:class:`_BadRequest` if one is wrong)."""
        unknown = sorted(set(request) - set(self.params) - {"op"})
        if unknown:
            raise _BadRequest(f"unknown argument {unknown[0]!r} (arguments: {', '.join(self.params) or 'none'})")
        out = {}
        for name, (check, default) in self.params.items():
            if name not in request:
                if default is _REQUIRED:
                    raise _BadRequest(f"missing argument {name!r}")
                out[name] = default
            else:
                out[name] = check(name, request[name])
        return out


def _by(method: Callable[..., Any], args: Mapping[str, Any]) -> dict[str, Any]:
    """``user=`` the requesting peer's user name, for the API methods that take it (the audit log
    records who made a change, not the agent's own user)."""
    try:
        takes_user = "user" in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return {}
    return {"user": args[_PEER]} if takes_user else {}


_PEER = "\0peer"                                        # the peer's user name, among a call's arguments
_GROUP = {"group": (_string, _REQUIRED)}
_NAMED = {"name": (_string, _REQUIRED), **_GROUP}

REQUESTS: dict[str, Request] = {
    "create_group": Request(_GROUP, lambda n, a, p: n.create_group(a["group"], **_by(n.create_group, a))),
    "join_group": Request(_GROUP, lambda n, a, p: n.join_group(a["group"], **_by(n.join_group, a))),
    "leave_group": Request(_GROUP, lambda n, a, p: n.leave_group(a["group"], **_by(n.leave_group, a))),
    "groups": Request({}, lambda n, a, p: n.groups()),
    "install_bundle": Request(
        {"path": (_absolute, _REQUIRED), **_GROUP, "signature": (_optional(_absolute), None),
         "start": (_flag, False)},
        lambda n, a, p: n.install_bundle(a["path"], group=a["group"], signature=a["signature"], start=a["start"],
                                         progress=p, **_by(n.install_bundle, a)),
        streams=True),
    "start_bundle": Request(_NAMED, lambda n, a, p: n.start_bundle(a["name"], group=a["group"], **_by(n.start_bundle, a))),
    "stop_bundle": Request(_NAMED, lambda n, a, p: n.stop_bundle(a["name"], group=a["group"], **_by(n.stop_bundle, a))),
    "uninstall_bundle": Request(_NAMED, lambda n, a, p: n.uninstall_bundle(a["name"], group=a["group"],
                                                                   **_by(n.uninstall_bundle, a))),
    "bundles": Request(_GROUP, lambda n, a, p: n.bundles(a["group"])),
    "set_config": Request({"pid": (_string, _REQUIRED), "values": (_strings, _REQUIRED), **_GROUP},
                          lambda n, a, p: n.set_config(a["pid"], a["values"], group=a["group"],
                                                       **_by(n.set_config, a))),
    "delete_config": Request({"pid": (_string, _REQUIRED), "key": (_optional(_string), None), **_GROUP},
                             lambda n, a, p: n.delete_config(a["pid"], a["key"], group=a["group"],
                                                          **_by(n.delete_config, a))),
    "get_config": Request({"pid": (_string, _REQUIRED), **_GROUP},
                          lambda n, a, p: n.get_config(a["pid"], group=a["group"])),
    "configs": Request(_GROUP, lambda n, a, p: n.configs(a["group"])),
    "require_signatures": Request({**_GROUP, "keys": (_lines, _REQUIRED)},
                                  lambda n, a, p: n.require_signatures(a["group"], _public_keys(a["keys"]),
                                                                       **_by(n.require_signatures, a))),
    "require_plan_signatures": Request({"env": (_string, _REQUIRED), "keys": (_lines, _REQUIRED)},
                                       lambda n, a, p: n.require_plan_signatures(
                                           a["env"], _public_keys(a["keys"]), **_by(n.require_plan_signatures, a))),
    "plan_diff": Request({"plan_path": (_absolute, _REQUIRED), "env": (_string, _REQUIRED)},
                         lambda n, a, p: n.plan_diff(a["plan_path"], env=a["env"])),
    "apply_plan": Request(
        {"plan_path": (_absolute, _REQUIRED), "env": (_string, _REQUIRED), "batch": (_optional(_count), None),
         "force": (_flag, False)},
        lambda n, a, p: n.apply_plan(a["plan_path"], env=a["env"], batch=a["batch"], force=a["force"], progress=p,
                                     **_by(n.apply_plan, a)),
        streams=True),
    "plan_status": Request({"env": (_optional(_string), None)}, lambda n, a, p: n.plan_status(a["env"])),
    "plan_history": Request({"env": (_string, _REQUIRED)}, lambda n, a, p: n.plan_history(a["env"])),
    "rollback_plan": Request({"env": (_string, _REQUIRED), "to": (_optional(_count), None)},
                             lambda n, a, p: n.rollback_plan(a["env"], to=a["to"], progress=p,
                                                             **_by(n.rollback_plan, a)), streams=True),
    "cluster_status": Request({"group": (_optional(_string), None), "env": (_optional(_string), None)},
                              lambda n, a, p: n.cluster_status(group=a["group"], env=a["env"])),
    "history": Request({"group": (_optional(_string), None)}, lambda n, a, p: n.history(group=a["group"])),
}
"""Every request the server takes, by ``op``."""


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _reason(exc: BaseException) -> GroupcommError | None:
    """The GroupcommError to answer for ``exc`` (the first one in an exception group), or None."""
    if isinstance(exc, GroupcommError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _reason(inner)) is not None:
                return found
    return None


# --------------------------------------------------------------------------- the server


class ProvisioningControlServer:
    """The control socket at ``path`` serving ``node`` (a ``ProvisioningNode``, or anything with its
    methods): an async context manager owning its nursery."""

    def __init__(self, path: str | os.PathLike[str], node: Any, *, max_connections: int = 16,
                 max_line: int = MAX_LINE, max_answer: int = MAX_ANSWER, queue_lines: int = 64,
                 send_timeout: float = 5.0, idle_timeout: float = 60.0,
                 peer_uids: Collection[int] | None = None) -> None:
        self.path = os.fspath(path)
        self.node = node
        self.max_connections = max_connections
        self.max_line = max_line
        self.max_answer = max_answer
        self.queue_lines = queue_lines
        self.send_timeout = send_timeout
        self.idle_timeout = idle_timeout
        self.peer_uids = frozenset((os.getuid(), 0) if peer_uids is None else peer_uids)
        self.dropped_progress = 0
        """Progress events dropped because a client read too slowly."""
        self._server = UnixSocketServer(self.path, what="provisioning agent", serve=self._serve_peer,
                                        refuse=self._refuse, max_connections=max_connections,
                                        peer_uids=self.peer_uids)

    @property
    def connections(self) -> int:
        """How many clients are connected now."""
        return self._server.connections

    # ------------------------------------------------------------------ lifetime

    async def __aenter__(self) -> Self:
        await self._server.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> bool:
        return await self._server.__aexit__(*exc)

    # ------------------------------------------------------------------ connections

    async def _refuse(self, stream: trio.SocketStream, reason: str) -> None:
        with trio.move_on_after(0.5):
            try:
                await stream.send_all(error_line(reason, "failed"))
            except _BROKEN:
                pass
        with trio.move_on_after(0.05):         # take the request sent meanwhile: closing a Unix
            try:                               # socket with unread data resets it, losing the answer
                await stream.receive_some(self.max_line)
            except _BROKEN:
                pass
        await stream.aclose()

    async def _serve_peer(self, stream: trio.SocketStream, uid: int) -> None:
        await self._serve(stream, _user_name(uid))

    async def _serve(self, stream: trio.SocketStream, user: str) -> None:
        buffer = bytearray()
        try:
            while True:
                try:
                    line = await self._next_line(stream, buffer)
                    if line is None:
                        return
                    await self._handle(stream, self._parse(line), user)
                except _Closing as e:
                    with trio.move_on_after(self.send_timeout):
                        await stream.send_all(error_line(str(e), "usage"))
                    return
        except* _BROKEN:
            pass                                       # the client went away (or did not read)
        finally:
            await stream.aclose()

    async def _next_line(self, stream: trio.SocketStream, buffer: bytearray) -> bytes | None:
        """The next request line; None when the client closed the connection."""
        deadline = trio.current_time() + self.idle_timeout
        while (end := buffer.find(b"\n")) < 0:
            if len(buffer) > self.max_line:
                raise _Closing(f"line too long (over {self.max_line} bytes)")
            with trio.move_on_at(deadline):
                data = await stream.receive_some(65536)
                if not data:
                    return None
                buffer += data
                continue
            raise _Closing("idle for too long")
        line = bytes(buffer[:end])
        del buffer[:end + 1]
        if len(line) > self.max_line:
            raise _Closing(f"line too long (over {self.max_line} bytes)")
        return line

    async def _send(self, stream: trio.SocketStream, line: bytes) -> None:
        with trio.move_on_after(self.send_timeout):
            await stream.send_all(line)
            return
        raise trio.BrokenResourceError("the client does not read")

    # ------------------------------------------------------------------ requests

    @staticmethod
    def _parse(line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError):
            raise _Closing("malformed request: not JSON") from None
        if not isinstance(request, dict):
            raise _Closing("malformed request: not a JSON object")
        return request

    async def _handle(self, stream: trio.SocketStream, request: dict[str, Any], user: str) -> None:
        op = request.get("op")
        spec = REQUESTS.get(op) if isinstance(op, str) else None
        if spec is None:
            await self._send(stream, error_line(f"unknown op {op!r} ({', '.join(REQUESTS)})", "usage"))
            return
        try:
            args = spec.arguments(request)
        except _BadRequest as e:
            await self._send(stream, error_line(f"{op}: {e}", "usage"))
            return
        args[_PEER] = user
        if not spec.streams:
            await self._send(stream, await self._call(op, spec, args, lambda event: None))
            return
        events, pending = trio.open_memory_channel[bytes](self.queue_lines)

        def progress(event: Any) -> None:
            try:
                line = self._encode({"progress": to_json(event)})
                events.send_nowait(line)
            except trio.WouldBlock:
                self.dropped_progress += 1             # advisory: a slow reader loses events, not the answer
            except trio.ClosedResourceError:
                pass
            except ValueError:
                _log.error("provisioning socket %s: cannot encode progress %r", self.path, event)

        async def forward() -> None:
            async for line in pending:
                await self._send(stream, line)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(forward)
            try:
                answer = await self._call(op, spec, args, progress)
            finally:
                events.close()                         # forward() drains what is queued, then ends
        await self._send(stream, answer)

    async def _call(self, op: str, spec: Request, args: dict[str, Any], progress: Progress) -> bytes:
        """The answer line of one API call."""
        try:
            result = spec.call(self.node, args, progress)
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:                       # noqa: BLE001 -- a bug in the node must not end the server
            reason = _reason(exc)
            if reason is None:
                _log.error("provisioning socket %s: %s failed", self.path, op, exc_info=exc)
                return error_line("internal error", "failed")
            return error_line(" ".join(str(reason).split()) or type(reason).__name__,
                               "usage" if isinstance(reason, ConfigError) else "failed")
        try:
            return self._encode({"ok": True, "result": to_json(result)})
        except ValueError as e:
            return error_line(str(e), "failed")

    def _encode(self, message: Mapping[str, Any]) -> bytes:
        """One protocol line; ValueError if it is not JSON or too long."""
        return encode_line(message, self.max_answer, log=_log, where=f"provisioning socket {self.path}")


# --------------------------------------------------------------------------- the client


class ProvisioningClient:
    """Talks to the agent at ``path``: one connection per request, one method per request.

    Every method returns the decoded JSON result; it raises :class:`RequestFailed`
    (refused or failed: the agent's reason), :class:`RequestInvalid` (the agent could
    not take the request as given) or :class:`AgentUnreachable`.  ``timeout`` bounds
    the requests that do not stream progress (the long operations wait as long as
    they take).  ``progress`` callbacks get each progress event (a dict)."""

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 30.0) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout

    async def request(self, op: str, *, progress: Callable[[dict[str, Any]], Any] | None = None,
                      **args: Any) -> Any:
        """Send ``{"op": op, **args}``; pass progress events to ``progress``; return the result."""
        line = json.dumps({"op": op, **args}, separators=(",", ":")).encode() + b"\n"
        if len(line) > MAX_LINE + 1:
            raise RequestInvalid(f"{op}: the request is too long ({len(line) - 1} bytes, the limit is {MAX_LINE})")
        streams = op in REQUESTS and REQUESTS[op].streams
        try:
            if streams:
                return await self._exchange(line, progress)
            with trio.fail_after(self.timeout):
                return await self._exchange(line, progress)
        except trio.TooSlowError:
            raise AgentUnreachable(f"the provisioning agent at {self.path} did not answer within "
                                   f"{self.timeout:g} s") from None
        except _BROKEN as e:
            raise AgentUnreachable(f"the provisioning agent at {self.path} went away: {e}") from e

    async def _exchange(self, line: bytes, progress: Callable[[dict[str, Any]], Any] | None) -> Any:
        try:
            stream = await trio.open_unix_socket(self.path)
        except OSError as e:
            raise AgentUnreachable(f"no provisioning agent answers at {self.path}: {e.strerror or e}") from e
        async with stream:
            await stream.send_all(line)
            buffer = bytearray()
            while True:
                message = await self._read(stream, buffer)
                if "progress" in message and "ok" not in message:
                    if progress is not None:
                        progress(message["progress"])
                    continue
                if message.get("ok") is True:
                    return message.get("result")
                error = str(message.get("error", f"unexpected answer {message!r}"))
                raise (RequestInvalid if message.get("kind") == "usage" else RequestFailed)(error)

    async def _read(self, stream: trio.SocketStream, buffer: bytearray) -> dict[str, Any]:
        while (end := buffer.find(b"\n")) < 0:
            if len(buffer) > MAX_ANSWER:
                raise AgentUnreachable("the agent's answer is longer than the protocol allows")
            data = await stream.receive_some(65536)
            if not data:
                raise AgentUnreachable(f"the provisioning agent at {self.path} closed the connection")
            buffer += data
        line = bytes(buffer[:end])
        del buffer[:end + 1]
        try:
            message = json.loads(line)
        except ValueError:
            raise AgentUnreachable(f"the agent's answer is not JSON: {line[:80]!r}") from None
        if not isinstance(message, dict):
            raise AgentUnreachable(f"the agent's answer is not a JSON object: {line[:80]!r}")
        return message

    # ------------------------------------------------------------------ one method per request

    async def create_group(self, group: str) -> None:
        return await self.request("create_group", group=group)

    async def join_group(self, group: str) -> None:
        return await self.request("join_group", group=group)

    async def leave_group(self, group: str) -> None:
        return await self.request("leave_group", group=group)

    async def groups(self) -> list[dict[str, Any]]:
        return await self.request("groups")

    async def install_bundle(self, path: str | os.PathLike[str], *, group: str,
                             signature: str | os.PathLike[str] | None = None, start: bool = False,
                             progress: Callable[[dict[str, Any]], Any] | None = None) -> Any:
        return await self.request("install_bundle", path=_abspath(path), group=group,
                                  signature=None if signature is None else _abspath(signature), start=start,
                                  progress=progress)

    async def start_bundle(self, name: str, *, group: str) -> Any:
        return await self.request("start_bundle", name=name, group=group)

    async def stop_bundle(self, name: str, *, group: str) -> Any:
        return await self.request("stop_bundle", name=name, group=group)

    async def uninstall_bundle(self, name: str, *, group: str) -> Any:
        return await self.request("uninstall_bundle", name=name, group=group)

    async def bundles(self, group: str) -> list[dict[str, Any]]:
        return await self.request("bundles", group=group)

    async def set_config(self, pid: str, values: Mapping[str, str], *, group: str) -> Any:
        return await self.request("set_config", pid=pid, values=dict(values), group=group)

    async def delete_config(self, pid: str, key: str | None = None, *, group: str) -> Any:
        return await self.request("delete_config", pid=pid, key=key, group=group)

    async def get_config(self, pid: str, *, group: str) -> dict[str, str]:
        return await self.request("get_config", pid=pid, group=group)

    async def configs(self, group: str) -> dict[str, dict[str, str]]:
        return await self.request("configs", group=group)

    async def require_signatures(self, group: str, keys: Sequence[str]) -> Any:
        """``keys``: ``ed25519 <base64> [comment]`` lines (``PublicKey.to_line()``)."""
        return await self.request("require_signatures", group=group, keys=list(keys))

    async def require_plan_signatures(self, env: str, keys: Sequence[str]) -> Any:
        """``keys``: ``ed25519 <base64> [comment]`` lines (``PublicKey.to_line()``)."""
        return await self.request("require_plan_signatures", env=env, keys=list(keys))

    async def plan_diff(self, plan_path: str | os.PathLike[str], *, env: str) -> Any:
        return await self.request("plan_diff", plan_path=_abspath(plan_path), env=env)

    async def apply_plan(self, plan_path: str | os.PathLike[str], *, env: str, batch: int | None = None,
                         force: bool = False, progress: Callable[[dict[str, Any]], Any] | None = None) -> Any:
        return await self.request("apply_plan", plan_path=_abspath(plan_path), env=env, batch=batch, force=force,
                                  progress=progress)

    async def plan_status(self, env: str | None = None) -> list[dict[str, Any]]:
        return await self.request("plan_status", env=env)

    async def plan_history(self, env: str) -> list[dict[str, Any]]:
        return await self.request("plan_history", env=env)

    async def rollback_plan(self, env: str, *, to: int | None = None,
                            progress: Callable[[dict[str, Any]], Any] | None = None) -> Any:
        return await self.request("rollback_plan", env=env, to=to, progress=progress)

    async def cluster_status(self, *, group: str | None = None, env: str | None = None) -> Any:
        return await self.request("cluster_status", group=group, env=env)

    async def history(self, *, group: str | None = None) -> list[dict[str, Any]]:
        return await self.request("history", group=group)


def _abspath(path: str | os.PathLike[str]) -> str:
    return os.path.abspath(os.fspath(path))
