"""Shared by the error tests through real sockets: start a gateway, send one request, and
check the JSON local reply (docs/errors.md) that comes back."""

from __future__ import annotations

import time

from proxy.process.server import Server
from tests.support.gateway import GatewayFactory, simple_config
from tests.support.helpers import RawClient, RawResponse


def assert_local_reply(response: RawResponse, status: int, error: str) -> None:
    assert response.status == status, response
    assert response.header("content-type") == "application/json"
    payload = response.json()
    assert payload["error"] == error
    assert payload["request_id"]


async def start(
    gateway_factory: GatewayFactory,
    upstream_url: str,
    codec: str,
    *,
    extra: str = "",
    route: str = "",
) -> Server:
    return await gateway_factory(simple_config(upstream_url, codec, extra=extra, route=route))


def upstream_config(upstream_url: str, codec: str, option: str) -> str:
    """simple_config with one more key for its upstream, e.g. `timeouts: {read: 200ms}`."""
    return simple_config(upstream_url, codec).replace(
        f"endpoints: [{upstream_url}]", f"endpoints: [{upstream_url}]\n    {option}"
    )


async def send_once(server: Server, data: bytes, *, wait_s: float = 10.0) -> RawResponse:
    """Send `data` on a new connection and read one response."""
    async with await RawClient.connect(server.addresses[0]) as client:
        await client.send(data)
        return await client.response(wait_s=wait_s)


async def refused(
    server: Server, data: bytes, status: int, error: str, *, wait_s: float = 10.0
) -> tuple[RawResponse, float]:
    """Send `data` on a new connection: it gets this local reply, then the gateway closes.
    Returns the reply and the seconds from connecting (before any timer of the gateway's
    for the connection starts) to the reply."""
    started = time.monotonic()
    async with await RawClient.connect(server.addresses[0]) as client:
        await client.send(data)
        response = await client.response(wait_s=wait_s)
        elapsed = time.monotonic() - started
        assert_local_reply(response, status, error)
        assert await client.closed()
    return response, elapsed


async def assert_serves_next(client: RawClient) -> None:
    """The connection lives on: a next request on it is served."""
    await client.send(b"GET /echo/next HTTP/1.1\r\nHost: t\r\n\r\n")
    assert (await client.response()).status == 200
