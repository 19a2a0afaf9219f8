"""ServiceSpaces, request-reply and state transfer through the public trio API, on loopback."""

from __future__ import annotations

import json

import pytest
import trio

import groupcomm
from groupcomm.io.channel import open_channel
from groupcomm.errors import LocalProtocolError
from groupcomm.events import Message
from tests.test_channel import FAST, loopback, unique_cluster, wait_for_view


async def wait_until(predicate, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


async def test_spaces_deliver_to_members_only_with_views_and_requests():
    udp, cluster = loopback(), unique_cluster()
    async with open_channel(cluster=cluster, name="a", udp=udp, ring=FAST) as a, \
            open_channel(cluster=cluster, name="b", udp=udp, ring=FAST) as b, \
            open_channel(cluster=cluster, name="c", udp=udp, ring=FAST) as c:
        for ch in (a, b, c):
            await wait_for_view(ch, 3)
        sa = await a.join_space("web")
        sb = await b.join_space("web")
        await wait_until(lambda: sa.members == sb.members and len(sa.members) == 2)
        assert set(sa.members) == {a.address, b.address}

        got: dict[str, list] = {"a": [], "b": []}

        async def read(name, space, count):
            async for ev in space.events():
                got[name].append(ev)
                if sum(type(e) is Message for e in got[name]) == count:
                    return

        async def answer(request):
            if request.payload == b"boom":
                raise KeyError("nope")
            return b"b says " + request.payload

        sb.on_request(answer)
        sa.on_request(answer)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, "a", sa, 4)
            nursery.start_soon(read, "b", sb, 4)
            for i in range(2):
                await sa.send(b"a%d" % i)
                await sb.send(b"b%d" % i, safe=True)
        order_a = [e.payload for e in got["a"] if type(e) is Message]
        assert order_a == [e.payload for e in got["b"] if type(e) is Message]
        assert sorted(order_a) == [b"a0", b"a1", b"b0", b"b1"]

        replies = await sa.request(b"hi", mode=groupcomm.ALL, timeout=2.0)
        assert set(replies) == {a.address, b.address}
        assert all(r.ok and r.status == "ok" and r.value == b"b says hi" for r in replies.values())

        replies = await sa.request(b"boom", to=b.address, mode=groupcomm.FIRST, timeout=2.0)
        assert replies[b.address].status == "error" and replies[b.address].error == "KeyError: 'nope'"

        # Channel-wide request with a member (c) that has no handler: an error, not a hang.
        replies = await a.request(b"x", mode=groupcomm.ALL, timeout=2.0)
        assert set(replies) == {a.address, b.address, c.address}
        assert all(r.status == "error" for r in replies.values())

        with pytest.raises(LocalProtocolError):
            await a.join_space("web")
        await sb.leave()
        await wait_until(lambda: sa.members == (a.address,))


async def test_a_request_times_out_exactly_and_a_crashed_member_is_left():
    udp, cluster = loopback(), unique_cluster()
    async with open_channel(cluster=cluster, name="a", udp=udp, ring=FAST) as a:
        async with open_channel(cluster=cluster, name="b", udp=udp, ring=FAST) as b:
            await wait_for_view(a, 2)
            b_addr = b.address
            sa, sb = await a.join_space("s"), await b.join_space("s")
            release = trio.Event()

            async def slow(request):
                await release.wait()
                return b"late"

            sb.on_request(slow)
            start = trio.current_time()
            replies = await sa.request(b"q", to=[b.address], timeout=0.3)
            elapsed = trio.current_time() - start
            assert replies[b.address].status == "timeout"
            assert 0.3 <= elapsed < 0.6
            release.set()
            call = None

            async def ask():
                nonlocal call
                call = await sa.request(b"q", to=[b.address], timeout=5.0)

            release = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask)
                await trio.sleep(0.05)
                b._stack = None                      # b dies without a word: crash, not leave
                b._closed = True
                nursery.cancel_scope.deadline = trio.current_time() + 4
        assert call is not None and call[b_addr].status == "left"


