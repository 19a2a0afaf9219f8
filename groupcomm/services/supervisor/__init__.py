"""Process supervision: keep a node's processes alive (issue 11).

* :mod:`.spec` -- the node file (TOML) as frozen dataclasses;
* :mod:`.local` -- the sans-IO core of one node's processes (states, back-off,
  health, stop escalation), fed with time and events, returning actions;
* :mod:`.placement` -- where cluster-placed processes run (the domain
  controller's host, replicas), as pure functions of an agreed view;
* :mod:`.runner` -- the trio driver for real processes (``Supervisor``).

Only the sans-IO modules are imported here; ``runner`` needs trio.
"""

from __future__ import annotations

from groupcomm.services.supervisor.local import LocalSupervisor, ProcessRow
from groupcomm.services.supervisor.spec import (
    Backoff,
    HealthCheck,
    LogSettings,
    NodeSpec,
    ProcessSpec,
    load_node_file,
    parse_node,
)

__all__ = [
    "Backoff",
    "HealthCheck",
    "LocalSupervisor",
    "LogSettings",
    "NodeSpec",
    "ProcessRow",
    "ProcessSpec",
    "load_node_file",
    "parse_node",
]
