"""Answers the gateway gives without an upstream, through real sockets: a route's
`redirect` (templated Location, made safe from what the client sends) and `respond`
(after the route's middleware), and a plaintext listener's `redirect_https`, which leaves
ACME HTTP-01 challenges to be routed."""

from __future__ import annotations

import httpx
import pytest

from proxy.process.server import Server
from tests.support.gateway import GatewayFactory, H1UpstreamFactory, base_url
from tests.support.h2_client import H2Client
from tests.support.helpers import RawClient
from tests.support.upstreams import UpstreamServer

pytestmark = pytest.mark.socket


def answers_config(upstream_url: str) -> str:
    return rf"""
listeners:
  - bind: 127.0.0.1:0
  - bind: 127.0.0.1:0
    redirect_https: {{port: 8443}}
  - bind: 127.0.0.1:0
    redirect_https: true
path_normalization: {{merge_slashes: false}}
upstreams:
  app:
    endpoints: [{upstream_url}]
middleware:
  key:
    type: api_key
    keys: [{{key: sesame, consumer: ops}}]
routes:
  - name: moved
    match: {{path_prefix: /old/}}
    redirect: {{to: "https://{{host}}{{uri}}", status: 301}}
  - name: renamed
    match: {{path_regex: "/items/(?P<id>[0-9]+)/(?P<rest>.*)"}}
    redirect: {{to: "/v2/items/{{id}}?tail={{rest}}&q={{query}}", status: 308}}
  - name: echo-path
    match: {{host: loop.test}}
    redirect: {{to: "{{uri}}"}}
  - name: braces
    match: {{path: /braces}}
    redirect: {{to: "https://{{{{literal}}}}.example/{{scheme}}/{{port}}"}}
  - name: maintenance
    match: {{path_prefix: /down}}
    respond:
      status: 503
      body: "back soon\n"
      headers: {{Retry-After: "120", Cache-Control: no-store}}
  - name: robots
    match: {{path: /robots.txt}}
    respond: {{body: "User-agent: *\nDisallow: /\n"}}
  - name: health-stub
    match: {{path: /stub}}
    respond: {{status: 204}}
  - name: guarded
    match: {{path: /guarded}}
    middleware: [key]
    respond: {{body: "behind the key\n", headers: {{Content-Type: text/html}}}}
  - name: app
    match: {{path_prefix: /}}
    upstream: app
"""


@pytest.fixture
async def answering(
    gateway_factory: GatewayFactory, h1_upstream_factory: H1UpstreamFactory
) -> tuple[Server, UpstreamServer]:
    upstream = await h1_upstream_factory()
    return await gateway_factory(answers_config(upstream.url)), upstream


def url_of(server: Server, listener: int) -> str:
    host, port = server.addresses[listener]
    return f"http://{host}:{port}"


async def get(
    server: Server, path: str, listener: int = 0, headers: dict[str, str] | None = None
) -> httpx.Response:
    async with httpx.AsyncClient(follow_redirects=False) as client:
        return await client.get(url_of(server, listener) + path, headers=headers)


REDIRECTS = [
    # (path, Host, status, Location)
    ("/old/a/b?x=1&y=2", "shop.example:8080", 301, "https://shop.example/old/a/b?x=1&y=2"),
    ("/old/", "shop.example", 301, "https://shop.example/old/"),
    ("/items/42/spec/sheet?lang=fr", "h", 308, "/v2/items/42?tail=spec/sheet&q=lang=fr"),
    ("/braces", "h:81", 302, "https://{literal}.example/http/81"),
    # What the client sends never makes the Location another host, nor a second header.
    ("//evil.example/x", "loop.test", 302, "/evil.example/x"),
    ("///evil.example", "loop.test", 302, "/evil.example"),
    ("/a%0D%0ASet-Cookie:%20x=1", "loop.test", 302, "/a%0D%0ASet-Cookie:%20x=1"),
    ("/q?next=%0d%0a", "loop.test", 302, "/q?next=%0d%0a"),
]


