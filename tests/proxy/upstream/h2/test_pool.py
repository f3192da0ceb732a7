"""The HTTP/2 upstream connection and its pool against a real h2 server on 127.0.0.1
(tests/support/upstreams/h2.py): multiplexing, stream limits, refusals, flow control, timeouts,
resets, trailers, cancellation, idle expiry, TLS."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import pytest
from h2.errors import ErrorCodes

from proxy.config.upstream_model import (
    EndpointConfig,
    PoolConfig,
    UpstreamConfig,
    UpstreamTimeouts,
    UpstreamTls,
)
from proxy.core.body import BODY_HIGH_WATER_BYTES, Body
from proxy.core.errors import (
    PoolTimeout,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)
from proxy.core.models import RawHeaders, Response
from proxy.upstream.h2.pool import H2Pool
from proxy.upstream.h2.stream import STREAM_WINDOW_BYTES, H2ConnState
from proxy.upstream.tls import client_context, server_hostname
from tests.support.helpers import eventually
from tests.support.tls import TlsFiles
from tests.support.upstreams import H2UpstreamServer, UpstreamServer, pattern_chunks

pytestmark = [pytest.mark.socket, pytest.mark.timeout(30)]

SWEEP_INTERVAL_S = 0.02
PoolFactory = Callable[..., Awaitable[H2Pool]]


def request_headers(path: str, method: str = "GET", scheme: str = "http") -> RawHeaders:
    return [
        (b":method", method.encode()),
        (b":scheme", scheme.encode()),
        (b":authority", b"upstream.test"),
        (b":path", path.encode()),
    ]


async def get(pool: H2Pool, path: str, method: str = "GET", body: bytes = b"") -> Response:
    async with asyncio.timeout(10):
        return await pool.exchange(request_headers(path, method), Body.from_bytes(body), body)


async def read_all(response: Response) -> bytes:
    data = bytearray()
    async with asyncio.timeout(10):
        while chunk := await response.body.read():
            data += chunk
    return bytes(data)


@pytest.fixture
async def servers() -> AsyncIterator[list[H2UpstreamServer]]:
    started: list[H2UpstreamServer] = []
    yield started
    for server in started:
        await server.stop()


@pytest.fixture
async def make_pool() -> AsyncIterator[PoolFactory]:
    """Pools with a sweeper task calling `expire` (as the server's sweeper does)."""
    pools: list[H2Pool] = []
    loop = asyncio.get_running_loop()

    async def sweep() -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            for pool in pools:
                pool.expire(loop.time())

    sweeper = loop.create_task(sweep())

    async def make(
        server: H2UpstreamServer | UpstreamServer,
        *,
        read: float = 5.0,
        tls: UpstreamTls | None = None,
        **limits: float,
    ) -> H2Pool:
        scheme = "https" if tls is not None else "http"
        endpoint = EndpointConfig(
            f"{scheme}://127.0.0.1:{server.port}", scheme, "127.0.0.1", server.port
        )
        pool_config = replace(PoolConfig(), **limits)  # type: ignore[arg-type]
        timeouts = UpstreamTimeouts(connect=2.0, read=read)
        context = hostname = None
        if tls is not None:
            config = UpstreamConfig("app", (endpoint,), protocol="h2", tls=tls)
            context = client_context(config)
            hostname = server_hostname(endpoint, config)
        pool = H2Pool(endpoint, pool_config, timeouts, tls=context, server_hostname=hostname)
        pools.append(pool)
        return pool

    yield make
    sweeper.cancel()
    for pool in pools:
        pool.close()
        for conn in pool.connections:
            conn.close()
    await asyncio.sleep(0)


async def start(servers: list[H2UpstreamServer], **options: object) -> H2UpstreamServer:
    server = await H2UpstreamServer(**options).start()  # type: ignore[arg-type]
    servers.append(server)
    return server


# --------------------------------------------------------------------- basics


async def test_get_returns_status_headers_and_body(
    servers: list[H2UpstreamServer], make_pool: PoolFactory
) -> None:
    server = await start(servers)
    pool = await make_pool(server)
    response = await get(pool, "/echo/hello?x=1")
    assert response.status == 200
    assert (b"content-type", b"application/json") in (response.raw_headers or [])
    # Pseudo-headers and content-length are not response fields; the length is the Body's.
    assert all(not name.startswith(b":") for name, _ in response.raw_headers or [])
    assert all(name != b"content-length" for name, _ in response.raw_headers or [])
    data = await read_all(response)
    assert response.body.length == len(data)
    assert json.loads(data)["path"] == "/echo/hello?x=1"
    assert repr(pool).startswith("<H2Pool 127.0.0.1:")
    assert "connections=1" in repr(pool)


async def test_post_body_in_memory_reaches_upstream(
    servers: list[H2UpstreamServer], make_pool: PoolFactory
) -> None:
    server = await start(servers)
    pool = await make_pool(server)
    response = await get(pool, "/echo", "POST", b"payload")
    assert json.loads(await read_all(response))["body"] == "payload"


async def test_concurrent_requests_share_one_connection(
    servers: list[H2UpstreamServer], make_pool: PoolFactory
) -> None:
    server = await start(servers)
    pool = await make_pool(server)
    responses = await asyncio.gather(*(get(pool, "/slow/100") for _ in range(10)))
    assert [r.status for r in responses] == [200] * 10
    assert server.connections == 1
    assert len({r.stream_id for r in server.requests}) == 10
    conn = pool.connections[0]
    assert repr(conn).startswith("<H2UpstreamConnection 127.0.0.1:")
    assert "READY" in repr(conn)


async def test_max_concurrent_streams_is_honoured_with_a_second_connection(
    servers: list[H2UpstreamServer], make_pool: PoolFactory
) -> None:
    server = await start(servers, max_concurrent_streams=2)
    pool = await make_pool(server)
    await get(pool, "/echo")  # learn the limit first
    # Held until all four are in: none can free its stream for another.
    requests = asyncio.gather(*(get(pool, "/held") for _ in range(4)))
    await eventually(lambda: len(server.requests) == 5, "the four streams open")
    server.release_held()
    responses = await requests
    assert [r.status for r in responses] == [200] * 4
    assert server.connections == 2
    per_connection = [r.connection for r in server.requests[1:]]
    assert sorted(per_connection) == [1, 1, 2, 2]


async def test_full_pool_waits_for_a_free_stream(
    servers: list[H2UpstreamServer], make_pool: PoolFactory
) -> None:
    server = await start(servers, max_concurrent_streams=1)
    pool = await make_pool(server, max_connections=1, wait_timeout=20.0)
    await get(pool, "/echo")
    responses = await asyncio.gather(*(get(pool, "/slow/100") for _ in range(3)))
    assert [r.status for r in responses] == [200] * 3
    assert server.connections == 1


async def test_full_pool_times_out_with_503(
    servers: list[H2UpstreamServer], make_pool: PoolFactory
) -> None:
    server = await start(servers, max_concurrent_streams=1)
    pool = await make_pool(server, max_connections=1, wait_timeout=0.2)
    await get(pool, "/echo")
    held = asyncio.ensure_future(get(pool, "/held"))  # its stream is freed after the wait
    await eventually(lambda: len(server.requests) == 2, "the expected state")
    with pytest.raises(PoolTimeout) as caught:
        await get(pool, "/echo")
    assert caught.value.status == 503
    server.release_held()
    assert (await held).status == 200
    assert "waiting=0" in repr(pool)


# ------------------------------------------------------------- refusals and GOAWAY


async def test_stream_refused_by_goaway_is_retried_on_a_fresh_connection(
    servers: list[H2UpstreamServer], make_pool: PoolFactory
) -> None:
    server = await start(servers)
    pool = await make_pool(server)
    response = await get(pool, "/goaway", "POST", b"never processed")
    assert response.status == 200
    body = json.loads(await read_all(response))
    assert body["body"] == "never processed"  # the POST was replayed whole
    assert server.connections == 2
    await eventually(lambda: len(pool.connections) == 1, "the expected state")


async def test_goaway_lets_streams_below_last_stream_id_finish(
    servers: list[H2UpstreamServer], make_pool: PoolFactory
) -> None:
    server = await start(servers)
    pool = await make_pool(server)
    await get(pool, "/echo")  # stream 1
    held = asyncio.ensure_future(get(pool, "/held"))  # stream 3, open until released
    await eventually(lambda: len(server.requests) == 2, "the expected state")
    first = pool.connections[0]
    refused = await get(pool, "/goaway")  # stream 5: GOAWAY last_stream_id=3
    assert refused.status == 200
    assert first.state is H2ConnState.DRAINING  # stream 3 still runs on it
    server.release_held()
    done = await held
    assert done.status == 200
    assert await read_all(done) == b"held"
    # The GOAWAY'd connection closes once its last stream ended.
    await eventually(lambda: first.state is H2ConnState.CLOSED, "the expected state")
    assert pool.connections != [first]


async def test_refused_stream_is_retried_once(
    servers: list[H2UpstreamServer], make_pool: PoolFactory
) -> None:
    server = await start(servers, refuse_streams=1)
    pool = await make_pool(server)
    response = await get(pool, "/echo", "POST", b"again")
    assert json.loads(await read_all(response))["body"] == "again"
    assert server.refused == 1
    assert server.connections == 2  # the retry went to a fresh connection


async def test_refused_stream_with_a_large_body_in_memory_is_replayed(
    servers: list[H2UpstreamServer], make_pool: PoolFactory
) -> None:
    server = await start(servers, refuse_streams=1)
    pool = await make_pool(server)
    payload = b"p" * (300 * 1024)
    response = await get(pool, "/sink", "POST", payload)
    answer = json.loads(await read_all(response))
    assert answer == {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}


async def test_refused_streamed_body_is_replayed_from_what_was_consumed(
    servers: list[H2UpstreamServer], make_pool: PoolFactory
) -> None:
    server = await start(servers, refuse_streams=1)
    pool = await make_pool(server)
    body = Body(None)
    body.feed(b"first part, ")
    exchange = asyncio.ensure_future(pool.exchange(request_headers("/echo", "POST"), body, None))
    await eventually(lambda: server.refused == 1, "the first stream refused")
    body.feed(b"second part")
    body.feed_eof()
    async with asyncio.timeout(10):
        response = await exchange
    assert json.loads(await read_all(response))["body"] == "first part, second part"


async def test_stream_refused_twice_is_a_502(
    servers: list[H2UpstreamServer], make_pool: PoolFactory
) -> None:
    server = await start(servers, refuse_streams=2)
    pool = await make_pool(server)
    with pytest.raises(UpstreamReset) as caught:
        await get(pool, "/echo")
    assert caught.value.status == 502
    assert server.refused == 2


# -------------------------------------------------------------------- flow control


async def feed_pattern(body: Body, total: int) -> None:
    for piece in pattern_chunks(total, 64 * 1024):
        body.feed(bytes(piece))
        await asyncio.sleep(0)
    body.feed_eof()


def pattern_sha256(total: int) -> str:
    digest = hashlib.sha256()
    for piece in pattern_chunks(total):
        digest.update(piece)
    return digest.hexdigest()


async def test_large_streamed_upload_respects_the_peer_window(
    servers: list[H2UpstreamServer], make_pool: PoolFactory
) -> None:
    # The server's windows stay at the 64 KiB default: h2 on its side would fail the
    # connection (FLOW_CONTROL_ERROR) if we sent past them.
    server = await start(servers)
    pool = await make_pool(server)
    total = 10 * 1024 * 1024
    body = Body(None)
    feeder = asyncio.ensure_future(feed_pattern(body, total))
    async with asyncio.timeout(20):
        response = await pool.exchange(request_headers("/sink", "POST"), body, None)
    answer = json.loads(await read_all(response))
    await feeder
    assert answer == {"size": total, "sha256": pattern_sha256(total)}


async def test_upload_to_a_stalled_upstream_stops_at_its_window_then_504(
    servers: list[H2UpstreamServer], make_pool: PoolFactory
) -> None:
    server = await start(servers)
    pool = await make_pool(server, read=0.3)
    body = Body.from_bytes(b"u" * (1024 * 1024))
    with pytest.raises(UpstreamTimeout) as caught:
        await pool.exchange(request_headers("/stall", "POST"), body, b"u" * (1024 * 1024))
    assert caught.value.status == 504
    # Only the stream was reset: h2 on the server would have failed the whole connection
    # (FLOW_CONTROL_ERROR) had we sent past its window.
    await eventually(lambda: ErrorCodes.CANCEL in server.resets_received, "the expected state")
    assert len(pool.connections) == 1
    assert (await get(pool, "/echo")).status == 200


async def test_download_is_held_back_while_the_client_does_not_read(
    servers: list[H2UpstreamServer], make_pool: PoolFactory
) -> None:
    server = await start(servers)
    pool = await make_pool(server)
    total = 8 * 1024 * 1024
    response = await get(pool, f"/download/{total}")
    # What the server sent stops growing (two readings 0.1 s apart agree, however long a
    # busy machine takes to get there) ...
    held = -1
    async with asyncio.timeout(10):
        while server.response_bytes_sent != held:
            held = server.response_bytes_sent
            await asyncio.sleep(0.1)
    # ... at the Body's high watermark: at most one stream window more.
    assert held <= BODY_HIGH_WATER_BYTES + STREAM_WINDOW_BYTES + 64 * 1024
    digest = hashlib.sha256(await read_all(response)).hexdigest()
    assert digest == pattern_sha256(total)


async def test_concurrent_downloads_on_one_connection_arrive_intact(
    servers: list[H2UpstreamServer], make_pool: PoolFactory
) -> None:
    server = await start(servers)
    pool = await make_pool(server)
    total = 3 * 1024 * 1024

    async def one() -> str:
        return hashlib.sha256(await read_all(await get(pool, f"/download/{total}"))).hexdigest()

    digests = await asyncio.gather(*(one() for _ in range(4)))
    assert set(digests) == {pattern_sha256(total)}
    assert server.connections == 1


# ------------------------------------------------------------ timeouts and resets


async def test_silent_upstream_times_out_with_504_and_only_its_stream_is_reset(
    servers: list[H2UpstreamServer], make_pool: PoolFactory
) -> None:
    server = await start(servers)
    pool = await make_pool(server, read=0.2)
    with pytest.raises(UpstreamTimeout):
        await get(pool, "/held")  # never answered
    await eventually(lambda: ErrorCodes.CANCEL in server.resets_received, "the expected state")
    assert (await get(pool, "/echo")).status == 200
    assert server.connections == 1


async def test_gap_in_the_body_times_out(
    servers: list[H2UpstreamServer], make_pool: PoolFactory
) -> None:
    server = await start(servers)
    pool = await make_pool(server, read=0.2)
    response = await get(pool, "/heldbody")  # the body never comes
    assert response.status == 200
    with pytest.raises(UpstreamTimeout):
        await read_all(response)


async def test_reset_before_the_head_is_a_502(
    servers: list[H2UpstreamServer], make_pool: PoolFactory
) -> None:
    server = await start(servers)
    pool = await make_pool(server)
    with pytest.raises(UpstreamReset, match="INTERNAL_ERROR") as caught:
        await get(pool, "/reset")
    assert caught.value.status == 502
    assert (await get(pool, "/echo")).status == 200
    assert server.connections == 1


async def test_reset_after_the_head_fails_the_body(
    servers: list[H2UpstreamServer], make_pool: PoolFactory
) -> None:
    server = await start(servers)
    pool = await make_pool(server)
    response = await get(pool, "/resetbody")
    assert response.status == 200
    with pytest.raises(UpstreamReset):
        await read_all(response)


async def test_trailers_reach_the_body(
    servers: list[H2UpstreamServer], make_pool: PoolFactory
) -> None:
    server = await start(servers)
    pool = await make_pool(server)
    response = await get(pool, "/trailers", "POST", b"\x00\x00\x00\x00\x00")
    assert await read_all(response) == b"hello"
    assert response.body.trailers == [("grpc-status", "0"), ("grpc-message", "ok")]


async def test_trailers_only_response(
    servers: list[H2UpstreamServer], make_pool: PoolFactory
) -> None:
    server = await start(servers)
    pool = await make_pool(server)
    response = await get(pool, "/trailers-only", "POST", b"\x00\x00\x00\x00\x00")
    assert response.status == 200
    assert response.body.complete
    assert await read_all(response) == b""
    headers = dict(response.raw_headers or [])
    assert headers[b"grpc-status"] == b"5"
    assert headers[b"grpc-message"] == b"not found"


async def test_cancelled_exchange_resets_only_its_stream(
    servers: list[H2UpstreamServer], make_pool: PoolFactory
) -> None:
    server = await start(servers)
    pool = await make_pool(server)
    await get(pool, "/echo")
    task = asyncio.ensure_future(get(pool, "/slow/5000"))
    await eventually(lambda: len(server.requests) == 2, "the expected state")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: ErrorCodes.CANCEL in server.resets_received, "the expected state")
    conn = pool.connections[0]
    assert conn.state is H2ConnState.READY
    assert not conn.streams
    assert (await get(pool, "/echo")).status == 200
    assert server.connections == 1


