"""SessionMiddleware (plain ASGI) over MemorySessionStore: cookies, saving before sending, errors.

Most tests drive the middleware through httpx's ASGITransport; the ordering tests
call it with hand-made ASGI messages to see exactly what leaves when; the last test
runs it under a real server (Hypercorn on trio) with real HTTP requests.
"""

from __future__ import annotations

import asyncio
import logging
import math

import httpx
import pytest
import trio
import trio.lowlevel
import trio.testing
from hypercorn.config import Config
from hypercorn.trio import serve
from hypothesis import given
from hypothesis import strategies as st

from groupcomm.services.sessions.asgi import (
    RequestSession,
    SessionData,
    SessionMiddleware,
)
from groupcomm.services.sessions.errors import SessionUnavailable
from groupcomm.services.sessions.ids import new_session_id, parse_cookie_value
from groupcomm.services.sessions.memory import MemorySessionStore
from groupcomm.services.sessions.record import Limits


async def counter_app(scope, receive, send):
    """/inc counts, /read reads, /logout invalidates, /boom raises; answers the count."""
    session = scope["session"]
    path = scope["path"]
    if path == "/inc":
        session["count"] = session.get("count", 0) + 1
    elif path == "/logout":
        session.invalidate()
    elif path == "/login":                           # a new id on login: no session fixation
        session.invalidate()
        session["count"] = 100
    elif path == "/boom":
        session["count"] = -1
        raise RuntimeError("the app failed")
    elif path == "/slow-inc":
        count = session.get("count", 0)
        await trio.sleep(0.01)                       # another request for the session would interleave here
        session["count"] = count + 1
    elif path == "/big":
        session["blob"] = "x" * 1000
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": str(session.get("count", 0)).encode()})


def client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


def set_cookie(response: httpx.Response) -> str | None:
    values = response.headers.get_list("set-cookie")
    assert len(values) <= 1
    return values[0] if values else None


class Recorder:
    """A downstream ``send`` that logs what leaves (shared log with the store)."""

    def __init__(self, log: list) -> None:
        self.log = log
        self.messages: list[dict] = []

    async def __call__(self, message) -> None:
        self.log.append(message["type"])
        self.messages.append(message)

    def headers(self) -> dict[bytes, bytes]:
        return dict(self.messages[0]["headers"])


class LoggingStore(MemorySessionStore):
    """A memory store that logs saves; each save may wait for the test to let it finish."""

    def __init__(self, log: list, **kw) -> None:
        super().__init__("node-a", **kw)
        self.log = log
        self.gate: trio.Event | None = None
        self.saving = trio.Event()

    async def save(self, session: SessionData) -> None:
        self.log.append("save-start")
        self.saving.set()
        if self.gate is not None:
            await self.gate.wait()
        await super().save(session)
        self.log.append("save-done")


async def receive_nothing():
    return {"type": "http.request", "body": b"", "more_body": False}


def http_scope(path: str, cookie: bytes | None = None) -> dict:
    headers = [(b"host", b"testserver")] + ([(b"cookie", cookie)] if cookie is not None else [])
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "headers": headers, "client": ("127.0.0.1", 1), "server": ("testserver", 80)}


async def test_a_cookie_only_once_the_app_writes():
    store = MemorySessionStore("node-a")
    async with client(SessionMiddleware(counter_app, store)) as http:
        read = await http.get("/read")
        assert (read.text, set_cookie(read), len(store)) == ("0", None, 0)
        first = await http.get("/inc")
        cookie = set_cookie(first)
        assert first.text == "1" and cookie is not None
        name_value, *attributes = cookie.split("; ")
        assert attributes == ["Path=/", "HttpOnly", "SameSite=Lax"]
        name, value = name_value.split("=", 1)
        session_id, hint = parse_cookie_value(value)
        assert (name, hint, len(store)) == ("GCSESSION", "node-a", 1)
        again = await http.get("/inc")
        assert again.text == "2" and set_cookie(again) is None          # the client has it already
        assert store.values(session_id) == {"count": 2}


async def test_the_counter_counts_across_requests_and_clients():
    store = MemorySessionStore("node-a")
    app = SessionMiddleware(counter_app, store)
    async with client(app) as alice, client(app) as bob:
        for n in range(1, 6):
            assert (await alice.get("/inc")).text == str(n)
        assert (await bob.get("/inc")).text == "1"
        assert (await alice.get("/read")).text == "5"
    assert sorted(store.version(sid) for sid in store.session_ids()) == [1, 5]