@pytest.mark.parametrize(("path", "host", "status", "location"), REDIRECTS)
async def test_a_redirect_route_answers_with_its_templated_location(
    answering: tuple[Server, UpstreamServer], path: str, host: str, status: int, location: str
) -> None:
    server, upstream = answering
    async with await RawClient.connect(server.addresses[0]) as client:
        await client.send(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        response = await client.response()
    assert response.status == status
    assert response.header_all("location") == [location]
    assert response.header("set-cookie") is None
    assert response.body == b""
    assert upstream.requests == []


async def test_a_respond_route_answers_itself_and_the_connection_goes_on(
    answering: tuple[Server, UpstreamServer],
) -> None:
    server, upstream = answering
    async with httpx.AsyncClient(base_url=url_of(server, 0)) as client:
        down = await client.post("/down/orders", content=b"x" * 100_000)
        robots = await client.get("/robots.txt")
        head = await client.head("/robots.txt")
        stub = await client.get("/stub")
        proxied = await client.get("/else")
    assert (down.status_code, down.text) == (503, "back soon\n")
    assert down.headers["retry-after"] == "120"
    assert down.headers["cache-control"] == "no-store"
    assert down.headers["content-type"] == "text/plain; charset=utf-8"
    assert robots.status_code == 200
    assert robots.text == "User-agent: *\nDisallow: /\n"
    assert head.status_code == 200
    assert head.headers["content-length"] == str(len(robots.content))
    assert head.content == b""
    assert stub.status_code == 204
    assert stub.content == b""
    assert proxied.status_code == 200
    assert [request.target for request in upstream.requests] == ["/else"]


async def test_a_respond_route_runs_its_middleware_first(
    answering: tuple[Server, UpstreamServer],
) -> None:
    server, upstream = answering
    refused = await get(server, "/guarded")
    allowed = await get(server, "/guarded", headers={"X-API-Key": "sesame"})
    assert refused.status_code == 401
    assert refused.json()["error"] == "unauthorized"
    assert allowed.status_code == 200
    assert allowed.text == "behind the key\n"
    assert allowed.headers["content-type"] == "text/html"
    assert upstream.requests == []


async def test_local_answers_over_http2(answering: tuple[Server, UpstreamServer]) -> None:
    server, upstream = answering
    host, port = server.addresses[0]
    async with await H2Client.connect(host, port) as client:
        moved = await client.request("/old/z?k=v", authority="api.example:9000")
        down = await client.request("/down", method="POST", body=b"payload")
        spoofed = await client.request("//evil.example/", authority="loop.test")
    assert moved.status == 301
    assert moved.header(b"location") == b"https://api.example/old/z?k=v"
    assert (down.status, bytes(down.body)) == (503, b"back soon\n")
    assert spoofed.header(b"location") == b"/evil.example/"
    assert upstream.requests == []


HTTPS_REDIRECTS = [
    # (listener, path, Host, Location)
    (1, "/a/b?x=1", "shop.example", "https://shop.example:8443/a/b?x=1"),
    (1, "/", "shop.example:8080", "https://shop.example:8443/"),
    (1, "/p", "[::1]:8080", "https://[::1]:8443/p"),
    (2, "/c%20d?e", "Shop.Example", "https://Shop.Example/c%20d?e"),
    (2, "/old/x", "shop.example", "https://shop.example/old/x"),  # before any route
]


@pytest.mark.parametrize(("listener", "path", "host", "location"), HTTPS_REDIRECTS)
async def test_a_redirect_https_listener_sends_every_request_to_https(
    answering: tuple[Server, UpstreamServer], listener: int, path: str, host: str, location: str
) -> None:
    server, upstream = answering
    response = await get(server, path, listener, headers={"Host": host})
    assert response.status_code == 308
    assert response.headers["location"] == location
    assert upstream.requests == []


async def test_a_redirect_https_listener_routes_acme_challenges(
    answering: tuple[Server, UpstreamServer],
) -> None:
    server, upstream = answering
    challenge = "/.well-known/acme-challenge/tok-123"
    response = await get(server, challenge, 1, headers={"Host": "shop.example"})
    other = await get(server, "/.well-known/other", 1, headers={"Host": "shop.example"})
    assert response.status_code == 200
    assert [request.target for request in upstream.requests] == [challenge]
    assert other.status_code == 308


async def test_a_redirect_https_listener_needs_a_host(
    answering: tuple[Server, UpstreamServer],
) -> None:
    server, upstream = answering
    async with await RawClient.connect(server.addresses[1]) as client:
        await client.send(b"GET /x HTTP/1.0\r\n\r\n")
        response = await client.response()
    assert response.status == 400
    assert b"invalid_host" in response.body
    assert upstream.requests == []


async def test_other_listeners_still_proxy(answering: tuple[Server, UpstreamServer]) -> None:
    server, upstream = answering
    response = await get(server, "/plain")
    assert response.status_code == 200
    assert base_url(server) == url_of(server, 0)
    assert [request.target for request in upstream.requests] == ["/plain"]
