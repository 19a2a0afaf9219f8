"""groupcomm: group communication with total order and Extended Virtual Synchrony.

The public names below are importable from ``groupcomm`` directly.  They load
lazily, so ``import groupcomm.layers`` (the sans-IO protocol layers) or
``import groupcomm.testing`` never pulls in trio or the socket drivers.

Packages, bottom to top (imports only point down; see docs/architecture.rst):
``errors``/``events`` (leaf types), ``config`` (stack files, units, the layer
registry), ``core`` (the C ring and its typed wrapper), ``layers`` (sans-IO
protocol layers above the ring), ``testing`` (the simulator and EVS checker),
``io`` (trio drivers and the Channel), ``services``, ``cli``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        ["ChannelClosed", "ConfigError", "DeliveryOverflow", "EVSViolation", "GroupcommError",
         "LocalProtocolError", "MemberUnreachable", "NotOperational", "PayloadTooLarge", "ProtocolError",
         "QueueFull", "RemoteProtocolError"],
        "groupcomm.errors",
    ),
    **dict.fromkeys(["Configuration", "Crashed", "Delivery", "Direct", "Message", "RingId", "View"], "groupcomm.events"),
    **dict.fromkeys(["Ring", "RingConfig", "RingState"], "groupcomm.core.ring"),
    **dict.fromkeys(["ALL", "FIRST", "MAJORITY", "NONE", "Mode", "Reply"], "groupcomm.layers.rpc"),
    **dict.fromkeys(["Merge", "SpaceView"], "groupcomm.layers.spaces"),
    "QuorumConfig": "groupcomm.layers.quorum",
    **dict.fromkeys(["Channel", "open_channel"], "groupcomm.io.channel"),
    **dict.fromkeys(["Request", "Space"], "groupcomm.io.space"),
    "SimCluster": "groupcomm.testing.sim",
}
_SUBPACKAGES = {"blocking", "cli", "config", "core", "errors", "events", "io", "layers", "services", "testing"}

__all__ = [
    "ALL", "Channel", "ChannelClosed", "ConfigError", "Configuration", "Crashed", "Delivery",
    "DeliveryOverflow", "Direct", "EVSViolation", "FIRST", "GroupcommError", "LocalProtocolError",
    "MAJORITY", "MemberUnreachable", "Merge", "Message", "Mode", "NONE", "NotOperational",
    "PayloadTooLarge", "ProtocolError", "QueueFull", "QuorumConfig", "RemoteProtocolError",
    "Reply", "Request", "Ring", "RingConfig", "RingId", "RingState", "SimCluster", "Space",
    "SpaceView", "View", "open_channel",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value                       # the next lookup is a plain attribute
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f"groupcomm.{name}")
    raise AttributeError(f"module 'groupcomm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBPACKAGES})


if TYPE_CHECKING:                                     # what type checkers and IDEs see
    from groupcomm.core.ring import Ring, RingConfig, RingState
    from groupcomm.errors import (
        ChannelClosed, ConfigError, DeliveryOverflow, EVSViolation, GroupcommError, LocalProtocolError,
        MemberUnreachable, NotOperational, PayloadTooLarge, ProtocolError, QueueFull, RemoteProtocolError,
    )
    from groupcomm.events import Configuration, Crashed, Delivery, Direct, Message, RingId, View
    from groupcomm.io.channel import Channel, open_channel
    from groupcomm.io.space import Request, Space
    from groupcomm.layers.quorum import QuorumConfig
    from groupcomm.layers.rpc import ALL, FIRST, MAJORITY, NONE, Mode, Reply
    from groupcomm.layers.spaces import Merge, SpaceView
    from groupcomm.testing.sim import SimCluster
