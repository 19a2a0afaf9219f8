"""`groupcomm probe`: ask the running members of a cluster for their view and counters.

A request is multicast to the cluster's group; each member answers by unicast
with a msgpack report.  Requests and answers carry the cluster id, so probes of
other clusters on the same group are ignored.  With a cluster key both are
sealed and a member answers nothing else; without one, an answer is never
larger than the request (see :data:`PROBE_REQUEST_SIZE`).  Either way, do not
expose the group's port to networks you do not trust.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from typing import Any

import msgpack

from groupcomm.config.keys import read_key_file
from groupcomm.core.seal import Seal
from groupcomm.io.udp import UdpConfig, open_sockets
from groupcomm.layers.wire import decode_probe_report
from groupcomm.layers.wire import PROBE_HEADER, PROBE_MAGIC, PROBE_REQUEST, PROBE_RESPONSE, PROTOCOL_VERSION

__all__ = ["MAGIC", "PROBE_REQUEST_SIZE", "probe", "probe_seal", "format_table", "is_probe_request", "probe_request", "probe_response"]

# The layout (groupcomm.layers.wire.PROBE_HEADER) and kinds live in the wire module.
MAGIC = PROBE_MAGIC
_HEADER = PROBE_HEADER
_REQUEST, _RESPONSE = PROBE_REQUEST, PROBE_RESPONSE
_MAX_REPORT = 60000


PROBE_REQUEST_SIZE = 32 * 1024
"""An unsealed request is padded to this size: without a key a member never answers with
more bytes than the request carried, so a probe cannot amplify traffic toward a forged source."""


def probe_request(cluster_id: int, *, pad_to: int = 0) -> bytes:
    """A probe request, padded with zeros to ``pad_to`` bytes."""
    head = _HEADER.pack(MAGIC, PROTOCOL_VERSION, _REQUEST, cluster_id)
    return head + bytes(max(0, pad_to - len(head)))


def is_probe_request(data: bytes, cluster_id: int) -> bool:
    """Whether ``data`` is a probe request of this protocol version for ``cluster_id``."""
    if len(data) < _HEADER.size:
        return False
    magic, version, kind, cluster = _HEADER.unpack_from(data)
    return magic == MAGIC and version == PROTOCOL_VERSION and kind == _REQUEST and cluster == cluster_id


_SHORT_REPORT = ("name", "address", "state", "view", "ring")


def probe_response(cluster_id: int, report: dict, limit: int = _HEADER.size + _MAX_REPORT) -> bytes:
    """The answer to a probe, at most ``limit`` bytes: the whole report if it fits,
    else its first fields (name, address, state, view, ring), else the header alone."""
    head = _HEADER.pack(MAGIC, PROTOCOL_VERSION, _RESPONSE, cluster_id)
    for fields in (report, {k: report[k] for k in _SHORT_REPORT if k in report}):
        body = msgpack.packb(fields, use_bin_type=True)
        if len(head) + len(body) <= min(limit, _HEADER.size + _MAX_REPORT):
            return head + body
    return head


def probe_seal(cluster_id: int, key_file: str | os.PathLike) -> Seal:
    """A seal for one probe of a keyed cluster: a random sender id, an incarnation from the clock."""
    return Seal(cluster_id, secrets.randbelow((1 << 32) - 1) + 1, time.time_ns() // 1000, read_key_file(key_file))


def probe(cluster_id: int, udp: UdpConfig, timeout: float = 1.0, *, seal: Seal | None = None) -> list[dict[str, Any]]:
    """Multicast a probe and collect the answers that arrive within ``timeout`` seconds.

    With ``seal`` (the cluster key) the request and the answers are sealed;
    without, the request is padded to :data:`PROBE_REQUEST_SIZE` bytes.
    """
    sockets = open_sockets(UdpConfig(**{**udp.__dict__, "port": 0}))
    try:
        sock = sockets.unicast
        if seal is not None:
            request = seal.seal(probe_request(cluster_id))
        else:
            request = probe_request(cluster_id, pad_to=PROBE_REQUEST_SIZE)
        sock.sendto(request, sockets.group)
        answers: dict[int, dict] = {}
        deadline = time.monotonic() + timeout
        sock.setblocking(True)
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, _ = sock.recvfrom(65536)
            except (socket.timeout, BlockingIOError):
                break
            if seal is not None:
                opened = seal.open(data)
                if type(opened) is int:
                    continue                          # not sealed with our key: not an answer
                data = opened
            if len(data) <= _HEADER.size or data[:2] != MAGIC:
                continue
            _, version, kind, cluster = _HEADER.unpack_from(data)
            if version != PROTOCOL_VERSION or kind != _RESPONSE or cluster != cluster_id:
                continue                              # another protocol version's answer cannot be read
            report = decode_probe_report(data[_HEADER.size :])
            if report is not None:                    # an answer that does not fit the schema is ignored
                answers[report["address"]] = report
        return [answers[k] for k in sorted(answers)]
    finally:
        sockets.close()


_COLUMNS = (
    ("member", lambda r: f"{r.get('name')} ({r.get('address')})"),
    ("state", lambda r: r.get("state", "")),
    ("ring", lambda r: r.get("ring", "")),
    ("view", lambda r: ",".join(map(str, r.get("view", [])))),
    ("delivered", lambda r: r.get("stats", {}).get("messages_delivered", 0)),
    ("sent", lambda r: r.get("stats", {}).get("messages_sent", 0)),
    ("retransmits", lambda r: r.get("stats", {}).get("retransmissions", 0)),
    ("rotations/s", lambda r: r.get("rotations_per_s", 0)),
    ("dropped", lambda r: ", ".join(
        f"{k[5:]}={v}" for k, v in sorted(r.get("stats", {}).items()) if k.startswith("drop_") and v
    ) or "-"),
)


def format_table(reports: list[dict]) -> str:
    """A plain-text table, one row per member."""
    rows = [[name for name, _ in _COLUMNS]] + [[str(get(r)) for _, get in _COLUMNS] for r in reports]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
