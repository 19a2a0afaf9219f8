"""The layer registry: which stack-file layer names exist and what settings each takes.

A stack file names its layers (``UDP``, ``TOTEM``, ``FD``...); each name maps
to the frozen settings dataclass its layer declares next to its code.  The
registry holds them as import paths and imports a layer's module only when a
stack uses it, so this package stays at the bottom of the import graph (it
never imports the layers, the drivers or trio at import time).

:func:`build_stack` validates a loaded :class:`~groupcomm.config.loader.StackSpec`
(known layers, one transport at the bottom, a TOTEM layer) and builds every
layer's settings into one :class:`StackConfig`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from groupcomm.config.loader import StackSpec, build_config
from groupcomm.errors import ConfigError

__all__ = ["LAYERS", "TRANSPORTS", "SimTransport", "StackConfig", "build_stack", "layer_settings"]


@dataclass(frozen=True)
class SimTransport:
    """The ``SIM`` transport: the network is :class:`~groupcomm.testing.SimCluster`'s (no settings)."""


LAYERS: dict[str, str] = {
    "UDP": "groupcomm.io.udp:UdpConfig",
    "UDPU": "groupcomm.io.udp:UdpuConfig",
    "SIM": "groupcomm.config.registry:SimTransport",
    "CRYPTO": "groupcomm.core.seal:CryptoConfig",
    "FD": "groupcomm.layers.fd:FdConfig",
    "TOTEM": "groupcomm.core.ring:RingConfig",
    "FRAG": "groupcomm.layers.frag:FragConfig",
    "UNICAST": "groupcomm.layers.unicast:UnicastConfig",
    "QUORUM": "groupcomm.layers.quorum:QuorumConfig",
    "SPACES": "groupcomm.layers.spaces:SpacesConfig",
    "CHANNEL": "groupcomm.io.channel:ChannelConfig",
}
"""Layer name in a stack file -> ``module:Class`` of the settings it takes, in stack order."""

TRANSPORTS = ("UDP", "UDPU", "SIM")
"""Layers that may sit at the bottom of a stack."""


def layer_settings(name: str) -> type:
    """The settings dataclass of layer ``name`` (imports the layer's module)."""
    try:
        module, _, attr = LAYERS[name].partition(":")
    except KeyError:
        raise ConfigError(f"unknown layer {name!r} (known: {', '.join(LAYERS)})") from None
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class StackConfig:
    """Every layer's settings from one stack file (``None``: the layer is not in the stack)."""

    ring: Any
    """:class:`~groupcomm.core.ring.RingConfig` (TOTEM)."""
    transport: Any
    """:class:`~groupcomm.io.udp.UdpConfig` or :class:`~groupcomm.io.udp.UdpuConfig`; None for the simulator."""
    fd: Any
    frag: Any
    """Always set: a stack without FRAG gets the defaults."""
    unicast: Any
    quorum: Any
    spaces: Any = None
    """:class:`~groupcomm.layers.spaces.SpacesConfig` (SPACES)."""
    channel: Any = None
    """:class:`~groupcomm.io.channel.ChannelConfig` (CHANNEL): the application's queues."""
    crypto: Any = None
    """:class:`~groupcomm.core.seal.CryptoConfig` (CRYPTO): the cluster key; None: no layer."""


def build_stack(spec: StackSpec, *, transport_optional: bool = False) -> StackConfig:
    """Validate a loaded stack and build each layer's settings.

    ``transport_optional``: the simulator supplies its own network, so a stack
    for it (``protocols/sim.toml``) lists a ``SIM`` transport or none.
    """
    names = [layer.name for layer in spec.layers]
    for layer in spec.layers:
        if layer.name not in LAYERS:
            raise ConfigError(f"{layer.source}: unknown layer {layer.name!r} (known: {', '.join(LAYERS)})")
    if "TOTEM" not in names:
        raise ConfigError(f"{spec.source}: the stack needs a TOTEM layer")
    transports = [n for n in names if n in TRANSPORTS]
    if transport_optional and (not transports or transports == ["SIM"]):
        transports = []
    elif len(transports) != 1 or names[0] != transports[0] or transports == ["SIM"]:
        raise ConfigError(f"{spec.source}: the bottom (first) layer must be one transport, UDP or UDPU")
    built = {layer.name: build_config(layer_settings(layer.name), layer) for layer in spec.layers}
    return StackConfig(
        ring=built["TOTEM"],
        transport=built[transports[0]] if transports else None,
        fd=built.get("FD"),
        frag=built.get("FRAG") or layer_settings("FRAG")(),
        unicast=built.get("UNICAST"),
        quorum=built.get("QUORUM"),
        spaces=built.get("SPACES"),
        channel=built.get("CHANNEL"),
        crypto=built.get("CRYPTO"),
    )
