"""Starting children that cannot outlive their supervisor, and waiting for them under trio.

Each child gets its own process group (so a stop reaches everything it
started) and the parent-death signal SIGKILL (``prctl(PR_SET_PDEATHSIG)``), so
even a ``kill -9`` of the supervisor takes the child with it.  Linux delivers
that signal when the *thread* that forked the child ends, so children are
forked from the trio thread itself -- never from a worker thread as
``trio.lowlevel.open_process`` does.  Grandchildren that leave the child's
process group and do not set their own parent-death signal are outside this
guarantee; those that stay in it are killed when the child ends.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence

import trio

__all__ = ["Child", "spawn"]

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _child_setup(parent: int):
    def setup() -> None:                   # runs in the child between fork and exec
        if _libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            os._exit(126)
        if os.getppid() != parent:         # the supervisor died before prctl took effect
            os._exit(126)
    return setup


class Child:
    """A started child: its pid, the read end of its output pipe, and a way to wait for it."""

    def __init__(self, popen: subprocess.Popen[bytes], output: trio.lowlevel.FdStream | None) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.output = output

    @property
    def returncode(self) -> int | None:
        """The exit status (``-N``: killed by signal N), once reaped."""
        return self.popen.returncode

    def poll(self) -> int | None:
        """Reap the child if it has ended (without blocking)."""
        if self.popen.returncode is None and self._ended():
            return self._reap()
        return self.popen.returncode

    async def wait(self) -> int:
        """Wait for the child to end and reap it; the status as :attr:`returncode`."""
        if self.popen.returncode is not None:
            return self.popen.returncode
        pidfd = os.pidfd_open(self.pid)
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        return self._reap()

    def _ended(self) -> bool:
        info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        return info is not None

    def _reap(self) -> int:
        # Whatever the child left running in its process group would run on
        # unsupervised: kill it while the unreaped child still holds the group's id.
        self.signal_group(signal.SIGKILL)
        return self.popen.wait()

    def signal_group(self, signum: int) -> None:
        """Send ``signum`` to the child's process group, if the child is not reaped yet."""
        if self.popen.returncode is None:
            try:
                os.killpg(self.pid, signum)
            except ProcessLookupError:
                pass


def spawn(argv: Sequence[str], *, env: Mapping[str, str], cwd: str, capture: bool,
          pass_fds: Sequence[int] = ()) -> Child:
    """Start ``argv`` (stdin from /dev/null) in a new process group with a parent-death signal.

    ``capture``: stdout and stderr go to one pipe, read through :attr:`Child.output`;
    else to /dev/null.  ``pass_fds``: descriptors the child inherits (at the
    same numbers; e.g. a lease's read end), every other one is closed.  OSError
    (no such program, bad cwd) is raised.
    """
    read_fd = write_fd = -1
    if capture:
        read_fd, write_fd = os.pipe()
    try:
        popen = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL,
            stdout=write_fd if capture else subprocess.DEVNULL,
            stderr=subprocess.STDOUT if capture else subprocess.DEVNULL,
            env=dict(env), cwd=cwd, process_group=0, preexec_fn=_child_setup(os.getpid()),  # noqa: PLW1509 -- only prctl/getppid
            close_fds=True, pass_fds=tuple(pass_fds),
        )
    except BaseException:
        if capture:
            os.close(read_fd)
        raise
    finally:
        if capture:
            os.close(write_fd)
    return Child(popen, trio.lowlevel.FdStream(read_fd) if capture else None)
