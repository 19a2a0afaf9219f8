"""Request-reply and state transfer over real member processes on loopback.

    python benchmarks/rpc.py [--members 3] [--seconds 3] [--in-flight 64] [--state-mb 32]
                             [--pump trio|c] [--json]
    python benchmarks/rpc.py --sans-io [--state-mb 32]      # no sockets: the layers' CPU cost (see sans_io)

Starts ``--members`` processes (this script with ``--worker``); all join one
space.  Member 0 then measures, each for ``--seconds``:

* requests to every member of the space (``to=None``, through the ring) with
  ``mode=ALL``: round trips/s and latency p50/p99, one request at a time, then
  with ``--in-flight`` requests outstanding (that many trio tasks, each asking
  again as soon as its answer is in); also the asking process's CPU time per
  round trip (every thread), steadier than the rate on a busy machine;
* point-to-point requests to member 1 with ``mode=FIRST``: the same figures;
* state transfer: member 1 leaves and re-joins the space while member 0
  provides a ``--state-mb`` MiB snapshot; MB/s from the join to the
  receiver's callback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from workers import add_worker_arguments, free_port, percentile, run_if_worker, run_workers  # noqa: E402


def summary(samples: list[float], seconds: float, in_flight: int, failed: int, cpu: float) -> dict:
    return {
        "in_flight": in_flight,
        "failed": failed,
        "round_trips_per_s": round(len(samples) / seconds),
        # the asking process's CPU time (every thread) per round trip: steadier than the rate on a busy machine
        "cpu_us_per_round_trip": round(cpu / max(1, len(samples)) * 1e6, 1),
        "latency_us_p50": round(percentile(samples, 50) * 1e6, 1) if samples else math.nan,
        "latency_us_p99": round(percentile(samples, 99) * 1e6, 1) if samples else math.nan,
    }


async def measure(space, seconds: float, in_flight: int, **kwargs) -> dict:
    """Round trips of ``space.request(**kwargs)`` by ``in_flight`` tasks for ``seconds``."""
    import trio

    samples: list[float] = []
    failed = 0
    payload = b"x" * 100
    end = time.perf_counter() + seconds

    async def asker() -> None:
        nonlocal failed
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            replies = await space.request(payload, timeout=5.0, **kwargs)
            if replies and all(r.ok for r in replies.values()):
                samples.append(time.perf_counter() - t0)
            else:
                failed += 1                          # e.g. a member the loaded machine's FD expelled

    t0, cpu0 = time.perf_counter(), time.process_time()
    async with trio.open_nursery() as nursery:
        for _ in range(in_flight):
            nursery.start_soon(asker)
    return summary(samples, time.perf_counter() - t0, in_flight, failed, time.process_time() - cpu0)


async def worker(args) -> None:
    import trio

    import groupcomm
    from groupcomm.io.channel import open_channel
    from groupcomm.io.udp import UdpConfig

    udp = UdpConfig(mcast_port=args.port, mcast_ttl=0, recv_buffer=16 << 20, send_buffer=16 << 20, pump=args.pump)
    async with open_channel("loopback", cluster=args.cluster, name=f"w{args.index}", udp=udp) as ch:
        while not (ch.view and len(ch.view.members) == args.members):
            await trio.sleep(0.01)
        space = await ch.join_space("bench")

        async def echo(request):
            return request.payload

        space.on_request(echo)
        state = bytes(args.state_mb << 20)
        space.state_provider(lambda: state)
        while len(space.members) < args.members:
            await trio.sleep(0.01)
        result: dict = {"index": args.index}
        if args.index == 0:
            other = next(m for m in sorted(space.members) if m != ch.address)
            for name, kwargs in (("all", {"mode": groupcomm.ALL}), ("p2p_first", {"mode": groupcomm.FIRST, "to": other})):
                result[name] = await measure(space, args.seconds, 1, **kwargs)
                result[f"{name}_pipelined"] = await measure(space, args.seconds, args.in_flight, **kwargs)
            await ch.send(b"transfer")                    # member 1 re-joins to measure state transfer
            async for ev in ch.events():
                if type(ev) is groupcomm.Message and ev.payload.startswith(b"mbps:"):
                    result["state_transfer_mb_per_s"] = float(ev.payload[5:])
                    break
            await ch.send(b"stop")
        else:
            async for ev in ch.events():
                if type(ev) is groupcomm.Message and ev.payload == b"transfer" and args.index == 1:
                    await space.leave()
                    got = trio.Event()
                    t0 = time.perf_counter()
                    space = await ch.join_space("bench")
                    async def on_state(state) -> None:       # async: plain callbacks run in a thread
                        got.set()
                    space.state_receiver(on_state)
                    async with trio.open_nursery() as nursery:
                        async def drain():
                            async for _ in space.events():
                                pass
                        nursery.start_soon(drain)
                        await got.wait()
                        nursery.cancel_scope.cancel()
                    mbps = args.state_mb * 1.048576 / (time.perf_counter() - t0)
                    await ch.send(b"mbps:%.1f" % mbps)
                elif type(ev) is groupcomm.Message and ev.payload == b"stop":
                    break
    print(json.dumps(result), flush=True)


def sans_io(state_mb: int) -> dict:
    """No sockets, one process: the layers' own cost, steady on a busy machine.

    * a ``state_mb`` MiB snapshot as 256 KiB chunk frames through two UNICAST
      instances (mtu 60000, 4 chunks in flight as Member keeps them): CPU ms to
      encode, send, acknowledge, reassemble and decode, and the acks it took;
    * SimCluster (3 members): CPU µs per request for 2,000 requests 50 in flight,
      FIRST to one member and ALL, and the simulated time each took.
    """
    from groupcomm.core.ring import SendTo
    from groupcomm.layers.rpc import ALL, FIRST
    from groupcomm.layers.spaces import STATE_CHUNK_SIZE
    from groupcomm.layers.unicast import Unicast, UnicastConfig, UnicastMessage, UnicastSent
    from groupcomm.layers.wire import StateChunkFrame, decode_unicast, encode
    from groupcomm.testing import SimCluster

    result: dict = {}
    a, b = (Unicast(n, 7, UnicastConfig(mtu=60000), epoch=1) for n in (1, 2))
    for node in (a, b):
        node.set_members((1, 2), 0)
    state = memoryview(bytes(state_mb << 20))
    count = -(-len(state) // STATE_CHUNK_SIZE)
    cpu0 = time.process_time()
    frames = [encode(StateChunkFrame("bench", (1, 1, 1), i, i == count - 1,
                                     bytes(state[i * STATE_CHUNK_SIZE:(i + 1) * STATE_CHUNK_SIZE])))
              for i in range(count)]
    now = sent = in_flight = acks = 0
    chunks: list[bytes] = []
    while len(chunks) < count:
        while in_flight < 4 and sent < count:
            a.send(now, 2, frames[sent])
            sent += 1
            in_flight += 1
        now += 10                                    # 10 µs a step: b's delayed acks fire after 2 ms
        if (b.next_deadline() or math.inf) <= now:
            b.tick(now)
        for out in a.take():
            if type(out) is SendTo:
                b.receive(now, out.packet)
            elif type(out) is UnicastSent:
                in_flight -= 1
        for out in b.take():
            if type(out) is SendTo:
                a.receive(now, out.packet)
                acks += 1
            elif type(out) is UnicastMessage:
                chunks.append(decode_unicast(out.payload).chunk)
    assert len(b"".join(chunks)) == len(state)
    result["unicast_transfer"] = {"cpu_ms": round((time.process_time() - cpu0) * 1e3, 1), "acks": acks,
                                  "simulated_ms": round(now / 1e3, 1)}

    sim = SimCluster(3, seed=0, stack="sim")
    assert sim.run_until(sim.converged, timeout=10)
    for node in (1, 2, 3):
        sim.services.on_request(node, "", lambda payload, requester: payload)
    for name, kwargs in (("p2p_first", {"to": (2,), "mode": FIRST}), ("all", {"mode": ALL})):
        cpu0, start, done = time.process_time(), sim.now_us, 0
        for _ in range(40):
            handles = [sim.services.request(1, "", b"x" * 100, timeout=5.0, **kwargs) for _ in range(50)]
            assert sim.run_until(lambda hs=handles: all(h.done for h in hs), timeout=10)
            done += len(handles)
        result[f"sim_{name}"] = {"cpu_us_per_request": round((time.process_time() - cpu0) / done * 1e6, 1),
                                 "simulated_us_per_request": round((sim.now_us - start) / done, 1)}
    return result


def run(args) -> dict:
    cluster, port = f"rpc-{uuid.uuid4().hex[:8]}", free_port()
    common = ["--members", str(args.members), "--seconds", str(args.seconds), "--state-mb", str(args.state_mb),
              "--in-flight", str(args.in_flight), "--pump", args.pump, "--cluster", cluster, "--port", str(port)]
    results = run_workers(__file__, args.members, common, args.timeout)
    first = next(r for r in results if r["index"] == 0)
    return {"members": args.members, "pump": args.pump, "state_mb": args.state_mb,
            **{k: v for k, v in first.items() if k != "index"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--state-mb", type=int, default=32)
    parser.add_argument("--in-flight", type=int, default=64, help="requests outstanding in the pipelined runs")
    parser.add_argument("--pump", choices=("trio", "c"), default="c",
                        help="socket driver: c (the C socket pump thread, the default on Linux) or trio (Python)")
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--sans-io", action="store_true",
                        help="no processes: the layers' CPU cost alone (UNICAST snapshot transfer, SimCluster requests)")
    add_worker_arguments(parser)
    args = parser.parse_args()
    if run_if_worker(args, worker):
        return
    if args.sans_io:
        s = sans_io(args.state_mb)
        print(json.dumps(s) if args.json else "\n".join(f"{k}: {v}" for k, v in s.items()))
        return
    s = run(args)
    print(f"[{s['pump']}] {s['members']} members")
    for key, label in (("all", "request to all (ALL)"), ("p2p_first", "point-to-point (FIRST)")):
        for suffix in ("", "_pipelined"):
            r = s[key + suffix]
            print(f"{label}, {r['in_flight']} in flight: {r['round_trips_per_s']:,} round trips/s, "
                  f"p50 {r['latency_us_p50']} µs, p99 {r['latency_us_p99']} µs, "
                  f"{r['cpu_us_per_round_trip']} CPU-µs per round trip (asker)"
                  + (f" ({r['failed']} failed)" if r["failed"] else ""))
    print(f"state transfer: {s.get('state_transfer_mb_per_s')} MB/s ({args.state_mb} MiB snapshot)")
    if args.json:
        print(json.dumps(s))


if __name__ == "__main__":
    main()
