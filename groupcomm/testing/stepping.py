"""Virtual time for a service's simulation harness: steps of the simulator with the harness's timers between.

A harness (the supervisor's and the provisioning service's ``sim`` modules)
subclasses :class:`SteppedHarness`, keeps ``sim`` (a
:class:`~groupcomm.testing.SimCluster`), ``step`` (seconds between two looks)
and ``_timers`` (a heap whose entries start with their deadline in
microseconds), and implements ``_after_step()`` (fire due timers, carry out
deferred actions).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["SteppedHarness"]

_US = 1_000_000


class SteppedHarness:
    """:meth:`run` and :meth:`run_until` for a harness (see the module docstring)."""

    sim: Any
    step: float
    _timers: list

    def _after_step(self) -> None:
        raise NotImplementedError

    def run(self, seconds: float) -> None:
        """Advance virtual time by ``seconds`` (stopping at every timer's deadline)."""
        end = self.sim.now_us + round(seconds * _US)
        step = max(1, round(self.step * _US))
        while self.sim.now_us < end:
            until = min(end, self.sim.now_us + step)
            if self._timers:
                until = min(until, max(self._timers[0][0], self.sim.now_us + 1))
            self.sim.run((until - self.sim.now_us) / _US)
            self._after_step()

    def run_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Run until ``predicate()`` holds (checked every ``step``); False after ``timeout`` seconds."""
        end = self.sim.now_us + round(timeout * _US)
        step = max(1, round(self.step * _US))
        while self.sim.now_us < end:
            if predicate():
                return True
            self.run(min(step, end - self.sim.now_us) / _US)
        return predicate()
