"""Replicated HTTP sessions with real processes and real HTTP (issue 13, "Proof: real processes").

``groupcomm sessions-node`` processes (the demo app under SessionMiddleware,
Hypercorn on trio, K = 1 backup) and many HTTP clients in threads of this
test: each :class:`Client` has its own httpx client and its own session and
keeps incrementing its counter (``POST /incr``, a fresh ``x-request-id`` per
increment), each request to a node picked at random -- the cookie's routing
hint is ignored, as a load balancer without stickiness would.  An increment
that gets no answer (connection error, timeout, 503) is retried with the *same*
request id until one node acknowledges it, so it counts exactly once whatever
happened to the earlier tries; every acknowledgement's counter must equal the
client's count of acknowledged increments, and at the end every client reads
its counter: zero lost sessions, zero lost updates.

* On loopback: three nodes; ``kill -9`` of n2 mid-load (its sessions are
  recovered from their backups: fail-overs); n2 restarted (a new process with
  the same name); then n3 stopped with SIGTERM (it must exit 0 after handing
  its sessions to the others), and the load goes on with n1 and n2.  Why the
  restart: the quorum's expected votes are 3, so after a kill and a stop one
  node of three would be left -- not primary, serving nothing.  The clients
  pause between two requests while n3 stops: a migration between two other
  nodes cut by the view change of n3's leaving also ends in a fail-over (the
  index has no holder for it; its last keeper's copy takes over), so only
  without such moves does "no fail-over after the stop" prove that every
  session n3 held was handed over rather than recovered from a backup.
* Between network namespaces (:mod:`tests.netns`, udp stack): the nodes in
  three namespaces, the clients in a fourth; one node is cut off: it answers
  503 with Retry-After (asked from inside its namespace), the majority serves
  every session (those held on the cut node from their backups); after
  healing the counters are right and every session has one holder again.

Figures (migrations, fail-overs, evacuations) are printed (``pytest -s``).
Every wait is bounded; only the processes this test started are signalled,
by the pid held; the namespaces are deleted by the lab.  Client threads that
work in a namespace enter it with setns(2) (a thread's own network namespace)
before they open any socket.
"""

from __future__ import annotations

import ctypes
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar

import httpx

from groupcomm.cli.demo import free_udp_port
from tests.netns import Lab

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
COOKIE = "GCSESSION"
LIMIT = 30.0            # seconds any one wait may take
RESOLVE_LIMIT = 30.0    # seconds one increment may take to be acknowledged, retries included
PACE = 0.03             # seconds a client waits between two increments
REQUEST_TIMEOUT = httpx.Timeout(8.0, connect=1.0)   # longer than the store's request_timeout (5 s)
LOOPBACK = ["--stack", "loopback", "--fd", "lan", "--token-timeout", "1s"]   # see test_provisioning_processes

T = TypeVar("T")


def wait_for(probe: Callable[[], T], what: str, limit: float = LIMIT, every: float = 0.1) -> T:
    """``probe()`` until it is true; that value (AssertionError naming ``what`` after ``limit`` s)."""
    deadline = time.monotonic() + limit
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"never: {what} (last: {value!r})")
        time.sleep(every)


