"""What a Member does with the replies an application gives it (sans-IO, no network).

A member asks itself (``to=(me,)``): the request comes out of :meth:`Member.take`
as a :class:`SpaceRequest` and its answer goes through the same checks as one for
another member.  Found by mutation testing (tests/mutation.py): nothing pinned the
limits of a reply's value and error text.
"""

from __future__ import annotations

from groupcomm.core.ring import RingConfig
from groupcomm.layers.member import MAX_ERROR_TEXT, REPLY_OVERHEAD, Member
from groupcomm.layers.rpc import ALL, Reply, RequestDone
from groupcomm.layers.spaces import SpaceRequest
from groupcomm.layers.unicast import UnicastConfig

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
