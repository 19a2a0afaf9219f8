"""A large message shares the ring: real member processes on the loopback stack.

    python benchmarks/large_messages.py [--members 3] [--size 64MiB] [--large-senders 1] [--pump c] [--json]

Member 0 (and with ``--large-senders 2`` member 2 at the same time) multicasts one
message of ``--size`` bytes; member 1 multicasts a small
timestamped message every ``--interval`` seconds all along (first without the large
message, as a baseline, then during its transfer).  Prints the transfer time (send
to delivery at the slowest member), the view changes every member saw after the
first full view (must be 0), whether every member got the message intact (hash),
and the p50/p99 latency of the small messages (send to delivery, all members)
during the transfer and in the baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from workers import add_worker_arguments, free_port, run_if_worker, run_workers

_SMALL = struct.Struct("!4sId")          # b"tick", seq, send time (CLOCK_MONOTONIC, one host)
_BIG = b"BIG!"                           # the large message starts so
_END = b"end!"


def _digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def big_payload(size: int, sender: int) -> bytes:
    """A large message whose bytes vary (a cut or reordered fragment changes the hash)."""
    block = hashlib.sha256(b"large %d" % sender).digest() * 2048          # 64 KiB
    return _BIG + bytes([sender]) + (block * (size // len(block) + 1))[: size - len(_BIG) - 1]


def large_senders(count: int) -> list[int]:
    """The members that send a large message: 0, then 2, 3, ... (1 sends the small ones)."""
    return [0, *range(2, count + 1)]


class _StallLog:
    """Every task step that held the loop over 15 ms: (task, milliseconds, start on perf_counter)."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, float]] = []
        self._t = time.perf_counter()

    def before_task_step(self, task) -> None:
        self._t = time.perf_counter()

    def after_task_step(self, task) -> None:
        took = time.perf_counter() - self._t
        if took > 0.015:
            self.steps.append((task.name.rsplit(".", 1)[-1], round(took * 1e3, 1), self._t))


async def worker(args: argparse.Namespace) -> None:
    import trio

    from groupcomm.events import Message, View
    from groupcomm.io.channel import open_channel

    overrides = {"UDP": {"mcast_port": args.port}}
    views: list[list[int]] = []
    small: list[tuple[int, float, float]] = []          # seq, sent, delivered
    out: dict = {"index": args.index}
    baseline_seen = trio.Event()
    ended = trio.Event()
    big_done = trio.Event()
    full = False
    big: dict[int, bytes] = {}
    sender = args.index in large_senders(args.large_senders)
    payload = big_payload(args.size, args.index) if sender else b""
    if sender:
        out["expected_sha256"] = _digest(payload)      # before the run: the loop is the member's
    stalls = _StallLog()
    trio.lowlevel.add_instrument(stalls)

    async with open_channel("loopback", cluster=args.cluster, name=f"m{args.index}",
                            overrides=overrides, join_timeout=20) as ch:
        async def read() -> None:
            nonlocal full
            async for event in ch.events():
                now = time.monotonic()
                if type(event) is View:
                    if event.transitional:
                        continue
                    if full:
                        views.append(sorted(event.members))
                    elif len(event.members) == args.members:
                        full = True
                elif type(event) is Message:
                    p = event.payload
                    if len(p) == _SMALL.size and p[:4] == b"tick":
                        _, seq, sent = _SMALL.unpack(p)
                        small.append((seq, sent, now))
                        if seq >= args.baseline:
                            baseline_seen.set()
                    elif p[:4] == _BIG:
                        big[p[4]] = p              # hashed once the member left: no CPU taken from the ring
                        out.setdefault("big", {})[p[4]] = {"delivered": now, "size": len(p)}
                        if len(big) == args.large_senders:
                            big_done.set()
                    elif p == _END:
                        ended.set()
                        return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            with trio.fail_after(20):
                while not (ch.view and len(ch.view.members) == args.members):
                    await trio.sleep(0.01)
            if args.index == 1:                           # the small-message sender
                async def tick() -> None:
                    seq = 0
                    while True:
                        await ch.send(_SMALL.pack(b"tick", seq, time.monotonic()))
                        seq += 1
                        await trio.sleep(args.interval)
                nursery.start_soon(tick)
            with trio.move_on_after(args.timeout):
                if sender:                                # a large-message sender
                    await baseline_seen.wait()
                    out["sent"] = time.monotonic()
                    await ch.send(payload)
                    payload = b""
                if args.index == 0:
                    await big_done.wait()
                    await trio.sleep(args.tail)
                    await ch.send(_END)
                await ended.wait()
            nursery.cancel_scope.cancel()
        out["stats"] = {k: v for k, v in ch.stats().items()
                        if k in ("token_losses", "gather_entered", "suspicions", "pauses_detected", "retransmissions",
                                 "fragments_dropped", "reassembly_refused", "transport_send_drops")}
    for index, p in big.items():
        out["big"][index]["sha256"] = _digest(p)
    out["stalls"] = stalls.steps
    out["views"] = views
    out["small"] = small
    out["ended"] = ended.is_set()
    print(json.dumps(out))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summarize(results: list[dict], size: int) -> dict:
    """The figures of one run, from every worker's report."""
    senders = [r for r in results if "expected_sha256" in r]
    bigs = [r.get("big", {}).get(str(s["index"])) for r in results for s in senders]
    intact = all(b is not None and b.get("sha256") == s["expected_sha256"] and b["size"] == size
                 for b, s in zip(bigs, senders * len(results)))
    sent = min((s["sent"] for s in senders if "sent" in s), default=None)
    done = max(b["delivered"] for b in bigs) if intact else None
    baseline, during = [], []
    for r in results:
        for seq, t_sent, t_recv in r["small"]:
            latency = (t_recv - t_sent) * 1e3
            if sent is not None and done is not None and sent <= t_sent <= done:
                during.append(latency)
            elif sent is None or t_sent < sent:
                baseline.append(latency)
    in_order = all([s[0] for s in r["small"]] == sorted({s[0] for s in r["small"]}) for r in results)
    return {
        "size": size,
        "large_senders": len(senders),
        "intact": intact,
        "transfer_s": round(done - sent, 3) if intact else None,
        "view_changes": [len(r["views"]) for r in results],
        "ended": [r["ended"] for r in results],
        "small_in_order": in_order,
        "small_during": len(during),
        "during_p50_ms": round(percentile(during, 0.5), 2),
        "during_p99_ms": round(percentile(during, 0.99), 2),
        "small_baseline": len(baseline),
        "baseline_p50_ms": round(percentile(baseline, 0.5), 2),
        "baseline_p99_ms": round(percentile(baseline, 0.99), 2),
        "stats": [r["stats"] for r in results],
        "longest_stalls_ms": [[step[:2] for step in sorted(r["stalls"], key=lambda s: -s[1])[:5]]
                              for r in results],
    }


