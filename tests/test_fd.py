"""The heartbeat failure detector, sans-IO: time is an argument."""

from __future__ import annotations

import pytest

from groupcomm.errors import ConfigError
from groupcomm.layers.fd import HEARTBEAT, PING, PONG, FailureDetector, FdConfig

MS = 1000
CFG = FdConfig(interval=0.02, timeout=0.08, verify=0.03)


def detector(me: int = 1) -> FailureDetector:
    fd = FailureDetector(me, cluster_id=7, config=CFG)
    fd.set_members((1, 2, 3), now=0)
    return fd


def test_heartbeats_follow_the_interval():
    fd = detector()
    assert fd.tick(0)[0] is True
    assert fd.tick(10 * MS)[0] is False
    assert fd.tick(20 * MS)[0] is True


def test_a_silent_member_is_pinged_then_reported_only_after_verification():
    fd = detector()
    fd.heard(3, 70 * MS)
    beat, ping, dead = fd.tick(80 * MS)
    assert ping == [2] and dead == []
    assert fd.next_deadline() <= 110 * MS
    beat, ping, dead = fd.tick(110 * MS)
    assert dead == [2]
    assert fd.tick(200 * MS)[1:] == ([3], [])   # 3 went silent later: pinged first
    assert fd.tick(230 * MS)[2] == [3]
    assert fd.tick(400 * MS)[1:] == ([], [])    # each death is reported once


def test_an_answer_during_verification_clears_the_suspicion():
    fd = detector()
    assert fd.tick(80 * MS)[1] == [2, 3]
    pong = FailureDetector(2, 7, CFG).packet(3)
    assert fd.receive(pong, 90 * MS) is None
    assert fd.tick(110 * MS)[2] == [3]


def test_a_ping_is_answered_and_foreign_or_malformed_packets_are_ignored():
    fd = detector()
    assert fd.receive(FailureDetector(3, 7, CFG).packet(PING), 5 * MS) == 3
    assert fd.receive(FailureDetector(3, 8, CFG).packet(PING), 5 * MS) is None      # other cluster
    assert fd.receive(FailureDetector(1, 7, CFG).packet(HEARTBEAT), 5 * MS) is None  # ourselves
    assert fd.receive(b"GF\x01", 5 * MS) is None
    assert fd.receive(FailureDetector(3, 7, CFG).packet(PING) + b"x", 5 * MS) is None


def test_a_new_view_restarts_watching():
    fd = detector()
    assert fd.tick(80 * MS)[1] == [2, 3]
    fd.set_members((1, 3), now=100 * MS)
    assert fd.tick(105 * MS)[2] == []            # 2 left the view; 3's clock restarted
    assert fd.tick(180 * MS)[1] == [3]


@pytest.mark.parametrize("kwargs", [dict(interval=0.1, timeout=0.1), dict(interval=0, timeout=1), dict(verify=0)])
def test_bad_timers_are_config_errors(kwargs):
    with pytest.raises(ConfigError, match="FD"):
        FdConfig(**kwargs)


def test_only_well_formed_packets_of_the_cluster_are_signs_of_life():
    from groupcomm.core.ring import Ring, RingConfig
    from groupcomm.layers.multicast import Multicast
    from groupcomm.layers.wire import HEADER, PROTOCOL_VERSION, RING_MAGIC

    ring_config = RingConfig(cluster_id=7)
    layer = Multicast(1, ring_config, fd=CFG)
    layer.start(0)
    layer.fd.set_members((1, 2), now=0)
    peer = Ring(2, ring_config)
    peer.start(0)
    genuine = next(a.packet for a in peer.take() if hasattr(a, "packet"))     # node 2's join
    forged = [
        HEADER.pack(RING_MAGIC, PROTOCOL_VERSION, 99, 7, 2) + b"junk",        # no such packet type
        HEADER.pack(RING_MAGIC, PROTOCOL_VERSION + 1, 1, 7, 2),              # another version
        HEADER.pack(RING_MAGIC, PROTOCOL_VERSION, 1, 8, 2),                  # another cluster
        HEADER.pack(RING_MAGIC, PROTOCOL_VERSION, 1, 7, 2)[:11],             # truncated
    ]
    for packet in forged:
        layer.receive(70 * MS, packet)
    assert 2 in layer.fd.tick(80 * MS)[1], "garbage naming node 2 must not keep it alive"

    layer = Multicast(1, ring_config, fd=CFG)
    layer.start(0)
    layer.fd.set_members((1, 2), now=0)
    layer.receive(70 * MS, genuine)
    assert 2 not in layer.fd.tick(80 * MS)[1]


