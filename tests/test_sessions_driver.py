"""The replicated session store on real channels (loopback stack, one process): the trio driver.

Faults (crashes, partitions, loss) are the simulation's job (tests/test_sessions_sim.py) and the
real-process tests'; here: the store's API, migration, serialized requests, evacuation, and the
middleware under a real server (Hypercorn) in front of two replicated stores.
"""

from __future__ import annotations

import contextlib
import random
import socket
import uuid

import httpx
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from groupcomm.io.channel import open_channel
from groupcomm.services.sessions.asgi import SessionMiddleware
from groupcomm.services.sessions.driver import ReplicatedSessionStore
from groupcomm.services.sessions.settings import SessionSettings


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ready(stores: list[ReplicatedSessionStore]) -> bool:
    cores = [s.core for s in stores]
    return (len({c.view_id for c in cores}) == 1
            and all(c.indexed and len(c.members) == len(stores) for c in cores))


@contextlib.asynccontextmanager
async def stores(count: int, settings: SessionSettings):
    """``count`` replicated stores of one application, each on its own loopback channel."""
    cluster, overrides = f"sess-{uuid.uuid4().hex[:8]}", {"UDP": {"mcast_port": free_udp_port()}}
    async with contextlib.AsyncExitStack() as stack:
        result = []
        for i in range(count):
            channel = await stack.enter_async_context(open_channel(
                "loopback", cluster=cluster, name=f"n{i + 1}", overrides=overrides))
            result.append(await stack.enter_async_context(ReplicatedSessionStore(channel, "shop", settings)))
        with trio.fail_after(20):
            while not ready(result):
                await trio.sleep(0.02)
        yield result


async def increment(store: ReplicatedSessionStore, session_id: str) -> int:
    async with store.session(session_id, create=False) as session:
        session.values["counter"] = session.values.get("counter", 0) + 1
        return session.values["counter"]


async def test_a_session_follows_its_requests_from_node_to_node_and_keeps_every_update():
    async with stores(3, SessionSettings(backups=1)) as (n1, n2, n3):
        with trio.fail_after(30):
            async with n1.session() as session:
                session.values["counter"] = 0
            sid = session.id
            for i, store in enumerate([n2, n3, n1, n3, n2] * 2, start=1):
                assert await increment(store, sid) == i
            holders = [s for s in (n1, n2, n3) if sid in s.core.held]
            assert holders == [n2]                                  # one holder: the last node asked
            assert sum(s.stats()["migrations_in"] for s in (n1, n2, n3)) == 9     # n2 twice in a row: no move
            with pytest.raises(KeyError):
                async with n3.session("A" * 21 + "A", create=False):
                    pass


async def test_concurrent_requests_for_one_session_on_three_nodes_are_serialized():
    async with stores(3, SessionSettings(backups=1)) as nodes:
        with trio.fail_after(60):
            async with nodes[0].session() as session:
                session.values["counter"] = 0
            rng = random.Random(7)
            seen: list[int] = []

            async def client(k: int) -> None:
                for _ in range(8):
                    seen.append(await increment(nodes[rng.randrange(3)], session.id))

            async with trio.open_nursery() as nursery:
                for k in range(5):
                    nursery.start_soon(client, k)
            assert sorted(seen) == list(range(1, 41))                # no two requests saw the same value
            assert await increment(nodes[1], session.id) == 41


async def test_a_node_that_stops_hands_its_sessions_to_the_others_first():
    async with stores(3, SessionSettings(backups=0)) as (n1, n2, n3):   # no copies: only evacuation saves them
        with trio.fail_after(60):
            ids = []
            for k in range(12):
                async with n3.session() as session:
                    session.values["counter"] = k
                ids.append(session.id)
            assert len(n3.core.held) == 12
            await n3.stop()                                           # what leaving its async-with does
            assert n3.stats()["evacuated"] == 12
            for k, sid in enumerate(ids):
                assert await increment(random.choice([n1, n2]), sid) == k + 1


async def test_the_middleware_over_two_replicated_stores_under_hypercorn():
    async def counter(scope, receive, send):
        session = scope["session"]
        session["counter"] = session.get("counter", 0) + 1
        body = str(session["counter"]).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": body})

    async with stores(2, SessionSettings(backups=1)) as nodes, trio.open_nursery() as nursery:
        with trio.fail_after(60):
            urls = []
            for store in nodes:
                config = Config()
                config.bind = ["127.0.0.1:0"]
                config.accesslog = config.errorlog = None
                binds = await nursery.start(lambda task_status, s=store, c=config: serve(
                    SessionMiddleware(counter, s), c, shutdown_trigger=trio.sleep_forever, task_status=task_status))
                urls.append(binds[0])
            async with httpx.AsyncClient() as client:
                answers = []
                for i in range(6):
                    answers.append((await client.get(urls[i % 2] + "/")).text)
                assert answers == [str(i) for i in range(1, 7)]
                cookie = client.cookies["GCSESSION"]
                assert cookie.endswith(".n2")                        # routing hint: the last holder
            nursery.cancel_scope.cancel()
