"""The physical baseline: raw UDP datagrams/s between two Python processes, no protocol.

    python benchmarks/rawudp.py --size 100 [--seconds 2]       # on loopback

``raw_udp_rate(size, seconds, sender=..., receiver=...)`` runs a receiver
process and a sender process, each optionally under a command prefix such as
``ip netns exec NS`` (so the baseline runs between the same namespaces as the
members), and returns the datagrams/s the receiver got.  The sender is written
like ours (a Python loop of ``sendto``); there is no ordering, acknowledgement
or retransmission: this is the ceiling of one Python process per host.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field


@dataclass
class Endpoint:
    """Where a process of the baseline runs: a command prefix and the address it binds."""

    address: str = "127.0.0.1"
    prefix: list[str] = field(default_factory=list)


def receive(bind: str, seconds: float) -> dict:
    """Count datagrams for ``seconds`` after the first one (or until 0.5 s of silence)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
        sock.bind((bind, 0))
        sock.settimeout(5.0)                       # the sender's start-up
        print(sock.getsockname()[1], flush=True)
        received, first, last = 0, 0.0, 0.0
        while True:
            try:
                sock.recv(65536)
            except TimeoutError:
                break
            now = time.perf_counter()
            if not received:
                first = now
                sock.settimeout(0.5)
            last = now
            received += 1
            if now - first > seconds:
                break
    return {"received": received, "seconds": last - first}


def send(target: str, port: int, size: int, seconds: float) -> dict:
    """Send ``size``-byte datagrams as fast as the loop goes for ``seconds`` (+0.3 s margin)."""
    payload = b"x" * size
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 << 20)
        end = time.perf_counter() + seconds + 0.3
        while time.perf_counter() < end:
            for _ in range(256):
                try:
                    sock.sendto(payload, (target, port))
                    sent += 1
                except OSError:               # ENOBUFS: a queue on the way is full
                    break
    return {"sent": sent}


def raw_udp_rate(size: int, seconds: float, *, sender: Endpoint | None = None,
                 receiver: Endpoint | None = None) -> float:
    """Datagrams/s of ``size`` bytes that ``sender`` gets to ``receiver`` (default: both on loopback)."""
    sender, receiver = sender or Endpoint(), receiver or Endpoint()
    script = [sys.executable, __file__]
    rx = subprocess.Popen(
        [*receiver.prefix, *script, "--receive", "--bind", receiver.address, "--seconds", str(seconds)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(rx.stdout.readline())
        subprocess.run(
            [*sender.prefix, *script, "--send", "--to", receiver.address, "--port", str(port),
             "--size", str(size), "--seconds", str(seconds)],
            check=True, capture_output=True, text=True, timeout=seconds + 30)
        out, err = rx.communicate(timeout=30)
        if rx.returncode != 0:
            raise RuntimeError(f"raw UDP receiver failed: {err[-2000:]}")
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()
    result = json.loads(out.strip().splitlines()[-1])
    return result["received"] / result["seconds"] if result["seconds"] else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--receive", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--send", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bind", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--to", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receive:
        print(json.dumps(receive(args.bind, args.seconds)), flush=True)
    elif args.send:
        print(json.dumps(send(args.to, args.port, args.size, args.seconds)), flush=True)
    else:
        print(f"{raw_udp_rate(args.size, args.seconds):,.0f} datagrams/s of {args.size} B on loopback")


if __name__ == "__main__":
    main()
