"""Routing to two upstreams through real sockets, 404 replies, and path/host rewrites."""

from __future__ import annotations

import uuid

import httpx
import pytest

from proxy.process.server import Server
from tests.support.gateway import GatewayFactory, H1UpstreamFactory, base_url
from tests.support.helpers import RawClient
from tests.support.upstreams import UpstreamServer

pytestmark = pytest.mark.socket


def two_upstream_config(url_a: str, url_b: str, codec: str, routes: str) -> str:
    return f"""
listeners:
  - bind: 127.0.0.1:0
http1_parser: {codec}
upstreams:
  a:
    endpoints: [{url_a}]
  b:
    endpoints: [{url_b}]
routes:
{routes}
"""


ROUTES = r"""
  - name: exact-host
    match: {host: api.example.com}
    upstream: b
  - name: wildcard-host
    match: {host: "*.example.org", path_prefix: /w}
    upstream: b
  - name: exact-path
    match: {path: /exact}
    upstream: b
  - name: prefix
    match: {path_prefix: /pre/}
    upstream: b
  - name: regex
    match: {path_regex: "/items/(?P<id>[0-9]+)"}
    upstream: b
  - name: post-only
    match: {path_prefix: /m, methods: [POST, PUT]}
    upstream: b
  - name: header
    match:
      path_prefix: /h
      headers: {X-Env: canary}
    upstream: b
  - name: header-regex
    match:
      path_prefix: /hr
      headers: {X-Version: {regex: "v[2-9]"}}
    upstream: b
  - name: query
    match:
      path_prefix: /q
      query: {v: "2"}
    upstream: b
  - name: default
    match: {path_prefix: /}
    upstream: a
"""


@pytest.fixture
async def routed(
    gateway_factory: GatewayFactory, h1_upstream_factory: H1UpstreamFactory, codec: str
) -> tuple[Server, UpstreamServer, UpstreamServer]:
    a = await h1_upstream_factory()
    b = await h1_upstream_factory()
    server = await gateway_factory(two_upstream_config(a.url, b.url, codec, ROUTES))
    return server, a, b


CASES = [
    # (method, path, headers, expected upstream)
    ("GET", "/anything", {"Host": "api.example.com"}, "b"),
    ("GET", "/anything", {"Host": "API.Example.COM:8080"}, "b"),
    ("GET", "/anything", {"Host": "other.example.com"}, "a"),
    ("GET", "/w/x", {"Host": "eu.example.org"}, "b"),
    ("GET", "/w/x", {"Host": "a.b.example.org"}, "b"),
    ("GET", "/w/x", {"Host": "example.org"}, "a"),
    ("GET", "/x", {"Host": "eu.example.org"}, "a"),
    ("GET", "/exact", {}, "b"),
    ("GET", "/exact/", {}, "a"),
    ("GET", "/exactly", {}, "a"),
    ("GET", "/exact?query=1", {}, "b"),
    ("GET", "/pre/", {}, "b"),
    ("GET", "/pre/deep/path", {}, "b"),
    ("GET", "/pre", {}, "a"),
    ("GET", "/items/42", {}, "b"),
    ("GET", "/items/42/more", {}, "a"),
    ("GET", "/items/abc", {}, "a"),
    ("POST", "/m/x", {}, "b"),
    ("PUT", "/m/x", {}, "b"),
    ("GET", "/m/x", {}, "a"),
    ("GET", "/h/x", {"X-Env": "canary"}, "b"),
    ("GET", "/h/x", {"x-env": "canary"}, "b"),
    ("GET", "/h/x", {"X-Env": "prod"}, "a"),
    ("GET", "/h/x", {}, "a"),
    ("GET", "/hr/x", {"X-Version": "v3"}, "b"),
    ("GET", "/hr/x", {"X-Version": "v1"}, "a"),
    ("GET", "/hr/x", {"X-Version": "v33"}, "a"),
    ("GET", "/q/x?v=2", {}, "b"),
    ("GET", "/q/x?a=1&v=2", {}, "b"),
    ("GET", "/q/x?v=3", {}, "a"),
    ("GET", "/q/x", {}, "a"),
]


@pytest.mark.parametrize(("method", "path", "headers", "expected"), CASES)
async def test_request_is_routed_to_the_matching_upstream(
    routed: tuple[Server, UpstreamServer, UpstreamServer],
    method: str,
    path: str,
    headers: dict[str, str],
    expected: str,
) -> None:
    server, a, b = routed
    async with httpx.AsyncClient() as client:
        response = await client.request(method, base_url(server) + path, headers=headers)
    assert response.status_code == 200
    got = {"a": len(a.requests), "b": len(b.requests)}
    assert got == {"a": int(expected == "a"), "b": int(expected == "b")}
    seen = (a if expected == "a" else b).requests[0]
    assert seen.method == method
    assert seen.target == path


async def test_requests_on_one_connection_are_routed_independently(
    routed: tuple[Server, UpstreamServer, UpstreamServer],
) -> None:
    server, a, b = routed
    async with httpx.AsyncClient() as client:
        for path in ["/exact", "/x", "/pre/1", "/y", "/items/7"]:
            assert (await client.get(base_url(server) + path)).status_code == 200
    assert [r.target for r in a.requests] == ["/x", "/y"]
    assert [r.target for r in b.requests] == ["/exact", "/pre/1", "/items/7"]


