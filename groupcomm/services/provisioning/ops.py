"""The operations that change a group's desired state, and their wire format (msgpack).

An operation is multicast in the group's space (``groupcomm.provisioning/GROUP``)
and applied by every member at the same point of the total order (see
:mod:`.state`).  Each is an :class:`Op` envelope around one body:

==================  ===============================================  ==========
body                fields                                           tag
==================  ===============================================  ==========
InstallBundle       group, name, version, digest, size, filename     install
UninstallBundle     group, name                                      uninstall
StartBundle         group, name                                      start
StopBundle          group, name                                      stop
SetConfig           group, pid, key, value                           set-config
DeleteConfig        group, pid, key                                  delete-config
==================  ===============================================  ==========

Encoding: msgpack arrays (``array_like``), the body's tag first, so fields are
positional and unknown tags fail.  Every string and number is bounded (the
``Annotated`` types below); :func:`decode_op` checks all of it and raises the
single :class:`MalformedOp` for anything else, so a replica counts and drops a
bad payload without knowing why.  ``Op.op_id`` must be unique cluster-wide
(:func:`new_op_id`: the origin node's name and a counter); replicas use it to
apply a retried operation once.  ``Op.at`` is the origin's wall clock, for
people only: nothing orders or expires by it.
"""

from __future__ import annotations

import math
from typing import Annotated

import msgspec

from groupcomm.errors import GroupcommError

__all__ = [
    "Body",
    "DeleteConfig",
    "InstallBundle",
    "MalformedOp",
    "Op",
    "SetConfig",
    "StartBundle",
    "StopBundle",
    "UninstallBundle",
    "decode_op",
    "encode_op",
    "new_op_id",
]

MAX_OP_BYTES = 128 * 1024
"""An encoded operation is at most this long (a config value is the only large field)."""

GroupName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}\Z")]
BundleName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}\Z")]
"""Letters, digits, ``_ . -``, at most 100 (as the bundle manifest's ``name``)."""
Version = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+!-]{0,63}\Z")]
Digest = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}\Z")]
"""SHA-256, lowercase hex (the store's blob name)."""
Size = Annotated[int, msgspec.Meta(ge=0, le=1 << 40)]
FileName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,254}\Z")]
"""The original file name (it tells a wheel from a .tar.gz); no directories."""
Pid = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}\Z")]
ConfigKey = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,199}\Z")]
ConfigValue = Annotated[str, msgspec.Meta(max_length=64 * 1024)]
OpId = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
NodeName = Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
UserName = Annotated[str, msgspec.Meta(max_length=100)]


class MalformedOp(GroupcommError):
    """A payload that is not a valid encoded :class:`Op`."""


class _Body(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True, tag_field="kind"):
    pass


class InstallBundle(_Body, tag="install"):
    """Install (or upgrade to) ``name`` at ``version``: the blob ``digest`` of ``size`` bytes."""

    group: GroupName
    name: BundleName
    version: Version
    digest: Digest
    size: Size
    filename: FileName


class UninstallBundle(_Body, tag="uninstall"):
    group: GroupName
    name: BundleName


class StartBundle(_Body, tag="start"):
    group: GroupName
    name: BundleName


class StopBundle(_Body, tag="stop"):
    group: GroupName
    name: BundleName


class SetConfig(_Body, tag="set-config"):
    group: GroupName
    pid: Pid
    key: ConfigKey
    value: ConfigValue


class DeleteConfig(_Body, tag="delete-config"):
    group: GroupName
    pid: Pid
    key: ConfigKey


Body = InstallBundle | UninstallBundle | StartBundle | StopBundle | SetConfig | DeleteConfig


class Op(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """One operation: who proposed it (``origin_node``, ``user``), when by their clock (``at``), and ``body``."""

    op_id: OpId
    origin_node: NodeName
    user: UserName
    at: float
    body: Body

    @property
    def group(self) -> str:
        return self.body.group


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Op)


def encode_op(op: Op) -> bytes:
    """The wire form of ``op`` (raises :class:`MalformedOp` if it is not valid: it would be dropped)."""
    data = _encoder.encode(op)
    decode_op(data)             # the same checks every receiver makes, before anyone is bothered
    return data


def decode_op(data: bytes) -> Op:
    """The :class:`Op` in ``data``; :class:`MalformedOp` for anything invalid."""
    if len(data) > MAX_OP_BYTES:
        raise MalformedOp(f"operation of {len(data)} bytes exceeds {MAX_OP_BYTES}")
    try:
        op = _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MalformedOp(str(exc)) from None
    if not math.isfinite(op.at):
        raise MalformedOp("Op.at is not a finite number")
    return op


def new_op_id(node: str, counter: int) -> str:
    """A cluster-unique operation id: the origin node's name and its own counter (``n1:42``).

    The counter must not repeat for ``node`` (persist it, or start from the node's
    clock in nanoseconds)."""
    return f"{node}:{counter}"
