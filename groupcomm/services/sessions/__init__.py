"""Partitioned HTTP-session replication (issue 13).

* :mod:`.buckets` -- session buckets, their owners among the members
  (rendezvous hashing) and the backup strategies (:class:`NextK`,
  :class:`TagAware`);
* :mod:`.errors` -- the errors a session store raises (each maps to an HTTP answer);
* :mod:`.ids` -- session ids and the cookie value with its routing hint;
* :mod:`.record` -- the session record, its wire form, and the bounded
  :class:`SessionTable` a node keeps;
* :mod:`.settings` -- :class:`SessionSettings`, every number of a replicated store;
* :mod:`.core` -- :class:`SessionCore`, one node's part of the replicated store (sans-IO);
* :mod:`.wire` -- the frames the nodes exchange and their validating decoder.

The trio store is :class:`groupcomm.services.sessions.driver.ReplicatedSessionStore`;
the ASGI middleware :class:`groupcomm.services.sessions.asgi.SessionMiddleware`.

These are sans-IO and import without trio; so must this package: a trio
driver is imported from its own module, never from here.
"""

from __future__ import annotations

from groupcomm.services.sessions.buckets import (
    DEFAULT_BUCKETS,
    BackupStrategy,
    BucketMap,
    NextK,
    TagAware,
    bucket_of,
    moved,
)
from groupcomm.services.sessions.core import SessionCore
from groupcomm.services.sessions.errors import (
    SessionError,
    SessionsFull,
    SessionTooLarge,
    SessionUnavailable,
)
from groupcomm.services.sessions.ids import (
    cookie_value,
    is_session_id,
    new_session_id,
    parse_cookie_value,
)
from groupcomm.services.sessions.record import (
    Limits,
    MalformedSession,
    Session,
    SessionTable,
    TableFull,
    decode_session,
    encode_session,
)
from groupcomm.services.sessions.settings import SessionSettings, session_space

__all__ = [
    "DEFAULT_BUCKETS",
    "BackupStrategy",
    "BucketMap",
    "Limits",
    "MalformedSession",
    "NextK",
    "Session",
    "SessionCore",
    "SessionError",
    "SessionSettings",
    "SessionTable",
    "SessionTooLarge",
    "SessionUnavailable",
    "SessionsFull",
    "TableFull",
    "TagAware",
    "bucket_of",
    "cookie_value",
    "decode_session",
    "encode_session",
    "is_session_id",
    "moved",
    "new_session_id",
    "parse_cookie_value",
    "session_space",
]
