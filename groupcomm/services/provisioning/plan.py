"""Deployment plans: the ``plan.toml`` format, its loader, and what a plan means for nodes.

A plan names **roles** (what a kind of server runs: bundle files and
configuration) and **environments** (stages such as ``preprod`` and ``prod``:
which group and how many of its nodes play each role)::

    [plan]
    name = "shop"                                      # letters, digits, '_', '.', '-'
    description = "the web shop"                       # optional

    [roles.web]
    bundles = ["dist/hello-2.0-py3-none-any.whl"]      # wheel or .tar.gz bundles, relative to this file
    config.hello = { greeting = "hi", port = "8080" }  # optional: PID -> key -> value (strings)

    [roles.app]
    bundles = ["dist/app-1.3.tar.gz"]

    [environments.preprod]
    health_timeout = "60s"      # optional: every batch must be healthy within this (default 120s)
    batch = 1                   # optional: nodes switched per batch (default 1; `plan apply --batch` overrides)
    roles = { web = { group = "web-pre", nodes = 2 }, app = { group = "app-pre", nodes = 1 } }

    [environments.prod]
    requires = "preprod"        # optional promotion gate (below)
    roles = { web = { group = "web", nodes = 3 } }

A bundle's detached signature is taken from ``FILE.sig`` next to it when that
file exists (:mod:`.signing`).  Every mistake is a :class:`PlanError` (a
:class:`~groupcomm.errors.ConfigError`) naming the file, the table and the
field, with a did-you-mean for a misspelt key, role or environment.

**Digest.**  :attr:`Plan.digest` is the SHA-256 of a canonical form of what
the plan *deploys*: its name and, for every role, the SHA-256 of each bundle
file (in any order) and the configuration.  A rebuilt wheel at the same path
makes another digest; comments, formatting, file paths and the
``[environments]`` tables do not count, so changing how many prod nodes run a
role does not undo a promotion from preprod.

**Promotion gate.**  ``requires = "S"``: a rollout of this environment is
accepted only if a rollout of the same plan digest *succeeded* on environment
``S`` (``plan apply --force`` overrides it; the override is recorded).  The
replicated record checks it (:mod:`.rollout`, with :func:`plan_requires`).

**Targets** (:func:`choose_targets`).  Each role of an environment gets the
first ``nodes`` members of its group in the group space's order (oldest first)
that have no role in this environment yet, taking roles in the order the
environment lists them: **a node gets at most one role per environment**, so
two roles on the same group get distinct nodes.  A group with too few such
members is an error; nothing is chosen partially.  A node may have roles in
several environments (one per environment).

:func:`load_plan` and :func:`resolve` read files (the plan, the bundles and
their signatures); everything else here is pure.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from groupcomm.config.units import check_keys, parse_duration, suggest_key
from groupcomm.errors import ConfigError
from groupcomm.services.provisioning.bundle import read_bundle
from groupcomm.services.provisioning.ops import (
    MAX_PLAN_BYTES,
    MAX_TARGETS,
    BeginRollout,
    BundleRef,
    RoleTarget,
)
from groupcomm.services.provisioning.signing import SignatureError, read_signature
from groupcomm.services.provisioning.state import BundleDesired, GroupState

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_HEALTH_TIMEOUT",
    "Assignment",
    "BundleChange",
    "ConfigChange",
    "EnvRole",
    "EnvSpec",
    "NodeDiff",
    "Plan",
    "PlanDiff",
    "PlanError",
    "Resolved",
    "RoleSpec",
    "begin_rollout",
    "choose_targets",
    "diff",
    "load_plan",
    "plan_requires",
    "plan_state_name",
    "planned_assignments",
    "resolve",
    "role_state",
]

DEFAULT_BATCH = 1
DEFAULT_HEALTH_TIMEOUT = 120.0
MAX_HEALTH_TIMEOUT = 86400.0
MAX_ROLES = 100
MAX_ENVIRONMENTS = 100
MAX_BUNDLES_PER_ROLE = 100

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_ENV_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,94}")      # "plan." + env stays a group name
_PID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,199}")
_MAX_VALUE = 64 * 1024
_TOP_KEYS = {"plan", "roles", "environments"}
_PLAN_KEYS = {"name", "description"}
_ROLE_KEYS = {"bundles", "config"}
_ENV_KEYS = {"roles", "batch", "health_timeout", "requires"}
_ENV_ROLE_KEYS = {"group", "nodes"}

Configs = dict[str, dict[str, str]]
"""PID -> key -> value."""
Resolved = dict[str, tuple[tuple[BundleRef, ...], Configs]]
"""Role -> its bundles and configuration, as :class:`~.ops.BeginRollout` carries them."""


class PlanError(ConfigError):
    """A plan that cannot be used; the message names the file, the table and the field."""


# --------------------------------------------------------------------------- the parsed plan


@dataclass(frozen=True)
class RoleSpec:
    """A role: the bundle files it deploys (absolute paths, their SHA-256) and its configuration."""

    name: str
    bundles: tuple[Path, ...]
    bundle_digests: tuple[str, ...]
    """SHA-256 of each file when the plan was loaded (same order as :attr:`bundles`)."""
    configs: Mapping[str, Mapping[str, str]]


@dataclass(frozen=True)
class EnvRole:
    """How an environment places one role: on ``nodes`` members of ``group``."""

    role: str
    group: str
    nodes: int


@dataclass(frozen=True)
class EnvSpec:
    """An environment of the plan."""

    name: str
    roles: tuple[EnvRole, ...]
    """In the order the plan lists them (the order targets are chosen and switched in)."""
    batch: int
    health_timeout: float
    """Seconds."""
    requires: str | None
    """The environment whose success with the same digest this one requires (the promotion gate)."""


@dataclass(frozen=True)
class Plan:
    """A loaded ``plan.toml``."""

    path: Path
    name: str
    description: str
    text: str
    """The file as written (carried by the rollout, shown by ``plan history``)."""
    roles: Mapping[str, RoleSpec]
    environments: Mapping[str, EnvSpec]
    digest: str
    """See the module docstring."""

    def environment(self, env: str) -> EnvSpec:
        """The environment ``env``; :class:`PlanError` (with a did-you-mean) if the plan has none."""
        spec = self.environments.get(env)
        if spec is None:
            raise PlanError(f"{self.path}: environments: no environment {env!r}"
                            f"{suggest_key(env, self.environments)}")
        return spec


# --------------------------------------------------------------------------- parsing


def _fail(source: str, table: str, field_: str, problem: str, value: Any = ...) -> PlanError:
    where = f"{source}: [{table}]" + (f" {field_}" if field_ else "")
    return PlanError(f"{where}: {problem}" + ("" if value is ... else f" (got {value!r})"))


def _top(data: Mapping[str, Any], key: str, source: str, missing: str) -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        raise PlanError(f"{source}: [{key}]: missing ({missing})")
    if not isinstance(value, dict):
        raise PlanError(f"{source}: {key}: expected a table (got {value!r})")
    return value


def _check_keys(table: Mapping[str, Any], known: set[str], source: str, name: str) -> None:
    check_keys(table, known, f"{source}: [{name}]", separator=" ", error=PlanError)


@dataclass(frozen=True)
class _Parsed:
    name: str
    description: str
    roles: dict[str, tuple[tuple[str, ...], Configs]]
    environments: dict[str, EnvSpec]


def _parse(text: str, source: str) -> _Parsed:
    if len(text.encode()) > MAX_PLAN_BYTES:
        raise PlanError(f"{source}: a plan is at most {MAX_PLAN_BYTES} bytes")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PlanError(f"{source}: not valid TOML: {e}") from None
    check_keys(data, _TOP_KEYS, source, error=PlanError)

    head = _top(data, "plan", source, 'a table with name = "..."')
    _check_keys(head, _PLAN_KEYS, source, "plan")
    name = head.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise _fail(source, "plan", "name", "expected 1 to 100 letters, digits, '_', '.', '-' starting "
                    "with a letter or digit", name)
    description = head.get("description", "")
    if not isinstance(description, str):
        raise _fail(source, "plan", "description", "expected a string", description)

    roles: dict[str, tuple[tuple[str, ...], Configs]] = {}
    raw_roles = _top(data, "roles", source, "at least one [roles.NAME] table")
    if not raw_roles:
        raise PlanError(f"{source}: [roles]: empty (at least one [roles.NAME] table)")
    if len(raw_roles) > MAX_ROLES:
        raise PlanError(f"{source}: [roles]: at most {MAX_ROLES} roles (got {len(raw_roles)})")
    for role, spec in raw_roles.items():
        table = f"roles.{role}"
        if not _NAME.fullmatch(role):
            raise _fail(source, "roles", role, "a role name is 1 to 100 letters, digits, '_', '.', '-'")
        if not isinstance(spec, dict):
            raise _fail(source, "roles", role, "expected a table", spec)
        _check_keys(spec, _ROLE_KEYS, source, table)
        bundles = spec.get("bundles")
        if (not isinstance(bundles, list) or not bundles or len(bundles) > MAX_BUNDLES_PER_ROLE
                or not all(isinstance(b, str) and b for b in bundles)):
            raise _fail(source, table, "bundles", f"expected a list of 1 to {MAX_BUNDLES_PER_ROLE} bundle "
                        "file paths (relative to the plan file)", bundles)
        if len(set(bundles)) != len(bundles):
            raise _fail(source, table, "bundles", "a file is listed twice", bundles)
        roles[role] = (tuple(bundles), _configs(spec.get("config", {}), source, table))

    environments: dict[str, EnvSpec] = {}
    raw_envs = _top(data, "environments", source, "at least one [environments.NAME] table")
    if not raw_envs:
        raise PlanError(f"{source}: [environments]: empty (at least one [environments.NAME] table)")
    if len(raw_envs) > MAX_ENVIRONMENTS:
        raise PlanError(f"{source}: [environments]: at most {MAX_ENVIRONMENTS} (got {len(raw_envs)})")
    for env, spec in raw_envs.items():
        environments[env] = _environment(env, spec, roles, raw_envs, source)
    _check_gate_cycles(environments, source)
    return _Parsed(name, description, roles, environments)


def _configs(raw: Any, source: str, table: str) -> Configs:
    if not isinstance(raw, dict):
        raise _fail(source, table, "config", "expected a table PID = { key = \"value\", ... }", raw)
    configs: Configs = {}
    for pid, keys in raw.items():
        where = f"config.{pid}"
        if not _PID.fullmatch(pid):
            raise _fail(source, table, where, "a PID is 1 to 200 letters, digits, '_', '.', '-'")
        if not isinstance(keys, dict):
            raise _fail(source, table, where, "expected a table of key = \"value\"", keys)
        for key, value in keys.items():
            if not _KEY.fullmatch(key):
                raise _fail(source, table, f"{where}.{key}", "a key is a letter or '_' then letters, digits, "
                            "'_', '.', '-' (at most 200)")
            if not isinstance(value, str):
                raise _fail(source, table, f"{where}.{key}", "expected a string (quote numbers and "
                            "booleans: configuration values are strings)", value)
            if len(value) > _MAX_VALUE:
                raise _fail(source, table, f"{where}.{key}", f"a value is at most {_MAX_VALUE} characters")
        if keys:
            configs[pid] = dict(keys)
    return configs


def _environment(env: str, spec: Any, roles: Mapping[str, Any], all_envs: Mapping[str, Any],
                 source: str) -> EnvSpec:
    table = f"environments.{env}"
    if not _ENV_NAME.fullmatch(env):
        raise _fail(source, "environments", env, "an environment name is 1 to 95 letters, digits, '_', '.', '-'")
    if not isinstance(spec, dict):
        raise _fail(source, "environments", env, "expected a table", spec)
    _check_keys(spec, _ENV_KEYS, source, table)
    raw_roles = spec.get("roles")
    if not isinstance(raw_roles, dict) or not raw_roles:
        raise _fail(source, table, "roles", "expected a table ROLE = { group = \"G\", nodes = N }", raw_roles)
    placed: list[EnvRole] = []
    for role, place in raw_roles.items():
        where = f"roles.{role}"
        if role not in roles:
            raise _fail(source, table, where, f"no role {role!r} in [roles]{suggest_key(role, roles)}")
        if not isinstance(place, dict):
            raise _fail(source, table, where, "expected { group = \"G\", nodes = N }", place)
        check_keys(place, _ENV_ROLE_KEYS, f"{source}: [{table}] {where}", separator=".", error=PlanError)
        group = place.get("group")
        if not isinstance(group, str) or not _NAME.fullmatch(group):
            raise _fail(source, table, f"{where}.group", "expected a group name (1 to 100 letters, digits, "
                        "'_', '.', '-')", group)
        nodes = place.get("nodes", 1)
        if not isinstance(nodes, int) or isinstance(nodes, bool) or not 1 <= nodes <= MAX_TARGETS:
            raise _fail(source, table, f"{where}.nodes", f"expected a whole number from 1 to {MAX_TARGETS}", nodes)
        placed.append(EnvRole(role, group, nodes))
    total = sum(p.nodes for p in placed)
    if total > MAX_TARGETS:
        raise _fail(source, table, "roles", f"at most {MAX_TARGETS} nodes in all (got {total})")
    batch = spec.get("batch", DEFAULT_BATCH)
    if not isinstance(batch, int) or isinstance(batch, bool) or not 1 <= batch <= MAX_TARGETS:
        raise _fail(source, table, "batch", f"expected a whole number from 1 to {MAX_TARGETS}", batch)
    try:
        timeout = parse_duration(spec.get("health_timeout", DEFAULT_HEALTH_TIMEOUT))
    except ConfigError as e:
        raise _fail(source, table, "health_timeout", str(e)) from None
    if not 0 < timeout <= MAX_HEALTH_TIMEOUT:
        raise _fail(source, table, "health_timeout", "expected more than 0s and at most 24h",
                    spec.get("health_timeout"))
    requires = spec.get("requires")
    if requires is not None:
        if not isinstance(requires, str):
            raise _fail(source, table, "requires", "expected the name of another environment", requires)
        if requires == env:
            raise _fail(source, table, "requires", "an environment cannot require itself", requires)
        if requires not in all_envs:
            raise _fail(source, table, "requires", f"no environment {requires!r}"
                        f"{suggest_key(requires, all_envs)}")
    return EnvSpec(env, tuple(placed), batch, timeout, requires)


def _check_gate_cycles(envs: Mapping[str, EnvSpec], source: str) -> None:
    for start in envs:
        seen = [start]
        env = envs[start].requires
        while env is not None:
            if env in seen:
                raise _fail(source, f"environments.{start}", "requires",
                            "the promotion gates form a cycle: " + " -> ".join([*seen, env]))
            seen.append(env)
            env = envs[env].requires


def plan_requires(text: str, env: str) -> str | None:
    """The environment that ``env`` requires in the plan ``text`` (None: no gate, or no such environment).

    Raises :class:`PlanError` if ``text`` is not a valid plan (pure: no file is read)."""
    spec = _parse(text, "plan").environments.get(env)
    return spec.requires if spec is not None else None


def _sha256_file(path: Path, where: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1024 * 1024):
                digest.update(chunk)
    except OSError as e:
        raise PlanError(f"{where}: cannot read {path}: {e.strerror or e}") from None
    return digest.hexdigest()


def _digest(name: str, roles: Mapping[str, tuple[Sequence[str], Configs]]) -> str:
    canonical = ["groupcomm-plan-v1", name,
                 {role: {"bundles": sorted(digests), "config": configs} for role, (digests, configs) in roles.items()}]
    return hashlib.sha256(msgspec.json.encode(canonical, order="sorted")).hexdigest()


def load_plan(path: str | Path) -> Plan:
    """Read and check the plan at ``path`` and hash its bundle files (see the module docstring)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_PLAN_BYTES + 1)
    except OSError as e:
        raise PlanError(f"{path}: cannot read the plan: {e.strerror or e}") from None
    if len(raw) > MAX_PLAN_BYTES:
        raise PlanError(f"{path}: a plan is at most {MAX_PLAN_BYTES} bytes")
    try:
        text = raw.decode()
    except UnicodeDecodeError as e:
        raise PlanError(f"{path}: not UTF-8 text: {e}") from None
    parsed = _parse(text, str(path))
    base = path.resolve().parent
    roles: dict[str, RoleSpec] = {}
    for role, (files, configs) in parsed.roles.items():
        paths = tuple(base / f for f in files)
        digests = tuple(_sha256_file(p, f"{path}: [roles.{role}] bundles") for p in paths)
        roles[role] = RoleSpec(role, paths, digests, configs)
    digest = _digest(parsed.name, {r: (s.bundle_digests, dict(s.configs)) for r, s in roles.items()})
    return Plan(path, parsed.name, parsed.description, text, roles, parsed.environments, digest)


