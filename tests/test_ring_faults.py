"""Faults the ring core must survive (issue 9): aborted membership rounds and the
late packets they leave behind, ring seqs a commit could not use, joins during
commit and recovery, and a member that was paused (SIGSTOP, a long GC, a VM
stall).

Members are real :class:`~groupcomm.core.ring.Ring` objects, driven either by the
fuzz suite's :class:`~tests.test_ring_fuzz.RingCluster` (packet-level control:
hold, drop, capture and inject packets) or by :class:`~groupcomm.testing.SimCluster`
(EVS checker, crashes, restarts, pauses); one test stops a real process.
"""

from __future__ import annotations

import random
import signal
import struct
import time
import uuid

import pytest

from groupcomm.cli.demo import NodeProcess, free_udp_port, view_is
from groupcomm.core.ring import Ring, RingConfig, RingState
from groupcomm.errors import ConfigError, NotOperational
from groupcomm.events import Configuration
from groupcomm.testing import SimCluster
from tests.test_ring_fuzz import (
    FAST,
    MSG_COMMIT,
    MSG_JOIN,
    MSG_MCAST,
    MSG_TOKEN,
    RingCluster,
    formed_cluster,
    join_packet,
    packet_kind,
)

MCAST_RING_ID = struct.Struct(">IQI")  # after the 12-byte header: ring rep, ring seq, message seq


def states(cluster: RingCluster) -> dict[int, RingState]:
    return {n: r.state for n, r in cluster.rings.items()}


def payloads(cluster: RingCluster, node: int) -> list[bytes]:
    return [d.payload for d in cluster.deliveries[node]]


def regular_views_since(sim: SimCluster, node: int, mark: int) -> list[tuple[int, ...]]:
    return [e.members for e in sim.history(node)[mark:] if isinstance(e, Configuration) and not e.transitional]


# ---------------------------------------------------------------------------
# 1. Late packets of an aborted recovery
# ---------------------------------------------------------------------------


def test_a_late_recovery_message_of_an_aborted_ring_does_not_hide_an_old_ring_message():
    """Members 1, 2, 3 in ring R1; member 3 misses R1's messages 1..5.  A new ring R2
    starts recovery: member 1 re-sends R1's messages 1..5 wrapped as R2's messages
    1..5, which member 3 does not get either.  R2's recovery is aborted (member 3 is
    cut off, the token is lost) and member 3, gathering again, receives a late copy of
    R2's message 1.  Then all three form R3, where member 3 finally gets R1's messages.

    Every member must deliver all five R1 messages: they moved together from R1.
    Regression: gathering member 3 still had R2 as its ring id, took the late R2
    message into R1's queue at seq 1, then refused the genuine R1 message 1 in R3's
    recovery as a duplicate and skipped it (an EVS violation).
    """
    cluster = formed_cluster((1, 2, 3))
    sent = [b"m%d" % k + b"." * 1000 for k in range(5)]          # one datagram each
    cluster.drop_if = lambda src, dest, packet: packet[3] == MSG_MCAST and dest == 3
    for payload in sent:
        cluster.submit(1, payload)
    cluster.run(0.005)
    assert (len(payloads(cluster, 1)), len(payloads(cluster, 3))) == (5, 0)

    cluster.cut_off = {3}                                           # token loss: a new round
    assert cluster.run_until(lambda: set(states(cluster).values()) == {RingState.GATHER}, 2.0, step=0.0005)
    cluster.cut_off = set()
    mark = len(cluster.wire)

    def wrapped() -> list[bytes]:
        return [p for _, _, p in cluster.wire[mark:] if packet_kind(p) == "mcast_encap"]

    assert cluster.run_until(lambda: bool(wrapped()), 2.0, step=0.0002)
    late = wrapped()[0]
    _, r2_seq, seq = MCAST_RING_ID.unpack_from(late, 12)
    assert seq == 1 and cluster.rings[3].state == RingState.RECOVERY

    cluster.cut_off = {3}                                           # R2's recovery is aborted
    assert cluster.run_until(lambda: cluster.rings[3].state == RingState.GATHER, 2.0, step=0.0002)
    cluster.receive(3, late)                                        # the late copy
    cluster.cut_off = set()
    cluster.drop_if = None
    assert cluster.run_until(cluster.formed, 5.0), cluster.describe()
    assert cluster.view(3).ring_id.seq > r2_seq
    cluster.run(0.5)
    assert payloads(cluster, 1) == payloads(cluster, 2) == payloads(cluster, 3) == sent


