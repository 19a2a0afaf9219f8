"""The lease guard: a program that stops by itself when its supervisor stops renewing its lease.

::

    python -m groupcomm.services.supervisor.guard --lease-fd N --until DEADLINE -- PROGRAM ARGS...

The guard forks and execs ``PROGRAM`` in its own process group, with the
parent-death signal SIGKILL (the program dies if the guard dies), then waits
for whichever comes first:

* **the deadline passes** without a renewal ("lease lapsed"),
* the lease fd reaches **end of file** (every writer closed it: the supervisor
  is gone, or dropped the lease),
* a ``release`` line arrives (the supervisor ends the lease now),
* a **malformed** line arrives (a bug on the writer's side: fail safe),
* the **program exits** on its own.

In the first four cases the guard writes one line to stderr saying why and
kills its whole process group with SIGKILL: the program, whatever the program
started in that group, and the guard itself.  The supervisor then sees the
guard killed by SIGKILL.  When the program exits on its own, the guard exits
with the same status: the same exit code, or killed by the same signal.

The lease fd (framing, one ASCII line per message, ``\\n``-terminated, at most
64 bytes)::

    DEADLINE     a renewal: the new deadline, a decimal number of seconds on
                 the lease clock (below); the latest line wins
    release      end now

**The lease clock** is ``CLOCK_BOOTTIME`` (:func:`clock`): system-wide like
``CLOCK_MONOTONIC``, so supervisor and guard read the same clock, but it also
counts time the machine spent suspended, so a lease also lapses during a
suspend.  (``time.monotonic()`` would not.)  The guard wakes at least every
:data:`MAX_SLEEP` seconds, since a sleep's timeout itself is measured without
suspended time.

Signals: the guard is the process group's leader (it makes itself one if it
was not started as one), so a signal the supervisor sends to the group reaches
the program directly.  The guard ignores the termination signals a process may
be asked to stop with (SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2,
SIGALRM...) and keeps waiting: it ends when its program does, with its status.
Only SIGKILL ends the guard first, and then the program follows (parent-death
signal).

This module imports only the standard library, and :func:`command` runs it as
a script in isolated mode (``python -I -S guard.py``), which starts in a few
milliseconds; ``python -m`` works too but first imports the package.
"""

from __future__ import annotations

import ctypes
import math
import os
import select
import signal
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["MAX_LINE", "MAX_SLEEP", "RELEASE", "clock", "command", "main", "renewal"]

MAX_LINE = 64           # bytes of one lease message, newline included
MAX_SLEEP = 0.1         # seconds between looks at the clock, whatever the deadline
RELEASE = b"release\n"

_PR_SET_PDEATHSIG = 1
# Signals a supervisor may stop the program with (a stop_signal is any signal
# but SIGKILL/SIGSTOP): the guard outlives them and ends with its program.
_OUTLIVED = tuple(
    s for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
                signal.SIGALRM, signal.SIGVTALRM, signal.SIGPROF, signal.SIGPOLL, signal.SIGPWR,
                signal.SIGXCPU, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)
)
# Dispositions Python changes at start-up that an exec'd program must not inherit.
_RESTORED = (signal.SIGPIPE, signal.SIGXFSZ)


def clock() -> float:
    """The lease clock: seconds on ``CLOCK_BOOTTIME`` (monotonic, system-wide, counts suspend)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def renewal(deadline: float) -> bytes:
    """The lease message renewing the lease until ``deadline`` (on :func:`clock`)."""
    return f"{deadline:.6f}\n".encode("ascii")


def command(argv: Sequence[str], *, lease_fd: int, until: float, python: str = sys.executable) -> list[str]:
    """The argv running ``argv`` under a guard reading its lease from ``lease_fd``, valid until ``until``."""
    if not argv:
        raise ValueError("the guarded program's argv is empty")
    return [python, "-I", "-S", os.path.abspath(__file__), "--lease-fd", str(lease_fd),
            "--until", repr(float(until)), "--", *argv]


# --------------------------------------------------------------------------- the guard's process


def _say(message: str) -> None:
    try:
        os.write(2, f"groupcomm guard (pid {os.getpid()}): {message}\n".encode(errors="replace"))
    except OSError:
        pass


def _end_group(why: str, program: int) -> None:
    """Kill the whole process group -- program, its children, the guard -- and never return."""
    group = os.getpgid(0)
    _say(f"{why}; killing process group {group} (program pid {program})")
    try:
        os.killpg(group, signal.SIGKILL)
    except OSError:
        pass
    try:
        if program > 0:
            os.kill(program, signal.SIGKILL)     # in case killpg was refused
    finally:
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(137)                                # not reached


def _exit_like(status: int) -> None:
    """End the guard with the status its program ended with (wait status)."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        if signum not in (signal.SIGKILL, signal.SIGSTOP):      # these cannot be caught or blocked
            signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
        os.kill(os.getpid(), signum)
        os._exit(128 + signum)                    # a signal whose default does not end a process
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)


