"""The supervisor's trio driver with real processes (``python -c`` children), bounded in time.

Only processes these tests start are signalled: the supervised children (their
pids come from the supervisor the test runs) and the supervisor subprocess of
the parent-death test.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import trio

from groupcomm.cli import supervise
from groupcomm.cli.errors import EXIT_USAGE, report
from groupcomm.errors import ConfigError
from groupcomm.services.supervisor.runner import Supervisor
from groupcomm.services.supervisor.spec import Backoff, HealthCheck, LogSettings, ProcessSpec

PY = sys.executable
SLEEPER = [PY, "-c", "import time; time.sleep(60)"]
LIMIT = 20          # seconds any one wait may take before the test fails


def proc(name: str, command: list[str], tmp_path: Path, **kw) -> ProcessSpec:
    kw.setdefault("backoff", Backoff(initial=0.3, max=2.0, reset_after=30.0))
    kw.setdefault("stop_grace", 2.0)
    kw.setdefault("log", LogSettings(directory=str(tmp_path / "logs")))
    return ProcessSpec(name=name, command=tuple(command), **kw)


async def until(sup: Supervisor, predicate):
    with trio.fail_after(LIMIT):
        return await sup.wait_until(predicate)


def gone(pid: int) -> bool:
    """Whether ``pid`` has ended (a zombie waiting for a reaper counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def test_a_child_killed_with_sigkill_is_restarted_after_its_back_off(tmp_path):
    history = []
    async with Supervisor([proc("sleeper", SLEEPER, tmp_path, restart="on-failure")], name="n1",
                          on_table=lambda rows: history.append((trio.current_time(), rows[0]))) as sup:
        rows = await until(sup, lambda r: r["sleeper"].state == "running")
        first = rows["sleeper"].pid
        os.kill(first, signal.SIGKILL)
        killed_at = trio.current_time()
        rows = await until(sup, lambda r: r["sleeper"].state == "running" and r["sleeper"].generation == 2)
        row = rows["sleeper"]
        assert row.pid != first and row.restarts == 1 and row.last_exit == -signal.SIGKILL
        (backoff,) = [r for _, r in history if r.state == "backoff"]
        assert backoff.retry_at - backoff.since == 300_000 and "SIGKILL" in backoff.detail
        (restart_time,) = [t for t, r in history if r.state == "starting" and r.generation == 2]
        assert restart_time - killed_at >= 0.3
    assert gone(row.pid)                                   # leaving the block stopped it


def _write_module(tmp_path: Path, monkeypatch) -> str:
    (tmp_path / "sv_probe_module.py").write_text(textwrap.dedent("""
        def healthy(target):
            assert target.process == "svc" and target.node == "n1" and target.pid > 0
            return True

        def sick(target):
            raise RuntimeError("database unreachable")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "sv_probe_module"


async def _http_server(nursery: trio.Nursery, status: int) -> int:
    async def handler(stream: trio.SocketStream) -> None:
        with trio.move_on_after(5):
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                data += chunk
            await stream.send_all(f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok".encode())
        await stream.aclose()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


async def _hang_up(stream: trio.SocketStream) -> None:
    await stream.aclose()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _health(kind: str, good: bool, nursery: trio.Nursery, module: str) -> HealthCheck:
    timing = {"interval": 0.1, "timeout": 2.0, "failures": 2}
    if kind == "command":
        return HealthCheck(kind="command", command=(PY, "-c", f"raise SystemExit({0 if good else 1})"), **timing)
    if kind == "http":
        port = await _http_server(nursery, 200 if good else 503)
        return HealthCheck(kind="http", url=f"http://127.0.0.1:{port}/health", **timing)
    if kind == "tcp":
        if good:
            listeners = await nursery.start(functools.partial(trio.serve_tcp, _hang_up, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
        else:
            port = _closed_port()
        return HealthCheck(kind="tcp", port=port, **timing)
    return HealthCheck(kind="python", entry_point=f"{module}:{'healthy' if good else 'sick'}", **timing)


@pytest.mark.parametrize("kind", ["command", "http", "tcp", "python"])
async def test_a_passing_probe_makes_it_running_and_a_failing_one_restarts_it(kind, tmp_path, monkeypatch):
    module = _write_module(tmp_path, monkeypatch)
    async with trio.open_nursery() as servers:
        good = await _health(kind, True, servers, module)
        async with Supervisor([proc("svc", SLEEPER, tmp_path, health=good)], name="n1") as sup:
            rows = await until(sup, lambda r: r["svc"].state == "running")
            assert rows["svc"].failures == 0
        bad = await _health(kind, False, servers, module)
        history = []
        async with Supervisor([proc("svc", SLEEPER, tmp_path, health=bad)], name="n1",
                              on_table=lambda rows: history.append(rows[0])) as sup:
            rows = await until(sup, lambda r: r["svc"].generation == 2)
            first = [r for r in history if r.generation == 1]
            assert any("unhealthy: 2 probe failures" in r.detail for r in first), first[-1]
            assert any(r.state == "backoff" for r in first)
            assert all(r.state != "running" for r in first)        # never healthy, so never running
            if kind == "python":
                assert any("database unreachable" in r.detail for r in first)
        servers.cancel_scope.cancel()


async def test_a_probe_that_hangs_is_a_timeout(tmp_path):
    hang = HealthCheck(kind="command", command=(PY, "-c", "import time; time.sleep(60)"), interval=0.1,
                       timeout=0.2, failures=1)
    async with Supervisor([proc("svc", SLEEPER, tmp_path, health=hang)], name="n1") as sup:
        rows = await until(sup, lambda r: r["svc"].state in ("stopping", "backoff"))
        assert "timeout" in rows["svc"].detail


@pytest.mark.parametrize(("status", "state"), [(0, "stopped"), (3, "failed")])
async def test_restart_never_leaves_it_ended(tmp_path, status, state):
    command = [PY, "-c", f"raise SystemExit({status})"]
    async with Supervisor([proc("once", command, tmp_path, restart="never")], name="n1") as sup:
        rows = await until(sup, lambda r: r["once"].state == state)
        assert rows["once"].last_exit == status
        await trio.sleep(0.6)                                  # twice the back-off: still not started again
        assert sup.row("once").generation == 1 and sup.row("once").state == state


async def test_stop_escalates_to_sigkill_after_the_grace_period(tmp_path):
    ready = tmp_path / "ready"
    code = ("import signal, time, pathlib, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "pathlib.Path(sys.argv[1]).touch(); time.sleep(60)")
    command = [PY, "-c", code, str(ready)]
    async with Supervisor([proc("stubborn", command, tmp_path, stop_grace=0.3)], name="n1") as sup:
        with trio.fail_after(LIMIT):
            while not ready.exists():
                await trio.sleep(0.02)
        t0 = trio.current_time()
        sup.stop("stubborn")
        rows = await until(sup, lambda r: r["stubborn"].state == "stopped")
        assert rows["stubborn"].last_exit == -signal.SIGKILL
        assert trio.current_time() - t0 >= 0.3


async def test_output_goes_to_rotated_log_files(tmp_path):
    logs = tmp_path / "logs"
    command = [PY, "-c", "for i in range(3000): print(f'line {i:05d} ' + 'x' * 88)"]
    spec = proc("chatty", command, tmp_path, restart="never",
                log=LogSettings(directory=str(logs), max_bytes=64 * 1024, keep=2))
    async with Supervisor([spec], name="n7") as sup:
        await until(sup, lambda r: r["chatty"].state == "stopped")
        with trio.fail_after(LIMIT):
            while b"line 02999" not in (logs / "chatty.log").read_bytes():
                await trio.sleep(0.05)
    names = sorted(p.name for p in logs.iterdir())
    assert names == ["chatty.log", "chatty.log.1", "chatty.log.2"]     # 300 kB through 64 KiB files, keep 2
    assert all(p.stat().st_size <= 64 * 1024 for p in logs.iterdir())
    assert (logs / "chatty.log.2").stat().st_size == 64 * 1024
    text = b"".join((logs / n).read_bytes() for n in ("chatty.log.2", "chatty.log.1", "chatty.log"))
    assert b"line 00000" not in text                                 # the oldest output was dropped
    lines = [int(line.split()[1]) for line in text.splitlines() if line.startswith(b"line ")]
    assert lines == list(range(lines[0], 3000))                      # the rest is complete and in order


async def test_the_environment_names_node_process_and_role(tmp_path):
    logs = tmp_path / "logs"
    code = ("import os; print('ENV', os.environ['GROUPCOMM_NODE'], os.environ['GROUPCOMM_PROCESS'], "
            "os.environ['GROUPCOMM_ROLE'], os.environ['EXTRA'], flush=True)")
    command = [PY, "-c", code]
    spec = proc("envy", command, tmp_path, restart="never", role="worker", env={"EXTRA": "yes"})
    async with Supervisor([spec], name="n7") as sup:
        await until(sup, lambda r: r["envy"].state == "stopped")
        with trio.fail_after(LIMIT):
            while b"ENV" not in (logs / "envy.log").read_bytes():
                await trio.sleep(0.05)
    assert b"ENV n7 envy worker yes\n" in (logs / "envy.log").read_bytes()


async def test_processes_are_added_changed_and_removed_at_run_time(tmp_path):
    async with Supervisor([], name="n1") as sup:
        assert sup.table() == ()
        sup.add(proc("late", SLEEPER, tmp_path))
        rows = await until(sup, lambda r: "late" in r and r["late"].state == "running")
        first = rows["late"].pid
        with pytest.raises(ValueError):
            sup.add(proc("late", SLEEPER, tmp_path))
        sup.change(proc("late", [PY, "-c", "import time; time.sleep(61)"], tmp_path))
        rows = await until(sup, lambda r: r["late"].state == "running" and r["late"].generation == 2)
        second = rows["late"].pid
        assert gone(first) and Path(f"/proc/{second}/cmdline").read_bytes().endswith(b"sleep(61)\0")
        sup.remove("late")
        await until(sup, lambda r: "late" not in r)
        assert gone(second)


async def test_a_missing_program_is_a_failed_start_retried_with_back_off(tmp_path):
    spec = proc("ghost", ["/nonexistent/program"], tmp_path, restart="on-failure")
    history = []
    async with Supervisor([spec], name="n1", on_table=lambda rows: history.append(rows[0])) as sup:
        await until(sup, lambda r: r["ghost"].generation >= 2)
    backoff = next(r for r in history if r.state == "backoff")
    assert backoff.generation == 1 and backoff.detail.startswith("start failed: FileNotFoundError")
    assert backoff.retry_at - backoff.since == 300_000 and backoff.last_exit is None


async def test_what_a_child_leaves_in_its_process_group_dies_with_it(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "open(sys.argv[1], 'w').write(str(p.pid)); raise SystemExit(1)")
    grandchild = None
    try:
        async with Supervisor([proc("parent", [PY, "-c", code, str(pidfile)], tmp_path, restart="never")],
                              name="n1") as sup:
            await until(sup, lambda r: r["parent"].state == "failed")
            grandchild = int(pidfile.read_text())
            with trio.fail_after(5):
                while not gone(grandchild):
                    await trio.sleep(0.02)
    finally:
        if grandchild is not None and not gone(grandchild):
            os.kill(grandchild, signal.SIGKILL)


def _node_file(pidfile: Path) -> str:
    """A node file whose one process ("c") writes its pid to ``pidfile`` and sleeps."""
    code = 'import os, sys, time; open(sys.argv[1], "w").write(str(os.getpid())); time.sleep(60)'
    return f"[[process]]\nname = 'c'\ncommand = ['{PY}', '-c', '{code}', '{pidfile}']\n"


def test_children_die_with_a_supervisor_killed_with_sigkill(tmp_path):
    pidfile = tmp_path / "child.pid"
    node = tmp_path / "node.toml"
    node.write_text(_node_file(pidfile))
    supervisor = subprocess.Popen([PY, "-m", "groupcomm.services.supervisor.runner", str(node)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child = None
    try:
        deadline = time.monotonic() + LIMIT
        while not (pidfile.exists() and pidfile.read_text()):
            assert time.monotonic() < deadline and supervisor.poll() is None, supervisor.stderr.read()
            time.sleep(0.05)
        child = int(pidfile.read_text())
        assert not gone(child)
        supervisor.kill()                                     # SIGKILL: no chance to stop its children
        supervisor.wait(timeout=LIMIT)
        while not gone(child):
            assert time.monotonic() < deadline, "the child outlived its supervisor"
            time.sleep(0.05)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
        if child is not None and not gone(child):
            os.kill(child, signal.SIGKILL)


def test_the_runner_stops_its_children_on_sigterm(tmp_path):
    pidfile = tmp_path / "child.pid"
    node = tmp_path / "node.toml"
    node.write_text(_node_file(pidfile))
    supervisor = subprocess.Popen([PY, "-m", "groupcomm.services.supervisor.runner", str(node), "--name", "n9"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + LIMIT
        while not (pidfile.exists() and pidfile.read_text()):
            assert time.monotonic() < deadline and supervisor.poll() is None, supervisor.stderr.read()
            time.sleep(0.05)
        child = int(pidfile.read_text())
        supervisor.terminate()
        out, err = supervisor.communicate(timeout=LIMIT)
        assert supervisor.returncode == 0, err
        assert gone(child)
        assert "c: running pid" in out and "c: stopped (killed by SIGTERM)" in out and "node 'n9'" in out
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()


def test_a_bad_node_file_is_one_line_and_exit_2(tmp_path, capsys):
    node = tmp_path / "node.toml"
    node.write_text('[[process]]\nname = "web"\ncommand = ["x"]\nrestart = "sometimes"\n')
    import argparse

    parser = argparse.ArgumentParser()
    supervise.add_parser(parser.add_subparsers())
    args = parser.parse_args(["supervise", str(node)])
    with pytest.raises(ConfigError) as e:
        args.run(args)
    assert report(e.value) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{node}: process 'web': restart" in err
    out = subprocess.run([PY, "-m", "groupcomm.services.supervisor.runner", str(node)], capture_output=True,
                         text=True, timeout=LIMIT, check=False)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "restart" in out.stderr


async def test_an_idle_supervisor_sleeps_until_its_next_deadline(tmp_path, monkeypatch):
    # Its timer used to wake itself after every tick: a supervisor with nothing to do spun at full speed.
    ticks = []
    real_tick = Supervisor._core_tick
    monkeypatch.setattr(Supervisor, "_core_tick", lambda self: ticks.append(1) or real_tick(self))
    async with Supervisor([], name="idle"):
        await trio.sleep(0.5)
    assert len(ticks) < 20, f"{len(ticks)} ticks in 0.5 s with nothing to do"
