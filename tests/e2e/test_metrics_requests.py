"""Traffic metrics end to end: real clients (httpx over HTTP/1.1, an h2 client over h2c)
through an in-process gateway to real upstreams, read back from the worker registry.
Requests by route, method and code on every path a request can take (the general path,
the synchronous fast path, eager middleware chains), local replies, upstream attempts
and their failure codes, and the off switch."""

from __future__ import annotations

import socket

import httpx
import pytest

from proxy.process.server import Server
from tests.support.gateway import GatewayFactory, base_url, raw_request
from tests.support.h2_client import H2Client
from tests.support.metrics_scrape import Counts, metric
from tests.support.upstreams import H2UpstreamServer, UpstreamServer

pytestmark = pytest.mark.socket

REQUESTS = "gatehouse_requests_total"
DURATION_COUNT = "gatehouse_request_duration_seconds_count"
UPSTREAM = "gatehouse_upstream_requests_total"
UPSTREAM_COUNT = "gatehouse_upstream_request_duration_seconds_count"
LOCAL = "gatehouse_local_replies_total"
RETRIES = "gatehouse_upstream_retries_total"


def closed_port() -> int:
    """A port nothing listens on (connections to it are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def config(upstream: UpstreamServer, codec: str = "httptools", extra: str = "") -> str:
    return f"""
