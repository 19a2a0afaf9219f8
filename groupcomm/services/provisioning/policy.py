"""Sync policies: which of a group's changes this node takes, and where its own changes go (sans-IO, pure).

A node's :class:`SyncPolicy` (the node file's ``[provisioning.sync]`` table)
says, per group (``default`` for every group not listed) and per resource kind
(``bundles``: bundle names; ``configs``: configuration PIDs), a **mode** and
**inbound** / **outbound** lists of names with :mod:`fnmatch` wildcards::

    [provisioning.sync.default]            # every group not listed
    bundles = { mode = "cluster" }
    configs = { mode = "cluster", inbound = { deny = ["local.*"] }, outbound = { deny = ["local.*"] } }
    [provisioning.sync.web]                # replaces default's configs; bundles still from default
    configs = { mode = "cluster", outbound = { allow = ["shared.*"] } }

A list filter admits a name unless a ``deny`` pattern matches it, and then only
if ``allow`` is empty or one of its patterns matches (deny wins over allow).
Patterns match the whole name, case-sensitively (:func:`fnmatch.fnmatchcase`).
A group's table replaces the default's policy kind by kind (a kind it does not
name is the default's, lists and all); no table at all: ``cluster`` with no lists.
``mode`` may be left out (``cluster``); lists are refused in the other modes,
where they would mean nothing.  A group literally named ``default`` gets the
``default`` table, like every unlisted group.

**The rule.**  The replicated state (:class:`~.state.GroupState`) is never
filtered: it stays identical on every member.  The policy decides only what
this node *acts on* (:meth:`SyncPolicy.effective`) and where its user's changes
go (:meth:`SyncPolicy.outbound`).  Besides the replicated state R, the node
keeps a **local overlay** L per group: a ``GroupState`` of the same group to
which the changes kept local are applied with :meth:`GroupState.apply
<groupcomm.services.provisioning.state.GroupState.apply>` (persisted by the
driver, never multicast).  For a resource ``n`` of kind K, the route is:

==========  ==============  ===============  ==================  =====================  ===========
mode of K   inbound admits  outbound admits  route               this node acts on      its change
==========  ==============  ===============  ==================  =====================  ===========
cluster     yes             yes              ``shared``          R[n]                   propose
cluster     yes             no               ``overridden``      R[n] overlaid by L[n]  local
cluster     no              no               ``local``           L[n]                   local
cluster     no              yes              ``sent``            nothing                propose
node        --              --               ``local``           L[n]                   local
disabled    --              --               ``disabled``        nothing                refused
==========  ==============  ===============  ==================  =====================  ===========

"Absent" is absent: a resource that is in neither source the route names is not
in :meth:`~SyncPolicy.effective`.  *Overlaid*: for a bundle, L's entry (version,
file, started) replaces R's; for a PID, L's keys replace R's keys of the same
name and R's other keys stay.  The overlay is consulted **exactly** for the
routes whose changes are local, so whatever this node acts on it can also change,
and an overlay entry left over from an earlier policy never shadows a shared
resource (it is kept, and counts again if the policy is changed back).
``sent`` (admitted outbound, excluded inbound) proposes a change this node will
not apply itself: to keep a node-specific PID on its node, deny it both ways,
as the example does.  ``disabled``: the group contributes nothing of that kind
here -- the reconciler removes what it had installed for the group (unless
another group wants it); ``node`` is the mode that keeps the node in control.

Group bodies that are not about one resource (:class:`~.ops.SetGroupPolicy`,
:class:`~.ops.AdoptState`) and the deployment-plan bodies are always proposed.

**Local changes on the overlay** (GroupState.apply does exactly this): install
puts a local entry (overriding the group's on this node); start/stop change a
local entry (refused, "no bundle ... in group ...", when the overlay has none:
install it locally first); uninstall removes the local entry, and set/delete a
local key -- for an ``overridden`` resource the group's entry or key then shows
through again.

**Main server with slaves** (the seeds' scenario), group ``web``::

    # main.toml: its changes go to the group, and it follows the group
    [provisioning.sync.web]
    configs = { mode = "cluster" }
    # slave-N.toml: follows the group; its own changes stay on the slave
    [provisioning.sync.web]
    configs = { mode = "cluster", outbound = { deny = ["*"] } }

``config set`` on the main is proposed and every slave acts on it.  On a slave
every PID is ``overridden``: ``config set`` there lands in its overlay and
acts on that slave only.  *Not overwritten* means: a key the slave set locally
keeps the slave's value even after the main changes the same key later (the
main's new value is in the replicated state on every member, the slave included,
and takes effect on the slave once the slave deletes its local key); the main's
changes to every other key and PID reach the slave at once.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from groupcomm.config.units import check_keys, config_error
from groupcomm.services.provisioning.ops import (
    DeleteConfig,
    InstallBundle,
    SetConfig,
    StartBundle,
    StopBundle,
    UninstallBundle,
)
from groupcomm.services.provisioning.state import GroupState

__all__ = [
    "DEFAULT",
    "KINDS",
    "LOCAL",
    "MODES",
    "PROPOSE",
    "Filter",
    "GroupPolicy",
    "Kind",
    "KindPolicy",
    "Mode",
    "Outbound",
    "Refusal",
    "Route",
    "SyncPolicy",
]

Mode = Literal["cluster", "node", "disabled"]
Kind = Literal["bundles", "configs"]
Route = Literal["shared", "overridden", "local", "sent", "disabled"]
MODES: tuple[Mode, ...] = ("cluster", "node", "disabled")
KINDS: tuple[Kind, ...] = ("bundles", "configs")
DEFAULT = "default"
"""The key of the table that applies to every group not listed."""
PROPOSE = "propose"
"""The change goes to the group (multicast in its space)."""
LOCAL = "local"
"""The change is applied to this node's local overlay only."""

