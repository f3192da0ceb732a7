"""metrics.aggregate: the workers' registries, snapshotted and sent as JSON, merge into
the totals one process would have counted; removed routes and upstreams are pruned from
retired workers; a scrape gets Prometheus text or OpenMetrics.

Every snapshot here crosses JSON first, as it does on the parent's channel."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_prometheus
from prometheus_client.registry import Collector

from metrics import aggregate
from metrics.aggregate import Snapshot, counters_only, exposition, merge, prune, snapshot
from metrics.gateway import GATEWAY_REGISTRY
from metrics.local import LocalCounter, LocalHistogram

BUCKETS = (0.01, 0.1, 1.0)
Values = dict[tuple[str, frozenset[tuple[str, str]]], float]


def take(registry: CollectorRegistry) -> Snapshot:
    """A snapshot as the parent receives it: through JSON."""
    result: Snapshot = json.loads(json.dumps(snapshot(registry)))
    return result


def values(metrics: Iterable[Metric]) -> Values:
    """Every sample by (sample name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for metric in metrics
        for sample in metric.samples
    }


def value(metrics: Iterable[Metric], name: str, **labels: str) -> float:
    return values(metrics)[(name, frozenset(labels.items()))]


def sample_names(metrics: Iterable[Metric]) -> set[str]:
    return {sample.name for metric in metrics for sample in metric.samples}


def worker(requests: dict[str, int], durations: Sequence[float]) -> CollectorRegistry:
    """One worker's registry: prometheus-client's own counter and histogram, and the
    lock-free local ones, counting the same events."""
    registry = CollectorRegistry()
    theirs = Counter("t_requests", "requests", ["route"], registry=registry)
    ours = LocalCounter("t_local_requests", "requests", ["route"], registry)
    seconds = Histogram("t_seconds", "duration", ["route"], buckets=BUCKETS, registry=registry)
    local_seconds = LocalHistogram("t_local_seconds", "duration", ["route"], BUCKETS, registry)
    for route, count in requests.items():
        theirs.labels(route).inc(count)
        ours.labels(route).inc(count)
    for duration in durations:
        seconds.labels("a").observe(duration)
        local_seconds.labels("a").observe(duration)
    return registry


class _Fixed(Collector):
    def __init__(self, *metrics: Metric) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self._metrics)


def registry_of(*metrics: Metric) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(*metrics))
    return registry


# --- merge ----------------------------------------------------------------------------


def test_merge_sums_counters_of_both_counter_kinds() -> None:
    snapshots = [
        take(worker({"a": 3, "b": 1}, [])),
        take(worker({"a": 4}, [])),
        take(worker({"a": 5, "b": 2}, [])),
    ]
    merged = merge(snapshots)
    for name in ("t_requests_total", "t_local_requests_total"):
        assert value(merged, name, route="a") == 12
        assert value(merged, name, route="b") == 3


def test_merged_histograms_equal_one_process_observing_everything() -> None:
    parts = [[0.005, 0.5, 3.0], [0.05], [0.2, 0.2, 0.009, 7.5]]
    merged = merge(take(worker({}, part)) for part in parts)
    alone = merge([take(worker({}, [d for part in parts for d in part]))])

    for family in ("t_seconds", "t_local_seconds"):
        got = {k: v for k, v in values(merged).items() if k[0].startswith(family + "_")}
        expected = {k: v for k, v in values(alone).items() if k[0].startswith(family + "_")}
        assert got.keys() == expected.keys()
        assert got == pytest.approx(expected)
        assert value(merged, family + "_bucket", route="a", le="0.01") == 2
        assert value(merged, family + "_bucket", route="a", le="1.0") == 6
        assert value(merged, family + "_bucket", route="a", le="+Inf") == 8
        assert value(merged, family + "_count", route="a") == 8
        assert value(merged, family + "_sum", route="a") == pytest.approx(11.464)


def test_merge_keeps_the_family_type_help_and_order_first_seen() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    Counter("t_first", "the first", registry=first).inc()
    Gauge("t_second", "the second", registry=second).set(2)
    Counter("t_first", "the first", registry=second).inc(2)

    merged = merge([take(first), take(second)])

    assert [(m.name, m.type, m.documentation) for m in merged] == [
        ("t_first", "counter", "the first"),
        ("t_second", "gauge", "the second"),
    ]
    assert value(merged, "t_first_total") == 3