async def test_abandoned_body_resets_its_stream(
    servers: list[H2UpstreamServer], make_pool: PoolFactory
) -> None:
    server = await start(servers)
    pool = await make_pool(server)
    response = await get(pool, f"/download/{8 * 1024 * 1024}")
    assert await response.body.read()
    response.body.discard()  # the client went away mid-download
    await eventually(lambda: ErrorCodes.CANCEL in server.resets_received, "the expected state")
    assert not pool.connections[0].streams
    assert (await get(pool, "/echo")).status == 200


async def test_idle_connection_expires(
    servers: list[H2UpstreamServer], make_pool: PoolFactory
) -> None:
    server = await start(servers)
    pool = await make_pool(server, idle_timeout=0.1)
    await read_all(await get(pool, "/echo"))
    assert len(pool.connections) == 1
    await eventually(lambda: not pool.connections, "the expected state")
    assert (await get(pool, "/echo")).status == 200
    assert server.connections == 2


async def test_busy_connection_does_not_expire(
    servers: list[H2UpstreamServer], make_pool: PoolFactory
) -> None:
    server = await start(servers)
    pool = await make_pool(server, idle_timeout=0.05)
    response = await get(pool, "/slow/300")
    assert response.status == 200
    assert server.connections == 1


async def test_closed_pool_lets_busy_connections_finish(
    servers: list[H2UpstreamServer], make_pool: PoolFactory
) -> None:
    server = await start(servers)
    pool = await make_pool(server)
    held = asyncio.ensure_future(get(pool, "/held"))
    await eventually(lambda: len(server.requests) == 1, "the expected state")
    pool.close()
    server.release_held()  # answered only after the pool closed
    response = await held
    assert await read_all(response) == b"held"
    await eventually(lambda: not pool.connections, "the expected state")


