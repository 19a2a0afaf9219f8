"""Frames and datagrams of any shape, delivered to live members in the simulator.

Hypothesis draws arbitrary msgpack values, near-frames (a real op, then
anything), valid frames with one field broken, and random bytes, and hands
them to live members of a :class:`~groupcomm.testing.SimCluster` running the
production layers:

* as ring messages of the services kind submitted by a member, so every
  member delivers them in the total order;
* as UNICAST messages from one member to another;
* as raw datagrams (garbage behind each magic, other protocol versions).

No exception may escape, the drop counters must rise by exactly the frames
that fail validation, every payload handed to an application must be
``bytes``, and afterwards the members must still converge, agree on space
views and pass the EVS check.
"""

from __future__ import annotations

import logging

import msgpack
from hypothesis import example, given, settings
from hypothesis import strategies as st

from groupcomm.events import Direct
from groupcomm.layers import wire
from groupcomm.layers.quorum import QuorumConfig
from groupcomm.layers.rpc import RequestDone
from groupcomm.layers.spaces import SpaceMessage, SpaceRequest, StateInstalled
from groupcomm.testing import SimCluster

NODES = (1, 2, 3)
LIVE_SPACE = "liveness-check-after-the-fuzz"      # longer than any name the strategies draw


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def cluster(seed: int = 0) -> SimCluster:
    sim = SimCluster(len(NODES), seed=seed, stack="sim", quorum=QuorumConfig(expected_votes=len(NODES)))
    assert sim.run_until(sim.converged, timeout=10), "no ring formed"
    return sim


def watch_payloads(sim: SimCluster) -> list:
    """Every payload the members hand to their applications (checked to be bytes at the end)."""
    seen: list = []

    def observe(node: int, item) -> None:
        t = type(item)
        if t is SpaceMessage:
            seen.append(item.message.payload)
        elif t is SpaceRequest or t is Direct:
            seen.append(item.payload)
        elif t is StateInstalled and item.state is not None:
            seen.append(item.state)
        elif t is RequestDone:
            seen.extend(r.value for r in item.replies.values() if r.value is not None)

    sim.services.add_observer(observe)
    return seen


def submit_ring(sim: SimCluster, node: int, data: bytes) -> None:
    sim.act(node, lambda member, now: member.multicast.send(now, data, False, wire.KIND_SERVICES))


def send_unicast(sim: SimCluster, node: int, dest: int, data: bytes) -> None:
    sim.act(node, lambda member, now: member.unicast.send(now, dest, data))


def receive_datagram(sim: SimCluster, node: int, data: bytes) -> None:
    sim.act(node, lambda member, now: member.receive(now, data))


def check_views_agree(sim: SimCluster) -> None:
    seen: dict[tuple, tuple] = {}
    for node in sim.nodes:
        for view in sim.services.views(node):
            if view is not None:
                key = (view.space, view.view_id)
                assert seen.setdefault(key, view.members) == view.members, (key, seen[key], view.members)


def still_works(sim: SimCluster) -> None:
    """Afterwards: one ring of every live member, spaces agree and deliver, EVS holds."""
    assert sim.run_until(sim.converged, timeout=20), "the members did not converge again"
    for node in sim.live:
        sim.services.join(node, LIVE_SPACE)
    sim.run(0.3)
    sim.services.send(sim.live[0], LIVE_SPACE, b"still here")
    sim.run(0.3)
    for node in sim.live:
        assert [e.payload for e in sim.services.events(node, LIVE_SPACE) if hasattr(e, "payload")] == [b"still here"]
    check_views_agree(sim)
    sim.check()


def malformed(decode, data: bytes) -> bool:
    try:
        decode(data)
    except wire.MalformedFrame:
        return True
    return False


# ---------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12),
    lambda children: st.lists(children, max_size=6)
    | st.dictionaries(st.text(max_size=4) | st.integers(-3, 3), children, max_size=3),
    max_leaves=12,
)

