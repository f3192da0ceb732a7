"""The worker's traffic metrics without sockets: labels of a counted request, upstream
attempt codes, local replies, the on/off switch, and `forget_series` after a reload."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import generate_latest

from metrics.definitions import REGISTRY
from metrics.traffic import (
    HTTP1,
    HTTP2,
    REQUESTS,
    UPSTREAM_REQUESTS,
    code_class,
    count_request,
    failure_code,
    forget_series,
    metrics_enabled,
    set_enabled,
    set_route_check,
    upstream_series,
)
from proxy.core.body import Body
from proxy.core.errors import (
    BodyTooLarge,
    NoRoute,
    PoolTimeout,
    RequestTimeout,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)
from proxy.core.local_reply import local_reply
from proxy.core.models import Request
from proxy.upstream.h1 import StaleConnection
from proxy.upstream.h2.stream import StreamRefused
from tests.support.metrics_scrape import Counts, metric, series


@pytest.fixture(autouse=True)
def switched_on() -> Iterator[None]:
    """Every test starts with counting on and leaves it on."""
    set_enabled(True)
    yield
    set_enabled(True)


def request(route: str, method: str = "GET", body: bytes = b"") -> Request:
    req = Request(method, b"/x", [(b"host", b"gw.test")], Body.from_bytes(body))
    req.exchange.route_name = route
    return req


def forget_only(routes: set[str], upstreams: set[str]) -> None:
    """`forget_series` that drops just `routes` and `upstreams` (other tests' series in
    this process stay)."""
    live_routes = {values[0] for values, _ in REQUESTS.children()} - routes
    live_upstreams = {values[0] for values, _ in UPSTREAM_REQUESTS.children()} - upstreams
    forget_series(live_routes, live_upstreams)


def test_request_counted_by_route_normalised_method_and_status() -> None:
    counts = Counts()

    count_request(request("unit-a"), 200, 0, HTTP1)
    count_request(request("unit-a"), 200, 0, HTTP1)
    count_request(request("unit-a", "PURGE"), 200, 0, HTTP1)  # not a standard method
    count_request(request("unit-a", "POST"), 503, 0, HTTP1)

    requests = "gatehouse_requests_total"
    assert counts.delta(requests, route="unit-a", method="GET", code="200") == 2
    assert counts.delta(requests, route="unit-a", method="other", code="200") == 1
    assert counts.delta(requests, route="unit-a", method="POST", code="503") == 1
    assert metric(requests, route="unit-a", method="PURGE", code="200") == 0
    duration = "gatehouse_request_duration_seconds"
    assert counts.delta(f"{duration}_count", route="unit-a") == 4
    assert counts.delta(f"{duration}_sum", route="unit-a") > 0
    assert counts.delta(f"{duration}_bucket", route="unit-a", le="+Inf") == 4


def test_requests_are_counted_by_protocol_and_timed_by_code_class() -> None:
    counts = Counts()

    count_request(request("unit-p"), 200, 0, HTTP1)
    count_request(request("unit-p"), 204, 0, HTTP2)
    count_request(request("unit-p"), 404, 0, HTTP2)
    count_request(request("unit-p"), 502, 0, HTTP2)

    requests = "gatehouse_requests_total"
    assert counts.delta(requests, route="unit-p", method="GET", code="200", protocol="http1") == 1
    assert counts.delta(requests, route="unit-p", method="GET", code="204", protocol="h2") == 1
    assert counts.delta(requests, route="unit-p", protocol="h2") == 3
    duration = "gatehouse_request_duration_seconds_count"
    assert counts.delta(duration, route="unit-p", code_class="2xx") == 2
    assert counts.delta(duration, route="unit-p", code_class="4xx") == 1
    assert counts.delta(duration, route="unit-p", code_class="5xx") == 1
    assert {"route", "code_class", "le"} == set(
        series("gatehouse_request_duration_seconds_bucket")[0]
    )


def test_body_bytes_are_counted_by_route_and_protocol() -> None:
    counts = Counts()
    upload = request("unit-bytes", "POST", b"x" * 300)
    upload.body.take_all()  # the exchange read it (forwarded it upstream)
    unread = request("unit-bytes", "POST", b"y" * 50)  # answered without reading its body

    count_request(upload, 201, 20, HTTP1)
    count_request(unread, 401, 70, HTTP1)
    count_request(request("unit-bytes"), 200, 1000, HTTP2)

    received, sent = "gatehouse_request_body_bytes_total", "gatehouse_response_body_bytes_total"
    assert counts.delta(received, route="unit-bytes", protocol="http1") == 300
    assert counts.delta(received, route="unit-bytes", protocol="h2") == 0
    assert counts.delta(sent, route="unit-bytes", protocol="http1") == 90
    assert counts.delta(sent, route="unit-bytes", protocol="h2") == 1000


@pytest.mark.parametrize(
    ("status", "label"), [(101, "1xx"), (200, "2xx"), (304, "3xx"), (499, "4xx"), (503, "5xx")]
)
def test_code_class_is_the_status_hundreds(status: int, label: str) -> None:
    assert code_class(status) == label


def test_an_answer_without_a_request_is_counted_but_not_timed() -> None:
    counts = Counts()

    count_request(None, 400, 0, HTTP1)

    assert counts.delta("gatehouse_requests_total", route="", method="other", code="400") == 1
    assert counts.delta("gatehouse_request_duration_seconds_count", route="") == 0


def test_local_replies_are_counted_by_reason() -> None:
    counts = Counts()

    local_reply(NoRoute(), None)
    local_reply(UpstreamTimeout(), None)
    local_reply(UpstreamTimeout(), None)

    assert counts.delta("gatehouse_local_replies_total", reason="no_route") == 1
    assert counts.delta("gatehouse_local_replies_total", reason="upstream_timeout") == 2


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (UpstreamConnectError(), "connect_error"),
        (UpstreamConnectTimeout(), "connect_timeout"),
        (PoolTimeout(), "pool_timeout"),
        (UpstreamTimeout(), "timeout"),
        (UpstreamProtocolError(), "bad_response"),
        (UpstreamReset(), "reset"),
        (StaleConnection(), "stale"),
        (StreamRefused("refused", None), "refused"),
        (RequestTimeout(), "client_abort"),  # the client's body, not the upstream
        (BodyTooLarge(), "client_abort"),
    ],
)
def test_failed_upstream_attempts_get_a_fixed_code(error: Exception, code: str) -> None:
    assert failure_code(error) == code


def test_upstream_series_counts_status_codes_and_failures() -> None:
    counts = Counts()
    endpoint = upstream_series("unit-up", "10.0.0.1:80")

    endpoint.response(200, 1.0)  # perf_counter started long ago: a positive duration
    endpoint.response(502, 1.0)
    endpoint.failure("timeout")

    labels = {"upstream": "unit-up", "endpoint": "10.0.0.1:80"}
    assert counts.delta("gatehouse_upstream_requests_total", **labels, code="200") == 1
    assert counts.delta("gatehouse_upstream_requests_total", **labels, code="502") == 1
    assert counts.delta("gatehouse_upstream_requests_total", **labels, code="timeout") == 1
    # responses are timed, failures only counted
    assert counts.delta("gatehouse_upstream_request_duration_seconds_count", **labels) == 2
    assert upstream_series("unit-up", "10.0.0.1:80") is endpoint  # shared by every pool
    assert upstream_series(None, "10.0.0.1:80").dead  # a pool no upstream owns


def test_switched_off_nothing_is_counted() -> None:
    counts = Counts()
    endpoint = upstream_series("unit-off", "10.0.0.2:80")

    set_enabled(False)
    count_request(request("unit-off"), 200, 0, HTTP1)
    local_reply(NoRoute(), None)
    endpoint.response(200, 1.0)
    endpoint.failure("reset")
    assert not metrics_enabled()
    set_enabled(True)
    count_request(request("unit-off"), 200, 0, HTTP1)

    assert counts.delta("gatehouse_requests_total", route="unit-off", method="GET", code="200") == 1
    assert counts.delta("gatehouse_local_replies_total", reason="no_route") == 0
    labels = {"upstream": "unit-off", "endpoint": "10.0.0.2:80"}
    assert counts.delta("gatehouse_upstream_requests_total", **labels, code="200") == 0
    assert counts.delta("gatehouse_upstream_requests_total", **labels, code="reset") == 0


def test_forget_series_drops_removed_routes_and_upstreams() -> None:
    count_request(request("unit-kept"), 200, 0, HTTP1)
    count_request(request("unit-removed"), 200, 0, HTTP1)
    count_request(request(""), 404, 0, HTTP1)
    kept = upstream_series("unit-kept-up", "10.0.0.3:80")
    removed = upstream_series("unit-removed-up", "10.0.0.4:80")
    kept.response(200, 1.0)
    removed.response(200, 1.0)

    forget_only({"unit-removed"}, {"unit-removed-up"})

    routes = {labels.get("route") for labels in series("gatehouse_requests_total")}
    assert "unit-kept" in routes
    assert "" in routes  # the no-route series stays
    assert "unit-removed" not in routes
    durations = {labels["route"] for labels in series("gatehouse_request_duration_seconds_count")}
    assert "unit-removed" not in durations
    assert "unit-kept" in durations
    for name in ("gatehouse_request_body_bytes_total", "gatehouse_response_body_bytes_total"):
        assert "unit-removed" not in {labels["route"] for labels in series(name)}
    upstreams = {labels["upstream"] for labels in series("gatehouse_upstream_requests_total")}
    assert "unit-kept-up" in upstreams
    assert "unit-removed-up" not in upstreams
    timed = series("gatehouse_upstream_request_duration_seconds_count")
    assert "unit-removed-up" not in {labels["upstream"] for labels in timed}
    assert removed.dead
    assert not kept.dead


def test_forget_series_drops_the_endpoints_an_upstream_no_longer_has() -> None:
    stays = upstream_series("unit-moved-up", "10.0.0.6:80")
    moved = upstream_series("unit-moved-up", "10.0.0.7:80")
    stays.response(200, 1.0)
    moved.response(200, 1.0)
    live_routes = {values[0] for values, _ in REQUESTS.children()}
    live_pairs = {(values[0], values[1]) for values, _ in UPSTREAM_REQUESTS.children()}
    live_upstreams = {upstream for upstream, _ in live_pairs}

    forget_series(live_routes, live_upstreams, live_pairs - {("unit-moved-up", "10.0.0.7:80")})

    endpoints = {
        labels["endpoint"]
        for labels in series("gatehouse_upstream_requests_total")
        if labels["upstream"] == "unit-moved-up"
    }
    assert endpoints == {"10.0.0.6:80"}
    assert moved.dead
    assert not stays.dead


def test_a_late_request_of_a_removed_route_does_not_bring_its_series_back() -> None:
    count_request(request("unit-late"), 200, 0, HTTP1)
    endpoint = upstream_series("unit-late-up", "10.0.0.5:80")
    endpoint.response(200, 1.0)
    forget_only({"unit-late"}, {"unit-late-up"})

    count_request(request("unit-late"), 200, 0, HTTP1)  # still running on the old config
    endpoint.response(200, 1.0)  # its old pool

    assert metric("gatehouse_requests_total", route="unit-late", method="GET", code="200") == 0
    assert not any(
        s.get("upstream") == "unit-late-up" for s in series("gatehouse_upstream_requests_total")
    )
    # a new pool for an upstream of that name (a reload brought it back) counts afresh
    fresh = upstream_series("unit-late-up", "10.0.0.5:80")
    fresh.response(200, 1.0)
    labels = {"upstream": "unit-late-up", "endpoint": "10.0.0.5:80", "code": "200"}
    assert metric("gatehouse_upstream_requests_total", **labels) == 1


def test_a_removed_route_that_comes_back_counts_before_the_next_forget() -> None:
    count_request(request("unit-back"), 200, 0, HTTP1)
    forget_only({"unit-back"}, set())
    try:
        set_route_check(lambda route: route == "unit-back")  # the new config has it again
        count_request(request("unit-back"), 200, 0, HTTP1)
    finally:
        set_route_check(None)

    assert metric("gatehouse_requests_total", route="unit-back", method="GET", code="200") == 1


def test_no_created_samples_are_exported() -> None:
    count_request(request("unit-created"), 200, 0, HTTP1)

    text = generate_latest(REGISTRY).decode()

    assert "gatehouse_requests_total{" in text
    assert "_created" not in text  # per-process timestamps cannot be summed
