"""Counters and histograms for what happens on every request, at a fraction of the cost.

prometheus-client's metrics take a lock on every `inc` and `observe` (about a
microsecond each, several per request once middleware count and time themselves). A
worker runs one event loop, so the hot path needs no lock: these keep plain Python
numbers and lists, and a collector registered on the registry turns them into the same
Prometheus families when scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from metrics.children import LocalCounterChild, LocalHistogramChild

Child = TypeVar("Child")


class _LocalFamily(Collector, Generic[Child]):
    """What both families share: children by label values, and forgetting some."""

    name: str
    labelnames: tuple[str, ...]
    _children: dict[tuple[str, ...], Child]

    def children(self) -> list[tuple[tuple[str, ...], Child]]:
        """A copy of (label values, child) pairs: safe to iterate while the loop counts."""
        return list(self._children.items())

    def forget(self, label: str, keep: Callable[[str], bool]) -> int:
        """Drop every child whose `label` value `keep` refuses; the number dropped. A
        caller holding a dropped child counts into nothing from then on (see
        `metrics.traffic.forget_series`)."""
        if label not in self.labelnames:
            return 0
        index = self.labelnames.index(label)
        return self.forget_where(lambda values: keep(values[index]))

    def forget_where(self, keep: Callable[[tuple[str, ...]], bool]) -> int:
        """Drop every child whose label values (in `labelnames` order) `keep` refuses."""
        gone = [values for values in self._children if not keep(values)]
        for values in gone:
            del self._children[values]
        return len(gone)


class LocalCounter(_LocalFamily["LocalCounterChild"]):
    """A counter family; `labels(...)` gives a child whose `inc` is one addition."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children = {}
        registry.register(self)

    def labels(self, *values: str) -> LocalCounterChild:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = LocalCounterChild()
        return child

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in self.children():
            family.add_metric(list(values), child.value)
        yield family

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)


class LocalHistogram(_LocalFamily["LocalHistogramChild"]):
    """A histogram family; a child's `observe` is a bisect and two additions."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.buckets = tuple(sorted(buckets))
        self._children = {}
        registry.register(self)

    def labels(self, *values: str) -> LocalHistogramChild:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = LocalHistogramChild(self.buckets)
        return child

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        bounds = [*(repr(float(b)) for b in self.buckets), "+Inf"]
        for values, child in self.children():
            cumulative, running = [], 0
            for bound, count in zip(bounds, child.counts, strict=True):
                running += count
                cumulative.append((bound, running))
            family.add_metric(list(values), cumulative, child.sum)
        yield family

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