def _late_copy_schedule(seed: int, inject: bool) -> SimCluster:
    """Faults that abort recoveries (partitions and loss during traffic); with
    ``inject``, late copies of every recovery message sent so far are fed to members
    that are gathering, committing or operational at random moments."""
    rng = random.Random(seed)
    sim = SimCluster(nodes=4, seed=seed, config=FAST)
    wrapped: list[bytes] = []
    sim.add_packet_observer(
        lambda node, packet: wrapped.append(packet) if packet_kind(packet) == "mcast_encap" else None)
    sim.run(0.5)
    counter = 0
    for _ in range(40):
        step = rng.random()
        if step < 0.4:
            for _ in range(rng.randint(1, 6)):
                counter += 1
                sim.send(rng.choice(sim.nodes), b"s%d" % counter, safe=rng.random() < 0.3)
        elif step < 0.55:
            groups: dict[int, list[int]] = {}
            for node in sim.nodes:
                groups.setdefault(rng.randint(0, 1), []).append(node)
            sim.partition(groups.values())
        elif step < 0.7:
            sim.heal()
        elif step < 0.8:
            sim.set_network(loss=rng.choice([0.0, 0.05, 0.2]))
        sim.run(rng.choice([0.0005, 0.002, 0.01, 0.05, 0.2]))
        if wrapped:
            for node in sim.nodes:
                packet = rng.choice(wrapped)           # drawn even when not injected: same RNG use
                if inject and sim.ring(node).state != RingState.RECOVERY:
                    sim.inject(node, packet)
    sim.heal()
    sim.set_network()
    sim.run(sim.settle_time)
    sim.check(settled=True)
    return sim


@pytest.mark.parametrize("seed", range(12))
def test_late_copies_of_recovery_messages_change_nothing(seed):
    """A late copy of any ring's recovery message, fed to a member in any state but
    the recovery that may still need it, is dropped: the run delivers exactly what
    the same run without the copies delivers, and EVS holds."""
    with_copies = _late_copy_schedule(seed, inject=True)
    assert with_copies.histories() == _late_copy_schedule(seed, inject=False).histories()


# ---------------------------------------------------------------------------
# 2. Ring seqs a commit could not use
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("ring_seq", [2**62, 2**62 - 3, 2**63, 2**64 - 1])
def test_a_join_whose_ring_seq_no_commit_can_use_is_counted_and_dropped(ring_seq):
    """A join (here forged, as member 2) carrying a ring seq the next commit token could
    not use (that token's seq, ring seq + 4, would be above 2**62) must be dropped and
    counted; the ring stays operational and a restarted member rejoins.

    Regression: a join at 2**62 was accepted, every member adopted it, and the commit
    tokens made from it were refused as malformed: every member sat in COMMIT for good
    and a restarted member could not even start (its ring seq floor was out of range).
    """
    sim = SimCluster(nodes=3, seed=11)
    sim.run(1.0)
    assert sim.converged()
    before = sim.ring(1).stats()["drop_malformed"]
    sim.inject(1, join_packet(2, ring_seq, [1, 2, 3], []))
    assert sim.ring(1).stats()["drop_malformed"] == before + 1
    sim.run(5.0)
    assert sim.converged(), [sim.ring(n).debug() for n in sim.nodes]
    sim.crash(3)
    sim.run(3.0)
    sim.restart(3)
    assert sim.run_until(sim.converged, 10.0), [sim.ring(n).debug() for n in sim.nodes]
    sim.send(3, b"after")
    sim.run(sim.settle_time)
    sim.check(settled=True)


def test_the_highest_ring_seq_a_join_may_carry_leads_to_a_usable_commit():
    sim = SimCluster(nodes=3, seed=12)
    sim.run(1.0)
    sim.inject(1, join_packet(2, 2**62 - 4, [1, 2, 3], []))
    assert sim.run_until(lambda: sim.converged() and sim.view(1).ring_id.seq == 2**62, 5.0)


def test_a_restart_may_start_from_any_ring_seq_a_join_may_carry():
    assert Ring(1, ring_seq_floor=2**62 - 4).ring_seq == 2**62 - 4
    with pytest.raises(ConfigError, match="ring_seq_floor"):
        Ring(1, ring_seq_floor=2**62 - 3)


