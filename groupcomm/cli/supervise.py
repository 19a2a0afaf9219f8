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

A node file with a ``[provisioning]`` table (and ``--cluster``) also runs the
provisioning agent (:mod:`groupcomm.services.provisioning.node`) with its
control socket, which ``groupcomm group|bundle|config|plan|cluster`` talk to.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import socket
from typing import Any

from groupcomm.cli.channel_options import (
    add_channel_options,
    join_failed,
    settings_from,
)
from groupcomm.cli.errors import EXIT_OK, UsageError, contains
from groupcomm.cli.metrics_option import add_metrics_option, metrics_address, serving_metrics

__all__ = ["add_parser", "run"]

_CHANNEL_ONLY = ("bind", "mcast_addr", "mcast_port", "ttl", "token_timeout", "join_timeout", "fd", "metrics")


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
    add_metrics_option(p)
    p.set_defaults(run=run)


@contextlib.asynccontextmanager
async def provisioning_agent(node: Any, channel: Any, name: str, announce: Any, supervisor: Any) -> Any:
    """The provisioning agent of the node file's ``[provisioning]`` table, and its control socket."""
    from groupcomm.services.provisioning.control import (
        ProvisioningControlServer,
        default_socket,
    )
    from groupcomm.services.provisioning.node import ProvisioningNode
    from groupcomm.services.provisioning.settings import parse_provisioning

    settings, path = parse_provisioning(node.provisioning, source=node.source, base_dir=node.base_dir,
                                        member_dir=channel.state_dir)
    path = path or default_socket(name, create_dir=True)
    async with ProvisioningNode(channel, supervisor, settings, name=name) as agent, \
            ProvisioningControlServer(path, agent):
        announce(f"provisioning agent of node {name!r} on {path} (state in {settings.state_dir})")
        yield agent


def run(args: argparse.Namespace) -> int:
    import trio

    from groupcomm.services.supervisor.runner import serve
    from groupcomm.services.supervisor.spec import load_node_file

    node = load_node_file(args.node_file)            # a ConfigError becomes one line and exit 2
    if node.provisioning is not None:                # checked before anything starts (state_dir aside)
        from groupcomm.services.provisioning.settings import parse_provisioning
        parse_provisioning(node.provisioning, source=node.source, base_dir=node.base_dir, member_dir="/")
    name = args.name or node.node or socket.gethostname()
    metrics = metrics_address(args)                  # checked before anything starts

    def announce(line: str) -> None:
        print(line, flush=True)

    if args.cluster is None:
        given = [f"--{o.replace('_', '-')}" for o in _CHANNEL_ONLY if getattr(args, o) is not None]
        if given:
            raise UsageError(f"{', '.join(given)} need(s) --cluster")
        if node.provisioning is not None:
            raise UsageError(f"{args.node_file}: the [provisioning] agent needs --cluster")
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
        async with open_channel(settings.stack, cluster=args.cluster, name=name, **kwargs) as ch, \
                serving_metrics(ch, metrics) as metrics_url:
            joined = True
            if metrics_url is not None:
                announce(f"metrics at {metrics_url}")
            attach = None
            if node.provisioning is not None:
                attach = functools.partial(provisioning_agent, node, ch, name, announce)
            await serve(node, name=name, announce=announce, channel=ch, attach=attach)

    try:
        trio.run(attached)
    except BaseException as exc:
        if not joined and contains(exc, trio.TooSlowError):
            raise join_failed(args, settings) from exc
        raise
    return EXIT_OK
