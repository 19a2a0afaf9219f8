"""Throughput and latency of real member processes, on loopback or on a LAN in network namespaces.

    python benchmarks/throughput.py --members 3 --size 100 --messages 200000 [--pump c] [--key PATH] [--json]
    python benchmarks/throughput.py --netns [...]    # members on a bridge over veth, MTU 1500, ring mtu 1400 (root)
    python benchmarks/throughput.py --key-compare [...]     # without, then with a key, and the ratio

Starts ``--members`` processes (this script with ``--worker``), each a
``groupcomm`` channel: on loopback multicast (TTL 0), or with ``--netns`` each
in its own network namespace on one bridge over veth pairs with MTU 1500
(``benchmarks/netlab.py``; what a user on an Ethernet LAN gets; TTL 1, the
ring's ``--mtu`` 1400 unless said).  Each run has three phases:

1. low load: every member sends ``--latency-samples`` messages of ``--size``
   bytes, one in flight at a time (the next one 2 ms after the previous one
   was delivered back); self-delivery latency p50/p99/p999 over the samples of
   every member;
2. full load: all members send ``--messages`` in all as fast as flow control
   allows while reading every delivery in Python (``receive_batch``; a running
   CRC32 of every payload in delivery order is the order check: every member
   must end with the same CRC and count).  Delivered messages/s per member, MB/s,
   CPU-seconds of the member processes (the C pump thread included) per
   million deliveries, datagrams originated per message and retransmissions, all
   over this phase only;
3. half load: every member sends at half the rate it measured in phase 2
   (paced in 1 ms bursts) for ``--half-load-seconds``; self-delivery latency
   p50/p99 under that load.

The raw-UDP baseline (``benchmarks/rawudp.py``: datagrams/s of the same size
from one Python process to another, between the first two members' hosts) is
measured in the same run unless ``--no-baseline``.  Ratios are against Corosync
udpu (``ANCHORS``).  ``--pump`` picks the socket driver: ``trio`` (Python) or
``c`` (the C socket pump).  ``--key`` seals every datagram with that cluster
key; ``--key-compare`` runs without a key and with a fresh one and prints both
and the ratio.  ``--json`` prints the summary as one JSON object too.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from netlab import Loopback, NetLab, available
from rawudp import Endpoint, raw_udp_rate
from workers import add_worker_arguments, free_port, percentile, run_if_worker

ANCHORS = {100: 87_000, 1024: 46_000}
"""Corosync 3.1.7 udpu, CPG agreed, 3 nodes in network namespaces (MTU 1500), measured side by side on this
machine (issue 14's table; an earlier, quieter measurement gave 140k / 66k)."""

COROSYNC_LATENCY_US = {"p50": 115, "p99": 170}
"""Corosync's self-delivery latency, one message in flight, same measurement as ANCHORS."""

CDF_QUANTILES = [i / 100 for i in range(100)] + [0.991 + i / 1000 for i in range(9)] + [0.9995, 1.0]
"""Where a run samples its latency distributions for the CDF plots (the tail more finely)."""


def ring_config(args):
    from groupcomm.core.ring import RingConfig

    return RingConfig(
        mtu=args.mtu, window_size=args.window, max_messages=args.max_messages,
        sort_queue_size=args.sort_queue, send_queue_max=args.send_queue, token_timeout=1.0,
        seqno_unchanged_const=args.seqno_unchanged,
    )


# ---------------------------------------------------------------------------------------------- the worker

class Inbox:
    """The channel's delivered batches, with the rest of a batch put back when a phase ends inside it."""

    def __init__(self, ch) -> None:
        self._ch = ch
        self._rest: list = []
        self._ring = ch.view.ring_id
        self.view_changes = 0

    def note_view(self, view) -> None:
        """Count views of another ring than the one the benchmark started in (the start's own
        views are still in the stream)."""
        if view.ring_id != self._ring:
            self.view_changes += 1

    async def batch(self) -> list:
        if self._rest:
            batch, self._rest = self._rest, []
            return batch
        batch = await self._ch.receive_batch()
        if not batch:
            raise SystemExit("the channel closed during the benchmark")
        return batch

    def put_back(self, events: list) -> None:
        self._rest = events + self._rest


def stamped(tag: bytes, pad: bytes) -> bytes:
    """A message that carries its send time (perf_counter_ns) after a one-byte tag."""
    return tag + struct.pack(">Q", time.perf_counter_ns()) + pad


async def send(ch, message: bytes) -> None:
    from groupcomm.errors import QueueFull

    try:
        ch.send_nowait(message)
    except QueueFull:
        await ch.send(message)           # waits for room: flow control


async def latency_phase(ch, inbox: Inbox, tag: bytes, pad: bytes, my_id, members: int, pace) -> list[float]:
    """Send stamped messages as ``pace`` says, then one end marker; read every delivery until every
    member's end marker.  Returns this member's self-delivery latencies in µs.

    ``pace(send_some, wait_own)``: ``send_some(n)`` sends ``n`` stamped messages (one call into
    the ring, :meth:`Channel.send_nowait_many`, waiting for room if the queue is full),
    ``wait_own()`` waits until every one sent so far was delivered here.
    """
    import trio

    from groupcomm.events import Message, View

    latencies: list[float] = []
    end = b"E" + tag
    sent = 0
    caught_up = trio.Event()

    async def reader() -> None:
        ends = 0
        while ends < members:
            batch = await inbox.batch()
            for j, ev in enumerate(batch):
                if type(ev) is Message:
                    p = ev.payload
                    if p[:1] == tag and ev.sender == my_id:
                        latencies.append((time.perf_counter_ns() - struct.unpack_from(">Q", p, 1)[0]) / 1000)
                        caught_up.set()
                    elif p == end:
                        ends += 1
                        if ends == members:
                            inbox.put_back(batch[j + 1:])
                            return
                elif isinstance(ev, View):
                    inbox.note_view(ev)

    async def send_some(n: int) -> None:
        nonlocal sent
        sent += n
        batch = [stamped(tag, pad) for _ in range(n)]
        taken = ch.send_nowait_many(batch)
        if taken < n:
            await ch.send_many(batch[taken:])    # waits for room: flow control

    async def wait_own() -> None:
        nonlocal caught_up
        while len(latencies) < sent:
            caught_up = trio.Event()
            await caught_up.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await pace(send_some, wait_own)
        await send(ch, end)
    return latencies


def one_in_flight(count: int, pause: float):
    """Pacing of the low-load phase: ``count`` messages, each sent once the previous one was
    delivered here and ``pause`` seconds have passed (never more than one in flight per member)."""
    import trio

    async def pace(send_some, wait_own) -> None:
        for _ in range(count):
            await send_some(1)
            await wait_own()
            await trio.sleep(pause)
    return pace


def at_rate(rate: float, seconds: float):
    """Pacing of the half-load phase: ``rate`` messages/s for ``seconds``, in bursts every 1 ms
    (a late wake-up sends what is due, so the mean rate holds)."""
    import trio

    async def pace(send_some, wait_own) -> None:
        total = max(1, int(rate * seconds))
        sent, start = 0, time.perf_counter()
        while sent < total:
            due = min(total, int((time.perf_counter() - start) * rate) + 1)
            if due > sent:
                await send_some(due - sent)          # a burst: what is due, in one call
                sent = due
            await trio.sleep(0.001)
    return pace


async def full_load_phase(ch, inbox: Inbox, args) -> dict:
    """Every member sends its share as fast as flow control allows; every delivery is read and
    CRC'd in order (the CRC of the joined payloads of a batch equals the CRC of each in turn)."""
    import trio

    from groupcomm.errors import QueueFull
    from groupcomm.events import Message, View

    per_member = args.messages // args.members
    total = per_member * args.members
    pad = b"x" * max(0, args.size - 10)
    state = {"delivered": 0, "crc": 0, "t_last": 0.0}

    async def reader() -> None:
        delivered, crc = 0, 0
        while delivered < total:
            batch = await inbox.batch()
            payloads = [ev.payload for ev in batch if type(ev) is Message]
            if delivered + len(payloads) >= total:        # the phase ends in this batch: keep what follows
                need, seen = total - delivered, 0
                for j, ev in enumerate(batch):
                    seen += type(ev) is Message
                    if seen == need:
                        inbox.put_back(batch[j + 1:])
                        batch = batch[:j + 1]
                        break
                payloads = payloads[:need]
            if len(payloads) != len(batch):
                for ev in batch:
                    if isinstance(ev, View):
                        inbox.note_view(ev)
            crc = zlib.crc32(b"".join(payloads), crc)
            delivered += len(payloads)
        state.update(delivered=delivered, crc=crc, t_last=time.perf_counter())

    before, cpu_before = ch.stats(), time.process_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        t_first = time.perf_counter()
        head = b"T" + bytes([args.index])
        if args.send_batch > 1:                  # Channel.send_nowait_many: one call into the ring per batch
            for start in range(0, per_member, args.send_batch):
                batch = [head + i.to_bytes(8, "big") + pad
                         for i in range(start, min(per_member, start + args.send_batch))]
                taken = ch.send_nowait_many(batch)
                if taken < len(batch):
                    await ch.send_many(batch[taken:])          # waits for room: flow control
                else:
                    await trio.lowlevel.checkpoint()
        else:
            send_nowait = ch.send_nowait
            for i in range(per_member):
                message = head + i.to_bytes(8, "big") + pad
                try:
                    send_nowait(message)
                except QueueFull:
                    await ch.send(message)
                if i % 64 == 0:
                    await trio.lowlevel.checkpoint()
    cpu = time.process_time() - cpu_before
    after = ch.stats()
    elapsed = state["t_last"] - t_first
    return {
        "delivered": state["delivered"], "seconds": elapsed, "msgs_per_s": state["delivered"] / elapsed,
        "mb_per_s": state["delivered"] * args.size / elapsed / 1e6, "order_crc": state["crc"], "sent": per_member,
        "retransmissions": after["retransmissions"] - before["retransmissions"],
        "datagrams": after["datagrams_originated"] - before["datagrams_originated"],
        "drops": after["transport_send_drops"] - before["transport_send_drops"], "cpu_s": cpu,
    }


async def worker(args) -> None:
    import trio

    from groupcomm.io.channel import open_channel
    from groupcomm.io.udp import UdpConfig

    udp = UdpConfig(bind_addr=args.bind, mcast_port=args.port, mcast_ttl=args.ttl, mcast_loop=bool(args.mcast_loop),
                    recv_buffer=32 << 20, send_buffer=32 << 20, pump=args.pump)
    result: dict = {"index": args.index}
    async with open_channel(cluster=args.cluster, name=f"w{args.index}", ring=ring_config(args), udp=udp,
                            key_file=args.key or None) as ch:
        while not (ch.view and len(ch.view.members) == args.members):
            await trio.sleep(0.01)
        inbox = Inbox(ch)
        my_id = ch.address
        pad = b"x" * max(0, args.size - 9)
        phase = "low load"
        # Stop a few seconds before the coordinator gives up, with what this member saw.
        with trio.move_on_after(max(5.0, args.timeout - 10)) as watchdog:
            low = await latency_phase(ch, inbox, b"L", pad, my_id, args.members,
                                      one_in_flight(args.latency_samples, 0.002))
            await trio.sleep(0.1)            # the others finish reading the low-load phase
            phase = "full load"
            result.update(await full_load_phase(ch, inbox, args))
            phase = "half load"
            half_rate = args.load_fraction * result["msgs_per_s"] / args.members
            t0 = time.perf_counter()
            half = await latency_phase(ch, inbox, b"H", pad, my_id, args.members,
                                       at_rate(half_rate, args.half_load_seconds))
        if watchdog.cancelled_caught:
            stats = ch.stats()
            result["error"] = (
                f"member {args.index} timed out in the {phase} phase; view {ch.view}, "
                f"{inbox.view_changes} view changes; ring counters: "
                + ", ".join(f"{k}={v}" for k, v in sorted(stats.items()) if v))
        else:
            result.update(
                latency_low=[round(x, 1) for x in low], latency_half=[round(x, 1) for x in half],
                half_load_sent_per_s=len(half) / (time.perf_counter() - t0), view_changes=inbox.view_changes,
            )
    print(json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------- the coordinator

class RunFailed(Exception):
    """A benchmark run did not complete (a worker failed or timed out); the message says where."""


def worker_arguments(args, cluster: str, port: int) -> list[str]:
    return [
        "--members", str(args.members), "--size", str(args.size), "--messages", str(args.messages),
        "--cluster", cluster, "--port", str(port), "--mtu", str(args.mtu), "--window", str(args.window),
        "--max-messages", str(args.max_messages), "--sort-queue", str(args.sort_queue),
        "--send-queue", str(args.send_queue), "--latency-samples", str(args.latency_samples),
        "--half-load-seconds", str(args.half_load_seconds), "--load-fraction", str(args.load_fraction),
        "--seqno-unchanged", str(args.seqno_unchanged), "--pump", args.pump, "--key", args.key,
        "--timeout", str(args.timeout), "--send-batch", str(args.send_batch),
    ]


def start_workers(lab, args) -> list[dict]:
    """One worker per host of ``lab`` (each under the host's command prefix, bound to its address);
    each prints one JSON object last.  Kills only the processes it started if any fails or runs
    past ``args.timeout``."""
    cluster, port = f"bench-{uuid.uuid4().hex[:8]}", free_port()
    ttl = "0" if isinstance(lab, Loopback) else "1"
    common = worker_arguments(args, cluster, port)
    with tempfile.TemporaryDirectory(prefix="groupcomm-bench-") as state:   # the members' state directories
        env = {**os.environ, "GROUPCOMM_STATE_DIR": state, "XDG_STATE_HOME": state}
        procs = [
            subprocess.Popen(
                [*lab.prefix(i), sys.executable, __file__, "--worker", "--index", str(i),
                 "--bind", lab.addresses[i], "--ttl", ttl,
                 *(["--mcast-loop", "0"] if ttl == "1" and not args.mcast_loop_in_netns else []), *common],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for i in range(args.members)
        ]
        results = []
        try:
            deadline = time.monotonic() + args.timeout
            for p in procs:
                out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
                if p.returncode != 0:
                    raise RunFailed(f"worker {len(results)} failed:\n{err[-3000:]}")
                results.append(json.loads(out.strip().splitlines()[-1]))
            errors = [r["error"] for r in results if "error" in r]
            if errors:
                raise RunFailed("\n".join(errors))
        except subprocess.TimeoutExpired:
            raise RunFailed(f"a worker ran past --timeout {args.timeout} s") from None
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    return results


def cdf(samples: list[float]) -> list[list[float]]:
    """[quantile, µs] pairs at CDF_QUANTILES (nearest rank)."""
    ordered = sorted(samples)
    if not ordered:
        return []
    last = len(ordered) - 1
    return [[q, ordered[min(last, round(q * last))]] for q in CDF_QUANTILES]


def summarize(args, transport: str, results: list[dict]) -> dict:
    """One run's figures from its workers' reports (medians over members unless said otherwise)."""
    low = [x for r in results for x in r["latency_low"]]
    half = [x for r in results for x in r["latency_half"]]
    rate = statistics.median(r["msgs_per_s"] for r in results)
    messages = sum(r["sent"] for r in results)
    summary = {
        "transport": transport, "mtu": args.mtu, "pump": args.pump, "key": bool(args.key), "send_batch": args.send_batch,
        "members": args.members, "size": args.size, "messages": messages,
        "msgs_per_s_per_member": round(rate),
        "mb_per_s_per_member": round(statistics.median(r["mb_per_s"] for r in results), 1),
        # pooled over every member's samples
        "latency_us_p50": round(percentile(low, 50), 1),
        "latency_us_p99": round(percentile(low, 99), 1),
        "latency_us_p999": round(percentile(low, 99.9), 1),
        "latency_samples": len(low),
        "half_load_latency_us_p50": round(percentile(half, 50), 1),
        "half_load_latency_us_p99": round(percentile(half, 99), 1),
        "half_load_msgs_per_s_per_member": round(sum(r["half_load_sent_per_s"] for r in results)),
        "load_fraction": args.load_fraction,
        "order_identical": len({r["order_crc"] for r in results}) == 1 and len({r["delivered"] for r in results}) == 1,
        "view_changes": sum(r["view_changes"] for r in results),
        "retransmissions": sum(r["retransmissions"] for r in results),
        "datagrams_per_message": round(sum(r["datagrams"] for r in results) / max(1, messages), 3),
        "cpu_s_per_million_deliveries": round(
            sum(r["cpu_s"] for r in results) / max(1, sum(r["delivered"] for r in results)) * 1e6, 2),
        "latency_cdf_low": cdf(low), "latency_cdf_half": cdf(half),
    }
    anchor = ANCHORS.get(args.size)
    if anchor:
        summary["ratio_to_corosync_udpu"] = round(rate / anchor, 2)
    return summary


def baseline(args, lab) -> float:
    """Raw UDP datagrams/s of ``args.size`` bytes from the first member's host to the second's."""
    sender = Endpoint(lab.addresses[0], lab.prefix(0))
    receiver = Endpoint(lab.addresses[min(1, len(lab.addresses) - 1)], lab.prefix(min(1, len(lab.hosts) - 1)))
    return raw_udp_rate(args.size, args.baseline_seconds, sender=sender, receiver=receiver)


def run(args, lab=None) -> dict:
    """One benchmark run: in ``lab`` if given, else on loopback or (``args.netns``) in a fresh NetLab."""
    if lab is None:
        if args.netns:
            reason = available()
            if reason:
                raise SystemExit(f"--netns: {reason}")
            with NetLab(args.members) as fresh:
                return run(args, fresh)
        return run(args, Loopback(args.members))
    transport = "loopback" if isinstance(lab, Loopback) else "netns"
    load = os.getloadavg()[0]
    summary = summarize(args, transport, start_workers(lab, args))
    if args.baseline:
        summary["raw_udp_datagrams_per_s"] = round(baseline(args, lab))
    summary["load_average_1min"] = round(load, 2)
    summary["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return summary


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--size", type=int, default=100)
    p.add_argument("--messages", type=int, default=200_000)
    p.add_argument("--mtu", type=int, default=None, help="the ring's datagram size (default 65000 on loopback, "
                   "which takes 64 KiB, and 1400 with --netns: it fits an Ethernet MTU of 1500)")
    p.add_argument("--netns", action="store_true",
                   help="members in network namespaces on a bridge over veth pairs with MTU 1500 (needs root)")
    p.add_argument("--window", type=int, default=50)
    p.add_argument("--max-messages", type=int, default=17)
    p.add_argument("--sort-queue", type=int, default=4096)
    p.add_argument("--send-queue", type=int, default=20000)
    p.add_argument("--send-batch", type=int, default=64,
                   help="messages per Channel.send_nowait_many call at full load (1: send_nowait per message)")
    p.add_argument("--latency-samples", type=int, default=1000,
                   help="low-load messages per member (one in flight, 2 ms apart)")
    p.add_argument("--load-fraction", type=float, default=0.5,
                   help="the 'half load' phase's rate as a fraction of the measured peak (the figures say 50 %%)")
    p.add_argument("--half-load-seconds", type=float, default=2.0,
                   help="length of the phase at half the measured peak rate")
    p.add_argument("--seqno-unchanged", type=int, default=30,
                   help="idle token rotations before the token is held (TOTEM seqno_unchanged_const)")
    p.add_argument("--pump", choices=("trio", "c"), default="trio",
                   help="socket driver: trio (Python) or c (the C socket pump thread)")
    p.add_argument("--key", default="", metavar="PATH", help="cluster key file: seal every datagram")
    p.add_argument("--key-compare", action="store_true",
                   help="run without a key, then with a fresh key; print both and the ratio")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="measure raw UDP datagrams/s of the same size between the first two hosts in the same run")
    p.add_argument("--baseline-seconds", type=float, default=2.0)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--json", action="store_true")
    p.add_argument("--bind", default="127.0.0.1", help=argparse.SUPPRESS)
    p.add_argument("--ttl", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--mcast-loop", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--mcast-loop-in-netns", action="store_true",
                   help="keep IP multicast loop on in netns mode (off by default there: one member per host)")
    add_worker_arguments(p)
    return p


def stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the namespaces and the workers are cleaned up."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)


def main() -> None:
    args = parser().parse_args()
    if args.mtu is None:
        args.mtu = 1400 if args.netns else 65000
    if run_if_worker(args, worker):
        return
    stop_on_sigterm()
    try:
        if args.key_compare:
            key_compare(args)
        else:
            report(run(args), args)
    except RunFailed as exc:
        raise SystemExit(f"run failed: {exc}") from None


def key_compare(args) -> None:
    """Run without a key, then with a fresh one; print both and the ratio."""
    from groupcomm.config.keys import new_key_file, write_key_file

    with tempfile.TemporaryDirectory() as tmp:
        args.key = ""
        plain = report(run(args), args)
        args.key = f"{tmp}/cluster.key"
        write_key_file(args.key, new_key_file())
        keyed = report(run(args), args)
    print(f"with a key / without: throughput {keyed['msgs_per_s_per_member'] / plain['msgs_per_s_per_member']:.2f}x, "
          f"latency p50 {keyed['latency_us_p50'] / plain['latency_us_p50']:.2f}x")


def describe(s: dict) -> str:
    """One run's figures as one line."""
    return (
        f"[{s['transport']} mtu {s['mtu']}, {s['pump']}{', key' if s['key'] else ''}] "
        f"{s['members']} members, {s['size']} B, {s['messages']} messages: "
        f"{s['msgs_per_s_per_member']:,} msgs/s per member ({s['mb_per_s_per_member']} MB/s)"
        + (f", {s['ratio_to_corosync_udpu']}x Corosync udpu" if "ratio_to_corosync_udpu" in s else "")
        + f"; latency at low load p50 {s['latency_us_p50']} p99 {s['latency_us_p99']} p999 {s['latency_us_p999']} µs"
        f", at {s['load_fraction']:.0%} load ({s['half_load_msgs_per_s_per_member']:,} msgs/s) "
        f"p50 {s['half_load_latency_us_p50']} p99 {s['half_load_latency_us_p99']} µs"
        f"; {s['cpu_s_per_million_deliveries']} CPU-s per million deliveries, "
        f"{s['datagrams_per_message']} datagrams/message, {s['retransmissions']} retransmissions, "
        f"order identical: {s['order_identical']}"
        + (f", {s['view_changes']} view changes" if s["view_changes"] else "")
        + (f"; raw UDP {s['raw_udp_datagrams_per_s']:,} datagrams/s" if "raw_udp_datagrams_per_s" in s else "")
    )


def report(s: dict, args) -> dict:
    print(describe(s), flush=True)
    if args.json:
        print(json.dumps(s), flush=True)
    return s


if __name__ == "__main__":
    main()
