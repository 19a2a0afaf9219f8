"""Heartbeat failure detection, sans-IO.

Every member multicasts a heartbeat each ``interval``.  Any packet from a peer
counts as a sign of life.  A view member silent for ``timeout`` is *verified*
with a unicast ping; only if nothing arrives within ``verify`` is it reported
dead (the driver then calls :meth:`groupcomm.core.ring.Ring.suspect`).  This cuts
fail-over from token timeout + consensus to roughly ``timeout + verify``.

A member's own silence is not enough: while the ring's token still comes round
(the driver calls :meth:`FailureDetector.token`), every member of the ring
forwarded it, so a peer whose heartbeats and pong replies are lost on the way
to us only (a one-way link) is alive and is not reported.  The ring's own
failure-to-receive rule decides about such a link.
"""

from __future__ import annotations

from dataclasses import dataclass

from groupcomm.config import Duration
from groupcomm.errors import ConfigError
from groupcomm.layers.wire import (
    FD_HEARTBEAT,
    FD_MAGIC,
    FD_PING,
    FD_PONG,
    HEADER,
    PROTOCOL_VERSION,
    VERSION_OFFSET,
    VersionLog,
    datagram_sender,
)

__all__ = ["FdConfig", "FailureDetector", "MAGIC"]

# The packet layout (groupcomm.layers.wire.HEADER) and types live in the wire module.
MAGIC = FD_MAGIC
HEARTBEAT, PING, PONG = FD_HEARTBEAT, FD_PING, FD_PONG
_US = 1_000_000


@dataclass(frozen=True)
class FdConfig:
    """Failure-detector timers (seconds). Defaults are safe on a LAN."""

    interval: Duration = 0.2
    """Heartbeat period."""
    timeout: Duration = 1.0
    """Silence after which a member is pinged."""
    verify: Duration = 0.3
    """Time the ping has to be answered before the member is reported dead."""

    def __post_init__(self) -> None:
        if not (0 < self.interval < self.timeout):
            raise ConfigError("FD: need 0 < interval < timeout")
        if self.verify <= 0:
            raise ConfigError("FD: verify must be > 0")

    @classmethod
    def loopback(cls) -> "FdConfig":
        """Tuned for processes on one host: kill -9 noticed in about 0.1 s."""
        return cls(interval=0.02, timeout=0.08, verify=0.03)


class FailureDetector:
    """Tracks peers' signs of life; tells the driver what to send and whom to suspect."""

    def __init__(self, me: int, cluster_id: int, config: FdConfig) -> None:
        self.me = me
        self.config = config
        self._cluster = cluster_id
        self._interval = int(config.interval * _US)
        self._timeout = int(config.timeout * _US)
        self._verify = int(config.verify * _US)
        self._heard: dict[int, int] = {}
        self._pinged: dict[int, int] = {}
        self._members: tuple[int, ...] = ()
        self._next_beat = 0
        self._reported: set[int] = set()
        self._token_at: int | None = None
        self.drops: dict[str, int] = {}
        """Dropped packets by reason: ``malformed``, ``version``, ``cluster`` (another cluster's), ``self``."""
        self.versions = VersionLog(me)

    def packet(self, kind: int) -> bytes:
        return HEADER.pack(MAGIC, PROTOCOL_VERSION, kind, self._cluster, self.me)

    def set_members(self, members: tuple[int, ...], now: int) -> None:
        """A new view: watch its members, starting from now."""
        self._members = tuple(m for m in members if m != self.me)
        # Only view members are tracked: the table never grows with other senders.
        self._heard = {m: max(self._heard.get(m, now), now) for m in self._members}
        self._pinged.clear()
        self._reported &= set(self._members)

    def heard(self, node: int, now: int) -> None:
        """Any packet from ``node`` (ignored unless it is in the view: the next view starts its clock)."""
        if node not in self._heard:
            return
        self._heard[node] = now
        self._pinged.pop(node, None)
        self._reported.discard(node)

    def token(self, now: int) -> None:
        """The ring's token came round (an accepted regular token): every ring member forwarded it."""
        self._token_at = now

    def receive(self, data: bytes, now: int) -> int | None:
        """Handle an FD packet; returns a node to answer with PONG, if any.

        Bad packets are counted in :attr:`drops` and ignored; this never raises.
        """
        version = data[VERSION_OFFSET] if len(data) > VERSION_OFFSET else None
        if version != PROTOCOL_VERSION and data[:2] == MAGIC and version is not None:
            self.versions("fd", datagram_sender(data), version)
            return self._drop("version")
        if len(data) != HEADER.size:
            return self._drop("malformed")
        magic, version, kind, cluster, sender = HEADER.unpack(data)
        if magic != MAGIC or kind not in (HEARTBEAT, PING, PONG) or sender == 0:
            return self._drop("malformed")
        if cluster != self._cluster:
            return self._drop("cluster")
        if sender == self.me:
            return self._drop("self")
        self.heard(sender, now)
        return sender if kind == PING else None

    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def next_deadline(self) -> int:
        d = self._next_beat
        for m in self._members:
            if m in self._reported:
                continue
            d = min(d, self._pinged[m] + self._verify if m in self._pinged else self._heard.get(m, 0) + self._timeout)
        return d

    def tick(self, now: int) -> tuple[bool, list[int], list[int]]:
        """Returns (send a heartbeat?, nodes to ping, nodes now believed dead)."""
        beat = now >= self._next_beat
        if beat:
            self._next_beat = now + self._interval
        ping, dead = [], []
        for m in self._members:
            if m in self._reported:
                continue
            if m in self._pinged:
                if now >= self._pinged[m] + self._verify:
                    token_at = self._token_at
                    if token_at is not None and now - token_at < self._timeout:
                        # The ring still turns through m: only our link from m is bad.
                        self._heard[m] = token_at
                        del self._pinged[m]
                        continue
                    dead.append(m)
                    self._reported.add(m)
            elif now >= self._heard.get(m, now) + self._timeout:
                self._pinged[m] = now
                ping.append(m)
        return beat, ping, dead
