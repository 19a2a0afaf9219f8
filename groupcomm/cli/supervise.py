"""``groupcomm supervise NODE.toml``: keep the processes of a node file alive until SIGINT/SIGTERM.

Each change of a process's state is printed as one line on stdout
(``web: running pid 1234``).  A bad node file is one line on stderr and exit
status 2 (the ConfigError names the file, the process and the field).

With ``--cluster`` (and the options of ``groupcomm node``: ``--stack``,
``--mcast-port``...) the supervisor also joins that cluster as member
``--name`` (the node's name) and takes part in it: it publishes its table in
the supervisor space and answers ``groupcomm ps`` and ``groupcomm
start|stop|restart`` (:mod:`groupcomm.services.supervisor.remote`).  On
SIGINT/SIGTERM it stops its processes, then leaves the group.
"""

from __future__ import annotations

import argparse
import socket
from typing import Any

from groupcomm.cli.channel_options import (
    add_channel_options,
    join_failed,
    settings_from,
)
from groupcomm.cli.errors import EXIT_OK, UsageError, contains

__all__ = ["add_parser", "run"]

_CHANNEL_ONLY = ("bind", "mcast_addr", "mcast_port", "ttl", "token_timeout", "join_timeout", "fd")


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "supervise", help="keep the processes of a node file alive",
        description="Start the processes a node file (TOML) lists, restart them with back-off when they die "
                    "or fail their health check, write their output to rotated log files, and stop them all "
                    "on SIGINT or SIGTERM. With --cluster, also join that cluster: publish the process table "
                    "('groupcomm ps') and take commands ('groupcomm restart NODE PROCESS'). "
                    "See docs/supervisor.rst for the file format.",
    )
    p.add_argument("node_file", metavar="NODE.toml", help="the node file")
    add_channel_options(p, cluster_required=False,
                        name_help="the node's name (default: the file's 'node', else the host name); "
                                  "with --cluster also the member name")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import trio

    from groupcomm.services.supervisor.runner import serve
    from groupcomm.services.supervisor.spec import load_node_file

    node = load_node_file(args.node_file)            # a ConfigError becomes one line and exit 2
    name = args.name or node.node or socket.gethostname()

    def announce(line: str) -> None:
        print(line, flush=True)

    if args.cluster is None:
        given = [f"--{o.replace('_', '-')}" for o in _CHANNEL_ONLY if getattr(args, o) is not None]
        if given:
            raise UsageError(f"{', '.join(given)} need(s) --cluster")
        trio.run(lambda: serve(node, name=name, announce=announce))
        return EXIT_OK

    settings = settings_from(args)
    joined = False

    async def attached() -> None:
        nonlocal joined
        from groupcomm.io.channel import open_channel

        kwargs = settings.channel_kwargs()
        if node.cluster.members:                      # the supervisors are the cluster's voters
            kwargs["overrides"] = {**kwargs["overrides"],
                                   "QUORUM": {**kwargs["overrides"].get("QUORUM", {}),
                                              "expected_members": list(node.cluster.members)}}
        async with open_channel(settings.stack, cluster=args.cluster, name=name, **kwargs) as ch:
            joined = True
            await serve(node, name=name, announce=announce, channel=ch)

    try:
        trio.run(attached)
    except BaseException as exc:
        if not joined and contains(exc, trio.TooSlowError):
            raise join_failed(args, settings) from exc
        raise
    return EXIT_OK
