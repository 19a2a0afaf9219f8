"""The options every command that joins a cluster takes (``node``, ``supervise``, ``ps``...).

:func:`add_channel_options` adds ``--cluster``, ``--stack``, ``--name``,
``--bind``, the multicast options, ``--token-timeout``, ``--join-timeout`` and
``--fd`` to a subcommand; :func:`settings_from` loads and checks the stack with
them before any socket opens (a bad stack file, key or value is one line and
exit status 2); :func:`join_failed` is the one-line error of a join that timed out.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from groupcomm.cli.errors import JoinTimedOut, UsageError
from groupcomm.config import build_stack, load_stack, parse_duration
from groupcomm.errors import ConfigError

__all__ = ["MIN_TOKEN_TIMEOUT", "NodeSettings", "add_channel_options", "duration", "join_failed", "settings_from"]

MIN_TOKEN_TIMEOUT = 0.01
"""Seconds; a shorter token-loss timeout fires between two ordinary token visits."""

_FD_CHOICES = ("lan", "loopback", "off")


def duration(text: str) -> float:
    """An argparse type: ``"300ms"``, ``"1.5s"`` or plain seconds."""
    try:
        return parse_duration(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_channel_options(p: argparse.ArgumentParser, *, cluster_required: bool = True, name: bool = True,
                        name_help: str = "member name (the node id derives from it)") -> None:
    """Add the options that say how to join a cluster (``name=False``: no ``--name``)."""
    p.add_argument("--cluster", required=cluster_required, default=None,
                   help="cluster name (members of one cluster share it)")
    p.add_argument("--stack", default="udp", help="a shipped stack (udp, udpu, loopback) or a .toml path (default: udp)")
    if name:
        p.add_argument("--name", default=None, help=name_help)
    p.add_argument("--bind", default=None, metavar="ADDR", help="local address (overrides the transport's bind_addr)")
    p.add_argument("--mcast-addr", default=None, metavar="ADDR", help="multicast group (UDP stacks)")
    p.add_argument("--mcast-port", type=int, default=None, metavar="PORT", help="multicast port (UDP stacks)")
    p.add_argument("--ttl", type=int, default=None, help="multicast TTL (0 = this host only)")
    p.add_argument("--token-timeout", type=duration, default=None, metavar="DURATION",
                   help=f"token-loss timeout, e.g. 300ms (at least {MIN_TOKEN_TIMEOUT * 1000:g}ms; "
                        "overrides TOTEM token_timeout and scales join and merge with it)")
    p.add_argument("--join-timeout", type=duration, default=None, metavar="DURATION",
                   help="give up when no view formed within this long (default: the stack's "
                        "startup_wait + 10 x consensus)")
    p.add_argument("--fd", choices=_FD_CHOICES, default=None, help="failure detector tuning (default: the stack's)")


@dataclass(frozen=True)
class NodeSettings:
    """What ``open_channel`` gets, checked before anything runs."""

    stack: str
    overrides: dict[str, dict[str, Any]]
    fd: dict[str, Any]
    join_timeout: float
    token_timeout: float

    def channel_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~groupcomm.io.channel.open_channel` besides ``cluster`` and ``name``."""
        return {"overrides": self.overrides, "join_timeout": self.join_timeout, **self.fd}


def settings_from(args: argparse.Namespace) -> NodeSettings:
    """Load the stack with the options applied and check it; raises ConfigError or UsageError."""
    transport = load_stack(args.stack).layers[0].name     # UDP or UDPU (build_stack checks)
    overrides: dict[str, dict[str, Any]] = {transport: {}, "TOTEM": {}}
    if args.bind is not None:
        overrides[transport]["bind_addr"] = args.bind
    for flag, key in (("mcast_addr", "mcast_addr"), ("mcast_port", "mcast_port"), ("ttl", "mcast_ttl")):
        value = getattr(args, flag)
        if value is None:
            continue
        if transport != "UDP":
            raise UsageError(f"--{flag.replace('_', '-')} needs a multicast (UDP) stack; "
                             f"stack {args.stack!r} uses {transport}")
        overrides[transport][key] = value
    if args.token_timeout is not None:
        tt = args.token_timeout
        overrides["TOTEM"].update(token_timeout=tt, join=tt / 15, merge=tt / 5)
    overrides = {layer: values for layer, values in overrides.items() if values}
    stack = build_stack(load_stack(args.stack, overrides=overrides))
    ring = stack.ring
    try:
        ring.to_c(node_id=1)                            # the ring's own checks (mtu, timer order...)
    except ConfigError as exc:
        raise ConfigError(f"stack {args.stack}: TOTEM: {exc}") from None
    if ring.token_timeout < MIN_TOKEN_TIMEOUT:
        raise UsageError(f"token timeout {ring.token_timeout:g} s is too short: use at least "
                         f"{MIN_TOKEN_TIMEOUT:g} s (e.g. --token-timeout 300ms)")
    if args.join_timeout is not None and args.join_timeout <= 0:
        raise UsageError("--join-timeout must be more than 0 s")
    if args.fd is None:
        fd: dict[str, Any] = {}
    else:
        from groupcomm.layers.fd import FdConfig

        fd = {"fd": {"lan": FdConfig(), "loopback": FdConfig.loopback(), "off": None}[args.fd]}
    return NodeSettings(
        stack=args.stack, overrides=overrides, fd=fd, token_timeout=ring.token_timeout,
        join_timeout=args.join_timeout if args.join_timeout is not None else ring.join_timeout,
    )


def join_failed(args: argparse.Namespace, settings: NodeSettings) -> JoinTimedOut:
    """The error of a join that formed no view within the join timeout."""
    return JoinTimedOut(
        f"could not join cluster {args.cluster!r} on stack {args.stack!r}: no view formed within "
        f"{settings.join_timeout:g} s (see --join-timeout); check that the members can reach each other"
    )
