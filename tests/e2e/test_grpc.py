"""gRPC through the gateway: a real grpcio client and server (tests/support/grpc_service.py), the
gateway between them speaking HTTP/2 on both sides (h2c with prior knowledge towards the
client and towards the upstream, `protocol: h2c`).

Each check also runs against the server directly in tests/test_grpc_service.py, so a
failure here is the gateway's: every call kind, statuses in trailers and trailers-only
responses, metadata both ways (the grpc core server refuses a request whose `te: trailers`
was dropped), many calls multiplexed on one connection, and a stream that outlives the
upstream read timeout (idle timeouts, no total deadline)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from proxy.config.load import parse_config
from proxy.process.server import Server
from tests.support import grpc_service
from tests.support.gateway import GatewayFactory
from tests.support.grpc_service import EchoClient, echo_client, echo_server
from tests.support.tls import TlsFiles

pytestmark = pytest.mark.socket

CALL_BUDGET_S = 20.0
READ_TIMEOUT = "1s"  # the long stream below lasts 3 s: only an idle timeout lets it through

Check = Callable[[EchoClient], Awaitable[None]]


def grpc_gateway_config(upstream_port: int, listener: str = "{bind: 127.0.0.1:0}") -> str:
    """A gateway whose catch-all route goes to the gRPC server on `upstream_port` (h2c)."""
    return f"""
listeners: [{listener}]
upstreams:
  grpc:
    endpoints: [http://127.0.0.1:{upstream_port}]
    protocol: h2c
    timeouts: {{connect: 2s, read: {READ_TIMEOUT}}}
routes:
  - name: grpc
    match: {{path_prefix: /}}
    upstream: grpc
"""


def gateway_target(server: Server) -> str:
    """`127.0.0.1:PORT` of the gateway's first listener, as a gRPC target."""
    host, port = server.addresses[0]
    return f"{host}:{port}"


@pytest.fixture
async def upstream_port() -> AsyncIterator[int]:
    """The port of a fresh gRPC echo server (h2c)."""
    async with echo_server() as port:
        yield port


@pytest.fixture
async def through_gateway(
    gateway_factory: GatewayFactory, upstream_port: int
) -> AsyncIterator[EchoClient]:
    """An EchoClient whose one channel reaches the echo server through the gateway."""
    gateway = await gateway_factory(grpc_gateway_config(upstream_port))
    async with echo_client(gateway_target(gateway)) as client:
        yield client


@pytest.mark.parametrize(
    "check",
    [
        grpc_service.check_unary,
        grpc_service.check_server_stream,
        grpc_service.check_client_stream,
        grpc_service.check_bidi,
    ],
    ids=lambda check: check.__name__.removeprefix("check_"),
)
async def test_every_call_kind_passes_through_the_gateway(
    through_gateway: EchoClient, check: Check
) -> None:
    async with asyncio.timeout(CALL_BUDGET_S):
        await check(through_gateway)


async def test_a_status_in_trailers_reaches_the_client(through_gateway: EchoClient) -> None:
    async with asyncio.timeout(CALL_BUDGET_S):
        await grpc_service.check_error_in_trailers(through_gateway)


async def test_a_trailers_only_response_reaches_the_client(through_gateway: EchoClient) -> None:
    async with asyncio.timeout(CALL_BUDGET_S):
        await grpc_service.check_trailers_only(through_gateway)


async def test_metadata_passes_both_ways(through_gateway: EchoClient) -> None:
    async with asyncio.timeout(CALL_BUDGET_S):
        await grpc_service.check_metadata(through_gateway)


async def test_many_concurrent_calls_share_one_channel(through_gateway: EchoClient) -> None:
    async with asyncio.timeout(CALL_BUDGET_S):
        await grpc_service.check_concurrent_calls(through_gateway)


async def test_a_server_stream_outlives_the_read_timeout(through_gateway: EchoClient) -> None:
    # 30 messages 100 ms apart: 3 s in all, three times `timeouts.read`, yet no gap
    # between messages comes near it.
    async with asyncio.timeout(CALL_BUDGET_S):
        await grpc_service.check_long_server_stream(through_gateway, count=30, delay_s=0.1)


async def test_the_channel_keeps_working_after_errors(through_gateway: EchoClient) -> None:
    """An error status on one stream is that stream's: the connection carries on."""
    async with asyncio.timeout(CALL_BUDGET_S):
        await grpc_service.check_trailers_only(through_gateway)
        await grpc_service.check_error_in_trailers(through_gateway)
        assert await through_gateway.unary(b"still here") == b"still here"


async def test_grpc_over_a_tls_listener_uses_h2_by_alpn(
    gateway_factory: GatewayFactory, upstream_port: int, tls_files: TlsFiles
) -> None:
    listener = f"{{bind: 127.0.0.1:0, tls: {{cert: '{tls_files.cert}', key: '{tls_files.key}'}}}}"
    gateway = await gateway_factory(grpc_gateway_config(upstream_port, listener))
    async with (
        asyncio.timeout(CALL_BUDGET_S),
        echo_client(gateway_target(gateway), tls=tls_files) as client,
    ):
        await grpc_service.check_unary(client)
        await grpc_service.check_server_stream(client)
        await grpc_service.check_error_in_trailers(client)
        await grpc_service.check_trailers_only(client)


async def test_a_server_stream_open_across_a_reload_runs_to_its_end(
    gateway_factory: GatewayFactory, upstream_port: int
) -> None:
    """A reload that keeps the stream's route (here: adds another) leaves the stream
    alone, and new calls after it work on the same channel."""
    config = grpc_gateway_config(upstream_port)
    gateway = await gateway_factory(config)
    async with echo_client(gateway_target(gateway)) as client, asyncio.timeout(CALL_BUDGET_S):
        stream = asyncio.create_task(client.server_stream(20, delay_s=0.1))  # 2 s
        await asyncio.sleep(0.3)
        extra = "  - name: other\n    match: {path_prefix: /other}\n    upstream: grpc\n"
        await gateway.prepare_reload(parse_config(config + extra))
        await gateway.commit_reload()
        assert await stream == [grpc_service.stream_message(i) for i in range(20)]
        assert await client.unary(b"after") == b"after"