# --------------------------------------------------------------------------- resolving and targets


def resolve(plan: Plan, env: str) -> Resolved:
    """The bundles (read and checked with :func:`~.bundle.read_bundle`, signature from ``FILE.sig`` if
    present) and configuration of each role ``env`` uses, in the environment's order.

    :class:`PlanError` if a file changed since the plan was loaded, or a role has two bundles of one name."""
    spec = plan.environment(env)
    resolved: Resolved = {}
    for placed in spec.roles:
        role = plan.roles[placed.role]
        where = f"{plan.path}: [roles.{role.name}] bundles"
        refs: list[BundleRef] = []
        for file, loaded in zip(role.bundles, role.bundle_digests, strict=True):
            bundle = read_bundle(file)
            if bundle.sha256 != loaded:
                raise PlanError(f"{where}: {file} changed since the plan was loaded (load it again)")
            if any(r.name == bundle.name for r in refs):
                raise PlanError(f"{where}: two bundles named {bundle.name!r}")
            sig = file.with_name(file.name + ".sig")
            try:
                signature = read_signature(sig) if sig.exists() else b""
            except SignatureError as e:
                raise PlanError(f"{where}: {e}") from None
            refs.append(BundleRef(bundle.name, bundle.version, bundle.sha256, bundle.size, bundle.filename,
                                  signature))
        resolved[role.name] = (tuple(refs), {pid: dict(keys) for pid, keys in role.configs.items()})
    return resolved


