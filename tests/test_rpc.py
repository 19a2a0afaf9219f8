"""Request-reply bookkeeping (layers/rpc.py), sans-IO: who must answer, who did, when to stop."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from groupcomm.layers.rpc import (
    ALL, FIRST, LEFT, MAJORITY, NONE, ONE_WAY, TIMEOUT, Mode, Reply, RequestDone, RpcTracker,
    no_handler, reply_failed, reply_with,
)

MS = 1000
OK = Reply(True, b"yes", None, "ok")
ERR = Reply(False, None, "ValueError: no", "error")


def started(mode: Mode, targets=(1, 2, 3), timeout_ms: int = 100, scope: str = "s") -> tuple[RpcTracker, int]:
    rpc = RpcTracker()
    req = rpc.new_id()
    rpc.start(0, req, mode, timeout_ms * MS, scope, targets)
    return rpc, req


def test_all_waits_for_every_target_and_reports_each():
    rpc, req = started(ALL)
    rpc.reply(req, 1, OK)
    rpc.reply(req, 2, ERR)
    assert rpc.take() == []
    rpc.reply(req, 3, OK)
    assert rpc.take() == [RequestDone(req, {1: OK, 2: ERR, 3: OK})]
    assert rpc.in_flight == 0


def test_first_completes_at_the_first_answer_ok_or_error():
    rpc, req = started(FIRST)
    rpc.reply(req, 2, ERR)
    assert rpc.take() == [RequestDone(req, {2: ERR})]
    rpc.reply(req, 1, OK)                              # late: nobody waits any more
    assert rpc.take() == []


def test_first_does_not_count_members_that_left():
    rpc, req = started(FIRST)
    rpc.left("s", [1])
    assert rpc.take() == []
    rpc.reply(req, 3, OK)
    assert rpc.take() == [RequestDone(req, {1: LEFT, 3: OK})]


@pytest.mark.parametrize(("n", "needed"), [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3)])
def test_majority_needs_more_than_half_of_the_answers(n, needed):
    targets = tuple(range(1, n + 1))
    rpc, req = started(MAJORITY, targets)
    for member in targets[: needed - 1]:
        rpc.reply(req, member, OK)
    assert rpc.take() == [], f"completed with {needed - 1} of {n}"
    rpc.reply(req, targets[needed - 1], OK)
    assert [d.req_id for d in rpc.take()] == [req]


def test_majority_does_not_count_departures_as_answers():
    rpc, req = started(MAJORITY, (1, 2, 3))
    rpc.reply(req, 1, OK)
    rpc.left("s", [2])
    assert rpc.take() == []
    rpc.reply(req, 3, OK)
    assert rpc.take() == [RequestDone(req, {1: OK, 2: LEFT, 3: OK})]


def test_none_completes_at_once_with_nothing():
    rpc, req = started(NONE)
    assert rpc.take() == [RequestDone(req, {})]
    assert rpc.next_deadline() is None


def test_the_deadline_completes_every_pending_slot_as_a_failed_timeout():
    rpc, req = started(ALL, timeout_ms=100)
    rpc.reply(req, 1, OK)
    assert rpc.next_deadline() == 100 * MS
    rpc.tick(99 * MS)
    assert rpc.take() == []
    rpc.tick(100 * MS)
    (done,) = rpc.take()
    assert done.replies[1] == OK
    for member in (2, 3):
        timed_out = done.replies[member]
        assert timed_out == TIMEOUT
        assert timed_out.ok is False and timed_out.status == "timeout" and timed_out.value is None
        assert timed_out.error
    assert rpc.next_deadline() is None


def test_replies_before_the_multicast_is_delivered_wait_for_the_targets():
    rpc = RpcTracker()
    req = rpc.new_id()
    rpc.start(0, req, ALL, 100 * MS, "s", None)        # targets: whoever receives the multicast
    rpc.reply(req, 1, OK)                              # our own answer came first
    rpc.reply(req, 9, OK)                              # not in the space at the delivery point
    assert rpc.take() == []
    rpc.fix_targets(req, [1, 2])
    assert rpc.take() == []
    rpc.reply(req, 2, ERR)
    assert rpc.take() == [RequestDone(req, {1: OK, 2: ERR})]


def test_an_empty_scope_completes_at_delivery():
    rpc = RpcTracker()
    req = rpc.new_id()
    rpc.start(0, req, ALL, 100 * MS, "s", None)
    rpc.fix_targets(req, [])
    assert rpc.take() == [RequestDone(req, {})]


def test_strangers_duplicates_and_unknown_requests_change_nothing():
    rpc, req = started(ALL, (1, 2))
    rpc.reply(req, 7, OK)                              # not asked
    rpc.reply(req, 1, ERR)
    rpc.reply(req, 1, OK)                              # a second answer from 1 does not replace the first
    rpc.reply(req + 1000, 2, OK)                       # no such request
    assert rpc.take() == []
    rpc.reply(req, 2, OK)
    assert rpc.take() == [RequestDone(req, {1: ERR, 2: OK})]


def test_leaving_another_scope_or_the_cluster():
    rpc, req = started(ALL, (1, 2), scope="a")
    rpc.left("b", [1])                                 # another space: not ours
    assert rpc.take() == []
    rpc.left(None, [1, 2])                             # left the cluster: every scope
    assert rpc.take() == [RequestDone(req, {1: LEFT, 2: LEFT})]
    assert LEFT.ok is False and LEFT.status == "left"


def test_a_departure_reaches_every_request_whatever_comes_before_it_in_the_table():
    rpc = RpcTracker()
    other, undelivered, mine = rpc.new_id(), rpc.new_id(), rpc.new_id()
    rpc.start(0, other, ALL, 100 * MS, "b", (1, 2))      # another space
    rpc.start(0, undelivered, ALL, 100 * MS, "a", None)  # targets not known yet
    rpc.start(0, mine, ALL, 100 * MS, "a", (1, 2))
    rpc.left("a", [1, 2])
    assert rpc.take() == [RequestDone(mine, {1: LEFT, 2: LEFT})]
    assert rpc.in_flight == 2


def test_cancelling_an_unknown_or_finished_request_is_harmless():
    rpc, req = started(NONE)
    rpc.cancel(req)
    rpc.cancel(req + 99)
    assert rpc.in_flight == 0


def test_a_cancelled_request_never_completes():
    rpc, req = started(ALL, timeout_ms=10)
    rpc.cancel(req)
    rpc.reply(req, 1, OK)
    rpc.tick(50 * MS)
    assert rpc.take() == [] and rpc.in_flight == 0


def test_ids_are_distinct_and_the_earliest_deadline_wins():
    rpc = RpcTracker()
    a, b = rpc.new_id(), rpc.new_id()
    assert a != b
    rpc.start(0, a, ALL, 300 * MS, "", (1,))
    rpc.start(0, b, ALL, 100 * MS, "", (1,))
    assert rpc.next_deadline() == 100 * MS


def test_a_none_request_is_one_way_and_never_tracked():
    rpc = RpcTracker()
    assert rpc.new_id(NONE) == ONE_WAY and rpc.new_id(NONE) == ONE_WAY      # receivers do not reply to it
    assert rpc.new_id(ALL) != ONE_WAY
    rpc.start(5, ONE_WAY, NONE, 100 * MS, "s", (1, 2))
    rpc.start(6, ONE_WAY, NONE, 100 * MS, "s", None)
    assert rpc.take() == [RequestDone(ONE_WAY, {})] * 2
    assert rpc.in_flight == 0 and rpc.next_deadline() is None
    rpc.reply(ONE_WAY, 1, OK)                             # an older peer's reply all the same: nobody waits
    assert rpc.take() == []


def test_next_deadline_skips_requests_already_complete_and_tick_completes_only_those_due():
    rpc = RpcTracker()
    ids = [rpc.new_id() for _ in range(3)]
    for req, timeout in zip(ids, (300, 100, 200)):
        rpc.start(0, req, ALL, timeout * MS, "s", (1,))
    assert rpc.next_deadline() == 100 * MS
    rpc.reply(ids[1], 1, OK)
    rpc.cancel(ids[2])
    assert rpc.take() == [RequestDone(ids[1], {1: OK})]
    assert rpc.next_deadline() == 300 * MS
    rpc.tick(299 * MS)
    assert rpc.take() == []
    rpc.tick(300 * MS)
    assert rpc.take() == [RequestDone(ids[0], {1: TIMEOUT})] and rpc.next_deadline() is None


def test_reply_helpers():
    assert reply_with(b"x") == Reply(True, b"x", None, "ok")
    assert reply_with(memoryview(b"xy")).value == b"xy"
    with pytest.raises(TypeError, match="returned str, not bytes"):
        reply_with("x")
    failed = reply_failed(KeyError("k"))
    assert failed.ok is False and failed.status == "error" and failed.error.startswith("KeyError")
    missing = no_handler("kv")
    assert missing.ok is False and missing.status == "error" and "'kv'" in missing.error


# -- against a model ----------------------------------------------------------------------

EVENTS = st.lists(
    st.one_of(
        st.tuples(st.just("reply"), st.integers(1, 5), st.booleans()),
        st.tuples(st.just("left"), st.integers(1, 5)),
        st.tuples(st.just("tick"), st.integers(0, 150)),
    ),
    max_size=12,
)


@given(mode=st.sampled_from([ALL, FIRST, MAJORITY]), n=st.integers(1, 5), events=EVENTS)
def test_the_tracker_completes_exactly_when_the_mode_is_satisfied(mode, n, events):
    targets = tuple(range(1, n + 1))
    rpc, req = started(mode, targets, timeout_ms=100)
    replies: dict[int, Reply] = {}
    done = None
    now = 0
    for event in events:
        was_done = done is not None
        if event[0] == "reply":
            member, ok = event[1], event[2]
            rpc.reply(req, member, OK if ok else ERR)
            if done is None and member in targets:
                replies.setdefault(member, OK if ok else ERR)
        elif event[0] == "left":
            rpc.left("s", [event[1]])
            if done is None and event[1] in targets:
                replies.setdefault(event[1], LEFT)
        else:
            now = max(now, event[1] * MS)
            rpc.tick(now)
            if done is None and now >= 100 * MS:
                for member in targets:
                    replies.setdefault(member, TIMEOUT)
                done = dict(replies)
        answered = sum(1 for r in replies.values() if r.status in ("ok", "error"))
        if done is None and (
            len(replies) == n
            or (mode is FIRST and answered >= 1)
            or (mode is MAJORITY and answered > n // 2)
        ):
            done = dict(replies)
        out = rpc.take()
        completed_now = done is not None and not was_done
        assert out == ([RequestDone(req, done)] if completed_now else [])
        assert (done is None) == (rpc.in_flight == 1)
