"""Every datagram header and every upper-layer frame, in one place.

Two levels of wire format meet here.

**Datagrams.**  Every UDP datagram a member sends starts with a two-byte magic
that names the layer it belongs to, then a one-byte protocol version:

.. list-table::
   :header-rows: 1
   :widths: 10 40 50

   * - magic
     - layer
     - header (big-endian)
   * - ``GC``
     - TOTEM ring (built in C, ``groupcomm/_ring.c``)
     - magic, version u8, type u8, cluster u32, sender u32 (:data:`HEADER`)
   * - ``GF``
     - failure detector (:mod:`~groupcomm.layers.fd`)
     - :data:`HEADER` only; the type is HEARTBEAT, PING or PONG
   * - ``GU``
     - UNICAST (:mod:`~groupcomm.layers.unicast`)
     - :data:`HEADER`, then dest u32 and the epochs (:data:`UNICAST_COMMON`)
   * - ``GP``
     - probe (:mod:`~groupcomm.io.probe`)
     - magic, version u8, kind u8, cluster u32; no sender (:data:`PROBE_HEADER`)

So in every datagram but a probe, bytes 8..12 are the sender's node id and
byte 3 is the packet type; the drivers use :data:`SENDER`, :data:`TYPE_OFFSET`
and :data:`RING_TOKEN` for that, never bare offsets.  :data:`PROTOCOL_VERSION`
is one number for all of them and for the frames below: a change to any of
them bumps it, and the C core's ``WIRE_VERSION`` must stay equal to it (a test
checks).  A member drops every datagram of another version, counts it in the
layer's counters and logs it once per (layer, peer, version) through the
``groupcomm.wire`` logger (:class:`VersionLog`).

**Frames.**  The layers above the ring (spaces, request-reply, point to point,
state transfer) exchange msgpack arrays ``[op, field, ...]``: *ring frames*
travel as ring messages of kind :data:`KIND_SERVICES` (so every member
delivers them in the total order), *unicast frames* over UNICAST.  Each kind of
frame is declared once below as a :class:`msgspec.Struct` (``array_like``, its
op as the tag), encoded with the ``msgpack`` package by :func:`encode` and
decoded by one validating decoder per channel (:func:`decode_ring`,
:func:`decode_unicast`).  Anything that does not match its schema exactly (bad
msgpack, unknown op, wrong number of fields, wrong types, out-of-range values,
trailing bytes) raises :class:`MalformedFrame`; the layers count and drop it.
Application payloads in frames are always ``bytes``.

The table of frames below is generated from the declarations.
"""

import logging
import struct
from typing import Annotated, get_type_hints

import msgpack
import msgspec
from msgspec import Meta, Struct

__all__ = [
    # datagrams
    "PROTOCOL_VERSION", "RING_MAGIC", "FD_MAGIC", "UNICAST_MAGIC", "PROBE_MAGIC", "MAGICS",
    "ProbeReport", "decode_probe_report", "HEADER", "HEADER_SIZE", "PROBE_HEADER", "VERSION_OFFSET", "TYPE_OFFSET", "SENDER", "RING_TOKEN",
    "FD_HEARTBEAT", "FD_PING", "FD_PONG", "PROBE_REQUEST", "PROBE_RESPONSE",
    "UNICAST_DATA", "UNICAST_ACK", "UNICAST_RESET", "UNICAST_ACK_NOW",
    "UNICAST_COMMON", "UNICAST_DATA_HEADER", "UNICAST_ACK_HEADER",
    "datagram_sender", "datagram_version", "is_token", "VersionLog",
    # ring kinds and FRAG
    "KIND_APPLICATION", "KIND_FRAGMENT", "KIND_SERVICES", "FRAG_HEADER",
    # frames
    "JOIN", "LEAVE", "SYNC", "DATA", "STATE_REQ", "STATE_DONE", "REQUEST",
    "STATE_CHUNK", "REPLY", "P2P_REQUEST", "DIRECT",
    "JoinFrame", "LeaveFrame", "SyncFrame", "DataFrame", "StateReqFrame", "StateDoneFrame", "RequestFrame",
    "StateChunkFrame", "ReplyFrame", "P2PRequestFrame", "DirectFrame",
    "RingFrame", "UnicastFrame", "Frame", "MalformedFrame", "encode", "decode_ring", "decode_unicast",
    "MAX_SPACE_NAME", "check_space_name", "frame_table",
]

