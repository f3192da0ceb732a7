"""In-process gateways for the tests (the `gateway_factory` fixture of tests/conftest.py
starts them): a one-upstream routes.yaml, the base URL of a listener, raw bytes sent to
one, and the check that a gateway still serves."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httpx

from proxy.process.server import Server
from tests.support.upstreams import UpstreamServer

GatewayFactory = Callable[..., Awaitable[Server]]
H1UpstreamFactory = Callable[..., Awaitable[UpstreamServer]]


def simple_config(upstream_url: str, codec: str, *, extra: str = "", route: str = "") -> str:
    """A one-upstream routes.yaml; `route` adds keys to the catch-all route, `extra`
    adds top-level sections."""
    return f"""
listeners:
  - bind: 127.0.0.1:0
http1_parser: {codec}
upstreams:
  app:
    endpoints: [{upstream_url}]
routes:
  - name: all
    match: {{path_prefix: /}}
    upstream: app
{route}
{extra}
"""


def base_url(server: Server) -> str:
    """http://127.0.0.1:PORT of the server's first listener."""
    host, port = server.addresses[0]
    return f"http://{host}:{port}"


async def raw_request(
    server: Server, data: bytes, *, read_for_s: float = 3.0, half_close: bool = False
) -> bytes:
    """Send raw bytes and read until the gateway closes (or `read_for_s` passes)."""
    host, port = server.addresses[0]
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(data)
    await writer.drain()
    if half_close:
        writer.write_eof()
    received = bytearray()
    try:
        async with asyncio.timeout(read_for_s):
            while chunk := await reader.read(65536):
                received += chunk
    except TimeoutError:
        pass
    except ConnectionResetError:
        pass
    finally:
        writer.close()
    return bytes(received)


async def assert_still_serves(server: Server) -> None:
    """A fresh client gets a normal proxied answer (the gateway survived what came before)."""
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(base_url(server) + "/echo/still-serving")
    assert response.status_code == 200, response.text
    assert response.json()["target"] == "/echo/still-serving"