NAMES = st.sampled_from(["a", "b", "é" * 128, "x" * 255])
POINTS = st.tuples(st.integers(0, 5), st.integers(0, 2**64 - 1), st.integers(-5, 5))
RING_TEMPLATES = st.one_of(
    st.builds(lambda s: [wire.JOIN, s], NAMES),
    st.builds(lambda s: [wire.LEAVE, s], NAMES),
    st.builds(lambda r, s: [wire.SYNC, list(r), [[s, True]], [0, 0], False, -1], st.tuples(st.integers(0, 5), st.integers(0, 9)), NAMES),
    st.builds(lambda s, p: [wire.DATA, s, p], NAMES, st.binary(max_size=8)),
    st.builds(lambda s: [wire.STATE_REQ, s], NAMES),
    st.builds(lambda s: [wire.STATE_DONE, s], NAMES),
    st.builds(lambda s, i, p: [wire.REQUEST, s, i, p], NAMES | st.just(""), st.integers(0, 2**64 - 1), st.binary(max_size=8)),
)
UNICAST_TEMPLATES = st.one_of(
    st.builds(lambda s, p, i, last: [wire.STATE_CHUNK, s, list(p), i, last, b"c"], NAMES, POINTS, st.integers(0, 3), st.booleans()),
    st.builds(lambda i: [wire.REPLY, i, True, b"v", None], st.integers(0, 2**64 - 1)),
    st.builds(lambda i: [wire.REPLY, i, False, None, "E: no"], st.integers(0, 2**64 - 1)),
    st.builds(lambda s, i, p: [wire.P2P_REQUEST, s, i, p], NAMES | st.just(""), st.integers(0, 2**64 - 1), st.binary(max_size=8)),
    st.builds(lambda p: [wire.DIRECT, p], st.binary(max_size=8)),
)
ALL_OPS = [wire.JOIN, wire.LEAVE, wire.SYNC, wire.DATA, wire.STATE_REQ, wire.STATE_DONE, wire.REQUEST,
           wire.STATE_CHUNK, wire.REPLY, wire.P2P_REQUEST, wire.DIRECT, 0, 8, 20, -1, 2**64 - 1]


@st.composite
def broken(draw, templates):
    """A valid frame with one field replaced by anything, one dropped, or one added."""
    frame = draw(templates)
    how = draw(st.sampled_from(["replace", "drop", "add"]))
    index = draw(st.integers(0, len(frame) - 1))
    if how == "replace":
        frame[index] = draw(msgpack_values)
    elif how == "drop":
        del frame[index]
    else:
        frame.insert(index, draw(msgpack_values))
    return frame


