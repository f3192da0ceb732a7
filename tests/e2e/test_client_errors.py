"""Local replies to what the client does wrong, through real sockets, with their JSON
`error` code: 400 (malformed), 431 (head too large), 413 (body too large), 408 and the idle
close (timeouts). After each, the gateway still serves. Upstream failures are in
test_upstream_errors.py."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time

import httpx
import pytest

from proxy.process.server import Server
from tests.support.error_helpers import assert_local_reply, refused, send_once, start
from tests.support.gateway import GatewayFactory, assert_still_serves, base_url, simple_config
from tests.support.helpers import RawClient, eventually
from tests.support.upstreams import UpstreamServer

pytestmark = pytest.mark.socket


# -- 400 ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_line",
    [
        b"GARBAGE\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET /\r\n\r\n",  # HTTP/0.9 (no version): headers would be a protocol error to it
        b"GET / HTTP/1.1 extra\r\nHost: t\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: t\r\n\r\n",
        b"G(T / HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /a b HTTP/1.1\r\nHost: t\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,  # a TLS hello
    ],
)
async def test_malformed_request_line_gives_400_and_close(
    gateway: Server, h1_upstream: UpstreamServer, request_line: bytes
) -> None:
    response, _ = await refused(gateway, request_line, 400, "bad_request")
    assert response.header("connection") == "close"
    assert h1_upstream.requests == []
    await assert_still_serves(gateway)


async def test_bad_request_after_a_good_one_answers_both_in_order(
    gateway: Server, h1_upstream: UpstreamServer
) -> None:
    async with await RawClient.connect(gateway.addresses[0]) as client:
        await client.send(b"GET /echo/ok HTTP/1.1\r\nHost: t\r\n\r\nBROKEN LINE\r\n\r\n")
        first = await client.response()
        second = await client.response()
        assert await client.closed()
    assert first.json()["target"] == "/echo/ok"
    assert_local_reply(second, 400, "bad_request")
    assert [r.target for r in h1_upstream.requests] == ["/echo/ok"]


# -- 431 ---------------------------------------------------------------------------------

SMALL_HEAD = "limits: {max_head_bytes: 4KiB}"


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 6000 + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: t\r\n"
        + b"".join(b"X-H%d: value\r\n" % i for i in range(500))
        + b"\r\n",
        b"GET /" + b"p" * 6000 + b" HTTP/1.1\r\nHost: t\r\n\r\n",
    ],
    ids=["huge-header", "many-headers", "huge-target"],
)
async def test_head_over_limit_gives_431(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str, head: bytes
) -> None:
    server = await start(gateway_factory, h1_upstream.url, codec, extra=SMALL_HEAD)
    await refused(server, head, 431, "head_too_large")
    assert h1_upstream.requests == []
    await assert_still_serves(server)


async def test_head_over_limit_sent_slowly_gives_431(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    server = await start(gateway_factory, h1_upstream.url, codec, extra=SMALL_HEAD)
    async with await RawClient.connect(server.addresses[0]) as client:
        await client.send(b"GET / HTTP/1.1\r\nHost: t\r\n")
        with contextlib.suppress(ConnectionError):  # the gateway may answer before the end
            for i in range(10):
                await client.send(b"X-Part-%d: %s\r\n" % (i, b"b" * 1000))
                await asyncio.sleep(0.002)
            await client.send(b"\r\n")
        response = await client.response()
    assert_local_reply(response, 431, "head_too_large")
    assert h1_upstream.requests == []


async def test_trailer_section_over_the_head_limit_gives_431(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    """Trailers are bounded like the head (RFC 9112 section 7.1.2): ~600 KB of them, more
    than two reads of the gateway's, cannot all arrive with the head."""
    server = await start(gateway_factory, h1_upstream.url, codec, extra=SMALL_HEAD)
    trailers = b"".join(b"X-T%d: %s\r\n" % (i, b"t" * 90) for i in range(6000))
    async with await RawClient.connect(server.addresses[0]) as client:
        await client.send(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n"
        )
        with contextlib.suppress(ConnectionError):  # the gateway may answer before the end
            await client.send(b"0\r\n" + trailers + b"\r\n")
        response = await client.response()
    assert_local_reply(response, 431, "head_too_large")
    assert h1_upstream.requests == []
    await assert_still_serves(server)


