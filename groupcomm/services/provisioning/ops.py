"""The operations that change a group's desired state, and their wire format (msgpack).

An operation is multicast in the group's space (``groupcomm.provisioning/GROUP``)
and applied by every member at the same point of the total order (see
:mod:`.state`).  Each is an :class:`Op` envelope around one body:

==================  ===============================================  ==========
body                fields                                           tag
==================  ===============================================  ==========
InstallBundle       group, name, version, digest, size, filename,    install
                    signature
UninstallBundle     group, name                                      uninstall
StartBundle         group, name                                      start
StopBundle          group, name                                      stop
SetConfig           group, pid, key, value                           set-config
DeleteConfig        group, pid, key                                  delete-config
SetGroupPolicy      group, trusted_keys                              policy
AdoptState          group, state                                     adopt
BeginRollout        env, plan_digest, plan, roles, targets, batch,   plan-begin
                    health_timeout, force, rollback_of
ReportHealth        env, revision, node, healthy, detail             plan-report
AdvanceRollout      env, revision, batch                             plan-advance
EndRollout          env, revision, succeeded, reason                 plan-end
SetEnvPolicy        env, trusted_keys                                plan-policy
==================  ===============================================  ==========

The first eight change one group's state (:mod:`.state`); the ``plan-*``
bodies change the cluster's deployment-plan record (:mod:`.rollout`), multicast
in its own space, and name an environment instead of a group (their
:attr:`Op.group` is :data:`PLANS`).

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

from groupcomm.errors import ConfigError, GroupcommError

__all__ = [
    "PLANS",
    "AdoptState",
    "AdvanceRollout",
    "BeginRollout",
    "Body",
    "BundleRef",
    "DeleteConfig",
    "EndRollout",
    "GroupBody",
    "InstallBundle",
    "MalformedOp",
    "Op",
    "PlanBody",
    "ReportHealth",
    "RoleTarget",
    "SetConfig",
    "SetEnvPolicy",
    "SetGroupPolicy",
    "StartBundle",
    "StopBundle",
    "UninstallBundle",
    "check_group_name",
    "decode_op",
    "encode_op",
    "new_op_id",
]

MAX_OP_BYTES = 1000 * 1024
"""An encoded operation is at most this long (the large ones: :class:`AdoptState`, a plan)."""
MAX_STATE_BYTES = 960 * 1024
"""A group state snapshot an :class:`AdoptState` carries is at most this long."""
MAX_PLAN_BYTES = 64 * 1024
"""A plan file (``plan.toml``) is at most this long."""
MAX_TRUSTED_KEYS = 32
MAX_TARGETS = 1000
"""Nodes one rollout may target."""
PLANS = "@plans"
"""What :attr:`Op.group` is for a plan body (not a valid group name, so it names no group)."""

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
StateName = Annotated[str, msgspec.Meta(pattern=r"^(@plans|[A-Za-z0-9][A-Za-z0-9_.-]{0,99})\Z")]
"""A group's name, or :data:`PLANS` (the replicated states an :class:`AdoptState` may name)."""
EnvName = GroupName
"""A plan environment (``preprod``, ``prod``): spelled like a group."""
RoleName = GroupName
Signature = Annotated[bytes, msgspec.Meta(max_length=64)]
"""An Ed25519 signature (64 bytes) of the bundle (:func:`.signing.signed_message`); empty: unsigned."""
RawPublicKey = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
"""An Ed25519 public key, raw."""
Detail = Annotated[str, msgspec.Meta(max_length=1000)]
Revision = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]


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
    signature: Signature = b""


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


class SetGroupPolicy(_Body, tag="policy"):
    """From now on the group accepts only bundles signed by one of ``trusted_keys`` (empty: any bundle)."""

    group: GroupName
    trusted_keys: Annotated[tuple[RawPublicKey, ...], msgspec.Meta(max_length=MAX_TRUSTED_KEYS)] = ()


class AdoptState(_Body, tag="adopt"):
    """A member that restarted with a newer stored state than the group's offers it (cold start).

    ``state``: a :meth:`.state.GroupState.snapshot`; accepted only if its revision
    is higher than the group's (revisions grow along the one line of primary
    components, so the highest one stored anywhere is the latest)."""

    group: StateName
    state: Annotated[bytes, msgspec.Meta(max_length=MAX_STATE_BYTES)]


