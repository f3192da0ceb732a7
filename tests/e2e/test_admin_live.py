"""The admin listener's live API on a real gateway process with two workers and real
upstreams: /upstreams (in flight and pools summed over the workers, health as the
active checks see it, an outlier ejection and until when), /routes and /middleware (the
running config in match order, redacted as /config is), /certificates (every
certificate of each TLS listener), and the token and Host checks on every new path and
the status page.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509

from tests.support.admin_client import admin_config, admin_get, scrape, value, wait_ready
from tests.support.gateway_process import (
    child_pids,
    free_port,
    pids_connected_to,
    run_gateway,
    wait_until,
)
from tests.support.tls import make_tls_files
from tests.support.upstreams import UpstreamServer, serve_in_thread

pytestmark = pytest.mark.socket

CLIENT_TIMEOUT_S = 30.0
NEW_PATHS = ("/", "/upstreams", "/routes", "/middleware", "/certificates")


@pytest.fixture
def h1_upstream() -> Iterator[UpstreamServer]:
    with serve_in_thread(UpstreamServer()) as server:
        yield server


def upstreams(admin: int, headers: dict[str, str] | None = None) -> dict[str, Any]:
    answer = admin_get(admin, "/upstreams", headers=headers or {})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    return {upstream["name"]: upstream for upstream in answer.json()["upstreams"]}


def endpoint(admin: int, upstream: str) -> dict[str, Any]:
    (only,) = upstreams(admin)[upstream]["endpoints"]
    return dict(only)


LIVE_ROUTES = """
  - name: held
    match: {path_prefix: /held}
    upstream: app
  - name: flaky
    match: {path_prefix: /flaky/}
    upstream: flaky
  - name: checked
    match: {path_prefix: /checked/}
    upstream: checked
