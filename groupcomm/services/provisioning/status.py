"""What each provisioning node publishes about itself, and the cluster overview built from it (sans-IO).

Every provisioning node is a member of the cluster-wide space
:data:`CLUSTER_SPACE`.  Besides the deployment-plan record's operations
(:mod:`.rollout`), it multicasts a :class:`NodeStatus` there whenever its
status changes (coalesced by the driver) and after every view of the space, so
every node holds the last status of every other one (:class:`StatusBoard`):
which groups it is in and at which revision, and its *actual* table (one
:class:`StatusRow` per bundle: desired version, actual version, state, health,
reason) and configuration versions.  That is what ``groupcomm cluster status``
shows from any node.

The messages of the provisioning spaces are framed by one leading byte:
:data:`OP_FRAME` (an encoded :class:`~.ops.Op`) or :data:`STATUS_FRAME` (a
:class:`NodeStatus`).  :func:`decode_status` is the one validating decoder of
statuses: bounded strings and lists; anything else raises
:class:`~.ops.MalformedOp`, which the receiver counts and drops.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Annotated

import msgspec
from msgspec import Meta, Struct

from groupcomm.services.provisioning.ops import MalformedOp

__all__ = [
    "CLUSTER_SPACE",
    "OP_FRAME",
    "STATUS_FRAME",
    "NodeStatus",
    "StatusBoard",
    "StatusRow",
    "config_version",
    "decode_status",
    "encode_status",
]

CLUSTER_SPACE = "groupcomm.provisioning"
"""The space every provisioning node joins: the plan record and the nodes' statuses."""
OP_FRAME = b"o"
STATUS_FRAME = b"s"
MAX_STATUS_BYTES = 512 * 1024
MAX_ROWS = 2000

_Name = Annotated[str, Meta(max_length=200)]
_Text = Annotated[str, Meta(max_length=2000)]


class StatusRow(Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """One bundle on one node: what it should run and what it runs."""

    name: _Name
    source: _Name
    """The group (or ``plan.ENV``) whose desired state decided this bundle ("" when none wants it)."""
    desired_version: _Name | None
    actual_version: _Name | None
    state: _Name
    """missing, fetching, installed, started, failed (see :class:`~.reconcile.BundleRow`)."""
    healthy: bool | None
    """For a started bundle: whether its process runs healthy (None: not started)."""
    reason: _Text = ""


class NodeStatus(Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """A provisioning node's published status."""

    node: _Name
    node_id: Annotated[int, Meta(ge=0)]
    groups: Annotated[tuple[_Name, ...], Meta(max_length=1000)]
    """The groups it is in, in membership order."""
    revisions: Annotated[dict[_Name, Annotated[int, Meta(ge=0)]], Meta(max_length=1000)]
    """Group -> the revision of the desired state it holds."""
    rows: Annotated[tuple[StatusRow, ...], Meta(max_length=MAX_ROWS)]
    configs: Annotated[dict[_Name, _Name], Meta(max_length=10_000)]
    """Configuration PID -> :func:`config_version` of the values this node applies."""
    plan: Annotated[dict[_Name, tuple[Annotated[int, Meta(ge=0)], _Name]], Meta(max_length=1000)] = {}
    """Environment -> (the plan revision this node runs, its role there)."""
    read_only: Annotated[tuple[_Name, ...], Meta(max_length=1000)] = ()
    """The groups where this node's side refuses writes now (not primary)."""
    plan_bundles: Annotated[dict[_Name, tuple[_Name, ...]], Meta(max_length=1000)] = {}
    """Environment -> the bundles its role here deploys (another environment may win the bundle)."""


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(NodeStatus)


def encode_status(status: NodeStatus) -> bytes:
    """The framed wire form of ``status``."""
    return STATUS_FRAME + _encoder.encode(status)


def decode_status(data: bytes) -> NodeStatus:
    """The status in ``data`` (without its frame byte); :class:`~.ops.MalformedOp` if invalid."""
    if len(data) > MAX_STATUS_BYTES:
        raise MalformedOp(f"status of {len(data)} bytes exceeds {MAX_STATUS_BYTES}")
    try:
        return _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MalformedOp(f"status: {exc}") from None


def config_version(values: Mapping[str, str]) -> str:
    """A short, stable digest of one PID's key/values (what ``cluster status`` compares)."""
    h = hashlib.sha256()
    for key in sorted(values):
        h.update(key.encode() + b"\0" + values[key].encode() + b"\0")
    return h.hexdigest()[:12]


class StatusBoard:
    """The last status of every node of the cluster space's current view."""

    def __init__(self) -> None:
        self._by_id: dict[int, NodeStatus] = {}
        self.members: tuple[int, ...] = ()

    def update(self, sender: int, status: NodeStatus) -> None:
        if status.node_id == sender:          # a node speaks for itself only
            self._by_id[sender] = status

    def view(self, members: Iterable[int]) -> None:
        """The space's members now: statuses of the others are forgotten."""
        self.members = tuple(members)
        keep = set(self.members)
        for gone in [n for n in self._by_id if n not in keep]:
            del self._by_id[gone]

    def statuses(self) -> list[NodeStatus]:
        """The known statuses, by node name."""
        return sorted(self._by_id.values(), key=lambda s: s.node)

    def name_of(self, node_id: int) -> str | None:
        status = self._by_id.get(node_id)
        return status.node if status is not None else None

    def members_of(self, group: str) -> list[str]:
        """The nodes that say they are in ``group``, by name."""
        return sorted(s.node for s in self._by_id.values() if group in s.groups)
