"""``groupcomm ps`` and ``groupcomm start|stop|restart NODE PROCESS``: the cluster's processes, through the group.

Each command joins the cluster as a short-lived member, asks the supervisors
(``groupcomm supervise NODE.toml --cluster C``) with one request to every
member of the channel, and leaves.  Members that are not supervisors answer
that they have no handler; those answers are ignored.

The short-lived member has no name unless ``--name`` gives one: its node id
then derives from its socket address, and on the multicast stacks (``udp``,
``loopback``, whose unicast port is picked by the OS) it keeps no state
directory at all -- nothing is left behind per invocation.  With ``--name``
(or a stack with a fixed port, such as ``udpu``, which must list this host's
address:port among its hosts) it uses one state directory per name, reused by
every invocation.

Exit status: 0 success; 1 no view formed, no supervisor answered, or the
command failed on the node; 2 an unknown node or process (one line on stderr),
or a bad option.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from groupcomm.cli.channel_options import (
    NodeSettings,
    add_channel_options,
    duration,
    join_failed,
    settings_from,
)
from groupcomm.cli.errors import EXIT_OK, EXIT_USAGE, CliError, UsageError, contains

__all__ = ["ANSWER_TIMEOUT", "UnknownTarget", "add_parser", "format_table", "run_command", "run_ps"]

ANSWER_TIMEOUT = 2.0
"""Seconds the supervisors have to answer (``--timeout``)."""

COLUMNS = ("NODE", "PROCESS", "PID", "STATE", "RESTARTS", "SINCE", "ROLE")


class UnknownTarget(CliError):
    """No supervisor of that node answered, or it has no such process (exit status 2)."""

    exit_status = EXIT_USAGE


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "ps", help="show the processes of every supervisor in a cluster",
        description="Join the cluster briefly, ask every supervisor ('groupcomm supervise ... --cluster') for its "
                    "process table and print them as one table (or JSON), then leave.",
    )
    _common(p)
    p.add_argument("--json", action="store_true",
                   help="a JSON list of objects (node, process, pid, state, restarts, since in seconds since "
                        "the epoch, role, detail, generation, member)")
    p.set_defaults(run=run_ps)
    for verb, what in (("start", "start a stopped process"), ("stop", "stop a process (it stays stopped)"),
                       ("restart", "restart a process (stop, then start; the back-off is reset)")):
        c = commands.add_parser(
            verb, help=f"{what} on one node of a cluster, through its supervisor",
            description=f"Join the cluster briefly and ask the supervisor of NODE to {verb} PROCESS; print its "
                        "answer. An unknown node or process is one line on stderr and exit status 2.",
        )
        c.add_argument("node", metavar="NODE", help="the node's name (as 'groupcomm ps' shows it)")
        c.add_argument("process", metavar="PROCESS", help="the process's name in the node file")
        _common(c)
        c.set_defaults(run=run_command, verb=verb)


def _common(p: argparse.ArgumentParser) -> None:
    add_channel_options(p, name_help="member name (default: none: a throw-away identity that keeps no state "
                                     "directory on the multicast stacks)")
    p.add_argument("--timeout", type=duration, default=ANSWER_TIMEOUT, metavar="DURATION",
                   help=f"how long the supervisors have to answer (default: {ANSWER_TIMEOUT:g}s)")


# --------------------------------------------------------------------------- asking the group


def _ask(args: argparse.Namespace, payload: bytes) -> dict[int, Any]:
    """Join, send ``payload`` as a request to every member, leave; the replies that are not
    "no handler" answers, ``{member: Reply}``."""
    import trio

    from groupcomm.layers.rpc import ALL

    settings = settings_from(args)
    if args.timeout <= 0:
        raise UsageError("--timeout must be more than 0 s")
    out: dict[int, Any] = {}
    joined = False

    async def main() -> None:
        nonlocal joined
        from groupcomm.io.channel import open_channel

        async with open_channel(settings.stack, cluster=args.cluster, name=args.name,
                                **settings.channel_kwargs()) as ch:
            joined = True
            await _wait_for_company(ch, settings)
            replies = await ch.request(payload, mode=ALL, timeout=args.timeout)
            for member, reply in replies.items():
                if member != ch.address and not _no_handler(reply):
                    out[member] = reply

    try:
        trio.run(main)
    except BaseException as exc:
        if not joined and contains(exc, trio.TooSlowError):
            raise join_failed(args, settings) from exc
        raise
    return out


async def _wait_for_company(ch: Any, settings: NodeSettings) -> None:
    """A member that just started may install a view of itself alone before it merges with the
    running ones: wait (up to the join timeout) for a view with someone else in it."""
    import trio

    with trio.move_on_after(settings.join_timeout):
        while ch.view is None or len(ch.view.members) < 2:
            await trio.sleep(0.05)


def _no_handler(reply: Any) -> bool:
    return not reply.ok and reply.status == "error" and (reply.error or "").startswith("LookupError: no request handler")


def _decode_replies(replies: dict[int, Any], kind: type) -> tuple[dict[int, Any], list[str]]:
    """The replies of type ``kind``, and one line for each member that failed to answer."""
    from groupcomm.services.supervisor.table import MalformedMessage, decode

    good: dict[int, Any] = {}
    problems: list[str] = []
    for member, reply in sorted(replies.items()):
        if not reply.ok:
            problems.append(f"member {member}: {reply.error or reply.status}")
            continue
        try:
            message = decode(reply.value or b"")
        except MalformedMessage as exc:
            problems.append(f"member {member}: malformed answer ({exc})")
            continue
        if type(message) is not kind:
            problems.append(f"member {member}: unexpected answer {type(message).__name__}")
            continue
        good[member] = message
    return good, problems


def _warn(lines: list[str]) -> None:
    for line in lines:
        print(f"groupcomm: warning: {line}", file=sys.stderr)


# --------------------------------------------------------------------------- ps


def rows_of(tables: dict[int, Any]) -> list[dict[str, Any]]:
    """One dict per process of the :class:`~groupcomm.services.supervisor.table.TableReply` values,
    sorted by node and process."""
    out = []
    for member, table in tables.items():
        for row in table.rows:
            out.append({"node": table.node, "process": row.name, "pid": row.pid, "state": row.state,
                        "restarts": row.restarts, "since": row.since / 1_000_000, "role": row.role,
                        "detail": row.detail, "generation": row.generation, "member": member})
    return sorted(out, key=lambda r: (r["node"], r["process"], r["member"]))


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as aligned columns (``COLUMNS``), ``since`` as local time."""
    lines = [COLUMNS]
    for r in rows:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["since"]))
        lines.append((r["node"], r["process"], str(r["pid"] or "-"), r["state"], str(r["restarts"]), since,
                      r["role"] or "-"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


def run_ps(args: argparse.Namespace) -> int:
    """``groupcomm ps``: print the cluster's process table."""
    from groupcomm.services.supervisor.table import TableReply, TableRequest, encode

    tables, problems = _decode_replies(_ask(args, encode(TableRequest())), TableReply)
    _warn(problems)
    if not tables:
        raise CliError(f"no supervisor in cluster {args.cluster!r} answered within {args.timeout:g} s")
    rows = rows_of(tables)
    print(json.dumps(rows) if args.json else format_table(rows), flush=True)
    return EXIT_OK


# --------------------------------------------------------------------------- start / stop / restart


def run_command(args: argparse.Namespace) -> int:
    """``groupcomm start|stop|restart NODE PROCESS``: ask NODE's supervisor; print its answer."""
    from groupcomm.services.supervisor.table import CommandReply, CommandRequest, encode

    request = CommandRequest(node=args.node, verb=args.verb, process=args.process)
    answers, problems = _decode_replies(_ask(args, encode(request)), CommandReply)
    mine = {member: a for member, a in answers.items() if a.mine}
    if not mine:
        _warn(problems)
        nodes = ", ".join(sorted(a.node for a in answers.values())) or "none answered"
        raise UnknownTarget(f"no supervisor of node {args.node!r} in cluster {args.cluster!r} "
                            f"(supervisors: {nodes})")
    for member, answer in sorted(mine.items()):
        if not answer.ok:
            kind = UnknownTarget if answer.unknown else CliError
            raise kind(f"node {answer.node!r} (member {member}): {answer.error}")
        row = answer.row
        state = "done" if row is None else row.state + (f" pid {row.pid}" if row.pid else "")
        print(f"{answer.node}: {args.verb} {args.process}: {state}", flush=True)
    return EXIT_OK
