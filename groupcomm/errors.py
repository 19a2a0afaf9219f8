"""Exceptions raised by groupcomm.

The split follows h11: :class:`LocalProtocolError` means *you* asked for something
the library cannot do (too large a payload, sending while not in a ring, a bad
configuration); :class:`RemoteProtocolError` means a *peer* sent something we
refused.  Remote errors never escape the receive path of a running node: packets
are counted and dropped.  They are raised only by the low-level
:meth:`groupcomm.core.ring.Ring.receive` when asked to (``strict=True``).
"""

from __future__ import annotations


class GroupcommError(Exception):
    """Base class of every error raised by groupcomm."""


class ProtocolError(GroupcommError):
    """Abstract: use :class:`LocalProtocolError` or :class:`RemoteProtocolError`."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        if type(self) is ProtocolError:
            raise TypeError("ProtocolError is abstract; raise LocalProtocolError or RemoteProtocolError")
        super().__init__(message)
        self.code = code


class LocalProtocolError(ProtocolError):
    """The caller misused the API (e.g. payload over the limit, ring not operational)."""


class NotOperational(LocalProtocolError):
    """The member cannot accept a message now (not started, left, or crashed)."""


class QueueFull(LocalProtocolError):
    """The member's send queue is full: back off and retry after the ring drains it."""


class PayloadTooLarge(LocalProtocolError):
    """The payload is larger than the ring accepts in one message."""


class ChannelClosed(LocalProtocolError):
    """The channel was closed (or left the group); it cannot send or deliver any more."""


class DeliveryOverflow(GroupcommError):
    """The application fell too far behind deliveries; the member left the group.

    A member that stops consuming cannot be allowed to stall the token ring for
    everyone, so past ``max_pending_events`` undelivered events the channel
    leaves the group and ``events()`` raises this.
    """


class MemberUnreachable(GroupcommError):
    """A point-to-point send failed: the destination left the view (or never was in it)."""


class RemoteProtocolError(ProtocolError):
    """A peer sent a packet the ring refused (malformed, foreign, stale...)."""


class ConfigError(GroupcommError, ValueError):
    """A configuration value is missing, unknown or out of range."""


class EVSViolation(AssertionError):
    """The EVS checker found a run that breaks a guarantee; the message is a report."""