def choose_targets(env_spec: EnvSpec, group_members: Mapping[str, Sequence[str]]) -> tuple[RoleTarget, ...]:
    """The target nodes of ``env_spec`` (see the module docstring), roles in the environment's order.

    ``group_members``: group -> its members' node names in the group space's order (oldest first)."""
    taken: set[str] = set()
    targets: list[RoleTarget] = []
    for placed in env_spec.roles:
        members = list(dict.fromkeys(group_members.get(placed.group, ())))
        free = [m for m in members if m not in taken]
        if len(free) < placed.nodes:
            busy = len(members) - len(free)
            raise PlanError(f"environment {env_spec.name!r}: role {placed.role!r} wants {placed.nodes} "
                            f"node{'s' if placed.nodes != 1 else ''} of group {placed.group!r}, which has "
                            f"{len(members)} member{'s' if len(members) != 1 else ''}"
                            + (f" ({busy} already given another role of this environment)" if busy else ""))
        for node in free[:placed.nodes]:
            taken.add(node)
            targets.append(RoleTarget(node, placed.role))
    return tuple(targets)


def begin_rollout(plan: Plan, env: str, resolved: Resolved, targets: Sequence[RoleTarget], *,
                  batch: int | None = None, force: bool = False) -> BeginRollout:
    """The operation that rolls ``plan`` out to ``env`` (``batch`` overrides the environment's)."""
    spec = plan.environment(env)
    if batch is not None and not 1 <= batch <= MAX_TARGETS:
        raise PlanError(f"--batch: expected a whole number from 1 to {MAX_TARGETS} (got {batch!r})")
    return BeginRollout(env=env, plan_digest=plan.digest, plan=plan.text, roles=dict(resolved),
                        targets=tuple(targets), batch=batch or spec.batch, health_timeout=spec.health_timeout,
                        force=force)


