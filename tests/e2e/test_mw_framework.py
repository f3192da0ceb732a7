"""Middleware chains through real sockets: order, plugins (dotted path and entry point),
lifecycle hooks, local replies raised by middleware, timing metrics, and request_id."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from metrics.definitions import REGISTRY
from tests.support.gateway import GatewayFactory, base_url
from tests.support.plugins import install_entry_point, stamp
from tests.support.upstreams import UpstreamServer

pytestmark = pytest.mark.socket


def config(upstream: UpstreamServer, sections: str, route: str = "") -> str:
    return f"""
listeners: [{{bind: 127.0.0.1:0}}]
upstreams: {{app: {{endpoints: [{upstream.url}]}}}}
{sections}
routes:
  - name: all
    match: {{path_prefix: /}}
    upstream: app
{route}
"""


def upstream_headers(response: httpx.Response) -> dict[str, str]:
    """The headers the upstream's /echo saw (the last value of each)."""
    return {name.lower(): value for name, value in response.json()["headers"]}


SECTIONS = """
middleware:
  outer: {type: "tests.support.plugins.stamp:Stamp", value: global, refuse_header: X-Refuse}
  inner: {type: "tests.support.plugins.stamp:Stamp", value: route}
global_middleware: [outer]
"""


async def test_global_runs_before_the_routes_own_and_both_see_the_response(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    server = await gateway_factory(config(h1_upstream, SECTIONS, "    middleware: [inner]"))
    async with httpx.AsyncClient() as client:
        response = await client.get(base_url(server) + "/echo/x")
    assert response.status_code == 200
    assert upstream_headers(response)["x-stamp"] == "global,route"  # in order, going in
    assert response.headers.get_list("x-stamp") == ["route", "global"]  # reversed, coming out


async def test_a_middleware_raising_a_proxy_error_gets_a_local_reply(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    server = await gateway_factory(config(h1_upstream, SECTIONS, "    middleware: [inner]"))
    async with httpx.AsyncClient() as client:
        response = await client.get(base_url(server) + "/echo/x", headers={"X-Refuse": "1"})
    assert response.status_code == 418
    assert response.json()["error"] == "stamp_refused"
    assert h1_upstream.requests == []  # never forwarded


async def test_a_plugin_from_an_entry_point_runs(
    gateway_factory: GatewayFactory,
    h1_upstream: UpstreamServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    install_entry_point(tmp_path, monkeypatch)
    sections = "middleware:\n  s: {type: stamp-plugin, value: from-entry-point}"
    server = await gateway_factory(config(h1_upstream, sections, "    middleware: [s]"))
    async with httpx.AsyncClient() as client:
        response = await client.get(base_url(server) + "/echo/x")
    assert upstream_headers(response)["x-stamp"] == "from-entry-point"


async def test_start_and_close_hooks_run_once_per_instance(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    stamp.EVENTS.clear()
    text = config(h1_upstream, SECTIONS, "    middleware: [inner, outer]")  # outer twice
    server = await gateway_factory(text)
    assert sorted(stamp.EVENTS) == ["start:inner", "start:outer"]
    await server.shutdown(grace_period=1.0)
    assert sorted(stamp.EVENTS) == ["close:inner", "close:outer", "start:inner", "start:outer"]


async def test_each_middleware_is_timed_on_its_own(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    def count(name: str) -> float:
        labels = {"middleware": name}
        return REGISTRY.get_sample_value("gatehouse_middleware_duration_seconds_count", labels) or 0

    def total(name: str) -> float:
        labels = {"middleware": name}
        return REGISTRY.get_sample_value("gatehouse_middleware_duration_seconds_sum", labels) or 0

    before = count("outer"), count("inner"), total("outer")
    server = await gateway_factory(config(h1_upstream, SECTIONS, "    middleware: [inner]"))
    async with httpx.AsyncClient() as client:
        for _ in range(3):
            # /slow answers after 200 ms: time spent upstream is not the middleware's
            response = await client.get(base_url(server) + "/slow/200")
            assert response.status_code == 200
    assert count("outer") == before[0] + 3
    assert count("inner") == before[1] + 3
    # Three 200 ms upstream answers would add at least 0.6 s; middleware work is far less.
    assert total("outer") - before[2] < 0.3


# -- request_id ---------------------------------------------------------------------------

REQUEST_ID = "middleware:\n  rid: {type: request_id}\nglobal_middleware: [rid]"


async def test_request_id_is_generated_sent_upstream_and_returned(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    server = await gateway_factory(config(h1_upstream, REQUEST_ID))
    async with httpx.AsyncClient() as client:
        first = await client.get(base_url(server) + "/echo/x")
        second = await client.get(base_url(server) + "/echo/x")
    request_id = first.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    assert upstream_headers(first)["x-request-id"] == request_id
    assert second.headers["x-request-id"] != request_id


async def test_a_sane_incoming_request_id_is_kept_an_unsafe_one_replaced(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    server = await gateway_factory(config(h1_upstream, REQUEST_ID))
    async with httpx.AsyncClient() as client:
        kept = await client.get(base_url(server) + "/echo/x", headers={"X-Request-ID": "trace-42"})
        unsafe = await client.get(
            base_url(server) + "/echo/x", headers={"X-Request-ID": "a b; c" + "x" * 200}
        )
    assert kept.headers["x-request-id"] == "trace-42"
    assert upstream_headers(kept)["x-request-id"] == "trace-42"
    assert re.fullmatch(r"[0-9a-f]{32}", unsafe.headers["x-request-id"])
    assert upstream_headers(unsafe)["x-request-id"] == unsafe.headers["x-request-id"]


async def test_request_id_is_in_the_gateways_error_bodies(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    server = await gateway_factory(config(h1_upstream, REQUEST_ID))
    await h1_upstream.stop()  # the upstream is gone: a 502 local reply
    async with httpx.AsyncClient() as client:
        response = await client.get(base_url(server) + "/echo/x")
    assert response.status_code == 502
    assert response.json()["request_id"] == response.headers["x-request-id"]


async def test_global_middleware_runs_for_requests_no_route_matches(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    """An unknown path still passes through global_middleware (an access log line, global
    auth) before its 404; a route's own middleware does not run."""
    text = config(h1_upstream, SECTIONS, "    middleware: [inner]").replace(
        "match: {path_prefix: /}", "match: {path_prefix: /known}"
    )
    server = await gateway_factory(text)
    async with httpx.AsyncClient() as client:
        refused = await client.get(base_url(server) + "/unknown", headers={"X-Refuse": "1"})
        missing = await client.get(base_url(server) + "/unknown")
    assert refused.status_code == 418  # the global middleware saw it first
    assert missing.status_code == 404
    assert missing.json()["error"] == "no_route"
    assert h1_upstream.requests == []
