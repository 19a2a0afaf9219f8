"""``groupcomm node``: one member on real sockets; prints events, sends each stdin line.

The settings are loaded and checked before any socket opens, so a bad stack
file, key or value is reported at once.  Ctrl-C (SIGINT) or SIGTERM leaves the
group gracefully and exits with status 128 + the signal number (130, 143),
printing nothing more.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any

from groupcomm.cli.metrics_option import add_metrics_option, metrics_address, serving_metrics
from groupcomm.cli.channel_options import (
    MIN_TOKEN_TIMEOUT,
    NodeSettings,
    add_channel_options,
    duration,
    join_failed,
    settings_from,
)
from groupcomm.cli.errors import contains

__all__ = ["MIN_TOKEN_TIMEOUT", "NodeSettings", "add_parser", "duration", "event_line", "run", "settings_from"]


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "node", help="run one member: print its events, send each stdin line",
        description="Run one member of a cluster: print its events (views, messages, merges), "
                    "send each line read from stdin. Ctrl-C leaves the group gracefully.",
    )
    add_channel_options(p)
    p.add_argument("--safe", action="store_true", help="send stdin lines as safe messages")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--no-stdin", action="store_true", help="do not read stdin")
    add_metrics_option(p)
    p.set_defaults(run=run)


def event_line(event: Any, as_json: bool) -> str:
    """One line for a channel event (View, Merge, Direct or Message), plain or JSON."""
    from groupcomm.events import Direct, Message, View
    from groupcomm.layers.spaces import Merge

    if isinstance(event, View):
        if as_json:
            return json.dumps({"view": list(event.members), "ring": str(event.ring_id), "transitional": event.transitional})
        kind = "transitional view" if event.transitional else "view"
        return f"{kind} {event.ring_id}: {list(event.members)}"
    if isinstance(event, Merge):
        if as_json:
            return json.dumps({"merge": str(event.ring_id), "components": [list(c) for c in event.components],
                               "primary": list(event.primary), "was_primary": event.was_primary})
        return (f"merge {event.ring_id}: components {[list(c) for c in event.components]}, "
                f"{'primary' if event.was_primary else 'winning'} side {list(event.primary)}")
    if isinstance(event, Direct):
        if as_json:
            return json.dumps({"direct_from": event.sender, "msg": event.payload.decode(errors="replace")})
        return f"{event.sender} (direct): {event.payload.decode(errors='replace')}"
    assert isinstance(event, Message), event
    if as_json:
        return json.dumps({"from": event.sender, "msg": event.payload.decode(errors="replace"), "safe": event.safe})
    return f"{event.sender}: {event.payload.decode(errors='replace')}"


@dataclass
class _RunState:
    joined: bool = False
    signal: int | None = None              # the first signal that asked us to leave
    stop: Any = None                       # the trio.CancelScope a signal cancels


def run(args: argparse.Namespace) -> int:
    """Run one member until its events end or a signal asks it to leave."""
    import trio

    settings = settings_from(args)
    metrics = metrics_address(args)
    state = _RunState()

    async def member() -> None:
        from groupcomm.io.channel import open_channel

        async with open_channel(settings.stack, cluster=args.cluster, name=args.name, overrides=settings.overrides,
                                join_timeout=settings.join_timeout, **settings.fd) as ch:
            state.joined = True
            print(json.dumps({"address": ch.address}) if args.json else f"joined as {ch.address}", flush=True)
            # A signal cancels only this work: the block then ends normally,
            # and open_channel leaves gracefully while the channel still runs.
            with trio.CancelScope() as state.stop:
                async with serving_metrics(ch, metrics) as url, trio.open_nursery() as nursery:
                    if url is not None:
                        print(json.dumps({"metrics": url}) if args.json else f"metrics at {url}", flush=True)
                    if not args.no_stdin:
                        nursery.start_soon(_send_stdin_lines, ch, args.safe)
                    async for event in ch.events():
                        print(event_line(event, args.json), flush=True)
                    nursery.cancel_scope.cancel()

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                state.stop = nursery.cancel_scope           # before the first view: just stop

                async def leave_on_signal() -> None:
                    async for signum in signals:
                        if state.signal is not None:       # a second signal: stop now, leave or not
                            nursery.cancel_scope.cancel()
                        state.signal = signum
                        state.stop.cancel()

                nursery.start_soon(leave_on_signal)
                await member()
                nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except BaseException as exc:
        if not state.joined and contains(exc, trio.TooSlowError):
            raise join_failed(args, settings) from exc
        raise
    return 0 if state.signal is None else 128 + state.signal


async def _send_stdin_lines(ch: Any, safe: bool) -> None:
    """Send every line of stdin; a thread reads it, so a signal never waits for a line."""
    import trio

    lines_in, lines_out = trio.open_memory_channel[bytes](16)
    token = trio.lowlevel.current_trio_token()
    threading.Thread(target=_read_lines, args=(lines_in, token), name="stdin", daemon=True).start()
    async with lines_out:
        async for line in lines_out:
            await ch.send(line, safe=safe)


def _read_lines(lines_in: Any, token: Any) -> None:
    """Thread: split fd 0 into lines and hand them to trio; ends at EOF or when trio is gone.

    It reads the raw descriptor (no ``sys.stdin`` buffer lock), so the daemon
    thread still blocked in ``read`` at exit cannot hold up interpreter shutdown.
    """
    import trio

    pending = b""
    try:
        while chunk := os.read(0, 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                trio.from_thread.run(lines_in.send, line, trio_token=token)
        if pending:
            trio.from_thread.run(lines_in.send, pending, trio_token=token)
        trio.from_thread.run_sync(lines_in.close, trio_token=token)
    except (trio.RunFinishedError, trio.Cancelled, trio.BrokenResourceError, trio.ClosedResourceError, OSError, ValueError):
        return
