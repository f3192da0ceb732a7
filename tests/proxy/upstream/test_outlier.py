"""Outlier ejection (passive health) and panic mode, on a fake clock (no sockets: pools
are only built, outcomes are reported as forward.py reports them)."""

from __future__ import annotations

import logging
from collections import Counter

import pytest

from metrics.traffic import UPSTREAM_EJECTIONS, UPSTREAM_PANIC, forget_series
from proxy.config.upstream_model import EndpointConfig, OutlierConfig, UpstreamConfig
from proxy.core.errors import (
    BadRequest,
    PoolTimeout,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)
from proxy.upstream.balancer import EndpointState, Upstream
from proxy.upstream.h1 import StaleConnection
from proxy.upstream.h2.stream import StreamRefused
from proxy.upstream.outlier import is_endpoint_failure

REFUSED = UpstreamConnectError("connect to 10.0.0.1:80 failed: Connection refused")


class Clock:
    """A settable clock for `Upstream(now=...)`."""

    def __init__(self) -> None:
        self.time = 1000.0

    def __call__(self) -> float:
        return self.time


def _upstream(
    count: int,
    clock: Clock,
    name: str = "app",
    outlier: OutlierConfig | None = None,
    base: int = 10,
) -> Upstream:
    endpoints = tuple(
        EndpointConfig(f"http://10.0.{base}.{i}:80", "http", f"10.0.{base}.{i}", 80, 1)
        for i in range(1, count + 1)
    )
    if outlier is None:
        outlier = OutlierConfig(consecutive_failures=3, base_ejection=10.0, max_ejection=35.0)
    config = UpstreamConfig(name, endpoints, outlier=outlier)
    return Upstream(config, "httptools", 32 * 1024, now=clock)


def _fail(upstream: Upstream, state: EndpointState, times: int) -> None:
    for _ in range(times):
        upstream.report(state, None, REFUSED)


def _chosen(upstream: Upstream, count: int) -> Counter[int]:
    return Counter(upstream.choose().index for _ in range(count))


async def test_consecutive_connect_failures_eject_the_endpoint_and_others_take_traffic() -> None:
    clock = Clock()
    upstream = _upstream(3, clock)
    first = upstream.endpoints[0]
    _fail(upstream, first, 2)
    assert first.eligible(clock())
    _fail(upstream, first, 1)
    assert not first.eligible(clock())
    assert first.ejected_until == clock() + 10.0
    assert not upstream.all_eligible
    assert _chosen(upstream, 100) == {1: 50, 2: 50}
    assert upstream.endpoint_health()[0] == ("10.0.10.1:80", False)


async def test_ejected_endpoint_returns_when_its_time_is_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    upstream = _upstream(2, clock)
    first = upstream.endpoints[0]
    _fail(upstream, first, 3)
    clock.time += 9.9
    upstream.expire(clock())
    assert upstream.all_eligible is False
    assert _chosen(upstream, 10) == {1: 10}
    clock.time += 0.1
    # Eligible as soon as the time passes, before the sweeper says so...
    assert _chosen(upstream, 10) == {0: 5, 1: 5}
    with caplog.at_level(logging.INFO, logger="proxy.upstream.outlier"):
        upstream.expire(clock())
    # ...and the sweeper restores the fast path and logs the return.
    assert [upstream.all_eligible] == [True]
    assert "upstream app endpoint 10.0.10.1:80 back from ejection" in caplog.text


async def test_a_response_resets_the_failure_streak() -> None:
    clock = Clock()
    upstream = _upstream(2, clock)
    first = upstream.endpoints[0]
    _fail(upstream, first, 2)
    upstream.report(first, 200, None)
    assert first.failures == 0
    _fail(upstream, first, 2)
    assert first.eligible(clock())
    upstream.report(first, 503, None)  # reachable: a 5xx also ends a failure streak
    _fail(upstream, first, 2)
    assert first.eligible(clock())
    _fail(upstream, first, 1)
    assert not first.eligible(clock())


