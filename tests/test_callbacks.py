"""User callbacks (state providers and receivers, request handlers) never run inside a channel's
receive task: a slow one does not stall the ring, one that raises is counted and logged, and the
channel lives on.  Real channels on loopback."""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable

import pytest
import trio

from groupcomm.events import Message
from groupcomm.io.channel import Channel, open_channel
from groupcomm.layers.spaces import SpaceView
from tests.test_channel import FAST, loopback, unique_cluster, wait_for_view
from tests.test_space_channel import wait_until

SLOW = 2 * FAST.token_timeout
"""How long a slow callback blocks: a member whose loop stopped this long would be excluded."""


def spaces_stack(tmp_path, transfer_timeout: str = "500ms") -> str:
    """A stack file whose joiners ask another member after ``transfer_timeout`` without a snapshot."""
    path = tmp_path / "stack.toml"
    path.write_text('[[layer]]\nname = "UDP"\n\n[[layer]]\nname = "TOTEM"\n\n'
                    f'[[layer]]\nname = "SPACES"\nstate_transfer_timeout = "{transfer_timeout}"\n')
    return str(path)


async def until_set(flag: threading.Event, timeout: float = 10.0) -> None:
    """Wait (polling, without blocking this trio loop) for a flag another thread sets."""
    with trio.fail_after(timeout):
        while not flag.is_set():
            await trio.sleep(0.005)


async def in_own_thread(body: Callable[[], Awaitable[None]]) -> None:
    """Run ``body`` under a trio loop of its own in a worker thread: a member that blocks its
    loop there stalls only itself, as a member process would (the others must not exclude it)."""
    await trio.to_thread.run_sync(trio.run, body)


def ring_settled(ch: Channel) -> tuple[int, int]:
    """Counters that move when a member stops hearing the token (``token_losses``) or starts
    forming a new ring (``gather_entered``): a stalled member shows there before any view changes."""
    stats = ch.stats()
    return stats["token_losses"], stats["gather_entered"]


async def read_log(space, log: list, *, views: list | None = None) -> None:
    """The application: a log of the space's messages, in the total order."""
    async for event in space.events():
        if type(event) is Message:
            log.append(event.payload.decode())
        elif views is not None and type(event) is SpaceView:
            views.append((event, len(log)))


# ---------------------------------------------------------------------------
# Slow callbacks do not stall the ring
# ---------------------------------------------------------------------------


async def test_a_slow_state_provider_does_not_stall_the_ring_and_snapshots_at_the_join():
    udp, cluster = loopback(), unique_cluster()
    up, stop = threading.Event(), threading.Event()
    a_log: list[str] = []
    snapshots: list[list[str]] = []
    a_channel: list[Channel] = []

    async def member_a() -> None:
        async with open_channel(cluster=cluster, name="a", udp=udp, ring=FAST) as a:
            with trio.fail_after(10):
                await wait_for_view(a, 3)
            space = await a.join_space("log")

            def snapshot() -> bytes:
                time.sleep(SLOW)                   # a large state being serialised
                taken = list(a_log)                # read after the sleep: events() waited meanwhile
                snapshots.append(taken)
                return json.dumps(taken).encode()

            space.state_provider(snapshot)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_log, space, a_log)
                a_channel.append(a)
                up.set()
                while not stop.is_set():
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(in_own_thread, member_a)
        try:
            async with open_channel(cluster=cluster, name="b", udp=udp, ring=FAST) as b, \
                    open_channel(cluster=cluster, name="c", udp=udp, ring=FAST) as c:
                with trio.fail_after(30):
                    await wait_for_view(b, 3)
                    await wait_for_view(c, 3)
                    await until_set(up)
                    ring, settled = b.view.ring_id, [ring_settled(ch) for ch in (b, c)]
                    sb = await b.join_space("log")              # a provides, slowly
                    b_log: list[str] = []
                    b_views: list = []
                    c_log: list[str] = []
                    async with trio.open_nursery() as apps:
                        apps.start_soon(functools.partial(read_log, sb, b_log, views=b_views))
                        for i in range(40):
                            await sb.send(b"m%d" % i)
                        sc = await c.join_space("log")          # a provides again, slowly
                        sc.state_receiver(lambda state: c_log.extend(json.loads(state)))
                        apps.start_soon(read_log, sc, c_log)
                        for i in range(40, 80):
                            await sb.send(b"m%d" % i)
                        await wait_until(lambda: len(a_log) == len(b_log) == len(c_log) == 80, timeout=20)
                        apps.cancel_scope.cancel()
                    assert [ring_settled(ch) for ch in (b, c)] == settled       # the token never stalled
                    assert a_channel[0].view.ring_id == b.view.ring_id == c.view.ring_id == ring   # nobody left
                    assert a_log == b_log == c_log == [f"m{i}" for i in range(80)]
                    cut = next(at for view, at in b_views if c.address in view.joined)
                    assert snapshots == [[], b_log[:cut]]               # exactly the state at each join
        finally:
            stop.set()