def parse_size(text: str) -> int:
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
    for unit, factor in units.items():
        if text.lower().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def run(members: int, size: int, pump: str, timeout: float, interval: float = 0.005,
        baseline: int = 200, senders: int = 1) -> dict:
    """One run: ``members`` processes, ``senders`` large messages at once, small messages all along."""
    cluster = f"bench-large-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as state:
        os.environ["GROUPCOMM_STATE_DIR"] = state
        os.environ["GROUPCOMM_PUMP"] = pump
        results = run_workers(__file__, members, [
            "--cluster", cluster, "--port", str(free_port()), "--members", str(members),
            "--size", str(size), "--interval", str(interval), "--baseline", str(baseline),
            "--timeout", str(timeout), "--large-senders", str(senders),
        ], timeout=timeout + 30)
    return summarize(sorted(results, key=lambda r: r["index"]), size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--size", type=parse_size, default=64 << 20)
    parser.add_argument("--pump", choices=("trio", "c"), default="trio")
    parser.add_argument("--interval", type=float, default=0.005)
    parser.add_argument("--baseline", type=int, default=200, help="small messages before the large one")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--tail", type=float, default=0.3, help=argparse.SUPPRESS)
    parser.add_argument("--large-senders", type=int, default=1,
                        help="members that each send one large message at the same time")
    parser.add_argument("--json", action="store_true")
    add_worker_arguments(parser)
    args = parser.parse_args()
    if run_if_worker(args, worker):
        return
    if not 1 <= args.large_senders <= args.members - 1:
        parser.error("--large-senders: from 1 to members - 1 (member 1 sends the small messages)")
    figures = run(args.members, args.size, args.pump, args.timeout, args.interval, args.baseline,
                  args.large_senders)
    if args.json:
        print(json.dumps(figures))
        return
    print(f"{args.members} members on loopback (pump {args.pump}), {args.large_senders} member(s) each "
          f"sending one message of {args.size} bytes at once")
    print(f"  intact at every member: {figures['intact']}   transfer: {figures['transfer_s']} s")
    print(f"  view changes after the first full view, per member: {figures['view_changes']}")
    print(f"  small messages (every {args.interval * 1e3:g} ms from another member), in order: "
          f"{figures['small_in_order']}")
    print(f"    baseline: n={figures['small_baseline']} p50 {figures['baseline_p50_ms']} ms "
          f"p99 {figures['baseline_p99_ms']} ms")
    print(f"    during the transfer: n={figures['small_during']} p50 {figures['during_p50_ms']} ms "
          f"p99 {figures['during_p99_ms']} ms")
    print(f"  counters: {figures['stats']}")
    print(f"  longest loop steps (task, ms) per member: {figures['longest_stalls_ms']}")


if __name__ == "__main__":
    sys.exit(main())
