"""Session ids and the session cookie's value.

A session id is 128 random bits from :mod:`secrets` in URL-safe base64 without
padding: 22 characters, unguessable, unique cluster-wide without coordination.

The cookie carries ``<id>.<hint>``, the hint naming the node that held the
session when the response left (like Tomcat's jvmRoute suffix): a load
balancer may route by it to avoid a migration.  The hint is advisory only;
nothing trusts it for correctness.  A cookie is attacker-controlled input:
:func:`parse_cookie_value` never raises, it answers ``None`` for anything
malformed.
"""

from __future__ import annotations

import re
import secrets

__all__ = [
    "MAX_HINT_CHARS",
    "SESSION_ID_CHARS",
    "cookie_value",
    "is_session_id",
    "new_session_id",
    "parse_cookie_value",
    "routing_hint",
]

SESSION_ID_CHARS = 22
"""Length of a session id: 16 bytes in unpadded base64."""
MAX_HINT_CHARS = 64
"""Longest routing hint in a cookie value."""

# 16 bytes = 21 full characters and one carrying 2 bits, whose 4 low bits are zero:
# only A, Q, g or w can end a canonical id (so every id has exactly one spelling).
_ID = re.compile(r"[A-Za-z0-9_-]{21}[AQgw]")
_HINT = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_HINT_CHARS}}}")
_NOT_HINT = re.compile(r"[^A-Za-z0-9_-]")


def new_session_id() -> str:
    """A fresh session id (128 random bits, 22 URL-safe characters)."""
    return secrets.token_urlsafe(16)


def is_session_id(text: object) -> bool:
    """Whether ``text`` is a session id exactly as :func:`new_session_id` spells them."""
    return isinstance(text, str) and _ID.fullmatch(text) is not None


def routing_hint(node_name: str) -> str:
    """A valid hint for ``node_name``: other characters become ``-``, cut to :data:`MAX_HINT_CHARS`.

    An empty name gives an empty hint, for which :func:`cookie_value` writes the bare id.
    """
    return _NOT_HINT.sub("-", node_name)[:MAX_HINT_CHARS]


def cookie_value(session_id: str, holder_hint: str) -> str:
    """``<session_id>.<holder_hint>`` (the bare id if the hint is empty); ValueError if either is invalid."""
    if not is_session_id(session_id):
        raise ValueError(f"not a session id: {session_id!r}")
    if not holder_hint:
        return session_id
    if _HINT.fullmatch(holder_hint) is None:
        raise ValueError(f"routing hint {holder_hint!r}: expected 1 to {MAX_HINT_CHARS} of A-Z a-z 0-9 _ -"
                         " (see routing_hint)")
    return f"{session_id}.{holder_hint}"


def parse_cookie_value(value: object) -> tuple[str, str | None] | None:
    """``(session_id, hint or None)`` from a cookie value, or ``None`` if it is malformed (never raises)."""
    if not isinstance(value, str) or len(value) > SESSION_ID_CHARS + 1 + MAX_HINT_CHARS:
        return None
    session_id, dot, hint = value.partition(".")
    if not is_session_id(session_id):
        return None
    if not dot:
        return session_id, None
    if _HINT.fullmatch(hint) is None:
        return None
    return session_id, hint
