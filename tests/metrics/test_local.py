"""The lock-free local counter and histogram export exactly what prometheus-client's own
would (same families, cumulative buckets, +Inf, sum and count)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from metrics.local import LocalCounter, LocalHistogram

BUCKETS = (0.001, 0.01, 0.1)


def test_histogram_exposition_matches_prometheus_clients() -> None:
    ours_registry, theirs_registry = CollectorRegistry(), CollectorRegistry()
    ours = LocalHistogram("t_seconds", "doc", ["mw"], BUCKETS, ours_registry)
    theirs = Histogram("t_seconds", "doc", ["mw"], buckets=BUCKETS, registry=theirs_registry)
    for value in (0.0005, 0.001, 0.005, 0.05, 0.5, 2.0):
        ours.labels("a").observe(value)
        theirs.labels("a").observe(value)
    ours.labels("b").observe(0.02)
    theirs.labels("b").observe(0.02)
    exported = generate_latest(ours_registry).decode()
    expected = generate_latest(theirs_registry).decode()
    # prometheus-client adds a _created sample of its own; everything else is the same
    assert exported.splitlines() == [
        line for line in expected.splitlines() if "_created" not in line
    ]


def test_counter_children_add_up() -> None:
    registry = CollectorRegistry()
    counter = LocalCounter("t_decisions", "doc", ["mw", "result"], registry)
    counter.labels("rl", "allowed").inc()
    counter.labels("rl", "allowed").inc(2)
    counter.labels("rl", "limited").inc()
    assert registry.get_sample_value("t_decisions_total", {"mw": "rl", "result": "allowed"}) == 3
    assert registry.get_sample_value("t_decisions_total", {"mw": "rl", "result": "limited"}) == 1