def pack(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def frame_bytes(templates) -> st.SearchStrategy[bytes]:
    return st.one_of(
        templates.map(pack),                                                   # valid (a forged but legal frame)
        broken(templates).map(pack),
        st.builds(lambda op, rest: [op, *rest], st.sampled_from(ALL_OPS), st.lists(msgpack_values, max_size=7)).map(pack),
        msgpack_values.map(pack),
        st.binary(max_size=48),
        st.builds(lambda frame, junk: pack(frame) + junk, templates, st.binary(min_size=1, max_size=4)),
    )


def scaled(divisor: int) -> int:
    """A share of the profile's examples (each example runs a whole cluster)."""
    return max(5, settings().max_examples // divisor)


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------


@settings(max_examples=scaled(4))
@given(frames=st.lists(st.tuples(st.sampled_from(NODES), frame_bytes(RING_TEMPLATES)), min_size=1, max_size=10))
@example(frames=[(1, msgpack.packb([wire.JOIN, 5]))])        # a JOIN naming an integer space...
@example(frames=[(2, msgpack.packb([wire.DATA, "a", "text"]))])
def test_ring_frames_of_any_shape(frames) -> None:
    sim = cluster()
    payloads = watch_payloads(sim)
    for node in (1, 2):
        sim.services.join(node, "a")
    sim.run(0.2)
    for node, data in frames:
        submit_ring(sim, node, data)
        sim.run(0.01)
    sim.run(0.3)
    expected = sum(malformed(wire.decode_ring, data) for _, data in frames)
    for node in NODES:                                   # delivered in total order: dropped everywhere alike
        assert sim.layers(node).spaces.dropped == expected
        assert sim.layers(node).dropped_frames["spaces"] == expected
    sim.crash(3)                                         # ... then a view that removes a member from every space
    still_works(sim)
    assert all(type(p) is bytes for p in payloads)


@settings(max_examples=scaled(4))
@given(messages=st.lists(st.tuples(st.sampled_from([(1, 2), (2, 1), (3, 1)]), frame_bytes(UNICAST_TEMPLATES)),
                         min_size=1, max_size=10))
@example(messages=[((1, 2), msgpack.packb([wire.DIRECT]))])    # the lone op: a point-to-point message without payload
def test_unicast_frames_of_any_shape(messages) -> None:
    sim = cluster()
    payloads = watch_payloads(sim)
    for node in NODES:
        sim.services.join(node, "a")
    sim.run(0.2)
    for (node, dest), data in messages:
        send_unicast(sim, node, dest, data)
        sim.run(0.01)
    sim.run(0.3)
    for dest in NODES:
        expected = sum(malformed(wire.decode_unicast, data) for (_, d), data in messages if d == dest)
        assert sim.layers(dest).unicast_frames_dropped == expected
        assert sim.layers(dest).dropped_frames["unicast_frames"] == expected
    still_works(sim)
    assert all(type(p) is bytes for p in payloads)


CLUSTER_OF_SIM = SimCluster(1, stack="sim").config.cluster_id
OTHER_VERSIONS = st.sampled_from([0, wire.PROTOCOL_VERSION + 1, 255])
MAGICS = st.sampled_from([wire.RING_MAGIC, wire.FD_MAGIC, wire.UNICAST_MAGIC, wire.PROBE_MAGIC])


def header(magic: bytes, version: int, ptype: int, cluster: int, sender: int) -> bytes:
    return wire.HEADER.pack(magic, version, ptype, cluster, sender)


SENDERS = st.sampled_from([0, 1, 2, 3, 99, 2**32 - 1])
CLUSTERS = st.sampled_from([CLUSTER_OF_SIM, CLUSTER_OF_SIM ^ 1])
TAILS = st.binary(max_size=80)
DATAGRAMS = st.one_of(
    # another protocol version behind every magic
    st.builds(lambda m, v, t, c, s, tail: header(m, v, t, c, s) + tail, MAGICS, OTHER_VERSIONS, st.integers(0, 255),
              CLUSTERS, SENDERS, TAILS),
    # garbage of this version for the Python layers (FD, UNICAST: every field random)
    st.builds(lambda m, t, c, s, tail: header(m, wire.PROTOCOL_VERSION, t, c, s) + tail,
              st.sampled_from([wire.FD_MAGIC, wire.UNICAST_MAGIC, wire.PROBE_MAGIC]), st.integers(0, 255),
              CLUSTERS, SENDERS, TAILS),
    # garbage of this version for the ring: another cluster, or a packet type it does not know
    st.builds(lambda t, s, tail: header(wire.RING_MAGIC, wire.PROTOCOL_VERSION, t, CLUSTER_OF_SIM ^ 1, s) + tail,
              st.integers(0, 255), SENDERS, TAILS),
    st.builds(lambda t, s, tail: header(wire.RING_MAGIC, wire.PROTOCOL_VERSION, t, CLUSTER_OF_SIM, s) + tail,
              st.sampled_from([0, 7, 8, 128, 255]), SENDERS, TAILS),
    # short and shapeless
    st.builds(lambda m, tail: m + tail, MAGICS, st.binary(max_size=14)),
    st.binary(max_size=64),
)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def wrong_version(data: bytes, magic: bytes) -> bool:
    return data[:2] == magic and len(data) > wire.VERSION_OFFSET and data[wire.VERSION_OFFSET] != wire.PROTOCOL_VERSION


@settings(max_examples=scaled(4))
@given(datagrams=st.lists(st.tuples(st.sampled_from(NODES), DATAGRAMS), min_size=1, max_size=25))
def test_datagrams_of_any_shape_and_version(datagrams) -> None:
    records = _Records()
    logger = logging.getLogger("groupcomm.wire")
    logger.addHandler(records)
    try:
        sim = cluster()
        before = {n: sim.layers(n).ring.stats()["drop_bad_version"] for n in NODES}
        for node, data in datagrams:
            receive_datagram(sim, node, data)
            sim.run(0.005)
        for node in NODES:
            mine = [data for n, data in datagrams if n == node]
            member = sim.layers(node)
            ring_versions = sum(wrong_version(d, wire.RING_MAGIC) and len(d) >= wire.HEADER_SIZE for d in mine)
            assert member.ring.stats()["drop_bad_version"] - before[node] == ring_versions
            assert member.unicast.drops.get("version", 0) == sum(wrong_version(d, wire.UNICAST_MAGIC) for d in mine)
            assert member.fd.drops.get("version", 0) == sum(wrong_version(d, wire.FD_MAGIC) for d in mine)
        assert len(records.messages) == len(set(records.messages)), "a (layer, peer, version) was logged twice"
        still_works(sim)
    finally:
        logger.removeHandler(records)


# ---------------------------------------------------------------------------
# The crashes this module was written for
# ---------------------------------------------------------------------------


def test_a_unicast_payload_of_only_the_direct_op_is_dropped() -> None:
    sim = cluster()
    send_unicast(sim, 1, 2, msgpack.packb([wire.DIRECT]))
    sim.run(0.2)
    assert sim.layers(2).unicast_frames_dropped == 1 and sim.services.direct(2) == []
    box = sim.services.send_to(1, 2, b"after")
    sim.run(0.2)
    assert box == [2, "ok"] and [d.payload for d in sim.services.direct(2)] == [b"after"]


def test_a_join_naming_an_integer_space_is_dropped_everywhere_and_a_later_crash_is_survived() -> None:
    sim = cluster()
    sim.services.join(2, "s")
    submit_ring(sim, 1, msgpack.packb([wire.JOIN, 5]))
    sim.run(0.3)
    assert [sim.layers(n).spaces.dropped for n in NODES] == [1, 1, 1]
    sim.crash(3)                                          # removing a member sorts the spaces by name
    assert sim.run_until(lambda: len(sim.live) == 2 and sim.converged(), timeout=10)
    check_views_agree(sim)
    sim.check()


def test_point_to_point_requests_with_the_channel_scope_are_answered_and_bad_scopes_dropped() -> None:
    sim = cluster()
    sim.services.on_request(2, "", lambda payload, requester: b"ok:" + payload)
    handle = sim.services.request(1, "", b"q", to=[2])
    sim.run(0.3)
    assert handle.done and handle.replies[2].value == b"ok:q"
    for scope in (None, 5, [5], "x" * 256):              # a list once crashed the handler lookup
        send_unicast(sim, 1, 2, msgpack.packb([wire.P2P_REQUEST, scope, 1, b"q"]))
    send_unicast(sim, 1, 2, msgpack.packb([wire.P2P_REQUEST]))
    sim.run(0.3)
    assert sim.layers(2).unicast_frames_dropped == 5
    still_works(sim)


def test_payloads_that_are_not_bytes_never_reach_an_application() -> None:
    sim = cluster()
    payloads = watch_payloads(sim)
    sim.services.on_request(2, "", lambda payload, requester: payload)
    for node in NODES:
        sim.services.join(node, "s")
    sim.run(0.2)
    submit_ring(sim, 1, msgpack.packb([wire.DATA, "s", "text"]))
    submit_ring(sim, 1, msgpack.packb([wire.DATA, "s", 5]))
    submit_ring(sim, 1, msgpack.packb([wire.REQUEST, "", 1, "text"]))
    send_unicast(sim, 1, 2, msgpack.packb([wire.DIRECT, "text"]))
    send_unicast(sim, 1, 2, msgpack.packb([wire.P2P_REQUEST, "", 1, 5]))
    send_unicast(sim, 2, 1, msgpack.packb([wire.REPLY, 1, True, "text", None]))
    sim.services.send(1, "s", b"bytes")
    sim.run(0.3)
    assert [sim.layers(n).spaces.dropped for n in NODES] == [3, 3, 3]
    assert sim.layers(2).unicast_frames_dropped == 2 and sim.layers(1).unicast_frames_dropped == 1
    assert payloads == [b"bytes"] * 3
