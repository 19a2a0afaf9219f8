"""`groupcomm probe`: ask the running members of a cluster for their view and counters.

A request is multicast to the cluster's group; each member answers by unicast
with a msgpack report.  Requests and answers carry the cluster id, so probes of
other clusters on the same group are ignored.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import msgpack

from groupcomm.io.udp import UdpConfig, open_sockets
from groupcomm.layers.wire import PROBE_HEADER, PROBE_MAGIC, PROBE_REQUEST, PROBE_RESPONSE, PROTOCOL_VERSION

__all__ = ["MAGIC", "probe", "format_table", "is_probe_request", "probe_response"]

# The layout (groupcomm.layers.wire.PROBE_HEADER) and kinds live in the wire module.
MAGIC = PROBE_MAGIC
_HEADER = PROBE_HEADER
_REQUEST, _RESPONSE = PROBE_REQUEST, PROBE_RESPONSE
_MAX_REPORT = 60000


def is_probe_request(data: bytes, cluster_id: int) -> bool:
    """Whether ``data`` is a probe request of this protocol version for ``cluster_id``."""
    if len(data) != _HEADER.size:
        return False
    magic, version, kind, cluster = _HEADER.unpack(data)
    return magic == MAGIC and version == PROTOCOL_VERSION and kind == _REQUEST and cluster == cluster_id


def probe_response(cluster_id: int, report: dict) -> bytes:
    body = msgpack.packb(report, use_bin_type=True)
    return _HEADER.pack(MAGIC, PROTOCOL_VERSION, _RESPONSE, cluster_id) + body[:_MAX_REPORT]


def probe(cluster_id: int, udp: UdpConfig, timeout: float = 1.0) -> list[dict[str, Any]]:
    """Multicast a probe and collect the answers that arrive within ``timeout`` seconds."""
    sockets = open_sockets(UdpConfig(**{**udp.__dict__, "port": 0}))
    try:
        sock = sockets.unicast
        sock.sendto(_HEADER.pack(MAGIC, PROTOCOL_VERSION, _REQUEST, cluster_id), sockets.group)
        answers: dict[int, dict] = {}
        deadline = time.monotonic() + timeout
        sock.setblocking(True)
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, _ = sock.recvfrom(65536)
            except (socket.timeout, BlockingIOError):
                break
            if len(data) <= _HEADER.size or data[:2] != MAGIC:
                continue
            _, version, kind, cluster = _HEADER.unpack_from(data)
            if version != PROTOCOL_VERSION or kind != _RESPONSE or cluster != cluster_id:
                continue                              # another protocol version's answer cannot be read
            try:
                report = msgpack.unpackb(data[_HEADER.size :], raw=False)
            except Exception:
                continue                              # a malformed answer is ignored
            if isinstance(report, dict) and isinstance(report.get("address"), int):
                answers[report["address"]] = report
        return [answers[k] for k in sorted(answers)]
    finally:
        sockets.close()


_COLUMNS = (
    ("member", lambda r: f"{r.get('name')} ({r.get('address')})"),
    ("state", lambda r: r.get("state", "")),
    ("ring", lambda r: r.get("ring", "")),
    ("view", lambda r: ",".join(map(str, r.get("view", [])))),
    ("delivered", lambda r: r["stats"].get("messages_delivered", 0)),
    ("sent", lambda r: r["stats"].get("messages_sent", 0)),
    ("retransmits", lambda r: r["stats"].get("retransmissions", 0)),
    ("rotations/s", lambda r: r.get("rotations_per_s", 0)),
    ("dropped", lambda r: ", ".join(
        f"{k[5:]}={v}" for k, v in sorted(r["stats"].items()) if k.startswith("drop_") and v
    ) or "-"),
)


def format_table(reports: list[dict]) -> str:
    """A plain-text table, one row per member."""
    rows = [[name for name, _ in _COLUMNS]] + [[str(get(r)) for _, get in _COLUMNS] for r in reports]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
