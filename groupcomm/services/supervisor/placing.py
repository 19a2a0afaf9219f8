"""The trio side of cluster placement: what :class:`~.runner.Supervisor` runs with a channel.

:class:`PlacementLink` feeds the supervisor's :class:`~.node_core.NodeCore`
the channel's ring views, the placement spaces' views and messages in one
delivery order (:meth:`Channel.add_observer
<groupcomm.io.channel.Channel.add_observer>`), carries out the core's group
actions (join, leave and multicast in a placement space through the member),
and holds the lease of each domain-controller process it starts: the process
runs under the lease guard (:mod:`.guard`), the core's :class:`~.cluster.Renew`
extends it, and the guard kills the process when renewals stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import trio

from groupcomm.errors import ChannelClosed, LocalProtocolError, NotOperational
from groupcomm.events import View
from groupcomm.layers.spaces import SpaceMessage, SpaceView
from groupcomm.services.supervisor.cluster import JoinSpace, LeaveSpace, Publish, Renew
from groupcomm.services.supervisor.lease import Lease, clock
from groupcomm.services.supervisor.node_core import NodeCore, Promote

__all__ = ["GROUP_ACTIONS", "Launch", "PlacementLink"]

GROUP_ACTIONS = (Renew, Publish, JoinSpace, LeaveSpace, Promote)
"""The core's actions this link carries out."""

_US = 1_000_000
_STANDBY_LEASE = 10 * 365 * 86400.0     # a standby's guard waits for a real lease (seconds)


@dataclass
class Launch:
    """How to start a placed process: the argv (wrapped in the guard for a domain
    controller), the descriptors to pass, extra environment, and its lease."""

    argv: list[str]
    pass_fds: tuple[int, ...]
    env: dict[str, str]
    lease: Lease | None


class PlacementLink:
    """Connects a :class:`NodeCore` to a joined channel (see the module docstring)."""

    def __init__(self, channel: Any, core: NodeCore, *, lease: float, wake: Any,
                 role_changed: Any = None) -> None:
        self.channel = channel
        self.core = core
        self._role_changed = role_changed
        self._lease_seconds = lease
        self._wake = wake
        self._inbox: list[Any] = []
        self._leases: dict[str, Lease] = {}
        self._leaving: set[str] = set()      # spaces this member asked to leave
        self._left: set[str] = set()         # ... whose leave was delivered
        self.me = channel.address

    def start(self, nursery: trio.Nursery) -> None:
        if self.channel.view is not None:            # installed before we looked
            self._inbox.append(self.channel.view)
        self.channel.add_observer(self._observe)
        nursery.start_soon(self._drain_channel_events)

    # ------------------------------------------------------------------ inputs

    def _observe(self, item: Any) -> None:
        t = type(item)
        if t is View or t is SpaceView or (t is SpaceMessage and item.space in self.core.placement.spaces()):
            self._inbox.append(item)
            self._wake()

    async def _drain_channel_events(self) -> None:
        """Nobody else reads this channel's events; the views the core needs come through the observer."""
        try:
            async for _ in self.channel.events():
                pass
        except (ChannelClosed, trio.ClosedResourceError):
            return

    def feed(self, now: int) -> list:
        """Hand the core what the channel delivered since the last call; its actions."""
        out: list = []
        inbox, self._inbox = self._inbox, []
        core = self.core
        for item in inbox:
            t = type(item)
            if t is View:
                out += core.ring_view(now, item)
            elif t is SpaceView:
                if self.me in item.left:
                    self._left.add(item.space)
                out += core.space_view(now, item)
            else:
                out += core.space_message(now, item.space, item.message.sender, item.message.payload)
        return out

    def tokens(self) -> int | None:
        """The ring's count of regular tokens received (None once the channel is closed)."""
        try:
            return self.channel.stats()["tokens_received"]
        except (ChannelClosed, NotOperational, LocalProtocolError):
            return None

    # ------------------------------------------------------------------ actions

    def act(self, now: int, action: Any) -> None:
        """Carry out one of :data:`GROUP_ACTIONS`."""
        if isinstance(action, Renew | Promote):
            lease = self._leases.get(action.name)
            until = action.until if isinstance(action, Renew) else action.lease_until
            if lease is not None:
                lease.renew(clock() + (until - now) / _US)
            if isinstance(action, Promote) and self._role_changed is not None:
                self._role_changed(action.name, action.role, action.epoch)   # after its lease is set
            return
        if isinstance(action, JoinSpace):
            self._left.discard(action.space)
            call = lambda t, member: member.join_space(t, action.space)
        elif isinstance(action, LeaveSpace):
            self._leaving.add(action.space)
            call = lambda t, member: member.leave_space(t, action.space)
        else:
            call = lambda t, member: member.space_send(t, action.space, action.payload, False)
        self.channel.call_member(call, quiet=True)

    def launch(self, now: int, name: str, argv: tuple[str, ...] | list[str]) -> Launch:
        """How to start placed process ``name`` now (its role, epoch and lease from the core)."""
        grant = self.core.grant(name)
        if grant is None:
            return Launch(list(argv), (), {}, None)
        env = {"GROUPCOMM_ROLE": grant.role}
        if grant.epoch is not None:
            env["GROUPCOMM_DC_EPOCH"] = str(grant.epoch)
        standby = grant.lease_until is None and self.core.local.spec(name).standby
        if grant.lease_until is None and not standby:
            return Launch(list(argv), (), env, None)
        self.close_lease(name)
        lease = self._leases[name] = Lease(self._lease_seconds)
        until = clock() + (_STANDBY_LEASE if standby else (grant.lease_until - now) / _US)
        return Launch(lease.command(argv, until=until), (lease.child_fd,), env, lease)

    def close_lease(self, name: str) -> None:
        lease = self._leases.pop(name, None)
        if lease is not None:
            lease.close()

    def close(self) -> None:
        for name in list(self._leases):
            self.close_lease(name)

    def left_every_space(self) -> bool:
        """Every placement space this member asked to leave has delivered its leave."""
        return self._leaving <= self._left