def test_the_detector_tracks_only_view_members():
    fd = detector()
    for stranger in range(100, 1100):
        fd.heard(stranger, 10 * MS)                 # packets from nodes outside the view
    fd.set_members((1, 2), now=20 * MS)             # 3 left the view
    assert len(fd._heard) == 1
    fd.heard(2, 70 * MS)
    assert fd.tick(90 * MS)[1] == []                # 2 was heard recently: no ping


def test_packets_are_answered_counted_and_dropped_by_kind():
    from groupcomm.layers.wire import HEADER, PROTOCOL_VERSION

    fd = detector()
    peer = FailureDetector(2, cluster_id=7, config=CFG)
    assert fd.receive(peer.packet(PING), 5 * MS) == 2            # a ping is answered with a pong to its sender
    assert fd.receive(peer.packet(HEARTBEAT), 5 * MS) is None
    assert fd.receive(peer.packet(PONG), 5 * MS) is None
    assert fd.drops == {} or all(v == 0 for v in fd.drops.values())
    cases = {
        "cluster": FailureDetector(2, cluster_id=8, config=CFG).packet(PING),
        "self": FailureDetector(1, cluster_id=7, config=CFG).packet(PING),
        "version": HEADER.pack(b"GF", PROTOCOL_VERSION + 1, PING, 7, 2),
    }
    for reason, packet in cases.items():
        assert fd.receive(packet, 5 * MS) is None
        assert fd.drops.get(reason) == 1, (reason, fd.drops)
    malformed = [
        HEADER.pack(b"GF", PROTOCOL_VERSION, 9, 7, 2),             # no such kind
        HEADER.pack(b"GF", PROTOCOL_VERSION, PING, 7, 0),          # no sender
        peer.packet(PING) + b"x",                                 # too long
        peer.packet(PING)[:-1],                                   # too short
    ]
    for packet in malformed:
        assert fd.receive(packet, 5 * MS) is None
    assert fd.drops.get("malformed") == len(malformed)


def test_only_a_valid_packet_is_a_sign_of_life():
    fd = detector()
    stranger = FailureDetector(2, cluster_id=8, config=CFG)
    fd.receive(stranger.packet(HEARTBEAT), 70 * MS)               # another cluster's node 2
    assert 2 in fd.tick(80 * MS)[1]
    fd = detector()
    fd.receive(FailureDetector(2, cluster_id=7, config=CFG).packet(HEARTBEAT), 70 * MS)
    assert 2 not in fd.tick(80 * MS)[1]


def test_the_next_deadline_is_the_earliest_of_heartbeat_ping_and_verification():
    fd = detector()
    fd.tick(0)                                      # heartbeat sent: the next one is due at 20 ms
    assert fd.next_deadline() == 20 * MS
    for t in range(20, 80, 20):
        fd.tick(t * MS)
        fd.heard(2, t * MS)
        fd.heard(3, t * MS)
    assert fd.next_deadline() == 80 * MS            # heartbeat at 80 ms; pings due at 60 + 80 ms
    fd.heard(2, 79 * MS)
    fd.tick(80 * MS)
    fd.tick(140 * MS)                               # 3 silent since 60 ms: pinged at 140 ms
    assert fd.next_deadline() == min(160 * MS, 140 * MS + 30 * MS, 79 * MS + 80 * MS)
    beat, ping, dead = fd.tick(170 * MS)
    assert dead == [3]
    assert fd.next_deadline() == 190 * MS            # 3 reported: the heartbeat (190) before 2's verification (200)


@pytest.mark.parametrize(
    "kwargs", [dict(interval=0.0), dict(interval=1.0, timeout=1.0), dict(interval=2.0, timeout=1.0), dict(verify=0.0)]
)
def test_bad_timer_settings_are_refused(kwargs):
    with pytest.raises(ConfigError, match="FD"):
        FdConfig(**kwargs)
