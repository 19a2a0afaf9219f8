"""``--metrics HOST:PORT`` of the commands that run a member (``supervise``, ``sessions-node``).

The address is checked like ``groupcomm node --metrics``'s
(:func:`~groupcomm.cli.addresses.parse_host_port`: a loopback address only,
port 0 for any free one; anything else is one usage line and exit status 2),
and :func:`serving_metrics` serves the channel's counters and latency
histograms (:mod:`groupcomm.io.metrics`) at ``http://HOST:PORT/metrics``
while its block runs.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from groupcomm.cli.addresses import HostPort, parse_host_port

__all__ = ["METRICS_HELP", "add_metrics_option", "metrics_address", "serving_metrics"]

METRICS_HELP = ("serve this member's counters and latency histograms in the Prometheus text format at "
                "http://HOST:PORT/metrics (a loopback address; port 0: any free one)")


def add_metrics_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--metrics HOST:PORT`` to ``parser``."""
    parser.add_argument("--metrics", metavar="HOST:PORT", default=None, help=METRICS_HELP)


def metrics_address(args: argparse.Namespace) -> HostPort | None:
    """The ``--metrics`` address (None if not given); UsageError if malformed or not loopback."""
    return None if args.metrics is None else parse_host_port(args.metrics, option="--metrics")


@asynccontextmanager
async def serving_metrics(channel: Any, address: HostPort | None) -> AsyncIterator[str | None]:
    """Serve ``channel``'s metrics at ``address`` while the block runs; yields the URL (None: no address)."""
    if address is None:
        yield None
        return
    import trio

    from groupcomm.io.metrics import serve_metrics

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_metrics, channel, (address.host, address.port))
        yield f"http://{HostPort(address.host, port).bind()}/metrics"
        nursery.cancel_scope.cancel()
