"""What users rely on from the ring, measured in virtual time (deterministic)."""

from __future__ import annotations

import pytest

from groupcomm.events import Configuration, Crashed, Delivery
from groupcomm.core.ring import RingConfig, RingState
from groupcomm.testing import SimCluster


def regular_views(sim: SimCluster, node: int) -> list[Configuration]:
    return [e for e in sim.history(node) if isinstance(e, Configuration) and not e.transitional]


def deliveries(sim: SimCluster, node: int) -> list[Delivery]:
    return [e for e in sim.history(node) if isinstance(e, Delivery)]


def time_to_view(sim: SimCluster, members: tuple[int, ...], timeout: float = 10.0) -> float:
    t0 = sim.now
    assert sim.run_until(
        lambda: all((v := sim.view(n)) is not None and v.members == members for n in members),
        timeout,
        step=0.0005,
    )
    return sim.now - t0


def test_members_started_together_form_one_ring_first():
    sim = SimCluster(nodes=8, seed=3)
    sim.run(1.0)
    for n in sim.nodes:
        assert [v.members for v in regular_views(sim, n)] == [tuple(range(1, 9))]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("members", [3, 5, 8])
def test_crash_to_new_view_within_token_plus_consensus_plus_50ms(members, seed):
    sim = SimCluster(nodes=members, seed=seed)
    sim.run(1.0 + seed * 0.0173)
    for n in sim.nodes:
        sim.send(n, b"before crash %d" % n)
    victim = 1 + seed % members
    sim.crash(victim)
    survivors = tuple(n for n in sim.nodes if n != victim)
    c = RingConfig()
    assert time_to_view(sim, survivors) <= c.token_timeout + 1.2 * c.token_timeout + 0.05
    sim.run(sim.settle_time)
    sim.check(settled=True)


def test_graceful_leave_does_not_wait_for_a_timeout():
    sim = SimCluster(nodes=4, seed=1)
    sim.run(1.0)
    sim.leave(2)
    assert time_to_view(sim, (1, 3, 4)) < 0.05      # a membership round, no token timeout
    sim.run(sim.settle_time)
    sim.check(settled=True)


def test_idle_ring_parks_the_token_and_first_message_is_fast():
    sim = SimCluster(nodes=5, seed=2)
    sim.run(3.0)
    ring = sim.ring(3)
    tokens0 = ring.stats()["tokens_received"]
    sim.run(10.0)
    idle_rotations = (ring.stats()["tokens_received"] - tokens0) / 10.0
    assert idle_rotations < 10             # parked for `hold` (180 ms) per rotation, not spinning
    for sender in (1, 4):                  # the representative and an ordinary member
        before = len(deliveries(sim, 5))
        sim.send(sender, b"wake up %d" % sender)
        t0 = sim.now
        assert sim.run_until(lambda: len(deliveries(sim, 5)) > before, 1.0, step=0.0001)
        assert sim.now - t0 < 0.005, "an idle ring must release the token at once"
        sim.run(3.0)


def test_restart_is_a_new_incarnation_with_fresh_ring_ids():
    sim = SimCluster(nodes=3, seed=4)
    sim.run(1.0)
    sim.send(1, b"first life")
    sim.run(0.1)
    old_ids = {v.ring_id for n in sim.nodes for v in regular_views(sim, n)}
    sim.crash(1)
    sim.restart(1)                         # restarted within the token timeout
    sim.run(6.0)
    history = sim.history(1)
    second_life = history[history.index(Crashed()) + 1 :]
    assert second_life[0].transitional is False          # a fresh member starts with a regular view
    assert all(e.payload != b"first life" for e in second_life if isinstance(e, Delivery))
    new_ids = {v.ring_id for v in regular_views(sim, 1)[1:]}
    assert not (new_ids & old_ids)
    assert sim.converged()
    sim.check(settled=True) if sim.settled() else sim.check()


def test_safe_message_is_delivered_only_when_every_member_has_it():
    sim = SimCluster(nodes=3, seed=5)
    sim.run(1.0)
    sim.partition([{1, 2}, {3}])           # 3 cannot receive; the ring has not noticed yet
    sim.send(1, b"safe one", safe=True)
    sim.run(0.05)                          # well below the token timeout
    assert all(b"safe one" != d.payload for n in (1, 2) for d in deliveries(sim, n))
    sim.heal()
    sim.run(sim.settle_time)
    sim.check(settled=True)


def test_same_seed_same_calls_same_histories():
    def run() -> dict:
        sim = SimCluster(nodes=5, seed=42)
        sim.set_network(loss=0.1, duplicate=0.02, reorder=True)
        sim.run(0.5)
        for i in range(30):
            sim.send(1 + i % 5, b"%d" % i, safe=i % 3 == 0)
        sim.partition([{1, 2}, {3, 4, 5}])
        sim.run(3.0)
        sim.heal()
        sim.crash(2)
        sim.restart(2)
        sim.run(5.0)
        return sim.histories()

    assert run() == run()


def test_sending_at_a_crashed_member_is_a_clear_error():
    sim = SimCluster(nodes=2, seed=1)
    sim.crash(2)
    with pytest.raises(Exception, match="crashed"):
        sim.send(2, b"x")
    assert sim.ring(1).state in (RingState.GATHER, RingState.OPERATIONAL, RingState.COMMIT, RingState.RECOVERY)


def test_a_verified_suspicion_excludes_a_member_without_waiting_for_timeouts():
    sim = SimCluster(nodes=4, seed=6)
    sim.run(1.0)
    sim.crash(4)
    t0 = sim.now
    assert sim.suspect(2, 4)               # one member's verified suspicion; the others adopt it
    assert time_to_view(sim, (1, 2, 3)) < 0.05
    assert sim.now - t0 < 0.05
    assert not sim.suspect(1, 99)          # not a member: nothing to do
    sim.run(sim.settle_time)
    sim.check(settled=True)