@pytest.mark.parametrize(
    "error",
    [
        UpstreamConnectError("refused"),
        UpstreamConnectTimeout("slow"),
        UpstreamReset("reset"),
        UpstreamTimeout("silent"),
        UpstreamProtocolError("garbage"),
    ],
)
async def test_every_endpoint_failure_counts(error: Exception) -> None:
    clock = Clock()
    upstream = _upstream(2, clock)
    first = upstream.endpoints[0]
    for _ in range(3):
        upstream.report(first, None, error)
    assert not first.eligible(clock())


@pytest.mark.parametrize(
    "error",
    [
        PoolTimeout("no free connection"),
        BadRequest("client"),
        StaleConnection("keep-alive race"),
        StreamRefused("refused stream", None),
        ValueError("not even a ProxyError"),
    ],
)
async def test_errors_that_are_not_the_endpoints_fault_neither_count_nor_reset(
    error: Exception,
) -> None:
    clock = Clock()
    upstream = _upstream(2, clock)
    first = upstream.endpoints[0]
    assert not is_endpoint_failure(error)
    _fail(upstream, first, 2)
    for _ in range(5):
        upstream.report(first, None, error)
    assert first.failures == 2
    assert first.eligible(clock())
    _fail(upstream, first, 1)
    assert not first.eligible(clock())


async def test_ejection_time_grows_with_each_ejection_up_to_max_ejection() -> None:
    clock = Clock()
    upstream = _upstream(2, clock)  # base 10 s, max 35 s
    first = upstream.endpoints[0]
    durations = []
    for _ in range(5):
        _fail(upstream, first, 3)
        durations.append(first.ejected_until - clock())
        clock.time = first.ejected_until  # back, and failing again at once
        upstream.expire(clock())
    assert durations == [10.0, 20.0, 30.0, 35.0, 35.0]
    assert first.ejections == 5


async def test_ejection_multiplier_decays_while_the_endpoint_stays_in_rotation() -> None:
    clock = Clock()
    upstream = _upstream(2, clock)
    first = upstream.endpoints[0]
    for _ in range(3):
        _fail(upstream, first, 3)
        clock.time = first.ejected_until
    assert first.ejections == 3
    clock.time += 20.0  # two base_ejection periods in rotation: two steps down
    _fail(upstream, first, 3)
    assert first.ejections == 2
    assert first.ejected_until - clock() == 20.0


async def test_at_most_max_ejection_percent_of_endpoints_are_ejected() -> None:
    clock = Clock()
    upstream = _upstream(5, clock)  # 50% of 5: at most 2 (floor)
    for state in upstream.endpoints:
        _fail(upstream, state, 3)
    assert [e.eligible(clock()) for e in upstream.endpoints] == [False, False, True, True, True]
    # The third keeps its streak: ejected at its next failure once an ejection ends.
    third = upstream.endpoints[2]
    assert third.failures == 3
    clock.time += 10.0
    _fail(upstream, third, 1)
    assert not third.eligible(clock())
    assert third.failures == 0
    assert sum(not e.eligible(clock()) for e in upstream.endpoints) == 1  # the first two back


async def test_a_single_endpoint_is_never_ejected_at_the_default_percent() -> None:
    clock = Clock()
    upstream = _upstream(1, clock, outlier=OutlierConfig(consecutive_failures=1))
    only = upstream.endpoints[0]
    _fail(upstream, only, 10)
    assert only.eligible(clock())
    assert upstream.all_eligible
    assert repr(upstream.outlier) == "<OutlierDetector app ejected=0/0>"