# ---------------------------------------------------------------------------
# 4. A join during commit or recovery starts a fresh round
# ---------------------------------------------------------------------------


def _all_in(cluster: RingCluster, state: RingState) -> bool:
    return set(states(cluster).values()) == {state}


def _new_round(cluster: RingCluster) -> None:
    """Members 1, 2, 3 (formed) start a membership round with the same members."""
    cluster.cut_off = {3}
    assert cluster.run_until(lambda: _all_in(cluster, RingState.GATHER), 2.0, step=0.0005)
    cluster.cut_off = set()


def test_a_join_during_recovery_starts_a_fresh_round():
    """All three members are in recovery of a new ring whose first token is lost.
    Member 2 times out first and gathers again; its join reaches representative 1
    while member 3 is still in recovery.  Member 1 must gather afresh and wait for
    member 3's join of the new round.

    Regression: member 1 returned to GATHER keeping the last round's votes (1, 2
    and 3 agreed), so 2's join completed a stale consensus and 1 sent a commit
    token at once, which member 3 (still in recovery) dropped: a wasted round.
    """
    cluster = formed_cluster((1, 2, 3))
    _new_round(cluster)
    assert cluster.run_until(lambda: _all_in(cluster, RingState.RECOVERY), 2.0, step=0.0001)
    held: list[bytes] = []

    def hold(src: int, dest: int, packet: bytes) -> bool:
        if packet[3] == MSG_JOIN and (src, dest) == (2, 1) and not held:
            held.append(packet)
            return True
        return packet[3] == MSG_TOKEN                   # the new ring's token is lost

    cluster.drop_if = hold
    assert cluster.run_until(lambda: bool(held), 2.0, step=0.0001)
    assert states(cluster) == {1: RingState.RECOVERY, 2: RingState.GATHER, 3: RingState.RECOVERY}
    commits = cluster.rings[1].stats()["commit_entered"]
    cluster.cut_off = {3}                               # member 3 casts no vote for now
    cluster.receive(1, held[0])
    assert cluster.rings[1].state == RingState.GATHER, cluster.rings[1].debug()
    assert cluster.rings[1].stats()["commit_entered"] == commits
    cluster.cut_off = set()
    cluster.drop_if = None
    assert cluster.run_until(cluster.formed, 5.0), cluster.describe()


def test_a_join_during_commit_starts_a_fresh_round():
    """Representative 1 is in COMMIT, waiting for the commit token's second pass,
    when a join of member 2 for the ring being formed (2 lost that round) arrives.
    As in recovery, 1 must not count the last round's votes."""
    cluster = formed_cluster((1, 2, 3))
    cluster.drop_if = lambda src, dest, packet: packet[3] == MSG_COMMIT and (src, dest) == (3, 1)
    _new_round(cluster)
    assert cluster.run_until(lambda: _all_in(cluster, RingState.COMMIT), 2.0, step=0.0001)
    forming = cluster.rings[1].ring_seq
    commits = cluster.rings[1].stats()["commit_entered"]
    cluster.cut_off = {2, 3}
    cluster.receive(1, join_packet(2, forming, [1, 2, 3], []))
    assert cluster.rings[1].state == RingState.GATHER, cluster.rings[1].debug()
    assert cluster.rings[1].stats()["commit_entered"] == commits
    cluster.cut_off = set()
    cluster.drop_if = None
    assert cluster.run_until(cluster.formed, 5.0), cluster.describe()


# ---------------------------------------------------------------------------
# 5. Pause detection
# ---------------------------------------------------------------------------


def test_a_call_long_past_the_deadline_is_a_pause_not_a_token_loss():
    cluster = formed_cluster((1, 2))
    ring = cluster.rings[2]
    late = ring.next_deadline() + int(FAST.token_timeout * 1_000_000 * 5)
    ring.tick(late)
    ring.take()
    assert ring.state == RingState.OPERATIONAL
    assert ring.stats()["pauses_detected"] == 1
    assert ring.next_deadline() > late                     # the token-loss timer restarted from now
    # a join that queued up during the pause is dropped
    before = ring.stats()["drop_stale"]
    assert ring.receive(late, join_packet(1, 4, [1], [2])) < 0
    assert ring.stats()["drop_stale"] == before + 1
    # on time again: no pause
    ring.tick(ring.next_deadline())
    assert ring.stats()["pauses_detected"] == 1