# ------------------------------------------------------------------ connect errors


async def test_refused_connection_is_a_502(make_pool: PoolFactory) -> None:
    server = await H2UpstreamServer().start()
    await server.stop()  # the port is now closed
    pool = await make_pool(server)
    with pytest.raises(UpstreamConnectError):
        await get(pool, "/echo")


async def test_requests_queued_for_a_failed_connect_all_get_its_error(
    make_pool: PoolFactory,
) -> None:
    server = await H2UpstreamServer().start()
    await server.stop()
    pool = await make_pool(server, wait_timeout=5.0)
    results = await asyncio.gather(*(get(pool, "/echo") for _ in range(5)), return_exceptions=True)
    assert all(isinstance(result, UpstreamConnectError) for result in results), results
    assert "waiting=0" in repr(pool)


async def test_http1_server_behind_h2c_is_a_502(make_pool: PoolFactory) -> None:
    server = await UpstreamServer().start()
    try:
        pool = await make_pool(server)
        with pytest.raises((UpstreamProtocolError, UpstreamConnectError)) as caught:
            await get(pool, "/echo")
        assert caught.value.status == 502
    finally:
        await server.stop()


# ---------------------------------------------------------------------------- TLS


async def test_h2_over_tls(
    servers: list[H2UpstreamServer], make_pool: PoolFactory, tls_files: TlsFiles
) -> None:
    server = await start(servers, tls=tls_files.server_context(["h2"]))
    pool = await make_pool(server, tls=UpstreamTls(ca=str(tls_files.ca)))
    response = await get(pool, "/echo/tls")
    assert json.loads(await read_all(response))["path"] == "/echo/tls"


async def test_untrusted_certificate_is_a_502_naming_the_cause(
    servers: list[H2UpstreamServer], make_pool: PoolFactory, tls_files: TlsFiles
) -> None:
    server = await start(servers, tls=tls_files.server_context(["h2"]))
    pool = await make_pool(server, tls=UpstreamTls())  # the system store: not our CA
    with pytest.raises(UpstreamConnectError, match="certificate verify failed"):
        await get(pool, "/echo")


async def test_server_without_h2_alpn_is_refused(
    servers: list[H2UpstreamServer], make_pool: PoolFactory, tls_files: TlsFiles
) -> None:
    server = await start(servers, tls=tls_files.server_context(["http/1.1"]))
    pool = await make_pool(server, tls=UpstreamTls(ca=str(tls_files.ca)))
    with pytest.raises(UpstreamConnectError, match="ALPN"):
        await get(pool, "/echo")
