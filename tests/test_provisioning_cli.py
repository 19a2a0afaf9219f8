"""The provisioning command line end to end: ``groupcomm.cli.main([...])`` -> the control socket's
client -> ProvisioningControlServer -> a fake node implementing the ProvisioningNode API.

The server runs in its own thread (its own trio loop), since ``main`` runs ``trio.run`` itself;
sockets live in a short private directory that stands in for ``$XDG_RUNTIME_DIR``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from io import StringIO
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio.lowlevel

from groupcomm.cli import main
from groupcomm.errors import ConfigError, GroupcommError
from groupcomm.services.provisioning.control import (
    MAX_LINE,
    ProvisioningControlServer,
    SocketNotFound,
    default_socket,
    find_socket,
    to_json,
)
from groupcomm.services.provisioning.render import (
    ProgressView,
    format_progress,
    render_status,
)

READ_ONLY = "read-only: this side of the partition is not primary"


class Refused(GroupcommError):
    """Stands in for the node's refusal (the cluster rejected the operation)."""


class GroupInfo(msgspec.Struct, frozen=True, array_like=True):
    name: str
    members: tuple[str, ...]
    joined: bool
    revision: int
    writable: bool


@dataclasses.dataclass(frozen=True)
class Progress:
    node: str
    step: str
    detail: str = ""
    batch: int | None = None
    done: int | None = None
    total: int | None = None
    unit: str | None = None
    health: str | None = None


class FakeNode:
    """The ProvisioningNode API, recording every call; ``fail`` maps a method name to what it raises."""

    name = "n1"

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []
        self.fail: dict[str, BaseException] = {}
        self.users: list[str | None] = []
        self.rollout_outcome = "succeeded"

    def _record(self, method: str, *args: Any, **kwargs: Any) -> None:
        self.calls.append((method, args, kwargs))
        if method in self.fail:
            raise self.fail[method]

    async def create_group(self, group):
        self._record("create_group", group)

    async def join_group(self, group):
        self._record("join_group", group)

    async def leave_group(self, group):
        self._record("leave_group", group)

    def groups(self):
        self._record("groups")
        return [GroupInfo("default", ("n1", "n2"), True, 3, True), GroupInfo("web", ("n2",), False, 7, False)]

    async def install_bundle(self, path, *, group, signature=None, start=False, progress=None):
        self._record("install_bundle", path, group=group, signature=signature, start=start)
        progress(Progress("n2", "fetching", "hello 2.0", done=1 << 20, total=2 << 20, unit="bytes"))
        await trio.lowlevel.checkpoint()
        progress(Progress("n2", "installing", "hello 2.0"))
        return 4

    async def start_bundle(self, name, *, group, user=None):     # the one that takes the audit's user
        self._record("start_bundle", name, group=group)
        self.users.append(user)
        return 5

    async def stop_bundle(self, name, *, group):
        self._record("stop_bundle", name, group=group)
        return 6

    async def uninstall_bundle(self, name, *, group):
        self._record("uninstall_bundle", name, group=group)
        return 7

    def bundles(self, group):
        self._record("bundles", group)
        return [{"name": "hello", "version": "2.0", "started": True,
                 "actual": [{"node": "n1", "version": "2.0", "state": "running", "health": "ok"},
                            {"node": "n2", "version": "1.0", "state": "failed", "detail": "exit 3"}]}]

    async def set_config(self, pid, values, *, group):
        self._record("set_config", pid, dict(values), group=group)
        return 8

    async def delete_config(self, pid, key=None, *, group):
        self._record("delete_config", pid, key, group=group)
        return 9

    def get_config(self, pid, *, group):
        self._record("get_config", pid, group=group)
        return {"port": "8080", "greeting": "hello world"}

    def configs(self, group):
        self._record("configs", group)
        return {"web": {"port": "8080"}, "db": {"url": "sqlite:///x"}}

    async def require_signatures(self, group, keys):
        self._record("require_signatures", group, [k.key_id for k in keys])
        return 10

    async def require_plan_signatures(self, env, keys):
        self._record("require_plan_signatures", env, [k.key_id for k in keys])
        return 11

    async def plan_diff(self, plan_path, *, env):
        self._record("plan_diff", plan_path, env=env)
        return {"env": env, "changes": [{"node": "n1", "bundle": "hello", "from": "1.0", "to": "2.0"}]}

    async def apply_plan(self, plan_path, *, env, batch=None, force=False, progress=None):
        self._record("apply_plan", plan_path, env=env, batch=batch, force=force)
        progress(Progress("n1", "installing", "hello 2.0", batch=1))
        progress({"node": "n1", "step": "healthy", "batch": 1, "health": "ok"})
        return {"env": env, "revision": 2, "outcome": self.rollout_outcome, "reason": ""}

    def plan_status(self, env=None):
        self._record("plan_status", env)
        return [{"env": "preprod", "revision": 2, "state": "succeeded", "digest": "ab12"}]

    def plan_history(self, env):
        self._record("plan_history", env)
        return [{"env": env, "revision": 1, "state": "succeeded"}, {"env": env, "revision": 2, "state": "rolled-back"}]

    async def rollback_plan(self, env, *, to=None, progress=None):
        self._record("rollback_plan", env, to=to)
        progress(Progress("n1", "rolling back", "hello 1.0", batch=1))
        return {"env": env, "revision": to or 1, "outcome": "succeeded"}

    def cluster_status(self, *, group=None, env=None):
        self._record("cluster_status", group=group, env=env)
        return {"primary": True,
                "rows": [{"node": "n1", "role": "web", "bundle": "hello", "version": "2.0", "desired": "started",
                          "actual": "running", "health": "ok"},
                         {"node": "n2", "role": "web", "bundle": "hello", "version": "1.0", "desired": "started",
                          "actual": "failed", "health": "failing"}],
                "configs": [{"group": "default", "pid": "web", "revision": 8}],
                "out_of_sync": [{"node": "n2", "what": "hello 1.0 != 2.0"}]}

    def history(self, *, group=None):
        self._record("history", group=group)
        return [{"revision": 1, "when": "2026-01-01T00:00:00Z", "node": "n1", "user": "alice", "group": "default",
                 "what": "install hello 2.0"}]