def free_tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- network namespaces

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def enter_netns(name: str) -> None:
    """Move the calling thread (only it) into network namespace ``name`` (made by ``ip netns add``)."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def in_netns(netns: str | None, work: Callable[[], T], limit: float = LIMIT) -> T:
    """``work()`` in a fresh thread inside ``netns`` (None: this namespace); its result or exception."""
    if netns is None:
        return work()
    out: queue.Queue[tuple[bool, Any]] = queue.Queue()

    def run() -> None:
        try:
            enter_netns(netns)
            out.put((True, work()))
        except Exception as exc:  # noqa: BLE001 -- handed to the caller, raised there
            out.put((False, exc))

    threading.Thread(target=run, daemon=True).start()
    ok, value = out.get(timeout=limit)
    if not ok:
        raise value
    return value


# --------------------------------------------------------------------------- node processes


class Node:
    """One ``groupcomm sessions-node`` process serving at a fixed ``url``; :meth:`start` again after it ended
    starts a new process with the same name and port."""

    def __init__(self, name: str, argv: Sequence[str], url: str, folder: Path, prefix: Sequence[str] = (),
                 netns: str | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.url = url
        self.folder = folder
        self.prefix = list(prefix)
        self.netns = netns                       # where to stand to reach it when cut off
        self.proc: subprocess.Popen | None = None
        self.runs = 0
        self._serving: queue.Queue[dict] = queue.Queue()

    def start(self, started: list[subprocess.Popen]) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} still runs"
        self.runs += 1
        self._serving = queue.Queue()
        with (self.folder / f"{self.name}.{self.runs}.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, PY, "-P", "-m", "groupcomm", "sessions-node", "--name", self.name, *self.argv],
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True,
                start_new_session=True)
        started.append(self.proc)
        threading.Thread(target=self._read, args=(self.proc, self._serving), daemon=True).start()

    @staticmethod
    def _read(proc: subprocess.Popen, events: queue.Queue[dict]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                events.put(json.loads(line))
            except ValueError:
                continue

    def wait_serving(self, limit: float = 60.0) -> None:
        deadline = time.monotonic() + limit
        while True:
            try:
                event = self._serving.get(timeout=0.1)
            except queue.Empty:
                assert self.proc is not None and self.proc.poll() is None, (self.name, "exited", self.log())
                assert time.monotonic() < deadline, (self.name, "not serving", self.log())
                continue
            if event.get("event") == "serving":
                return

    def log(self) -> str:
        path = self.folder / f"{self.name}.{self.runs}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float = LIMIT) -> int:
        """SIGTERM; its exit status (SIGKILL and AssertionError if it did not end within ``timeout``)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise AssertionError(f"{self.name} did not stop within {timeout} s after SIGTERM: {self.log()}")

    def stats(self, netns: str | None = None) -> dict[str, int]:
        def get() -> dict[str, int]:
            response = httpx.get(f"{self.url}/stats", timeout=5)
            assert response.status_code == 200, (self.name, response.status_code, response.text)
            return response.json()

        return in_netns(netns, get)