async def test_cookie_attributes_follow_the_configuration():
    store = MemorySessionStore("node a/1")
    app = SessionMiddleware(counter_app, store, cookie_name="sid", cookie_path="/shop", secure=True,
                            same_site="strict", max_age=600, routing_hint=True)
    async with client(app) as http:
        cookie = set_cookie(await http.get("/inc"))
        name_value, *attributes = cookie.split("; ")
        assert attributes == ["Path=/shop", "Max-Age=600", "HttpOnly", "Secure", "SameSite=Strict"]
        assert parse_cookie_value(name_value.split("=", 1)[1])[1] == "node-a-1"
    plain = SessionMiddleware(counter_app, MemorySessionStore("node-a"), routing_hint=False)
    async with client(plain) as http:
        value = set_cookie(await http.get("/inc")).split("; ")[0].split("=", 1)[1]
        assert parse_cookie_value(value)[1] is None


def test_bad_configurations_are_refused():
    store = MemorySessionStore()
    for bad in ({"same_site": "none"}, {"same_site": "sometimes"}, {"cookie_name": "a b"},
                {"cookie_path": "/x;y"}, {"max_age": 0}, {"buffer_limit": -1}):
        with pytest.raises(ValueError):
            SessionMiddleware(counter_app, store, **bad)
    SessionMiddleware(counter_app, store, same_site="none", secure=True)


async def test_invalidate_forgets_the_session_and_clears_the_cookie():
    store = MemorySessionStore("node-a")
    async with client(SessionMiddleware(counter_app, store)) as http:
        await http.get("/inc")
        await http.get("/inc")
        out = await http.get("/logout")
        assert set_cookie(out).startswith("GCSESSION=; Path=/; Max-Age=0;")
        assert len(store) == 0 and not http.cookies
        fresh = await http.get("/inc")
        assert fresh.text == "1" and set_cookie(fresh) is not None      # a new session, a new id


async def test_writing_after_invalidate_starts_a_session_under_a_new_id():
    store = MemorySessionStore("node-a")
    async with client(SessionMiddleware(counter_app, store)) as http:
        await http.get("/inc")
        (before,) = store.session_ids()
        out = await http.get("/login")
        (after,) = store.session_ids()
        assert out.text == "100" and after != before
        assert f"GCSESSION={after}.node-a;" in set_cookie(out)
        assert (await http.get("/inc")).text == "101"


async def test_an_unknown_session_is_no_session_and_its_cookie_is_cleared():
    store = MemorySessionStore("node-a")
    async with client(SessionMiddleware(counter_app, store)) as http:
        http.cookies.set("GCSESSION", f"{new_session_id()}.node-b")
        out = await http.get("/read")
        assert out.status_code == 200 and out.text == "0"
        assert "Max-Age=0" in set_cookie(out) and len(store) == 0


async def test_a_foreign_hint_is_not_trusted_but_corrected():
    store = MemorySessionStore("node-a")
    async with client(SessionMiddleware(counter_app, store)) as http:
        await http.get("/inc")
        (session_id,) = store.session_ids()
        http.cookies.clear()
        http.cookies.set("GCSESSION", f"{session_id}.elsewhere")
        out = await http.get("/read")
        assert out.text == "1" and f"GCSESSION={session_id}.node-a;" in set_cookie(out)


cookie_bytes = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.lists(st.sampled_from(["GCSESSION", "=", ";", " ", '"', ".", "A" * 21 + "Q", "node", "\x00", "é"]),
             max_size=30).map(lambda parts: "".join(parts).encode("utf-8")),
)


@given(cookie=cookie_bytes, path=st.sampled_from(["/read", "/inc", "/logout"]))
def test_hostile_cookies_never_cause_an_error(cookie, path):
    store = MemorySessionStore("node-a")

    async def one_request():
        sent = Recorder([])
        await SessionMiddleware(counter_app, store)(http_scope(path, cookie), receive_nothing, sent)
        return sent

    sent = trio.run(one_request)
    assert sent.messages[0]["status"] == 200
    assert sent.messages[1]["body"] == (b"1" if path == "/inc" else b"0")
    assert len(store) == (1 if path == "/inc" else 0)


async def test_the_response_leaves_only_after_the_save_returned():
    log: list[str] = []
    store = LoggingStore(log)
    store.gate = trio.Event()
    sent = Recorder(log)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(SessionMiddleware(counter_app, store), http_scope("/inc"), receive_nothing, sent)
            await store.saving.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert sent.messages == []               # the save is under way: nothing has left
            store.gate.set()
    assert log == ["save-start", "save-done", "http.response.start", "http.response.body"]
    assert b"set-cookie" in sent.headers()


