"""Blob transfer between members' stores (issue 12): the wire schema, the Server, and the
Puller driven over an in-test fake network (loss, timeouts, corrupt chunks, members dying)."""

from __future__ import annotations

import hashlib
import heapq
import random
import time
import uuid

import msgspec
import pytest
import trio

from groupcomm.cli.demo import free_udp_port
from groupcomm.io.channel import open_channel
from groupcomm.layers.rpc import ALL
from groupcomm.services.provisioning.store import Store
from groupcomm.services.provisioning.transfer import (
    CHUNK,
    MAX_CHUNK,
    MAX_MESSAGE,
    Chunk,
    ChunkError,
    ChunkRequest,
    Have,
    HaveReply,
    MalformedTransfer,
    Puller,
    Server,
    StoreReader,
    decode,
    encode,
)

D = "ab" * 32


def blob(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def stored(tmp_path, name: str, data: bytes) -> tuple[Store, str]:
    store = Store(tmp_path / name)
    src = tmp_path / f"{name}.src"
    src.write_bytes(data)
    return store, store.put_file(src)


# ---------------------------------------------------------------------- schema

@pytest.mark.parametrize("message", [
    Have(D), HaveReply(D, 12), HaveReply(D, None), ChunkRequest(D, 0, CHUNK),
    Chunk(D, 5, b"xyz"), ChunkError(D, "not stored here"),
])
def test_messages_round_trip(message):
    assert decode(encode(message)) == message


@pytest.mark.parametrize("raw", [
    ["have?", "AB" * 32],                  # upper-case digest
    ["have?", "ab" * 31],                  # short digest
    ["have?", D, "extra"],
    ["get", D, 0, 0],                      # empty range
    ["get", D, -1, 10],
    ["get", D, 0, MAX_CHUNK + 1],
    ["chunk", D, 0, "text, not bytes"],
    ["nochunk", D, "x" * 2000],
    ["what", D],
    {"digest": D},
    "have?",
])
def test_malformed_messages_raise_one_error(raw):
    with pytest.raises(MalformedTransfer):
        decode(msgspec.msgpack.encode(raw))


def test_oversized_and_non_bytes_input_is_malformed():
    with pytest.raises(MalformedTransfer, match="more than"):
        decode(b"\x00" * (MAX_MESSAGE + 1))
    with pytest.raises(MalformedTransfer):
        decode("text")  # type: ignore[arg-type]
    with pytest.raises(MalformedTransfer):
        decode(b"\xc1")


# ---------------------------------------------------------------------- server

def test_server_answers_have_and_chunks_from_a_store(tmp_path):
    data = blob(1000)
    store, digest = stored(tmp_path, "a", data)
    server = Server(StoreReader(store), max_chunk=300)
    assert decode(server.answer(encode(Have(digest)))) == HaveReply(digest, 1000)
    assert decode(server.answer(encode(Have(D)))) == HaveReply(D, None)
    assert decode(server.answer(encode(ChunkRequest(digest, 900, 100)))) == Chunk(digest, 900, data[900:])
    assert server.served == 100


@pytest.mark.parametrize(("offset", "length", "reason"), [
    (0, 301, "at most 300"),
    (901, 100, "beyond"),
    (1000, 1, "beyond"),
    (1 << 40, 10, "beyond"),
])
def test_server_refuses_large_or_out_of_range_requests(tmp_path, offset, length, reason):
    store, digest = stored(tmp_path, "a", blob(1000))
    server = Server(StoreReader(store), max_chunk=300)
    answer = decode(server.answer(encode(ChunkRequest(digest, offset, length))))
    assert type(answer) is ChunkError and reason in answer.reason
    assert server.served == 0


def test_server_refuses_unknown_blobs_and_non_requests(tmp_path):
    server = Server(StoreReader(Store(tmp_path / "a")))
    answer = decode(server.answer(encode(ChunkRequest(D, 0, 10))))
    assert answer == ChunkError(D, "not stored here")
    with pytest.raises(MalformedTransfer, match="not a request"):
        server.answer(encode(HaveReply(D, 3)))
    with pytest.raises(MalformedTransfer):
        server.answer(b"junk")
    with pytest.raises(ValueError):
        Server(StoreReader(Store(tmp_path / "b")), max_chunk=MAX_CHUNK + 1)


# ---------------------------------------------------------------------- puller over a fake network

class FakeNet:
    """Delivers a Puller's asks to per-member behaviours after ``latency`` µs.

    ``delays``, ``have_delays``: another latency for some members' chunk / Have answers.  A behaviour maps an ask's payload to ``("ok", bytes)``, ``("error", text)`` or
    None (no answer: lost, or the member hangs).
    """

    def __init__(self, behaviours: dict, latency: int = 1000, delays: dict | None = None,
                 have_delays: dict | None = None) -> None:
        self.behaviours = behaviours
        self.latency = latency
        self.delays = delays or {}
        self.have_delays = have_delays or {}
        self.sent: list[tuple[int, object]] = []       # (member, decoded request)
        self.max_chunks_out = 0
        """The most chunk requests answered but not yet delivered at once (lossless runs: in flight)."""
        self.progress: list[tuple[int, int]] = []

    def run(self, puller: Puller, now: int = 0, events: dict | None = None, steps: int = 10_000) -> int:
        """Drive ``puller`` until it finishes; ``events``: {time: callable(now)} run once due."""
        events = dict(events or {})
        pending: list = []
        chunks_out: set[int] = set()
        seq = 0
        for _ in range(steps):
            for ask in puller.take():
                request = decode(ask.payload)
                self.sent.append((ask.member, request))
                if type(request) is ChunkRequest:    # the memory bound: within `window` chunks of the written
                    assert request.offset < puller.progress[0] + puller.window * puller.chunk
                behaviour = self.behaviours.get(ask.member)
                outcome = behaviour(ask.payload) if behaviour else None
                if outcome is not None:
                    if type(request) is ChunkRequest:
                        chunks_out.add(ask.token)
                    seq += 1
                    delays = self.delays if type(request) is ChunkRequest else self.have_delays
                    latency = delays.get(ask.member, self.latency)
                    heapq.heappush(pending, (now + latency, seq, ask.token, outcome))
            self.max_chunks_out = max(self.max_chunks_out, len(chunks_out))
            self.progress.append(puller.progress)
            if puller.finished:
                return now
            times = [t for t in (pending[0][0] if pending else None, puller.next_deadline(),
                                 min(events, default=None)) if t is not None]
            assert times, "the puller is stuck: nothing in flight and not finished"
            now = min(times)
            for t in [t for t in events if t <= now]:
                events.pop(t)(now)
            while pending and pending[0][0] <= now:
                _, _, token, (status, value) = heapq.heappop(pending)
                chunks_out.discard(token)
                if status == "ok":
                    puller.answered(now, token, value)
                else:
                    puller.answered(now, token, None, value)
            puller.tick(now)
        raise AssertionError("the pull did not finish")


def serving(server: Server):
    return lambda payload: ("ok", server.answer(payload))


def hang_after(server: Server, chunks: int):
    """Serves ``chunks`` chunk requests, then never answers again (a dead member)."""
    count = [0]

    def behave(payload):
        if type(decode(payload)) is ChunkRequest:
            count[0] += 1
            if count[0] > chunks:
                return None
        return ("ok", server.answer(payload))
    return behave


def corrupting(server: Server):
    """Serves chunks with one byte flipped."""
    def behave(payload):
        answer = decode(server.answer(payload))
        if type(answer) is Chunk:
            data = bytearray(answer.data)
            data[0] ^= 0xFF
            return ("ok", encode(Chunk(answer.digest, answer.offset, bytes(data))))
        return ("ok", encode(answer))
    return behave


@pytest.fixture
def world(tmp_path):
    """A 1 MiB + 5 byte blob held by members 2 and 3; member 1 has an empty store; 9 pulls."""
    data = blob(4 * CHUNK + 5)
    servers = {}
    for member in (2, 3):
        store, digest = stored(tmp_path, f"m{member}", data)
        servers[member] = Server(StoreReader(store))
    servers[1] = Server(StoreReader(Store(tmp_path / "m1")))
    dest = Store(tmp_path / "m9")
    return data, digest, servers, dest


def puller_for(dest: Store, digest: str, size: int, candidates, **kw) -> Puller:
    return Puller(digest, size, candidates, lambda: dest.open_writer(digest, size), now=0, **kw)


def test_pull_spreads_over_holders_within_the_window_and_stores_the_blob(world):
    data, digest, servers, dest = world
    net = FakeNet({m: serving(s) for m, s in servers.items()})
    puller = puller_for(dest, digest, len(data), [3, 1, 2], window=3)
    net.run(puller)
    assert puller.state == "done", puller.reason
    assert dest.path(digest).read_bytes() == data
    assert puller.problems == {1: "does not hold it"}
    assert puller.attempts == 1
    served = {m for m, r in net.sent if type(r) is ChunkRequest}
    assert served == {2, 3}
    assert sum(r.length for _, r in net.sent if type(r) is ChunkRequest) == len(data)
    assert net.max_chunks_out == 3
    assert net.progress == sorted(net.progress) and net.progress[-1] == (len(data), len(data))


def test_window_one_asks_one_chunk_at_a_time(world):
    data, digest, servers, dest = world
    net = FakeNet({m: serving(s) for m, s in servers.items()})
    puller = puller_for(dest, digest, len(data), [2], window=1, chunk=100_000)
    net.run(puller)
    assert puller.state == "done"
    assert net.max_chunks_out == 1
    assert [r.offset for _, r in net.sent if type(r) is ChunkRequest] == list(range(0, len(data), 100_000))


def test_a_slow_member_holds_back_the_window_of_a_fast_one(world):
    data, digest, servers, dest = world
    net = FakeNet({m: serving(s) for m, s in servers.items()}, delays={2: 50_000})
    puller = puller_for(dest, digest, len(data), [2, 3], window=3, chunk=64 * 1024)
    net.run(puller)
    assert puller.state == "done" and dest.path(digest).read_bytes() == data
    assert {m for m, r in net.sent if type(r) is ChunkRequest} == {2, 3}


@pytest.mark.parametrize("mangle", [
    lambda c: Chunk(c.digest, c.offset + 1, c.data),
    lambda c: Chunk(c.digest, c.offset, c.data[:-1]),
    lambda c: Chunk("cd" * 32, c.offset, c.data),
    lambda c: HaveReply(c.digest, 3),
])
def test_a_member_answering_the_wrong_bytes_is_dropped(world, mangle):
    data, digest, servers, dest = world

    def wrong(payload):
        answer = decode(servers[2].answer(payload))
        return ("ok", encode(mangle(answer) if type(answer) is Chunk else answer))
    net = FakeNet({2: wrong, 3: serving(servers[3])})
    puller = puller_for(dest, digest, len(data), [2, 3])
    net.run(puller)
    assert puller.state == "done" and puller.attempts == 1
    assert list(puller.problems) == [2]
    assert dest.path(digest).read_bytes() == data


def test_a_member_dying_mid_transfer_is_replaced_after_the_timeout(world):
    data, digest, servers, dest = world
    net = FakeNet({2: hang_after(servers[2], 1), 3: serving(servers[3])})
    puller = puller_for(dest, digest, len(data), [2, 3], timeout_us=50_000)
    end = net.run(puller)
    assert puller.state == "done", puller.reason
    assert dest.path(digest).read_bytes() == data
    assert puller.problems == {2: "no answer before the timeout"}
    assert end >= 50_000


def test_a_member_leaving_the_view_is_replaced_at_once(world):
    data, digest, servers, dest = world
    net = FakeNet({2: hang_after(servers[2], 0), 3: serving(servers[3])})
    puller = puller_for(dest, digest, len(data), [2, 3], timeout_us=10_000_000)
    end = net.run(puller, events={1500: lambda now: puller.left(now, [2])})
    assert puller.state == "done", puller.reason
    assert puller.problems == {2: "left the view"}
    assert end < 10_000_000


def test_lost_answers_and_error_replies_fail_over(world):
    data, digest, servers, dest = world
    rng = random.Random(7)
    lossy = serving(servers[2])
    net = FakeNet({2: lambda p: lossy(p) if rng.random() > 0.5 else None,
                   3: lambda p: ("error", "RuntimeError: handler crashed")
                   if type(decode(p)) is ChunkRequest else serving(servers[3])(p),
                   1: serving(servers[1])})
    puller = puller_for(dest, digest, len(data), [1, 2, 3], timeout_us=20_000, chunk=64 * 1024)
    net.run(puller)
    assert puller.finished
    if puller.state == "done":
        assert dest.path(digest).read_bytes() == data
    else:
        assert "member 1: does not hold it" in puller.reason
        assert "member 3: RuntimeError: handler crashed" in puller.reason


def test_a_refusing_member_is_dropped_and_its_chunk_asked_elsewhere(world):
    data, digest, servers, dest = world
    refusing = Server(servers[2].reader, max_chunk=1000)      # refuses 256 KiB requests
    net = FakeNet({2: serving(refusing), 3: serving(servers[3])})
    puller = puller_for(dest, digest, len(data), [2, 3])
    net.run(puller)
    assert puller.state == "done"
    assert puller.problems[2].startswith("refused: ")
    assert dest.has(digest)


def test_a_corrupt_server_is_blamed_and_the_pull_retried_once_elsewhere(world):
    data, digest, servers, dest = world
    net = FakeNet({2: corrupting(servers[2]), 3: serving(servers[3])})
    puller = puller_for(dest, digest, len(data), [2, 3], window=2)
    net.run(puller)
    assert puller.state == "done", puller.reason
    # shared attempt: nobody blamed; retry from 2 alone: 2 blamed; retry from 3 alone: stored
    assert puller.attempts == 3
    assert dest.path(digest).read_bytes() == data
    assert list(puller.problems) == [2]
    gets = [m for m, r in net.sent if type(r) is ChunkRequest]
    assert set(gets[:5]) == {2, 3} and gets[5:10] == [2] * 5 and gets[10:] == [3] * 5


def test_a_corrupt_lone_server_is_blamed_and_the_pull_retried_once_elsewhere(world):
    data, digest, servers, dest = world
    net = FakeNet({2: corrupting(servers[2]), 3: serving(servers[3])}, have_delays={3: 100_000})
    puller = puller_for(dest, digest, len(data), [2, 3])
    net.run(puller)
    assert puller.state == "done", puller.reason
    assert puller.attempts == 2
    assert list(puller.problems) == [2]
    assert dest.path(digest).read_bytes() == data
    gets = [m for m, r in net.sent if type(r) is ChunkRequest]
    assert gets == [2] * 5 + [3] * 5


def test_a_single_corrupt_server_is_blamed_and_nothing_stored(world):
    data, digest, servers, dest = world
    net = FakeNet({2: corrupting(servers[2]), 1: serving(servers[1])})
    puller = puller_for(dest, digest, len(data), [1, 2])
    net.run(puller)
    assert puller.state == "failed"
    assert "member 2: served bytes that failed verification" in puller.reason
    assert "member 1: does not hold it" in puller.reason
    assert not dest.has(digest) and dest.used == 0
    assert list((dest.root / "tmp").iterdir()) == []


def test_two_corrupt_servers_fail_after_the_retries(world):
    data, digest, servers, dest = world
    net = FakeNet({2: corrupting(servers[2]), 3: corrupting(servers[3])})
    puller = puller_for(dest, digest, len(data), [2, 3])
    net.run(puller)
    assert puller.state == "failed"
    assert puller.attempts == 3
    assert "verification failed 3 time(s)" in puller.reason
    assert not dest.has(digest)


def test_nobody_has_it(world):
    data, digest, servers, dest = world
    net = FakeNet({1: serving(servers[1]), 4: lambda p: None})
    puller = puller_for(dest, digest, len(data), [1, 4], timeout_us=1000)
    net.run(puller)
    assert puller.state == "failed"
    assert puller.reason.endswith(
        "no candidate could serve it (member 1: does not hold it; member 4: no answer before the timeout)")


def test_a_holder_with_another_size_is_not_used(world):
    data, digest, servers, dest = world
    net = FakeNet({2: serving(servers[2])})
    puller = puller_for(dest, digest, len(data) + 1, [2])
    net.run(puller)
    assert puller.state == "failed"
    assert f"holds {len(data)} bytes, expected {len(data) + 1}" in puller.reason
    assert not any(type(r) is ChunkRequest for _, r in net.sent)


def test_bad_parameters_are_refused(tmp_path):
    store = Store(tmp_path / "d")
    for kw in ({"digest": "AB" * 32}, {"chunk": 0}, {"chunk": MAX_CHUNK + 1}, {"window": 0}, {"size": -1}):
        args = {"digest": D, "size": 10, **kw}
        with pytest.raises(ValueError):
            Puller(args.pop("digest"), args.pop("size"), [1], lambda: store.open_writer(D, 10), now=0, **args)


def test_no_candidates_fails_at_once(tmp_path):
    puller = puller_for(Store(tmp_path / "d"), D, 10, [])
    assert puller.state == "failed" and puller.take() == []
    assert "no candidates" in puller.reason


def test_the_quota_fails_the_pull_without_asking_for_chunks(world, tmp_path):
    data, digest, servers, _ = world
    small = Store(tmp_path / "small", quota=1000)
    net = FakeNet({2: serving(servers[2])})
    puller = puller_for(small, digest, len(data), [2])
    net.run(puller)
    assert puller.state == "failed"
    assert "cannot store it" in puller.reason and "quota" in puller.reason
    assert not any(type(r) is ChunkRequest for _, r in net.sent)


def test_an_empty_blob(tmp_path):
    src_store, digest = stored(tmp_path, "a", b"")
    assert digest == hashlib.sha256(b"").hexdigest()
    dest = Store(tmp_path / "d")
    net = FakeNet({2: serving(Server(StoreReader(src_store)))})
    puller = puller_for(dest, digest, 0, [2])
    net.run(puller)
    assert puller.state == "done" and dest.has(digest) and dest.size(digest) == 0


def test_stale_and_unknown_tokens_are_ignored(world):
    data, digest, servers, dest = world
    puller = puller_for(dest, digest, len(data), [2])
    [ask] = puller.take()
    puller.answered(0, ask.token + 100, b"junk")
    puller.answered(0, ask.token, servers[2].answer(ask.payload))
    puller.answered(0, ask.token, b"junk")          # a duplicate
    assert puller.state == "pulling" and puller.problems == {}


# ---------------------------------------------------------------------- over real channels

async def pull_over(channel, puller: Puller, *, timeout: float) -> None:
    """A minimal trio driver: each Ask as ``channel.request(to=member)``, answers fed back."""

    def now() -> int:
        return int(trio.current_time() * 1_000_000)

    async def ask(a) -> None:
        replies = await channel.request(a.payload, to=a.member, mode=ALL, timeout=timeout)
        reply = replies.get(a.member)
        if reply is not None and reply.ok:
            puller.answered(now(), a.token, reply.value)
        else:
            puller.answered(now(), a.token, None, reply.error if reply else "no reply")
        changed.set()           # the loop's current event: wake it to take new asks

    async with trio.open_nursery() as nursery:
        while not puller.finished:
            changed = trio.Event()
            for a in puller.take():
                nursery.start_soon(ask, a)
            deadline = puller.next_deadline()
            with trio.move_on_at(trio.current_time() + 1.0 if deadline is None else deadline / 1e6):
                await changed.wait()
            puller.tick(now())
        nursery.cancel_scope.cancel()


async def test_a_5_mib_blob_moves_between_two_stores_over_loopback_channels(tmp_path):
    data = blob(5 * 1024 * 1024 + 17, seed=5)
    source, digest = stored(tmp_path, "src", data)
    dest = Store(tmp_path / "dest")
    server = Server(StoreReader(source))
    cluster, overrides = f"xfer-{uuid.uuid4().hex[:8]}", {"UDP": {"mcast_port": free_udp_port()}}
    async with (
        open_channel("loopback", cluster=cluster, name="has", overrides=overrides) as c1,
        open_channel("loopback", cluster=cluster, name="wants", overrides=overrides) as c2,
    ):
        c1.on_request(lambda request: server.answer(request.payload))
        with trio.fail_after(20):
            while c2.view is None or c1.address not in c2.view.members:
                await trio.sleep(0.05)
        puller = Puller(digest, len(data), [c1.address], lambda: dest.open_writer(digest, len(data)),
                        now=int(trio.current_time() * 1_000_000), window=4, timeout_us=10_000_000)
        started = time.perf_counter()
        with trio.fail_after(60):
            await pull_over(c2, puller, timeout=10.0)
        elapsed = time.perf_counter() - started
    assert puller.state == "done", puller.reason
    assert dest.path(digest).read_bytes() == data
    assert server.served == len(data)
    print(f"transfer: {len(data) / elapsed / 1e6:.1f} MB/s ({len(data)} bytes in {elapsed:.2f}s)")