logger = logging.getLogger("groupcomm.wire")

# ---------------------------------------------------------------------------
# Datagrams
# ---------------------------------------------------------------------------

PROTOCOL_VERSION = 2
"""The version byte of every datagram; equal to ``WIRE_VERSION`` in ``groupcomm/_ring.c``."""

RING_MAGIC = b"GC"
FD_MAGIC = b"GF"
UNICAST_MAGIC = b"GU"
PROBE_MAGIC = b"GP"
MAGICS = {RING_MAGIC: "ring", FD_MAGIC: "fd", UNICAST_MAGIC: "unicast", PROBE_MAGIC: "probe"}
"""Each magic and the name of its layer (as used in counters and logs)."""

HEADER = struct.Struct(">2sBBII")
"""The common header of ring, FD and UNICAST datagrams: magic, version, type, cluster, sender.
The C core's ``HDR_LEN`` (``_ring.c``, ``_pump.c``) is its size."""
HEADER_SIZE = HEADER.size
PROBE_HEADER = struct.Struct(">2sBBI")
"""A probe datagram's header: magic, version, kind, cluster (an answer's msgpack report follows)."""
VERSION_OFFSET = 2
TYPE_OFFSET = 3
SENDER = slice(8, 12)
"""Where the sender's node id (u32, big-endian) sits in every datagram but a probe."""

RING_TOKEN = 1
"""Packet type of a ring token (``MSG_TOKEN`` in ``_ring.c``, ``TYPE_TOKEN`` in ``_pump.c``)."""
FD_HEARTBEAT, FD_PING, FD_PONG = 1, 2, 3
"""Failure-detector packet types; an FD datagram is exactly :data:`HEADER`."""
PROBE_REQUEST, PROBE_RESPONSE = 1, 2
"""Probe kinds: a request is exactly :data:`PROBE_HEADER`; a response adds a msgpack map."""

UNICAST_DATA, UNICAST_ACK, UNICAST_RESET = 1, 2, 3
"""UNICAST packet types (a RESET is laid out as an ACK)."""
UNICAST_ACK_NOW = 0x01
"""UNICAST DATA flag: acknowledge this packet at once."""
UNICAST_COMMON = struct.Struct(">2sBBIIIQQ")
"""UNICAST: :data:`HEADER`, then dest u32, sender epoch u64, dest epoch u64 (0: unknown)."""
UNICAST_DATA_HEADER = struct.Struct(">2sBBIIIQQIQIIIBB")
"""UNICAST DATA: common, stream u32, seq u64, msg id u32, index u32, count u32, kind u8, flags u8;
the fragment follows."""
UNICAST_ACK_HEADER = struct.Struct(">2sBBIIIQQIQH")
"""UNICAST ACK and RESET: common, stream u32, next expected seq u64, bitmap length u16; the bitmap follows."""


def datagram_sender(data: bytes) -> int | None:
    """The sender's node id of a ring, FD or UNICAST datagram (None if too short)."""
    return int.from_bytes(data[SENDER], "big") if len(data) >= HEADER_SIZE else None


def datagram_version(data: bytes) -> int | None:
    """The protocol version byte of any datagram (None if too short)."""
    return data[VERSION_OFFSET] if len(data) > VERSION_OFFSET else None


def is_token(data: bytes) -> bool:
    """Whether ``data`` is a ring token (drivers act on tokens after the messages that came with them)."""
    return len(data) > TYPE_OFFSET and data[TYPE_OFFSET] == RING_TOKEN and data[:2] == RING_MAGIC