def test_gauges_are_summed_by_default() -> None:
    registries = [CollectorRegistry() for _ in range(3)]
    for open_now, registry in zip((3, 0, 4), registries, strict=True):
        Gauge("t_open_connections", "open", ["listener"], registry=registry).labels("l").set(
            open_now
        )
    assert value(merge(take(r) for r in registries), "t_open_connections", listener="l") == 7


@pytest.mark.parametrize(
    ("name", "seen", "expected"),
    [
        ("gatehouse_upstream_healthy", (1, 0, 1), 0),
        ("gatehouse_upstream_healthy", (1, 1, 1), 1),
        (
            "gatehouse_config_last_reload_success_timestamp_seconds",
            (1700.0, 1900.5, 1800.0),
            1900.5,
        ),
    ],
)
def test_gauges_named_in_gauge_merge_combine_by_their_mode(
    name: str, seen: tuple[float, ...], expected: float
) -> None:
    registries = [CollectorRegistry() for _ in seen]
    for reading, registry in zip(seen, registries, strict=True):
        Gauge(name, "doc", registry=registry).set(reading)
    assert value(merge(take(r) for r in registries), name) == expected


def test_gauge_merge_mode_applies_to_gauges_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(aggregate.GAUGE_MERGE, "t_peak", "max")
    monkeypatch.setitem(aggregate.GAUGE_MERGE, "t_events", "min")
    registries = [CollectorRegistry(), CollectorRegistry()]
    for reading, registry in zip((5, 9), registries, strict=True):
        Gauge("t_peak", "doc", registry=registry).set(reading)
        Counter("t_events", "doc", registry=registry).inc(reading)
    merged = merge(take(r) for r in registries)
    assert value(merged, "t_peak") == 9
    assert value(merged, "t_events_total") == 14  # a counter always adds up


def test_label_sets_seen_in_one_snapshot_only_are_kept_as_they_are() -> None:
    first = take(worker({"a": 1}, [0.5]))
    second = CollectorRegistry()
    LocalCounter("t_local_requests", "requests", ["route"], second).labels("z").inc(4)
    LocalHistogram("t_local_seconds", "duration", ["route"], BUCKETS, second).labels("z").observe(
        0.05
    )

    merged = merge([first, take(second)])

    assert value(merged, "t_local_requests_total", route="a") == 1
    assert value(merged, "t_local_requests_total", route="z") == 4
    assert value(merged, "t_local_seconds_count", route="a") == 1
    assert value(merged, "t_local_seconds_bucket", route="z", le="0.1") == 1
    assert value(merged, "t_local_seconds_bucket", route="z", le="0.01") == 0
    # prometheus-client's families exist in the first snapshot only
    assert value(merged, "t_requests_total", route="a") == 1


def test_created_samples_are_dropped_from_snapshots() -> None:
    registry = registry_of(
        _counter_with_created("t_hits", 2.0, created=1700000000.0),
    )
    assert any(s.name == "t_hits_created" for m in registry.collect() for s in m.samples)

    families = take(registry)
    merged = merge([families, families])

    assert [sample[0] for sample in families[0]["samples"]] == ["t_hits_total"]
    assert sample_names(merged) == {"t_hits_total"}
    assert value(merged, "t_hits_total", route="a") == 4
    body, _ = exposition(merged, "application/openmetrics-text; version=1.0.0")
    assert b"_created" not in body


def _counter_with_created(name: str, count: float, created: float) -> Metric:
    family = CounterMetricFamily(name, "doc", labels=["route"])
    family.add_metric(["a"], count, created=created)
    return family


def test_the_same_labels_in_another_order_are_the_same_series() -> None:
    def family(labels: dict[str, str], count: float) -> Snapshot:
        return [
            {
                "name": "t_hits",
                "type": "counter",
                "help": "doc",
                "unit": "",
                "samples": [["t_hits_total", labels, count]],
            }
        ]

    merged = merge(
        [family({"route": "a", "code": "200"}, 2), family({"code": "200", "route": "a"}, 3)]
    )
    assert len(merged[0].samples) == 1
    assert value(merged, "t_hits_total", route="a", code="200") == 5