async def test_send_to_is_acknowledged_fifo_and_fails_for_non_members():
    udp, cluster = loopback(), unique_cluster()
    async with open_channel(cluster=cluster, name="a", udp=udp, ring=FAST) as a, \
            open_channel(cluster=cluster, name="b", udp=udp, ring=FAST) as b:
        await wait_for_view(a, 2)
        big = bytes(range(256)) * 4000                       # about 1 MB: fragmented by UNICAST
        for i in range(20):
            await a.send_to(b.address, b"%d" % i)
        await a.send_to(b.address, big)
        got = []
        with trio.fail_after(5):
            async for ev in b.events():
                if type(ev) is groupcomm.Direct:
                    assert ev.sender == a.address
                    got.append(ev.payload)
                    if len(got) == 21:
                        break
        assert got == [b"%d" % i for i in range(20)] + [big]
        with pytest.raises(groupcomm.MemberUnreachable, match="not in the current view"):
            await a.send_to(12345, b"x")
        with pytest.raises(LocalProtocolError):
            await a.send_to(a.address, b"x")


async def test_state_transfer_gives_a_joiner_the_state_at_its_join():
    udp, cluster = loopback(), unique_cluster()
    async with open_channel(cluster=cluster, name="a", udp=udp, ring=FAST) as a, \
            open_channel(cluster=cluster, name="b", udp=udp, ring=FAST) as b:
        await wait_for_view(a, 2)
        state_a: dict = {}
        state_b: dict = {}
        sa = await a.join_space("kv")
        sa.state_provider(lambda: json.dumps(state_a).encode())
        done_a = trio.Event()

        async def apply(space, state, done, upto):
            async for ev in space.events():
                if type(ev) is Message:
                    k, _, v = ev.payload.decode().partition("=")
                    state[k] = v
                    if k == upto:
                        done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(apply, sa, state_a, done_a, "k199")
            for i in range(100):
                await sa.send(f"k{i}={'v' * 500}".encode())
            sb_holder = []

            async def join_b():
                sb = await b.join_space("kv")
                sb.state_receiver(lambda s: state_b.update(json.loads(s)) if s else None)
                sb_holder.append(sb)

            nursery.start_soon(join_b)
            for i in range(100, 200):
                await sa.send(f"k{i}={'v' * 500}".encode())
            await wait_until(lambda: sb_holder)
            done_b = trio.Event()
            nursery.start_soon(apply, sb_holder[0], state_b, done_b, "k199")
            with trio.fail_after(10):
                await done_a.wait()
                await done_b.wait()
            nursery.cancel_scope.cancel()
        assert state_a == state_b and len(state_b) == 200


async def test_a_space_nobody_reads_overflows_by_the_channels_policy():
    udp, cluster = loopback(), unique_cluster()
    async with open_channel(cluster=cluster, name="a", udp=udp, ring=FAST) as a:
        async with open_channel(cluster=cluster, name="slow", udp=udp, ring=FAST, max_pending_events=20) as slow:
            await wait_for_view(a, 2)
            sa = await a.join_space("s")
            ss = await slow.join_space("s")
            for i in range(40):
                await sa.send(b"%d" % i)
            await wait_until(lambda: a.view is not None and len(a.view.members) == 1)
            seen = 0
            with trio.fail_after(10), pytest.raises(groupcomm.DeliveryOverflow, match="space 's'"):
                async for _ in ss.events():
                    seen += 1
            assert seen >= 20                       # what was queued before the member left, then the error


async def test_a_provider_that_has_not_started_iterating_answers_at_the_join_not_before():
    """The provider's events before the join still wait for it when the join is delivered (it is
    busy sending): its snapshot must include them.  Before, it was asked at once in a task and
    gave the state it had built so far (none of them): the joiner missed those increments."""
    udp, cluster = loopback(), unique_cluster()
    async with open_channel(cluster=cluster, name="a", udp=udp, ring=FAST) as a, \
            open_channel(cluster=cluster, name="b", udp=udp, ring=FAST) as b:
        await wait_for_view(a, 2)
        count = {"a": 0}
        sa = await a.join_space("counter")
        sa.state_provider(lambda: str(count["a"]).encode())
        for _ in range(5):
            await sa.send(b"1")
        await wait_until(lambda: a.stats()["messages_delivered"] >= 5)   # delivered, not yet iterated
        received = []
        sb = await b.join_space("counter")
        sb.state_receiver(lambda state: received.append(int(state or b"0")))
        await trio.sleep(0.3)                   # the join is delivered at a meanwhile; a still does not iterate
        async def apply(space, count_key):
            async for ev in space.events():    # a now applies its increments, then meets b's join
                if type(ev) is Message:
                    count[count_key] = count.get(count_key, 0) + 1

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(apply, sa, "a")
                nursery.start_soon(apply, sb, "b")     # b's iteration installs the state
                await wait_until(lambda: received)
                nursery.cancel_scope.cancel()
        assert received == [5]