async def test_a_slow_provider_of_a_member_that_does_not_iterate_runs_off_the_loop():
    udp, cluster = loopback(), unique_cluster()
    up, stop, asked = threading.Event(), threading.Event(), threading.Event()

    async def member_a() -> None:
        async with open_channel(cluster=cluster, name="a", udp=udp, ring=FAST) as a:
            with trio.fail_after(10):
                await wait_for_view(a, 2)
            space = await a.join_space("s")

            def snapshot() -> bytes:
                asked.set()
                time.sleep(SLOW)
                return b"the state of a"

            space.state_provider(snapshot)          # and never iterates space.events()
            up.set()
            while not stop.is_set():
                await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(in_own_thread, member_a)
        try:
            async with open_channel(cluster=cluster, name="b", udp=udp, ring=FAST) as b:
                with trio.fail_after(30):
                    await wait_for_view(b, 2)
                    await until_set(up)
                    ring, settled = b.view.ring_id, ring_settled(b)
                    got: list = []
                    sb = await b.join_space("s")
                    sb.state_receiver(got.append)
                    async with trio.open_nursery() as apps:
                        apps.start_soon(read_log, sb, [])
                        await until_set(asked)
                        await wait_until(lambda: got, timeout=10)
                        apps.cancel_scope.cancel()
                    assert got == [b"the state of a"]
                    assert ring_settled(b) == settled and b.view.ring_id == ring
        finally:
            stop.set()


async def test_a_slow_plain_request_handler_does_not_stall_deliveries():
    udp, cluster = loopback(), unique_cluster()
    started, release = threading.Event(), threading.Event()

    def slow(request) -> bytes:
        started.set()
        # Released by the test once the others delivered messages sent meanwhile; a handler
        # that held the loop would give up here instead.
        return b"released" if release.wait(timeout=3 * SLOW) else b"gave up"

    async with open_channel(cluster=cluster, name="a", udp=udp, ring=FAST) as a, \
            open_channel(cluster=cluster, name="b", udp=udp, ring=FAST) as b, \
            open_channel(cluster=cluster, name="c", udp=udp, ring=FAST) as c:
        with trio.fail_after(30):
            for ch in (a, b, c):
                await wait_for_view(ch, 3)
            ring, settled = a.view.ring_id, [ring_settled(ch) for ch in (a, b, c)]
            b.on_request(slow)
            replies: dict = {}

            async def ask() -> None:
                replies.update(await a.request(b"q", to=b.address, timeout=10.0))

            async def read(ch, count: int) -> None:
                seen = 0
                async for event in ch.events():
                    seen += type(event) is Message
                    if seen == count:
                        return

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask)
                await until_set(started)
                async with trio.open_nursery() as readers:
                    readers.start_soon(read, b, 10)
                    readers.start_soon(read, c, 10)
                    for i in range(10):
                        await a.send(b"%d" % i)
                release.set()
            assert replies[b.address].value == b"released"
            assert [ring_settled(ch) for ch in (a, b, c)] == settled
            assert a.view.ring_id == b.view.ring_id == c.view.ring_id == ring


