"""The ring's memory is bounded in bytes (issue 9, item 9).

* A member alone in its ring passes the token to itself; one ``tick`` call
  processes that token once, so one step orders at most ``max_messages`` ring
  messages (before: up to 64 visits per call, a whole 64 MiB send queue in
  one step on the loopback stack).
* ``retransmit_bytes`` bounds the ring messages every member keeps for
  retransmission: while one member lags (its aru holds the others'
  retransmission window open), nobody stamps more than
  ``retransmit_bytes / mtu`` messages past the oldest one kept.
"""

from __future__ import annotations

import dataclasses
import struct

import pytest

from groupcomm.core.ring import Ring, RingConfig, RingState
from groupcomm.errors import ConfigError
from groupcomm.events import Delivery
from tests.test_ring_fuzz import FAST, MCAST_FLAG_ENCAP, MCAST_FLAGS_AT, MSG_MCAST, HEADER, formed_cluster

SEQ_AT = MCAST_FLAGS_AT - 4


def alone(config: RingConfig) -> tuple[Ring, int]:
    """A member that formed its ring of one; returns it and the clock."""
    ring = Ring(1, config)
    now = 0
    ring.start(now)
    while ring.state is not RingState.OPERATIONAL:
        now = max(now, ring.next_deadline())
        ring.tick(now)
        ring.take()
    return ring, now


def test_a_member_alone_orders_one_token_visit_per_step() -> None:
    config = dataclasses.replace(FAST, mtu=64000)
    ring, now = alone(config)
    per_step = []
    for i in range(300):                          # one 60 kB message per ring message
        ring.submit(now, i.to_bytes(4, "big") * 15000)
        per_step.append(sum(1 for out in ring.take() if isinstance(out, Delivery)))
    while sum(per_step) < 300:
        now = max(now, ring.next_deadline())
        ring.tick(now)
        per_step.append(sum(1 for out in ring.take() if isinstance(out, Delivery)))
        assert len(per_step) < 1000
    assert max(per_step) <= config.max_messages, per_step
    assert ring.pending == 0


def stamped_seqs(wire, since: int) -> set[int]:
    """Sequence numbers of the regular ring messages sent since ``wire[since]``."""
    seqs = set()
    for _, _, packet in wire[since:]:
        if HEADER.unpack_from(packet)[2] == MSG_MCAST and not packet[MCAST_FLAGS_AT] & MCAST_FLAG_ENCAP:
            seqs.add(struct.unpack_from(">I", packet, SEQ_AT)[0])
    return seqs


@pytest.mark.parametrize("keep", [120, 300])
def test_retransmit_bytes_bounds_the_messages_in_flight_while_a_member_lags(keep: int) -> None:
    config = dataclasses.replace(FAST, retransmit_bytes=keep * FAST.mtu)
    cluster = formed_cluster((1, 2, 3), config=config)
    since = len(cluster.wire)
    cluster.drop_if = lambda src, dest, packet: dest == 3 and HEADER.unpack_from(packet)[2] == MSG_MCAST
    for i in range(1000):
        cluster.submit(1 + i % 2, i.to_bytes(2, "big") * 600)      # 1200 bytes: one per ring message
    cluster.run(0.15)                             # member 3 gets no message: the aru stays put
    stamped = stamped_seqs(cluster.wire, since)
    assert stamped, "nothing was sent"
    assert len(stamped) <= keep, (len(stamped), keep)
    assert len(stamped) >= keep - 2 * config.window_size      # the bound, not a stall, stopped them
    cluster.drop_if = None                        # member 3 hears again: everything flows
    assert cluster.run_until(lambda: all(len(d) == 1000 for d in cluster.deliveries.values()), 20.0)
    assert [d.payload for d in cluster.deliveries[3]] == [d.payload for d in cluster.deliveries[1]]


def test_retransmit_bytes_default_and_floor() -> None:
    assert RingConfig().retransmit_bytes == 32 << 20
    with pytest.raises(ConfigError, match="retransmit_bytes"):
        Ring(1, RingConfig(retransmit_bytes=RingConfig().mtu - 1))
    with pytest.raises(ConfigError, match="retransmit_bytes"):
        Ring(1, RingConfig(retransmit_bytes=2.5))
    Ring(1, RingConfig(retransmit_bytes=RingConfig().mtu))      # below 2 * window_size messages: that many