_WHAT = {"bundles": "bundle", "configs": "configuration PID"}
_GROUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}\Z")
# A pattern may use the characters of bundle names and PIDs, and the fnmatch wildcards.
_PATTERN = re.compile(r"[A-Za-z0-9_.*?\[\]!-]{1,200}\Z")


@dataclass(frozen=True)
class Refusal:
    """This node refuses the change locally, for ``reason`` (nothing was proposed)."""

    reason: str


Outbound = Literal["propose", "local"] | Refusal


@dataclass(frozen=True)
class Filter:
    """Allow / deny lists of fnmatch patterns; deny wins, an empty allow list allows all."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    def admits(self, name: str) -> bool:
        """Whether ``name`` passes this filter."""
        if any(fnmatch.fnmatchcase(name, p) for p in self.deny):
            return False
        return not self.allow or any(fnmatch.fnmatchcase(name, p) for p in self.allow)

    @property
    def empty(self) -> bool:
        return not self.allow and not self.deny


@dataclass(frozen=True)
class KindPolicy:
    """The policy of one resource kind in one group; ``where``: the table it came from (for messages)."""

    mode: Mode = "cluster"
    inbound: Filter = Filter()
    outbound: Filter = Filter()
    where: str = "built-in default"

    def route(self, name: str) -> Route:
        """How resource ``name`` of this kind travels (the module docstring's table)."""
        if self.mode == "disabled":
            return "disabled"
        if self.mode == "node":
            return "local"
        inbound, outbound = self.inbound.admits(name), self.outbound.admits(name)
        if inbound:
            return "shared" if outbound else "overridden"
        return "sent" if outbound else "local"


@dataclass(frozen=True)
class GroupPolicy:
    """The policies of both kinds for one group."""

    bundles: KindPolicy = KindPolicy()
    configs: KindPolicy = KindPolicy()

    def kind(self, kind: Kind) -> KindPolicy:
        return self.bundles if kind == "bundles" else self.configs


@dataclass(frozen=True)
class SyncPolicy:
    """A node's sync policy: ``groups`` by name, ``default`` for the others."""

    default: GroupPolicy = GroupPolicy()
    groups: Mapping[str, GroupPolicy] = field(default_factory=dict)

    def for_group(self, group: str) -> GroupPolicy:
        """The policy of ``group``."""
        return self.groups.get(group, self.default)

    def route(self, group: str, kind: Kind, name: str) -> Route:
        """How resource ``name`` of ``kind`` in ``group`` travels on this node."""
        return self.for_group(group).kind(kind).route(name)

    # ------------------------------------------------------------------ decisions

    def outbound(self, group: str, body: Any) -> Outbound:
        """Where a change this node's user makes to ``group`` goes: :data:`PROPOSE`, :data:`LOCAL`, or a
        :class:`Refusal`.  ``body``: an op body (:mod:`.ops`) naming ``group``."""
        t = type(body)
        if t is InstallBundle or t is UninstallBundle or t is StartBundle or t is StopBundle:
            kind: Kind = "bundles"
            name = body.name
        elif t is SetConfig or t is DeleteConfig:
            kind, name = "configs", body.pid
        else:
            return PROPOSE              # group policy, adopt-state, plan bodies: not one resource
        if body.group != group:
            raise ValueError(f"the operation names group {body.group!r}, not {group!r}")
        policy = self.for_group(group).kind(kind)
        route = policy.route(name)
        if route == "disabled":
            return Refusal(f"{kind} of group {group!r} are not synchronised on this node "
                           f"({policy.where}.mode = \"disabled\"): {_WHAT[kind]} {name!r} not changed")
        return LOCAL if route in ("overridden", "local") else PROPOSE

    def effective(self, group: str, replicated: GroupState, local: GroupState) -> GroupState:
        """What this node acts on for ``group``: ``replicated`` (the group's state, unchanged) and
        ``local`` (this node's overlay) combined per the module docstring's table.

        The result has ``replicated``'s group, revision and recent op_ids."""
        policy = self.for_group(group)
        bundles_policy, configs_policy = policy.bundles, policy.configs
        bundles = {}
        for name in _union(replicated.bundles, local.bundles):
            route = bundles_policy.route(name)
            if route == "shared" or route == "overridden":
                value = replicated.bundles.get(name)
                if route == "overridden":
                    value = local.bundles.get(name, value)
            elif route == "local":
                value = local.bundles.get(name)
            else:
                value = None
            if value is not None:
                bundles[name] = value
        configs = {}
        for pid in _union(replicated.configs, local.configs):
            route = configs_policy.route(pid)
            if route == "shared":
                keys = replicated.configs.get(pid, {})
            elif route == "overridden":
                keys = {**replicated.configs.get(pid, {}), **local.configs.get(pid, {})}
            elif route == "local":
                keys = local.configs.get(pid, {})
            else:
                keys = {}
            if keys:
                configs[pid] = dict(keys)
        return msgspec.structs.replace(replicated, bundles=bundles, configs=configs)

    # ------------------------------------------------------------------ parsing

    @classmethod
    def from_toml(cls, table: Any, where: str = "provisioning.sync") -> SyncPolicy:
        """The policy in ``table`` (the ``[provisioning.sync]`` table of a node file, as parsed by tomllib).

        Raises :class:`~groupcomm.errors.ConfigError` naming the table and field of the first mistake."""
        if not isinstance(table, dict):
            raise config_error(where, "expected a table of groups, such as [provisioning.sync.default]", table)
        base = GroupPolicy()
        if DEFAULT in table:
            base = _group_policy(table[DEFAULT], f"{where}.{DEFAULT}", base)
        groups = {}
        for group, value in table.items():
            if group == DEFAULT:
                continue
            if not _GROUP_NAME.match(group):
                raise config_error(f"{where}.{group}", "not a valid group name (letters, digits, _ . -, "
                                   "at most 100, starting with a letter or digit)")
            groups[group] = _group_policy(value, f"{where}.{group}", base)
        return cls(base, groups)


def _union(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    return list(a) + [k for k in b if k not in a]


def _group_policy(value: Any, where: str, base: GroupPolicy) -> GroupPolicy:
    if not isinstance(value, dict):
        raise config_error(where, "expected a table such as { bundles = { mode = \"cluster\" } }", value)
    check_keys(value, KINDS, where, separator=".")
    bundles, configs = base.bundles, base.configs
    if "bundles" in value:
        bundles = _kind_policy(value["bundles"], f"{where}.bundles")
    if "configs" in value:
        configs = _kind_policy(value["configs"], f"{where}.configs")
    return GroupPolicy(bundles, configs)


def _kind_policy(value: Any, where: str) -> KindPolicy:
    if not isinstance(value, dict):
        raise config_error(where, "expected a table such as { mode = \"cluster\", inbound = { deny = [...] } }",
                           value)
    check_keys(value, ("mode", "inbound", "outbound"), where, separator=".")
    mode = value.get("mode", "cluster")
    if mode not in MODES:
        raise config_error(f"{where}.mode", f"expected one of {', '.join(map(repr, MODES))}", mode)
    inbound = _filter(value.get("inbound", {}), f"{where}.inbound")
    outbound = _filter(value.get("outbound", {}), f"{where}.outbound")
    for name, f in (("inbound", inbound), ("outbound", outbound)):
        if mode != "cluster" and not f.empty:
            raise config_error(f"{where}.{name}", f"lists apply only in mode \"cluster\" (mode is {mode!r}: "
                               "nothing travels through them)")
    return KindPolicy(mode, inbound, outbound, where)


def _filter(value: Any, where: str) -> Filter:
    if not isinstance(value, dict):
        raise config_error(where, "expected a table such as { allow = [\"web.*\"], deny = [\"web.debug\"] }",
                           value)
    check_keys(value, ("allow", "deny"), where, separator=".")
    return Filter(_patterns(value.get("allow", []), f"{where}.allow"),
                  _patterns(value.get("deny", []), f"{where}.deny"))


def _patterns(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise config_error(where, "expected a list of name patterns such as [\"web.*\"]", value)
    for p in value:
        if not _PATTERN.match(p):
            raise config_error(where, "a pattern has letters, digits, _ . - and the wildcards * ? [...] "
                               "(at most 200 characters); it could match no name", p)
    return tuple(value)
