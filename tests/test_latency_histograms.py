"""Latency histograms, sans-IO: the Histogram, sampled self-delivery latency (Multicast) and
request round trips (RpcTracker), checked against times measured independently in the simulator."""

from __future__ import annotations

import math

import pytest

from groupcomm.layers.histogram import LATENCY_BUCKETS, Histogram
from groupcomm.layers.multicast import LATENCY_SAMPLE_EVERY
from groupcomm.layers.rpc import ALL, NONE, Reply, RpcTracker
from groupcomm.testing import SimCluster

OK = Reply(True, b"yes", None, "ok")


def test_an_observation_lands_in_the_first_bucket_whose_bound_is_not_below_it():
    h = Histogram((0.001, 0.01, 0.1))
    for value in (0.0005, 0.001, 0.002, 0.1, 7.0):
        h.observe(value)
    assert h.cumulative() == [(0.001, 2), (0.01, 3), (0.1, 4), (math.inf, 5)]
    assert h.count == 5 and h.sum == pytest.approx(7.1035)


@pytest.mark.parametrize("bounds", [(), (0.1, 0.1), (0.2, 0.1), (0.1, math.inf), (math.nan,)])
def test_bounds_must_be_finite_and_increasing(bounds):
    with pytest.raises(ValueError, match="strictly increasing"):
        Histogram(bounds)


def test_the_default_buckets_span_tens_of_microseconds_to_seconds():
    assert LATENCY_BUCKETS[0] <= 50e-6 and LATENCY_BUCKETS[-1] >= 5.0
    assert Histogram().cumulative()[-1] == (math.inf, 0)


def _reference(latencies: list[float]) -> Histogram:
    h = Histogram()
    for value in latencies:
        h.observe(value)
    return h


def _own_deliveries(sim: SimCluster, node: int) -> dict[bytes, int]:
    """payload -> virtual time (µs) at which ``node`` delivered its own message."""
    seen: dict[bytes, int] = {}
    sim.add_observer(lambda n, ev: seen.setdefault(ev.payload, sim.now_us)
                     if n == node and getattr(ev, "sender", None) == node else None)
    return seen


def test_self_delivery_latency_is_sampled_and_matches_the_delivery_times():
    sim = SimCluster(nodes=3, seed=4, stack="sim")
    sim.run_until(sim.converged, 5)
    multicast = sim.layers(1).multicast
    base = multicast.ring.stats()["messages_sent"]          # the layers' own messages so far
    delivered = _own_deliveries(sim, 1)
    submitted: dict[bytes, int] = {}
    for i in range(5 * LATENCY_SAMPLE_EVERY + 10):
        payload = b"m%d" % i
        submitted[payload] = sim.now_us
        sim.send(1, payload)
        sim.send(2 + i % 2, b"other")                       # deliveries of others' messages in between
        sim.run(0.0001 if i % 2 else 0.004)                 # each submitted at its own time, some delivered alone
    sim.run(1.0)
    assert multicast.ring.stats()["messages_sent"] == base + len(submitted)      # no layer message in between
    sampled = [p for i, p in enumerate(submitted) if (base + i + 1) % LATENCY_SAMPLE_EVERY == 0]
    assert len(sampled) == 5
    expected = _reference([(delivered[p] - submitted[p]) / 1e6 for p in sampled])
    measured = multicast.self_delivery_latency
    assert measured.count == 5
    assert measured.cumulative() == expected.cumulative()
    assert measured.sum == pytest.approx(expected.sum)
    assert measured.sum > 0


def test_sampled_messages_in_flight_across_a_view_change_are_all_matched():
    sim = SimCluster(nodes=4, seed=2, stack="sim")
    sim.run_until(sim.converged, 5)
    multicast = sim.layers(1).multicast
    for i in range(6 * LATENCY_SAMPLE_EVERY):
        sim.send(1, b"m%d" % i)
        if i == 3 * LATENCY_SAMPLE_EVERY:
            sim.crash(4)
        if i % 40 == 0:
            sim.run(0.002)
    sim.run_until(sim.converged, 10)
    sim.run(1.0)
    measured = multicast.self_delivery_latency
    assert measured.count == multicast.ring.stats()["messages_sent"] // LATENCY_SAMPLE_EVERY
    assert 0 < measured.sum / measured.count < 3.0          # none matched with a wrong message's time


def test_a_request_is_timed_from_its_start_to_its_completion():
    rpc = RpcTracker()
    req = rpc.new_id()
    rpc.start(1_000, req, ALL, 100_000, "s", (1, 2))
    rpc.reply(req, 1, OK)
    rpc.reply(req, 2, OK)
    assert len(rpc.take(1_600)) == 1
    assert rpc.latency.count == 1 and rpc.latency.sum == pytest.approx(600e-6)
    rpc.start(5_000, rpc.new_id(), NONE, 100_000, "s", (1,))
    rpc.take(5_000)
    assert rpc.latency.count == 2 and rpc.latency.cumulative()[0] == (LATENCY_BUCKETS[0], 1)


def test_the_member_times_its_requests_in_the_simulator():
    sim = SimCluster(nodes=3, seed=1, stack="sim")
    sim.run_until(sim.converged, 5)
    for node in sim.nodes:
        sim.services.on_request(node, "kv", lambda payload, requester: b"ok")
        sim.services.join(node, "kv")
    sim.run_until(sim.converged, 5)
    handles = [sim.services.request(1, "kv", b"q%d" % i) for i in range(3)]
    sim.run_until(lambda: all(h.done for h in handles), 5)
    latency = sim.layers(1).rpc.latency
    assert latency.count == 3
    assert latency.sum == pytest.approx(sum(h.finished - h.started for h in handles))
