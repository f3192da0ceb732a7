"""The status page without sockets: rates from two views of the counters (or since the
start), error ratios, escaping of everything the config names, and the DOWN badge."""

from __future__ import annotations

from typing import Any

from prometheus_client.metrics_core import Metric

from metrics.status_page import MIN_WINDOW_S, RequestRates, counts_of, render_page


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def requests(
    by_route: dict[tuple[str, str], float], attempts: dict[tuple[str, str, str], float]
) -> list[Metric]:
    route_family = Metric("gatehouse_requests", "responses", "counter")
    for (route, code), count in by_route.items():
        route_family.add_sample(
            "gatehouse_requests_total", {"route": route, "method": "GET", "code": code}, count
        )
    upstream_family = Metric("gatehouse_upstream_requests", "attempts", "counter")
    for (upstream, endpoint, code), count in attempts.items():
        labels = {"upstream": upstream, "endpoint": endpoint, "code": code}
        upstream_family.add_sample("gatehouse_upstream_requests_total", labels, count)
    return [route_family, upstream_family]


def test_counts_fold_codes_into_totals_and_errors() -> None:
    counts = counts_of(
        requests(
            {("api", "200"): 8, ("api", "503"): 2, ("api", "404"): 5},
            {
                ("app", "a:1", "200"): 3,
                ("app", "a:1", "connect_error"): 1,
                ("app", "a:1", "502"): 1,
            },
        ),
        at=1.0,
    )
    assert counts.routes == {"api": (15.0, 2.0)}
    assert counts.endpoints == {("app", "a:1"): (5.0, 2.0)}


def test_the_first_view_rates_since_the_start_then_since_the_previous_view() -> None:
    clock = Clock()
    rates = RequestRates(started=90.0, now=clock)
    first = rates.observe(requests({("api", "200"): 10}, {}))
    assert (first.since, first.window_s) == ("start", 10.0)
    assert first.routes["api"].per_second == 1.0
    assert first.routes["api"].error_ratio == 0.0

    clock.now += 2.0
    second = rates.observe(requests({("api", "200"): 14, ("api", "500"): 4}, {}))
    assert (second.since, second.window_s) == ("previous", 2.0)
    assert second.routes["api"].per_second == 4.0  # 8 more in 2 s
    assert second.routes["api"].error_ratio == 0.5
    assert second.routes["api"].total == 18.0

    # A view sooner than MIN_WINDOW_S after the last compares with an older one.
    clock.now += MIN_WINDOW_S / 2
    third = rates.observe(requests({("api", "200"): 14, ("api", "500"): 4}, {}))
    assert third.window_s == 2.0 + MIN_WINDOW_S / 2
    assert third.routes["api"].per_second == 8.0 / third.window_s


def test_a_counter_that_went_back_counts_from_zero() -> None:
    clock = Clock()
    rates = RequestRates(started=clock.now, now=clock)
    rates.observe(requests({("api", "200"): 50}, {}))
    clock.now += 5.0
    after = rates.observe(requests({("api", "200"): 5}, {}))
    assert after.routes["api"].per_second == 1.0
    idle = rates.observe(requests({}, {}))
    assert idle.routes == {}


def status(name: str, host: str, endpoint_status: str) -> dict[str, Any]:
    return {
        "workers": 2,
        "generation": 3,
        "sha256": "ab" * 32,
        "upstreams": [
            {
                "name": name,
                "protocol": "http1",
                "balance": "round_robin",
                "health_check": {"type": "http", "path": "/<h>", "interval": 1.0},
                "panic": False,
                "endpoints": [
                    {
                        "endpoint": host,
                        "status": endpoint_status,
                        "in_flight": 2,
                        "pool": {"open": 3, "idle": 1, "waiting": 0},
                        "ejected_until": None,
                        "ejected_workers": 0,
                        "workers": 2,
                    }
                ],
            }
        ],
        "routes": [
            {
                "position": 1,
                "name": name,
                "match": {"path_prefix": "/<script>"},
                "upstream": name,
                "middleware": [{"name": "x", "type": "headers"}],
            }
        ],
        "certificates": [],
    }


def test_everything_from_the_config_is_escaped() -> None:
    evil = '"><script>alert(1)</script>'
    rates = RequestRates(0.0, now=lambda: 10.0).observe([])
    page = render_page(status(evil, 'h"<i>:80', "up"), rates, 0.0).decode()
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'data-route="&quot;&gt;&lt;script&gt;' in page
    assert 'data-endpoint="h&quot;&lt;i&gt;:80"' in page
    assert '<meta http-equiv="refresh"' in page


def test_an_endpoint_out_of_rotation_has_a_down_badge() -> None:
    rates = RequestRates(0.0, now=lambda: 10.0).observe([])
    down = render_page(status("app", "10.0.0.1:80", "down"), rates, 0.0).decode()
    assert '<tr class="endpoint down" data-endpoint="10.0.0.1:80" data-status="down">' in down
    assert '<span class="badge down">DOWN</span>' in down
    up = render_page(status("app", "10.0.0.1:80", "up"), rates, 0.0).decode()
    assert '<span class="badge up">UP</span>' in up
    assert "DOWN" not in up
