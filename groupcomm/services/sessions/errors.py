"""Errors a session store raises; the ASGI middleware turns each into an HTTP answer.

- :class:`SessionUnavailable` -> 503 with ``Retry-After``: this node cannot serve the
  session now (e.g. it is on a non-primary side of a partition); the client retries,
  through the load balancer, maybe on another node.
- :class:`SessionsFull` -> 503: the node refuses new sessions (its limits are reached);
  a live session is never evicted to make room.
- :class:`SessionTooLarge` -> 500 and an error log line: the application stored more
  than one session may hold.
"""

from __future__ import annotations

from groupcomm.errors import GroupcommError


class SessionError(GroupcommError):
    """Base class of the session store's errors."""


class SessionUnavailable(SessionError):
    """This node cannot serve the session now; retry after ``retry_after`` seconds."""

    def __init__(self, message: str = "session not available on this node", *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SessionsFull(SessionError):
    """The node holds as many sessions (or bytes) as it may; no new session now."""


class SessionTooLarge(SessionError):
    """A session's encoded payload is over the limit (``size`` > ``limit`` bytes)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"session payload of {size} bytes is over the limit of {limit} bytes")
        self.size = size
        self.limit = limit
