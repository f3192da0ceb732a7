"""One view of the whole gateway from the metrics of each process.

Every worker counts in its own memory (no lock, no shared page on the hot path). When the
admin listener is scraped, the parent asks each worker for a `snapshot` of its registry
and `merge`s them: counters, histogram buckets, sums and counts, and gauges that count
things (connections, tunnels, pooled connections) add up across workers; the few gauges
for which a sum would mislead say so in `GAUGE_MERGE`. A snapshot is plain JSON-able
data, so it crosses the parent's channel to the worker as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

Snapshot = list[dict[str, Any]]

# Gauges that do not add up across workers, and how they combine instead. A timestamp
# is the latest any worker saw; an endpoint is healthy only if every worker sees it so.
GAUGE_MERGE: dict[str, str] = {
    "gatehouse_upstream_healthy": "min",
    "gatehouse_config_last_reload_success_timestamp_seconds": "max",
}
_COMBINE: dict[str, Callable[[float, float], float]] = {
    "sum": lambda a, b: a + b,
    "min": min,
    "max": max,
}


def snapshot(registry: CollectorRegistry) -> Snapshot:
    """Every family in `registry`, as JSON-able data."""
    return [
        {
            "name": metric.name,
            "type": metric.type,
            "help": metric.documentation,
            "unit": metric.unit,
            # `_created` timestamps cannot be added up; a merged counter has none.
            "samples": [
                [sample.name, sample.labels, sample.value]
                for sample in metric.samples
                if not sample.name.endswith("_created")
            ],
        }
        for metric in registry.collect()
    ]


def merge(snapshots: Iterable[Snapshot]) -> list[Metric]:
    """The families of all `snapshots` combined sample by sample (same name and labels),
    in the order they were first seen."""
    metrics: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for families in snapshots:
        for family in families:
            name = family["name"]
            metric = metrics.get(name)
            if metric is None:
                metric = metrics[name] = Metric(
                    name, family["help"], family["type"], family["unit"]
                )
                values[name] = {}
            mode = GAUGE_MERGE.get(name, "sum") if family["type"] == "gauge" else "sum"
            combine = _COMBINE[mode]
            merged = values[name]
            for sample_name, labels, value in family["samples"]:
                key = (sample_name, tuple(sorted(labels.items())))
                merged[key] = combine(merged[key], value) if key in merged else value
    for name, metric in metrics.items():
        for (sample_name, labels), value in values[name].items():
            metric.add_sample(sample_name, dict(labels), value)
    return list(metrics.values())


def prune(families: Snapshot, routes: Collection[str], upstreams: Collection[str]) -> Snapshot:
    """`families` without the series of routes and upstreams that no longer exist (a
    route label of "" is the no-route series and stays)."""
    pruned = []
    for family in families:
        samples = [
            sample
            for sample in family["samples"]
            if sample[1].get("route", "") in routes or not sample[1].get("route")
            if "upstream" not in sample[1] or sample[1]["upstream"] in upstreams
        ]
        pruned.append({**family, "samples": samples})
    return pruned


def counters_only(families: Snapshot) -> Snapshot:
    """What a worker that is gone still contributes: what it counted (counters and
    histograms); its gauges described a present that ended with it."""
    return [family for family in families if family["type"] in ("counter", "histogram")]


class _Fixed(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self._metrics)


def exposition(metrics: list[Metric], accept: str | None) -> tuple[bytes, str]:
    """The body and content type for a scrape: OpenMetrics when the scraper's Accept
    header asks for it, the Prometheus text format otherwise."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(metrics))
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
