"""Shared pieces of the HTTP/2 attack and limit tests: a gateway with given `http2:` /
`limits:` settings, health checks after an attack, an innocent connection that must come
through it, and the defence counters."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx

from metrics.definitions import REGISTRY
from proxy.process.server import Server
from tests.support.gateway import GatewayFactory, assert_still_serves, base_url, simple_config
from tests.support.h2_client import H2Client
from tests.support.tls import TlsFiles
from tests.support.upstreams import UpstreamServer

TEST_TIMEOUT_S = 15.0
MAX_WINDOW = 2**31 - 1  # RFC 9113 section 6.9.1
# RFC 9113 section 6.5.2: a field's size is its name, its value and 32 bytes.
FIELD_OVERHEAD = 32


async def start_gateway(
    gateway_factory: GatewayFactory,
    upstream: UpstreamServer,
    *,
    http2: str = "",
    limits: str = "",
    listener_tls: TlsFiles | None = None,
) -> Server:
    """A gateway in front of `upstream` with the given `http2:` / `limits:` settings."""
    extra = ""
    if http2:
        extra += f"http2: {{{http2}}}\n"
    if limits:
        extra += f"limits: {{{limits}}}\n"
    config = simple_config(upstream.url, "httptools", extra=extra)
    if listener_tls is not None:
        config = config.replace(
            "  - bind: 127.0.0.1:0",
            "  - bind: 127.0.0.1:0\n"
            f"    tls: {{cert: {listener_tls.cert}, key: {listener_tls.key}}}",
        )
    return await gateway_factory(config)


def address(server: Server) -> tuple[str, int]:
    """The gateway's first listener."""
    host, port = server.addresses[0]
    return host, port


async def assert_healthy(server: Server) -> None:
    """Fresh connections, HTTP/1.1 and h2c, are served 200 (the attack left no damage)."""
    await assert_still_serves(server)
    async with httpx.AsyncClient(http1=False, http2=True, timeout=5) as client:
        response = await client.get(base_url(server) + "/echo/h2-still-serving")
    assert (response.http_version, response.status_code) == ("HTTP/2", 200)
    assert response.json()["target"] == "/echo/h2-still-serving"


@contextlib.asynccontextmanager
async def innocent_connection(server: Server, path: str = "/slow/300") -> AsyncIterator[None]:
    """An h2 connection with an exchange in flight across the attack: the exchange must
    complete and the connection must serve another one afterwards, untouched."""
    async with await H2Client.connect(*address(server)) as client:
        stream_id = client.send_request(path)
        await client.flush()
        yield
        result = client.streams[stream_id]
        await client.wait_for(
            "the innocent exchange", lambda: result.ended or result.reset_code is not None
        )
        assert (result.status, result.reset_code) == (200, None)
        after = await client.request("/echo/innocent-after")
        assert after.status == 200
        assert client.goaway is None


def limit_hits(limit: str) -> float:
    """How often the HTTP/2 defence `limit` fired in this process so far (the counter)."""
    value = REGISTRY.get_sample_value("gatehouse_http2_limit_hits_total", {"limit": limit})
    return value or 0.0


def upstream_saw(upstream: UpstreamServer, prefix: str) -> int:
    """How many requests whose target starts with `prefix` reached the upstream."""
    return sum(1 for request in upstream.requests if request.target.startswith(prefix))