class VersionLog:
    """Logs datagrams of a protocol version this member cannot speak, once per (layer, peer, version).

    The layers count every such datagram themselves; this only keeps the log
    readable (one line per peer and version, not one per packet) and bounded:
    after ``limit`` distinct keys it stops logging new ones.
    """

    def __init__(self, me: int, limit: int = 256) -> None:
        self.me = me
        self._limit = limit
        self._seen: set[tuple] = set()

    def __call__(self, layer: str, peer: object, version: int | None) -> None:
        key = (layer, peer, version)
        if key in self._seen or len(self._seen) >= self._limit:
            return
        self._seen.add(key)
        logger.warning(
            "member %s: dropping %s datagrams of protocol version %s from %s; this member speaks version %s "
            "(a member of another version is a stranger: see the upgrade notes in the wire docs)",
            self.me, layer, version, peer, PROTOCOL_VERSION,
        )


# ---------------------------------------------------------------------------
# Ring kinds and FRAG
# ---------------------------------------------------------------------------

KIND_APPLICATION = 0
"""Ring kind of a channel message (delivered as :class:`~groupcomm.events.Message`; never decoded here)."""
KIND_FRAGMENT = 1
"""Ring kind of a fragment of a large message (:mod:`~groupcomm.layers.frag`)."""
KIND_SERVICES = 2
"""Ring kind of every ring frame below."""
FRAG_HEADER = struct.Struct(">IIIB")
"""Ahead of each fragment: msg id, index, count, ring kind of the whole message."""

# ---------------------------------------------------------------------------
# Frames
# ---------------------------------------------------------------------------

# Ring frame ops (KIND_SERVICES ring messages) and unicast frame ops.
JOIN, LEAVE, SYNC, DATA, STATE_REQ, STATE_DONE, REQUEST = range(1, 8)
STATE_CHUNK, REPLY, P2P_REQUEST, DIRECT = 16, 17, 18, 19

MAX_SPACE_NAME = 255
"""Longest space name, in UTF-8 bytes."""

# msgpack integers never reach 2**64, so ``ge=0`` is also "below 2**64".
Id = Annotated[int, Meta(ge=0)]
MAX_SENIORITY = 1 << 16
"""Largest position a SYNC claims in a space view (rings hold at most 64 members; room to grow)."""
SpaceName = Annotated[str, Meta(min_length=1, max_length=MAX_SPACE_NAME)]
Scope = Annotated[str, Meta(max_length=MAX_SPACE_NAME)]
"""A space name, or "" for the whole channel (requests only)."""
Point = tuple[Id, Id, int]
"""A point of the total order: ring representative, ring seq, deliveries in that ring (negative
in a transitional configuration)."""
RingIdValue = tuple[Id, Id]


def check_space_name(space: object) -> None:
    """Raise ValueError unless ``space`` is a usable space name: a non-empty str of at most 255 UTF-8 bytes."""
    if not isinstance(space, str) or not space or not _fits(space):
        raise ValueError(f"space name must be a non-empty string of at most {MAX_SPACE_NAME} bytes, not {space!r}")


def _fits(name: str) -> bool:
    """At most MAX_SPACE_NAME UTF-8 bytes (the Meta bound counts characters; ASCII needs no encode)."""
    if name.isascii():
        return len(name) <= MAX_SPACE_NAME
    try:
        return len(name.encode()) <= MAX_SPACE_NAME
    except UnicodeEncodeError:                 # lone surrogates cannot travel at all
        return False


def _check_name(name: str) -> None:
    if not _fits(name):
        raise ValueError(f"space name over {MAX_SPACE_NAME} UTF-8 bytes")


