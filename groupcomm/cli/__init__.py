"""The ``groupcomm`` command line; one module per command.

- ``demo`` (:mod:`groupcomm.cli.demo`): real member processes on loopback, narrated;
- ``simulate`` (:mod:`groupcomm.cli.simulate`): the simulated network, in virtual time;
- ``node`` (:mod:`groupcomm.cli.node`): one member, events out, stdin lines in;
- ``probe`` (:mod:`groupcomm.cli.probe`): ask running members for view and counters;
- ``keygen``, ``key`` (:mod:`groupcomm.cli.keys`): the cluster key file and its rotation;
- ``supervise`` (:mod:`groupcomm.cli.supervise`): keep a node's processes alive;
- ``ps``, ``start``, ``stop``, ``restart`` (:mod:`groupcomm.cli.ps`): the cluster's
  processes, through the supervisors' group;
- ``group``, ``bundle``, ``config``, ``plan``, ``cluster`` (:mod:`groupcomm.cli.provisioning`):
  provisioning, through the local provisioning agent;
- ``sessions-node`` (:mod:`groupcomm.cli.sessions`), ``sessions-demo``
  (:mod:`groupcomm.cli.sessions_demo`): replicated HTTP sessions, one node / three demo nodes.

Errors a user can cause print one line, ``groupcomm: error: ...``, on stderr
(:mod:`groupcomm.cli.errors`); ``groupcomm --debug COMMAND`` shows the
traceback instead.  :func:`build_parser` is the whole command line as data
(the CLI reference is generated from it).
"""

from __future__ import annotations

import argparse
import signal

import groupcomm
from groupcomm.cli import (
    demo,
    keys,
    node,
    probe,
    provisioning,
    ps,
    sessions,
    simulate,
    supervise,
)
from groupcomm.cli.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, interrupted, report

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]

EXIT_INTERRUPTED = 128 + signal.SIGINT
"""Ctrl-C (after ``node`` left its group gracefully); SIGTERM gives 128 + 15."""

DESCRIPTION = "Group communication with total order: run members, probe them, watch a demo or a simulation."

EPILOG = f"""\
examples:
  groupcomm demo
      three member processes on this host: views, ordered messages, kill -9, merge
  groupcomm node --cluster orders --name node-1
      join cluster 'orders' on the default stack (udp); type lines to send them

exit status:
  {EXIT_OK}    success
  {EXIT_FAILED}    the command ran but failed (no view formed in time, nobody answered a probe,
       a demo check failed)
  {EXIT_USAGE}    a command-line or configuration error (the message names it)
  {EXIT_INTERRUPTED}  interrupted by Ctrl-C (a node leaves its group first; SIGTERM gives 143)

'groupcomm COMMAND --help' describes each command's options.
"""

COMMANDS = (demo, simulate, node, probe, keys, supervise, ps, provisioning, sessions)


def build_parser() -> argparse.ArgumentParser:
    """The ``groupcomm`` argument parser: global options and one subcommand per module in ``COMMANDS``."""
    parser = argparse.ArgumentParser(
        prog="groupcomm", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("--version", action="version", version=f"groupcomm {groupcomm.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BaseException as exc:
        if args.debug:
            raise
        if interrupted(exc):
            return EXIT_INTERRUPTED
        if not isinstance(exc, Exception) and not isinstance(exc, BaseExceptionGroup):
            raise                                       # SystemExit and the like
        return report(exc)

