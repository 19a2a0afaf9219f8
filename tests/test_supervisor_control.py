"""The control socket (trio server) and its blocking client, with hostile clients; bounded in time.

The server answers from a fake view; the client runs in worker threads
(``trio.to_thread``) or a real subprocess, raw hostile clients on trio sockets.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import trio

from groupcomm.services.supervisor import client
from groupcomm.services.supervisor.client import (
    ControlError,
    NotSupervised,
    Role,
    SupervisorGone,
)
from groupcomm.services.supervisor.control import MAX_LINE, ControlServer

LIMIT = 20.0


class FakeView:
    """A supervisor's answers: two processes, one of them the domain controller."""

    def __init__(self) -> None:
        self.rows = {
            "web": {"name": "web", "state": "running", "pid": 101, "role": "", "epoch": None},
            "dc": {"name": "dc", "state": "running", "pid": 102, "role": "domain-controller", "epoch": 7},
        }

    def status(self, process):
        if process == "boom":
            raise RuntimeError("a bug in the runner")
        return self.rows[process]

    def role(self, process):
        row = self.rows[process]
        return row["role"], row["epoch"]

    def table(self):
        return list(self.rows.values())


@pytest.fixture
def sock_dir():
    path = Path(tempfile.mkdtemp(prefix="gc-ctl-", dir="/tmp"))     # short: AF_UNIX paths are at most 107 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def view():
    return FakeView()