class _Frame(Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """Base of every frame: a msgpack array whose first item is the op (the tag)."""


class JoinFrame(_Frame, tag=JOIN):
    """Ring: the sender joins ``space`` where this is delivered."""

    space: SpaceName

    def __post_init__(self) -> None:
        _check_name(self.space)


class LeaveFrame(_Frame, tag=LEAVE):
    """Ring: the sender leaves ``space`` where this is delivered."""

    space: SpaceName

    def __post_init__(self) -> None:
        _check_name(self.space)


class SyncFrame(_Frame, tag=SYNC):
    """Ring, after a merge: the sender's spaces (name, has state) and where its state comes from."""

    ring_id: RingIdValue
    spaces: list[tuple[SpaceName, bool]]
    stable_ring: RingIdValue
    stable_primary: bool
    last_primary_seq: int
    epochs: list[tuple[SpaceName, RingIdValue]] = []
    waiting: list[SpaceName] = []
    seniority: list[tuple[SpaceName, Annotated[int, Meta(ge=0, le=MAX_SENIORITY)]]] = []
    # The last three came later; a frame without them (an earlier release) claims none.
    # ``seniority``: each claimed space the sender was a member of before the merge, with its
    # position (0 = oldest) in the space view of its side, so the merged view keeps each
    # side's order (a space's oldest member stays first across a merge: the supervisor's rule).
    # ``epochs``: each claimed space whose state the sender's application holds complete (its
    # current state, or the one it had before the transfer under way) and the ring id of the most
    # recent primary configuration that state belongs to ([0, 0]: none).  ``waiting``: claimed
    # spaces the sender is a member of without any complete state (its transfer never finished).

    def __post_init__(self) -> None:
        names = [name for name, _ in self.spaces]
        if len(set(names)) != len(names):
            raise ValueError("a space is claimed twice")
        for name in names:
            _check_name(name)
        ranked = [name for name, _ in self.seniority]
        if len(set(ranked)) != len(ranked) or not set(ranked) <= set(names):
            raise ValueError("a seniority for a space claimed twice or not claimed")
        described = [name for name, _ in self.epochs] + list(self.waiting)
        if len(set(described)) != len(described):
            raise ValueError("a space has two epochs, or an epoch and no state")
        if not set(described) <= set(names):
            raise ValueError("an epoch for a space that is not claimed")


class DataFrame(_Frame, tag=DATA):
    """Ring: a message to the members of ``space``."""

    space: SpaceName
    payload: bytes

    def __post_init__(self) -> None:
        if not self.space.isascii():
            _check_name(self.space)


class StateReqFrame(_Frame, tag=STATE_REQ):
    """Ring: the sender's state provider for ``space`` left; the next one snapshots here."""

    space: SpaceName

    def __post_init__(self) -> None:
        _check_name(self.space)


class StateDoneFrame(_Frame, tag=STATE_DONE):
    """Ring: the sender installed the state of ``space`` (it may now provide it)."""

    space: SpaceName

    def __post_init__(self) -> None:
        _check_name(self.space)


class RequestFrame(_Frame, tag=REQUEST):
    """Ring: a request to every member of ``scope`` ("" = the channel) at this point."""

    scope: Scope
    req_id: Id
    payload: bytes

    def __post_init__(self) -> None:
        _check_name(self.scope)


class StateChunkFrame(_Frame, tag=STATE_CHUNK):
    """Unicast: part ``index`` of the snapshot of ``space`` taken at ``point`` (``chunk`` None: no state)."""

    space: SpaceName
    point: Point
    index: Id
    last: bool
    chunk: bytes | None

    def __post_init__(self) -> None:
        _check_name(self.space)
        if self.chunk is None and not (self.index == 0 and self.last):
            raise ValueError("'no state' must be the only chunk")


class ReplyFrame(_Frame, tag=REPLY):
    """Unicast: the answer to request ``req_id`` (``value`` if ok, else ``error``)."""

    req_id: Id
    ok: bool
    value: bytes | None
    error: str | None

    def __post_init__(self) -> None:
        if self.ok != (self.value is not None) or self.ok == (self.error is not None):
            raise ValueError("a reply carries a value if ok, else an error")


class P2PRequestFrame(_Frame, tag=P2P_REQUEST):
    """Unicast: a request sent to chosen members; ``scope`` names the handler ("" = the channel's)."""

    scope: Scope
    req_id: Id
    payload: bytes

    def __post_init__(self) -> None:
        _check_name(self.scope)


class DirectFrame(_Frame, tag=DIRECT):
    """Unicast: a point-to-point message (``send_to``)."""

    payload: bytes


RingFrame = JoinFrame | LeaveFrame | SyncFrame | DataFrame | StateReqFrame | StateDoneFrame | RequestFrame
UnicastFrame = StateChunkFrame | ReplyFrame | P2PRequestFrame | DirectFrame
Frame = RingFrame | UnicastFrame

RING_FRAMES: tuple[type, ...] = RingFrame.__args__        # type: ignore[attr-defined]
UNICAST_FRAMES: tuple[type, ...] = UnicastFrame.__args__  # type: ignore[attr-defined]


class MalformedFrame(ValueError):
    """A frame that does not match its schema; the receiving layer counts and drops it."""


_ring_decoder = msgspec.msgpack.Decoder(RingFrame)
_unicast_decoder = msgspec.msgpack.Decoder(UnicastFrame)


def decode_ring(data: bytes) -> RingFrame:
    """The ring frame in ``data``; raises :class:`MalformedFrame` unless it is exactly one valid frame."""
    try:
        return _ring_decoder.decode(data)
    except msgspec.MsgspecError as exc:
        raise MalformedFrame(str(exc)) from None


def decode_unicast(data: bytes) -> UnicastFrame:
    """The unicast frame in ``data``; raises :class:`MalformedFrame` unless it is exactly one valid frame."""
    try:
        return _unicast_decoder.decode(data)
    except msgspec.MsgspecError as exc:
        raise MalformedFrame(str(exc)) from None


class ProbeReport(Struct, frozen=True):
    """What a member answers to ``groupcomm probe`` (a msgpack map after :data:`PROBE_HEADER`).

    Every field but ``address`` may be missing: a member without a key answers a short
    request with the first fields only (docs/security.rst, "Probe")."""

    address: int
    name: str | None = None
    state: str = ""
    view: list[int] = []
    ring: str = ""
    rotations_per_s: float = 0.0
    debug: str = ""
    stats: dict[str, int] = {}


_probe_report_decoder = msgspec.msgpack.Decoder(ProbeReport)


def decode_probe_report(data: bytes) -> dict | None:
    """The report in a probe answer's body as a plain dict, or None when it does not fit the schema."""
    try:
        return msgspec.structs.asdict(_probe_report_decoder.decode(data))
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def encode(frame: Frame) -> bytes:
    """``frame`` as its msgpack array ``[op, field, ...]``."""
    return msgpack.packb((frame.__struct_config__.tag, *msgspec.structs.astuple(frame)), use_bin_type=True)


# ---------------------------------------------------------------------------
# The generated table of frames (appended to this module's docstring)
# ---------------------------------------------------------------------------

def _type_name(annotation: object) -> str:
    names = {SpaceName: "space name", Scope: "scope", Id: "uint64", Point: "point", RingIdValue: "ring id"}
    for known, name in names.items():
        if annotation == known:
            return name
    if annotation == list[tuple[SpaceName, bool]]:
        return "[[space name, bool], ...]"
    if annotation == list[tuple[SpaceName, RingIdValue]]:
        return "[[space name, ring id], ...] (may be absent)"
    if annotation == list[SpaceName]:
        return "[space name, ...] (may be absent)"
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("NoneType", "None")


def frame_table() -> str:
    """An RST table of every frame: channel, op, name, fields (generated from the declarations)."""
    rows = ["   * - channel\n     - op\n     - frame\n     - fields"]
    for channel, frames in (("ring", RING_FRAMES), ("unicast", UNICAST_FRAMES)):
        for cls in frames:
            info = msgspec.inspect.type_info(cls)
            hints = get_type_hints(cls, include_extras=True)
            fields = ", ".join(f"``{f.name}``: {_type_name(hints[f.name])}" for f in info.fields)
            summary = (cls.__doc__ or "").strip().split("\n")[0]
            rows.append(f"   * - {channel}\n     - {cls.__struct_config__.tag}\n     - ``{cls.__name__}``"
                        f"\n     - {fields}\n\n       {summary}")
    return ".. list-table::\n   :header-rows: 1\n   :widths: 8 4 20 68\n\n" + "\n".join(rows) + "\n"


__doc__ = (__doc__ or "") + "\n" + frame_table() + """
Field types: *space name* is a non-empty str of at most 255 UTF-8 bytes;
*scope* is a space name or ""; *uint64* an int in 0..2**64-1; *point* three
ints (ring representative, ring seq, deliveries in that ring); *ring id* two
uint64s; ``bytes`` is msgpack ``bin`` only (a str or an int where bytes belong
is a malformed frame); ``bool`` is msgpack ``true``/``false`` only.
"""
