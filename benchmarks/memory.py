"""Peak memory (RSS) of real member processes on loopback under the three loads issue 9 names.

    python benchmarks/memory.py [--seconds 10] [--only slow|flood|big] [--json]

Each scenario starts its own member processes (this script with ``--worker``)
on the ``loopback`` stack (127.0.0.1, multicast TTL 0, 64000-byte datagrams)
and prints, per member, its peak RSS, its RSS once it had joined, and the
growth between the two, next to the documented limit that should bound it:

``slow``   a consumer that never reads while another member sends 60 kB
           messages: it should leave the group (DeliveryOverflow) once about
           ``max_pending_bytes`` (CHANNEL, 128 MiB) is queued for it; the
           sender, then alone in its ring, orders its send queue
           (``send_queue_bytes``, TOTEM, 64 MiB) ``max_messages`` ring
           messages per step, and keeps at most ``retransmit_bytes`` (TOTEM,
           32 MiB) for retransmission;
``flood``  ``send_nowait`` of 256 KiB messages in a loop (``await send`` when
           it raises QueueFull): the sender's queue should stop at
           ``send_queue_bytes`` (TOTEM, 64 MiB);
``big``    two members each send one 64 MiB message at the same moment, a
           third only receives: each receiver reassembles at most
           ``partial_bytes`` (FRAG, 64 MiB) per sender, and a whole message
           is joined once (the joined copy is the application's).

Every scenario stops after ``--seconds`` (or when its work is done).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from workers import add_worker_arguments, free_port, run_if_worker, run_workers  # noqa: E402

MiB = 1 << 20
SCENARIOS = {
    # name: (members, limit text for the report)
    "slow": (2, ("CHANNEL max_pending_bytes = 128 MiB queued for the slow consumer, "
                 "TOTEM send_queue_bytes = 64 MiB + retransmit_bytes = 32 MiB at the sender")),
    "flood": (2, "TOTEM send_queue_bytes = 64 MiB queued at the sender"),
    "big": (3, "FRAG partial_bytes = 64 MiB per sender being reassembled (2 senders), plus the joined messages; "
               "CHANNEL max_pending_bytes = 128 MiB + the largest message"),
}


def rss_peak_mib() -> float:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def drain(ch, until: float, counts: dict) -> None:
    """Read this member's events until ``until`` (monotonic), counting messages and views."""
    import trio

    from groupcomm.errors import DeliveryOverflow
    from groupcomm.events import Message, View

    try:
        with trio.move_on_at(until):
            async for event in ch.events():
                if type(event) is Message:
                    counts["messages"] = counts.get("messages", 0) + 1
                    counts["bytes"] = counts.get("bytes", 0) + len(event.payload)
                elif type(event) is View and not event.transitional:
                    counts["views"] = counts.get("views", 0) + 1
    except DeliveryOverflow:
        counts["overflow"] = True


async def slow(ch, args, deadline: float) -> dict:
    import trio

    counts: dict = {}
    if args.index == 0:                               # never reads until it is out of the group
        queued = 0
        while not ch.overflowed and trio.current_time() < deadline:
            queued = max(queued, ch.stats()["pending_bytes"])
            await trio.sleep(0.02)
        await drain(ch, trio.current_time() + 2, counts)
        return {"role": "slow consumer", "peak_rss_mib": rss_peak_mib(), "left_group": bool(counts.get("overflow")),
                "most_queued_mib": round(queued / MiB, 1)}
    payload = bytes(60_000)
    sent = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain, ch, deadline, counts)
        while trio.current_time() < deadline and len(ch.view.members) == args.members:
            await ch.send(payload)
            sent += 1
        alone_at = rss_peak_mib()
        # Alone in its ring now, with a full send queue: it orders the queue and reads
        # its own messages for two seconds, as an application that goes on would.
        await trio.sleep(2)
        peak = rss_peak_mib()
        nursery.cancel_scope.cancel()
    return {"role": "sender of 60 kB messages", "peak_rss_mib": peak, "sent": sent,
            "peak_until_alone_mib": round(alone_at, 1), "read_mib": round(counts.get("bytes", 0) / MiB, 1)}


