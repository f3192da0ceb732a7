"""The gauges read when scraped (metrics/live.py), end to end: client connections by
listener and protocol (HTTP/1.1, h2c, a WebSocket tunnel), the upstream pools (HTTP/1.1
and HTTP/2) while requests are in flight, endpoint health, the Runtime a reload swaps in,
and `forget_series` dropping a removed route's and upstream's series."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from websockets.asyncio.client import connect

from metrics.traffic import REQUESTS, UPSTREAM_REQUESTS, forget_series
from proxy.config.load import parse_config
from proxy.exchange.runtime import Runtime
from tests.support.gateway import GatewayFactory, base_url
from tests.support.h2_client import H2Client
from tests.support.metrics_scrape import Counts, eventually, metric, series
from tests.support.upstreams import H2UpstreamServer, UpstreamServer, WsUpstream
from tests.support.ws_h2_client import WsH2Client

pytestmark = pytest.mark.socket

OPEN = "gatehouse_open_connections"


def pool_gauges(upstream: str, endpoint: str) -> tuple[float, float, float]:
    """(open, idle, waiting) of one endpoint's pool, as scraped."""
    labels = {"upstream": upstream, "endpoint": endpoint}
    return (
        metric("gatehouse_upstream_open_connections", **labels),
        metric("gatehouse_upstream_idle_connections", **labels),
        metric("gatehouse_upstream_waiting_requests", **labels),
    )


def endpoint_of(url: str) -> str:
    return url.removeprefix("http://")