async def test_a_long_stream_is_saved_before_its_first_chunk():
    async def streaming_app(scope, receive, send):
        session = scope["session"]
        session["count"] = session.get("count", 0) + 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a" * 600, "more_body": True})
        await send({"type": "http.response.body", "body": b"b" * 600, "more_body": True})
        session["streamed"] = True                   # changed while streaming: saved before the end
        await send({"type": "http.response.body", "body": b"c", "more_body": False})

    log: list[str] = []
    store = LoggingStore(log)
    sent = Recorder(log)
    await SessionMiddleware(streaming_app, store, buffer_limit=1000)(http_scope("/"), receive_nothing, sent)
    assert log == ["save-start", "save-done", "http.response.start", "http.response.body",
                   "http.response.body", "save-start", "save-done", "http.response.body"]
    assert b"set-cookie" in sent.headers()
    assert [len(m.get("body", b"")) for m in sent.messages[1:]] == [600, 600, 1]
    (session_id,) = store.session_ids()
    assert store.values(session_id) == {"count": 1, "streamed": True}


async def test_a_short_stream_is_held_until_complete():
    async def chunked_app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        scope["session"]["late"] = 1                 # still before anything left: the cookie can be set
        await send({"type": "http.response.body", "body": b"b", "more_body": False})

    log: list[str] = []
    sent = Recorder(log)
    await SessionMiddleware(chunked_app, LoggingStore(log))(http_scope("/"), receive_nothing, sent)
    assert log == ["save-start", "save-done", "http.response.start", "http.response.body", "http.response.body"]
    assert b"set-cookie" in sent.headers()


class FailingStore(MemorySessionStore):
    def __init__(self, *, on: str, error: Exception) -> None:
        super().__init__("node-a")
        self.on = on
        self.error = error

    async def load(self, session_id):
        if self.on == "load":
            raise self.error
        return await super().load(session_id)

    async def create(self):
        if self.on == "create":
            raise self.error
        return await super().create()


async def test_an_unavailable_session_answers_503_with_retry_after():
    store = FailingStore(on="load", error=SessionUnavailable(retry_after=2.5))
    called = []

    async def app(scope, receive, send):
        called.append(scope["path"])
        await counter_app(scope, receive, send)

    async with client(SessionMiddleware(app, store)) as http:
        await http.get("/inc")                       # creating works; loading it back does not
        out = await http.get("/inc")
        assert (out.status_code, out.headers["retry-after"]) == (503, str(math.ceil(2.5)))
        assert called == ["/inc"]                    # the app never ran without its session


async def test_a_full_node_answers_503_and_keeps_its_sessions():
    store = MemorySessionStore("node-a", limits=Limits(max_sessions=1))
    app = SessionMiddleware(counter_app, store)
    async with client(app) as first, client(app) as second:
        assert (await first.get("/inc")).status_code == 200
        refused = await second.get("/inc")
        assert refused.status_code == 503 and set_cookie(refused) is None
        assert (await first.get("/inc")).text == "2"


async def test_sessions_expire_after_max_inactive_and_expired_ones_make_room():
    now = [1000.0]
    store = MemorySessionStore("node-a", limits=Limits(max_sessions=1), max_inactive=60, clock=lambda: now[0])
    app = SessionMiddleware(counter_app, store)
    async with client(app) as old, client(app) as new:
        await old.get("/inc")
        now[0] += 59
        assert (await old.get("/read")).text == "1"              # a read keeps it alive too
        now[0] += 59
        assert (await new.get("/inc")).status_code == 503        # the node is full of a live session
        now[0] += 2
        assert (await new.get("/inc")).text == "1"               # the expired one made room
        gone = await old.get("/read")
        assert gone.text == "0" and "Max-Age=0" in set_cookie(gone)


async def test_a_too_large_session_answers_500_and_logs_it(caplog):
    store = MemorySessionStore("node-a", limits=Limits(max_session_bytes=100))
    async with client(SessionMiddleware(counter_app, store)) as http:
        with caplog.at_level(logging.ERROR):
            out = await http.get("/big")
        assert out.status_code == 500 and set_cookie(out) is None
        assert len(store) == 0                      # the empty session created for it is gone again
        assert any(r.levelno == logging.ERROR and "over the limit of 100 bytes" in r.getMessage()
                   for r in caplog.records)


