"""The settings of a replicated session store: one place for every number and choice.

Every timer and limit is named here with its default (as Corosync names its
totem values); :class:`SessionSettings` checks them when it is made, so a
wrong value fails at start with a message naming it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from groupcomm.services.sessions.buckets import DEFAULT_BUCKETS, BackupStrategy, NextK
from groupcomm.services.sessions.record import DEFAULT_MAX_INACTIVE, Limits

__all__ = ["SPACE_PREFIX", "SessionSettings", "session_space"]

SPACE_PREFIX = "groupcomm.sessions/"
"""A web application ``APP`` keeps its sessions in the space ``groupcomm.sessions/APP``."""


def session_space(app: str) -> str:
    """The space of application ``app``'s sessions (ValueError for a name that is not usable)."""
    if not isinstance(app, str) or not app or len(app) > 100 or not all(c.isalnum() or c in "-_." for c in app):
        raise ValueError(f"application name {app!r} must be 1-100 letters, digits, '-', '_' or '.'")
    return SPACE_PREFIX + app


@dataclass(frozen=True)
class SessionSettings:
    """How a node keeps and replicates sessions (the defaults suit a LAN)."""

    backups: int = 1
    """K: every acknowledged change is on the holder and K backups (0 = no replication)."""
    buckets: int = DEFAULT_BUCKETS
    """Number of session buckets (the location index is spread over the members by bucket).
    Every node of one application must use the same number."""
    strategy: BackupStrategy = field(default_factory=NextK)
    """Which members back a session up (:class:`~.buckets.NextK` or :class:`~.buckets.TagAware`)."""
    limits: Limits = field(default_factory=Limits)
    """Per-node bounds (sessions, bytes, payload of one session); policy in :mod:`.record`."""
    max_inactive: float = DEFAULT_MAX_INACTIVE
    """Seconds without a request after which a session expires."""
    copy_grace: float = DEFAULT_MAX_INACTIVE
    """A backup copy is reaped ``copy_grace`` seconds after it would have expired: reads at the
    holder are replicated only now and then (every ``max_inactive / 4``), so a copy's clock lags."""
    request_timeout: float = 5.0
    """Longest a load, create, save or invalidate waits (for the index, a migration, the backups'
    acknowledgements, the end of a merge) before it fails with ``SessionUnavailable``."""
    retry_after: float = 1.0
    """What a refused request tells the client to wait (HTTP ``Retry-After``) before retrying."""
    evacuation_timeout: float = 10.0
    """Longest a graceful stop waits for its sessions to be handed to other members."""
    holdings_batch: int = 2000
    """Index entries per message when a member reports what it holds to the buckets' owners."""
    max_buffered_frames: int = 4096
    """Frames of a view this node has not installed yet kept until it does (older ones are dropped)."""

    def __post_init__(self) -> None:
        def positive_int(name: str, minimum: int = 1) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"SessionSettings.{name} must be an integer >= {minimum}, not {value!r}")

        positive_int("backups", 0)
        positive_int("buckets")
        positive_int("holdings_batch")
        positive_int("max_buffered_frames")
        if self.buckets > 65536:
            raise ValueError("SessionSettings.buckets must be at most 65536")
        for name in ("max_inactive", "copy_grace", "request_timeout", "retry_after", "evacuation_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"SessionSettings.{name} must be a positive number of seconds, not {value!r}")
        if not isinstance(self.strategy, BackupStrategy):
            raise TypeError(f"SessionSettings.strategy must be a BackupStrategy (NextK, TagAware), "
                            f"not {self.strategy!r}")
        if not isinstance(self.limits, Limits):
            raise TypeError(f"SessionSettings.limits must be a Limits, not {self.limits!r}")
