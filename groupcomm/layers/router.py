"""One routing of a :class:`~groupcomm.layers.member.Member`'s outputs.

:meth:`Member.take <groupcomm.layers.member.Member.take>` hands out a list of
outputs of the types in :data:`OUTPUTS`.  Every driver (the trio
:class:`~groupcomm.io.channel.Channel`, :class:`~groupcomm.testing.SimCluster`)
acts on the same kinds; a :class:`Router` holds the dispatch once, and checks
when it is built that the driver handles every kind (a new output type cannot
be silently dropped by one driver).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from groupcomm.core.ring import SendTo, SendToAll
from groupcomm.events import Direct, View
from groupcomm.layers.member import DirectDone
from groupcomm.layers.rpc import RequestDone
from groupcomm.layers.spaces import (
    Merge,
    SpaceMessage,
    SpaceRequest,
    SpaceView,
    StateInstalled,
    StateRequest,
    Synced,
)

__all__ = ["OUTPUTS", "Router"]

OUTPUTS: dict[type, str] = {
    SendToAll: "a packet for every member",
    SendTo: "a packet for one member (``node``)",
    list: "a run of channel :class:`~groupcomm.events.Message` objects, in delivery order",
    View: "a ring view (transitional or regular; ``primary`` set by the quorum rule)",
    Merge: "after a merge: the sides and which one was primary",
    Synced: "the spaces' SYNC round after a merging ring view ended (the same point everywhere)",
    Direct: "a point-to-point message (``send_to``) arrived",
    SpaceView: "a space's membership changed",
    SpaceMessage: "a message for a space this member is in",
    SpaceRequest: "a request to answer with :meth:`Member.reply`",
    StateRequest: "a joiner needs a snapshot: answer with :meth:`Member.provide_state`",
    StateInstalled: "a snapshot to install (this member joined, or lost a merge)",
    RequestDone: "a request of this member completed (replies per member)",
    DirectDone: "a ``send_to`` of this member was acknowledged or failed",
}
"""Every type :meth:`Member.take` hands out, with what it means."""


class Router:
    """Dispatches outputs by type to the handlers a driver supplies.

    ``handlers`` maps each type of :data:`OUTPUTS` to a callable taking one
    output; several mappings are merged (e.g. the channel's and the spaces').
    """

    def __init__(self, *handlers: Mapping[type, Callable[[Any], None]]) -> None:
        table: dict[type, Callable[[Any], None]] = {}
        for mapping in handlers:
            table.update(mapping)
        missing = [t.__name__ for t in OUTPUTS if t not in table]
        unknown = [t.__name__ for t in table if t not in OUTPUTS]
        if missing or unknown:
            raise TypeError(f"Router: no handler for {missing}" if missing else f"Router: not a Member output: {unknown}")
        self._table = table

    def route(self, outputs: Iterable[Any]) -> None:
        """Hand each output, in order, to its handler."""
        table = self._table
        for item in outputs:
            table[type(item)](item)