@pytest.mark.parametrize("fraction", [0, -0.5, float("nan"), float("inf"), "0.5", True, None])
def test_pause_fraction_must_be_a_positive_number(fraction):
    with pytest.raises(ConfigError, match="pause_fraction"):
        Ring(1, RingConfig(pause_fraction=fraction))  # type: ignore[arg-type]


def test_a_paused_node_cannot_act_until_it_resumes():
    sim = SimCluster(nodes=2, seed=1)
    sim.run(1.0)
    sim.pause(2, 0.5)
    for act in (lambda: sim.send(2, b"x"), lambda: sim.inject(2, b"x"), lambda: sim.suspect(2, 1),
                lambda: sim.leave(2), lambda: sim.pause(2, 1.0)):
        with pytest.raises(NotOperational, match="paused"):
            act()
    with pytest.raises(ConfigError):
        sim.pause(1, 0)
    sim.run(0.6)
    sim.send(2, b"resumed")
    sim.run(1.0)
    sim.check(settled=False)




@pytest.mark.parametrize("stack", [None, "sim"])
@pytest.mark.parametrize("pause", [1.2, 3.0, 6.0])
@pytest.mark.parametrize("seed", range(4))
def test_a_paused_member_rejoins_with_one_membership_change(seed, pause, stack):
    """Member ``victim`` stops for longer than the token timeout (the others may
    exclude it).  On resume it must not blame the others: it installs exactly one
    regular configuration (everybody) and the others at most two (without it, then
    with it), with no repeated reformations.

    Regression: on resume its overdue token-loss timer fired at once and the joins
    that had queued up during the pause (the others' rounds that excluded it) made
    it exclude them in turn: it formed a ring of its own first, and the others
    re-formed an extra time.
    """
    sim = SimCluster(nodes=4, seed=seed, stack=stack)
    sim.run(1.0 + 0.013 * seed)
    for node in sim.nodes:
        sim.send(node, b"before %d" % node)
    sim.run(0.0003 * seed)
    victim = 1 + seed % 4
    marks = {n: len(sim.history(n)) for n in sim.nodes}
    sim.pause(victim, pause)
    sim.run(pause + 10.0)
    views = {n: regular_views_since(sim, n, marks[n]) for n in sim.nodes}
    assert sim.converged(), views
    assert views[victim] == [tuple(sim.nodes)], views
    assert all(len(v) <= 2 for v in views.values()), views
    assert sim.ring(victim).stats()["pauses_detected"] == 1
    sim.check(settled=True)


def test_a_stall_shorter_than_the_token_timeout_changes_nothing():
    sim = SimCluster(nodes=4, seed=5)
    sim.run(1.0)
    marks = {n: len(sim.history(n)) for n in sim.nodes}
    sim.pause(3, 0.6)
    sim.run(5.0)
    assert all(regular_views_since(sim, n, marks[n]) == [] for n in sim.nodes)


def test_a_stopped_process_rejoins_with_one_membership_change():
    """SIGSTOP a real member (loopback stack, token timeout 300 ms) for 2 s, then
    SIGCONT: the survivors exclude it; on resume it installs one view (everybody),
    and the view then stays put."""
    cluster, port = f"pause-{uuid.uuid4().hex[:8]}", free_udp_port()
    args = ["--stack", "loopback", "--mcast-port", str(port)]
    members = [NodeProcess(f"z{i}", cluster, args) for i in range(3)]
    try:
        everyone = {m.address() for m in members}
        for m in members:
            m.wait(view_is(everyone), 20)
        marks = [m.mark() for m in members]
        victim = members[2]
        victim.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(2.0)
        finally:
            victim.proc.send_signal(signal.SIGCONT)
        for m, mark in zip(members, marks):
            m.wait(view_is(everyone), 20, since=mark)
        time.sleep(2.0)                                  # no reformation follows
        views = []
        for m, mark in zip(members, marks):
            m.drain()
            views.append([set(e["view"]) for e in m.log[mark:] if "view" in e and not e["transitional"]])
        assert views[2] == [everyone], views
        assert all(len(v) <= 2 and v[-1] == everyone for v in views), views
    finally:
        for m in members:
            m.stop()
