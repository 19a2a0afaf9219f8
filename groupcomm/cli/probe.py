"""``groupcomm probe``: ask the running members of a cluster for their view and counters.

The probe is multicast to the stack's group, so it needs a multicast (UDP)
stack.  The line saying what is probed, and the hint when nobody answered, go
to stderr; the table (or the JSON list) goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from groupcomm.cli.errors import EXIT_FAILED, EXIT_OK, UsageError
from groupcomm.cli.node import duration
from groupcomm.config import build_stack, load_stack, stack_names
from groupcomm.errors import ConfigError

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "probe", help="ask the running members of a cluster for their view and counters",
        description="Multicast a probe to a cluster and print every answering member's view, "
                    "ring id and counters as a table (or JSON).",
    )
    p.add_argument("--cluster", required=True, help="cluster name")
    p.add_argument("--stack", default="udp", help="the members' stack: a shipped multicast stack (udp, loopback) "
                                                  "or a .toml path (default: udp)")
    p.add_argument("--mcast-port", type=int, default=None, metavar="PORT", help="the members' multicast port")
    p.add_argument("--timeout", type=duration, default=1.0, metavar="DURATION",
                   help="how long to collect answers (default: 1s)")
    p.add_argument("--json", action="store_true", help="print the answers as one JSON list")
    p.add_argument("--key-file", default=None, metavar="PATH",
                   help="the cluster key (default: the stack's CRYPTO key_file, e.g. $GROUPCOMM_KEY_FILE); "
                        "members with a key answer only sealed probes")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from groupcomm.io.channel import cluster_id_for
    from groupcomm.io.probe import format_table, probe, probe_seal

    if args.timeout <= 0:
        raise UsageError("--timeout must be more than 0 s")
    require_multicast(args.stack)
    overrides = {"UDP": {"mcast_port": args.mcast_port}} if args.mcast_port is not None else None
    settings = build_stack(load_stack(args.stack, overrides=overrides))
    udp = settings.transport
    key_file = args.key_file if args.key_file is not None else (settings.crypto.key_file if settings.crypto else "")
    seal = probe_seal(cluster_id_for(args.cluster), key_file) if key_file else None
    print(f"probing cluster {args.cluster!r} on stack {args.stack!r} ({udp.mcast_addr}:{udp.mcast_port})...",
          file=sys.stderr, flush=True)
    reports = probe(cluster_id_for(args.cluster), udp, args.timeout, seal=seal)
    if args.json:
        print(json.dumps(reports))
    elif reports:
        print(format_table(reports))
    if reports:
        return EXIT_OK
    print(f"no member answered within {args.timeout:g} s; {_other_stacks_hint(args.stack)}", file=sys.stderr)
    return EXIT_FAILED


def require_multicast(stack: str) -> None:
    """A UsageError unless the stack's transport is multicast UDP."""
    transport = load_stack(stack).layers[0].name
    if transport != "UDP":
        raise UsageError(f"probe needs a multicast (UDP) stack: stack {stack!r} uses {transport}, "
                         "which has no group to send the probe to")


def _other_stacks_hint(stack: str) -> str:
    others = [name for name in stack_names() if name != stack and _is_multicast(name)]
    suggestion = " or ".join(f"--stack {name}" for name in others)
    hint = "are the members on another stack or port?"
    return f"{hint} try {suggestion} (or --mcast-port)" if others else f"{hint} try --stack or --mcast-port"


def _is_multicast(stack: str) -> bool:
    try:
        return load_stack(stack).layers[0].name == "UDP"
    except ConfigError:                     # a broken stack is simply not suggested
        return False
