"""Shared fixtures: real upstream servers, in-process gateways, both loops, both codecs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
import uvloop
from hypothesis import HealthCheck, settings

from metrics.definitions import set_enabled
from proxy.config.load import parse_config
from proxy.process.server import Server
from tests.tls import TlsFiles, make_tls_files
from tests.upstream import UpstreamServer

GatewayFactory = Callable[..., Awaitable[Server]]
UpstreamFactory = Callable[..., Awaitable[UpstreamServer]]

# Hypothesis holds each example to a deadline (200 ms) and its data generation to a pace,
# and fails a test that misses either once as flaky: that is a busy machine's scheduling,
# not the code. pytest-timeout still bounds a hang. (Loaded here, before the test modules
# whose @settings take it as their base.)
settings.register_profile("gatehouse", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("gatehouse")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Socket tests run on both the default loop and uvloop (aiohttp's loop fixture)."""
    if item.get_closest_marker("socket") is not None:
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture(autouse=True)
def _metrics_counting() -> None:
    """Per-request counting is on at the start of every test: a gateway started with
    `metrics: {enabled: false}` turns it off for the process until another starts."""
    set_enabled(True)


@pytest.fixture(params=["httptools", "h11"])
def codec(request: pytest.FixtureRequest) -> str:
    """Each HTTP/1.1 test runs against both codecs."""
    return str(request.param)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A throw-away CA and a certificate for localhost/127.0.0.1 it signed (tests/tls.py)."""
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamServer]:
    """A real HTTP/1.1 upstream on 127.0.0.1 (see tests/upstream.py)."""
    server = await UpstreamServer().start()
    yield server
    await server.stop()


@pytest.fixture
async def upstream_factory() -> AsyncIterator[UpstreamFactory]:
    """Start more upstreams (`await upstream_factory(drop_reused=True)`); all stop at
    teardown."""
    servers: list[UpstreamServer] = []

    async def start(**options: bool) -> UpstreamServer:
        server = await UpstreamServer(**options).start()  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


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


@pytest.fixture
async def gateway_factory() -> AsyncIterator[GatewayFactory]:
    """Start gateways in-process from YAML text; all are drained at teardown."""
    servers: list[Server] = []

    async def start(yaml_text: str) -> Server:
        server = Server(parse_config(yaml_text))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.shutdown(grace_period=1.0)


@pytest.fixture
async def gateway(gateway_factory: GatewayFactory, upstream: UpstreamServer, codec: str) -> Server:
    """A gateway with one catch-all route to `upstream`."""
    return await gateway_factory(simple_config(upstream.url, codec))


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