# --------------------------------------------------------------------------- what nodes get


def plan_state_name(env: str) -> str:
    """The name of the synthetic group state environment ``env`` gives its nodes (``plan.<env>``)."""
    return "plan." + env


def role_state(env: str, revision: int, bundles: Sequence[BundleRef], configs: Mapping[str, Mapping[str, str]]
               ) -> GroupState:
    """The desired state a node playing a role gets: every bundle at its version, started, and the configuration."""
    return GroupState(group=plan_state_name(env), revision=revision,
                      bundles={b.name: BundleDesired(b.version, b.digest, b.size, b.filename, started=True)
                               for b in bundles},
                      configs={pid: dict(keys) for pid, keys in configs.items()})


@dataclass(frozen=True)
class Assignment:
    """What one node gets from an environment: its role and that role's desired state."""

    role: str
    state: GroupState


def planned_assignments(env: str, revision: int, roles: Mapping[str, tuple[Sequence[BundleRef], Configs]],
                        targets: Sequence[RoleTarget]) -> dict[str, Assignment]:
    """Node -> what it gets when the rollout (``roles``, ``targets``) is in place."""
    return {t.node: Assignment(t.role, role_state(env, revision, *roles[t.role])) for t in targets}


# --------------------------------------------------------------------------- diff


@dataclass(frozen=True)
class BundleChange:
    """A bundle added (``old_version`` None), removed (``new_version`` None), upgraded or rebuilt."""

    name: str
    old_version: str | None
    new_version: str | None
    old_digest: str | None = None
    new_digest: str | None = None

    def __str__(self) -> str:
        if self.old_version is None:
            return f"bundle {self.name}: add {self.new_version}"
        if self.new_version is None:
            return f"bundle {self.name}: remove {self.old_version}"
        if self.old_version == self.new_version:
            return (f"bundle {self.name}: {self.old_version} rebuilt "
                    f"({(self.old_digest or '')[:12]} -> {(self.new_digest or '')[:12]})")
        return f"bundle {self.name}: {self.old_version} -> {self.new_version}"


