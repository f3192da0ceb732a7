"""ip_filter through real sockets: the test client is 127.0.0.1, so other addresses come
in through `client_ip.trusted_proxies` and X-Forwarded-For, as they would behind a load
balancer."""

from __future__ import annotations

import httpx
import pytest

from proxy.process.server import Server
from tests.support.gateway import GatewayFactory, base_url, simple_config
from tests.support.upstreams import UpstreamServer

pytestmark = pytest.mark.socket


async def start(
    gateway_factory: GatewayFactory, upstream: UpstreamServer, options: str, extra: str = ""
) -> Server:
    """A gateway whose catch-all route runs one ip_filter with `options`."""
    route = f"    middleware: [{{type: ip_filter, {options}}}]"
    return await gateway_factory(simple_config(upstream.url, "httptools", route=route, extra=extra))


async def get(server: Server, forwarded_for: str | None = None) -> httpx.Response:
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for is not None else {}
    async with httpx.AsyncClient(timeout=5) as client:
        return await client.get(base_url(server) + "/echo/x", headers=headers)


def assert_forbidden(response: httpx.Response) -> None:
    assert response.status_code == 403, response.text
    payload = response.json()
    assert payload["error"] == "ip_forbidden"
    assert payload["request_id"]


async def test_an_allowed_client_reaches_the_upstream(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    server = await start(gateway_factory, h1_upstream, "allow: [127.0.0.0/8, '::1']")
    response = await get(server)
    assert response.status_code == 200
    assert response.json()["target"] == "/echo/x"


async def test_a_client_outside_the_allow_list_gets_403_and_nothing_goes_upstream(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    server = await start(gateway_factory, h1_upstream, "allow: [10.0.0.0/8]")
    assert_forbidden(await get(server))
    assert h1_upstream.requests == []


async def test_deny_list_and_deny_winning_over_allow(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    denied = await start(gateway_factory, h1_upstream, "deny: [127.0.0.1]")
    assert_forbidden(await get(denied))
    other = await start(gateway_factory, h1_upstream, "deny: [10.0.0.0/8]")
    assert (await get(other)).status_code == 200
    both = await start(gateway_factory, h1_upstream, "allow: [127.0.0.0/8], deny: [127.0.0.1/32]")
    assert_forbidden(await get(both))


async def test_a_spoofed_xff_is_ignored_without_trusted_proxies(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    server = await start(gateway_factory, h1_upstream, "allow: [198.51.100.0/24]")
    assert_forbidden(await get(server, "198.51.100.9"))
    denying = await start(gateway_factory, h1_upstream, "deny: [127.0.0.1]")
    assert_forbidden(await get(denying, "198.51.100.9"))


async def test_behind_a_trusted_proxy_the_rightmost_untrusted_entry_decides(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    server = await start(
        gateway_factory,
        h1_upstream,
        "allow: [198.51.100.0/24]",
        "client_ip: {trusted_proxies: [127.0.0.1, 10.0.0.0/8]}",
    )
    allowed = await get(server, "198.51.100.9")
    assert allowed.status_code == 200
    # The upstream still gets the whole chain, with this hop appended.
    headers = dict((k.lower(), v) for k, v in allowed.json()["headers"])
    assert headers["x-forwarded-for"] == "198.51.100.9, 127.0.0.1"
    # A client that writes an allowed address first is found by its proxy's entry.
    assert_forbidden(await get(server, "198.51.100.9, 203.0.113.5"))
    # A trusted inner proxy (10.x) is skipped; a spoofed leftmost entry does not matter.
    assert (await get(server, "203.0.113.5, 198.51.100.7, 10.1.1.1")).status_code == 200
    # Something that is not an address, forwarded by a trusted proxy: unknown, refused.
    assert_forbidden(await get(server, "unknown"))


async def test_a_named_filter_as_global_middleware(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    extra = """
client_ip: {trusted_proxies: [127.0.0.1]}
middleware:
  office: {type: ip_filter, allow: [192.168.0.0/16]}
global_middleware: [office]
"""
    server = await gateway_factory(simple_config(h1_upstream.url, "httptools", extra=extra))
    assert (await get(server, "192.168.7.7")).status_code == 200
    assert_forbidden(await get(server, "192.169.0.1"))
    assert_forbidden(await get(server))  # the proxy itself is not in the office
