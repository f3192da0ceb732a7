"""Reading the worker registry in tests: single samples, the change a test caused, and
the text a scrape would return."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from metrics.definitions import REGISTRY


def _matching(name: str, labels: dict[str, str]) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples called `name` whose labels include `labels`, by their whole label set."""
    found = {}
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def metric(name: str, **labels: str) -> float:
    """The sum of the samples of the process-wide registry called `name` whose labels
    include `labels` (0 when there is none): `metric("gatehouse_requests_total",
    route="api")` counts every method, code and protocol."""
    return sum(_matching(name, labels).values())


def series(name: str) -> list[dict[str, str]]:
    """The label sets of every sample called `name`, parsed from the exposition text
    (what a scrape sees, not the registry's objects)."""
    text = generate_latest(REGISTRY).decode()
    return [
        dict(sample.labels)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


class Counts:
    """Samples read now, to compare with later: `counts.delta(name, **labels)`."""

    def __init__(self) -> None:
        self._before: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in REGISTRY.collect():
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                self._before[key] = sample.value

    def delta(self, name: str, **labels: str) -> float:
        """How much the samples called `name` whose labels include `labels` moved, in
        sum, since this snapshot."""
        return sum(
            value - self._before.get((name, key), 0.0)
            for key, value in _matching(name, labels).items()
        )


async def eventually(what: str, predicate: Callable[[], bool], within_s: float = 10.0) -> None:
    """Poll `predicate` (gauges the gateway updates with no event to wait on); `within_s`
    bounds a hang, not how fast a busy machine gets there."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not predicate():
        if loop.time() >= deadline:
            raise AssertionError(f"not within {within_s}s: {what}")
        await asyncio.sleep(0.01)