def test_merge_of_nothing_is_empty() -> None:
    assert merge([]) == []


# --- prune and counters_only ----------------------------------------------------------


def _retired() -> Snapshot:
    registry = CollectorRegistry()
    requests = LocalCounter("t_requests", "doc", ["route", "code"], registry)
    for route in ("kept", "removed", ""):
        requests.labels(route, "200").inc()
    upstream = LocalCounter("t_upstream_requests", "doc", ["upstream", "endpoint"], registry)
    upstream.labels("users", "http://10.0.0.1:80").inc(2)
    upstream.labels("gone", "http://10.0.0.2:80").inc(3)
    LocalCounter("t_local_replies", "doc", ["reason"], registry).labels("no_route").inc(5)
    return take(registry)


def test_prune_drops_series_of_removed_routes_and_upstreams() -> None:
    pruned = prune(_retired(), routes={"kept", "other"}, upstreams={"users"})
    merged = values(merge([pruned]))

    assert set(merged) == {
        ("t_requests_total", frozenset({("route", "kept"), ("code", "200")})),
        ("t_requests_total", frozenset({("route", ""), ("code", "200")})),
        (
            "t_upstream_requests_total",
            frozenset({("upstream", "users"), ("endpoint", "http://10.0.0.1:80")}),
        ),
        ("t_local_replies_total", frozenset({("reason", "no_route")})),
    }


def test_prune_keeps_every_family_and_leaves_its_input_alone() -> None:
    retired = _retired()
    before = json.dumps(retired)
    pruned = prune(retired, routes=(), upstreams=())
    assert [f["name"] for f in pruned] == [f["name"] for f in retired]
    assert [len(f["samples"]) for f in pruned] == [1, 0, 1]  # route "", none, no label
    assert json.dumps(retired) == before


def test_pruned_family_without_samples_still_exposes_and_parses() -> None:
    pruned = prune(_retired(), routes=(), upstreams=())
    body, _ = exposition(merge([pruned]), None)
    families = {f.name: f for f in parse_prometheus(body.decode())}
    assert families["t_upstream_requests"].samples == []
    assert [s.value for s in families["t_requests"].samples] == [1.0]


def test_counters_only_keeps_counters_and_histograms() -> None:
    registry = worker({"a": 2}, [0.5])
    Gauge("t_open", "doc", registry=registry).set(3)
    Gauge("gatehouse_upstream_healthy", "doc", registry=registry).set(1)

    kept = counters_only(take(registry))

    assert sorted((f["name"], f["type"]) for f in kept) == [
        ("t_local_requests", "counter"),
        ("t_local_seconds", "histogram"),
        ("t_requests", "counter"),
        ("t_seconds", "histogram"),
    ]


# --- exposition -----------------------------------------------------------------------


def _scrape_fixture() -> list[Metric]:
    first = worker({"a": 3}, [0.005, 2.0])
    second = worker({"a": 1, "b": 6}, [0.5])
    Gauge("gatehouse_upstream_healthy", "doc", ["endpoint"], registry=first).labels("e").set(1)
    Gauge("gatehouse_upstream_healthy", "doc", ["endpoint"], registry=second).labels("e").set(0)
    # A label set only the second worker has, between two the first worker has.
    LocalHistogram("t_local_seconds_b", "doc", ["route"], BUCKETS, first).labels("a").observe(1)
    later = LocalHistogram("t_local_seconds_b", "doc", ["route"], BUCKETS, second)
    for route in ("b", "a"):
        later.labels(route).observe(0.05)
    return merge([take(first), take(second)])


def _totals(families: Iterable[Metric]) -> Values:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in families
        for sample in family.samples
    }