class Raw:
    """A hand-written client: sends bytes, reads lines, sees the end."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    @classmethod
    async def connect(cls, path: Path) -> Raw:
        return cls(await trio.open_unix_socket(str(path)))

    async def line(self) -> dict | None:
        with trio.fail_after(LIMIT):
            while b"\n" not in self.buffer:
                data = await self.stream.receive_some(65536)
                if not data:
                    return None
                self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    async def ask(self, data: bytes) -> dict | None:
        await self.stream.send_all(data)
        return await self.line()

    async def closed(self) -> bool:
        """Whether the server ends the connection (after what it still sends)."""
        with trio.fail_after(LIMIT):
            try:
                while data := await self.stream.receive_some(65536):
                    self.buffer += data
            except trio.BrokenResourceError:
                pass
        await self.stream.aclose()
        return True


async def in_thread(fn, *args, **kw):
    with trio.fail_after(LIMIT):
        return await trio.to_thread.run_sync(lambda: fn(*args, **kw))


async def test_status_role_and_table_through_the_client(sock_dir, view):
    path = str(sock_dir / "ctl.sock")
    async with ControlServer(path, view):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert await in_thread(client.status, "web", path=path) == view.rows["web"]
        assert await in_thread(client.role, "dc", path=path) == Role("dc", "domain-controller", 7)
        assert await in_thread(client.table, path=path) == list(view.rows.values())
        with pytest.raises(ControlError, match="no process 'nope'"):
            await in_thread(client.status, "nope", path=path)
        with pytest.raises(ControlError, match="internal error"):
            await in_thread(client.status, "boom", path=path)       # a bug in the view: answered, not fatal
        assert await in_thread(client.role, "web", path=path) == Role("web", "", None)
    assert not os.path.exists(path)                                  # unlinked on exit


async def test_one_connection_carries_many_requests_and_survives_well_formed_mistakes(sock_dir, view):
    path = sock_dir / "ctl.sock"
    async with ControlServer(path, view):
        raw = await Raw.connect(path)
        assert (await raw.ask(b'{"op": "reboot"}\n'))["ok"] is False
        assert "needs a" in (await raw.ask(b'{"op": "status"}\n'))["error"]
        await raw.stream.send_all(b'{"op": "role", "process": "dc"}\n{"op": "table"}\n')   # pipelined
        assert (await raw.line())["epoch"] == 7
        assert len((await raw.line())["table"]) == 2
        await raw.stream.aclose()


@pytest.mark.parametrize("line", [
    b"hello\n", b"\xff\xfe\n", b"[1, 2]\n", b"null\n", b"[" * 60000 + b"\n",      # not JSON objects
    b'{"op": "table"}' + b" " * MAX_LINE + b"\n",                                     # too long, one chunk
    b"x" * (MAX_LINE + 10),                                                            # too long, no end
])
async def test_a_malformed_or_long_line_is_answered_and_the_connection_closed(sock_dir, view, line):
    path = sock_dir / "ctl.sock"
    async with ControlServer(path, view) as server:
        raw = await Raw.connect(path)
        answer = await raw.ask(line)
        assert answer is not None and answer["ok"] is False
        assert await raw.closed()
        assert await in_thread(client.table, path=str(path))          # still serving
        with trio.fail_after(LIMIT):
            while server.connections:
                await trio.sleep(0.01)


async def test_more_connections_than_the_limit_are_refused_and_served_again_later(sock_dir, view):
    path = sock_dir / "ctl.sock"
    async with ControlServer(path, view) as server:
        assert server.max_connections == 64                            # the documented default
        idle = [await Raw.connect(path) for _ in range(64)]
        with trio.fail_after(LIMIT):
            while server.connections < 64:
                await trio.sleep(0.01)
        extra = await Raw.connect(path)
        assert await extra.line() == {"ok": False, "error": "too many connections"}
        assert await extra.closed()
        await idle.pop().stream.aclose()
        with trio.fail_after(LIMIT):
            while server.connections >= 64:
                await trio.sleep(0.01)
        assert await in_thread(client.role, "dc", path=str(path))
        for raw in idle:
            await raw.stream.aclose()


@pytest.mark.parametrize("limits", [
    {"queue_lines": 8, "send_timeout": 2 * LIMIT},       # dropped when its queue overflows
    {"queue_lines": 100_000, "send_timeout": 0.3},       # dropped when a send takes too long
])
async def test_a_watcher_that_does_not_read_is_disconnected_and_the_rest_go_on(sock_dir, view, limits):
    path = sock_dir / "ctl.sock"
    async with ControlServer(path, view, **limits) as server:
        lazy = await Raw.connect(path)
        assert (await lazy.ask(b'{"op": "watch", "process": "dc"}\n'))["role"] == "domain-controller"
        other = await Raw.connect(path)
        assert (await other.ask(b'{"op": "watch", "process": "web"}\n'))["ok"]
        big_role = "r" * 4000
        with trio.fail_after(LIMIT):
            epoch = 0
            while server.connections == 2:                             # until the lazy one is dropped
                epoch += 1
                server.role_changed("dc", big_role, epoch)            # never blocks
                if epoch % 4 == 0:
                    await trio.sleep(0.001)
        server.role_changed("web", "replica", None)
        assert await other.line() == {"event": "role", "process": "web", "role": "replica", "epoch": None}
        assert await lazy.closed()
        assert await in_thread(client.status, "dc", path=str(path))
        await other.stream.aclose()


async def test_a_connection_that_never_completes_a_request_is_closed(sock_dir, view):
    path = sock_dir / "ctl.sock"
    async with ControlServer(path, view, idle_timeout=0.3):
        raw = await Raw.connect(path)
        await raw.stream.send_all(b'{"op": ')
        assert (await raw.line())["error"] == "idle for too long"
        assert await raw.closed()
        watcher = await Raw.connect(path)                                 # a watch is never idle
        assert (await watcher.ask(b'{"op": "watch", "process": "web"}\n'))["ok"]
        await trio.sleep(0.6)
        await watcher.stream.send_all(b"")                              # still connected
        await watcher.stream.aclose()


async def test_an_answer_over_the_line_limit_is_an_error(sock_dir, view):
    view.rows["web"]["detail"] = "x" * MAX_LINE
    path = sock_dir / "ctl.sock"
    async with ControlServer(path, view):
        with pytest.raises(ControlError, match="answer too long"):
            await in_thread(client.table, path=str(path))
        assert await in_thread(client.status, "dc", path=str(path))


async def test_peers_of_another_user_are_refused(sock_dir, view):
    path = sock_dir / "ctl.sock"
    async with ControlServer(path, view, peer_uids=()):                 # nobody is allowed
        with pytest.raises(ControlError, match="permission denied"):
            await in_thread(client.table, path=str(path))


async def test_watch_role_calls_back_from_a_thread_until_closed_or_the_supervisor_goes(sock_dir, view):
    path = str(sock_dir / "ctl.sock")
    seen: list[Role] = []
    gone: list[SupervisorGone] = []
    async with ControlServer(path, view) as server:
        watch = await in_thread(client.watch_role, seen.append, "dc", path=path)
        other = await in_thread(client.watch_role, lambda r: None, "dc", path=path, on_gone=gone.append)
        assert watch.thread is not None and watch.thread.daemon

        async def until(n: int) -> None:
            with trio.fail_after(LIMIT):
                while len(seen) < n:
                    await trio.sleep(0.01)

        await until(1)
        assert seen == [Role("dc", "domain-controller", 7)]               # the current role first
        server.role_changed("web", "replica", None)                        # another process: not seen
        server.role_changed("dc", "stopped", 8)
        await until(2)
        assert seen[1] == Role("dc", "stopped", 8)
        await in_thread(watch.close)
        assert not watch.thread.is_alive()
        server.role_changed("dc", "domain-controller", 9)
        await trio.sleep(0.05)
        assert len(seen) == 2
    assert other.thread is not None
    await in_thread(other.thread.join, LIMIT)
    assert len(gone) == 1 and isinstance(gone[0], SupervisorGone)          # the server's exit closed it


async def test_role_changes_iterates_current_then_changes(sock_dir, view):
    path = str(sock_dir / "ctl.sock")
    async with ControlServer(path, view) as server:
        watch = await in_thread(client.role_changes, "web", path=path)
        with watch:
            assert await in_thread(next, watch) == Role("web", "", None)
            server.role_changed("web", "replica", 3)
            assert await in_thread(next, watch) == Role("web", "replica", 3)
        with pytest.raises(StopIteration):
            next(watch)


def test_identity_comes_from_the_environment():
    me = client.identity({"GROUPCOMM_NODE": "n1", "GROUPCOMM_PROCESS": "dc", "GROUPCOMM_ROLE": "domain-controller",
                          "GROUPCOMM_DC_EPOCH": "12", "GROUPCOMM_GENERATION": "3", "GROUPCOMM_CONTROL": "/x.sock"})
    assert me == client.Identity("n1", "dc", "domain-controller", 12, 3, "/x.sock")
    assert client.identity({"GROUPCOMM_NODE": "n1", "GROUPCOMM_PROCESS": "web"}).epoch is None
    with pytest.raises(NotSupervised):
        client.identity({})


def test_without_a_supervisor_the_client_says_so(monkeypatch, sock_dir):
    monkeypatch.delenv("GROUPCOMM_CONTROL", raising=False)
    monkeypatch.setenv("GROUPCOMM_PROCESS", "web")
    with pytest.raises(NotSupervised, match="GROUPCOMM_CONTROL"):
        client.status()
    monkeypatch.setenv("GROUPCOMM_CONTROL", str(sock_dir / "absent.sock"))
    with pytest.raises(SupervisorGone, match="no supervisor answers"):
        client.table()
    monkeypatch.delenv("GROUPCOMM_PROCESS")
    with pytest.raises(NotSupervised, match="GROUPCOMM_PROCESS"):
        client.role()


async def test_a_stale_socket_is_replaced_a_live_one_or_a_file_is_not(sock_dir, view):
    path = sock_dir / "ctl.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()                                                          # a crashed supervisor's leftover
    async with ControlServer(path, view):
        with pytest.raises(OSError, match="another supervisor"):
            async with ControlServer(path, view):
                pass
        assert await in_thread(client.table, path=str(path))              # the first one's socket stays
    other = sock_dir / "file"
    other.write_text("mine")
    with pytest.raises(FileExistsError):
        async with ControlServer(other, view):
            pass
    assert other.read_text() == "mine"


async def test_a_supervised_subprocess_asks_through_the_environment(sock_dir, view):
    path = sock_dir / "ctl.sock"
    code = ("import json; from groupcomm.services.supervisor import client; "
            "print(json.dumps([client.identity().epoch, client.status()['pid'], client.role().role]))")
    env = dict(os.environ, GROUPCOMM_CONTROL=str(path), GROUPCOMM_NODE="n1", GROUPCOMM_PROCESS="dc",
               GROUPCOMM_ROLE="domain-controller", GROUPCOMM_DC_EPOCH="7")
    async with ControlServer(path, view):
        with trio.fail_after(LIMIT):
            done = await trio.run_process([sys.executable, "-c", code], env=env, capture_stdout=True)
    assert json.loads(done.stdout) == [7, 102, "domain-controller"]


def test_the_client_needs_no_trio():
    code = "import sys; from groupcomm.services.supervisor import client; print('trio' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], check=True, timeout=LIMIT, capture_output=True, text=True)
    assert done.stdout.strip() == "False"
