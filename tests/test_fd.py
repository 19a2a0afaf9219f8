"""The heartbeat failure detector, sans-IO: time is an argument."""

from __future__ import annotations

import pytest

from groupcomm.errors import ConfigError
from groupcomm.layers.fd import HEARTBEAT, PING, FailureDetector, FdConfig

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
