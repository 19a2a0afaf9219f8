"""The node file: which processes a supervisor keeps alive, and how.

A node file is TOML::

    node = "n1"                       # optional; default: the supervisor's name

    [[process]]
    name = "web"
    command = ["python", "-m", "http.server", "8080"]
    env = { PYTHONUNBUFFERED = "1" }
    cwd = "/srv/web"                  # relative paths are relative to the node file
    restart = "always"                # "always" | "on-failure" | "never"
    backoff = { initial = "500ms", max = "30s", reset_after = "10s" }
    stop_signal = "SIGTERM"
    stop_grace = "5s"
    health = { kind = "http", url = "http://127.0.0.1:8080/", interval = "2s", timeout = "1s", failures = 3 }
    log = { directory = "logs", max_bytes = "1MiB", keep = 3 }

Strings may name environment variables (``"${HOME}/srv"``, ``"${PORT:8080}"``)
as in stack files.  Every mistake is a :class:`~groupcomm.errors.ConfigError`
naming the file, the process and the field.  This module does no I/O beyond
reading the file in :func:`load_node_file`; relative paths are kept as written
and resolved by the driver against :attr:`NodeSpec.base_dir`.
"""

from __future__ import annotations

import dataclasses
import re
import signal
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from groupcomm.config.loader import substitute_env
from groupcomm.config.units import Duration, Size, check_keys, config_error, parse_duration, parse_size
from groupcomm.errors import ConfigError

__all__ = [
    "DOMAIN_CONTROLLER",
    "STANDBY",
    "Backoff",
    "ClusterSettings",
    "HealthCheck",
    "LogSettings",
    "NodeSpec",
    "ProcessSpec",
    "load_node_file",
    "parse_node",
    "signal_number",
]

DOMAIN_CONTROLLER = "domain-controller"
"""The role of the process that runs on exactly one node of the primary component."""
STANDBY = "standby"
"""The role of a ``live_switch`` domain controller on the nodes that do not run the controller."""

