"""io/space.py's Services on a stand-in channel: how requests are served and answered."""

from __future__ import annotations

import trio

import groupcomm
from groupcomm.errors import QueueFull
from groupcomm.io.space import Services
from groupcomm.layers.rpc import ONE_WAY
from groupcomm.layers.spaces import SpaceRequest


class FakeMember:
    """Records what Services asks of the sans-IO Member."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def reply(self, now, request, reply) -> None:
        self.calls.append(("reply", request.req_id, reply))

    def cancel_request(self, req_id) -> None:
        self.calls.append(("cancel", req_id))

    def request(self, now, scope, payload, *, to, mode, timeout_us) -> int:
        self.calls.append(("request", scope, payload, to, mode))
        return ONE_WAY if mode is groupcomm.NONE else 1


class FakeChannel:
    """The ChannelSurface Services needs: member calls run at once, tasks in a nursery."""

    address = 1
    join_timeout = 1.0
    max_pending_events = max_pending_bytes = 1 << 20
    overflowed = False
    overflow_reason = ""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.member = FakeMember()
        self.nursery = nursery

    full = 0                                         # calls to refuse with QueueFull (the send queue is full)
    waited = 0

    def call_member(self, action, *, quiet: bool = False) -> None:
        if self.full:
            self.full -= 1
            raise QueueFull("full")
        action(0, self.member)

    async def call_member_when_room(self, action) -> None:
        self.waited += 1
        await trio.lowlevel.checkpoint()
        action(0, self.member)

    def start_soon(self, fn, *args) -> None:
        self.nursery.start_soon(fn, *args)

    def leave_on_overflow(self, reason: str = "") -> None:
        raise AssertionError(reason)


async def test_a_one_way_request_runs_its_handler_and_sends_no_reply():
    handled = []

    async def handler(request):
        handled.append(request.payload)
        return b"nobody reads this"

    async with trio.open_nursery() as nursery:
        channel = FakeChannel(nursery)
        services = Services(channel)
        services.handlers["web"] = handler
        serve = services.routes()[SpaceRequest]
        serve(SpaceRequest("web", 2, ONE_WAY, b"one-way"))
        serve(SpaceRequest("web", 2, 5, b"asked"))
        serve(SpaceRequest("other", 2, ONE_WAY, b"no handler"))       # not answered either
    assert sorted(handled) == [b"asked", b"one-way"]
    assert [(kind, req_id) for kind, req_id, _ in channel.member.calls] == [("reply", 5)]


async def test_a_none_request_returns_empty_at_once_without_waiting():
    async with trio.open_nursery() as nursery:
        channel = FakeChannel(nursery)
        services = Services(channel)
        with trio.fail_after(1):                    # no RequestDone ever comes from the fake member
            assert await services.request("web", b"x", to=(2, 3), mode=groupcomm.NONE, timeout=5.0) == {}
    assert channel.member.calls == [("request", "web", b"x", (2, 3), groupcomm.NONE)]


async def test_a_request_waits_for_room_only_when_the_send_queue_is_full():
    async with trio.open_nursery() as nursery:
        channel = FakeChannel(nursery)
        services = Services(channel)
        for full in (0, 1):
            channel.full = full
            with trio.move_on_after(0.05):            # the fake member never answers
                await services.request("web", b"x", to=2, mode=groupcomm.ALL, timeout=5.0)
    assert channel.waited == 1                        # the second asked again once there was room
    assert [c[0] for c in channel.member.calls] == ["request", "cancel", "request", "cancel"]
