"""The node file's ``[provisioning]`` table: the provisioning agent's settings.

::

    [provisioning]
    state_dir = "/var/lib/groupcomm/n1"   # default: <the member's state directory>/provisioning
    store_quota = "2GiB"                  # the most the bundle store may hold (default: no limit)
    op_timeout = "30s"                    # how long an operation waits for its own delivery
    socket = "/run/groupcomm/n1.sock"     # the control socket (default: see control.default_socket)
    [provisioning.sync.default]           # sync policies, see groupcomm.services.provisioning.policy
    bundles = { mode = "cluster" }

Relative paths are relative to the node file's directory.  Every mistake is a
:class:`~groupcomm.errors.ConfigError` naming the file and the field.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from groupcomm.config.units import check_keys, config_error, parse_duration, parse_size
from groupcomm.errors import ConfigError
from groupcomm.services.provisioning.node import ProvisioningSettings
from groupcomm.services.provisioning.policy import SyncPolicy

__all__ = ["parse_provisioning"]

_KEYS = {"state_dir", "store_quota", "op_timeout", "socket", "sync"}


def parse_provisioning(table: Mapping[str, Any], *, source: str, base_dir: str | os.PathLike[str] = "",
                       member_dir: str | os.PathLike[str] | None = None) -> tuple[ProvisioningSettings, Path | None]:
    """The agent's settings and control socket path (None: the default) from a ``[provisioning]`` table.

    ``member_dir``: the channel's state directory (the default ``state_dir`` is
    its ``provisioning`` subdirectory); without one ``state_dir`` is required."""
    where = f"{source}: provisioning"
    check_keys(table, _KEYS, where, separator=".")
    base = Path(base_dir or ".")

    def path(key: str) -> Path | None:
        value = table.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise config_error(f"{where}.{key}", "expected a path", value)
        return base / value

    state_dir = path("state_dir")
    if state_dir is None:
        if member_dir is None:
            raise ConfigError(f"{where}.state_dir: required (this member has no state directory "
                              "to keep the provisioning state in)")
        state_dir = Path(member_dir) / "provisioning"
    kwargs: dict[str, Any] = {"state_dir": state_dir}
    if "store_quota" in table:
        kwargs["store_quota"] = parse_size(table["store_quota"], where=f"{where}.store_quota")
    if "op_timeout" in table:
        timeout = parse_duration(table["op_timeout"], where=f"{where}.op_timeout")
        if timeout <= 0:
            raise config_error(f"{where}.op_timeout", "must be positive", table["op_timeout"])
        kwargs["op_timeout"] = timeout
    if "sync" in table:
        kwargs["policy"] = SyncPolicy.from_toml(table["sync"], f"{where}.sync")
    return ProvisioningSettings(**kwargs), path("socket")