EXPECTED_TOTALS = {
    ("t_requests_total", frozenset({("route", "a")})): 4.0,
    ("t_requests_total", frozenset({("route", "b")})): 6.0,
    ("t_local_requests_total", frozenset({("route", "b")})): 6.0,
    ("t_seconds_count", frozenset({("route", "a")})): 3.0,
    ("t_local_seconds_bucket", frozenset({("route", "a"), ("le", "0.01")})): 1.0,
    ("t_local_seconds_bucket", frozenset({("route", "a"), ("le", "1.0")})): 2.0,
    ("gatehouse_upstream_healthy", frozenset({("endpoint", "e")})): 0.0,
    ("t_local_seconds_b_count", frozenset({("route", "a")})): 2.0,
    ("t_local_seconds_b_count", frozenset({("route", "b")})): 1.0,
}


def test_exposition_defaults_to_prometheus_text_that_parses_back() -> None:
    body, content_type = exposition(_scrape_fixture(), None)

    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert b"# EOF" not in body
    totals = _totals(parse_prometheus(body.decode()))
    assert totals.items() >= EXPECTED_TOTALS.items()
    assert totals[("t_seconds_sum", frozenset({("route", "a")}))] == pytest.approx(2.505)


@pytest.mark.parametrize(
    "accept",
    [
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        "application/openmetrics-text",
        # what Prometheus sends
        "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
        "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    ],
)
def test_exposition_gives_openmetrics_when_accept_asks(accept: str) -> None:
    body, content_type = exposition(_scrape_fixture(), accept)

    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")
    totals = _totals(parse_openmetrics(body.decode()))  # type: ignore[no-untyped-call]
    assert totals.items() >= EXPECTED_TOTALS.items()


@pytest.mark.parametrize("accept", [None, "", "text/html", "*/*", "text/plain"])
def test_exposition_gives_prometheus_text_for_other_accepts(accept: str | None) -> None:
    body, content_type = exposition(_scrape_fixture(), accept)
    assert content_type.startswith("text/plain")
    assert not body.endswith(b"# EOF\n")
    assert _totals(parse_prometheus(body.decode())).items() >= EXPECTED_TOTALS.items()


def test_the_parents_own_families_merge_with_the_workers() -> None:
    merged = merge([take(GATEWAY_REGISTRY), take(worker({"a": 1}, [])), take(worker({"a": 2}, []))])

    body, _ = exposition(merged, "application/openmetrics-text")
    families = {f.name: f for f in parse_openmetrics(body.decode())}  # type: ignore[no-untyped-call]
    (build,) = families["gatehouse_build_info"].samples
    assert build.value == 1
    assert set(build.labels) == {"version", "python", "build"}
    reloads = families["gatehouse_config_reloads"]
    assert reloads.type == "counter"
    assert {s.labels["result"] for s in reloads.samples} == {"success", "failure"}
    assert families["gatehouse_workers"].type == "gauge"
    assert value(merged, "t_requests_total", route="a") == 3


# --- property: splitting the counting over workers changes nothing ---------------------

_observations = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=3),  # the worker that saw it
        st.sampled_from(["a", "b", ""]),  # route
        st.integers(min_value=1, max_value=5),  # counter increment
        st.sampled_from([0.0, 0.005, 0.01, 0.05, 0.1, 0.7, 1.0, 4.0]),  # duration
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(_observations)
def test_merge_of_split_counts_equals_counting_in_one_process(
    observations: list[tuple[int, str, int, float]],
) -> None:
    workers = [CollectorRegistry() for _ in range(4)]
    alone = CollectorRegistry()

    def families(registry: CollectorRegistry) -> tuple[LocalCounter, LocalHistogram, Counter]:
        return (
            LocalCounter("p_requests", "doc", ["route"], registry),
            LocalHistogram("p_seconds", "doc", ["route"], BUCKETS, registry),
            Counter("p_bytes", "doc", ["route"], registry=registry),
        )

    per_worker = [families(registry) for registry in workers]
    everything = families(alone)
    for index, route, amount, duration in observations:
        for counter, histogram, bytes_ in (per_worker[index], everything):
            counter.labels(route).inc(amount)
            histogram.labels(route).observe(duration)
            bytes_.labels(route).inc(amount * 100)

    merged = values(merge(take(registry) for registry in workers))
    expected = values(merge([take(alone)]))
    assert merged.keys() == expected.keys()
    assert merged == pytest.approx(expected)
    for (name, _), total in merged.items():
        if not name.endswith("_sum"):  # counts are whole numbers: exact
            assert total == expected[(name, _)]
