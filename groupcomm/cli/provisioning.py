"""``groupcomm group|bundle|config|plan|cluster``: provisioning, through the local agent's control socket.

Each command asks the provisioning agent of a node on this host (the one
``groupcomm supervise NODE.toml --cluster C`` runs when the node file has a
``[provisioning]`` table) over its control socket
(:mod:`groupcomm.services.provisioning.control`), which does it in the
cluster.  ``--node NAME`` picks the agent when several run here, ``--socket
PATH`` names a socket directly.  Output: tables (rich on a terminal, aligned
text otherwise), or JSON with ``--json``; ``plan apply``, ``plan rollback``
and ``bundle install`` show progress as it comes (a live table on a terminal,
one line per event otherwise, ``{"progress": ...}`` lines with ``--json``).

Exit status: 0 success; 1 the cluster refused or the operation failed (one
line naming the reason: e.g. a read-only minority side) or a rollout was
rolled back; 2 a bad option, a bad file, no agent to ask.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from groupcomm.cli.errors import EXIT_FAILED, EXIT_OK, CliError, UsageError

__all__ = ["DEFAULT_GROUP", "add_parser", "parse_assignments", "rollout_succeeded"]

DEFAULT_GROUP = "default"
"""The group every provisioning node is in unless told otherwise."""

GROUP_COLUMNS = ("name", "joined", "writable", "revision", "members")
PLAN_COLUMNS = ("env", "revision", "state", "outcome", "batch", "digest", "forced", "reason")
HISTORY_COLUMNS = ("revision", "time", "when", "node", "user", "group", "what", "detail")


# --------------------------------------------------------------------------- parsers


def add_parser(commands: Any) -> None:
    """Add ``group``, ``bundle``, ``config``, ``plan`` and ``cluster`` to the ``groupcomm`` parser."""
    group = _command(commands, "group", "cluster groups: create, join, leave, list",
                     "A node takes part in the groups it is in; each group has its own replicated desired state "
                     "(bundles and configuration). A group exists while a node is in it.")
    for verb, what in (("create", "create a group (this node joins it)"), ("join", "make this node join a group"),
                       ("leave", "make this node leave a group")):
        p = _verb(group, verb, what)
        p.add_argument("group", metavar="GROUP", help="the group's name")
        p.set_defaults(run=_run(_group_change))
    p = _verb(group, "list", "the groups this node knows: members, revision, writable", data=True)
    p.set_defaults(run=_run(_group_list))
    p = _verb(group, "require-signatures", "install only bundles signed by one of the listed keys in a group")
    p.add_argument("group", metavar="GROUP", help="the group's name")
    p.add_argument("keys", metavar="KEYS_FILE",
                   help="trusted public keys, one 'ed25519 BASE64 [comment]' line each (an empty file lifts "
                        "the requirement)")
    p.set_defaults(run=_run(_require_signatures))

    bundle = _command(commands, "bundle", "bundles on a group: install, start, stop, uninstall, list",
                      "A bundle is a wheel or a .tar.gz with a bundle.toml manifest; the group's members pull it "
                      "from a member that has it and run it as a supervised process once started.")
    p = _verb(bundle, "install", "install a bundle file on every member of a group", data=True)
    p.add_argument("file", metavar="FILE", help="the bundle (.whl or .tar.gz)")
    p.add_argument("--signature", metavar="FILE.sig", help="its detached signature (default: FILE.sig when "
                                                            "that file exists)")
    p.add_argument("--start", action="store_true", help="start it once installed")
    _group_option(p)
    p.set_defaults(run=_run(_bundle_install))
    for verb, what in (("start", "start a bundle on every member of a group"),
                       ("stop", "stop a bundle (it stays installed)"),
                       ("uninstall", "stop and remove a bundle")):
        p = _verb(bundle, verb, what)
        p.add_argument("name", metavar="NAME", help="the bundle's name (from its manifest)")
        _group_option(p)
        p.set_defaults(run=_run(_bundle_change), verb=verb)
    p = _verb(bundle, "list", "the group's bundles: desired, and each node's actual state", data=True)
    _group_option(p)
    p.set_defaults(run=_run(_bundle_list))
    p = bundle.add_parser("keygen", help="make an Ed25519 signing key (no agent needed)",
                          description="Write a new Ed25519 signing key to KEY (mode 0600, refused if KEY exists) "
                                      "and print its public key line, for 'require-signatures' key files.")
    p.add_argument("key", metavar="KEY", help="where to write the private key")
    p.set_defaults(run=_bundle_keygen)
    p = bundle.add_parser("sign", help="sign a bundle file (no agent needed)",
                          description="Write FILE.sig, the detached Ed25519 signature of the bundle FILE with KEY "
                                      "(covers its SHA-256, name and version).")
    p.add_argument("file", metavar="FILE", help="the bundle (.whl or .tar.gz)")
    p.add_argument("--key", required=True, metavar="KEY", help="the signing key ('bundle keygen')")
    p.set_defaults(run=_bundle_sign)

    config = _command(commands, "config", "replicated configuration of a group: set, get, list, delete",
                      "Configuration is key=value pairs under a PID, delivered to the bundles that use the PID.")
    p = _verb(config, "set", "set one or more keys of a PID")
    p.add_argument("pid", metavar="PID", help="the configuration's PID")
    p.add_argument("assignments", metavar="KEY=VALUE", nargs="+", help="the keys and their values")
    _group_option(p)
    p.set_defaults(run=_run(_config_set))
    p = _verb(config, "get", "the keys of a PID, or one key's value", data=True)
    p.add_argument("pid", metavar="PID", help="the configuration's PID")
    p.add_argument("key", metavar="KEY", nargs="?", help="print only this key's value")
    _group_option(p)
    p.set_defaults(run=_run(_config_get))
    p = _verb(config, "list", "every PID, key and value of a group", data=True)
    _group_option(p)
    p.set_defaults(run=_run(_config_list))
    p = _verb(config, "delete", "delete a key of a PID, or the whole PID")
    p.add_argument("pid", metavar="PID", help="the configuration's PID")
    p.add_argument("key", metavar="KEY", nargs="?", help="delete only this key")
    _group_option(p)
    p.set_defaults(run=_run(_config_delete))

    plan = _command(commands, "plan", "deployment plans: apply, diff, status, history, rollback",
                    "A plan.toml names roles (bundles, versions, configuration) and environments (each role's "
                    "group and node count). Applying it rolls out in batches, waits for each node's health "
                    "check and rolls the environment back on any failure.")
    p = _verb(plan, "apply", "roll a plan out to an environment, in batches", data=True)
    _plan_file(p)
    _env_option(p)
    p.add_argument("--batch", type=_positive, metavar="N", help="nodes per batch (default: the plan's)")
    p.add_argument("--force", action="store_true",
                   help="skip the promotion gate (the previous stage has not run this plan); recorded")
    p.set_defaults(run=_run(_plan_apply))
    p = _verb(plan, "diff", "what applying a plan to an environment would change", data=True)
    _plan_file(p)
    _env_option(p)
    p.set_defaults(run=_run(_plan_diff))
    p = _verb(plan, "status", "the current rollout of each environment (or one)", data=True)
    _env_option(p, required=False)
    p.set_defaults(run=_run(_plan_status))
    p = _verb(plan, "history", "the rollouts of an environment", data=True)
    _env_option(p)
    p.set_defaults(run=_run(_plan_history))
    p = _verb(plan, "require-signatures", "deploy only bundles signed by one of the listed keys in an environment")
    _env_option(p)
    p.add_argument("keys", metavar="KEYS_FILE",
                   help="trusted public keys, one 'ed25519 BASE64 [comment]' line each (an empty file lifts "
                        "the requirement)")
    p.set_defaults(run=_run(_plan_require_signatures))
    p = _verb(plan, "rollback", "roll an environment back to its previous revision (or --to REV)", data=True)
    _env_option(p)
    p.add_argument("--to", type=_natural, metavar="REV", help="the revision to return to")
    p.set_defaults(run=_run(_plan_rollback))

    cluster = _command(commands, "cluster", "the overview: what runs where, and who did what",
                       "Every node's bundles, versions, desired and actual state and health, configuration "
                       "versions and what is out of sync; the replicated audit log.")
    p = _verb(cluster, "status", "node x role x bundle x version x desired/actual x health", data=True)
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--group", metavar="G", help="only this group")
    scope.add_argument("--env", metavar="E", help="only this environment")
    p.set_defaults(run=_run(_cluster_status))
    p = _verb(cluster, "history", "the audit log: what changed, when, from which node and user", data=True)
    p.add_argument("--group", metavar="G", help="only this group's changes")
    p.set_defaults(run=_run(_cluster_history))


def _command(commands: Any, name: str, help_: str, description: str) -> Any:
    p = commands.add_parser(name, help=help_, description=description + " Runs through the provisioning agent "
                            "of a node on this host (see 'groupcomm supervise').")
    return p.add_subparsers(dest="verb", required=True, metavar="VERB", title="verbs")


def _verb(verbs: Any, name: str, help_: str, *, data: bool = False) -> argparse.ArgumentParser:
    p = verbs.add_parser(name, help=help_, description=help_[0].upper() + help_[1:] + ".")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--node", metavar="NAME",
                        help="the node whose agent to ask (default: the only agent on this host)")
    target.add_argument("--socket", metavar="PATH", help="the agent's control socket")
    if data:
        p.add_argument("--json", action="store_true", help="print JSON (progress: one object per line)")
    return p


def _group_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--group", default=DEFAULT_GROUP, metavar="G", help=f"the group (default: {DEFAULT_GROUP})")


def _env_option(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--env", required=required, metavar="E", help="the environment (as the plan names it)")


def _plan_file(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", metavar="PLAN.toml", help="the deployment plan")


def _natural(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (got {value})")
    return value


def _positive(text: str) -> int:
    value = _natural(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def parse_assignments(items: list[str]) -> dict[str, str]:
    """``["k=v", ...]`` as a dict; UsageError for an item without ``=`` or with an empty key."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"expected KEY=VALUE, got {item!r}")
        out[key.strip()] = value
    return out


