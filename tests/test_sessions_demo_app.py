"""The demo application (counter per session, idempotent increments) under SessionMiddleware, in process."""

from __future__ import annotations

import httpx
import trio

from groupcomm.services.sessions.asgi import SessionMiddleware
from groupcomm.services.sessions.demo_app import REMEMBERED_REQUESTS, demo_app
from groupcomm.services.sessions.memory import MemorySessionStore


def client(store: MemorySessionStore, stats=None) -> httpx.AsyncClient:
    app = SessionMiddleware(demo_app(store.node_name, stats), store)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


async def incr(http: httpx.AsyncClient, request_id: str) -> dict:
    response = await http.post("/incr", headers={"x-request-id": request_id})
    assert response.status_code == 200, response.text
    return response.json()


async def test_each_distinct_request_id_counts_once():
    store = MemorySessionStore("node-a")
    async with client(store) as http:
        assert (await http.get("/")).json() == {"node": "node-a", "counter": 0, "session": None}
        assert len(store) == 0                                   # reading creates no session
        assert await incr(http, "r1") == {"node": "node-a", "counter": 1, "applied": True}
        assert await incr(http, "r2") == {"node": "node-a", "counter": 2, "applied": True}
        state = (await http.get("/")).json()
        assert state["counter"] == 2 and state["session"] == store.session_ids()[0]


async def test_a_retried_request_id_is_not_counted_twice():
    store = MemorySessionStore("node-a")
    async with client(store) as http:
        await incr(http, "r1")
        await incr(http, "r2")
        assert await incr(http, "r1") == {"node": "node-a", "counter": 2, "applied": False}
        assert await incr(http, "r2") == {"node": "node-a", "counter": 2, "applied": False}
        version = store.version(store.session_ids()[0])
        await incr(http, "r2")
        assert store.version(store.session_ids()[0]) == version  # a retry changes nothing: no save


async def test_only_the_last_request_ids_are_remembered():
    store = MemorySessionStore("node-a")
    async with client(store) as http:
        for n in range(REMEMBERED_REQUESTS + 1):
            await incr(http, f"r{n}")
        values = store.values(store.session_ids()[0])
        assert values is not None and len(values["applied"]) == REMEMBERED_REQUESTS
        assert (await incr(http, f"r{REMEMBERED_REQUESTS}"))["applied"] is False
        assert (await incr(http, "r0"))["applied"] is True       # forgotten: bounded memory


async def test_counters_of_sessions_are_independent():
    store = MemorySessionStore("node-a")
    async with client(store) as alice, client(store) as bob:
        await incr(alice, "same-id")
        await incr(alice, "a2")
        assert await incr(bob, "same-id") == {"node": "node-a", "counter": 1, "applied": True}
        assert (await alice.get("/")).json()["counter"] == 2
        assert (await bob.get("/")).json()["counter"] == 1
        assert len(store) == 2


async def test_a_missing_or_malformed_request_id_is_a_400_and_counts_nothing():
    store = MemorySessionStore("node-a")
    async with client(store) as http:
        assert (await http.post("/incr")).status_code == 400
        assert (await http.post("/incr", headers={"x-request-id": "a b"})).status_code == 400
        assert (await http.post("/incr", headers={"x-request-id": "x" * 129})).status_code == 400
        assert len(store) == 0


async def test_stats_healthz_and_unknown_routes():
    store = MemorySessionStore("node-a")
    async with client(store, stats=lambda: {"held": len(store), "failovers": 0}) as http:
        await incr(http, "r1")
        assert (await http.get("/stats")).json() == {"held": 1, "failovers": 0}
        health = await http.get("/healthz")
        assert (health.status_code, health.text) == (200, "ok\n")
        assert (await http.get("/nowhere")).status_code == 404
        wrong = await http.get("/incr")
        assert (wrong.status_code, wrong.headers["allow"]) == (405, "POST")
    async with client(store) as http:
        assert (await http.get("/stats")).status_code == 404     # a store without stats


async def test_lifespan_startup_and_shutdown_complete():
    app = demo_app("node-a")
    inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict] = []

    async def receive():
        return inbox.pop(0)

    async def send(message):
        sent.append(message)

    with trio.fail_after(5):
        await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
