"""Request headers through real sockets: hop-by-hop fields removed, forwarding headers
added (or appended to, from a trusted proxy), Host kept, and the target the upstream gets
(canonical, or the client's bytes on a forward_raw_path route)."""

from __future__ import annotations

import httpx
import pytest

from proxy.process.server import Server
from tests.support.gateway import GatewayFactory, base_url, simple_config
from tests.support.helpers import RawClient
from tests.support.upstreams import UpstreamServer

pytestmark = pytest.mark.socket


async def test_hop_by_hop_headers_do_not_reach_upstream(
    gateway: Server, h1_upstream: UpstreamServer
) -> None:
    async with await RawClient.connect(gateway.addresses[0]) as client:
        await client.send(
            b"GET /echo/hop HTTP/1.1\r\nHost: t\r\n"
            b"Connection: keep-alive, X-Private-Hop, x-other-hop\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"TE: gzip\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"X-Private-Hop: secret\r\n"
            b"X-Other-Hop: secret2\r\n"
            b"X-End-To-End: kept\r\n\r\n"
        )
        response = await client.response()
    assert response.status == 200
    names = {name.lower() for name, _ in h1_upstream.requests[0].headers}
    for hop in ("connection", "keep-alive", "te", "proxy-connection"):
        assert hop not in names
    assert "x-private-hop" not in names
    assert "x-other-hop" not in names
    assert h1_upstream.requests[0].header("x-end-to-end") == "kept"


async def test_upgrade_header_does_not_reach_upstream(
    gateway: Server, h1_upstream: UpstreamServer
) -> None:
    async with await RawClient.connect(gateway.addresses[0]) as client:
        await client.send(b"GET /echo/up HTTP/1.1\r\nHost: t\r\nUpgrade: foo/2\r\n\r\n")
        response = await client.response()
    assert response.status == 200
    assert h1_upstream.requests[0].header("upgrade") is None


async def test_te_trailers_is_forwarded(gateway: Server, h1_upstream: UpstreamServer) -> None:
    async with await RawClient.connect(gateway.addresses[0]) as client:
        await client.send(b"GET /echo/te HTTP/1.1\r\nHost: t\r\nTE: trailers\r\n\r\n")
        await client.response()
    assert h1_upstream.requests[0].header("te") == "trailers"


async def test_forwarding_headers_are_added(gateway: Server, h1_upstream: UpstreamServer) -> None:
    async with await RawClient.connect(gateway.addresses[0]) as client:
        await client.send(b"GET /echo/fwd HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
        await client.response()
    seen = h1_upstream.requests[0]
    assert seen.header("x-forwarded-for") == "127.0.0.1"
    assert seen.header("x-forwarded-proto") == "http"
    assert seen.header("x-forwarded-host") == "api.example.com"
    assert seen.header("via") == "1.1 gatehouse"


SPOOFED_FORWARDING = (
    b"X-Forwarded-For: 203.0.113.7, 10.0.0.1\r\n"
    b"X-Forwarded-Proto: https\r\n"
    b"X-Forwarded-Host: public.example.com\r\n"
    b"Forwarded: for=203.0.113.7;proto=https\r\n"
    b"X-Real-IP: 203.0.113.7\r\n"
    b"Via: 1.1 edge\r\n"
)


async def test_a_client_s_forwarding_headers_are_replaced(
    gateway: Server, h1_upstream: UpstreamServer
) -> None:
    async with await RawClient.connect(gateway.addresses[0]) as client:
        await client.send(
            b"GET /echo/fwd HTTP/1.1\r\nHost: api.example.com\r\n" + SPOOFED_FORWARDING + b"\r\n"
        )
        await client.response()
    seen = h1_upstream.requests[0]
    assert seen.header("x-forwarded-for") == "127.0.0.1"
    assert seen.header("x-forwarded-proto") == "http"
    assert seen.header("x-forwarded-host") == "api.example.com"
    assert seen.header("forwarded") is None
    assert seen.header("x-real-ip") is None
    assert seen.header("via") == "1.1 edge, 1.1 gatehouse"
    for name in ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "via"):
        assert len([k for k, _ in seen.headers if k.lower() == name]) == 1