# ---------------------------------------------------------------------------
# Callbacks that raise
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("iterate", [True, False], ids=["iterating", "not-iterating"])
async def test_a_provider_that_raises_is_counted_and_another_member_provides(tmp_path, caplog, iterate):
    stack, udp, cluster = spaces_stack(tmp_path), loopback(), unique_cluster()
    broken = False

    def provider_a() -> bytes:
        if broken:
            raise RuntimeError("cannot serialise")
        return b"state"

    async with open_channel(stack, cluster=cluster, name="a", udp=udp, ring=FAST) as a, \
            open_channel(stack, cluster=cluster, name="b", udp=udp, ring=FAST) as b, \
            open_channel(stack, cluster=cluster, name="c", udp=udp, ring=FAST) as c:
        with trio.fail_after(30):
            for ch in (a, b, c):
                await wait_for_view(ch, 3)
            ring = a.view.ring_id
            sa = await a.join_space("s")
            sa.state_provider(provider_a)
            async with trio.open_nursery() as apps:
                if iterate:
                    apps.start_soon(read_log, sa, [])
                sb = await b.join_space("s")                   # from a, which still works
                b_got: list = []
                sb.state_receiver(b_got.append)
                sb.state_provider(lambda: b"state")
                apps.start_soon(read_log, sb, [])
                await wait_until(lambda: b_got == [b"state"])
                broken = True
                got: list = []
                sc = await c.join_space("s")                   # a is asked first, and raises
                sc.state_receiver(got.append)
                c_log: list[str] = []
                apps.start_soon(read_log, sc, c_log)
                await wait_until(lambda: got, timeout=15)
                assert got == [b"state"]                       # from b, after c's timeout
                assert c.stats()["state_transfers_retried"] >= 1
                await sa.send(b"after")                        # a's channel lives on
                await wait_until(lambda: c_log == ["after"])
                apps.cancel_scope.cancel()
            assert a.stats()["callback_failures"] == 1
            assert a.view.ring_id == ring
    failures = [r for r in caplog.records if r.name == "groupcomm.spaces"]
    assert len(failures) == 1 and "state provider of space 's'" in failures[0].getMessage()
    assert failures[0].levelno == logging.ERROR and failures[0].exc_info is not None


@pytest.mark.parametrize("iterate", [True, False], ids=["iterating", "not-iterating"])
async def test_a_receiver_that_raises_is_counted_and_the_space_goes_on(caplog, iterate):
    udp, cluster = loopback(), unique_cluster()

    def provider() -> bytes:
        time.sleep(0.05)                 # the joiner registers its receiver first
        return b"state"

    def receiver(state) -> None:
        raise ValueError(f"cannot install {state!r}")

    async with open_channel(cluster=cluster, name="a", udp=udp, ring=FAST) as a, \
            open_channel(cluster=cluster, name="b", udp=udp, ring=FAST) as b:
        with trio.fail_after(30):
            await wait_for_view(a, 2)
            await wait_for_view(b, 2)
            sa = await a.join_space("s")
            sa.state_provider(provider)
            async with trio.open_nursery() as apps:
                apps.start_soon(read_log, sa, [])
                sb = await b.join_space("s")
                sb.state_receiver(receiver)
                b_log: list[str] = []
                if iterate:
                    apps.start_soon(read_log, sb, b_log)
                await wait_until(lambda: b.stats()["callback_failures"] == 1)
                await sa.send(b"after")
                if not iterate:
                    apps.start_soon(read_log, sb, b_log)
                await wait_until(lambda: b_log == ["after"])
                await sb.send(b"from b")                        # b's channel lives on
                await wait_until(lambda: b_log == ["after", "from b"])
                apps.cancel_scope.cancel()
            assert b.stats()["callback_failures"] == 1
    failures = [r for r in caplog.records if r.name == "groupcomm.spaces"]
    assert len(failures) == 1 and "state receiver of space 's'" in failures[0].getMessage()
    assert "cannot install b'state'" in failures[0].getMessage()


