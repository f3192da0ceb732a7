"""`headers`, `cors` and `body_limit` through real sockets: what the upstream's /echo saw,
what the client got, and what never reached the upstream."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tests.support.gateway import GatewayFactory, base_url, raw_request, simple_config
from tests.support.helpers import parse_response
from tests.support.upstreams import UpstreamServer

pytestmark = pytest.mark.socket

SECTIONS = """
middleware:
  ids: {type: request_id}
  hdrs:
    type: headers
    request:
      remove: [X-Debug]
      set: {X-Env: prod, X-Trace: "rid={request_id} ip={client_ip}"}
      add: {X-Tag: gateway}
    response:
      remove: [X-Kept]
      set: {X-Frame-Options: DENY}
      add: {X-Served-By: "gatehouse/{route}"}
  web:
    type: cors
    allow_origins: [https://app.example.com, "https://*.example.org"]
    allow_methods: [GET, POST, DELETE]
    allow_headers: [Content-Type, X-Token]
    expose_headers: [X-Request-ID]
    allow_credentials: true
    max_age: 1h
  small: {type: body_limit, max: 1KiB}
global_middleware: [ids, hdrs, web, small]
"""


def config(upstream: UpstreamServer, codec: str = "auto") -> str:
    return simple_config(upstream.url, codec, extra=SECTIONS)


def upstream_saw(response: httpx.Response) -> list[tuple[str, str]]:
    """The headers the upstream's /echo received."""
    return [(name, value) for name, value in response.json()["headers"]]


# --- headers ---


async def test_request_headers_reach_the_upstream_changed(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    server = await gateway_factory(config(h1_upstream, codec))
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(
            base_url(server) + "/echo/x",
            headers=[("X-Debug", "1"), ("X-Env", "dev"), ("X-Tag", "client")],
        )
    assert response.status_code == 200
    saw = upstream_saw(response)
    names = [name.lower() for name, _ in saw]
    assert "x-debug" not in names
    assert [v for n, v in saw if n.lower() == "x-env"] == ["prod"]
    assert [v for n, v in saw if n.lower() == "x-tag"] == ["client", "gateway"]
    request_id = response.headers["X-Request-ID"]
    assert dict(saw)["X-Trace"] == f"rid={request_id} ip=127.0.0.1"


async def test_response_headers_reach_the_client_changed(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    server = await gateway_factory(config(h1_upstream, codec))
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(base_url(server) + "/hopheaders")
    assert response.status_code == 200
    assert "X-Kept" not in response.headers  # the upstream's, removed
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["X-Served-By"] == "gatehouse/all"


async def test_error_replies_carry_the_response_headers(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    server = await gateway_factory(config(h1_upstream))
    await h1_upstream.stop()
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(base_url(server) + "/echo/")
    assert response.status_code == 502
    assert response.json()["error"] == "upstream_connect_failed"
    assert response.headers["X-Frame-Options"] == "DENY"


# --- cors ---

PREFLIGHT = {
    "Origin": "https://shop.example.org",
    "Access-Control-Request-Method": "DELETE",
    "Access-Control-Request-Headers": "x-token",
}


async def test_an_allowed_preflight_is_answered_by_the_gateway(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    server = await gateway_factory(config(h1_upstream, codec))
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.options(base_url(server) + "/echo/items/1", headers=PREFLIGHT)
    assert response.status_code == 204
    assert response.content == b""
    headers = response.headers
    assert headers["Access-Control-Allow-Origin"] == "https://shop.example.org"
    assert headers["Access-Control-Allow-Credentials"] == "true"
    assert headers["Access-Control-Allow-Methods"] == "GET, POST, DELETE"
    assert headers["Access-Control-Allow-Headers"] == "Content-Type, X-Token"
    assert headers["Access-Control-Max-Age"] == "3600"
    assert "Origin" in headers["Vary"]
    assert h1_upstream.requests == []  # never forwarded


@pytest.mark.parametrize(
    "change",
    [
        {"Origin": "https://evil.example.com"},
        {"Access-Control-Request-Method": "PUT"},
        {"Access-Control-Request-Headers": "x-token, authorization"},
    ],
)
async def test_a_refused_preflight_is_403_without_allow_headers(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, change: dict[str, str]
) -> None:
    server = await gateway_factory(config(h1_upstream))
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.options(
            base_url(server) + "/echo/items/1", headers={**PREFLIGHT, **change}
        )
    assert response.status_code == 403
    assert response.json()["error"] == "cors_preflight_refused"
    assert not [name for name in response.headers if name.lower().startswith("access-control")]
    assert h1_upstream.requests == []


async def test_actual_requests_from_allowed_origins_get_cors_headers(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    server = await gateway_factory(config(h1_upstream))
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.post(
            base_url(server) + "/echo/items",
            headers={"Origin": "https://app.example.com"},
            content=b"{}",
        )
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    assert response.headers["Access-Control-Expose-Headers"] == "X-Request-ID"
    assert response.headers["Vary"] == "Origin"


async def test_other_origins_still_reach_the_upstream_but_get_no_cors_headers(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    server = await gateway_factory(config(h1_upstream))
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(
            base_url(server) + "/echo/items", headers={"Origin": "https://evil.example.com"}
        )
    assert response.status_code == 200
    assert [r.target for r in h1_upstream.requests] == ["/echo/items"]
    assert "Access-Control-Allow-Origin" not in response.headers
    assert response.headers["Vary"] == "Origin"  # caches keep answers per origin


async def test_preflights_over_http2(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    server = await gateway_factory(config(h1_upstream))
    async with httpx.AsyncClient(http1=False, http2=True, timeout=5) as client:
        allowed = await client.options(base_url(server) + "/echo/", headers=PREFLIGHT)
        refused = await client.options(
            base_url(server) + "/echo/", headers={**PREFLIGHT, "Origin": "https://x.test"}
        )
    assert (allowed.http_version, allowed.status_code, refused.status_code) == (
        "HTTP/2",
        204,
        403,
    )
    assert h1_upstream.requests == []


# --- body_limit ---


async def test_a_declared_body_over_the_limit_is_413_and_never_forwarded(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    server = await gateway_factory(config(h1_upstream, codec))
    async with httpx.AsyncClient(timeout=5) as client:
        over = await client.post(base_url(server) + "/sink", content=b"x" * 1025)
        at_limit = await client.post(base_url(server) + "/sink", content=b"x" * 1024)
    assert over.status_code == 413
    assert over.json()["error"] == "body_too_large"
    assert at_limit.status_code == 200
    assert at_limit.json()["size"] == 1024
    assert [r.body_size for r in h1_upstream.requests] == [1024]


async def test_expect_100_continue_over_the_limit_gets_413_instead_of_100(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    server = await gateway_factory(config(h1_upstream, codec))
    head = (
        b"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\nExpect: 100-continue\r\n\r\n"
    )
    reply = await raw_request(server, head, read_for_s=2.0)
    assert reply.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in reply
    assert parse_response(reply)[0].json()["error"] == "body_too_large"
    assert h1_upstream.requests == []


async def _chunks(count: int, size: int) -> AsyncIterator[bytes]:
    for _ in range(count):
        yield b"y" * size


async def test_a_streamed_body_is_cut_off_with_413_when_it_passes_the_limit(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    server = await gateway_factory(config(h1_upstream, codec))
    async with httpx.AsyncClient(timeout=5) as client:
        under = await client.post(base_url(server) + "/sink", content=_chunks(4, 256))
        over = await client.post(base_url(server) + "/sink", content=_chunks(64, 256))
    assert under.status_code == 200
    assert under.json()["size"] == 1024
    assert over.status_code == 413
    assert over.json()["error"] == "body_too_large"


async def test_body_limit_over_http2(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    server = await gateway_factory(config(h1_upstream))
    async with httpx.AsyncClient(http1=False, http2=True, timeout=5) as client:
        declared = await client.post(base_url(server) + "/sink", content=b"z" * 2000)
        streamed = await client.post(base_url(server) + "/sink", content=_chunks(16, 200))
    assert (declared.status_code, streamed.status_code) == (413, 413)
    assert declared.http_version == "HTTP/2"