def rollout_succeeded(result: Any) -> bool:
    """Whether a rollout result says it succeeded (``succeeded``/``ok`` flags, or an ``outcome``/``state``
    of succeeded, completed or done)."""
    if not isinstance(result, dict):
        return True
    for flag in ("succeeded", "ok"):
        if isinstance(result.get(flag), bool):
            return result[flag]
    for field in ("outcome", "state", "status"):
        if isinstance(result.get(field), str):
            return result[field].lower().replace("_", "-") in ("succeeded", "success", "completed", "done")
    return True


# --------------------------------------------------------------------------- running a verb


Verb = Callable[[Any, argparse.Namespace], Awaitable[int]]


def _run(verb: Verb) -> Callable[[argparse.Namespace], int]:
    """The ``run`` of a parser: find the socket, call ``verb(client, args)`` in trio, explain errors."""

    def run(args: argparse.Namespace) -> int:
        import trio

        from groupcomm.services.provisioning.control import (
            AgentUnreachable,
            ProvisioningClient,
            RequestFailed,
            find_socket,
        )

        path = args.socket if args.socket is not None else find_socket(args.node)
        client = ProvisioningClient(path)
        try:
            return trio.run(verb, client, args)
        except (RequestFailed, AgentUnreachable) as exc:
            raise CliError(str(exc)) from exc

    return run


