"""The sessions frames: one validating decoder; hostile bytes are counted and dropped by the core."""

from __future__ import annotations

import msgpack
from hypothesis import given
from hypothesis import strategies as st

from groupcomm.events import RingId, View
from groupcomm.layers.spaces import SpaceView
from groupcomm.services.sessions.core import SessionCore
from groupcomm.services.sessions.ids import new_session_id
from groupcomm.services.sessions.wire import (
    Acquire,
    Handoff,
    Held,
    Holdings,
    MalformedFrame,
    Transfer,
    decode_frame,
    encode_frame,
)

VIEW = (1, 4, 2)


def test_every_frame_survives_its_wire_form():
    sid = new_session_id()
    for frame in (Acquire(VIEW, sid), Handoff(VIEW, sid, 2, 2**40, [1, 3]),
                  Holdings(VIEW, [Held(sid, True, 5, 6)], True), Transfer(VIEW, b"\x90", [])):
        assert decode_frame(encode_frame(frame)) == frame


@given(st.binary(max_size=200))
def test_the_decoder_raises_only_malformed_frame(raw):
    try:
        decode_frame(raw)
    except MalformedFrame:
        pass


@given(st.lists(st.one_of(st.integers(-5, 2**64), st.binary(max_size=30), st.text(max_size=30),
                          st.booleans(), st.none(), st.lists(st.integers(-1, 5), max_size=3)), max_size=6))
def test_near_miss_frames_are_refused_not_half_read(fields):
    raw = msgpack.packb([6, list(VIEW), *fields])        # an Acquire tag with arbitrary fields
    try:
        frame = decode_frame(raw)
    except MalformedFrame:
        return
    assert isinstance(frame, Acquire) and len(frame.id) == 22


def a_member_in_a_view() -> SessionCore:
    core = SessionCore(1, "n1")
    core.ring_view(View((1, 2), RingId(1, 4), False, True), 0.0)
    core.synced(0.0)
    core.space_view(SpaceView((1, 2), (1, 2), (), "groupcomm.sessions/shop", VIEW), 0.0)
    core.take()
    return core


@given(st.binary(max_size=300))
def test_hostile_bytes_from_a_peer_are_counted_and_dropped(raw):
    core = a_member_in_a_view()
    before = dict(core.counters())
    core.receive(2, raw, 1.0)                              # never raises
    core.space_message(2, raw, 1.0)
    after = core.counters()
    assert after["held"] == before["held"] == 0
    assert after["malformed"] >= before["malformed"]


def test_a_transfer_with_a_record_that_is_not_a_session_is_counted_and_dropped():
    core = a_member_in_a_view()
    core.receive(2, encode_frame(Transfer(VIEW, b"not a session", [2])), 1.0)
    assert core.counters()["malformed"] == 1 and not core.held
