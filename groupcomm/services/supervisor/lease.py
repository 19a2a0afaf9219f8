"""The supervisor's side of a lease: the pipe a guarded process's guard reads.

::

    lease = Lease(duration=3.0)
    argv = lease.command(spec.command)                 # the program wrapped in the guard
    child = spawn(argv, ..., pass_fds=(lease.child_fd,))
    lease.child_started()                              # the supervisor keeps only the write end
    ...
    lease.renew()                                      # every renew_every seconds while entitled
    ...
    lease.release()                                    # end it now (the guard kills its group)

The guard (:mod:`.guard`) kills the program's process group when the deadline
passes without a renewal, when a ``release`` arrives, or when the pipe's write
end is closed -- the supervisor exiting, however it exits, closes it.  Writes
never block: a lease message is shorter than ``PIPE_BUF``, so it is written
whole or not at all, and a full pipe (a guard that does not read, e.g. frozen)
only counts the renewal as :attr:`Lease.dropped` -- renewals are idempotent and
the guard enforces the last deadline it read.  Deadlines are on
:func:`~.guard.clock` (``CLOCK_BOOTTIME``), never on trio's clock.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Self

from groupcomm.services.supervisor.guard import RELEASE, clock, command, renewal

__all__ = ["Lease", "clock"]


class Lease:
    """One guarded process's lease: a pipe whose read end the guard inherits.

    ``duration``: the seconds a renewal (and the start) grants, counted from
    the moment the supervisor writes it.
    """

    def __init__(self, duration: float) -> None:
        if not duration > 0:
            raise ValueError(f"a lease lasts a positive time, not {duration!r}")
        self.duration = float(duration)
        self.deadline = 0.0
        self.dropped = 0                     # renewals not written (full pipe, guard gone)
        self._read, self._write = os.pipe()  # both close-on-exec; spawn's pass_fds hands over the read end
        os.set_blocking(self._write, False)

    @property
    def child_fd(self) -> int:
        """The read end, for ``pass_fds`` of the guard's spawn (-1 once handed over)."""
        return self._read

    @property
    def closed(self) -> bool:
        return self._write < 0

    def command(self, argv: Sequence[str], until: float | None = None) -> list[str]:
        """``argv`` wrapped in the guard, its lease valid until ``until`` (default: ``duration`` from now)."""
        if self._read < 0:
            raise ValueError("the lease's read end was handed over already")
        self.deadline = clock() + self.duration if until is None else float(until)
        return command(argv, lease_fd=self._read, until=self.deadline)

    def child_started(self) -> None:
        """The guard was spawned (or failed to): close the supervisor's copy of the read end."""
        if self._read >= 0:
            os.close(self._read)
            self._read = -1

    def renew(self, deadline: float | None = None) -> bool:
        """Extend the lease to ``deadline`` (default: ``duration`` from now); False if dropped."""
        if deadline is None:
            deadline = clock() + self.duration
        if self._send(renewal(deadline)):
            self.deadline = deadline
            return True
        return False

    def release(self) -> None:
        """End the lease now: the guard kills its process group.  Closes the lease."""
        self._send(RELEASE)
        self.close()          # end of file ends the guard even if the release line did not fit

    def close(self) -> None:
        """Close both ends (idempotent).  A guard still reading sees end of file and kills its group."""
        self.child_started()
        if self._write >= 0:
            os.close(self._write)
            self._write = -1

    def _send(self, message: bytes) -> bool:
        if self._write < 0:
            self.dropped += 1
            return False
        try:
            os.write(self._write, message)
        except (BlockingIOError, BrokenPipeError):
            self.dropped += 1
            return False
        return True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