"""


def live_upstreams(dead: int) -> str:
    """`flaky`: one endpoint that refuses connections, ejected for 60 s at its first
    failure; `checked`: the same address, under active checks instead."""
    return f"""
  flaky:
    endpoints: [http://127.0.0.1:{dead}]
    retries: {{attempts: 1}}
    outlier: {{consecutive_failures: 1, base_ejection: 60s, max_ejection: 60s,
              max_ejection_percent: 100}}
  checked:
    endpoints: [http://127.0.0.1:{dead}]
    health_check: {{path: /, interval: 100ms, timeout: 5s, unhealthy_threshold: 1}}
    outlier: false
"""


def test_upstreams_sums_in_flight_and_pools_over_both_workers_and_shows_health(
    tmp_path: Path, h1_upstream: UpstreamServer
) -> None:
    port, admin, dead = free_port(), free_port(), free_port()
    text = admin_config(port, admin, h1_upstream.url, LIVE_ROUTES)
    text = text.replace("routes:\n", live_upstreams(dead) + "routes:\n", 1)
    with run_gateway(text, tmp_path, port=port) as gw:
        wait_ready(admin)
        workers = child_pids(gw.pid)
        assert len(workers) == 2
        # Requests held by the upstream, each on a connection of its own, until both
        # workers hold some: the sums must then count both workers' requests.
        answers: list[int] = []
        threads: list[threading.Thread] = []

        def held() -> None:
            limits = httpx.Limits(max_keepalive_connections=0)
            with httpx.Client(timeout=CLIENT_TIMEOUT_S, limits=limits) as client:
                answers.append(client.get(f"{gw.url}/held").status_code)

        def sent_everywhere() -> bool:
            if pids_connected_to(h1_upstream.port, workers) == workers:
                return True
            if len(threads) < 40:
                thread = threading.Thread(target=held, daemon=True)
                thread.start()
                threads.append(thread)
            return False

        try:
            wait_until(sent_everywhere, 30.0, "held requests on both workers")
            wait_until(
                lambda: endpoint(admin, "app")["in_flight"] == len(threads),
                30.0,
                "every held request in flight",
            )
            app = endpoint(admin, "app")
            assert app["endpoint"] == f"127.0.0.1:{h1_upstream.port}"
            assert app["workers"] == 2
            assert app["pool"] == {"open": len(threads), "idle": 0, "waiting": 0}
            assert (app["status"], app["in_rotation"], app["healthy"]) == ("up", True, True)
            assert (app["ejected_workers"], app["ejected_until"]) == (0, None)
        finally:
            h1_upstream.release_held()
            for thread in threads:
                thread.join(CLIENT_TIMEOUT_S)
        assert answers == [200] * len(threads)
        wait_until(lambda: endpoint(admin, "app")["in_flight"] == 0, 30.0, "answered")
        app = endpoint(admin, "app")
        assert app["pool"]["open"] == app["pool"]["idle"]

        # Active checks against a port nobody listens on: down on every worker.
        wait_until(lambda: endpoint(admin, "checked")["status"] == "down", 30.0, "checked down")
        checked = upstreams(admin)["checked"]
        assert checked["health_check"] == {"type": "http", "path": "/", "interval": 0.1}
        assert checked["endpoints"][0]["healthy"] is False
        assert checked["endpoints"][0]["in_rotation"] is False

        # An outlier ejection: one failure ejects for 60 s, on the worker that saw it.
        assert endpoint(admin, "flaky")["status"] == "up"
        before = time.time()
        with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
            assert client.get(f"{gw.url}/flaky/x").status_code == 502
        flaky = endpoint(admin, "flaky")
        assert (flaky["status"], flaky["healthy"], flaky["in_rotation"]) == ("ejected", True, False)
        assert flaky["ejected_workers"] == 1
        assert before + 55 < flaky["ejected_until"] < time.time() + 61
        assert upstreams(admin)["flaky"]["outlier_detection"] is True

        # The same states, merged the same way as the metrics.
        samples = scrape(admin)
        endpoint_label = f"127.0.0.1:{dead}"
        for name in ("flaky", "checked"):
            healthy = value(
                samples, "gatehouse_upstream_healthy", upstream=name, endpoint=endpoint_label
            )
            assert healthy == 0.0, name


CONFIG_ROUTES = """
  - name: catch-all
    match: {path_prefix: /}
    upstream: app
    middleware: [keys, {type: request_id}]
  - name: "exact <b>"
    match: {path: /exact, headers: {X-Tenant: tenant-secret-1}}
    upstream: app
    rewrite: {add_prefix: /v1}
    middleware:
      - type: headers
        request: {set: {Authorization: "Bearer upstream-secret-2", X-Env: !public staging}}
      - keys
"""
CONFIG_MIDDLEWARE = """
middleware:
  keys:
    type: api_key
    keys: [{key: key-secret-3, consumer: alice}]
global_middleware:
  - type: cors
    allow_origins: ["https://app.example"]
"""


def test_routes_and_middleware_show_the_running_config_in_match_order_redacted(
    tmp_path: Path, h1_upstream: UpstreamServer
) -> None:
    port, admin = free_port(), free_port()
    text = admin_config(port, admin, h1_upstream.url, CONFIG_ROUTES, CONFIG_MIDDLEWARE)
    with run_gateway(text, tmp_path, port=port):
        wait_ready(admin)
        routes_answer = admin_get(admin, "/routes")
        middleware_answer = admin_get(admin, "/middleware")
    for answer in (routes_answer, middleware_answer):
        assert answer.status_code == 200
        for secret in ("tenant-secret-1", "upstream-secret-2", "key-secret-3"):
            assert secret not in answer.text
    routes = routes_answer.json()["routes"]
    # The exact path is tried first, though written second.
    assert [(r["position"], r["name"], r["index"]) for r in routes] == [
        (1, "exact <b>", 1),
        (2, "catch-all", 0),
    ]
    exact, catch_all = routes
    assert exact["match"] == {"path": "/exact", "headers": {"X-Tenant": "<redacted>"}}
    assert exact["rewrite"] == {"add_prefix": "/v1"}
    assert exact["upstream"] == "app"
    assert [(m["name"], m["type"]) for m in exact["middleware"]] == [
        ("cors", "cors"),
        ("headers", "headers"),
        ("keys", "api_key"),
    ]
    assert [m["name"] for m in catch_all["middleware"]] == ["cors", "keys", "request_id"]

    middleware = {(m["name"], m["defined"]): m for m in middleware_answer.json()["middleware"]}
    assert list(middleware) == [
        ("keys", "middleware.keys"),
        ("cors", "global_middleware[0]"),
        ("headers", "routes[1].middleware[0]"),
        ("request_id", "routes[0].middleware[1]"),
    ]
    keys = middleware[("keys", "middleware.keys")]
    assert keys["type"] == "api_key"
    assert keys["routes"] == ["exact <b>", "catch-all"]
    assert keys["options"] == {"keys": [{"key": "<redacted>", "consumer": "<redacted>"}]}
    cors = middleware[("cors", "global_middleware[0]")]
    assert cors["global"] is True
    assert cors["routes"] == ["exact <b>", "catch-all"]
    assert cors["options"] == {"allow_origins": ["https://app.example"]}
    headers = middleware[("headers", "routes[1].middleware[0]")]
    assert headers["options"] == {
        "request": {"set": {"Authorization": "<redacted>", "X-Env": "staging"}}
    }
    assert headers["routes"] == ["exact <b>"]


def test_certificates_shows_every_certificate_of_each_tls_listener(
    tmp_path: Path, h1_upstream: UpstreamServer
) -> None:
    files = make_tls_files(tmp_path / "tls", ("api.example.com",))
    other = make_tls_files(tmp_path / "other", ("www.example.com",))
    port, admin, tls_port = free_port(), free_port(), free_port()
    routes = "  - name: all\n    match: {path_prefix: /}\n    upstream: app\n"
    text = admin_config(port, admin, h1_upstream.url, routes).replace(
        "    name: public\n",
        "    name: public\n"
        f"  - bind: 127.0.0.1:{tls_port}\n    name: secure\n    tls:\n      certificates:\n"
        f"        - {{cert: {files.cert}, key: {files.key}}}\n"
        f"        - {{cert: {other.cert}, key: {other.key}}}\n",
    )
    with run_gateway(text, tmp_path, port=port):
        wait_ready(admin)
        answer = admin_get(admin, "/certificates")
    assert answer.status_code == 200
    certificate, second = answer.json()["certificates"]
    leaf = x509.load_pem_x509_certificates(files.cert.read_bytes())[0]
    assert certificate["listener"] == "secure"
    assert certificate["address"] == f"127.0.0.1:{tls_port}"
    assert certificate["file"] == str(files.cert)
    assert certificate["default"] is True
    assert certificate["names"] == ["api.example.com", "127.0.0.1"]
    assert certificate["issuer"] == leaf.issuer.rfc4514_string()
    assert certificate["subject"] == leaf.subject.rfc4514_string()
    assert certificate["not_after"] == leaf.not_valid_after_utc.isoformat()
    assert certificate["expires_at"] == leaf.not_valid_after_utc.timestamp()
    left = leaf.not_valid_after_utc.timestamp() - time.time()
    assert abs(certificate["expires_in_seconds"] - left) < 60
    assert (second["listener"], second["file"], second["default"]) == (
        "secure",
        str(other.cert),
        False,
    )
    assert second["names"] == ["www.example.com", "127.0.0.1"]


TOKEN = "live-admin-token-0123456789abcdef"


def test_the_new_paths_need_the_token_and_an_allowed_host(
    tmp_path: Path, h1_upstream: UpstreamServer
) -> None:
    port, admin = free_port(), free_port()
    routes = "  - name: all\n    match: {path_prefix: /}\n    upstream: app\n"
    text = admin_config(port, admin, h1_upstream.url, routes).replace(
        f"admin:\n  bind: 127.0.0.1:{admin}\n",
        f'admin:\n  bind: 127.0.0.1:{admin}\n  token: "{TOKEN}"\n',
    )
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    base = f"http://127.0.0.1:{admin}"
    with (
        run_gateway(text, tmp_path, port=port),
        httpx.Client(base_url=base, timeout=CLIENT_TIMEOUT_S) as client,
    ):
        wait_until(lambda: "2 of 2" in client.get("/readyz").text, 10.0, "ready")
        for path in NEW_PATHS:
            missing = client.get(path)
            assert missing.status_code == 401, path
            assert missing.headers["www-authenticate"] == 'Bearer realm="gatehouse-admin"'
            wrong = client.get(path, headers={"Authorization": "Bearer not-the-token"})
            assert wrong.status_code == 401, path
            rebound = client.get(path, headers={**bearer, "Host": "evil.example"})
            assert rebound.status_code == 421, path
            assert client.get(path, headers=bearer).status_code == 200, path
            assert client.post(path, headers=bearer).status_code == 405, path
        page = client.get("/", headers=bearer)
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        policy = page.headers["content-security-policy"]
        assert "default-src 'none'" in policy
        assert "script-src" not in policy  # no script may run at all
        assert page.headers["cache-control"] == "no-store"
        assert '<meta http-equiv="refresh"' in page.text
        assert 'data-route="all"' in page.text
        metrics = client.get("/metrics", headers=bearer).text
    assert 'gatehouse_admin_refusals_total{reason="unauthorized"} 10.0' in metrics
    assert 'gatehouse_admin_refusals_total{reason="host"} 5.0' in metrics
