"""The frames session stores exchange, and the one validating decoder they all pass.

Every frame is a msgpack array whose first element is its tag, declared once
here as a :class:`msgspec.Struct`.  Each carries ``view``: the space view
(:attr:`~groupcomm.layers.spaces.SpaceView.view_id`) its sender was in; a
receiver acts only on frames of the view it is in (see :mod:`.core`).

====================  ==================  ====================================================
frame                 from -> to          meaning
====================  ==================  ====================================================
:class:`Hello`        member -> space     my name and tags (multicast after a view with joiners)
:class:`Holdings`     member -> owner     what I keep of your buckets' sessions, and which ended
:class:`Verdict`      owner -> member     your holdings are indexed; drop these stale records
:class:`Register`     creator -> owner    I created this session and hold it
:class:`Registered`   owner -> creator    indexed
:class:`Acquire`      requester -> owner  I want to hold this session (a request landed here)
:class:`Evacuate`     holder -> owner     move this session to ``to`` (I am stopping)
:class:`NotFound`     owner -> requester  no such session
:class:`Handoff`      owner -> keeper     send your record to ``to`` under holder epoch ``epoch``
:class:`Missing`      keeper -> owner     I have no record of it (any more)
:class:`Transfer`     keeper -> requester the record: you hold it now
:class:`Acquired`     requester -> owner  I took it (``ok``) or had no room for it
:class:`Replicate`    holder -> backup    keep this copy
:class:`Replicated`   backup -> holder    kept (``ok``) or refused (no room, or I have a newer one)
:class:`Forget`       holder -> all       the session ended (invalidated or expired)
:class:`Forgotten`    any -> holder       forgotten
:class:`Drop`         holder -> backup    drop your copy if it is older than (epoch, version)
====================  ==================  ====================================================

:func:`decode_frame` is the only way bytes from a peer become a frame; it
raises :class:`MalformedFrame` for anything that does not match a schema
exactly (the caller counts and drops it).
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from groupcomm.services.sessions.record import MAX_PAYLOAD_BYTES, Counter, SessionId

__all__ = [
    "Acquire",
    "Acquired",
    "Drop",
    "Evacuate",
    "Forget",
    "Forgotten",
    "Frame",
    "Handoff",
    "Held",
    "Hello",
    "Holdings",
    "MalformedFrame",
    "Missing",
    "NotFound",
    "Register",
    "Registered",
    "Replicate",
    "Replicated",
    "Transfer",
    "Verdict",
    "ViewId",
    "decode_frame",
    "encode_frame",
]

Node = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
Req = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
ViewId = tuple[Int64, Int64, Int64]
Bucket = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Record = Annotated[bytes, msgspec.Meta(max_length=MAX_PAYLOAD_BYTES + 4096)]
Nodes = Annotated[list[Node], msgspec.Meta(max_length=4096)]
ShortText = Annotated[str, msgspec.Meta(max_length=256)]
Tags = Annotated[dict[ShortText, ShortText], msgspec.Meta(max_length=32)]
MAX_ENTRIES = 65536


class MalformedFrame(ValueError):
    """Bytes from a peer that are not a valid sessions frame (counted and dropped, never acted on)."""


class _Frame(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True, tag_field="t"):
    view: ViewId


class Held(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """One record a member keeps: as the holder or as a copy, at (epoch, version)."""

    id: SessionId
    holder: bool
    epoch: Counter
    version: Counter


class Hello(_Frame, tag=1):
    name: ShortText
    tags: Tags


class Holdings(_Frame, tag=2):
    entries: Annotated[list[Held], msgspec.Meta(max_length=MAX_ENTRIES)]
    last: bool
    buried: Annotated[list[Held], msgspec.Meta(max_length=MAX_ENTRIES)] = []
    """Sessions that ended (invalidated, expired) at ``epoch``: their older records must go."""


class Verdict(_Frame, tag=3):
    drops: Annotated[list[Held], msgspec.Meta(max_length=MAX_ENTRIES)]
    last: bool


class Register(_Frame, tag=4):
    id: SessionId
    epoch: Counter


class Registered(_Frame, tag=5):
    id: SessionId
    ok: bool


class Acquire(_Frame, tag=6):
    id: SessionId


class Evacuate(_Frame, tag=7):
    id: SessionId
    to: Node


class NotFound(_Frame, tag=8):
    id: SessionId


class Handoff(_Frame, tag=9):
    id: SessionId
    to: Node
    epoch: Counter
    copies: Nodes


class Missing(_Frame, tag=10):
    id: SessionId


class Transfer(_Frame, tag=11):
    record: Record
    copies: Nodes


class Acquired(_Frame, tag=12):
    id: SessionId
    epoch: Counter
    ok: bool


class Replicate(_Frame, tag=13):
    record: Record


class Replicated(_Frame, tag=14):
    id: SessionId
    epoch: Counter
    version: Counter
    ok: bool


class Forget(_Frame, tag=15):
    id: SessionId
    epoch: Counter


class Forgotten(_Frame, tag=16):
    id: SessionId


class Drop(_Frame, tag=17):
    id: SessionId
    epoch: Counter
    version: Counter


Frame = (Hello | Holdings | Verdict | Register | Registered | Acquire | Evacuate | NotFound | Handoff
         | Missing | Transfer | Acquired | Replicate | Replicated | Forget | Forgotten | Drop)

_decoder = msgspec.msgpack.Decoder(Frame)
_encoder = msgspec.msgpack.Encoder()


def decode_frame(raw: bytes) -> Frame:
    """The frame in ``raw``; :class:`MalformedFrame` for anything else."""
    try:
        return _decoder.decode(raw)
    except (msgspec.DecodeError, TypeError, ValueError) as exc:
        raise MalformedFrame(str(exc)) from None


def encode_frame(frame: Frame) -> bytes:
    """The wire form of ``frame``."""
    return _encoder.encode(frame)