async def test_open_connections_by_listener_and_protocol(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    server = await gateway_factory(f"""
listeners:
  - {{bind: 127.0.0.1:0, name: public}}
  - {{bind: 127.0.0.1:0, name: internal, http2: false}}
upstreams: {{app: {{endpoints: [{h1_upstream.url}]}}}}
routes: [{{name: all, match: {{path_prefix: /}}, upstream: app}}]
""")
    public, internal = (f"http://{host}:{port}" for host, port in server.addresses)
    assert metric(OPEN, listener="public", protocol="http1") == 0  # present before use
    assert ("internal", "h2") not in {(s["listener"], s["protocol"]) for s in series(OPEN)}

    async with (
        httpx.AsyncClient(base_url=public, timeout=5) as first,
        httpx.AsyncClient(base_url=public, timeout=5) as second,
        httpx.AsyncClient(base_url=internal, timeout=5) as third,
    ):
        await asyncio.gather(first.get("/echo/1"), second.get("/echo/2"), third.get("/echo/3"))
        host, port = server.addresses[0]
        async with await H2Client.connect(host, port) as h2client:
            assert (await h2client.request("/echo/4")).status == 200
            # keep-alive connections stay open after their answers
            assert metric(OPEN, listener="public", protocol="http1") == 2
            assert metric(OPEN, listener="public", protocol="h2") == 1
            assert metric(OPEN, listener="internal", protocol="http1") == 1
        await eventually("h2 closed", lambda: metric(OPEN, listener="public", protocol="h2") == 0)
    await eventually(
        "all closed",
        lambda: sum(metric(OPEN, **labels) for labels in series(OPEN)) == 0,
    )


@pytest.mark.parametrize("protocol", ["http1", "h2c"])
async def test_pool_gauges_follow_requests_in_flight(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, protocol: str
) -> None:
    h2_upstream = await H2UpstreamServer(max_concurrent_streams=1).start()
    try:
        url = h1_upstream.url if protocol == "http1" else h2_upstream.url
        server = await gateway_factory(f"""
listeners: [{{bind: 127.0.0.1:0}}]
upstreams:
  app:
    endpoints: [{url}]
    protocol: {protocol}
    pool: {{max_connections: 1, wait_timeout: 5s}}
routes: [{{name: all, match: {{path_prefix: /}}, upstream: app}}]
""")
        endpoint = endpoint_of(url)
        assert pool_gauges("app", endpoint) == (0, 0, 0)

        async with httpx.AsyncClient(base_url=base_url(server), timeout=5) as client:
            both = asyncio.gather(client.get("/held"), client.get("/held"))
            # one connection busy (for h2c: its one stream slot), the other request waits,
            # until the test lets the upstream answer
            await eventually("in flight", lambda: pool_gauges("app", endpoint) == (1, 0, 1))
            h1_upstream.release_held()
            h2_upstream.release_held()
            answers = await both
            assert [a.status_code for a in answers] == [200, 200]
            assert pool_gauges("app", endpoint) == (1, 1, 0)  # idle, kept for reuse
    finally:
        await h2_upstream.stop()


async def test_every_endpoint_is_reported_healthy(gateway_factory: GatewayFactory) -> None:
    server = await gateway_factory("""
listeners: [{bind: 127.0.0.1:0}]
upstreams: {app: {endpoints: [http://127.0.0.1:1, http://127.0.0.1:2]}}
routes: [{name: all, match: {path_prefix: /}, upstream: app}]
""")

    healthy = {
        (labels["upstream"], labels["endpoint"]): metric("gatehouse_upstream_healthy", **labels)
        for labels in series("gatehouse_upstream_healthy")
    }

    assert healthy == {("app", "127.0.0.1:1"): 1.0, ("app", "127.0.0.1:2"): 1.0}
    assert server.runtime.upstreams["app"].endpoint_health() == [
        ("127.0.0.1:1", True),
        ("127.0.0.1:2", True),
    ]


async def test_the_gauges_read_the_runtime_a_reload_swaps_in(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    server = await gateway_factory(f"""
listeners: [{{bind: 127.0.0.1:0}}]
upstreams: {{before: {{endpoints: [{h1_upstream.url}]}}}}
routes: [{{name: all, match: {{path_prefix: /}}, upstream: before}}]
""")
    assert {s["upstream"] for s in series("gatehouse_upstream_healthy")} == {"before"}
    old = server.runtime
    new = Runtime(
        parse_config(f"""
listeners: [{{bind: 127.0.0.1:0}}]
upstreams: {{after: {{endpoints: [{h1_upstream.url}]}}}}
routes: [{{name: all, match: {{path_prefix: /}}, upstream: after}}]
"""),
        server.codec,
    )
    server.runtime = new
    try:
        assert {s["upstream"] for s in series("gatehouse_upstream_healthy")} == {"after"}
        assert pool_gauges("after", endpoint_of(h1_upstream.url)) == (0, 0, 0)
    finally:
        server.runtime = old
        new.close()


@pytest.fixture
async def ws_upstream() -> AsyncIterator[WsUpstream]:
    upstream = await WsUpstream().start()
    yield upstream
    await upstream.stop()


async def test_a_websocket_tunnel_is_a_websocket_connection_and_a_101(
    gateway_factory: GatewayFactory, ws_upstream: WsUpstream, codec: str
) -> None:
    server = await gateway_factory(f"""
listeners: [{{bind: 127.0.0.1:0, name: public}}]
http1_parser: {codec}
upstreams: {{ws: {{endpoints: [{ws_upstream.url}]}}}}
routes: [{{name: chat, match: {{path_prefix: /}}, upstream: ws}}]
""")
    counts = Counts()
    host, port = server.addresses[0]
    endpoint = endpoint_of(ws_upstream.url)

    async with connect(f"ws://{host}:{port}/echo", open_timeout=5, ping_interval=None) as ws:
        await ws.send("hi")
        assert await ws.recv() == "hi"
        # the request ended at its 101; the socket is now a tunnel, not an HTTP/1.1 one
        assert counts.delta("gatehouse_requests_total", route="chat", method="GET", code="101") == 1
        assert counts.delta("gatehouse_request_duration_seconds_count", route="chat") == 1
        assert metric(OPEN, listener="public", protocol="websocket") == 1
        assert metric(OPEN, listener="public", protocol="http1") == 0
        upstream_101 = {"upstream": "ws", "endpoint": endpoint, "code": "101"}
        assert counts.delta("gatehouse_upstream_requests_total", **upstream_101) == 1
    await eventually(
        "tunnel closed", lambda: metric(OPEN, listener="public", protocol="websocket") == 0
    )


async def test_a_websocket_over_http2_is_counted_at_its_200_and_only_once(
    gateway_factory: GatewayFactory, ws_upstream: WsUpstream
) -> None:
    server = await gateway_factory(f"""
listeners: [{{bind: 127.0.0.1:0, name: public}}]
upstreams: {{ws: {{endpoints: [{ws_upstream.url}]}}}}
routes: [{{name: chat, match: {{path_prefix: /}}, upstream: ws}}]
""")
    counts = Counts()
    host, port = server.addresses[0]

    async with await WsH2Client.connect(host, port) as client:
        ws = await client.open_websocket("/echo")
        await ws.send("hi")
        assert await ws.receive() == "hi"
        assert ws.status == 200
        # RFC 8441: the extended CONNECT is routed as the GET it stands for
        assert counts.delta("gatehouse_requests_total", route="chat", method="GET", code="200") == 1
        assert metric(OPEN, listener="public", protocol="h2") == 1  # the tunnel is a stream
        assert metric(OPEN, listener="public", protocol="websocket") == 0
        await ws.close_websocket(1000)
        await ws.wait_gone()
    await eventually("h2 closed", lambda: metric(OPEN, listener="public", protocol="h2") == 0)

    assert counts.delta("gatehouse_requests_total", route="chat", method="GET", code="200") == 1
    assert counts.delta("gatehouse_request_duration_seconds_count", route="chat") == 1


async def test_forget_series_drops_a_removed_route_and_upstream(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    server = await gateway_factory(f"""
listeners: [{{bind: 127.0.0.1:0}}]
upstreams:
  kept: {{endpoints: [{h1_upstream.url}]}}
  gone: {{endpoints: [{h1_upstream.url}]}}
routes:
  - {{name: stays, match: {{path_prefix: /stays}}, upstream: kept}}
  - {{name: goes, match: {{path_prefix: /goes}}, upstream: gone}}
""")
    async with httpx.AsyncClient(base_url=base_url(server), timeout=5) as client:
        for path in ("/stays/echo", "/goes/echo", "/neither"):
            await client.get(path)
    assert {"stays", "goes", ""} <= {s["route"] for s in series("gatehouse_requests_total")}
    assert {"kept", "gone"} <= {s["upstream"] for s in series("gatehouse_upstream_requests_total")}

    # what a reload to a config without `goes` and `gone` does (other tests' series stay)
    routes = {values[0] for values, _ in REQUESTS.children()} - {"goes"}
    upstreams = {values[0] for values, _ in UPSTREAM_REQUESTS.children()} - {"gone"}
    forget_series(routes, upstreams)

    for name in ("gatehouse_requests_total", "gatehouse_request_duration_seconds_count"):
        remaining = {s["route"] for s in series(name)}
        assert "goes" not in remaining
        assert {"stays", ""} <= remaining
    for name in (
        "gatehouse_upstream_requests_total",
        "gatehouse_upstream_request_duration_seconds_count",
    ):
        remaining = {s["upstream"] for s in series(name)}
        assert "gone" not in remaining
        assert "kept" in remaining
    # the running config still has both: a request there counts again at once
    async with httpx.AsyncClient(base_url=base_url(server), timeout=5) as client:
        await client.get("/goes/echo")
    assert metric("gatehouse_requests_total", route="goes", method="GET", code="200") == 1
