"""A member's counters in the Prometheus text format, served on a local port.

:func:`prometheus_text` renders a :meth:`Channel.stats <groupcomm.io.channel.Channel.stats>`
snapshot (deliveries, retransmissions, drops by reason, token losses, view
changes, queue depths in bytes, ...), the current view and the member's latency
histograms (:func:`member_histograms`: self-delivery, sampled, and request
round trips) as Prometheus exposition text (format 0.0.4): every name prefixed
``groupcomm_``, labelled with the member's name and cluster.  :func:`serve_metrics` answers
``GET /metrics`` with it over plain HTTP/1.0 -- enough for a Prometheus
scraper or ``curl``::

    async with open_channel("udp", cluster="shop", name="n1") as channel, trio.open_nursery() as nursery:
        port = await nursery.start(serve_metrics, channel, ("127.0.0.1", 9464))

The server binds a loopback address unless told otherwise (the counters say a
lot about a cluster), reads at most :data:`MAX_REQUEST_BYTES` of a request
within :data:`REQUEST_TIMEOUT` seconds, and serves one request per connection.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Mapping
from typing import Any

import trio

from groupcomm.layers.histogram import Histogram

__all__ = ["GAUGES", "MAX_REQUEST_BYTES", "REQUEST_TIMEOUT", "channel_metrics", "member_histograms",
           "prometheus_text", "serve_metrics"]

GAUGES = frozenset({"pending_events", "pending_bytes", "send_queue_bytes", "peer_addresses", "send_targets",
                    "view_members", "view_primary"})
"""Counters that are current levels (may go down); every other one only grows."""
MAX_REQUEST_BYTES = 8192
"""Longest request head read before answering 400."""
REQUEST_TIMEOUT = 5.0
"""Seconds a client has to send its request head."""
_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _name(key: str) -> str:
    cleaned = "".join(c if c.isalnum() or c == "_" else "_" for c in key)
    return "groupcomm_" + cleaned


def member_histograms(member: Any) -> dict[str, Histogram]:
    """The latency histograms of a :class:`~groupcomm.layers.member.Member`, by metric name (seconds):
    ``self_delivery_latency_seconds`` (one message in
    :data:`~groupcomm.layers.multicast.LATENCY_SAMPLE_EVERY`, from its submission to its delivery here)
    and ``request_latency_seconds`` (every request this member made, from start to completion)."""
    return {"self_delivery_latency_seconds": member.multicast.self_delivery_latency,
            "request_latency_seconds": member.rpc.latency}


def _bound(value: float) -> str:
    return "+Inf" if value == math.inf else repr(float(value))


def prometheus_text(stats: Mapping[str, float], labels: Mapping[str, str],
                    histograms: Mapping[str, Histogram] | None = None) -> str:
    """``stats`` and ``histograms`` as Prometheus exposition text: one ``# TYPE`` line per metric and
    one sample per counter, or per histogram its cumulative ``_bucket`` samples (``le``, ``+Inf``
    last), ``_sum`` and ``_count``.

    Counters (names in :data:`GAUGES` excepted) get the conventional ``_total`` suffix;
    values that are not finite numbers are left out."""
    label_text = ",".join(f'{key}="{_label(str(value))}"' for key, value in sorted(labels.items()))
    lines = []
    for key in sorted(stats):
        value = stats[key]
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        if key in GAUGES:
            name, kind = _name(key), "gauge"
        else:
            name, kind = _name(key) + "_total", "counter"
        lines.append(f"# TYPE {name} {kind}")
        lines.append(f"{name}{{{label_text}}} {value}")
    sep = "," if label_text else ""
    for key in sorted(histograms or {}):
        histogram, name = histograms[key], _name(key)                        # type: ignore[index]
        lines.append(f"# TYPE {name} histogram")
        lines.extend(f'{name}_bucket{{{label_text}{sep}le="{_bound(bound)}"}} {count}'
                     for bound, count in histogram.cumulative())
        lines.append(f"{name}_sum{{{label_text}}} {histogram.sum!r}")
        lines.append(f"{name}_count{{{label_text}}} {histogram.count}")
    return "\n".join(lines) + "\n"


def channel_metrics(channel: Any) -> str:
    """The exposition text of ``channel`` now (its stats, its view and its member's histograms)."""
    stats: dict[str, float] = dict(channel.stats())
    view = channel.view
    stats["view_members"] = len(view.members) if view is not None else 0
    stats["view_primary"] = int(bool(view is not None and view.primary))
    cluster = getattr(channel, "cluster", "") or ""
    histograms: dict[str, Histogram] = {}
    channel.call_member(lambda now, member: histograms.update(member_histograms(member)), quiet=True)
    return prometheus_text(stats, {"member": str(channel.name), "cluster": str(cluster)}, histograms)


async def serve_metrics(channel: Any, address: tuple[str, int] = ("127.0.0.1", 9464), *,
                        allow_remote: bool = False, render: Callable[[Any], str] = channel_metrics,
                        task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``GET /metrics`` for ``channel`` at ``address`` until cancelled; ``task_status.started``
    gets the bound port (``address`` port 0: any free one).  ValueError for a non-loopback address
    unless ``allow_remote``."""
    host, port = address
    if not allow_remote and not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"metrics address {host} is not a loopback address (pass allow_remote=True to expose it)")
    listeners = await trio.open_tcp_listeners(port, host=host)

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            with trio.move_on_after(REQUEST_TIMEOUT):
                head = await _read_head(stream)
                if head is None:
                    await _answer(stream, b"400 Bad Request", b"request head too long or malformed\n")
                    return
                method, _, rest = head.partition(b" ")
                path = rest.split(b" ", 1)[0]
                if method != b"GET":
                    await _answer(stream, b"405 Method Not Allowed", b"only GET\n")
                elif path.split(b"?", 1)[0] != b"/metrics":
                    await _answer(stream, b"404 Not Found", b"try /metrics\n")
                else:
                    await _answer(stream, b"200 OK", render(channel).encode(), _CONTENT_TYPE)

    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    """The request line, once the head is complete (None: too long or the client stopped)."""
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        if len(data) > MAX_REQUEST_BYTES:
            return None
        try:
            chunk = await stream.receive_some(4096)
        except trio.BrokenResourceError:
            return None
        if not chunk:
            break
        data += chunk
    line = data.split(b"\n", 1)[0].rstrip(b"\r")
    return line if line.count(b" ") >= 1 else None


async def _answer(stream: trio.SocketStream, status: bytes, body: bytes,
                  content_type: bytes = b"text/plain; charset=utf-8") -> None:
    head = (b"HTTP/1.0 " + status + b"\r\nContent-Type: " + content_type + b"\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n")
    try:
        await stream.send_all(head + body)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
