"""``groupcomm sessions-node`` and ``groupcomm sessions-demo``: replicated HTTP sessions.

``sessions-node`` is one node of a clustered web application: it joins the
cluster (the same channel options as ``groupcomm node``), opens the session
store of the web application ``--app-name`` (default: the app's name; every
node of one application uses the same name, ``--backups`` and ``--strategy``), and serves
the demo application (:mod:`groupcomm.services.sessions.demo_app`) wrapped in
:class:`~groupcomm.services.sessions.asgi.SessionMiddleware` with Hypercorn on
trio at ``--http HOST:PORT``.  Port 0 picks a free port.  Only a loopback
address is served unless ``--allow-remote`` is given (the demo has no
authentication).  When it serves it prints one JSON line
``{"event": "serving", "name": ..., "url": ...}``.  SIGTERM or Ctrl-C shuts it
down gracefully: no new HTTP requests (those in flight finish), then the store
hands the sessions this node holds to the others (evacuation) and prints
``{"event": "stopped", "name": ..., "stats": {...}}`` (the store's counters,
``evacuated`` among them), then it leaves the cluster and exits 0.  A second signal, or a signal before it serves, stops
it at once with exit status 128 + the signal number, like ``groupcomm node``.

``sessions-demo`` (:mod:`groupcomm.cli.sessions_demo`) starts three such
processes on loopback and drives a narrated check with an HTTP client.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

from groupcomm.cli.addresses import HostPort, parse_host_port
from groupcomm.cli.channel_options import (
    add_channel_options,
    join_failed,
    settings_from,
)
from groupcomm.cli.errors import UsageError, contains
from groupcomm.cli.metrics_option import add_metrics_option, metrics_address, serving_metrics
from groupcomm.cli.sessions_demo import add_parser as add_demo_parser

__all__ = ["APPS", "MAX_BACKUPS", "STRATEGIES", "HttpAddress", "add_parser", "open_store", "parse_http_address",
           "parse_tags", "run_node", "store_settings"]

APPS = ("demo",)
STRATEGIES = ("next-k", "tag-aware")
"""The applications ``sessions-node --app`` can serve."""
MAX_BACKUPS = 8
"""Most backups (K) the command line accepts."""
GRACEFUL_HTTP_SECONDS = 5.0
"""How long requests in flight may take to finish once a node is asked to stop."""

_TAG_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,31}")


def add_parser(commands: Any) -> None:
    """Add ``sessions-node`` and ``sessions-demo`` to the ``groupcomm`` parser."""
    p = commands.add_parser(
        "sessions-node", help="one node of a web app with replicated HTTP sessions (Hypercorn on trio)",
        description="Join a cluster, open the replicated session store and serve the demo app behind the "
                    "session middleware at --http. SIGTERM or Ctrl-C: stop taking requests, hand this node's "
                    "sessions to the others, leave, exit 0.",
    )
    add_channel_options(p, name_help="node name (required): the routing hint in the session cookie")
    p.add_argument("--http", required=True, metavar="HOST:PORT",
                   help="address to serve HTTP on, e.g. 127.0.0.1:8001 ([::1]:8001 for IPv6; port 0: any free port)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --http address (the demo app has no authentication)")
    p.add_argument("--app", choices=APPS, default="demo", help="the application to serve (default: demo)")
    p.add_argument("--app-name", default=None, metavar="NAME",
                   help="the web application's name: its nodes share its sessions (default: the --app value)")
    p.add_argument("--backups", type=int, default=1, metavar="K",
                   help=f"copies of each session on other nodes (0..{MAX_BACKUPS}, default 1)")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                   help="a placement tag of this node, e.g. host=h1 or rack=r2 (repeatable): backups avoid "
                        "nodes with the same tags")
    p.add_argument("--strategy", choices=STRATEGIES, default="next-k",
                   help="how backups are chosen: next-k (default: the next K members in a per-session order) or "
                        "tag-aware (backups on another host, better another rack, by the host= and rack= tags)")
    add_metrics_option(p)
    p.set_defaults(run=run_node)
    add_demo_parser(commands)


HttpAddress = HostPort
"""Where to serve HTTP (see :class:`~groupcomm.cli.addresses.HostPort`)."""


def parse_http_address(text: str, *, allow_remote: bool = False) -> HttpAddress:
    """``HOST:PORT`` -> :class:`HttpAddress`; UsageError if malformed, or not loopback without ``allow_remote``."""
    return parse_host_port(text, option="--http", allow_remote=allow_remote,
                           remote_advice="add --allow-remote to serve other hosts (the demo app has no authentication)")


def parse_tags(items: list[str]) -> dict[str, str]:
    """``["host=h1", "rack=r2"]`` -> ``{"host": "h1", "rack": "r2"}``; UsageError if malformed or repeated."""
    tags: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _TAG_KEY.fullmatch(key) or not value or len(value) > 64 or not value.isprintable():
            raise UsageError(f"--tag {item!r}: expected KEY=VALUE (KEY a letter then letters, digits, _ . -; "
                             "VALUE 1..64 printable characters)")
        if key in tags:
            raise UsageError(f"--tag {key} given twice")
        tags[key] = value
    return tags


def store_settings(args: argparse.Namespace) -> Any:
    """The :class:`~groupcomm.services.sessions.settings.SessionSettings` the options ask for (UsageError if bad)."""
    from groupcomm.services.sessions.buckets import NextK, TagAware
    from groupcomm.services.sessions.settings import SessionSettings, session_space

    try:
        session_space(args.app_name or args.app)
        strategy = TagAware() if args.strategy == "tag-aware" else NextK()
        return SessionSettings(backups=args.backups, strategy=strategy)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


@asynccontextmanager
async def open_store(channel: Any, app_name: str, settings: Any, *, name: str,
                     tags: dict[str, str]) -> AsyncIterator[Any]:
    """This node's :class:`~groupcomm.services.sessions.driver.ReplicatedSessionStore` of ``app_name``.

    Leaving the block evacuates the sessions this node holds to the others, then leaves the space.
    """
    from groupcomm.services.sessions.driver import ReplicatedSessionStore

    async with ReplicatedSessionStore(channel, app_name, settings, tags=tags, name=name) as store:
        yield store


@dataclass
class _NodeState:
    joined: bool = False
    serving: bool = False
    signal: int | None = None             # the first signal that asked us to stop
    forced: bool = False                  # stopped at once (a second signal, or before serving)
    http_stop: Any = None                 # trio.Event: the HTTP server's shutdown trigger


def run_node(args: argparse.Namespace) -> int:
    """Run one sessions node until a signal stops it (see the module doc)."""
    import trio

    if not args.name:
        raise UsageError("sessions-node needs --name (the node's name in the cluster and in session cookies)")
    address = parse_http_address(args.http, allow_remote=args.allow_remote)
    metrics = metrics_address(args)
    if not 0 <= args.backups <= MAX_BACKUPS:
        raise UsageError(f"--backups must be in 0..{MAX_BACKUPS}")
    tags = parse_tags(args.tag)
    app_name = args.app_name or args.app
    store_config = store_settings(args)
    settings = settings_from(args)
    state = _NodeState()

    async def node() -> None:
        from hypercorn.trio import serve

        from groupcomm.io.channel import open_channel
        from groupcomm.services.sessions.asgi import SessionMiddleware
        from groupcomm.services.sessions.demo_app import demo_app

        async with open_channel(settings.stack, cluster=args.cluster, name=args.name,
                                **settings.channel_kwargs()) as channel, serving_metrics(channel, metrics) as metrics_url:
            state.joined = True
            if metrics_url is not None:
                print(json.dumps({"event": "metrics", "name": args.name, "url": metrics_url}), flush=True)
            async with open_store(channel, app_name, store_config, name=args.name, tags=tags) as store:
                app = SessionMiddleware(demo_app(store.node_name, getattr(store, "stats", None)), store)
                async with trio.open_nursery() as nursery:
                    binds = await nursery.start(partial(serve, app, _hypercorn_config(address), mode="asgi",
                                                        shutdown_trigger=state.http_stop.wait))
                    state.serving = True
                    print(json.dumps({"event": "serving", "name": args.name, "url": binds[0]}), flush=True)
                # the HTTP server stopped: leaving the store's block hands its sessions to the others
            stats = getattr(store, "stats", None)
            print(json.dumps({"event": "stopped", "name": args.name, "stats": stats() if stats else {}}),
                  flush=True)

    async def main() -> None:
        state.http_stop = trio.Event()
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def stop_on_signal() -> None:
                    async for signum in signals:
                        if state.signal is not None or not state.serving:
                            state.forced = True
                            nursery.cancel_scope.cancel()       # a second signal, or not serving yet: now
                        state.signal = signum if state.signal is None else state.signal
                        state.http_stop.set()

                nursery.start_soon(stop_on_signal)
                await node()
                nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except BaseException as exc:
        if not state.joined and contains(exc, trio.TooSlowError):
            raise join_failed(args, settings) from exc
        raise
    if state.signal is not None and state.forced:
        return 128 + state.signal
    return 0


def _hypercorn_config(address: HttpAddress) -> Any:
    from hypercorn.config import Config

    config = Config()
    config.bind = [address.bind()]
    config.accesslog = None
    config.graceful_timeout = GRACEFUL_HTTP_SECONDS
    return config