async def test_no_route_gives_404_json_with_request_id(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    routes = "  - match: {path_prefix: /api/}\n    upstream: a\n"
    server = await gateway_factory(
        two_upstream_config(h1_upstream.url, h1_upstream.url, codec, routes)
    )
    async with httpx.AsyncClient() as client:
        response = await client.get(base_url(server) + "/nowhere")
        given = await client.get(base_url(server) + "/nowhere", headers={"X-Request-ID": "abc-1"})
        ok = await client.get(base_url(server) + "/api/x")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    payload = response.json()
    assert payload["error"] == "no_route"
    assert payload["request_id"]
    assert response.headers["x-request-id"] == payload["request_id"]
    assert given.status_code == 404
    assert given.json()["request_id"] == "abc-1"
    assert ok.status_code == 200
    assert [r.target for r in h1_upstream.requests] == ["/api/x"]


async def test_no_route_request_ids_are_unique(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    routes = "  - match: {path: /only}\n    upstream: a\n"
    server = await gateway_factory(
        two_upstream_config(h1_upstream.url, h1_upstream.url, codec, routes)
    )
    async with httpx.AsyncClient() as client:
        ids = {
            (await client.get(base_url(server) + f"/x{i}")).json()["request_id"] for i in range(5)
        }
    assert len(ids) == 5


async def test_no_route_for_method_gives_404(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    routes = "  - match: {path_prefix: /, methods: [GET]}\n    upstream: a\n"
    server = await gateway_factory(
        two_upstream_config(h1_upstream.url, h1_upstream.url, codec, routes)
    )
    async with httpx.AsyncClient() as client:
        response = await client.delete(base_url(server) + "/x")
    assert response.status_code == 404
    assert response.json()["error"] == "no_route"
    assert h1_upstream.requests == []


REWRITE_ROUTES = r"""
  - name: strip
    match: {path_prefix: /api}
    rewrite: {strip_prefix: /api}
    upstream: a
  - name: add
    match: {path_prefix: /things}
    rewrite: {add_prefix: /v2}
    upstream: a
  - name: strip-add
    match: {path_prefix: /old/}
    rewrite: {strip_prefix: /old, add_prefix: /new}
    upstream: a
  - name: regex
    match: {path_regex: "/users/(?P<id>[0-9]+)/profile"}
    rewrite: {regex: "^/users/([0-9]+)/profile$", replacement: "/profiles/\\1"}
    upstream: a
  - name: host
    match: {path_prefix: /hosted}
    rewrite: {host: internal.svc:9000}
    upstream: a
  - name: plain
    match: {path_prefix: /}
    upstream: a
"""


@pytest.fixture
async def rewriting(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> Server:
    return await gateway_factory(
        two_upstream_config(h1_upstream.url, h1_upstream.url, codec, REWRITE_ROUTES)
    )


@pytest.mark.parametrize(
    ("sent", "forwarded"),
    [
        ("/api/users", "/users"),
        ("/api/users?x=1&y=%20z", "/users?x=1&y=%20z"),
        ("/api", "/"),
        ("/api?x=1", "/?x=1"),
        ("/api/", "/"),
        ("/apiary", "/apiary"),  # prefix route matches, but strip only a whole segment
        ("/things", "/v2/things"),
        ("/things/1?q=a", "/v2/things/1?q=a"),
        ("/old/a/b", "/new/a/b"),
        ("/users/42/profile", "/profiles/42"),
        ("/users/42/profile?full=1", "/profiles/42?full=1"),
        ("/plain/%3f/x?k=v", "/plain/%3F/x?k=v"),  # canonical: only the hex changes
        ("/old/%61/./b", "/new/a/b"),  # the rewrite sees the canonical path
    ],
)
async def test_rewrite_changes_forwarded_target(
    rewriting: Server, h1_upstream: UpstreamServer, sent: str, forwarded: str
) -> None:
    async with await RawClient.connect(rewriting.addresses[0]) as client:
        await client.send(f"GET {sent} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        response = await client.response()
    assert response.status == 200
    assert h1_upstream.requests[0].target == forwarded


async def test_rewrite_host_replaces_host_header(
    rewriting: Server, h1_upstream: UpstreamServer
) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.get(
            base_url(rewriting) + "/hosted/x", headers={"Host": "public.example.com"}
        )
    assert response.status_code == 200
    seen = h1_upstream.requests[0]
    assert seen.header("host") == "internal.svc:9000"
    assert len([k for k, _ in seen.headers if k.lower() == "host"]) == 1
    # The client's host is still reported to the upstream.
    assert seen.header("x-forwarded-host") == "public.example.com"
    assert seen.target == "/hosted/x"


async def test_route_without_host_rewrite_preserves_host(
    rewriting: Server, h1_upstream: UpstreamServer
) -> None:
    async with httpx.AsyncClient() as client:
        await client.get(base_url(rewriting) + "/api/x", headers={"Host": "public.example.com"})
    assert h1_upstream.requests[0].header("host") == "public.example.com"


async def test_rewrite_keeps_request_body_and_method(
    rewriting: Server, h1_upstream: UpstreamServer
) -> None:
    body = uuid.uuid4().hex.encode()
    async with httpx.AsyncClient() as client:
        response = await client.post(base_url(rewriting) + "/api/echo?z=1", content=body)
    assert response.json()["body"] == body.decode()
    assert h1_upstream.requests[0].method == "POST"
    assert h1_upstream.requests[0].target == "/echo?z=1"
