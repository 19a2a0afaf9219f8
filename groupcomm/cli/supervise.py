"""``groupcomm supervise NODE.toml``: keep the processes of a node file alive until SIGINT/SIGTERM.

Each change of a process's state is printed as one line on stdout
(``web: running pid 1234``).  A bad node file is one line on stderr and exit
status 2 (the ConfigError names the file, the process and the field).
"""

from __future__ import annotations

import argparse
from typing import Any

from groupcomm.cli.errors import EXIT_OK

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "supervise", help="keep the processes of a node file alive",
        description="Start the processes a node file (TOML) lists, restart them with back-off when they die "
                    "or fail their health check, write their output to rotated log files, and stop them all "
                    "on SIGINT or SIGTERM. See docs/supervisor.rst for the file format.",
    )
    p.add_argument("node_file", metavar="NODE.toml", help="the node file")
    p.add_argument("--name", default=None, help="the node's name (default: the file's 'node', else the host name)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import trio

    from groupcomm.services.supervisor.runner import serve
    from groupcomm.services.supervisor.spec import load_node_file

    node = load_node_file(args.node_file)            # a ConfigError becomes one line and exit 2
    trio.run(lambda: serve(node, name=args.name, announce=lambda line: print(line, flush=True)))
    return EXIT_OK
