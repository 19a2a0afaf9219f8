"""What a Member does with replies, send_to and requests (found by mutation testing).

Replies, sans-IO: a member asks itself (``to=(me,)``), the request comes out of
:meth:`Member.take` as a :class:`SpaceRequest` and its answer goes through the
same checks as one for another member.  send_to and multicast requests: on a
SimCluster.  tests/mutation.py found nothing pinning the limits of a reply's value
and error text, send_to's refusals, or whom a space request waits for.
"""

from __future__ import annotations

import pytest

from groupcomm.core.ring import RingConfig
from groupcomm.errors import LocalProtocolError, MemberUnreachable, PayloadTooLarge
from groupcomm.layers.member import MAX_ERROR_TEXT, REPLY_OVERHEAD, Member
from groupcomm.layers.rpc import ALL, NONE, Reply, RequestDone
from groupcomm.layers.spaces import SpaceRequest
from groupcomm.layers.unicast import UnicastConfig
from groupcomm.layers.wire import DirectFrame, encode
from groupcomm.testing import SimCluster

LIMIT = 4096


def answer(reply: Reply) -> Reply:
    """The reply the requester gets when the application answers with ``reply``."""
    member = Member(1, RingConfig(), unicast=UnicastConfig(max_message=LIMIT))
    member.start(0)
    req_id = member.request(0, "", b"q", to=(1,), mode=ALL, timeout_us=1_000_000)
    (request,) = [o for o in member.take(0) if type(o) is SpaceRequest]
    assert request.req_id == req_id and request.requester == 1
    member.reply(0, request, reply)
    (done,) = [o for o in member.take(0) if type(o) is RequestDone]
    assert done.req_id == req_id and set(done.replies) == {1}
    return done.replies[1]


def test_a_reply_of_the_largest_value_travels_as_it_is():
    value = b"v" * (LIMIT - REPLY_OVERHEAD)
    assert answer(Reply(True, value, None, "ok")) == Reply(True, value, None, "ok")


def test_a_reply_one_byte_over_becomes_an_error_reply_saying_why():
    size = LIMIT - REPLY_OVERHEAD + 1
    reply = answer(Reply(True, b"v" * size, None, "ok"))
    assert reply == Reply(False, None, f"PayloadTooLarge: the reply of {size} bytes is over the limit of "
                                       f"{LIMIT - REPLY_OVERHEAD} bytes (UNICAST max_message less {REPLY_OVERHEAD})",
                          "error")


def test_an_error_text_is_cut_at_max_error_text():
    exact = "e" * MAX_ERROR_TEXT
    assert answer(Reply(False, None, exact, "error")).error == exact
    assert answer(Reply(False, None, exact + "!", "error")).error == exact + "..."


# -- send_to and multicast requests ----------------------------------------------------------


def test_send_to_refuses_what_it_cannot_send_and_says_why():
    member = Member(1, RingConfig())
    member.start(0)
    with pytest.raises(TypeError, match="^payload must be bytes, not str$"):
        member.send_to(0, 2, "text")
    with pytest.raises(LocalProtocolError, match="^send_to: a member cannot send to itself; use the payload directly$"):
        member.send_to(0, 1, b"x")
    with pytest.raises(MemberUnreachable, match="^member 2 is not in the current view$"):
        member.send_to(0, 2, b"x")                       # no view yet


def test_send_to_refuses_a_message_over_max_message_naming_the_call():
    sim = SimCluster(2, seed=0, stack="sim")
    assert sim.run_until(sim.converged, timeout=10)
    member = sim.layers(1)
    limit = member.unicast.config.max_message
    size = len(encode(DirectFrame(bytes(limit))))
    with pytest.raises(PayloadTooLarge, match=rf"^send_to: a message of {size} bytes \(payload and frame\) is "
                                              rf"over the limit of {limit} bytes \(UNICAST max_message\); send it "
                                              "in parts or raise the limit$"):
        member.send_to(sim.now_us, 2, bytes(limit))
    assert member.unicast.pending == 0                  # nothing was queued
    first = sim.services.send_to(1, 2, b"a")
    second = sim.services.send_to(1, 2, b"b")
    sim.run(0.2)
    assert first == [2, "ok"] and second == [2, "ok"]
    assert [d.payload for d in sim.services.direct(2)] == [b"a", b"b"]


def test_a_space_request_goes_to_the_members_of_the_space_where_it_is_delivered():
    sim = SimCluster(3, seed=0, stack="sim")
    assert sim.run_until(sim.converged, timeout=10)
    for n in (1, 2):
        sim.services.join(n, "kv")
        sim.services.on_request(n, "kv", lambda payload, requester, n=n: b"%d" % n)
    sim.run(0.2)
    handle = sim.services.request(1, "kv", b"q", mode=ALL, timeout=2.0)
    sim.run(0.3)
    assert handle.done and handle.finished - handle.started < 2.0       # 3, not in the space, is not waited for
    assert {m: r.value for m, r in handle.replies.items()} == {1: b"1", 2: b"2"}


def test_a_request_cancelled_before_its_delivery_is_ignored_there():
    sim = SimCluster(2, seed=0, stack="sim")
    assert sim.run_until(sim.converged, timeout=10)
    handle = sim.services.request(1, "", b"q", mode=ALL, timeout=2.0)
    sim.act(1, lambda member, now: member.cancel_request(handle.req_id))
    sim.run(0.5)                                        # delivered after the cancel: nothing happens
    assert not handle.done and sim.layers(1).rpc.in_flight == 0


def test_a_none_request_is_one_way_its_receivers_send_no_reply():
    sim = SimCluster(2, seed=0, stack="sim")
    assert sim.run_until(sim.converged, timeout=10)
    got = []
    sim.services.on_request(2, "", lambda payload, requester: got.append(payload) or b"nobody reads this")
    sent = sim.layers(2).unicast.stats()["sent"]
    for to in ((2,), None):                             # point to point, then through the ring
        sim.act(1, lambda member, now, to=to: member.request(now, "", b"%r" % (to,), to=to, mode=NONE,
                                                           timeout_us=1_000_000))
    sim.run(0.3)
    assert sorted(got) == [b"(2,)", b"None"]
    assert sim.layers(2).unicast.stats()["sent"] == sent        # no reply datagram (acks are not counted)
    assert sim.layers(1).rpc.in_flight == 0