@dataclass(frozen=True)
class ConfigChange:
    """A configuration key set (``old`` None), deleted (``new`` None) or changed."""

    pid: str
    key: str
    old: str | None
    new: str | None

    def __str__(self) -> str:
        if self.old is None:
            return f"config {self.pid} {self.key}: set {self.new!r}"
        if self.new is None:
            return f"config {self.pid} {self.key}: delete (was {self.old!r})"
        return f"config {self.pid} {self.key}: {self.old!r} -> {self.new!r}"


@dataclass(frozen=True)
class NodeDiff:
    """What changes on one node (``old_role`` None: it gets a role; ``new_role`` None: it loses it)."""

    node: str
    old_role: str | None
    new_role: str | None
    bundles: tuple[BundleChange, ...] = ()
    configs: tuple[ConfigChange, ...] = ()

    @property
    def changed(self) -> bool:
        return self.old_role != self.new_role or bool(self.bundles) or bool(self.configs)

    def __str__(self) -> str:
        if self.old_role == self.new_role:
            head = f"{self.node}: role {self.new_role}" + ("" if self.changed else ", unchanged")
        elif self.old_role is None:
            head = f"{self.node}: gets role {self.new_role}"
        elif self.new_role is None:
            head = f"{self.node}: loses role {self.old_role}"
        else:
            head = f"{self.node}: role {self.old_role} -> {self.new_role}"
        return "\n".join([head, *(f"  {c}" for c in (*self.bundles, *self.configs))])