listeners: [{{bind: 127.0.0.1:0, name: public}}]
http1_parser: {codec}
upstreams:
  app: {{endpoints: [{upstream.url}]}}
  dead: {{endpoints: [http://127.0.0.1:{closed_port()}], timeouts: {{connect: 2s}}}}
  deadh2: {{endpoints: [http://127.0.0.1:{closed_port()}], protocol: h2c}}
  slow: {{endpoints: [{upstream.url}], timeouts: {{read: 200ms}}}}
middleware:
  stamp: {{type: "tests.support.plugins.stamp:EagerStamp", value: s}}
routes:
  - {{name: api, match: {{path_prefix: /api}}, upstream: app, rewrite: {{strip_prefix: /api}}}}
  - name: eager
    match: {{path_prefix: /eager}}
    upstream: app
    middleware: [stamp]
    rewrite: {{strip_prefix: /eager}}
  - {{name: deadh2, match: {{path_prefix: /deadh2}}, upstream: deadh2}}
  - {{name: dead, match: {{path_prefix: /dead}}, upstream: dead}}
  - name: slow
    match: {{path_prefix: /slow}}
    upstream: slow
    rewrite: {{strip_prefix: /slow}}
{extra}
"""


def fast_starts(server: Server, route: str) -> int:
    """How many requests of `route` `Forwarder.try_start` sent: on an idle pooled
    connection, with no task, answered from the upstream connection's callback."""
    forwarder = server.runtime.routes[route].forwarder
    assert forwarder is not None
    return forwarder.fast_starts


def endpoint_of(upstream: UpstreamServer) -> str:
    return upstream.url.removeprefix("http://")


async def test_http1_requests_are_counted_by_route_method_and_code(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    server = await gateway_factory(config(h1_upstream, codec))
    counts = Counts()

    async with httpx.AsyncClient(base_url=base_url(server), timeout=5) as client:
        first = await client.get("/api/echo/a")  # opens the upstream connection: general
        sent_fast = [fast_starts(server, "api")]
        second = await client.get("/api/echo/b")  # its idle connection: the fast path
        sent_fast.append(fast_starts(server, "api"))
        posted = await client.post("/api/echo", content=b"body")
        purged = await client.request("PURGE", "/api/echo")
        failed = await client.get("/api/status/503")

    assert [r.status_code for r in (first, second, posted, purged, failed)] == [
        *(200, 200, 200, 200, 503)
    ]
    assert sent_fast == [0, 1]  # the second on the idle connection, no task
    assert counts.delta(REQUESTS, route="api", method="GET", code="200") == 2
    assert counts.delta(REQUESTS, route="api", method="POST", code="200") == 1
    assert counts.delta(REQUESTS, route="api", method="other", code="200") == 1
    assert counts.delta(REQUESTS, route="api", method="GET", code="503") == 1
    assert counts.delta(DURATION_COUNT, route="api") == 5
    assert counts.delta("gatehouse_request_duration_seconds_sum", route="api") > 0
    endpoint = {"upstream": "app", "endpoint": endpoint_of(h1_upstream)}
    assert counts.delta(UPSTREAM, **endpoint, code="200") == 4
    assert counts.delta(UPSTREAM, **endpoint, code="503") == 1
    assert counts.delta(UPSTREAM_COUNT, **endpoint) == 5
    assert counts.delta(LOCAL, reason="no_route") == 0


async def test_http2_requests_are_counted_by_route_method_and_code(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    server = await gateway_factory(config(h1_upstream))
    counts = Counts()
    host, port = server.addresses[0]

    async with await H2Client.connect(host, port) as client:
        first = await client.request("/api/echo/a")
        sent_fast = [fast_starts(server, "api")]
        second = await client.request("/api/echo/b")
        sent_fast.append(fast_starts(server, "api"))
        posted = await client.request("/api/echo", method="POST", body=b"body")
        failed = await client.request("/api/status/503")
        missing = await client.request("/nowhere")

    assert [r.status for r in (first, second, posted, failed, missing)] == [
        *(200, 200, 200, 503, 404)
    ]
    assert sent_fast == [0, 1]  # the second on the idle connection, no task
    assert counts.delta(REQUESTS, route="api", method="GET", code="200") == 2
    assert counts.delta(REQUESTS, route="api", method="POST", code="200") == 1
    assert counts.delta(REQUESTS, route="api", method="GET", code="503") == 1
    assert counts.delta(DURATION_COUNT, route="api") == 4
    assert counts.delta(REQUESTS, route="", method="GET", code="404") == 1
    assert counts.delta(LOCAL, reason="no_route") == 1
    assert (
        counts.delta(UPSTREAM, upstream="app", endpoint=endpoint_of(h1_upstream), code="200") == 3
    )


RECEIVED = "gatehouse_request_body_bytes_total"
SENT = "gatehouse_response_body_bytes_total"


async def test_body_bytes_and_protocol_are_counted_on_both_front_ends(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    server = await gateway_factory(config(h1_upstream))
    counts = Counts()
    host, port = server.addresses[0]
    upload = b"u" * 5000

    async with httpx.AsyncClient(base_url=base_url(server), timeout=5) as client:
        h1 = [
            await client.post("/api/sink", content=upload),
            await client.get("/api/bytes/100"),  # whole: written with its head
            await client.get("/api/download/300000"),  # streamed
            await client.head("/api/bytes/100"),  # no content
            await client.get("/api/status/503"),
        ]
    async with await H2Client.connect(host, port) as h2:
        h2_answers = [
            await h2.request("/api/sink", method="POST", body=upload),
            await h2.request("/api/bytes/100"),
            await h2.request("/api/download/300000"),
            await h2.request("/api/bytes/100", method="HEAD"),
            await h2.request("/api/status/503"),
        ]

    assert [r.status_code for r in h1] == [200, 200, 200, 200, 503]
    assert [r.status for r in h2_answers] == [200, 200, 200, 200, 503]
    for protocol, sink_answer in (("http1", len(h1[0].content)), ("h2", len(h2_answers[0].body))):
        assert counts.delta(RECEIVED, route="api", protocol=protocol) == len(upload)
        expected = sink_answer + 100 + 300000 + 0 + len(b"status 503")
        assert counts.delta(SENT, route="api", protocol=protocol) == expected
        assert counts.delta(REQUESTS, route="api", protocol=protocol) == 5
        assert counts.delta(REQUESTS, route="api", code="503", protocol=protocol) == 1
    assert counts.delta(DURATION_COUNT, route="api", code_class="2xx") == 8
    assert counts.delta(DURATION_COUNT, route="api", code_class="5xx") == 2


async def test_attempts_on_an_http2_upstream_are_counted_with_their_codes(
    gateway_factory: GatewayFactory,
) -> None:
    h2_upstream = await H2UpstreamServer(refuse_streams=1).start()
    try:
        server = await gateway_factory(f"""
listeners: [{{bind: 127.0.0.1:0}}]
upstreams: {{grpcish: {{endpoints: [{h2_upstream.url}], protocol: h2c}}}}
routes: [{{name: h2up, match: {{path_prefix: /}}, upstream: grpcish}}]
""")
        counts = Counts()

        async with httpx.AsyncClient(base_url=base_url(server), timeout=5) as client:
            refused_then_ok = await client.get("/echo/a")  # refused unprocessed, retried
            failed = await client.get("/status/503")
            reset = await client.get("/reset")

        assert [r.status_code for r in (refused_then_ok, failed, reset)] == [200, 503, 502]
        endpoint = {"upstream": "grpcish", "endpoint": h2_upstream.url.removeprefix("http://")}
        assert counts.delta(UPSTREAM, **endpoint, code="refused") == 1
        assert counts.delta(UPSTREAM, **endpoint, code="200") == 1
        assert counts.delta(UPSTREAM, **endpoint, code="503") == 1
        assert counts.delta(UPSTREAM, **endpoint, code="reset") == 1
        assert counts.delta(UPSTREAM_COUNT, **endpoint) == 2  # the two responses
        assert counts.delta(REQUESTS, route="h2up", method="GET", code="502") == 1
        assert counts.delta(LOCAL, reason="upstream_reset") == 1
    finally:
        await h2_upstream.stop()


@pytest.mark.parametrize("protocol", ["http1", "h2"])
async def test_eager_middleware_chains_are_counted(
    gateway_factory: GatewayFactory,
    h1_upstream: UpstreamServer,
    protocol: str,
) -> None:
    server = await gateway_factory(config(h1_upstream))
    counts = Counts()

    if protocol == "http1":
        async with httpx.AsyncClient(base_url=base_url(server), timeout=5) as client:
            statuses = [(await client.get(f"/eager/echo/{i}")).status_code for i in range(3)]
    else:
        host, port = server.addresses[0]
        async with await H2Client.connect(host, port) as client:
            statuses = [(await client.request(f"/eager/echo/{i}")).status for i in range(3)]

    assert statuses == [200, 200, 200]
    assert fast_starts(server, "eager") == 2  # the chain ran eagerly into the fast path
    assert counts.delta(REQUESTS, route="eager", method="GET", code="200") == 3
    assert counts.delta(DURATION_COUNT, route="eager") == 3


@pytest.mark.parametrize("protocol", ["http1", "h2"])
async def test_a_request_no_route_matches_is_a_404_with_an_empty_route(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, protocol: str
) -> None:
    server = await gateway_factory(config(h1_upstream))
    counts = Counts()

    if protocol == "http1":
        async with httpx.AsyncClient(base_url=base_url(server), timeout=5) as client:
            status = (await client.delete("/nowhere")).status_code
    else:
        host, port = server.addresses[0]
        async with await H2Client.connect(host, port) as client:
            status = (await client.request("/nowhere", method="DELETE")).status

    assert status == 404
    assert counts.delta(REQUESTS, route="", method="DELETE", code="404") == 1
    assert counts.delta(DURATION_COUNT, route="") == 1
    assert counts.delta(LOCAL, reason="no_route") == 1
    assert (
        counts.delta(UPSTREAM, upstream="app", endpoint=endpoint_of(h1_upstream), code="200") == 0
    )


@pytest.mark.parametrize("protocol", ["http1", "h2"])
async def test_a_dead_upstream_is_a_502_and_a_connect_error(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, protocol: str
) -> None:
    server = await gateway_factory(config(h1_upstream))
    dead = server.runtime.upstreams["dead"].all_pools[0].label
    counts = Counts()

    if protocol == "http1":
        async with httpx.AsyncClient(base_url=base_url(server), timeout=5) as client:
            status = (await client.get("/dead/x")).status_code
    else:
        host, port = server.addresses[0]
        async with await H2Client.connect(host, port) as client:
            status = (await client.request("/dead/x")).status

    assert status == 502
    assert counts.delta(REQUESTS, route="dead", method="GET", code="502") == 1
    assert counts.delta(LOCAL, reason="upstream_connect_failed") == 1
    # The default retries (2 attempts on connect-failure) try the only endpoint twice.
    assert counts.delta(UPSTREAM, upstream="dead", endpoint=dead, code="connect_error") == 2
    assert counts.delta(RETRIES, upstream="dead", reason="connect-failure") == 1
    assert counts.delta(UPSTREAM_COUNT, upstream="dead", endpoint=dead) == 0  # not timed


async def test_a_dead_http2_upstream_is_a_502_and_a_connect_error(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    server = await gateway_factory(config(h1_upstream))
    dead = server.runtime.upstreams["deadh2"].all_pools[0].label
    counts = Counts()

    async with httpx.AsyncClient(base_url=base_url(server), timeout=5) as client:
        status = (await client.get("/deadh2/x")).status_code

    assert status == 502
    assert counts.delta(REQUESTS, route="deadh2", method="GET", code="502") == 1
    assert counts.delta(UPSTREAM, upstream="deadh2", endpoint=dead, code="connect_error") == 2
    assert counts.delta(RETRIES, upstream="deadh2", reason="connect-failure") == 1


async def test_a_silent_upstream_is_a_504_and_a_timeout(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    server = await gateway_factory(config(h1_upstream, codec))
    counts = Counts()

    async with httpx.AsyncClient(base_url=base_url(server), timeout=5) as client:
        response = await client.get("/slow/held")  # never answered; read: 200ms

    assert response.status_code == 504
    assert counts.delta(REQUESTS, route="slow", method="GET", code="504") == 1
    assert counts.delta(LOCAL, reason="upstream_timeout") == 1
    endpoint = endpoint_of(h1_upstream)
    assert counts.delta(UPSTREAM, upstream="slow", endpoint=endpoint, code="timeout") == 1


async def test_a_malformed_request_is_counted_without_a_route_or_method(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    server = await gateway_factory(config(h1_upstream, codec))
    counts = Counts()

    answer = await raw_request(server, b"GET / HTTP/1.1\r\nHost: a\r\nbad header\r\n\r\n")

    assert answer.startswith(b"HTTP/1.1 400")
    assert counts.delta(REQUESTS, route="", method="other", code="400") == 1
    assert counts.delta(LOCAL, reason="bad_request") == 1


@pytest.mark.parametrize("protocol", ["http1", "h2"])
async def test_a_streamed_response_is_counted_once_it_has_ended(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, protocol: str
) -> None:
    server = await gateway_factory(config(h1_upstream))
    counts = Counts()
    size = 3 * 1024 * 1024  # larger than any buffer: streamed through a task

    if protocol == "http1":
        async with httpx.AsyncClient(base_url=base_url(server), timeout=10) as client:
            response = await client.get(f"/api/download/{size}")
            status, received = response.status_code, len(response.content)
    else:
        host, port = server.addresses[0]
        async with await H2Client.connect(host, port) as client:
            result = await client.request(f"/api/download/{size}", timeout_s=10)
            status, received = result.status, len(result.body)

    assert (status, received) == (200, size)
    assert counts.delta(REQUESTS, route="api", method="GET", code="200") == 1
    assert counts.delta(DURATION_COUNT, route="api") == 1


async def test_switched_off_the_data_path_counts_nothing(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    server = await gateway_factory(config(h1_upstream, extra="metrics: {enabled: false}"))
    counts = Counts()

    async with httpx.AsyncClient(base_url=base_url(server), timeout=5) as client:
        statuses = [
            (await client.get("/api/echo/a")).status_code,
            (await client.get("/api/echo/b")).status_code,  # the fast path
            (await client.get("/eager/echo/c")).status_code,
            (await client.get("/nowhere")).status_code,
            (await client.get("/dead/x")).status_code,
        ]
    host, port = server.addresses[0]
    async with await H2Client.connect(host, port) as h2client:
        statuses.append((await h2client.request("/api/echo/d")).status)

    assert statuses == [200, 200, 200, 404, 502, 200]
    for route, code in (("api", "200"), ("eager", "200"), ("", "404"), ("dead", "502")):
        assert counts.delta(REQUESTS, route=route, method="GET", code=code) == 0
        assert counts.delta(DURATION_COUNT, route=route) == 0
    assert counts.delta(LOCAL, reason="no_route") == 0
    assert (
        counts.delta(UPSTREAM, upstream="app", endpoint=endpoint_of(h1_upstream), code="200") == 0
    )
    dead = server.runtime.upstreams["dead"].all_pools[0].label
    assert counts.delta(UPSTREAM, upstream="dead", endpoint=dead, code="connect_error") == 0
    # what is read when scraped is still there
    assert (
        metric("gatehouse_upstream_healthy", upstream="app", endpoint=endpoint_of(h1_upstream)) == 1
    )
