"""groupcomm: group communication with total order and Extended Virtual Synchrony."""

from groupcomm.channel import Channel, open_channel
from groupcomm.errors import (
    ChannelClosed,
    ConfigError,
    DeliveryOverflow,
    EVSViolation,
    GroupcommError,
    LocalProtocolError,
    MemberUnreachable,
    NotOperational,
    PayloadTooLarge,
    ProtocolError,
    QueueFull,
    RemoteProtocolError,
)
from groupcomm.events import Configuration, Crashed, Delivery, Direct, Message, RingId, View
from groupcomm.quorum import QuorumConfig
from groupcomm.ring import Ring, RingConfig, RingState
from groupcomm.rpc import ALL, FIRST, MAJORITY, NONE, Mode, Reply
from groupcomm.space import Request, Space
from groupcomm.spaces import Merge, SpaceView

__version__ = "0.1.0"

__all__ = [
    "ALL",
    "FIRST",
    "MAJORITY",
    "NONE",
    "Direct",
    "Merge",
    "MemberUnreachable",
    "Mode",
    "QuorumConfig",
    "Reply",
    "Request",
    "Space",
    "SpaceView",
    "Channel",
    "ChannelClosed",
    "DeliveryOverflow",
    "Message",
    "View",
    "open_channel",
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