@dataclass(frozen=True)
class PlanDiff:
    """Per node, what a rollout would change; ``str()`` is a readable listing."""

    nodes: tuple[NodeDiff, ...] = field(default=())

    @property
    def changed(self) -> bool:
        return any(n.changed for n in self.nodes)

    def __str__(self) -> str:
        if not self.nodes:
            return "no target nodes"
        return "\n".join(map(str, self.nodes)) + ("" if self.changed else "\nnothing would change")


def diff(current: Mapping[str, Assignment | None], new: Mapping[str, Assignment | None]) -> PlanDiff:
    """Per node (of either mapping, by name): role, bundle and configuration changes from ``current`` to ``new``.

    ``current``: what each node has from the environment now (:func:`.rollout.current_assignments`);
    ``new``: what it would have (:func:`planned_assignments`)."""
    nodes = []
    for node in sorted(set(current) | set(new)):
        old, now = current.get(node), new.get(node)
        if old is None and now is None:
            continue
        ob = old.state.bundles if old is not None else {}
        nb = now.state.bundles if now is not None else {}
        bundles = []
        for name in sorted(set(ob) | set(nb)):
            a, b = ob.get(name), nb.get(name)
            if a is not None and b is not None and (a.version, a.digest) == (b.version, b.digest):
                continue
            bundles.append(BundleChange(name, a.version if a else None, b.version if b else None,
                                        a.digest if a else None, b.digest if b else None))
        oc = old.state.configs if old is not None else {}
        nc = now.state.configs if now is not None else {}
        configs = []
        for pid in sorted(set(oc) | set(nc)):
            ok, nk = oc.get(pid, {}), nc.get(pid, {})
            for key in sorted(set(ok) | set(nk)):
                if ok.get(key) != nk.get(key):
                    configs.append(ConfigChange(pid, key, ok.get(key), nk.get(key)))
        nodes.append(NodeDiff(node, old.role if old else None, now.role if now else None,
                              tuple(bundles), tuple(configs)))
    return PlanDiff(tuple(nodes))