# ----------------------------------------------------------------- deployment plans


class BundleRef(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """A bundle file a plan role deploys (resolved from the plan by the node that applies it)."""

    name: BundleName
    version: Version
    digest: Digest
    size: Size
    filename: FileName
    signature: Signature = b""


class RoleTarget(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """One target node of a rollout and the role it gets."""

    node: NodeName
    role: RoleName


class BeginRollout(_Body, tag="plan-begin"):
    """Roll ``plan`` out to environment ``env``: ``roles`` (role -> bundles and configuration), on
    ``targets`` in batches of ``batch`` nodes, each batch healthy within ``health_timeout`` seconds.

    ``rollback_of``: this rollout restores revision N of the environment (0: a new plan).
    ``force``: the promotion gate was overridden (recorded)."""

    env: EnvName
    plan_digest: Digest
    plan: Annotated[str, msgspec.Meta(max_length=MAX_PLAN_BYTES)]
    roles: Annotated[dict[RoleName, tuple[tuple[BundleRef, ...], dict[Pid, dict[ConfigKey, ConfigValue]]]],
                     msgspec.Meta(max_length=100)]
    targets: Annotated[tuple[RoleTarget, ...], msgspec.Meta(max_length=MAX_TARGETS)]
    batch: Annotated[int, msgspec.Meta(ge=1, le=MAX_TARGETS)]
    health_timeout: Annotated[float, msgspec.Meta(gt=0, le=86400)]
    force: bool = False
    rollback_of: Revision = 0

    @property
    def group(self) -> str:
        return PLANS


class ReportHealth(_Body, tag="plan-report"):
    """Target ``node`` of rollout ``revision`` of ``env`` runs its role healthy (or not: ``detail``)."""

    env: EnvName
    revision: Revision
    node: NodeName
    healthy: bool
    detail: Detail = ""

    @property
    def group(self) -> str:
        return PLANS


class AdvanceRollout(_Body, tag="plan-advance"):
    """The rollout's batches up to ``batch`` (0-based) switch to the new revision."""

    env: EnvName
    revision: Revision
    batch: Annotated[int, msgspec.Meta(ge=0, le=MAX_TARGETS)]

    @property
    def group(self) -> str:
        return PLANS


class EndRollout(_Body, tag="plan-end"):
    """The rollout ends: every target at the new revision (``succeeded``) or every one back at the
    previous revision (rolled back, for ``reason``)."""

    env: EnvName
    revision: Revision
    succeeded: bool
    reason: Detail = ""

    @property
    def group(self) -> str:
        return PLANS


class SetEnvPolicy(_Body, tag="plan-policy"):
    """From now on rollouts of ``env`` deploy only bundles signed by one of ``trusted_keys`` (empty: any)."""

    env: EnvName
    trusted_keys: Annotated[tuple[RawPublicKey, ...], msgspec.Meta(max_length=MAX_TRUSTED_KEYS)] = ()

    @property
    def group(self) -> str:
        return PLANS


GroupBody = (InstallBundle | UninstallBundle | StartBundle | StopBundle | SetConfig | DeleteConfig
             | SetGroupPolicy | AdoptState)
PlanBody = BeginRollout | ReportHealth | AdvanceRollout | EndRollout | SetEnvPolicy
Body = GroupBody | PlanBody


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


def check_group_name(name: str, what: str = "group") -> str:
    """``name`` if it is a valid group (or environment) name, else ConfigError saying what a name is."""
    try:
        return msgspec.convert(name, GroupName)
    except msgspec.ValidationError:
        raise ConfigError(f"{what} name {name!r}: expected 1 to 100 letters, digits, '_', '.', '-', "
                          "starting with a letter or digit") from None


def new_op_id(node: str, counter: int) -> str:
    """A cluster-unique operation id: the origin node's name and its own counter (``n1:42``).

    The counter must not repeat for ``node`` (persist it, or start from the node's
    clock in nanoseconds)."""
    return f"{node}:{counter}"