async def test_forwarding_headers_from_a_trusted_proxy_are_appended_to(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    extra = "client_ip: {trusted_proxies: [127.0.0.1]}"
    server = await gateway_factory(simple_config(h1_upstream.url, codec, extra=extra))
    async with await RawClient.connect(server.addresses[0]) as client:
        await client.send(
            b"GET /echo/fwd HTTP/1.1\r\nHost: api.example.com\r\n" + SPOOFED_FORWARDING + b"\r\n"
        )
        await client.response()
    seen = h1_upstream.requests[0]
    assert seen.header("x-forwarded-for") == "203.0.113.7, 10.0.0.1, 127.0.0.1"
    assert seen.header("x-forwarded-proto") == "https, http"
    assert seen.header("x-forwarded-host") == "public.example.com, api.example.com"
    assert seen.header("forwarded") == (
        "for=203.0.113.7;proto=https, for=127.0.0.1;host=api.example.com;proto=http"
    )
    assert seen.header("x-real-ip") == "203.0.113.7"
    assert seen.header("via") == "1.1 edge, 1.1 gatehouse"
    for name in ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "via", "forwarded"):
        assert len([k for k, _ in seen.headers if k.lower() == name]) == 1


async def test_host_header_is_preserved(gateway: Server, h1_upstream: UpstreamServer) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.get(
            base_url(gateway) + "/echo/host", headers={"Host": "Api.Example.com:8443"}
        )
    assert response.status_code == 200
    assert h1_upstream.requests[0].header("host") == "Api.Example.com:8443"
    assert len([k for k, _ in h1_upstream.requests[0].headers if k.lower() == "host"]) == 1


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        (b"/a/%2e%2E/c?x=%20&y", b"/c?x=%20&y"),
        (b"/echo//double//slash/./dot", b"/echo/double/slash/dot"),
        (b"/echo?q=a+b&q=%E2%82%AC&empty=&flag", b"/echo?q=a+b&q=%E2%82%AC&empty=&flag"),
        (b"/echo/%7euser/%41%2f%e2%82?", None),  # an escaped slash: refused by default
        (b"/echo/%7euser/%41%e2%82?", b"/echo/~user/A%E2%82?"),
        (b"/echo/;params;x=1?a=b#frag", b"/echo/;params;x=1?a=b"),
        (b"http://other.test/echo/%61?q", b"/echo/a?q"),
    ],
)
async def test_the_canonical_target_reaches_the_upstream(
    gateway: Server, h1_upstream: UpstreamServer, target: bytes, forwarded: bytes | None
) -> None:
    async with await RawClient.connect(gateway.addresses[0]) as client:
        await client.send(b"GET " + target + b" HTTP/1.1\r\nHost: t\r\n\r\n")
        response = await client.response()
    if forwarded is None:
        assert response.status == 400
        assert h1_upstream.requests == []
        return
    assert response.status == 200
    assert h1_upstream.requests[0].target.encode() == forwarded


@pytest.mark.parametrize(
    "target",
    [
        b"/a%2Fb/../c?x=%20&y",
        b"/echo//double//slash/./dot",
        b"/echo?q=a+b&q=%E2%82%AC&empty=&flag",
        b"/echo/%7Euser/%41?",
        b"/echo/;params;x=1?a=b",
    ],
)
async def test_a_route_with_forward_raw_path_forwards_the_target_byte_for_byte(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str, target: bytes
) -> None:
    gateway = await gateway_factory(
        simple_config(
            h1_upstream.url,
            codec,
            route="    forward_raw_path: true",
            extra="path_normalization: {escaped_slashes: keep}",
        )
    )
    async with await RawClient.connect(gateway.addresses[0]) as client:
        await client.send(b"GET " + target + b" HTTP/1.1\r\nHost: t\r\n\r\n")
        response = await client.response()
    assert response.status == 200
    assert h1_upstream.requests[0].target.encode() == target
