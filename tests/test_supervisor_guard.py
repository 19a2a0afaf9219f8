"""The lease guard with real processes (``python -c`` programs), bounded in time.

Every guard runs in a process group these tests create (``process_group=0``);
only those groups, and pids inside them, are ever signalled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from groupcomm.services.supervisor.guard import clock, command, renewal
from groupcomm.services.supervisor.lease import Lease
from groupcomm.services.supervisor.spawn import spawn

PY = sys.executable
LIMIT = 20.0          # seconds any one wait may take before the test fails

# The program: writes its pid, starts a grandchild in its process group that
# writes its pid too, then runs ``then`` (default: sleep).
PROGRAM = """
import os, subprocess, sys, time
out = sys.argv[1]
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
with open(out + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {child.pid}")
os.rename(out + ".tmp", out)
THEN
"""


def program(pids: Path, then: str = "time.sleep(60)") -> list[str]:
    return [PY, "-c", PROGRAM.replace("THEN", then), str(pids)]


def gone(pid: int) -> bool:
    """Whether ``pid`` has ended (a zombie waiting for a reaper counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_for(predicate, what: str) -> None:
    end = time.monotonic() + LIMIT
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Guarded:
    """A guard started the way the supervisor starts one: own process group, the lease's read end passed."""

    def __init__(self, tmp_path: Path, argv: list[str], *, duration: float = 30.0, until: float | None = None) -> None:
        self.lease = Lease(duration)
        self.pids_file = tmp_path / "pids"
        self.stderr_path = tmp_path / "guard.err"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.lease.command(argv, until), stdin=subprocess.DEVNULL, stderr=err,
                                         process_group=0, pass_fds=(self.lease.child_fd,))
        self.lease.child_started()

    def pids(self) -> tuple[int, int]:
        wait_for(self.pids_file.exists, "the program's pid file")
        program, grandchild = map(int, self.pids_file.read_text().split())
        return program, grandchild

    def status(self) -> int:
        return self.proc.wait(timeout=LIMIT)

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def cleanup(self) -> None:
        self.lease.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)     # the group this test created
            self.proc.wait(timeout=LIMIT)


@pytest.fixture
def guarded(tmp_path):
    started: list[Guarded] = []

    def start(argv: list[str] | None = None, **kw) -> Guarded:
        g = Guarded(tmp_path, argv if argv is not None else program(tmp_path / "pids"), **kw)
        started.append(g)
        return g

    yield start
    for g in started:
        g.cleanup()


def test_the_program_runs_while_the_lease_is_renewed_and_a_release_ends_it(guarded):
    g = guarded(duration=0.4)
    prog, grandchild = g.pids()
    end = time.monotonic() + 1.5                    # well past the first deadline
    while time.monotonic() < end:
        assert g.lease.renew()
        time.sleep(0.05)
    assert g.proc.poll() is None and not gone(prog) and not gone(grandchild)
    g.lease.release()
    assert g.status() == -signal.SIGKILL
    wait_for(lambda: gone(prog) and gone(grandchild), "the program and its child to end")
    assert "lease released" in g.stderr()


def test_a_lapsed_lease_kills_the_program_its_children_and_the_guard(guarded):
    g = guarded(duration=0.5)
    prog, grandchild = g.pids()
    assert g.status() == -signal.SIGKILL           # nobody renews: the supervisor froze
    wait_for(lambda: gone(prog) and gone(grandchild), "the program and its child to end")
    assert "lease lapsed at" in g.stderr() and f"program pid {prog}" in g.stderr()


def test_a_renewal_sets_the_deadline_the_guard_enforces(guarded):
    g = guarded(duration=30.0)
    prog, _ = g.pids()
    g.lease.renew(clock() + 0.3)                   # the latest line wins, even an earlier deadline
    assert g.status() == -signal.SIGKILL
    assert "lease lapsed" in g.stderr()
    wait_for(lambda: gone(prog), "the program to end")


def test_end_of_file_on_the_lease_kills_the_group(guarded):
    g = guarded()
    prog, grandchild = g.pids()
    g.lease.close()                                # what the supervisor's exit does
    assert g.status() == -signal.SIGKILL
    wait_for(lambda: gone(prog) and gone(grandchild), "the program and its child to end")
    assert "lease fd closed" in g.stderr()


@pytest.mark.parametrize("line", [b"soon\n", b"nan\n", b"\n", b"1" * 100 + b"\n", b"9" * 80])
def test_a_malformed_lease_message_kills_the_group(tmp_path, line):
    read_fd, write_fd = os.pipe()
    with open(tmp_path / "guard.err", "wb") as err:
        proc = subprocess.Popen(command(program(tmp_path / "pids"), lease_fd=read_fd, until=clock() + 30),
                                stdin=subprocess.DEVNULL, stderr=err, process_group=0, pass_fds=(read_fd,))
    os.close(read_fd)
    try:
        wait_for((tmp_path / "pids").exists, "the program's pid file")
        prog, _ = map(int, (tmp_path / "pids").read_text().split())
        os.write(write_fd, renewal(clock() + 30) + line)
        assert proc.wait(timeout=LIMIT) == -signal.SIGKILL
        assert "malformed lease message" in (tmp_path / "guard.err").read_text()
        wait_for(lambda: gone(prog), "the program to end")
    finally:
        os.close(write_fd)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=LIMIT)


