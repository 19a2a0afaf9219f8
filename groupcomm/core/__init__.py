"""The Totem ring: the C core (``groupcomm/_ring.c``), its cffi binding and the typed :class:`Ring`.

No trio, no msgpack: time and packets are passed in, actions come out.
"""

from groupcomm.core.ring import LayerDelivery, Ring, RingConfig, RingState, SendTo, SendToAll, parse_actions

__all__ = ["LayerDelivery", "Ring", "RingConfig", "RingState", "SendTo", "SendToAll", "parse_actions"]
