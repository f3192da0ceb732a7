"""The admin listener's views built by the parent, without processes: endpoint states
of several workers merged with the summed gauges, and middleware with where each is used."""

from __future__ import annotations

from typing import Any

from prometheus_client.metrics_core import Metric

from metrics.aggregate import merge
from proxy.config.load import parse_config
from proxy.config.view import config_view
from proxy.process.admin_views import middleware_view, purge_reply, upstreams_view

CONFIG = """
listeners: [{bind: 127.0.0.1:8080}]
middleware:
  ids: {type: request_id}
global_middleware: [ids]
upstreams:
  app:
    endpoints: [http://10.0.0.1:80, http://10.0.0.2:80]
routes:
  - {name: b, match: {path_prefix: /}, upstream: app, middleware: [{type: request_id}]}
  - {name: a, match: {path: /a}, upstream: app}
"""


def worker_families(healthy: dict[str, float], open_: dict[str, float]) -> list[dict[str, Any]]:
    def family(name: str, values: dict[str, float]) -> dict[str, Any]:
        return {
            "name": name,
            "type": "gauge",
            "help": "",
            "unit": "",
            "samples": [
                [name, {"upstream": "app", "endpoint": endpoint}, value]
                for endpoint, value in values.items()
            ],
        }

    return [
        family("gatehouse_upstream_healthy", healthy),
        family("gatehouse_upstream_open_connections", open_),
    ]


def state(endpoint: str, healthy: bool, until: float | None, in_flight: int) -> dict[str, Any]:
    return {
        "upstream": "app",
        "endpoint": endpoint,
        "healthy": healthy,
        "ejected_until": until,
        "in_flight": in_flight,
        "panic": False,
    }


def test_endpoints_sum_over_workers_and_are_healthy_only_if_every_worker_says_so() -> None:
    config = parse_config(CONFIG)
    merged: list[Metric] = merge(
        [
            worker_families({"10.0.0.1:80": 1, "10.0.0.2:80": 0}, {"10.0.0.1:80": 2}),
            worker_families({"10.0.0.1:80": 1, "10.0.0.2:80": 1}, {"10.0.0.1:80": 3}),
        ]
    )
    workers = [
        [state("10.0.0.1:80", True, None, 1), state("10.0.0.2:80", True, 2000.0, 0)],
        [state("10.0.0.1:80", True, None, 4), state("10.0.0.2:80", True, None, 0)],
    ]
    (app,) = upstreams_view(config, merged, workers)
    first, second = app["endpoints"]
    assert first["endpoint"] == "10.0.0.1:80"
    assert (first["status"], first["in_flight"], first["workers"]) == ("up", 5, 2)
    assert first["pool"] == {"open": 5, "idle": 0, "waiting": 0}
    assert second["status"] == "ejected"  # one worker ejected it: out of rotation there
    assert (second["in_rotation"], second["healthy"]) == (False, True)
    assert (second["ejected_workers"], second["ejected_until"]) == (1, 2000.0)

    workers[1][1] = state("10.0.0.2:80", False, None, 0)
    (app,) = upstreams_view(config, merged, workers)
    assert app["endpoints"][1]["status"] == "down"  # an active check failing wins


def test_before_any_worker_reports_the_configured_endpoints_are_unknown() -> None:
    (app,) = upstreams_view(parse_config(CONFIG), [], [])
    assert [(e["endpoint"], e["status"]) for e in app["endpoints"]] == [
        ("10.0.0.1:80", "unknown"),
        ("10.0.0.2:80", "unknown"),
    ]


def test_middleware_names_the_routes_that_run_it_in_match_order() -> None:
    config = parse_config(CONFIG)
    view = config_view(CONFIG, "<string>", config.concealed)
    found = middleware_view(config, view)
    assert [(m["name"], m["defined"], m["global"], m["routes"]) for m in found] == [
        ("ids", "middleware.ids", True, ["a", "b"]),
        ("request_id", "routes[0].middleware[0]", False, ["b"]),
    ]


def test_purge_reply_sums_instances_over_workers_and_reports_failures() -> None:
    ok = [
        ("worker 1", {"ok": True, "purged": {"pages": 2, "api": 0}}),
        ("worker 2", {"ok": True, "purged": {"pages": 1, "api": 1}}),
    ]
    assert purge_reply("", ok) == (
        200,
        {"ok": True, "purged": {"pages": 3, "api": 1}, "errors": []},
    )
    failed = [
        ("worker 1", {"ok": True, "purged": {"pages": "CacheBackendError: Redis down"}}),
        ("worker 2", TimeoutError("no answer")),
    ]
    status, payload = purge_reply("", failed)
    assert (status, payload["ok"], payload["purged"]) == (502, False, {"pages": 0})
    assert payload["errors"] == [
        "worker 1: pages: CacheBackendError: Redis down",
        "worker 2: no answer",
    ]
    none = [("worker 1", {"ok": True, "purged": {}})]
    assert purge_reply("pages", none) == (
        404,
        {"ok": False, "error": "no_cache", "message": "no cache middleware named 'pages'"},
    )