async def flood(ch, args, deadline: float) -> dict:
    import trio

    from groupcomm.errors import QueueFull

    counts: dict = {}
    if args.index != 0:
        await drain(ch, deadline, counts)
        return {"role": "receiver", "peak_rss_mib": rss_peak_mib(),
                "received_mib": round(counts.get("bytes", 0) / MiB, 1)}
    first_burst, queued, sent = None, 0, 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain, ch, deadline, counts)
        while trio.current_time() < deadline:
            payload = sent.to_bytes(8, "big") * (32 << 10)          # 256 KiB, a new object each time
            try:
                ch.send_nowait(payload)
            except QueueFull:
                if first_burst is None:
                    first_burst = sent
                queued = max(queued, ch.stats()["send_queue_bytes"])
                await ch.send(payload)
            sent += 1
            if sent % 16 == 0:
                await trio.lowlevel.checkpoint()
        peak = rss_peak_mib()
        nursery.cancel_scope.cancel()
    return {"role": "send_nowait flood of 256 KiB", "peak_rss_mib": peak, "taken_before_first_queue_full": first_burst,
            "sent": sent, "most_queued_mib": round(queued / MiB, 1)}


async def big(ch, args, deadline: float) -> dict:
    import trio

    counts: dict = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain, ch, deadline, counts)
        if args.index < 2:
            await ch.send(bytes([args.index]) * (64 * MiB))
        while trio.current_time() < deadline and counts.get("messages", 0) < 2:
            await trio.sleep(0.05)
        peak = rss_peak_mib()
        nursery.cancel_scope.cancel()
    stats = ch.stats()
    return {"role": "sender and receiver" if args.index < 2 else "receiver", "peak_rss_mib": peak,
            "received_messages": counts.get("messages", 0), "views_during": max(0, counts.get("views", 1) - 1),
            "left_group": bool(counts.get("overflow")),
            **{k: stats[k] for k in ("suspicions", "token_losses", "pauses_detected")}}


async def worker(args) -> None:
    import trio

    from groupcomm.io.channel import open_channel

    run = {"slow": slow, "flood": flood, "big": big}[args.scenario]
    overrides = {"UDP": {"mcast_port": args.port}, "TOTEM": {"sort_queue_size": args.sort_queue}}
    async with open_channel("loopback", cluster=args.cluster, name=f"m{args.index}", overrides=overrides) as ch:
        with trio.fail_after(30):
            while not (ch.view and len(ch.view.members) == args.members):
                await trio.sleep(0.01)
        await trio.sleep(0.5)                         # everyone has the full view before the load starts
        joined = rss_peak_mib()
        result = await run(ch, args, trio.current_time() + args.seconds)
    result.update(index=args.index, joined_rss_mib=round(joined, 1), exit_rss_mib=round(rss_peak_mib(), 1))
    print(json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="load time per scenario")
    parser.add_argument("--only", choices=tuple(SCENARIOS), help="run one scenario")
    parser.add_argument("--sort-queue", type=int, default=4096,
                        help="TOTEM sort_queue_size: sequence numbers in flight (retransmit_bytes bounds their bytes)")
    parser.add_argument("--scenario", choices=tuple(SCENARIOS), help=argparse.SUPPRESS)
    parser.add_argument("--members", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    add_worker_arguments(parser)
    args = parser.parse_args()
    if run_if_worker(args, worker):
        return
    report = {}
    for name, (members, limit) in SCENARIOS.items():
        if args.only and name != args.only:
            continue
        common = ["--scenario", name, "--members", str(members), "--seconds", str(args.seconds),
                  "--sort-queue", str(args.sort_queue),
                  "--cluster", f"mem-{uuid.uuid4().hex[:8]}", "--port", str(free_port())]
        started = time.monotonic()
        results = run_workers(__file__, members, common, timeout=args.seconds + 90)
        report[name] = results
        print(f"{name}: {limit}  ({time.monotonic() - started:.0f} s)")
        for r in sorted(results, key=lambda r: r["index"]):
            growth = r["peak_rss_mib"] - r["joined_rss_mib"]
            details = {k: v for k, v in r.items()
                       if k not in ("index", "role", "joined_rss_mib", "peak_rss_mib", "exit_rss_mib")}
            print(f"  member {r['index']} ({r['role']}): peak RSS {r['peak_rss_mib']:.0f} MiB under load, "
                  f"{growth:+.0f} MiB since it joined ({r['joined_rss_mib']:.0f} MiB); "
                  f"{r['exit_rss_mib']:.0f} MiB by its exit  {details}")
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