def _json_mode(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def _show(args: argparse.Namespace, value: Any, **kwargs: Any) -> None:
    from groupcomm.services.provisioning.render import print_json, render_value

    if _json_mode(args):
        print_json(value)
    else:
        render_value(value, **kwargs)


def _accepted(what: str, result: Any) -> None:
    revision = f" (revision {result})" if isinstance(result, int) and not isinstance(result, bool) else ""
    print(f"{what}{revision}", flush=True)


async def _group_change(client: Any, args: argparse.Namespace) -> int:
    call = {"create": client.create_group, "join": client.join_group, "leave": client.leave_group}[args.verb]
    await call(args.group)
    past = {"create": "created", "join": "joined", "leave": "left"}[args.verb]
    print(f"{past} group {args.group}", flush=True)
    return EXIT_OK


async def _group_list(client: Any, args: argparse.Namespace) -> int:
    _show(args, await client.groups(), prefer=GROUP_COLUMNS)
    return EXIT_OK


async def _require_signatures(client: Any, args: argparse.Namespace) -> int:
    from groupcomm.services.provisioning.signing import load_public_keys

    keys = [key.to_line() for key in load_public_keys(args.keys)]
    result = await client.require_signatures(args.group, keys)
    _accepted(f"group {args.group}: {len(keys)} trusted key(s)" if keys else
              f"group {args.group}: signatures no longer required", result)
    return EXIT_OK


async def _plan_require_signatures(client: Any, args: argparse.Namespace) -> int:
    from groupcomm.services.provisioning.signing import load_public_keys

    keys = [key.to_line() for key in load_public_keys(args.keys)]
    result = await client.require_plan_signatures(args.env, keys)
    _accepted(f"environment {args.env}: {len(keys)} trusted key(s)" if keys else
              f"environment {args.env}: signatures no longer required", result)
    return EXIT_OK


def _bundle_keygen(args: argparse.Namespace) -> int:
    from groupcomm.services.provisioning.signing import generate_signing_key

    if os.path.lexists(args.key):
        raise UsageError(f"{args.key}: exists already (a key is never overwritten)")
    print(generate_signing_key(args.key).public.to_line())
    return EXIT_OK


def _bundle_sign(args: argparse.Namespace) -> int:
    from groupcomm.services.provisioning.bundle import read_bundle
    from groupcomm.services.provisioning.signing import (
        SignatureError,
        load_signing_key,
        write_signature,
    )

    bundle = read_bundle(args.file)
    try:
        key = load_signing_key(args.key)
    except SignatureError as exc:
        raise UsageError(str(exc)) from None
    path = write_signature(bundle, key)
    print(f"{path}: {bundle.name} {bundle.version} signed with key {key.public.key_id}")
    return EXIT_OK


async def _bundle_install(client: Any, args: argparse.Namespace) -> int:
    from groupcomm.services.provisioning.render import ProgressView, print_json

    with ProgressView.for_output(json_mode=args.json) as view:
        result = await client.install_bundle(args.file, group=args.group, signature=args.signature,
                                             start=args.start, progress=view)
    if args.json:
        print_json({"result": result})
    else:
        _accepted(f"installed {args.file} in group {args.group}" + (" (started)" if args.start else ""), result)
    return EXIT_OK


async def _bundle_change(client: Any, args: argparse.Namespace) -> int:
    call = {"start": client.start_bundle, "stop": client.stop_bundle, "uninstall": client.uninstall_bundle}
    result = await call[args.verb](args.name, group=args.group)
    past = {"start": "started", "stop": "stopped", "uninstall": "uninstalled"}[args.verb]
    _accepted(f"{past} {args.name} in group {args.group}", result)
    return EXIT_OK


async def _bundle_list(client: Any, args: argparse.Namespace) -> int:
    from groupcomm.services.provisioning.render import STATUS_COLUMNS

    _show(args, await client.bundles(args.group), prefer=STATUS_COLUMNS)
    return EXIT_OK


async def _config_set(client: Any, args: argparse.Namespace) -> int:
    values = parse_assignments(args.assignments)
    result = await client.set_config(args.pid, values, group=args.group)
    _accepted(f"set {', '.join(values)} of {args.pid} in group {args.group}", result)
    return EXIT_OK


async def _config_get(client: Any, args: argparse.Namespace) -> int:
    values = await client.get_config(args.pid, group=args.group)
    if args.key is not None:
        if not isinstance(values, dict) or args.key not in values:
            raise CliError(f"no key {args.key!r} in {args.pid!r} of group {args.group!r}")
        values = values[args.key]
        if args.json:
            _show(args, values)
        else:
            print(values, flush=True)
        return EXIT_OK
    _show(args, values if args.json else [{"key": k, "value": v} for k, v in values.items()],
          prefer=("key", "value"))
    return EXIT_OK


async def _config_list(client: Any, args: argparse.Namespace) -> int:
    configs = await client.configs(args.group)
    if args.json:
        _show(args, configs)
        return EXIT_OK
    rows = [{"pid": pid, "key": k, "value": v} for pid, values in configs.items() for k, v in values.items()]
    _show(args, rows, prefer=("pid", "key", "value"))
    return EXIT_OK


async def _config_delete(client: Any, args: argparse.Namespace) -> int:
    result = await client.delete_config(args.pid, args.key, group=args.group)
    what = f"{args.key} of {args.pid}" if args.key is not None else args.pid
    _accepted(f"deleted {what} in group {args.group}", result)
    return EXIT_OK


async def _rollout(args: argparse.Namespace, call: Callable[..., Awaitable[Any]], **kwargs: Any) -> int:
    from groupcomm.services.provisioning.render import (
        ProgressView,
        print_json,
        render_value,
    )

    with ProgressView.for_output(json_mode=args.json) as view:
        result = await call(progress=view, **kwargs)
    if args.json:
        print_json({"result": result})
    else:
        render_value(result, prefer=PLAN_COLUMNS)
    if rollout_succeeded(result):
        return EXIT_OK
    print(f"groupcomm: error: the rollout of environment {args.env!r} did not succeed", file=sys.stderr)
    return EXIT_FAILED


async def _plan_apply(client: Any, args: argparse.Namespace) -> int:
    return await _rollout(args, client.apply_plan, plan_path=args.plan, env=args.env, batch=args.batch,
                          force=args.force)


async def _plan_rollback(client: Any, args: argparse.Namespace) -> int:
    return await _rollout(args, client.rollback_plan, env=args.env, to=args.to)


async def _plan_diff(client: Any, args: argparse.Namespace) -> int:
    _show(args, await client.plan_diff(args.plan, env=args.env), empty="no change")
    return EXIT_OK


async def _plan_status(client: Any, args: argparse.Namespace) -> int:
    _show(args, await client.plan_status(args.env), prefer=PLAN_COLUMNS, empty="no rollout")
    return EXIT_OK


async def _plan_history(client: Any, args: argparse.Namespace) -> int:
    _show(args, await client.plan_history(args.env), prefer=PLAN_COLUMNS, empty="no rollout")
    return EXIT_OK


async def _cluster_status(client: Any, args: argparse.Namespace) -> int:
    from groupcomm.services.provisioning.render import print_json, render_status

    status = await client.cluster_status(group=args.group, env=args.env)
    print_json(status) if args.json else render_status(status)
    return EXIT_OK


async def _cluster_history(client: Any, args: argparse.Namespace) -> int:
    _show(args, await client.history(group=args.group), prefer=HISTORY_COLUMNS, empty="no change recorded")
    return EXIT_OK