class Cluster:
    """The nodes of one fresh cluster; :meth:`close` SIGKILLs every process this test started that still runs."""

    def __init__(self, tmp_path: Path, names: Sequence[str], *, argv_of: Callable[[int], list[str]],
                 url_of: Callable[[int], str], prefix_of: Callable[[int], Sequence[str]] = lambda i: (),
                 netns_of: Callable[[int], str | None] = lambda i: None) -> None:
        self.started: list[subprocess.Popen] = []
        self.nodes = {name: Node(name, argv_of(i), url_of(i), tmp_path, prefix_of(i), netns_of(i))
                      for i, name in enumerate(names)}

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def start(self) -> None:
        for node in self.nodes.values():
            node.start(self.started)
        for node in self.nodes.values():
            node.wait_serving()

    def close(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- clients


class Pool:
    """What the clients share: the node URLs, the ones a load balancer would skip, pause and stop."""

    def __init__(self, urls: dict[str, str]) -> None:
        self.urls = dict(urls)
        self.avoid: set[str] = set()
        self.running = threading.Event()
        self.running.set()
        self.stopping = threading.Event()

    def pick(self, rng: random.Random) -> str:
        names = sorted(set(self.urls) - self.avoid) or sorted(self.urls)
        return self.urls[rng.choice(names)]


class Client(threading.Thread):
    """One user: its own httpx client and session cookie; increments until the pool stops, each
    increment retried with its request id until acknowledged (see the module doc)."""

    def __init__(self, index: int, pool: Pool, seed: int, netns: str | None = None) -> None:
        super().__init__(name=f"client-{index}", daemon=True)
        self.index = index
        self.pool = pool
        self.rng = random.Random(seed)
        self.netns = netns
        self.cookie: str | None = None
        self.acked = 0
        self.retries = 0
        self.answered_by: dict[str, int] = {}
        self.problems: list[str] = []
        self.idle = threading.Event()            # set while paused between two increments

    def run(self) -> None:
        try:
            if self.netns is not None:
                enter_netns(self.netns)
            with httpx.Client(timeout=REQUEST_TIMEOUT) as http:
                while not self.pool.stopping.is_set():
                    if not self.pool.running.is_set():
                        self.idle.set()
                        self.pool.running.wait(LIMIT)
                        self.idle.clear()
                        continue
                    self.increment(http)
                    time.sleep(PACE)
        except Exception as exc:  # noqa: BLE001 -- collected: a client's failure fails the test
            self.problems.append(f"{type(exc).__name__}: {exc}")
        finally:
            self.idle.set()

    def request(self, http: httpx.Client, method: str, url: str, headers: dict[str, str] | None = None
                ) -> httpx.Response:
        """One request carrying this client's cookie (whatever node ``url`` is); the cookie the answer sets is kept."""
        headers = dict(headers or {})
        if self.cookie is not None:
            headers["cookie"] = f"{COOKIE}={self.cookie}"
        response = http.request(method, url, headers=headers)
        if COOKIE in response.cookies:
            self.cookie = response.cookies[COOKIE] or None
        http.cookies.clear()
        return response

    def increment(self, http: httpx.Client, url: str | None = None) -> dict:
        """One increment on random nodes (or at ``url``), retried with the same request id until acknowledged."""
        request_id = f"c{self.index}-{self.acked}-{uuid.uuid4().hex[:12]}"
        deadline = time.monotonic() + RESOLVE_LIMIT
        last = ""
        while True:
            assert time.monotonic() < deadline, f"client {self.index}: {request_id} unacknowledged (last: {last})"
            target = url or self.pool.pick(self.rng)
            try:
                response = self.request(http, "POST", f"{target}/incr", headers={"x-request-id": request_id})
            except httpx.TransportError as exc:
                last = f"{target}: {type(exc).__name__}"
                self.retries += 1
                time.sleep(0.05)
                continue
            if response.status_code == 503:
                assert response.headers.get("retry-after"), response.headers
                last = f"{target}: 503 {response.text.strip()}"
                self.retries += 1
                time.sleep(0.1)
                continue
            assert response.status_code == 200, (target, response.status_code, response.text)
            body = response.json()
            self.acked += 1
            self.answered_by[body["node"]] = self.answered_by.get(body["node"], 0) + 1
            if body["counter"] != self.acked:
                self.problems.append(f"{request_id} on {body['node']}: counter {body['counter']}, "
                                     f"acknowledged increments {self.acked}")
            return body

    def read(self, http: httpx.Client, url: str) -> dict:
        """``GET /`` at ``url``, retried past errors and 503s (bounded)."""
        deadline = time.monotonic() + LIMIT
        last = ""
        while time.monotonic() < deadline:
            try:
                response = self.request(http, "GET", f"{url}/")
            except httpx.TransportError as exc:
                last = type(exc).__name__
            else:
                if response.status_code == 200:
                    return response.json()
                last = f"{response.status_code} {response.text.strip()}"
            time.sleep(0.1)
        raise AssertionError(f"client {self.index}: GET {url}/ never answered 200 (last: {last})")


class Load:
    """``n`` clients on ``pool``; :meth:`wait_acked` waits until each made ``more`` increments more."""

    def __init__(self, pool: Pool, n: int, netns: str | None = None) -> None:
        self.pool = pool
        self.clients = [Client(i, pool, seed=1000 + i, netns=netns) for i in range(n)]

    def start(self) -> None:
        for client in self.clients:
            client.start()

    def wait_acked(self, more: int, what: str) -> None:
        marks = [c.acked + more for c in self.clients]
        def behind() -> list[int]:
            self.check()
            return [c.index for c, m in zip(self.clients, marks) if c.acked < m]

        try:
            wait_for(lambda: not behind(), f"every client acknowledged {more} more increments {what}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; clients behind: {behind()}") from None

    def check(self) -> None:
        """AssertionError naming any client that saw a wrong counter or failed."""
        problems = [(c.index, p) for c in self.clients for p in c.problems]
        assert not problems, problems

    def pause(self) -> None:
        self.pool.running.clear()
        for client in self.clients:
            assert client.idle.wait(RESOLVE_LIMIT + 5), f"client {client.index} did not pause"

    def pin(self, clients: Sequence[Client], node: Node, netns: str | None = None) -> None:
        """While paused: one increment of each of ``clients`` on ``node`` (the session moves there)."""
        def increments() -> None:
            with httpx.Client(timeout=REQUEST_TIMEOUT) as http:
                for client in clients:
                    assert client.increment(http, node.url)["node"] == node.name

        in_netns(netns, increments)

    def resume(self) -> None:
        self.pool.running.set()

    def stop(self) -> None:
        self.pool.stopping.set()
        self.pool.running.set()
        for client in self.clients:
            client.join(RESOLVE_LIMIT + 5)
            assert not client.is_alive(), f"client {client.index} did not end"
        self.check()

    def verify(self, nodes: Sequence[Node], netns: str | None = None) -> set[str]:
        """Every client reads its counter on a random node of ``nodes``: it equals its acknowledged increments.
        The session ids read."""
        def read_all() -> set[str]:
            rng = random.Random(7)
            ids = set()
            with httpx.Client(timeout=REQUEST_TIMEOUT) as http:
                for client in self.clients:
                    body = client.read(http, rng.choice(nodes).url)
                    assert body["counter"] == client.acked, (client.index, body, client.acked)
                    ids.add(body["session"])
            return ids

        ids = in_netns(netns, read_all, limit=len(self.clients) * LIMIT)
        assert len(ids) == len(self.clients), ids        # one session each, none lost or shared
        return ids


def total(snapshots: Sequence[dict[str, int]], key: str) -> int:
    return sum(s.get(key, 0) for s in snapshots)


def held_and_copies(snapshots: Sequence[dict[str, int]], sessions: int) -> bool:
    """The nodes hold ``sessions`` sessions in all and keep at least one backup copy of each (K=1)."""
    return total(snapshots, "held") == sessions and total(snapshots, "copies") >= sessions


def figures(title: str, snapshots: dict[str, dict[str, int]], load: Load, totals: Sequence[str]) -> None:
    """Print the nodes' counters (``pytest -s``); the total is over the snapshots named in ``totals``."""
    keys = ("migrations_in", "failovers", "created", "saves", "rebuilds", "held", "copies")
    print(f"\n== {title}: {len(load.clients)} clients, {sum(c.acked for c in load.clients)} acknowledged "
          f"increments, {sum(c.retries for c in load.clients)} retries (errors/503)")
    for name, stats in snapshots.items():
        print(f"   {name:<16} " + ", ".join(f"{k} {stats.get(k, 0)}" for k in keys))
    print("   total            " + ", ".join(f"{k} {total([snapshots[n] for n in totals], k)}" for k in keys[:5]))


# --------------------------------------------------------------------------- the tests

CLIENTS = 24
PINNED = 4        # clients whose session is made to live on the node that is stopped or cut off


def test_kill_9_mid_load_restart_and_graceful_stop_lose_no_session_and_no_update(tmp_path):
    names = ("n1", "n2", "n3")
    ports = [free_tcp_port() for _ in names]
    channel = ["--cluster", f"sessions-proc-{uuid.uuid4().hex[:8]}", *LOOPBACK,
               "--mcast-port", str(free_udp_port()), "--backups", "1"]
    t0 = time.monotonic()
    with Cluster(tmp_path, names, argv_of=lambda i: [*channel, "--http", f"127.0.0.1:{ports[i]}"],
                 url_of=lambda i: f"http://127.0.0.1:{ports[i]}") as cluster:
        cluster.start()
        load = Load(Pool({n: cluster[n].url for n in names}), CLIENTS)
        load.start()
        try:
            load.wait_acked(3, "at the start")

            before_kill = cluster["n2"].stats()
            cluster["n2"].kill9()
            load.wait_acked(4, "after n2 was killed")           # every session served again: fail-overs
            failed_over = cluster["n1"].stats()["failovers"] + cluster["n3"].stats()["failovers"]

            cluster["n2"].start(cluster.started)
            cluster["n2"].wait_serving()
            load.wait_acked(3, "after n2 came back")

            # the graceful stop happens between two requests of each client (see the module doc)
            load.pause()
            load.pin(load.clients[:PINNED], cluster["n3"])          # n3 surely holds sessions to hand over
            before_stop = {n: cluster[n].stats() for n in names}
            status = cluster["n3"].terminate()
            assert status == 0, cluster["n3"].log()
            load.resume()
            load.wait_acked(3, "after n3 stopped")
        finally:
            load.stop()
        survivors = [cluster["n1"], cluster["n2"]]
        load.verify(survivors)
        # random routing, whatever the cookie's hint: every client was served by several nodes
        assert all(len(c.answered_by) >= 2 for c in load.clients), [c.answered_by for c in load.clients]
        # every session held by exactly one of the nodes left (stale copies dropped, none twice)
        # and backed up again (K=1: at least one copy each)
        wait_for(lambda: held_and_copies([n.stats() for n in survivors], CLIENTS),
                 f"the survivors hold the {CLIENTS} sessions, each once, with a backup")
        after = {n.name: n.stats() for n in survivors}
        figures(f"loopback, 3 nodes, K=1 ({time.monotonic() - t0:.1f} s)",
                {"n2 before kill": before_kill, "n3 before stop": before_stop["n3"],
                 "n1 at the end": after["n1"], "n2' at the end": after["n2"]}, load,
                totals=["n2 before kill", "n3 before stop", "n1 at the end", "n2' at the end"])
        later = after["n1"]["failovers"] + after["n2"]["failovers"] - \
            before_stop["n1"]["failovers"] - before_stop["n2"]["failovers"]
        print(f"   n2 held {before_kill['held']} sessions when killed (fail-overs by then: {failed_over}); "
              f"n3 held {before_stop['n3']['held']} when stopped (exit status {status}), "
              f"fail-overs since: {later} (all evacuated)")

        assert before_kill["held"] > 0, before_kill
        assert failed_over >= 1, "the sessions n2 held were recovered from their backups"
        assert before_stop["n3"]["held"] >= PINNED, before_stop["n3"]
        # n3's sessions were handed over, not recovered from backups: no fail-over since it stopped
        assert after["n1"]["failovers"] + after["n2"]["failovers"] == \
            before_stop["n1"]["failovers"] + before_stop["n2"]["failovers"], (before_stop, after)
        assert total([before_kill, before_stop["n3"], *after.values()], "migrations_in") > 0


NETNS_CLIENTS = 16


def test_a_partition_between_namespaces_minority_answers_503_majority_serves_every_session(tmp_path):
    assert os.geteuid() == 0 and shutil.which("ip") is not None, "needs root and iproute2 (network namespaces)"
    names = ("n1", "n2", "n3")
    port = 8080
    mcast_port = free_udp_port()
    cluster_name = f"sessions-ns-{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    with Lab(4) as lab:                                   # hosts 0-2: the nodes; host 3: the clients
        def argv_of(i: int) -> list[str]:
            return ["--cluster", cluster_name, "--stack", "udp", "--bind", lab.addresses[i], "--ttl", "1",
                    "--mcast-port", str(mcast_port), "--token-timeout", "0.5s", "--backups", "1",
                    "--http", f"{lab.addresses[i]}:{port}", "--allow-remote"]

        with Cluster(tmp_path, names, argv_of=argv_of, url_of=lambda i: f"http://{lab.addresses[i]}:{port}",
                     prefix_of=lab.exec_prefix, netns_of=lambda i: lab.hosts[i]) as cluster:
            cluster.start()
            clients_ns = lab.hosts[3]
            n3 = cluster["n3"]
            pool = Pool({n: cluster[n].url for n in names})
            load = Load(pool, NETNS_CLIENTS, netns=clients_ns)
            load.start()
            try:
                load.wait_acked(3, "at the start")

                # some sessions surely held by n3 when it is cut off: one increment each on n3, load paused
                load.pause()
                pinned = load.clients[:PINNED]
                load.pin(pinned, n3, clients_ns)
                held_by_n3 = n3.stats(clients_ns)["held"]
                assert held_by_n3 >= PINNED
                lab.cut(2)
                pool.avoid = {"n3"}                        # as a load balancer's health check would
                load.resume()

                # the minority answers 503 with Retry-After, to reads and writes
                def minority_answers() -> list[tuple[int, str | None]]:
                    with httpx.Client(timeout=REQUEST_TIMEOUT) as http:
                        answers = []
                        for client in pinned:
                            r = http.get(f"{n3.url}/", headers={"cookie": f"{COOKIE}={client.cookie}"})
                            answers.append((r.status_code, r.headers.get("retry-after")))
                        return answers

                wait_for(lambda: all(s == 503 for s, _ in in_netns(n3.netns, minority_answers)),
                         "n3, cut off, answers 503")
                assert all(after is not None and int(after) >= 1 for _, after in in_netns(n3.netns, minority_answers))

                def minority_writes() -> list[tuple[int, bool]]:
                    """An increment of a pinned session, and one that would create a session, on n3."""
                    with httpx.Client(timeout=REQUEST_TIMEOUT) as http:
                        answers = [http.post(f"{n3.url}/incr", headers={**cookie, "x-request-id": "minority-write"})
                                   for cookie in ({"cookie": f"{COOKIE}={pinned[0].cookie}"}, {})]
                        return [(r.status_code, "retry-after" in r.headers) for r in answers]

                assert in_netns(n3.netns, minority_writes) == [(503, True), (503, True)]

                # the majority serves every session, those held on n3 from their backups
                load.wait_acked(3, "while n3 is cut off")
                majority = {n: cluster[n].stats(clients_ns) for n in ("n1", "n2")}
                assert total(list(majority.values()), "failovers") >= PINNED, majority

                lab.heal(2)
                pool.avoid = set()
                wait_for(lambda: all(s == 200 for s, _ in in_netns(n3.netns, minority_answers)),
                         "n3 serves again after healing")
                load.wait_acked(3, "after healing")
            finally:
                load.stop()
            load.verify(list(cluster.nodes.values()), netns=clients_ns)
            wait_for(lambda: held_and_copies([cluster[n].stats(clients_ns) for n in names], NETNS_CLIENTS),
                     f"the {NETNS_CLIENTS} sessions have one holder each and a backup after healing")
            after = {n: cluster[n].stats(clients_ns) for n in names}
            figures(f"namespaces, udp, 3 nodes, K=1 ({time.monotonic() - t0:.1f} s)",
                    {**{f"{n} majority": s for n, s in majority.items()},
                     **{f"{n} at the end": s for n, s in after.items()}}, load,
                    totals=[f"{n} at the end" for n in names])
            print(f"   n3 held {held_by_n3} sessions when cut off")
