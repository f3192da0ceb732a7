"""In-process gateways for the tests (the `gateway_factory` fixture of tests/conftest.py
starts them): a one-upstream routes.yaml, the base URL of a listener, raw bytes sent to
one, the check that a gateway still serves, and the pool of its upstream."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable

import httpx

from proxy.process.server import Server
from proxy.upstream.pool import UpstreamPool
from tests.support.upstreams import UpstreamServer

GatewayFactory = Callable[..., Awaitable[Server]]
H1UpstreamFactory = Callable[..., Awaitable[UpstreamServer]]


def simple_config(
    upstream_url: str, codec: str, *, extra: str = "", route: str = "", upstream: str = ""
) -> str:
    """A one-upstream routes.yaml; `upstream` adds keys to the upstream `app`, `route` to
    the catch-all route, `extra` adds top-level sections."""
    return f"""
listeners:
  - bind: 127.0.0.1:0
http1_parser: {codec}
upstreams:
  app:
    endpoints: [{upstream_url}]
{upstream}
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


def pool_of(server: Server) -> UpstreamPool:
    """The pool of the first endpoint of the upstream `app` (simple_config's)."""
    return server.runtime.upstreams["app"].pools[0]


def pool_counts(pool: UpstreamPool) -> tuple[int, int]:
    """(active, idle) as the pool's repr shows them."""
    match = re.search(r"active=(-?\d+) idle=(\d+)", repr(pool))
    assert match is not None, repr(pool)
    return int(match.group(1)), int(match.group(2))