class Agent:
    """A control server for a FakeNode in a thread of its own; ``stop()`` ends it."""

    def __init__(self, path: Path, node: Any, **options: Any) -> None:
        self.path, self.node, self.options = path, node, options
        self.server: ProvisioningControlServer | None = None
        self._ready = threading.Event()
        self._token: Any = None
        self._stop: trio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "the control server did not start"
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        async def serve() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            try:
                async with ProvisioningControlServer(self.path, self.node, **self.options) as server:
                    self.server = server
                    self._ready.set()
                    await self._stop.wait()
            except BaseException as e:
                self._error = e
                self._ready.set()
                raise
        with contextlib.suppress(BaseException):    # reported through _error
            trio.run(serve)

    def stop(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(10)
        assert not self._thread.is_alive()


@pytest.fixture
def runtime(monkeypatch):
    """A short private directory as $XDG_RUNTIME_DIR (Unix socket paths are limited to ~107 bytes)."""
    base = tempfile.mkdtemp(prefix="gcp-")
    monkeypatch.setenv("XDG_RUNTIME_DIR", base)
    yield Path(base)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def agent(runtime):
    node = FakeNode()
    running = Agent(default_socket("n1", create_dir=True), node)
    yield running
    running.stop()


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def one_error_line(err: str, *words: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("groupcomm: error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------- verbs end to end


def test_group_verbs(agent, capsys):
    for verb, method, past in (("create", "create_group", "created"), ("join", "join_group", "joined"),
                               ("leave", "leave_group", "left")):
        status, out, _ = cli(capsys, "group", verb, "web")
        assert status == 0 and out == f"{past} group web\n"
        assert agent.node.calls[-1] == (method, ("web",), {})
    status, out, _ = cli(capsys, "group", "list")
    lines = out.splitlines()
    assert status == 0 and lines[0].split() == ["NAME", "JOINED", "WRITABLE", "REVISION", "MEMBERS"]
    assert lines[1].split() == ["default", "yes", "yes", "3", "n1,", "n2"]
    assert lines[2].split() == ["web", "no", "no", "7", "n2"]
    status, out, _ = cli(capsys, "group", "list", "--json", "--node", "n1")
    assert status == 0 and json.loads(out)[1] == {"name": "web", "members": ["n2"], "joined": False,
                                                  "revision": 7, "writable": False}


def test_require_signatures_sends_the_keys_of_a_file(agent, capsys, tmp_path):
    from groupcomm.services.provisioning.signing import generate_signing_key

    key = generate_signing_key(tmp_path / "signing.pem")
    (tmp_path / "trusted").write_text(f"# ops\n{key.public.to_line()}\n")
    status, out, _ = cli(capsys, "group", "require-signatures", "web", str(tmp_path / "trusted"))
    assert status == 0 and out == "group web: 1 trusted key(s) (revision 10)\n"
    assert agent.node.calls[-1] == ("require_signatures", ("web", [key.public.key_id]), {})


def test_plan_require_signatures_sends_the_keys_of_a_file(agent, capsys, tmp_path):
    from groupcomm.services.provisioning.signing import generate_signing_key

    key = generate_signing_key(tmp_path / "signing.pem")
    (tmp_path / "trusted").write_text(f"{key.public.to_line()}\n")
    status, out, _ = cli(capsys, "plan", "require-signatures", "--env", "prod", str(tmp_path / "trusted"))
    assert status == 0 and out == "environment prod: 1 trusted key(s) (revision 11)\n"
    assert agent.node.calls[-1] == ("require_plan_signatures", ("prod", [key.public.key_id]), {})


def test_bundle_install_streams_progress_as_plain_lines(agent, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, out, _ = cli(capsys, "bundle", "install", "hello.whl", "--group", "web", "--signature", "hello.whl.sig",
                         "--start")
    assert status == 0
    assert out.splitlines() == ["n2 fetching hello 2.0 (1.0 MiB/2.0 MiB)", "n2 installing hello 2.0",
                                "installed hello.whl in group web (started) (revision 4)"]
    assert agent.node.calls[-1] == ("install_bundle", (str(tmp_path / "hello.whl"),),
                                    {"group": "web", "signature": str(tmp_path / "hello.whl.sig"), "start": True})


def test_bundle_install_json_is_one_object_per_line(agent, capsys):
    status, out, _ = cli(capsys, "bundle", "install", "/x/hello.whl", "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    assert status == 0 and len(lines) == 3
    assert lines[0] == {"progress": {"node": "n2", "step": "fetching", "detail": "hello 2.0", "batch": None,
                                     "done": 1 << 20, "total": 2 << 20, "unit": "bytes", "health": None}}
    assert lines[2] == {"result": 4}
    assert agent.node.calls[-1][2]["group"] == "default" and agent.node.calls[-1][2]["signature"] is None


def test_bundle_start_stop_uninstall_and_list(agent, capsys):
    for verb, method, revision in (("start", "start_bundle", 5), ("stop", "stop_bundle", 6),
                                   ("uninstall", "uninstall_bundle", 7)):
        status, out, _ = cli(capsys, "bundle", verb, "hello", "--group", "web")
        assert status == 0 and out.endswith(f"hello in group web (revision {revision})\n")
        assert agent.node.calls[-1] == (method, ("hello",), {"group": "web"})
    assert agent.node.users == [getpass.getuser()]          # the requesting peer's user, for the audit log
    status, out, _ = cli(capsys, "bundle", "list")
    lines = out.splitlines()
    assert status == 0 and agent.node.calls[-1] == ("bundles", ("default",), {})
    assert lines[0].split()[:5] == ["NODE", "NAME", "VERSION", "ACTUAL.VERSION", "STATE"]
    assert lines[1].split()[:5] == ["n1", "hello", "2.0", "2.0", "running"]
    assert lines[2].split()[:5] == ["n2", "hello", "2.0", "1.0", "failed"] and "exit 3" in lines[2]
    status, out, _ = cli(capsys, "bundle", "list", "--json")
    assert json.loads(out)[0]["actual"][1]["state"] == "failed"


def test_config_verbs(agent, capsys):
    status, out, _ = cli(capsys, "config", "set", "web", "port=8080", "greeting=hello = world", "--group", "web")
    assert status == 0 and out == "set port, greeting of web in group web (revision 8)\n"
    assert agent.node.calls[-1] == ("set_config", ("web", {"port": "8080", "greeting": "hello = world"}),
                                    {"group": "web"})
    status, out, _ = cli(capsys, "config", "get", "web")
    assert status == 0 and out.splitlines()[1].split() == ["port", "8080"]
    status, out, _ = cli(capsys, "config", "get", "web", "greeting")
    assert status == 0 and out == "hello world\n"
    status, out, _ = cli(capsys, "config", "get", "web", "--json")
    assert json.loads(out) == {"port": "8080", "greeting": "hello world"}
    status, _, err = cli(capsys, "config", "get", "web", "nope")
    assert status == 1
    one_error_line(err, "nope", "web")
    status, out, _ = cli(capsys, "config", "list")
    assert status == 0 and [line.split() for line in out.splitlines()] == [
        ["PID", "KEY", "VALUE"], ["web", "port", "8080"], ["db", "url", "sqlite:///x"]]
    status, out, _ = cli(capsys, "config", "delete", "web", "port")
    assert status == 0 and agent.node.calls[-1] == ("delete_config", ("web", "port"), {"group": "default"})
    status, out, _ = cli(capsys, "config", "delete", "web")
    assert status == 0 and out == "deleted web in group default (revision 9)\n"
    assert agent.node.calls[-1] == ("delete_config", ("web", None), {"group": "default"})


def test_a_bad_assignment_is_one_line_and_exit_2(agent, capsys):
    status, _, err = cli(capsys, "config", "set", "web", "port")
    assert status == 2
    one_error_line(err, "KEY=VALUE", "'port'")
    assert agent.node.calls == []


def test_plan_apply_shows_progress_and_succeeds(agent, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, out, _ = cli(capsys, "plan", "apply", "plan.toml", "--env", "prod", "--batch", "2", "--force")
    lines = out.splitlines()
    assert status == 0
    assert lines[:2] == ["[batch 1] n1 installing hello 2.0", "[batch 1] n1 healthy health ok"]
    assert ["outcome:", "succeeded"] in [line.split() for line in lines]
    assert agent.node.calls[-1] == ("apply_plan", (str(tmp_path / "plan.toml"),),
                                    {"env": "prod", "batch": 2, "force": True})


def test_plan_apply_rolled_back_exits_1(agent, capsys):
    agent.node.rollout_outcome = "rolled-back"
    status, out, err = cli(capsys, "plan", "apply", "/p/plan.toml", "--env", "prod", "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    assert status == 1
    assert [line["progress"]["step"] for line in lines[:2]] == ["installing", "healthy"]
    assert lines[2]["result"]["outcome"] == "rolled-back"
    one_error_line(err, "prod", "did not succeed")


def test_plan_diff_status_history_rollback(agent, capsys):
    status, out, _ = cli(capsys, "plan", "diff", "/p/plan.toml", "--env", "preprod")
    assert status == 0 and "hello" in out and "1.0" in out
    assert agent.node.calls[-1] == ("plan_diff", ("/p/plan.toml",), {"env": "preprod"})
    status, out, _ = cli(capsys, "plan", "status")
    assert status == 0 and out.splitlines()[1].split() == ["preprod", "2", "succeeded", "ab12"]
    assert agent.node.calls[-1] == ("plan_status", (None,), {})
    status, out, _ = cli(capsys, "plan", "history", "--env", "prod", "--json")
    assert status == 0 and [r["state"] for r in json.loads(out)] == ["succeeded", "rolled-back"]
    status, out, _ = cli(capsys, "plan", "rollback", "--env", "prod", "--to", "1")
    assert status == 0 and out.splitlines()[0] == "[batch 1] n1 rolling back hello 1.0"
    assert agent.node.calls[-1] == ("rollback_plan", ("prod",), {"to": 1})


def test_cluster_status_and_history(agent, capsys):
    status, out, _ = cli(capsys, "cluster", "status", "--env", "prod")
    assert status == 0 and agent.node.calls[-1] == ("cluster_status", (), {"group": None, "env": "prod"})
    lines = out.splitlines()
    assert lines[0] == "primary: yes"
    assert lines[1] == "rows:"
    assert lines[2].split() == ["NODE", "ROLE", "BUNDLE", "VERSION", "DESIRED", "ACTUAL", "HEALTH"]
    assert lines[4].split() == ["n2", "web", "hello", "1.0", "started", "failed", "failing"]
    assert "out of sync:" in lines and any("hello 1.0 != 2.0" in line for line in lines)
    status, out, _ = cli(capsys, "cluster", "status", "--json")
    assert json.loads(out)["configs"] == [{"group": "default", "pid": "web", "revision": 8}]
    status, out, _ = cli(capsys, "cluster", "history", "--group", "default")
    assert status == 0 and out.splitlines()[1].split()[:5] == ["1", "2026-01-01T00:00:00Z", "n1", "alice", "default"]
    assert agent.node.calls[-1] == ("history", (), {"group": "default"})


def test_status_as_a_rich_table():
    out = StringIO()
    render_status(FakeNode().cluster_status(), out=out, rich=True)
    text = out.getvalue()
    assert "NODE" in text and "failing" in text and "hello 1.0 != 2.0" in text


def test_rich_progress_keeps_one_row_per_batch_and_node():
    out = StringIO()
    with ProgressView("rich", out) as view:
        view({"batch": 1, "node": "n1", "step": "installing"})
        view({"batch": 1, "node": "n1", "step": "healthy", "health": "ok"})
        view({"batch": 1, "node": "n2", "step": "fetching", "done": 512, "total": 2048, "unit": "bytes"})
    assert list(view.rows) == [("1", "n1"), ("1", "n2")]
    assert view.rows[("1", "n1")]["step"] == "healthy"
    assert "512 B/2.0 KiB" in out.getvalue()


# --------------------------------------------------------------------------- errors


def test_a_refused_operation_is_one_line_and_exit_1(agent, capsys):
    agent.node.fail["start_bundle"] = Refused(READ_ONLY)
    status, out, err = cli(capsys, "bundle", "start", "hello")
    assert status == 1 and out == ""
    assert one_error_line(err) == f"groupcomm: error: {READ_ONLY}"


def test_a_configuration_error_on_the_agent_is_exit_2(agent, capsys):
    agent.node.fail["apply_plan"] = ConfigError("plan.toml: environment 'prod': unknown role 'cache'")
    status, _, err = cli(capsys, "plan", "apply", "/p/plan.toml", "--env", "prod")
    assert status == 2
    one_error_line(err, "unknown role 'cache'")


def test_a_bug_in_the_node_is_an_internal_error_and_the_server_keeps_serving(agent, capsys):
    agent.node.fail["groups"] = RuntimeError("boom")
    status, _, err = cli(capsys, "group", "list")
    assert status == 1
    one_error_line(err, "internal error")
    del agent.node.fail["groups"]
    assert cli(capsys, "group", "list")[0] == 0


def test_an_exception_group_of_groupcomm_errors_answers_the_first(agent, capsys):
    agent.node.fail["join_group"] = ExceptionGroup("x", [Refused("no quorum")])
    status, _, err = cli(capsys, "group", "join", "web")
    assert status == 1
    one_error_line(err, "no quorum")


def test_bad_usage_exits_2(agent, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["plan", "apply", "/p/plan.toml"])                 # --env is required
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["plan", "apply", "/p/plan.toml", "--env", "e", "--batch", "0"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["cluster", "status", "--group", "g", "--env", "e"])
    assert exc.value.code == 2
    capsys.readouterr()
    assert agent.node.calls == []


def test_no_agent_is_exit_2_naming_the_socket_directory(runtime, capsys):
    status, _, err = cli(capsys, "group", "list")
    assert status == 2
    one_error_line(err, "no provisioning agent", str(runtime))
    status, _, err = cli(capsys, "group", "list", "--socket", str(runtime / "nothing.sock"))
    assert status == 1
    one_error_line(err, "nothing.sock")


# --------------------------------------------------------------------------- finding the socket


def test_find_socket_rules(runtime):
    with pytest.raises(SocketNotFound, match="no provisioning agent runs"):
        find_socket(None)
    first = Agent(default_socket("n1", create_dir=True), FakeNode())
    try:
        assert find_socket(None) == runtime / "groupcomm" / "provisioning-n1.sock"
        assert find_socket("n1") == find_socket(None)
        with pytest.raises(SocketNotFound, match=r"node 'n9'.*agents found: n1"):
            find_socket("n9")
        second = Agent(default_socket("n2"), FakeNode())
        try:
            with pytest.raises(SocketNotFound, match=r"several.*n1, n2.*--node"):
                find_socket(None)
            assert find_socket("n2").name == "provisioning-n2.sock"
        finally:
            second.stop()
    finally:
        first.stop()
    assert not (runtime / "groupcomm" / "provisioning-n1.sock").exists()      # unlinked on exit


def test_default_socket_without_a_runtime_dir_is_private_to_the_user(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    path = default_socket("n1", create_dir=True)
    assert path == tmp_path / f"groupcomm-{os.getuid()}" / "provisioning-n1.sock"
    assert (path.parent.stat().st_mode & 0o777) == 0o700
    with pytest.raises(ConfigError):
        default_socket("../evil")


def test_the_command_picks_the_agent_with_node(runtime, capsys):
    agents = [Agent(default_socket(name, create_dir=True), FakeNode()) for name in ("n1", "n2")]
    try:
        status, _, err = cli(capsys, "group", "list")
        assert status == 2
        one_error_line(err, "n1, n2", "--node")
        assert cli(capsys, "group", "join", "web", "--node", "n2")[0] == 0
        assert agents[1].node.calls == [("join_group", ("web",), {})] and agents[0].node.calls == []
    finally:
        for running in agents:
            running.stop()


# --------------------------------------------------------------------------- the protocol's bounds


def raw(path: Path, data: bytes) -> list[dict]:
    """Send ``data`` (if any) on a fresh connection, half-close, read every answer line until the server
    closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        if data:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return [json.loads(line) for line in b"".join(chunks).splitlines()]


def test_request_errors_keep_the_connection_and_malformed_lines_close_it(agent):
    answers = raw(agent.path, b'{"op": "nope"}\n{"op": "join_group"}\n{"op": "join_group", "group": "g", "x": 1}\n'
                              b'{"op": "apply_plan", "plan_path": "relative.toml", "env": "e"}\n'
                              b'{"op": "groups"}\nnot json\n{"op": "groups"}\n')
    assert [a["ok"] for a in answers] == [False, False, False, False, True, False]
    assert "unknown op 'nope'" in answers[0]["error"] and answers[0]["kind"] == "usage"
    assert "missing argument 'group'" in answers[1]["error"]
    assert "unknown argument 'x'" in answers[2]["error"]
    assert "absolute path" in answers[3]["error"]
    assert answers[5]["error"] == "malformed request: not JSON"              # then closed: no 7th answer
    assert raw(agent.path, b"[1, 2]\n") == [{"ok": False, "error": "malformed request: not a JSON object",
                                             "kind": "usage"}]
    assert raw(agent.path, b"\xff\xfe\n")[0]["error"] == "malformed request: not JSON"
    assert [c[0] for c in agent.node.calls] == ["groups"]


def test_a_too_long_line_is_refused_and_the_server_survives(agent):
    answers = raw(agent.path, b'{"op": "' + b"x" * (MAX_LINE + 10))
    assert answers == [{"ok": False, "error": f"line too long (over {MAX_LINE} bytes)", "kind": "usage"}]
    assert raw(agent.path, b'{"op": "groups"}\n')[0]["ok"] is True
    for _ in range(500):                             # the server closes its end just after answering
        if agent.server.connections == 0:
            break
        time.sleep(0.01)
    assert agent.server.connections == 0


def test_connection_limit_and_peer_check(runtime):
    limited = Agent(default_socket("n1", create_dir=True), FakeNode(), max_connections=1)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as first:
            first.connect(str(limited.path))
            first.sendall(b'{"op": "groups"}\n')
            first.settimeout(10)
            assert json.loads(first.recv(65536))["ok"] is True      # the first is being served
            assert raw(limited.path, b"") == [{"ok": False, "error": "too many connections", "kind": "failed"}]
    finally:
        limited.stop()
    strangers_only = Agent(default_socket("n2"), FakeNode(), peer_uids=[os.getuid() + 1])
    try:
        assert raw(strangers_only.path, b"")[0]["error"] == "permission denied"
        assert strangers_only.node.calls == []
    finally:
        strangers_only.stop()


def test_an_idle_connection_is_closed(runtime):
    idle = Agent(default_socket("n1", create_dir=True), FakeNode(), idle_timeout=0.05)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(idle.path))
            s.sendall(b'{"op": "gro')
            assert json.loads(s.recv(65536)) == {"ok": False, "error": "idle for too long", "kind": "usage"}
            assert s.recv(65536) == b""
    finally:
        idle.stop()


def test_a_socket_someone_listens_on_is_not_taken_over(runtime, agent):
    with pytest.raises(OSError, match="another provisioning agent"):
        Agent(agent.path, FakeNode())
    assert raw(agent.path, b'{"op": "groups"}\n')[0]["ok"] is True


# --------------------------------------------------------------------------- values


def test_to_json_turns_structs_and_dataclasses_into_objects():
    value = {"g": GroupInfo("g", ("a",), True, 1, False), "p": Progress("n1", "x"), "s": frozenset({"b", "a"}),
             "raw": b"\x01\x02", "path": Path("/x")}
    assert to_json(value) == {
        "g": {"name": "g", "members": ["a"], "joined": True, "revision": 1, "writable": False},
        "p": {"node": "n1", "step": "x", "detail": "", "batch": None, "done": None, "total": None, "unit": None,
              "health": None},
        "s": ["a", "b"], "raw": "0102", "path": "/x"}


def test_format_progress():
    assert format_progress({"batch": 2, "node": "n3", "step": "health", "health": "failing",
                            "detail": "GET / 500"}) == "[batch 2] n3 health GET / 500 health failing"
    assert format_progress({"node": "n1", "step": "fetching", "done": 3, "total": 9}) == "n1 fetching (3/9)"


class Chatty(FakeNode):
    async def apply_plan(self, plan_path, *, env, batch=None, force=False, progress=None):
        for n in range(50):                       # no checkpoint in between: the queue cannot drain
            progress({"node": "n1", "step": f"step {n}"})
        return {"env": env, "outcome": "succeeded"}


def test_progress_a_client_cannot_take_is_dropped_never_the_answer(runtime):
    from groupcomm.services.provisioning.control import (
        ProvisioningClient,
        RequestFailed,
        RequestInvalid,
    )

    chatty = Agent(default_socket("n1", create_dir=True), Chatty(), queue_lines=4)
    seen: list[dict] = []
    try:
        client = ProvisioningClient(chatty.path)
        result = trio.run(lambda: client.apply_plan("/p/plan.toml", env="prod", progress=seen.append))
        assert result == {"env": "prod", "outcome": "succeeded"}
        assert [e["step"] for e in seen] == ["step 0", "step 1", "step 2", "step 3"]
        assert chatty.server.dropped_progress == 46
        chatty.node.fail["leave_group"] = Refused("not in group 'x'")
        with pytest.raises(RequestFailed, match="^not in group 'x'$"):
            trio.run(client.leave_group, "x")
        with pytest.raises(RequestInvalid, match="unknown op 'nope'"):
            trio.run(client.request, "nope")
    finally:
        chatty.stop()


def test_without_rich_a_terminal_gets_plain_text(monkeypatch):
    monkeypatch.setitem(sys.modules, "rich.console", None)          # import fails as if rich were missing
    out = StringIO()
    with ProgressView("rich", out) as view:
        view({"batch": 1, "node": "n1", "step": "installing"})
    render_status({"rows": [{"node": "n1", "health": "ok"}]}, out=out, rich=True)
    assert view.mode == "plain"
    assert out.getvalue().splitlines() == ["[batch 1] n1 installing", "rows:", "NODE  HEALTH", "n1    ok"]


def test_bundle_keygen_and_sign_need_no_agent_and_make_a_signature_the_group_check_accepts(capsys, tmp_path):
    from groupcomm.services.provisioning.bundle import read_bundle
    from groupcomm.services.provisioning.signing import (
        load_public_keys,
        read_signature,
        verify,
    )
    from tests.bundles import build_tarball

    wheel = build_tarball(tmp_path, "1.0")
    status, out, _ = cli(capsys, "bundle", "keygen", str(tmp_path / "k.pem"))
    assert status == 0 and out.startswith("ed25519 ")
    (tmp_path / "trusted").write_text(out)
    status, out, err = cli(capsys, "bundle", "keygen", str(tmp_path / "k.pem"))
    assert status == 2 and "exists already" in err
    status, out, _ = cli(capsys, "bundle", "sign", str(wheel), "--key", str(tmp_path / "k.pem"))
    assert status == 0 and out.startswith(f"{wheel}.sig: hello-bundle 1.0 signed with key ")
    bundle = read_bundle(wheel)
    assert verify(bundle, read_signature(f"{wheel}.sig"), load_public_keys(tmp_path / "trusted"))
    status, _, err = cli(capsys, "bundle", "sign", str(wheel), "--key", str(tmp_path / "none.pem"))
    assert status == 2 and err.count("\n") == 1 and "none.pem" in err
