"""Configuration as data: stack files, units, and the registry of layers.

- :mod:`groupcomm.config.units`: durations and sizes with units (``"300ms"``, ``"4MiB"``);
- :mod:`groupcomm.config.loader`: TOML stack files -> :class:`StackSpec`, each layer's settings built and checked;
- :mod:`groupcomm.config.registry`: layer names -> the settings each layer declares; :func:`build_stack`;
- :mod:`groupcomm.config.reference`: the configuration reference, generated from those declarations.

The shipped stacks live in the top-level ``protocols/`` folder, installed as
the package ``groupcomm.protocols``.  Nothing here imports a layer, a driver
or trio at import time.
"""

from groupcomm.config.loader import (
    LayerSpec,
    StackSpec,
    build_config,
    describe,
    find_stack,
    load_stack,
    stack_names,
    substitute_env,
)
from groupcomm.config.registry import LAYERS, StackConfig, build_stack, layer_settings
from groupcomm.config.units import Duration, Size, parse_duration, parse_size

__all__ = [
    "LAYERS",
    "Duration",
    "LayerSpec",
    "Size",
    "StackConfig",
    "StackSpec",
    "build_config",
    "build_stack",
    "describe",
    "find_stack",
    "layer_settings",
    "load_stack",
    "parse_duration",
    "parse_size",
    "stack_names",
    "substitute_env",
]
