"""The children of metrics/local.py's families: what the request path touches, one
addition (a counter) or a bisect and two (a histogram), with no lock.

A module of their own so that the compiled build compiles them (their families derive
from prometheus-client's Collector, which a compiled class must not: docs/architecture.md,
"Compiled build").
"""

from __future__ import annotations

from bisect import bisect_left


class LocalCounterChild:
    """One label set of a LocalCounter."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class LocalHistogramChild:
    """One label set of a LocalHistogram: counts per bucket (the last is +Inf), and sum."""

    __slots__ = ("buckets", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value
