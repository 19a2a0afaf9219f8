"""The node file's ``[provisioning]`` table: the provisioning agent's settings.

::

    [provisioning]
    state_dir = "/var/lib/groupcomm/n1"   # default: <the member's state directory>/provisioning
    store_quota = "2GiB"                  # the most the bundle store may hold (default: no limit)
    op_timeout = "30s"                    # how long an operation waits for its own delivery
    health_wait = "30s"                   # `bundle install --start` waits this long for health
    converge_timeout = "10m"              # `bundle install` waits this long for every member
    retry_failed_after = "60s"            # a failed fetch/install/start is tried again after this
    reconcile_interval = "1s"             # the reconciler also runs this often without a change
    publish_interval = "200ms"            # status publications at most this often
    republish_interval = "5s"             # ... and at least this often
    rollout_interval = "500ms"            # health reports and the rollout driver look this often
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

_TIMERS = ("op_timeout", "health_wait", "converge_timeout", "retry_failed_after", "reconcile_interval",
           "publish_interval", "republish_interval", "rollout_interval")
_KEYS = {"state_dir", "store_quota", "socket", "sync", *_TIMERS}


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
    for timer in _TIMERS:
        if timer in table:
            seconds = parse_duration(table[timer], where=f"{where}.{timer}")
            if seconds <= 0:
                raise config_error(f"{where}.{timer}", "must be positive", table[timer])
            kwargs[timer] = seconds
    if "sync" in table:
        kwargs["policy"] = SyncPolicy.from_toml(table["sync"], f"{where}.sync")
    return ProvisioningSettings(**kwargs), path("socket")