RestartPolicy = Literal["always", "on-failure", "never"]
ProbeKind = Literal["command", "http", "tcp", "python"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_ENTRY_POINT = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


@dataclass(frozen=True)
class Backoff:
    """How long to wait before restarting a process that died or was unhealthy."""

    initial: Duration = 0.5
    """The first delay after a failure; each further failure doubles it."""
    max: Duration = 30.0
    """The longest delay; doubling stops here."""
    reset_after: Duration = 10.0
    """A process that ran healthy this long before it died starts again from ``initial``."""


@dataclass(frozen=True)
class HealthCheck:
    """A probe run while the process is alive, besides watching that it is alive."""

    kind: ProbeKind
    """What to probe: a command's exit status, an HTTP GET, a TCP connect, or a Python callable."""
    command: tuple[str, ...] = ()
    """``kind = "command"``: the argv to run; exit status 0 is healthy."""
    url: str = ""
    """``kind = "http"``: the URL to GET; a 2xx answer is healthy."""
    host: str = "127.0.0.1"
    """``kind = "tcp"``: the host to connect to."""
    port: int = 0
    """``kind = "tcp"``: the port to connect to; a connection accepted is healthy."""
    entry_point: str = ""
    """``kind = "python"``: ``"module:function"``, called with a ProbeTarget in a worker thread;
    returning ``False`` or raising is unhealthy, anything else healthy."""
    interval: Duration = 5.0
    """Time from one probe's result to the next probe (the first runs this long after the start)."""
    timeout: Duration = 2.0
    """A probe that has not answered within this is a failure."""
    failures: int = 3
    """This many failures in a row and the process is restarted (``unhealthy`` from the first)."""


@dataclass(frozen=True)
class LogSettings:
    """Where a process's stdout and stderr go, and how the file is rotated."""

    directory: str = "logs"
    """The directory of ``NAME.log`` (relative paths are relative to the node file)."""
    max_bytes: Size = 10 * 1024 * 1024
    """Rotate when the file would grow beyond this."""
    keep: int = 5
    """How many rotated files (``NAME.log.1`` newest .. ``NAME.log.KEEP``) to keep."""


@dataclass(frozen=True)
class ProcessSpec:
    """One supervised process (a ``[[process]]`` entry)."""

    name: str
    """Unique on the node: letters, digits, ``_``, ``.``, ``-``."""
    command: tuple[str, ...]
    """The argv; the program is looked up on ``PATH``."""
    env: Mapping[str, str] = field(default_factory=lambda: types.MappingProxyType({}))
    """Variables added to the supervisor's environment (besides ``GROUPCOMM_NODE``,
    ``GROUPCOMM_PROCESS`` and ``GROUPCOMM_ROLE``, which are always set)."""
    cwd: str = ""
    """The working directory (relative to the node file); empty: the node file's directory."""
    restart: RestartPolicy = "on-failure"
    """``always``: restart whenever it ends; ``on-failure``: after a non-zero exit, a signal or
    failed health; ``never``: leave it ended."""
    backoff: Backoff = Backoff()
    """The delays between restarts."""
    stop_signal: str = "SIGTERM"
    """The signal that asks the process to stop (sent to its process group)."""
    stop_grace: Duration = 10.0
    """How long a stopping process has before it gets SIGKILL."""
    health: HealthCheck | None = None
    """An optional probe; without one, alive is healthy."""
    log: LogSettings = LogSettings()
    """Where its output goes."""
    role: str = ""
    """A free-form role passed in ``GROUPCOMM_ROLE``; ``"domain-controller"`` places the process
    on exactly one node of the primary component (by the cluster supervisor)."""
    eligible: tuple[str, ...] = ()
    """Nodes that may host a domain controller or a replica; empty: every node."""
    replicas: int | None = None
    """Run this many instances cluster-wide (placed by the cluster supervisor) instead of one per node."""
    live_switch: bool = False
    """A domain controller that can take the role while running: it runs as ``standby`` on
    every node that can host it and is promoted in place (its role arrives through
    :mod:`~groupcomm.services.supervisor.client`); losing the role restarts it as a standby.
    Otherwise a domain controller runs only where it is the controller."""

    @property
    def cluster_placed(self) -> bool:
        """Whether the cluster decides where this runs (a domain controller or replicas)."""
        return self.role == DOMAIN_CONTROLLER or self.replicas is not None

    @property
    def standby(self) -> bool:
        """A domain controller that runs as a standby until promoted (``live_switch``)."""
        return self.role == DOMAIN_CONTROLLER and self.live_switch


@dataclass(frozen=True)
class ClusterSettings:
    """The node file's ``[cluster]`` table: how the cluster supervisor fences domain controllers.

    The fencing rule (docs/supervisor.rst derives it)::

        fencing_delay >= token_timeout + liveness_check + lease + kill_allowance

    ``None`` derives a value from the stack's ``token_timeout`` when the supervisor starts.
    """

    space: str = "groupcomm.supervisor"
    """The space supervisors publish their tables in; placed processes use ``SPACE/PROCESS``."""
    members: tuple[str, ...] = ()
    """The names of the cluster's supervisors: ``groupcomm supervise`` makes them the
    QUORUM layer's ``expected_members``, so a majority of them is primary and visitors
    (``groupcomm ps``) have no vote.  Placed processes need a listed cluster."""
    lease: Duration | None = None
    """How long a domain controller may run without its supervisor renewing its lease
    (default ``token_timeout + 4 * consensus``, so a membership change does not stop it)."""
    fencing_delay: Duration | None = None
    """How long a newly chosen host waits before it starts the domain controller
    (default: the smallest value the rule allows)."""
    kill_allowance: Duration = 0.5
    """Network delay, scheduling and the kill itself: time the rule adds on top of the timers."""
    liveness_check: Duration | None = None
    """How often the supervisor looks whether its ring still sees tokens (default ``token_timeout / 4``)."""


@dataclass(frozen=True)
class NodeSpec:
    """A parsed node file."""

    source: str
    """The file's path (or ``<node>`` for specs built in code)."""
    processes: tuple[ProcessSpec, ...]
    """The processes, in file order."""
    node: str = ""
    """The node's name, if the file gives one."""
    base_dir: str = ""
    """Where relative ``cwd`` and log directories start: the node file's directory."""
    cluster: ClusterSettings = ClusterSettings()
    """The ``[cluster]`` table."""
    provisioning: Mapping[str, Any] | None = None
    """The ``[provisioning]`` table as written (``${VAR}`` substituted), for the provisioning
    agent (:mod:`groupcomm.services.provisioning.settings` checks it); None: no agent."""

    def process(self, name: str) -> ProcessSpec:
        for p in self.processes:
            if p.name == name:
                return p
        raise KeyError(name)


# --------------------------------------------------------------------------- parsing


def signal_number(name: str) -> int:
    """The number of a signal name such as ``"SIGTERM"``; ValueError if unknown."""
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise ValueError(f"unknown signal {name!r}") from None


def load_node_file(path: str | Path, *, environ: Mapping[str, str] | None = None) -> NodeSpec:
    """Read and check a node file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the node file: {e.strerror or e}") from None
    return parse_node(text, source=str(path), base_dir=str(path.resolve().parent), environ=environ)


def parse_node(text: str, *, source: str = "<node>", base_dir: str = "",
               environ: Mapping[str, str] | None = None) -> NodeSpec:
    """Check a node file's text; ``source`` names it in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    _unknown(data, {"node", "process", "cluster", "provisioning"}, source)
    node = data.get("node", "")
    if not isinstance(node, str):
        raise config_error(f"{source}: node", "expected a string", node)
    node = substitute_env(node, where=f"{source}: node", environ=environ)
    entries = data.get("process", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"{source}: 'process' must be [[process]] tables")
    processes: list[ProcessSpec] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        spec = parse_process(entry, where=f"{source}: process #{i + 1}", environ=environ)
        if spec.name in seen:
            raise ConfigError(f"{source}: process {spec.name!r}: name: a second process with this name")
        seen.add(spec.name)
        processes.append(spec)
    cluster = _cluster(_substitute(data.get("cluster", {}), environ, f"{source}: cluster"), f"{source}: cluster")
    provisioning = data.get("provisioning")
    if provisioning is not None:
        if not isinstance(provisioning, dict):
            raise ConfigError(f"{source}: 'provisioning' must be a [provisioning] table")
        provisioning = _substitute(provisioning, environ, f"{source}: provisioning")
    return NodeSpec(source=source, processes=tuple(processes), node=node, base_dir=base_dir, cluster=cluster,
                    provisioning=provisioning)


def parse_process(entry: Mapping[str, Any], *, where: str = "<process>",
                  environ: Mapping[str, str] | None = None) -> ProcessSpec:
    """One ``[[process]]`` table as a ProcessSpec; ``where`` prefixes errors."""
    entry = _substitute(dict(entry), environ, where)
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise config_error(f"{where}: name", "expected a name of letters, digits, '_', '.', '-'", name)
    where = f"{where.rsplit(': ', 1)[0]}: process {name!r}" if ": process #" in where else f"{where} {name!r}"
    _unknown(entry, {f.name for f in dataclasses.fields(ProcessSpec)}, where)
    if "command" not in entry:
        raise config_error(f"{where}: command", "missing (an argv list such as [\"python\", \"app.py\"])")
    kw: dict[str, Any] = {"name": name, "command": _argv(entry["command"], f"{where}: command")}
    if "env" in entry:
        kw["env"] = _env(entry["env"], f"{where}: env")
    if "cwd" in entry:
        kw["cwd"] = _string(entry["cwd"], f"{where}: cwd")
    if "restart" in entry:
        kw["restart"] = _choice(entry["restart"], ("always", "on-failure", "never"), f"{where}: restart")
    if "backoff" in entry:
        kw["backoff"] = _backoff(entry["backoff"], f"{where}: backoff")
    if "stop_signal" in entry:
        kw["stop_signal"] = _signal(entry["stop_signal"], f"{where}: stop_signal")
    if "stop_grace" in entry:
        kw["stop_grace"] = _duration(entry["stop_grace"], f"{where}: stop_grace")
    if "health" in entry:
        kw["health"] = _health(entry["health"], f"{where}: health")
    if "log" in entry:
        kw["log"] = _log(entry["log"], f"{where}: log")
    if "role" in entry:
        kw["role"] = _string(entry["role"], f"{where}: role")
    if "eligible" in entry:
        kw["eligible"] = _eligible(entry["eligible"], f"{where}: eligible")
    if "replicas" in entry:
        kw["replicas"] = _integer(entry["replicas"], f"{where}: replicas", minimum=1)
    if "live_switch" in entry:
        if not isinstance(entry["live_switch"], bool):
            raise config_error(f"{where}: live_switch", "expected true or false", entry["live_switch"])
        kw["live_switch"] = entry["live_switch"]
    spec = ProcessSpec(**kw)
    if spec.role == DOMAIN_CONTROLLER and spec.replicas is not None:
        raise config_error(f"{where}: replicas", "a domain controller runs exactly once; drop 'replicas'",
                           spec.replicas)
    if spec.live_switch and spec.role != DOMAIN_CONTROLLER:
        raise config_error(f"{where}: live_switch", f"only a role = {DOMAIN_CONTROLLER!r} process switches role "
                           "while running", True)
    if spec.eligible and not spec.cluster_placed:
        raise config_error(f"{where}: eligible",
                           f"only a role = {DOMAIN_CONTROLLER!r} or 'replicas' process is placed on eligible nodes")
    if spec.replicas is not None and spec.eligible and spec.replicas > len(spec.eligible):
        raise config_error(f"{where}: replicas", f"more replicas than eligible nodes ({len(spec.eligible)})",
                           spec.replicas)
    return spec


def _substitute(value: Any, environ: Mapping[str, str] | None, where: str) -> Any:
    if isinstance(value, str):
        return substitute_env(value, where=where, environ=environ)
    if isinstance(value, list):
        return [_substitute(v, environ, where) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, environ, f"{where}: {k}") for k, v in value.items()}
    return value