async def test_an_app_that_fails_saves_nothing_and_releases_the_session():
    store = MemorySessionStore("node-a")
    async with client(SessionMiddleware(counter_app, store)) as http:
        await http.get("/inc")
        with pytest.raises(RuntimeError):
            await http.get("/boom")
        with trio.fail_after(5):
            assert (await http.get("/read")).text == "1"   # not -1, and not stuck behind /boom


async def test_a_cancelled_request_releases_its_session():
    class CheckpointingStore(MemorySessionStore):
        async def release(self, session_id):
            await trio.lowlevel.checkpoint()         # a store that awaits here, as a replicated one may
            await super().release(session_id)

    async def hanging_app(scope, receive, send):
        await trio.sleep_forever()

    store = CheckpointingStore("node-a")
    sent = Recorder([])
    await SessionMiddleware(counter_app, store)(http_scope("/inc"), receive_nothing, sent)
    cookie = sent.headers()[b"set-cookie"].split(b";")[0]
    with trio.CancelScope() as client_gone:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(SessionMiddleware(hanging_app, store), http_scope("/", cookie), receive_nothing,
                               Recorder([]))
            await trio.testing.wait_all_tasks_blocked()
            client_gone.cancel()
    sent = Recorder([])
    with trio.fail_after(5):
        await SessionMiddleware(counter_app, store)(http_scope("/inc", cookie), receive_nothing, sent)
    assert sent.messages[1]["body"] == b"2"


async def test_concurrent_requests_for_one_session_are_serialised():
    store = MemorySessionStore("node-a")
    async with client(SessionMiddleware(counter_app, store)) as http:
        await http.get("/inc")
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(http.get, "/slow-inc")
        assert (await http.get("/read")).text == "6"     # no increment lost


async def test_lifespan_and_websocket_pass_through_untouched():
    seen = []

    async def app(scope, receive, send):
        seen.append((scope, receive, send))

    store = FailingStore(on="load", error=AssertionError("the store must not be asked"))
    middleware = SessionMiddleware(app, store)
    for kind in ("lifespan", "websocket"):
        scope = {"type": kind, "headers": [(b"cookie", b"GCSESSION=" + new_session_id().encode())]}
        await middleware(scope, receive_nothing, Recorder([]))
        passed_scope, passed_receive, passed_send = seen[-1]
        assert passed_scope is scope and "session" not in scope
        assert passed_receive is receive_nothing and isinstance(passed_send, Recorder)


def test_runs_under_asyncio_too():
    async def counter(scope, receive, send):
        session = scope["session"]
        session["count"] = session.get("count", 0) + 1
        await asyncio.sleep(0)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(session["count"]).encode()})

    async def three_requests():
        store = MemorySessionStore("node-a")
        async with client(SessionMiddleware(counter, store)) as http:
            return [(await http.get("/")).text for _ in range(3)]

    assert asyncio.run(three_requests()) == ["1", "2", "3"]


async def test_under_hypercorn_on_trio_with_real_http():
    store = MemorySessionStore("node-a")
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    stop = trio.Event()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(lambda task_status: serve(
                SessionMiddleware(counter_app, store), config, shutdown_trigger=stop.wait,
                task_status=task_status))
            async with httpx.AsyncClient(base_url=binds[0]) as alice, httpx.AsyncClient(base_url=binds[0]) as bob:
                for n in range(1, 4):
                    response = await alice.get("/inc")
                    assert (response.status_code, response.text) == (200, str(n))
                assert (await bob.get("/read")).text == "0"
                assert set_cookie(await alice.get("/logout")) is not None
                assert (await alice.get("/read")).text == "0"
            stop.set()
    assert len(store) == 0


def test_the_request_session_tells_the_middleware_what_to_invalidate_and_save() -> None:
    record = SessionData("a", {"cart": [1]}, version=3)
    session = RequestSession(record)
    assert session.record is record and not session.modified and session.pop_doomed() is None
    session["cart"].append(2)
    snapshot = session.snapshot()
    assert session.modified and snapshot == {"cart": [1, 2]}
    session.mark_saved(snapshot)
    snapshot["cart"].append(3)                     # the store's copy is not the session's
    assert not session.modified and session["cart"] == [1, 2]
    session.invalidate()
    assert session.record is None and session.id is None
    session["x"] = 1                               # a new session, to be created
    created = SessionData("b")
    session.attach(created)
    assert session.record is created and session.id == "b" and session.modified
    assert session.pop_doomed() == "a" and session.pop_doomed() is None