async def test_a_handler_that_raises_is_an_error_reply_and_counted():
    udp, cluster = loopback(), unique_cluster()

    async def async_handler(request) -> bytes:
        await trio.lowlevel.checkpoint()
        raise KeyError("async nope")

    def plain_handler(request) -> bytes:
        raise KeyError("plain nope")

    async with open_channel(cluster=cluster, name="a", udp=udp, ring=FAST) as a, \
            open_channel(cluster=cluster, name="b", udp=udp, ring=FAST) as b:
        with trio.fail_after(30):
            await wait_for_view(a, 2)
            sa, sb = await a.join_space("s"), await b.join_space("s")
            await wait_until(lambda: len(sa.members) == 2)
            sb.on_request(async_handler)
            b.on_request(plain_handler)
            replies = await sa.request(b"q", to=b.address, timeout=5.0)
            assert replies[b.address].status == "error"
            assert replies[b.address].error == "KeyError: 'async nope'"
            replies = await a.request(b"q", to=b.address, timeout=5.0)
            assert replies[b.address].error == "KeyError: 'plain nope'"
            sb.on_request(lambda request: "not bytes")
            replies = await sa.request(b"q", to=b.address, timeout=5.0)
            assert replies[b.address].error == "TypeError: request handler returned str, not bytes"
            assert b.stats()["callback_failures"] == 3
            sb.on_request(lambda request: b"fine")             # b still answers
            replies = await sa.request(b"q", timeout=5.0)
            assert replies[b.address].value == b"fine"


# ---------------------------------------------------------------------------
# The channel's flush
# ---------------------------------------------------------------------------


async def test_the_channel_never_flushes_inside_a_flush(monkeypatch):
    """Outputs whose handling calls the Member (a snapshot of a member that does not iterate, a
    leave on overflow) are acted on by the flush under way, not by a nested one."""
    depth = deepest = 0
    flush = Channel._flush

    def tracked(self) -> None:
        nonlocal depth, deepest
        depth += 1
        deepest = max(deepest, depth)
        try:
            flush(self)
        finally:
            depth -= 1

    monkeypatch.setattr(Channel, "_flush", tracked)
    udp, cluster = loopback(), unique_cluster()
    async with open_channel(cluster=cluster, name="a", udp=udp, ring=FAST) as a, \
            open_channel(cluster=cluster, name="b", udp=udp, ring=FAST) as b, \
            open_channel(cluster=cluster, name="slow", udp=udp, ring=FAST, max_pending_events=5) as slow:
        with trio.fail_after(30):
            for ch in (a, b, slow):
                await wait_for_view(ch, 3)
            sa = await a.join_space("s")
            sa.state_provider(lambda: b"state")                # a never iterates
            got: list = []
            sb = await b.join_space("s")
            sb.state_receiver(got.append)
            async with trio.open_nursery() as apps:
                apps.start_soon(read_log, sb, [])
                await wait_until(lambda: got == [b"state"])
                await slow.join_space("s")                     # never read: overflows
                for i in range(20):
                    await sb.send(b"%d" % i)
                await wait_until(lambda: slow.overflowed)
                apps.cancel_scope.cancel()
    assert deepest == 1


async def test_async_providers_and_receivers_are_awaited_in_order():
    udp, cluster = loopback(), unique_cluster()

    async def provider() -> bytes:
        await trio.sleep(SLOW)
        return b"async state"

    async with open_channel(cluster=cluster, name="a", udp=udp, ring=FAST) as a, \
            open_channel(cluster=cluster, name="b", udp=udp, ring=FAST) as b:
        with trio.fail_after(30):
            await wait_for_view(a, 2)
            await wait_for_view(b, 2)
            sa = await a.join_space("s")
            sa.state_provider(provider)
            seen: list = []

            async def receiver(state) -> None:
                await trio.sleep(0.05)
                seen.append(state)

            async def read_b(space) -> None:
                async for event in space.events():
                    if type(event) is Message:
                        seen.append(event.payload)

            async with trio.open_nursery() as apps:
                apps.start_soon(read_log, sa, [])
                sb = await b.join_space("s")
                sb.state_receiver(receiver)
                apps.start_soon(read_b, sb)
                await sa.send(b"later")
                await wait_until(lambda: len(seen) == 2)
                apps.cancel_scope.cancel()
            assert seen == [b"async state", b"later"]
