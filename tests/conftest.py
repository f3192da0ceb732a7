"""Shared fixtures: real upstream servers, in-process gateways, both loops, both codecs.
What they are built from, and the tests' other support code, is in tests/support/."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import uvloop
from hypothesis import HealthCheck, settings

from metrics.traffic import set_enabled
from proxy.config.load import parse_config
from proxy.process.server import Server
from tests.support.gateway import GatewayFactory, H1UpstreamFactory, simple_config
from tests.support.tls import TlsFiles, make_tls_files
from tests.support.upstreams import UpstreamServer

# Hypothesis holds each example to a deadline (200 ms) and its data generation to a pace,
# and fails a test that misses either once as flaky: that is a busy machine's scheduling,
# not the code. pytest-timeout still bounds a hang. (Loaded here, before the test modules
# whose @settings take it as their base.)
settings.register_profile("gatehouse", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("gatehouse")


LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def pytest_addoption(parser: pytest.Parser) -> None:
    # The test command's second pass, on the pure build for coverage, runs socket tests on
    # uvloop alone: the first pass has run every one on both loops, the loop does not
    # depend on the build, and the second pass would otherwise take a third of CI's time
    # again (CONTRIBUTING.md, Testing).
    parser.addoption(
        "--loops",
        default=",".join(LOOPS),
        help="the event loops socket tests run on, comma-separated (default: all of "
        f"{', '.join(LOOPS)})",
    )


def pytest_configure(config: pytest.Config) -> None:
    names = [name.strip() for name in str(config.getoption("--loops")).split(",")]
    unknown = [name for name in names if name not in LOOPS]
    if unknown or not names:
        raise pytest.UsageError(f"--loops: {unknown} not among {list(LOOPS)}")
    config.stash[SOCKET_LOOPS] = {name: LOOPS[name] for name in names}


SOCKET_LOOPS = pytest.StashKey[dict[str, Callable[[], asyncio.AbstractEventLoop]]]()


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Socket tests run on both the default loop and uvloop (aiohttp's loop fixture), or on
    those `--loops` names."""
    if item.get_closest_marker("socket") is not None:
        return config.stash[SOCKET_LOOPS]
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
    """A throw-away CA and a certificate for localhost/127.0.0.1 it signed
    (tests/support/tls.py)."""
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture
async def h1_upstream() -> AsyncIterator[UpstreamServer]:
    """A real HTTP/1.1 upstream on 127.0.0.1 (tests/support/upstreams/h1.py). Not the
    testing kit's `upstream` fixture (proxy/testing/plugin.py), a factory of scripted
    upstreams, which tests here may use as its users do."""
    server = await UpstreamServer().start()
    yield server
    await server.stop()


@pytest.fixture
async def h1_upstream_factory() -> AsyncIterator[H1UpstreamFactory]:
    """Start more upstreams (`await h1_upstream_factory(drop_reused=True)`); all stop at
    teardown."""
    servers: list[UpstreamServer] = []

    async def start(**options: bool) -> UpstreamServer:
        server = await UpstreamServer(**options).start()  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


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
async def gateway(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> Server:
    """A gateway with one catch-all route to `h1_upstream`."""
    return await gateway_factory(simple_config(h1_upstream.url, codec))
