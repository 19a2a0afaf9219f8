"""groupcomm: group communication with total order and Extended Virtual Synchrony."""

from groupcomm.errors import (
    ConfigError,
    EVSViolation,
    GroupcommError,
    LocalProtocolError,
    NotOperational,
    PayloadTooLarge,
    ProtocolError,
    QueueFull,
    RemoteProtocolError,
)
from groupcomm.events import Configuration, Crashed, Delivery, RingId
from groupcomm.ring import Ring, RingConfig, RingState

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Configuration",
    "Crashed",
    "Delivery",
    "EVSViolation",
    "GroupcommError",
    "LocalProtocolError",
    "NotOperational",
    "PayloadTooLarge",
    "ProtocolError",
    "QueueFull",
    "RemoteProtocolError",
    "Ring",
    "RingConfig",
    "RingId",
    "RingState",
]