def _start(argv: list[str]) -> int:
    """Fork and exec the program in this process group with the parent-death signal SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    guard = os.getpid()
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _OUTLIVED)   # none lost to the child before exec
    pid = os.fork()
    if pid == 0:
        try:
            for s in _OUTLIVED + _RESTORED:
                signal.signal(s, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0 or os.getppid() != guard:
                os._exit(126)                    # cannot be tied to the guard, or the guard is gone
            os.execvp(argv[0], argv)
        except BaseException as e:                # noqa: BLE001 -- the forked child must never return
            _say(f"cannot run {argv[0]!r}: {e}")
        os._exit(127)
    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return pid


def _parse_line(line: bytes) -> float | None:
    """A lease message: the new deadline, or None for release.  ValueError if malformed."""
    if line == RELEASE:
        return None
    text = line.decode("ascii").strip()
    deadline = float(text)
    if not math.isfinite(deadline):
        raise ValueError(text)
    return deadline


def guard(lease_fd: int, until: float, argv: list[str]) -> None:
    """Run ``argv`` under the lease (never returns)."""
    os.set_inheritable(lease_fd, False)
    os.set_blocking(lease_fd, False)
    if os.getpgid(0) != os.getpid():
        os.setpgid(0, 0)
    for s in _OUTLIVED:
        signal.signal(s, lambda *_: None)
    if clock() >= until:
        _end_group(f"lease lapsed at {until:.3f} before the program started (now {clock():.3f})", 0)
    program = _start(argv)
    pidfd = os.pidfd_open(program)
    poller = select.poll()
    poller.register(lease_fd, select.POLLIN)
    poller.register(pidfd, select.POLLIN)
    deadline = until
    pending = b""
    while True:
        now = clock()
        if now >= deadline:
            _end_group(f"lease lapsed at {deadline:.3f} (now {now:.3f})", program)
        wait = min(deadline - now, MAX_SLEEP)
        ready = {fd for fd, _ in poller.poll(max(1, int(wait * 1000) + 1))}
        if pidfd in ready:
            _, status = os.waitpid(program, 0)
            _exit_like(status)
        if lease_fd in ready:
            try:
                data = os.read(lease_fd, 4096)
            except BlockingIOError:
                continue
            if not data:
                _end_group("lease fd closed (the supervisor is gone)", program)
            pending += data
            *lines, pending = pending.split(b"\n")
            if len(pending) >= MAX_LINE:
                _end_group("malformed lease message (too long)", program)
            for raw in lines:
                if len(raw) >= MAX_LINE:
                    _end_group("malformed lease message (too long)", program)
                try:
                    value = _parse_line(raw + b"\n")
                except ValueError:
                    _end_group(f"malformed lease message {raw[:MAX_LINE]!r}", program)
                if value is None:
                    _end_group("lease released", program)
                deadline = value


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: guard.py --lease-fd N --until DEADLINE -- PROGRAM [ARGS...]"
    try:
        split = args.index("--")
        options, program = args[:split], args[split + 1:]
        values = dict(zip(options[::2], options[1::2], strict=True))
        if set(values) != {"--lease-fd", "--until"} or not program:
            raise ValueError
        lease_fd, until = int(values["--lease-fd"]), float(values["--until"])
        os.fstat(lease_fd)
    except (ValueError, OSError):
        print(usage, file=sys.stderr)
        sys.exit(2)
    guard(lease_fd, until, program)


if __name__ == "__main__":
    main()