def test_an_expired_deadline_never_starts_the_program(guarded, tmp_path):
    g = guarded(until=clock() - 1.0)
    assert g.status() == -signal.SIGKILL
    assert not (tmp_path / "pids").exists() and "before the program started" in g.stderr()


@pytest.mark.parametrize(("then", "status"), [
    ("sys.exit(7)", 7),
    ("sys.exit(0)", 0),
    ("os.kill(os.getpid(), signal.SIGUSR1)", -signal.SIGUSR1),    # a signal the guard itself outlives
    ("os.kill(os.getpid(), signal.SIGKILL)", -signal.SIGKILL),
])
def test_the_programs_exit_status_is_the_guards(guarded, tmp_path, then, status):
    g = guarded(program(tmp_path / "pids", f"import signal; {then}"))
    assert g.status() == status


def test_sigterm_to_the_group_stops_the_program_and_the_guard_ends_with_its_status(guarded, tmp_path):
    g = guarded()
    prog, _ = g.pids()
    os.killpg(g.proc.pid, signal.SIGTERM)          # the supervisor's stop_signal
    assert g.status() == -signal.SIGTERM
    assert gone(prog)                              # the guard reaped it before ending


def test_the_guard_outlives_a_stop_signal_its_program_handles(guarded, tmp_path):
    handles = ("import signal\n"
               "signal.signal(signal.SIGTERM, lambda *_: open(out + '.term', 'w').close())\n"
               "while not os.path.exists(out + '.term'): time.sleep(0.01)\n"
               "time.sleep(0.3); sys.exit(3)")
    g = guarded(program(tmp_path / "pids", handles))
    g.pids()
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
        if sig != signal.SIGTERM:
            os.kill(g.proc.pid, sig)               # the guard alone: ignored
    time.sleep(0.1)
    assert g.proc.poll() is None
    os.killpg(g.proc.pid, signal.SIGTERM)
    assert g.status() == 3                         # ended with its program, not before


def test_a_guard_killed_with_sigkill_takes_its_program_along(guarded):
    g = guarded()
    prog, _ = g.pids()
    os.kill(g.proc.pid, signal.SIGKILL)
    assert g.status() == -signal.SIGKILL
    wait_for(lambda: gone(prog), "the program to end (parent-death signal)")


def test_the_program_starts_with_default_signal_dispositions_and_no_lease_fd(guarded, tmp_path):
    status, fds = tmp_path / "status", tmp_path / "fds"
    g = guarded(["sh", "-c", f"cat /proc/self/status > {status}; ls /proc/self/fd > {fds}"])
    assert g.status() == 0
    fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
    # The guard (a Python program) ignores SIGPIPE and SIGXFSZ and catches SIGTERM...: none of it is inherited.
    assert int(fields["SigIgn"], 16) == 0 and int(fields["SigBlk"], 16) == 0
    assert sorted(map(int, fds.read_text().split())) == [0, 1, 2, 3]        # 3: ls's own directory


def test_renewals_to_a_guard_that_does_not_read_are_dropped_not_blocking(guarded):
    g = guarded()
    g.pids()
    os.kill(g.proc.pid, signal.SIGSTOP)            # frozen guard: its pipe fills up
    try:
        results = [g.lease.renew() for _ in range(20_000)]
    finally:
        os.kill(g.proc.pid, signal.SIGCONT)
    assert results[0] and not results[-1]
    assert g.lease.dropped == results.count(False) > 0
    g.lease.release()
    assert g.status() == -signal.SIGKILL


def test_the_guard_module_runs_with_the_standard_library_only():
    path = Path(__file__).resolve().parent.parent / "groupcomm/services/supervisor/guard.py"
    code = f"import runpy, sys; runpy.run_path({str(path)!r}, run_name='guard'); print(sorted(sys.modules))"
    out = subprocess.run([PY, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=LIMIT, check=True)
    assert "groupcomm" not in out.stdout and "trio" not in out.stdout and "ctypes" in out.stdout


async def test_spawned_the_supervisors_way_a_lapse_is_a_sigkill_of_the_child(tmp_path):
    lease = Lease(0.5)
    pids = tmp_path / "pids"
    child = spawn(lease.command(program(pids)), env=dict(os.environ), cwd=str(tmp_path), capture=True,
                  pass_fds=(lease.child_fd,))
    lease.child_started()
    try:
        output = b""
        with trio.fail_after(LIMIT):
            status = await child.wait()
            assert child.output is not None
            while data := await child.output.receive_some(65536):
                output += data
        assert status == -signal.SIGKILL and b"lease lapsed" in output
        assert not lease.renew() and lease.dropped == 1    # the guard is gone: nothing to write to
        prog, grandchild = map(int, pids.read_text().split())
        wait_for(lambda: gone(prog) and gone(grandchild), "the program and its child to end")
    finally:
        child.signal_group(signal.SIGKILL)
        lease.close()
        if child.output is not None:
            await child.output.aclose()


def test_renewal_message_framing():
    assert renewal(12.5) == b"12.500000\n"