def _unknown(table: Mapping[str, Any], known: set[str], where: str) -> None:
    check_keys(table, known, where)


def _table(value: Any, where: str, known: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise config_error(where, "expected a table such as { key = value, ... }", value)
    check_keys(value, known, where, separator=".")
    return value


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise config_error(where, "expected a string", value)
    return value


def _argv(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise config_error(where, "expected a non-empty list of strings (the argv)", value)
    if not value[0]:
        raise config_error(where, "the program name is empty", value)
    return tuple(value)


def _env(value: Any, where: str) -> Mapping[str, str]:
    if not isinstance(value, dict):
        raise config_error(where, "expected a table of NAME = \"value\"", value)
    for k, v in value.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            raise config_error(f"{where}.{k}", "invalid environment variable name")
        if not isinstance(v, str):
            raise config_error(f"{where}.{k}", "expected a string value", v)
    return types.MappingProxyType(dict(value))


def _choice(value: Any, options: tuple[str, ...], where: str) -> Any:
    if value not in options:
        raise config_error(where, "expected one of " + ", ".join(repr(o) for o in options), value)
    return value


def _duration(value: Any, where: str, *, positive: bool = True) -> Duration:
    seconds = parse_duration(value, where=where)
    if positive and seconds <= 0:
        raise config_error(where, "must be more than 0", value)
    return Duration(seconds)


def _integer(value: Any, where: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise config_error(where, "expected an integer", value)
    if value < minimum:
        raise config_error(where, f"must be at least {minimum}", value)
    return value


def _signal(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise config_error(where, "expected a signal name such as \"SIGTERM\"", value)
    try:
        signal_number(value)
    except ValueError:
        raise config_error(where, "unknown signal name (write it like \"SIGTERM\")", value) from None
    if value in ("SIGKILL", "SIGSTOP"):
        raise config_error(where, "must be a signal the process can handle (SIGKILL follows after stop_grace)",
                           value)
    return value


def _backoff(value: Any, where: str) -> Backoff:
    t = _table(value, where, {"initial", "max", "reset_after"})
    kw = {k: _duration(v, f"{where}.{k}") for k, v in t.items()}
    b = Backoff(**kw)
    if b.max < b.initial:
        raise config_error(f"{where}.max", f"must be at least initial ({b.initial:g} s)", value.get("max"))
    return b


def _health(value: Any, where: str) -> HealthCheck:
    t = _table(value, where, {f.name for f in dataclasses.fields(HealthCheck)})
    if "kind" not in t:
        raise config_error(f"{where}.kind", "missing: one of 'command', 'http', 'tcp', 'python'")
    kind = _choice(t["kind"], ("command", "http", "tcp", "python"), f"{where}.kind")
    needs = {"command": "command", "http": "url", "tcp": "port", "python": "entry_point"}[kind]
    if needs not in t:
        raise config_error(f"{where}.{needs}", f"missing (needed by kind = {kind!r})")
    for other in {"command", "url", "port", "entry_point"} - {needs} - ({"host"} if kind == "tcp" else set()):
        if other in t:
            raise config_error(f"{where}.{other}", f"not used by kind = {kind!r}")
    if "host" in t and kind != "tcp":
        raise config_error(f"{where}.host", f"not used by kind = {kind!r}")
    kw: dict[str, Any] = {"kind": kind}
    if kind == "command":
        kw["command"] = _argv(t["command"], f"{where}.command")
    elif kind == "http":
        url = _string(t["url"], f"{where}.url")
        if not re.match(r"https?://[^/\s]+", url):
            raise config_error(f"{where}.url", "expected an http:// or https:// URL", url)
        kw["url"] = url
    elif kind == "tcp":
        kw["port"] = _integer(t["port"], f"{where}.port", minimum=1)
        if kw["port"] > 65535:
            raise config_error(f"{where}.port", "must be at most 65535", kw["port"])
        if "host" in t:
            kw["host"] = _string(t["host"], f"{where}.host")
    else:
        ep = _string(t["entry_point"], f"{where}.entry_point")
        if not _ENTRY_POINT.fullmatch(ep):
            raise config_error(f"{where}.entry_point", "expected 'module:function'", ep)
        kw["entry_point"] = ep
    for key in ("interval", "timeout"):
        if key in t:
            kw[key] = _duration(t[key], f"{where}.{key}")
    if "failures" in t:
        kw["failures"] = _integer(t["failures"], f"{where}.failures", minimum=1)
    return HealthCheck(**kw)


def _log(value: Any, where: str) -> LogSettings:
    t = _table(value, where, {"directory", "max_bytes", "keep"})
    kw: dict[str, Any] = {}
    if "directory" in t:
        kw["directory"] = _string(t["directory"], f"{where}.directory")
        if not kw["directory"]:
            raise config_error(f"{where}.directory", "must not be empty")
    if "max_bytes" in t:
        kw["max_bytes"] = Size(parse_size(t["max_bytes"], where=f"{where}.max_bytes"))
        if kw["max_bytes"] < 1024:
            raise config_error(f"{where}.max_bytes", "must be at least 1KiB", t["max_bytes"])
    if "keep" in t:
        kw["keep"] = _integer(t["keep"], f"{where}.keep", minimum=0)
    return LogSettings(**kw)


def _cluster(value: Any, where: str) -> ClusterSettings:
    t = _table(value, where, {f.name for f in dataclasses.fields(ClusterSettings)})
    kw: dict[str, Any] = {}
    if "space" in t:
        kw["space"] = _string(t["space"], f"{where}.space")
        if not kw["space"] or len(kw["space"].encode()) > 200:
            raise config_error(f"{where}.space", "expected a name of 1 to 200 bytes", kw["space"])
    if "members" in t:
        kw["members"] = _eligible(t["members"], f"{where}.members")
    for name in ("lease", "fencing_delay", "kill_allowance", "liveness_check"):
        if name in t:
            kw[name] = _duration(t[name], f"{where}.{name}")
    return ClusterSettings(**kw)


def _eligible(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(n, str) and n for n in value):
        raise config_error(where, "expected a non-empty list of node names", value)
    if len(set(value)) != len(value):
        raise config_error(where, "a node is named twice", value)
    return tuple(value)
