"""Local replies to upstream failures, through real sockets, with their JSON `error` code:
502 (refused, reset, garbage), 504 (read timeout), 503 (pool wait timeout), and the
keep-alive race that must not become an error. Client mistakes are in
test_client_errors.py."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import httpx
import pytest

from proxy.config.load import parse_config
from proxy.process.server import Server
from tests.support.error_helpers import (
    assert_local_reply,
    assert_serves_next,
    send_once,
    upstream_config,
)
from tests.support.gateway import (
    GatewayFactory,
    H1UpstreamFactory,
    assert_still_serves,
    base_url,
    pool_counts,
    pool_of,
    simple_config,
)
from tests.support.helpers import RawClient, eventually, push
from tests.support.upstreams import FastUpstream, RawUpstream, UpstreamServer

pytestmark = pytest.mark.socket


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- 502 / 503 / 504 ---------------------------------------------------------------------


async def test_refused_upstream_gives_502(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    dead = f"http://127.0.0.1:{unused_port()}"
    extra = f"""
  dead:
    endpoints: [{dead}]
"""
    config = simple_config(h1_upstream.url, codec, route="")
    config = config.replace("upstreams:\n", "upstreams:" + extra, 1)
    config += "  - match: {path_prefix: /dead}\n    upstream: dead\n"
    server = await gateway_factory(config)
    async with await RawClient.connect(server.addresses[0]) as client:
        await client.send(b"GET /dead HTTP/1.1\r\nHost: t\r\n\r\n")
        response = await client.response()
        assert_local_reply(response, 502, "upstream_connect_failed")
        # An upstream failure is not the client's fault: its connection lives on.
        await assert_serves_next(client)
    await assert_still_serves(server)


@pytest.mark.parametrize(
    ("path", "error"),
    [("/drop", "upstream_reset"), ("/garbage", "upstream_bad_response")],
)
async def test_broken_upstream_answer_gives_502(
    gateway: Server, h1_upstream: UpstreamServer, path: str, error: str
) -> None:
    async with await RawClient.connect(gateway.addresses[0]) as client:
        await client.send(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        response = await client.response()
        assert_local_reply(response, 502, error)
        await assert_serves_next(client)
    await assert_still_serves(gateway)


async def test_broken_upstream_answer_on_reused_connection_gives_502(
    gateway: Server, h1_upstream: UpstreamServer
) -> None:
    async with httpx.AsyncClient() as client:
        assert (await client.get(base_url(gateway) + "/echo/warm")).status_code == 200
        response = await client.get(base_url(gateway) + "/drop")
    assert response.status_code == 502
    assert response.json()["error"] == "upstream_reset"
    await assert_still_serves(gateway)


async def test_upstream_silent_past_read_timeout_gives_504(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    config = upstream_config(h1_upstream.url, codec, "timeouts: {read: 200ms}")
    server = await gateway_factory(config)
    async with await RawClient.connect(server.addresses[0]) as client:
        started = time.monotonic()
        await client.send(b"GET /held HTTP/1.1\r\nHost: t\r\n\r\n")  # never answered
        response = await client.response()
        elapsed = time.monotonic() - started
        assert_local_reply(response, 504, "upstream_timeout")
        await assert_serves_next(client)
    # After the 200 ms (to uvloop's millisecond clock), and long before the 30 s default:
    # how much later a busy machine answers is not the point.
    assert 0.2 - 0.001 <= elapsed < 5.0
    await assert_still_serves(server)


async def test_upstream_answering_within_read_timeout_is_served(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    # 50 ms against 2 s: room for a busy machine, which the read timeout also counts.
    config = upstream_config(h1_upstream.url, codec, "timeouts: {read: 2s}")
    server = await gateway_factory(config)
    async with httpx.AsyncClient() as client:
        response = await client.get(base_url(server) + "/slow/50")
    assert response.status_code == 200


def test_pool_with_only_max_connections_set_is_accepted() -> None:
    # A small max_connections must not require max_idle as well: the default max_idle
    # should shrink to fit rather than make the config invalid.
    url = "http://127.0.0.1:8000"
    config = upstream_config(url, "auto", "pool: {max_connections: 1, wait_timeout: 100ms}")
    parsed = parse_config(config)
    assert parsed.upstreams["app"].pool.max_connections == 1
    assert parsed.upstreams["app"].pool.max_idle <= 1


async def test_pool_wait_timeout_gives_503(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    config = upstream_config(
        h1_upstream.url, codec, "pool: {max_connections: 1, max_idle: 1, wait_timeout: 100ms}"
    )
    server = await gateway_factory(config)
    async with httpx.AsyncClient(timeout=20) as client:
        held = asyncio.create_task(client.get(base_url(server) + "/held"))
        await eventually(
            lambda: [r.target for r in h1_upstream.requests] == ["/held"],
            "the held request to take the only connection",
        )
        # The connection comes back only when the test lets it: the waiter can only have
        # given up at its wait_timeout.
        response = await client.get(base_url(server) + "/echo/waiting")
        h1_upstream.release_held()
        assert (await held).status_code == 200
    assert response.status_code == 503
    assert response.json()["error"] == "pool_timeout"
    assert [r.target for r in h1_upstream.requests] == ["/held"]
    await assert_still_serves(server)


async def test_pool_waiter_gets_released_connection(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    config = upstream_config(
        h1_upstream.url, codec, "pool: {max_connections: 1, max_idle: 1, wait_timeout: 20s}"
    )
    server = await gateway_factory(config)
    async with httpx.AsyncClient(timeout=30) as client:
        responses = await asyncio.gather(
            *(client.get(base_url(server) + f"/slow/{50 + i}") for i in range(3))
        )
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert h1_upstream.connections == 1


# -- the keep-alive race -----------------------------------------------------------------


async def test_upstream_dropping_reused_connection_is_retried_on_fresh_one(
    gateway_factory: GatewayFactory, h1_upstream_factory: H1UpstreamFactory, codec: str
) -> None:
    racy = await h1_upstream_factory(drop_reused=True)
    server = await gateway_factory(simple_config(racy.url, codec))
    async with await RawClient.connect(server.addresses[0]) as client:
        for i in range(3):
            await client.send(f"GET /echo/{i} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            response = await client.response()
            assert response.status == 200, response
            assert response.json()["target"] == f"/echo/{i}"
        # A body that arrived with its head can be replayed too.
        await client.send(
            b"POST /echo/body HTTP/1.1\r\nHost: t\r\nContent-Length: 8\r\n\r\nreplayed"
        )
        response = await client.response()
        assert response.status == 200, response
        assert response.json()["body"] == "replayed"
    assert racy.dropped == 3
    assert racy.connections == 4  # each reuse was dropped, each retry opened a new one
    assert [r.target for r in racy.requests] == ["/echo/0", "/echo/1", "/echo/2", "/echo/body"]


async def test_small_body_sent_after_its_head_is_retried_when_reused_connection_drops(
    gateway_factory: GatewayFactory, h1_upstream_factory: H1UpstreamFactory, codec: str
) -> None:
    # Most clients (httpx, requests, browsers) write the head and the body separately, so
    # the body often arrives after forwarding began. The keep-alive race must not turn such
    # a POST into a 502: nothing of it reached the upstream's application.
    racy = await h1_upstream_factory(drop_reused=True)
    server = await gateway_factory(simple_config(racy.url, codec))
    async with await RawClient.connect(server.addresses[0]) as client:
        await client.send(b"GET /echo/warm HTTP/1.1\r\nHost: t\r\n\r\n")
        assert (await client.response()).status == 200
        await client.send(b"POST /echo/body HTTP/1.1\r\nHost: t\r\nContent-Length: 8\r\n\r\n")
        await asyncio.sleep(0.02)
        await client.send(b"replayed")
        response = await client.response()
    assert response.status == 200, response
    assert response.json()["body"] == "replayed"
    assert racy.dropped == 1


async def test_upstream_closing_idle_connection_does_not_fail_next_request(
    gateway: Server, h1_upstream: UpstreamServer
) -> None:
    async with httpx.AsyncClient() as client:
        assert (await client.get(base_url(gateway) + "/thenclose")).status_code == 200
        await asyncio.sleep(0.02)  # the upstream's FIN reaches the idle pooled connection
        response = await client.get(base_url(gateway) + "/echo/after")
    assert response.status_code == 200
    assert h1_upstream.connections == 2


async def test_upstream_closing_idle_connection_at_once_does_not_fail_next_request(
    gateway: Server, h1_upstream: UpstreamServer
) -> None:
    # No pause: the next request may be sent on the connection as its FIN arrives.
    async with await RawClient.connect(gateway.addresses[0]) as client:
        await client.send(
            b"GET /thenclose HTTP/1.1\r\nHost: t\r\n\r\nGET /echo/after HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        first = await client.response()
        second = await client.response()
    assert first.status == 200
    assert second.status == 200, second


async def test_small_body_arriving_after_its_head_is_answered_whole(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    # nginx sends a file's head and body in separate writes; the gateway gathers a small
    # body before answering, so the client gets one complete response.
    server = await gateway_factory(simple_config(h1_upstream.url, codec))
    response = await send_once(server, b"GET /slowbody/100 HTTP/1.1\r\nHost: t\r\n\r\n")
    assert response.status == 200
    assert response.body == b"late"


async def test_small_body_stalling_past_read_timeout_is_a_504_not_a_cut_response(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    # Nothing was sent to the client yet, so the failure can still be a proper answer.
    config = upstream_config(h1_upstream.url, codec, "timeouts: {read: 200ms}")
    server = await gateway_factory(config)
    response = await send_once(server, b"GET /heldbody HTTP/1.1\r\nHost: t\r\n\r\n")
    assert_local_reply(response, 504, "upstream_timeout")


# An upstream that stops reading an upload: a timeout must still answer the client and
# release the connection (once nothing ever timed out).
async def test_upload_to_upstream_that_stops_reading_is_answered_and_released(
    gateway_factory: GatewayFactory, codec: str
) -> None:
    stall = await FastUpstream().start()  # /stall: reads the head, then never reads again
    server: Server | None = None
    try:
        server = await gateway_factory(
            simple_config(
                stall.url,
                codec,
                upstream="    timeouts: {read: 300ms}",
                extra="limits: {body_timeout: 300ms}",
            )
        )
        async with await RawClient.connect(server.addresses[0]) as client:
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
            await client.send(
                b"POST /stall HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (1 << 30)
            )

            async def upload() -> None:
                await push(client.sock, b"u" * (64 << 20))

            uploading = asyncio.create_task(upload())
            try:
                # The gateway stops reading (backpressure from the stalled upstream);
                # then some timeout must end the exchange with an answer (the 300 ms
                # ones, long before the 30 s read and 60 s body defaults).
                response = await client.response()
            finally:
                uploading.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                    await uploading
        assert response.status in (408, 502, 504), response
        pool = pool_of(server)
        await eventually(lambda: pool.size == 0, "the stalled upstream connection to close")
    finally:
        # Today the exchange is wedged: abort what it holds, or uvloop's loop.close()
        # waits forever on the upstream transport's unflushed buffer.
        for conn in list(pool_of(server)._connections) if server is not None else []:
            if conn.transport is not None:
                conn.transport.abort()
        await stall.stop()


# Bytes after a complete upstream response: never delivered to the next request, and
# the connection never pooled twice.
async def test_unsolicited_upstream_response_is_never_delivered_or_pooled_twice(
    gateway_factory: GatewayFactory, codec: str
) -> None:
    double = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nevil!"
    )
    script = await RawUpstream({"/double": double}, b"").start()
    script.default = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    try:
        server = await gateway_factory(simple_config(script.url, codec))
        async with await RawClient.connect(server.addresses[0]) as client:
            await client.send(b"GET /double HTTP/1.1\r\nHost: t\r\n\r\n")
            first = await client.response()
            assert first.body == b"hi"
            active, idle = pool_counts(pool_of(server))
            assert active >= 0, f"one connection pooled twice: {pool_of(server)!r}"
            assert idle <= 1, f"one connection pooled twice: {pool_of(server)!r}"
            await client.send(b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n")
            second = await client.response()
        assert second.body == b"ok", "a response nobody asked for reached the next request"
    finally:
        await script.stop()
