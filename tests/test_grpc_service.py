"""The gRPC test kit (tests/support/grpc_service.py) checked on its own: every check that
tests/e2e/test_grpc.py runs through the gateway passes against the gRPC server directly,
so a failure there is the gateway's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import grpc.aio
import pytest

from tests.support import grpc_service
from tests.support.grpc_service import EchoClient, echo_client, echo_server
from tests.support.tls import TlsFiles

CALL_BUDGET_S = 20.0

Check = Callable[[EchoClient], Awaitable[None]]


@pytest.fixture
async def direct_client() -> AsyncIterator[EchoClient]:
    """An EchoClient connected straight to a fresh gRPC echo server."""
    async with echo_server() as port, echo_client(f"127.0.0.1:{port}") as client:
        yield client


@pytest.mark.socket
@pytest.mark.parametrize(
    "check",
    [
        grpc_service.check_unary,
        grpc_service.check_server_stream,
        grpc_service.check_client_stream,
        grpc_service.check_bidi,
        grpc_service.check_error_in_trailers,
        grpc_service.check_trailers_only,
        grpc_service.check_metadata,
        grpc_service.check_concurrent_calls,
    ],
    ids=lambda check: check.__name__.removeprefix("check_"),
)
async def test_the_echo_service_passes_each_check_directly(
    direct_client: EchoClient, check: Check
) -> None:
    async with asyncio.timeout(CALL_BUDGET_S):
        await check(direct_client)


@pytest.mark.socket
async def test_a_slow_server_stream_delivers_messages_as_they_are_sent(
    direct_client: EchoClient,
) -> None:
    async with asyncio.timeout(CALL_BUDGET_S):
        await grpc_service.check_long_server_stream(direct_client, count=5, delay_s=0.1)


@pytest.mark.socket
async def test_a_call_past_its_deadline_fails_with_deadline_exceeded() -> None:
    """The client's deadline is real: the kit cannot hang a test."""
    async with (
        asyncio.timeout(CALL_BUDGET_S),
        echo_server() as port,
        echo_client(f"127.0.0.1:{port}", timeout_s=0.2) as client,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.server_stream(3, delay_s=1.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.mark.socket
async def test_the_kit_speaks_grpc_over_tls(tls_files: TlsFiles) -> None:
    async with (
        asyncio.timeout(CALL_BUDGET_S),
        echo_server(tls=tls_files) as port,
        echo_client(f"127.0.0.1:{port}", tls=tls_files) as client,
    ):
        await grpc_service.check_unary(client)
        await grpc_service.check_error_in_trailers(client)
