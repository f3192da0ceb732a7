"""The admin listener's status page in a real headless Chromium (tests/support/cdp.py),
against a real gateway process with two workers, a token, and an upstream with two real
endpoints under active health checks: the page loads clean (no console error, no
exception, no request refused by its Content-Security-Policy), shows the routes and the
endpoints, and shows an endpoint whose server is stopped as DOWN by the first refresh
that starts after the gateway knows it is down. Everything waits on the browser's
events (a request sent, a page loaded), each within one bounded deadline."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.admin_client import admin_config
from tests.support.cdp import CdpSession, chromium_available, headless_chromium
from tests.support.gateway_process import free_port, run_gateway, wait_until
from tests.support.upstreams import UpstreamServer, WsgiUpstream, serve_in_thread

pytestmark = [
    pytest.mark.socket,
    pytest.mark.skipif(not chromium_available(), reason="needs chromium (.ci/system-deps)"),
    pytest.mark.timeout(120),
]

TOKEN = "status-page-token-0123456789abcdef"
DEADLINE_S = 60.0  # the whole wait for the page to show the endpoint down
ROUTES = """
  - name: orders
    match: {path_prefix: /orders/}
    upstream: app
    middleware: [{type: request_id}]
  - name: everything
    match: {path_prefix: /}
    upstream: app
"""
# Checks every 100 ms; one failure takes an endpoint out (the stopped server refuses
# connections at once), one success brings it back.
HEALTH = """
    health_check: {path: /status/200, interval: 100ms, timeout: 5s,
                   healthy_threshold: 1, unhealthy_threshold: 1}
    outlier: false
"""


def config(port: int, admin: int, first: str, second: str) -> str:
    text = admin_config(port, admin, first, ROUTES)
    text = text.replace(f"endpoints: [{first}]", f"endpoints: [{first}, {second}]" + HEALTH)
    return text.replace(
        f"admin:\n  bind: 127.0.0.1:{admin}\n",
        f'admin:\n  bind: 127.0.0.1:{admin}\n  token: "{TOKEN}"\n',
    )


def endpoint_statuses(admin: int) -> dict[str, str]:
    answer = httpx.get(
        f"http://127.0.0.1:{admin}/upstreams",
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    (app,) = answer.json()["upstreams"]
    return {e["endpoint"]: e["status"] for e in app["endpoints"]}


def page_state(page: CdpSession) -> dict[str, Any]:
    """What the loaded page shows: the routes, and each endpoint's status and badge."""
    value = page.evaluate(
        """JSON.stringify({
          routes: [...document.querySelectorAll('tr.route')].map(r => r.dataset.route),
          endpoints: Object.fromEntries([...document.querySelectorAll('tr.endpoint')].map(
            r => [r.dataset.endpoint, {status: r.dataset.status,
                                       down: r.classList.contains('down'),
                                       badge: r.querySelector('.badge').textContent}])),
          window: document.getElementById('window').textContent,
        })"""
    )
    return dict(json.loads(value))


@pytest.fixture
def kept() -> Iterator[UpstreamServer]:
    with serve_in_thread(UpstreamServer()) as server:
        yield server


def test_the_status_page_shows_routes_upstreams_and_an_endpoint_going_down(
    tmp_path: Path, kept: UpstreamServer
) -> None:
    port, admin = free_port(), free_port()
    with contextlib.ExitStack() as stopping:
        # The one to stop is wsgiref's server: its stop is synchronous, with no connection
        # left half-accepted while checks keep arriving.
        doomed = stopping.enter_context(WsgiUpstream())
        up, down = f"127.0.0.1:{kept.port}", doomed.url.removeprefix("http://")
        text = config(port, admin, kept.url, doomed.url)
        with run_gateway(text, tmp_path, port=port), headless_chromium() as page:
            wait_until(lambda: endpoint_statuses(admin) == {up: "up", down: "up"}, 30.0, "both up")
            for domain in ("Page", "Runtime", "Log", "Network"):
                page.call(f"{domain}.enable")
            # A browser sends no bearer token of its own: the operator's (a header-adding
            # extension, a proxy) is this call.
            page.call("Network.setExtraHTTPHeaders", headers={"Authorization": f"Bearer {TOKEN}"})
            deadline = time.monotonic() + DEADLINE_S
            page.call("Page.navigate", url=f"http://127.0.0.1:{admin}/")
            page.next_event("Page.loadEventFired", deadline)
            shown = page_state(page)
            assert shown["routes"] == ["orders", "everything"]
            assert shown["endpoints"] == {
                up: {"status": "up", "down": False, "badge": "UP"},
                down: {"status": "up", "down": False, "badge": "UP"},
            }
            assert "rates" in shown["window"]

            stopping.close()  # the second endpoint's server stops: checks fail at once
            wait_until(lambda: endpoint_statuses(admin)[down] == "down", 30.0, "down in JSON")
            known = time.time()
            # The first page request sent after the gateway knew, and the load after it.
            page.next_event(
                "Network.requestWillBeSent",
                deadline,
                lambda e: e.get("type") == "Document" and e["wallTime"] > known,
            )
            page.next_event("Page.loadEventFired", deadline)
            shown = page_state(page)
            assert shown["endpoints"][down] == {"status": "down", "down": True, "badge": "DOWN"}
            assert shown["endpoints"][up]["status"] == "up"
            assert shown["routes"] == ["orders", "everything"]
            assert page.problems() == []
            documents = [
                e["params"]
                for e in page.events
                if e["method"] == "Network.responseReceived" and e["params"]["type"] == "Document"
            ]
            assert documents
            assert {d["response"]["status"] for d in documents} == {200}