async def test_head_just_under_limit_is_served(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    server = await start(gateway_factory, h1_upstream.url, codec, extra=SMALL_HEAD)
    response = await send_once(
        server, b"GET /echo HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 3000 + b"\r\n\r\n"
    )
    assert response.status == 200


# -- 413 ---------------------------------------------------------------------------------

ROUTE_LIMIT = "    max_body_size: 1KiB"


async def assert_closed_or_serves(client: RawClient) -> None:
    """The connection is either closed or still serves a request correctly."""
    try:
        await client.send(b"GET /echo/next HTTP/1.1\r\nHost: t\r\n\r\n")
        response = await client.response()
    except ConnectionError:
        return
    assert response.status == 200
    assert response.json()["target"] == "/echo/next"


async def test_content_length_over_route_limit_gives_413(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    server = await start(gateway_factory, h1_upstream.url, codec, route=ROUTE_LIMIT)
    async with await RawClient.connect(server.addresses[0]) as client:
        await client.send(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2000\r\n\r\n" + b"x" * 2000
        )
        response = await client.response()
        assert_local_reply(response, 413, "body_too_large")
        # The whole body had arrived, so the connection may live on; if so, it works.
        await assert_closed_or_serves(client)
    assert [r.method for r in h1_upstream.requests if r.method == "POST"] == []
    await assert_still_serves(server)


async def test_large_content_length_over_route_limit_gives_413_and_close(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    # Only the head is sent: the gateway must answer without reading 10 MB, then close
    # (the unread body would be parsed as the next request).
    server = await start(gateway_factory, h1_upstream.url, codec, route=ROUTE_LIMIT)
    async with await RawClient.connect(server.addresses[0]) as client:
        await client.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10000000\r\n\r\n")
        await client.send(b"x" * 1000)
        response = await client.response()
        assert_local_reply(response, 413, "body_too_large")
        assert response.header("connection") == "close"
        assert await client.closed()
    assert h1_upstream.requests == []


async def test_content_length_over_route_limit_with_expect_gives_413_without_upload(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    server = await start(gateway_factory, h1_upstream.url, codec, route=ROUTE_LIMIT)
    response = await send_once(
        server,
        b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2000\r\nExpect: 100-continue\r\n\r\n",
    )
    assert_local_reply(response, 413, "body_too_large")
    assert h1_upstream.requests == []


async def test_body_within_route_limit_is_served(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    server = await start(gateway_factory, h1_upstream.url, codec, route=ROUTE_LIMIT)
    async with httpx.AsyncClient() as client:
        response = await client.post(base_url(server) + "/echo", content=b"x" * 1024)
    assert response.status_code == 200
    assert response.json()["body_size"] == 1024


async def test_chunked_body_growing_past_route_limit_gives_413(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    server = await start(gateway_factory, h1_upstream.url, codec, route=ROUTE_LIMIT)
    async with await RawClient.connect(server.addresses[0]) as client:
        await client.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(2):
            await client.send(b"258\r\n" + b"c" * 600 + b"\r\n")
            await asyncio.sleep(0.01)
        await client.send(b"0\r\n\r\n")
        response = await client.response()
        assert_local_reply(response, 413, "body_too_large")
        assert await client.closed()
    assert h1_upstream.requests == []  # it never got a whole request
    await assert_still_serves(server)


async def test_chunked_body_past_route_limit_in_one_write_gives_413(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    server = await start(gateway_factory, h1_upstream.url, codec, route=ROUTE_LIMIT)
    response = await send_once(
        server,
        b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        + (b"258\r\n" + b"c" * 600 + b"\r\n") * 2
        + b"0\r\n\r\n",
    )
    assert_local_reply(response, 413, "body_too_large")
    assert h1_upstream.requests == []


async def test_content_length_over_server_limit_gives_413(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    server = await start(
        gateway_factory, h1_upstream.url, codec, extra="limits: {max_body_size: 100}"
    )
    head = b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 101\r\n\r\n"
    await refused(server, head, 413, "body_too_large")
    assert h1_upstream.requests == []
    await assert_still_serves(server)


async def test_chunked_body_past_server_limit_gives_413(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    server = await start(
        gateway_factory, h1_upstream.url, codec, extra="limits: {max_body_size: 100}"
    )
    async with await RawClient.connect(server.addresses[0]) as client:
        await client.send(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"40\r\n" + b"d" * 64 + b"\r\n"
        )
        await asyncio.sleep(0.01)
        await client.send(b"40\r\n" + b"d" * 64 + b"\r\n0\r\n\r\n")
        response = await client.response()
    assert_local_reply(response, 413, "body_too_large")
    assert h1_upstream.requests == []


# -- 408 and idle close ------------------------------------------------------------------

FAST_TIMEOUTS = "limits: {header_timeout: 200ms, body_timeout: 200ms, keepalive_timeout: 200ms}"
# A timeout fires no sooner than its 200 ms (the test's clock starts before the
# gateway's, so this side is exact, to uvloop's millisecond clock) and well before any
# default (10 s at least), which shows the configured one fired; how much later than
# 200 ms a busy machine answers is no part of what these tests prove.
NO_SOONER_S = 0.2 - 0.001
NOT_THE_DEFAULT_S = 5.0


async def test_incomplete_head_gives_408_after_header_timeout(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    server = await start(gateway_factory, h1_upstream.url, codec, extra=FAST_TIMEOUTS)
    partial_head = b"GET /echo HTTP/1.1\r\nHost: t\r\n"
    _, elapsed = await refused(server, partial_head, 408, "request_timeout")
    assert NO_SOONER_S <= elapsed < NOT_THE_DEFAULT_S
    assert h1_upstream.requests == []
    await assert_still_serves(server)


async def test_head_trickled_past_header_timeout_gives_408(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    # The timeout bounds the whole head, not the gap between its bytes (slowloris).
    server = await start(gateway_factory, h1_upstream.url, codec, extra=FAST_TIMEOUTS)
    async with await RawClient.connect(server.addresses[0]) as client:
        await client.send(b"GET /echo HTTP/1.1\r\n")

        async def trickle() -> None:
            # A line every 20 ms for as long as the gateway reads them (it lingers after
            # its 408, reading and dropping): a timeout on the gap between bytes would
            # never fire, and the answer below would never come.
            with contextlib.suppress(ConnectionError):
                for i in itertools.count():
                    await client.send(b"X-%d: y\r\n" % i)
                    await asyncio.sleep(0.02)

        sender = asyncio.create_task(trickle())
        try:
            response = await client.response()
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
    assert_local_reply(response, 408, "request_timeout")
    assert h1_upstream.requests == []


async def test_stalled_body_gives_408_after_body_timeout(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    server = await start(gateway_factory, h1_upstream.url, codec, extra=FAST_TIMEOUTS)
    partial_body = b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc"
    _, elapsed = await refused(server, partial_body, 408, "request_timeout")
    assert NO_SOONER_S <= elapsed < NOT_THE_DEFAULT_S
    assert h1_upstream.requests == []
    await assert_still_serves(server)


async def test_stalled_chunked_body_gives_408(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    server = await start(gateway_factory, h1_upstream.url, codec, extra=FAST_TIMEOUTS)
    response = await send_once(
        server,
        b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
    )
    assert_local_reply(response, 408, "request_timeout")
    assert h1_upstream.requests == []


async def test_slow_but_steady_body_is_not_timed_out(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    # body_timeout bounds the gap between chunks, not the whole body: eight gaps of at
    # least 100 ms outlast a 600 ms body_timeout, and each leaves a busy machine 500 ms.
    extra = FAST_TIMEOUTS.replace("body_timeout: 200ms", "body_timeout: 600ms")
    server = await start(gateway_factory, h1_upstream.url, codec, extra=extra)
    pieces = [b"%d" % n for n in range(8)]
    async with await RawClient.connect(server.addresses[0]) as client:
        await client.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 8\r\n\r\n")
        for piece in pieces:
            await asyncio.sleep(0.1)
            await client.send(piece)
        response = await client.response()
    assert response.status == 200
    assert response.json()["body"] == "01234567"


async def test_idle_keep_alive_connection_is_closed_after_keepalive_timeout(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    server = await start(gateway_factory, h1_upstream.url, codec, extra=FAST_TIMEOUTS)
    async with await RawClient.connect(server.addresses[0]) as client:
        started = time.monotonic()  # before the response that starts the idle timer
        await client.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
        assert (await client.response()).status == 200
        assert await client.closed()  # no 408: an idle close sends nothing
        elapsed = time.monotonic() - started
    assert NO_SOONER_S <= elapsed < NOT_THE_DEFAULT_S
    await assert_still_serves(server)


async def test_keep_alive_connection_used_before_timeout_stays_open(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    # Eight idle gaps of at least 100 ms outlast a 600 ms keepalive_timeout, and each
    # leaves a busy machine 500 ms: the timer restarts with every request.
    extra = FAST_TIMEOUTS.replace("keepalive_timeout: 200ms", "keepalive_timeout: 600ms")
    server = await start(gateway_factory, h1_upstream.url, codec, extra=extra)
    async with await RawClient.connect(server.addresses[0]) as client:
        for i in range(8):
            await client.send(f"GET /echo/{i} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            assert (await client.response()).status == 200
            await asyncio.sleep(0.1)
        await client.send(b"GET /echo/last HTTP/1.1\r\nHost: t\r\n\r\n")
        assert (await client.response()).status == 200


async def test_slow_upstream_response_is_not_a_client_timeout(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    # The client waits on us, not we on it: client-side timers must not fire.
    server = await start(gateway_factory, h1_upstream.url, codec, extra=FAST_TIMEOUTS)
    async with await RawClient.connect(server.addresses[0]) as client:
        await client.send(b"GET /slow/500 HTTP/1.1\r\nHost: t\r\n\r\n")
        response = await client.response()
        assert response.status == 200
        await client.send(b"GET /slowbody/400 HTTP/1.1\r\nHost: t\r\n\r\n")
        response = await client.response()
    assert response.body == b"late"


async def test_every_error_leaves_no_connection_behind(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    server = await start(gateway_factory, h1_upstream.url, codec, extra=FAST_TIMEOUTS)
    payloads = [
        b"GARBAGE\r\n\r\n",
        b"GET /drop HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc",
        b"GET /echo HTTP/1.1\r\n",
    ]
    for payload in payloads:
        async with await RawClient.connect(server.addresses[0]) as client:
            await client.send(payload)
            await client.response()
            assert await client.closed()
    await eventually(lambda: not server.connections, "the gateway to let go of every connection")


async def test_early_413_reaches_a_client_that_is_still_uploading(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    """nginx's lingering close: after answering early we half-close and drop the rest of
    the upload, so the kernel does not reset the connection under the unread upload and
    destroy the answer before the client has read it."""
    server = await gateway_factory(
        simple_config(h1_upstream.url, codec, route="    max_body_size: 1KiB")
    )
    reader, writer = await asyncio.open_connection(*server.addresses[0])
    writer.write(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 50000000\r\n\r\n")

    async def upload() -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(200):
                writer.write(b"x" * 65536)
                await writer.drain()

    uploader = asyncio.create_task(upload())
    await asyncio.sleep(0.3)  # the answer is sent while the upload goes on
    try:
        async with asyncio.timeout(10):
            answer = await reader.read(65536)
    finally:
        uploader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await uploader
        writer.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:80]
    assert b'"error": "body_too_large"' in answer
    assert h1_upstream.requests == []


# A partial head that arrived during an exchange gets the header timeout, not keepalive.
async def test_partial_pipelined_head_gets_408_after_header_timeout(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    server = await gateway_factory(
        simple_config(
            h1_upstream.url,
            codec,
            extra="limits: {header_timeout: 300ms, keepalive_timeout: 60s}",
        )
    )
    async with await RawClient.connect(server.addresses[0]) as client:
        await client.send(b"GET /slow/100 HTTP/1.1\r\nHost: t\r\n\r\nGET /echo/2 HTTP/1.1\r\nHo")
        first = await client.response()
        assert first.status == 200
        try:
            second = await client.response(wait_s=20.0)
        except TimeoutError:
            pytest.fail("an incomplete head was left waiting for the keep-alive timeout")
    assert second.status == 408
