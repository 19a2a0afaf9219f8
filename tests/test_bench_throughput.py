"""benchmarks/throughput.py's phases against a fake channel: the order check covers every
delivery of its phase and exactly those, and what follows a phase's end inside the same
delivered batch is left for the next phase (phases follow each other in the total order)."""

from __future__ import annotations

import importlib.util
import sys
import zlib
from argparse import Namespace
from pathlib import Path

import pytest

from groupcomm.events import Message, RingId, View

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_throughput():
    saved_path, saved_modules = list(sys.path), set(sys.modules)
    try:
        spec = importlib.util.spec_from_file_location("bench_throughput", BENCHMARKS / "throughput.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:                       # the benchmarks' helper modules stay out of the test session's way
        sys.path[:] = saved_path
        for name in set(sys.modules) - saved_modules:
            if name in ("workers", "netlab", "rawudp"):
                del sys.modules[name]


throughput = load_throughput()

ME = 7
VIEW = View((ME,), RingId(1, 1), False)


class FakeChannel:
    """Loops every sent payload back as this member's Message, 5 events per batch (fewer only
    at the end); once ``trigger`` payloads were sent, ``after`` follows them in the stream."""

    def __init__(self, trigger: int, after: list) -> None:
        self.view, self.address = VIEW, ME
        self.sent: list[bytes] = []
        self.stream: list = [VIEW]                    # the start's own view is still in the stream
        self.trigger, self.after = trigger, after

    def send_nowait(self, payload: bytes) -> None:
        self.sent.append(payload)
        self.stream.append(Message(ME, payload, False))
        if len(self.sent) == self.trigger:
            self.stream.extend(self.after)

    async def send(self, payload: bytes) -> None:
        self.send_nowait(payload)

    def send_nowait_many(self, payloads: list) -> int:
        taken = payloads[:3]                      # a queue with room for 3: the rest goes through send_many
        for payload in taken:
            self.send_nowait(payload)
        return len(taken)

    async def send_many(self, payloads: list) -> None:
        for payload in payloads:
            self.send_nowait(payload)

    async def receive_batch(self) -> list:
        import trio

        while len(self.stream) < 5 and len(self.sent) < self.trigger:    # batch bounds do not depend on timing
            await trio.lowlevel.checkpoint()
        batch, self.stream = self.stream[:5], self.stream[5:]
        return batch

    def stats(self) -> dict:
        return {"retransmissions": 0, "datagrams_originated": len(self.sent), "transport_send_drops": 0}


NEXT_PHASE = [View((ME, 8), RingId(1, 3), False), Message(ME, b"Hnext", False), Message(ME, b"Hlater", False)]
"""What follows a phase; the last batch of each phase below ends with its first event."""


async def what_follows(inbox, count: int) -> list:
    """The next ``count`` events (a lost event would leave this waiting: bounded)."""
    import trio

    events: list = []
    with trio.fail_after(5):
        while len(events) < count:
            events += await inbox.batch()
    return events


@pytest.mark.parametrize("send_batch", [1, 8])
async def test_full_load_checks_every_delivery_of_its_phase_and_leaves_the_next_phase(send_batch):
    ch = FakeChannel(trigger=23, after=NEXT_PHASE)
    inbox = throughput.Inbox(ch)
    args = Namespace(messages=23, members=1, size=40, index=0, send_batch=send_batch)

    result = await throughput.full_load_phase(ch, inbox, args)

    assert result["delivered"] == 23 and result["sent"] == 23
    assert result["order_crc"] == zlib.crc32(b"".join(ch.sent))
    assert await what_follows(inbox, 3) == NEXT_PHASE    # the phase ended inside a batch: the rest is kept
    assert inbox.view_changes == 0         # the start's view is not a change, the next phase's is not this one's


async def test_latency_phase_ends_at_the_last_end_marker_and_counts_only_its_own_messages():
    ch = FakeChannel(trigger=0, after=[])
    ch.stream.append(Message(ME + 1, b"L" + bytes(8), False))       # another member's sample: not ours
    ch.stream.append(View((ME, 8), RingId(1, 2), False))            # a new ring during the phase
    ch.trigger, ch.after = 9, NEXT_PHASE             # 8 samples, then the end marker
    inbox = throughput.Inbox(ch)

    async def eight_at_once(send_some, wait_own) -> None:
        await send_some(3)                       # more than the fake queue takes at once: send_many
        await send_some(5)

    latencies = await throughput.latency_phase(ch, inbox, b"L", b"pad", ME, 1, eight_at_once)

    assert len(latencies) == 8 and all(x >= 0 for x in latencies)
    assert ch.sent[-1] == b"EL"
    assert await what_follows(inbox, 3) == NEXT_PHASE
    assert inbox.view_changes == 1


def test_cdf_spans_the_samples_in_order():
    samples = [float(x) for x in range(1000, 0, -1)]
    points = throughput.cdf(samples)
    assert points[0] == [0.0, 1.0] and points[-1] == [1.0, 1000.0]
    assert [q for q, _ in points] == sorted(q for q, _ in points)
    assert [v for _, v in points] == sorted(v for _, v in points)
    assert throughput.cdf([]) == []
