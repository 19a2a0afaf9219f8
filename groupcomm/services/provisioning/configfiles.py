"""Configuration delivery to a started bundle: the contract bundles rely on.

A bundle names the configuration PIDs it reads in its manifest
(``config = ["org.example.hello"]``, see :mod:`.bundle`).  Only those PIDs are
delivered, with the values of the node's merged desired state
(:func:`~.reconcile.merge`); a bundle that lists none gets no configuration
(but still gets the file, with no table).

Before its process starts, the bundle gets:

* **the file** named by ``GROUPCOMM_CONFIG_FILE``
  (``<BUNDLE_HOME>/config/groupcomm-config.toml``, mode 0600): TOML with one
  table per PID the bundle reads, quoted as written (an empty table when the
  PID has no key), every value a string::

      ["org.example.hello"]
      "greeting" = "hello"

  It is complete and exact.  It is replaced atomically (a temporary file in
  the same directory, fsynced, renamed over the old one), so a reader sees
  the old or the new content, never a mix.
* **one environment variable per key**, ``GROUPCOMM_CONFIG_<PID>_<KEY>``:
  PID and key upper-cased, every character other than ``A-Z``, ``0-9`` turned
  into ``_`` (``org.example.hello`` / ``greeting`` ->
  ``GROUPCOMM_CONFIG_ORG_EXAMPLE_HELLO_GREETING``).  The variables are a
  convenience for small values; a key is in the file only when its variable
  would have the name of an earlier key's (PIDs, then keys, in sorted order),
  when its value holds a NUL character, or when it would take the variables
  past :data:`ENV_BUDGET` bytes together.
* The manifest's ``start`` and ``health`` strings may use these variables:
  ``"${GROUPCOMM_CONFIG_ORG_EXAMPLE_HELLO_PORT:8080}"`` (with a default, like
  every reference other than ``BUNDLE_*``: the manifest is checked before any
  node knows the values).

**On change** of any value of a PID the bundle reads (a key set, changed or
deleted), the file is rewritten and then the process is restarted with the
new variables (``Supervisor.change``: its stop signal, its grace, started
again).  There is no notification in place: a bundle reads its configuration
when it starts.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = [
    "CONFIG_FILE_VAR",
    "ENV_BUDGET",
    "ENV_PREFIX",
    "config_environment",
    "config_file",
    "env_name",
    "given_config",
    "render_config",
    "write_config",
]

ENV_PREFIX = "GROUPCOMM_CONFIG_"
CONFIG_FILE_VAR = "GROUPCOMM_CONFIG_FILE"
"""The variable naming the configuration file."""
ENV_BUDGET = 128 * 1024
"""The most bytes (``NAME=value`` each) the per-key variables take together."""
CONFIG_DIR = "config"
CONFIG_NAME = "groupcomm-config.toml"

Configs = Mapping[str, Mapping[str, str]]
"""PID -> key -> value."""

_NOT_ALNUM = re.compile(r"[^A-Z0-9]")


def env_name(pid: str, key: str) -> str:
    """The variable of ``key`` of ``pid``: ``GROUPCOMM_CONFIG_<PID>_<KEY>``, see the module docstring."""
    return ENV_PREFIX + _NOT_ALNUM.sub("_", pid.upper()) + "_" + _NOT_ALNUM.sub("_", key.upper())


def config_file(home: str | Path) -> Path:
    """Where the configuration file of the bundle installed at ``home`` goes."""
    return Path(home) / CONFIG_DIR / CONFIG_NAME


def given_config(pids: Iterable[str], configs: Configs) -> dict[str, dict[str, str]]:
    """What a bundle reading ``pids`` is given of ``configs``: each PID's values (empty if none)."""
    return {pid: dict(configs.get(pid, {})) for pid in pids}


def config_environment(given: Configs, *, budget: int = ENV_BUDGET) -> dict[str, str]:
    """The per-key variables of ``given`` (without ``GROUPCOMM_CONFIG_FILE``)."""
    env: dict[str, str] = {}
    used = 0
    for pid in sorted(given):
        for key in sorted(given[pid]):
            name, value = env_name(pid, key), given[pid][key]
            cost = len(name.encode()) + 1 + len(value.encode("utf-8", "surrogatepass")) + 1
            if name in env or "\x00" in value or used + cost > budget:
                continue
            env[name] = value
            used += cost
    return env


def _toml_string(text: str) -> str:
    out = ['"']
    for ch in text:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def render_config(given: Configs, *, bundle: str = "") -> str:
    """The TOML text of the configuration file: one table per PID, every value a string."""
    lines = [f"# The configuration of bundle {bundle!r}, written by groupcomm: it is replaced on every change."
             if bundle else "# Written by groupcomm: it is replaced on every change."]
    for pid in sorted(given):
        lines.append("")
        lines.append(f"[{_toml_string(pid)}]")
        for key in sorted(given[pid]):
            lines.append(f"{_toml_string(key)} = {_toml_string(given[pid][key])}")
    return "\n".join(lines) + "\n"


def write_config(path: str | Path, given: Configs, *, bundle: str = "") -> Path:
    """Replace the file at ``path`` atomically with :func:`render_config` of ``given`` (blocking)."""
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = render_config(given, bundle=bundle).encode("utf-8")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path