async def test_all_ejected_at_100_percent_gives_panic_mode_which_tries_every_endpoint(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    outlier = OutlierConfig(consecutive_failures=1, base_ejection=5.0, max_ejection_percent=100)
    upstream = _upstream(3, clock, name="panicky", outlier=outlier)
    with caplog.at_level(logging.INFO):
        for state in upstream.endpoints:
            _fail(upstream, state, 1)
    assert not any(e.eligible(clock()) for e in upstream.endpoints)
    assert upstream.panic
    assert "upstream panicky: no endpoint in rotation, panic mode" in caplog.text
    assert _chosen(upstream, 30) == {0: 10, 1: 10, 2: 10}
    assert UPSTREAM_PANIC.labels("panicky").value == 30.0
    # Outcomes while ejected (panic traffic) neither extend nor repeat the ejection.
    before = upstream.endpoints[0].ejected_until
    _fail(upstream, upstream.endpoints[0], 5)
    assert upstream.endpoints[0].ejected_until == before
    assert upstream.endpoints[0].ejections == 1
    clock.time += 5.0
    with caplog.at_level(logging.INFO):
        upstream.expire(clock())
    assert [upstream.panic] == [False]
    assert "upstream panicky: out of panic mode, 3 endpoints in rotation" in caplog.text
    assert _chosen(upstream, 3) == {0: 1, 1: 1, 2: 1}
    assert UPSTREAM_PANIC.labels("panicky").value == 30.0  # not counted outside panic


async def test_ejection_plus_active_health_can_leave_none_and_panic_tries_all() -> None:
    clock = Clock()
    upstream = _upstream(2, clock, name="mixed")
    first, second = upstream.endpoints
    second.healthy = False  # the active check took it out
    upstream.refresh_eligibility()
    _fail(upstream, first, 3)  # 1 of 2 ejected: within 50%
    assert upstream.panic
    assert _chosen(upstream, 4) == {0: 2, 1: 2}
    assert upstream.candidates(exclude={0}) == [second]  # a retry still goes elsewhere


async def test_5xx_never_eject_unless_consecutive_5xx_is_set() -> None:
    clock = Clock()
    upstream = _upstream(2, clock)
    first = upstream.endpoints[0]
    for _ in range(20):
        upstream.report(first, 503, None)
    assert first.eligible(clock())

    outlier = OutlierConfig(consecutive_5xx=3, base_ejection=1.0)
    upstream = _upstream(2, clock, outlier=outlier)
    first = upstream.endpoints[0]
    upstream.report(first, 500, None)
    upstream.report(first, 502, None)
    upstream.report(first, 404, None)  # a non-5xx answer breaks the streak
    upstream.report(first, 500, None)
    upstream.report(first, 503, None)
    assert first.eligible(clock())
    upstream.report(first, 504, None)
    assert not first.eligible(clock())
    assert first.ejected_until - clock() == 1.0


async def test_outlier_false_never_ejects() -> None:
    clock = Clock()
    endpoints = tuple(
        EndpointConfig(f"http://10.0.20.{i}:80", "http", f"10.0.20.{i}", 80, 1) for i in (1, 2)
    )
    upstream = Upstream(UpstreamConfig("off", endpoints, outlier=None), "h11", 4096, now=clock)
    assert upstream.outlier is None
    _fail(upstream, upstream.endpoints[0], 100)
    assert upstream.all_eligible
    assert upstream.endpoints[0].failures == 0


async def test_ejections_are_counted_logged_and_forgotten_with_their_upstream(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    upstream = _upstream(2, clock, name="counted", base=30)
    first = upstream.endpoints[0]
    with caplog.at_level(logging.INFO, logger="proxy.upstream.outlier"):
        _fail(upstream, first, 3)
    assert "upstream counted endpoint 10.0.30.1:80 ejected for 10s (ejection 1)" in caplog.text
    assert "3 failures in a row (last: connect to 10.0.0.1:80 failed" in caplog.text
    clock.time = first.ejected_until
    _fail(upstream, first, 3)
    series = dict(UPSTREAM_EJECTIONS.children())
    assert series[("counted", "10.0.30.1:80")].value == 2.0
    assert ("counted", "10.0.30.2:80") not in series
    forget_series([], ["app"])
    assert ("counted", "10.0.30.1:80") not in dict(UPSTREAM_EJECTIONS.children())


async def test_endpoint_state_repr_shows_the_ejection() -> None:
    clock = Clock()
    upstream = _upstream(2, clock, base=40)
    first = upstream.endpoints[0]
    assert repr(first) == "<EndpointState 10.0.40.1:80 healthy=True in_flight=0>"
    _fail(upstream, first, 3)
    assert repr(first) == (
        "<EndpointState 10.0.40.1:80 healthy=True in_flight=0 ejected_until=1010.000>"
    )
    assert repr(upstream.outlier) == "<OutlierDetector app ejected=1/1>"
