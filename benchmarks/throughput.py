"""Throughput and latency of real member processes on loopback.

    python benchmarks/throughput.py --members 3 --size 100 --messages 200000 [--pump c] [--key PATH] [--json]
    python benchmarks/throughput.py --key-compare [...]     # without, then with a key, and the ratio

Starts ``--members`` processes (this script with ``--worker``), each a
``groupcomm`` channel on loopback multicast (TTL 0).  All of them send
``messages / members`` messages as fast as flow control allows while reading
every delivery in Python.  Prints delivered messages/s per member, MB/s,
self-delivery latency p50/p99 at low load (one message every 2 ms per member),
and whether every member saw the same order (a running CRC of every delivery).
``--pump`` picks the socket driver: ``trio`` (Python) or ``c`` (the C socket pump).
``--key`` seals every datagram with that cluster key; ``--key-compare`` runs the
same benchmark without a key and with a fresh one and prints both and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import sys
import time
import uuid
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from workers import add_worker_arguments, free_port, run_if_worker, run_workers

ANCHORS = {100: 87_000, 1024: 46_000}
"""Corosync 3.1.7 udpu, CPG agreed, 3 nodes in network namespaces (MTU 1500), measured side by side on this
machine (issue 14's table; an earlier, quieter measurement gave 140k / 66k)."""


def ring_config(args):
    from groupcomm.core.ring import RingConfig

    return RingConfig(
        mtu=args.mtu, window_size=args.window, max_messages=args.max_messages,
        sort_queue_size=args.sort_queue, send_queue_max=args.send_queue, token_timeout=1.0,
        seqno_unchanged_const=args.seqno_unchanged,
    )


async def worker(args) -> None:
    import trio

    from groupcomm.errors import QueueFull
    from groupcomm.events import Message
    from groupcomm.io.channel import open_channel
    from groupcomm.io.udp import UdpConfig

    udp = UdpConfig(mcast_port=args.port, mcast_ttl=0, recv_buffer=32 << 20, send_buffer=32 << 20, pump=args.pump)
    me = args.index
    per_member = args.messages // args.members
    total = per_member * args.members
    result: dict = {"index": me}
    async with open_channel(cluster=args.cluster, name=f"w{me}", ring=ring_config(args), udp=udp,
                            key_file=args.key) as ch:
        events = ch.events()
        while not (ch.view and len(ch.view.members) == args.members):
            await trio.sleep(0.01)
        my_id = ch.address

        # Low load: self-delivery latency.
        latencies = []
        lat_seen = 0

        async def latency_reader():
            nonlocal lat_seen
            async for ev in events:
                if type(ev) is Message and ev.payload[:1] == b"L":
                    lat_seen += 1
                    if ev.sender == my_id:
                        sent = struct.unpack_from(">Q", ev.payload, 1)[0]
                        latencies.append((time.perf_counter_ns() - sent) / 1000)
                    if lat_seen == args.latency_samples * args.members:
                        return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(latency_reader)
            for _ in range(args.latency_samples):
                await ch.send(b"L" + struct.pack(">Q", time.perf_counter_ns()))
                await trio.sleep(0.002)
        latencies.sort()
        result["latency_us_p50"] = latencies[len(latencies) // 2]
        result["latency_us_p99"] = latencies[int(len(latencies) * 0.99) - 1]

        # Full load.
        pad = b"x" * max(0, args.size - 10)
        delivered = 0
        crc = 0
        t_first = t_last = 0.0

        async def reader():
            nonlocal delivered, crc, t_last
            async for ev in events:
                if type(ev) is Message and ev.payload[:1] == b"T":
                    crc = zlib.crc32(ev.payload, crc)
                    delivered += 1
                    if delivered == total:
                        t_last = time.perf_counter()
                        return

        await trio.sleep(0.3)            # every member finished the latency phase
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            t_first = time.perf_counter()
            head = b"T" + bytes([me])
            send_nowait = ch.send_nowait
            for i in range(per_member):
                message = head + i.to_bytes(8, "big") + pad
                try:
                    send_nowait(message)
                except QueueFull:
                    await ch.send(message)         # waits for room: flow control
                if i % 64 == 0:
                    await trio.lowlevel.checkpoint()
        elapsed = t_last - t_first
        stats = ch.stats()
        result.update(
            delivered=delivered, seconds=elapsed, msgs_per_s=delivered / elapsed,
            mb_per_s=delivered * args.size / elapsed / 1e6, order_crc=crc,
            retransmissions=stats["retransmissions"], datagrams=stats["datagrams_originated"],
            tokens=stats["tokens_received"], drops=stats["transport_send_drops"],
            cpu_s=time.process_time(),
        )
    print(json.dumps(result), flush=True)


def run(args) -> dict:
    cluster, port = f"bench-{uuid.uuid4().hex[:8]}", free_port()
    common = [
        "--members", str(args.members), "--size", str(args.size), "--messages", str(args.messages),
        "--cluster", cluster, "--port", str(port), "--mtu", str(args.mtu), "--window", str(args.window),
        "--max-messages", str(args.max_messages), "--sort-queue", str(args.sort_queue),
        "--send-queue", str(args.send_queue), "--latency-samples", str(args.latency_samples),
        "--seqno-unchanged", str(args.seqno_unchanged), "--pump", args.pump, "--key", args.key,
    ]
    results = run_workers(__file__, args.members, common, args.timeout)
    rate = statistics.median(r["msgs_per_s"] for r in results)
    summary = {
        "pump": args.pump, "key": bool(args.key), "members": args.members, "size": args.size, "messages": args.messages,
        "msgs_per_s_per_member": round(rate),
        "mb_per_s_per_member": round(statistics.median(r["mb_per_s"] for r in results), 1),
        "latency_us_p50": round(statistics.median(r["latency_us_p50"] for r in results), 1),
        "latency_us_p99": round(max(r["latency_us_p99"] for r in results), 1),
        "order_identical": len({r["order_crc"] for r in results}) == 1 and len({r["delivered"] for r in results}) == 1,
        "retransmissions": sum(r["retransmissions"] for r in results),
        "msgs_per_datagram": round(args.messages / max(1, sum(r["datagrams"] for r in results)), 1),
        # the workers' whole CPU time (start-up and the latency phase included) per million deliveries
        "cpu_s_per_million_deliveries": round(
            sum(r["cpu_s"] for r in results) / max(1, sum(r["delivered"] for r in results)) * 1e6, 2),
    }
    if args.baseline:
        summary["raw_udp_datagrams_per_s"] = round(raw_udp_rate(args.size, 2.0))
    anchor = ANCHORS.get(args.size)
    if anchor:
        summary["ratio_to_corosync_udpu"] = round(rate / anchor, 2)
    return summary


def _raw_receiver(port_queue, counts, seconds: float) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.5)
        port_queue.put(sock.getsockname()[1])
        received, first, last = 0, None, None
        while True:
            try:
                sock.recv(65536)
            except TimeoutError:
                break
            now = time.perf_counter()
            first = first or now
            last = now
            received += 1
            if now - first > seconds:
                break
        counts.put((received, (last - first) if first and last else 0.0))


def raw_udp_rate(size: int, seconds: float) -> float:
    """Datagrams/s of ``size`` bytes one Python process sends another on loopback (the physical
    baseline of this machine for a sender written like ours; no ordering, no acknowledgement)."""
    import multiprocessing
    import socket

    context = multiprocessing.get_context("spawn")
    port_queue, counts = context.Queue(), context.Queue()
    receiver = context.Process(target=_raw_receiver, args=(port_queue, counts, seconds))
    receiver.start()
    try:
        port = port_queue.get(timeout=30)
        payload = b"x" * size
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            end = time.perf_counter() + seconds + 0.3
            while time.perf_counter() < end:
                for _ in range(256):
                    try:
                        sock.sendto(payload, ("127.0.0.1", port))
                    except OSError:          # ENOBUFS: the receiver's queue is full
                        break
        received, elapsed = counts.get(timeout=30)
    finally:
        receiver.join(timeout=10)
        if receiver.is_alive():
            receiver.kill()
    return received / elapsed if elapsed else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--mtu", type=int, default=65000, help="datagram size (loopback takes 64 KiB)")
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--max-messages", type=int, default=17)
    parser.add_argument("--sort-queue", type=int, default=4096)
    parser.add_argument("--send-queue", type=int, default=20000)
    parser.add_argument("--latency-samples", type=int, default=300)
    parser.add_argument("--seqno-unchanged", type=int, default=30,
                        help="idle token rotations before the token is held (TOTEM seqno_unchanged_const)")
    parser.add_argument("--pump", choices=("trio", "c"), default="trio",
                        help="socket driver: trio (Python) or c (the C socket pump thread)")
    parser.add_argument("--key", default="", metavar="PATH", help="cluster key file: seal every datagram")
    parser.add_argument("--key-compare", action="store_true",
                        help="run without a key, then with a fresh key; print both and the ratio")
    parser.add_argument("--baseline", action="store_true",
                        help="also measure raw UDP datagrams/s of the same size between two processes on loopback")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--json", action="store_true")
    add_worker_arguments(parser)
    args = parser.parse_args()
    if run_if_worker(args, worker):
        return
    if args.key_compare:
        import tempfile

        from groupcomm.config.keys import new_key_file, write_key_file

        with tempfile.TemporaryDirectory() as tmp:
            args.key = ""
            plain = report(run(args), args)
            args.key = f"{tmp}/cluster.key"
            write_key_file(args.key, new_key_file())
            keyed = report(run(args), args)
        print(f"with a key / without: throughput {keyed['msgs_per_s_per_member'] / plain['msgs_per_s_per_member']:.2f}x, "
              f"latency p50 {keyed['latency_us_p50'] / plain['latency_us_p50']:.2f}x")
        return
    report(run(args), args)


def report(s: dict, args) -> dict:
    print(
        f"[{s['pump']}{', key' if s['key'] else ''}] {s['members']} members, {s['size']} B, {s['messages']} messages: "
        f"{s['msgs_per_s_per_member']:,} msgs/s per member ({s['mb_per_s_per_member']} MB/s), "
        f"self-delivery latency p50 {s['latency_us_p50']} µs p99 {s['latency_us_p99']} µs at low load, "
        f"order identical: {s['order_identical']}, {s['msgs_per_datagram']} msgs/datagram, "
        f"{s['retransmissions']} retransmissions"
        + (f", {s['ratio_to_corosync_udpu']}x Corosync udpu" if "ratio_to_corosync_udpu" in s else "")
        + f", {s['cpu_s_per_million_deliveries']} CPU-s per million deliveries"
        + (f"; raw UDP {s['raw_udp_datagrams_per_s']:,} datagrams/s" if "raw_udp_datagrams_per_s" in s else "")
    )
    if args.json:
        print(json.dumps(s))
    return s


if __name__ == "__main__":
    main()
