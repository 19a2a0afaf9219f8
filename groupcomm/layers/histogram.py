"""Latency histograms with fixed buckets, sans-IO: what :mod:`groupcomm.io.metrics` exports.

A :class:`Histogram` counts observations (seconds) into buckets with fixed
upper bounds, as Prometheus histograms do: an observation ``v`` lands in the
first bucket whose bound is ``>= v`` (``le``), or in the implicit ``+Inf``
bucket.  Observing is a binary search and an increment, and the memory is one
counter per bucket whatever the number of observations.

:data:`LATENCY_BUCKETS` suits this library's latencies: a delivery or a request
on loopback takes tens to hundreds of microseconds, on a LAN a few
milliseconds, and a view change or a request's timeout seconds.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable

__all__ = ["LATENCY_BUCKETS", "Histogram"]

LATENCY_BUCKETS: tuple[float, ...] = (
    20e-6, 50e-6, 100e-6, 200e-6, 300e-6, 500e-6,
    1e-3, 2e-3, 5e-3, 10e-3, 20e-3, 50e-3, 100e-3, 200e-3, 500e-3,
    1.0, 2.0, 5.0,
)
"""Upper bounds in seconds (1-2-5 steps from 20 µs to 5 s, and 300 µs: the self-delivery p99 goal)."""


class Histogram:
    """Counts of observations per bucket, their sum and their number.

    ``bounds`` are the buckets' upper bounds (finite, strictly increasing); a
    last ``+Inf`` bucket holds what is above them.
    """

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Iterable[float] = LATENCY_BUCKETS) -> None:
        self.bounds: tuple[float, ...] = tuple(float(b) for b in bounds)
        if not self.bounds or not all(math.isfinite(b) for b in self.bounds) or any(
                a >= b for a, b in zip(self.bounds, self.bounds[1:])):
            raise ValueError(f"histogram bounds must be finite and strictly increasing, not {self.bounds!r}")
        self.counts = [0] * (len(self.bounds) + 1)          # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Count one observation of ``value`` (seconds)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= it)`` per bucket, the last bound ``math.inf`` (Prometheus ``le``)."""
        out, total = [], 0
        for bound, n in zip((*self.bounds, math.inf), self.counts):
            total += n
            out.append((bound, total))
        return out

    def __repr__(self) -> str:
        return f"Histogram(count={self.count}, sum={self.sum:.6g})"
