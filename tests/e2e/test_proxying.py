"""Proxying through real sockets: methods, bodies both ways, keep-alive, pipelining,
100-continue, HTTP/1.0, response headers. Request headers and the target the upstream
gets are in test_proxying_headers.py."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
from collections.abc import AsyncIterator

import httpx
import pytest

from proxy.process.server import Server
from tests.support.gateway import GatewayFactory, base_url, simple_config
from tests.support.helpers import RawClient, RawResponse, eventually, parse_all, push
from tests.support.upstreams import RawUpstream, UpstreamServer

pytestmark = pytest.mark.socket


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
async def test_method_is_proxied_with_its_target(
    gateway: Server, h1_upstream: UpstreamServer, method: str
) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.request(method, base_url(gateway) + "/echo/m?x=1")
    assert response.status_code == 200
    assert response.json()["method"] == method
    assert response.json()["target"] == "/echo/m?x=1"
    assert [r.method for r in h1_upstream.requests] == [method]


async def test_head_is_proxied_without_body(gateway: Server, h1_upstream: UpstreamServer) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.head(base_url(gateway) + "/bytes/1234")
    assert response.status_code == 200
    assert response.headers["content-length"] == "1234"
    assert response.content == b""
    assert h1_upstream.requests[-1].method == "HEAD"


async def test_content_length_body_reaches_upstream_intact(
    gateway: Server, h1_upstream: UpstreamServer
) -> None:
    payload = os.urandom(1024 * 1024 + 17)
    async with httpx.AsyncClient() as client:
        response = await client.post(base_url(gateway) + "/sink", content=payload)
    assert response.status_code == 200
    assert response.json() == {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}


async def test_small_body_is_echoed_by_upstream(
    gateway: Server, h1_upstream: UpstreamServer
) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.put(base_url(gateway) + "/echo", content=b"hello body")
    assert response.json()["body"] == "hello body"
    assert h1_upstream.requests[-1].header("content-length") == "10"


async def test_chunked_request_body_reaches_upstream_intact(
    gateway: Server, h1_upstream: UpstreamServer
) -> None:
    pieces = [os.urandom(size) for size in (1, 1000, 65536, 300_000, 7)]

    async def stream() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    async with httpx.AsyncClient() as client:
        response = await client.post(base_url(gateway) + "/sink", content=stream())
    whole = b"".join(pieces)
    assert response.status_code == 200
    assert response.json() == {"size": len(whole), "sha256": hashlib.sha256(whole).hexdigest()}


async def test_chunked_response_reaches_client_intact(gateway: Server) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.get(base_url(gateway) + "/chunked/40/1000")
    assert response.status_code == 200
    assert response.content == b"y" * 40_000


async def test_streamed_chunked_response_keeps_chunked_framing(gateway: Server) -> None:
    async with await RawClient.connect(gateway.addresses[0]) as client:
        await client.send(b"GET /chunked/100/10000 HTTP/1.1\r\nHost: t\r\n\r\n")
        response = await client.response()
    assert response.status == 200
    assert response.body == b"y" * 1_000_000
    assert response.chunked or response.header("content-length") == "1000000"


async def test_upstream_trailers_reach_client_that_accepts_them(gateway: Server) -> None:
    # The response is small, so the whole upstream body (and its trailer) has arrived
    # before the gateway writes the head: the trailer must not be lost on that path.
    async with await RawClient.connect(gateway.addresses[0]) as client:
        await client.send(b"GET /chunked/3/10 HTTP/1.1\r\nHost: t\r\nTE: trailers\r\n\r\n")
        response = await client.response()
    assert response.status == 200
    assert response.body == b"y" * 30
    assert response.chunked
    assert response.trailers == [("X-Trailer", "done")]


async def test_streamed_upstream_trailers_reach_client(gateway: Server) -> None:
    async with await RawClient.connect(gateway.addresses[0]) as client:
        await client.send(b"GET /chunked/100/10000 HTTP/1.1\r\nHost: t\r\nTE: trailers\r\n\r\n")
        response = await client.response()
    assert response.body == b"y" * 1_000_000
    if response.chunked:
        assert response.trailers == [("X-Trailer", "done")]


@pytest.mark.parametrize("path", ["/bytes/5000000", "/download/5000000"])
async def test_large_response_reaches_client_intact(gateway: Server, path: str) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.get(base_url(gateway) + path)
    assert response.status_code == 200
    assert response.headers["content-length"] == "5000000"
    assert len(response.content) == 5_000_000
    assert set(response.content) == ({ord("x")} if "bytes" in path else {ord("z")})


async def test_keep_alive_reuses_one_client_and_one_upstream_connection(
    gateway: Server, h1_upstream: UpstreamServer
) -> None:
    async with httpx.AsyncClient() as client:
        for i in range(5):
            response = await client.get(base_url(gateway) + f"/echo/{i}")
            assert response.status_code == 200
            assert len(gateway.connections) == 1
        response = await client.post(base_url(gateway) + "/echo/post", content=b"abc")
        assert response.json()["body"] == "abc"
        assert len(gateway.connections) == 1
    assert h1_upstream.connections == 1
    assert len(h1_upstream.requests) == 6


async def test_raw_keep_alive_connection_serves_sequential_requests(
    gateway: Server, h1_upstream: UpstreamServer
) -> None:
    async with await RawClient.connect(gateway.addresses[0]) as client:
        for i in range(3):
            await client.send(f"GET /echo/{i} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            response = await client.response()
            assert response.status == 200
            assert response.json()["target"] == f"/echo/{i}"
            assert response.header("connection") is None
        assert not await client.closed(wait_s=0.05)
    assert h1_upstream.connections == 1


async def test_pipelined_requests_are_answered_in_order(
    gateway: Server, h1_upstream: UpstreamServer
) -> None:
    requests = (
        b"GET /echo/1 HTTP/1.1\r\nHost: t\r\n\r\n"
        b"POST /echo/2 HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /slow/100 HTTP/1.1\r\nHost: t\r\n\r\n"
        b"PUT /echo/4 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n"
        b"GET /echo/5 HTTP/1.1\r\nHost: t\r\n\r\n"
    )
    async with await RawClient.connect(gateway.addresses[0]) as client:
        await client.send(requests)
        responses = [await client.response() for _ in range(5)]
    assert [r.status for r in responses] == [200] * 5
    assert responses[0].json()["target"] == "/echo/1"
    assert responses[1].json()["target"] == "/echo/2"
    assert responses[1].json()["body"] == "hello"
    assert responses[2].body == b"slow"
    assert responses[3].json()["target"] == "/echo/4"
    assert responses[3].json()["body"] == "abc"
    assert responses[4].json()["target"] == "/echo/5"
    assert [r.target for r in h1_upstream.requests] == [
        "/echo/1",
        "/echo/2",
        "/slow/100",
        "/echo/4",
        "/echo/5",
    ]


async def test_pipelined_requests_then_half_close_are_all_answered(
    gateway: Server, h1_upstream: UpstreamServer
) -> None:
    # A client may send its last request and shut down its write side (RFC 9112 section
    # 9.6): every queued request is still answered, then the gateway closes.
    async with await RawClient.connect(gateway.addresses[0]) as client:
        await client.send(
            b"".join(f"GET /echo/{i} HTTP/1.1\r\nHost: t\r\n\r\n".encode() for i in range(3))
        )
        client.shutdown_write()
        data = await client.read_until_closed()
    responses = parse_all(data)
    assert [r.json()["target"] for r in responses] == ["/echo/0", "/echo/1", "/echo/2"]
    assert [r.target for r in h1_upstream.requests] == ["/echo/0", "/echo/1", "/echo/2"]


async def test_single_request_then_half_close_is_answered(gateway: Server) -> None:
    async with await RawClient.connect(gateway.addresses[0]) as client:
        await client.send(b"POST /echo/h HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi")
        client.shutdown_write()
        data = await client.read_until_closed()
    [response] = parse_all(data)
    assert response.json()["body"] == "hi"


async def test_pipelined_requests_split_byte_by_byte_are_answered_in_order(
    gateway: Server,
) -> None:
    requests = b"".join(f"GET /echo/{i} HTTP/1.1\r\nHost: t\r\n\r\n".encode() for i in range(3))
    async with await RawClient.connect(gateway.addresses[0]) as client:
        for byte in requests:
            await client.send(bytes([byte]))
        responses = [await client.response() for _ in range(3)]
    assert [r.json()["target"] for r in responses] == ["/echo/0", "/echo/1", "/echo/2"]


async def test_expect_100_continue_gets_interim_response_before_body(
    gateway: Server, h1_upstream: UpstreamServer
) -> None:
    async with await RawClient.connect(gateway.addresses[0]) as client:
        await client.send(
            b"POST /echo/expect HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        interim = await client.response()
        assert (interim.version, interim.status, interim.reason) == ("1.1", 100, "Continue")
        await client.send(b"hello world")
        response = await client.response()
        assert response.status == 200
        assert response.json()["body"] == "hello world"
        # The connection lives on.
        await client.send(b"GET /echo/after HTTP/1.1\r\nHost: t\r\n\r\n")
        assert (await client.response()).json()["target"] == "/echo/after"
    assert h1_upstream.requests[0].header("expect") is None


async def test_expect_100_continue_refused_request_gets_final_status_without_interim(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    config = simple_config(h1_upstream.url, codec).replace("path_prefix: /", "path_prefix: /only")
    server = await gateway_factory(config)
    async with await RawClient.connect(server.addresses[0]) as client:
        await client.send(
            b"POST /elsewhere HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        response = await client.response()
    assert response.status == 404
    assert h1_upstream.requests == []


async def test_http10_request_gets_response_and_close(
    gateway: Server, h1_upstream: UpstreamServer
) -> None:
    async with await RawClient.connect(gateway.addresses[0]) as client:
        await client.send(b"GET /echo/old HTTP/1.0\r\nHost: t\r\n\r\n")
        response = await client.response()
        assert response.status == 200
        assert response.json()["target"] == "/echo/old"
        assert response.header("content-length") == str(len(response.body))
        assert response.header("transfer-encoding") is None
        assert await client.closed()


@pytest.mark.parametrize("path", ["/chunked/4/100", "/chunked/100/10000"])
async def test_http10_chunked_upstream_response_is_not_chunked_to_client(
    gateway: Server, path: str
) -> None:
    async with await RawClient.connect(gateway.addresses[0]) as client:
        await client.send(f"GET {path} HTTP/1.0\r\nHost: t\r\n\r\n".encode())
        response = await client.response()
        assert await client.closed()
    count, size = (int(part) for part in path.split("/")[2:])
    assert response.status == 200
    assert response.header("transfer-encoding") is None
    assert response.body == b"y" * (count * size)


async def test_http10_keep_alive_request_keeps_connection_open(
    gateway: Server, h1_upstream: UpstreamServer
) -> None:
    async with await RawClient.connect(gateway.addresses[0]) as client:
        for i in range(2):
            await client.send(
                f"GET /echo/{i} HTTP/1.0\r\nHost: t\r\nConnection: keep-alive\r\n\r\n".encode()
            )
            response = await client.response()
            assert response.status == 200
            assert response.header("connection") == "keep-alive"
            assert response.header("content-length") == str(len(response.body))
        assert not await client.closed(wait_s=0.05)
    assert len(h1_upstream.requests) == 2


async def test_http10_keep_alive_request_with_streamed_response_is_closed_at_its_end(
    gateway: Server,
) -> None:
    # A streamed body of unknown length can only be close-delimited to an HTTP/1.0
    # client, even one that asked for keep-alive: the gateway must then close, or the
    # client never learns that the body ended.
    async with await RawClient.connect(gateway.addresses[0]) as client:
        await client.send(
            b"GET /chunked/100/10000 HTTP/1.0\r\nHost: t\r\nConnection: keep-alive\r\n\r\n"
        )
        response = await client.response()
    assert response.status == 200
    assert response.body == b"y" * 1_000_000


async def test_http10_request_is_forwarded_as_http11(
    gateway: Server, h1_upstream: UpstreamServer
) -> None:
    async with await RawClient.connect(gateway.addresses[0]) as client:
        await client.send(b"POST /echo/b HTTP/1.0\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc")
        response = await client.response()
    assert response.json()["body"] == "abc"
    assert h1_upstream.requests[0].header("via") == "1.0 gatehouse"


async def test_connection_close_from_client_closes_after_response(
    gateway: Server, h1_upstream: UpstreamServer
) -> None:
    async with await RawClient.connect(gateway.addresses[0]) as client:
        await client.send(b"GET /echo/bye HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        response = await client.response()
        assert response.status == 200
        assert response.header("connection") == "close"
        assert await client.closed()


async def test_connection_close_discards_pipelined_requests_after_it(
    gateway: Server, h1_upstream: UpstreamServer
) -> None:
    async with await RawClient.connect(gateway.addresses[0]) as client:
        await client.send(
            b"GET /echo/last HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
            b"GET /echo/never HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        response = await client.response()
        assert response.json()["target"] == "/echo/last"
        assert await client.closed()
    assert [r.target for r in h1_upstream.requests] == ["/echo/last"]


async def test_head_returns_upstream_content_length_and_no_body(
    gateway: Server, h1_upstream: UpstreamServer
) -> None:
    async with await RawClient.connect(gateway.addresses[0]) as client:
        await client.send(b"HEAD /bytes/1000 HTTP/1.1\r\nHost: t\r\n\r\n")
        response = await client.response(head=True)
        assert response.status == 200
        assert response.header("content-length") == "1000"
        # No body bytes follow: the next response starts right after the head.
        await client.send(b"GET /echo/next HTTP/1.1\r\nHost: t\r\n\r\n")
        following = await client.response()
        assert following.json()["target"] == "/echo/next"


async def test_head_of_chunked_resource_has_no_body(gateway: Server) -> None:
    async with await RawClient.connect(gateway.addresses[0]) as client:
        await client.send(b"HEAD /chunked/2/10 HTTP/1.1\r\nHost: t\r\n\r\n")
        response = await client.response(head=True)
        assert response.status == 200
        await client.send(b"GET /echo/next HTTP/1.1\r\nHost: t\r\n\r\n")
        assert (await client.response()).json()["target"] == "/echo/next"


async def test_response_headers_from_upstream_reach_client(gateway: Server) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.get(base_url(gateway) + "/echo/ct")
    assert response.headers["content-type"] == "application/json"


@pytest.mark.parametrize("status", [201, 202, 301, 404, 500, 503])
async def test_upstream_status_is_passed_through(gateway: Server, status: int) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.get(base_url(gateway) + f"/status/{status}", follow_redirects=False)
    assert response.status_code == status
    assert response.text == f"status {status}"


async def test_close_delimited_upstream_response_reaches_client(gateway: Server) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.get(base_url(gateway) + "/close")
    assert response.status_code == 200
    assert response.content == b"until-close"


async def test_upgrade_request_with_body_is_not_truncated_or_hung(
    gateway: Server, h1_upstream: UpstreamServer
) -> None:
    # Tunnels are not supported yet. The gateway may serve the request as a plain one
    # (RFC 9110 section 7.8 lets a server ignore Upgrade) or refuse it, but it must not
    # forward it with its body silently dropped, nor wait for a body it will never read.
    async with await RawClient.connect(gateway.addresses[0]) as client:
        await client.send(
            b"POST /echo/up HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
            b"Content-Length: 5\r\n\r\nhello"
        )
        response = await client.response()
    if response.status == 200:
        assert response.json()["body"] == "hello"
        assert h1_upstream.requests[0].header("upgrade") is None
    else:
        assert response.status in (400, 501)
        assert h1_upstream.requests == []


async def test_hop_by_hop_response_headers_do_not_reach_client(gateway: Server) -> None:
    # RFC 9110 section 7.6.1 applies to responses too: Connection, the fields it names,
    # Keep-Alive and Proxy-Connection describe the upstream's hop only.
    async with await RawClient.connect(gateway.addresses[0]) as client:
        await client.send(b"GET /hopheaders HTTP/1.1\r\nHost: t\r\n\r\n")
        response = await client.response()
    assert response.status == 200
    assert response.body == b"hop"
    assert response.header("x-kept") == "yes"
    names = {name.lower() for name, _ in response.headers}
    assert "x-up-hop" not in names
    assert "keep-alive" not in names
    assert "proxy-connection" not in names
    assert response.header("connection") is None


@pytest.mark.socket
async def test_client_leaving_mid_download_releases_the_upstream_connection(
    gateway: Server, h1_upstream: UpstreamServer
) -> None:
    host, port = gateway.addresses[0]
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /download/104857600 HTTP/1.1\r\nHost: t\r\n\r\n")
    await reader.readexactly(256 * 1024)  # the download is flowing
    writer.transport.abort()
    pool = gateway.runtime.upstreams["app"].pools[0]
    await eventually(lambda: pool.size == 0, "the upstream connection to close")
    assert repr(pool).endswith("active=0 idle=0 connecting=0 waiting=0>")


@pytest.mark.socket
async def test_client_leaving_before_the_response_releases_the_upstream_connection(
    gateway: Server, h1_upstream: UpstreamServer
) -> None:
    host, port = gateway.addresses[0]
    _, writer = await asyncio.open_connection(host, port)
    # Its head at once, its body when the test says: the gateway waits for that small
    # body before it answers, so the client leaves before any response.
    writer.write(b"GET /heldbody HTTP/1.1\r\nHost: t\r\n\r\n")
    await eventually(lambda: len(h1_upstream.requests) == 1, "the request to reach the upstream")
    writer.transport.abort()
    h1_upstream.release_held()  # the upstream answers after the client has gone
    pool = gateway.runtime.upstreams["app"].pools[0]
    await eventually(lambda: "active=0" in repr(pool), "no exchange left on the upstream")


# Complete responses queued for a pipelining client that never reads stop the reading
# (write backpressure), not grow the gateway's buffers.
async def test_pipelining_client_that_never_reads_does_not_grow_gateway_buffers(
    gateway_factory: GatewayFactory, codec: str
) -> None:
    body = b"b" * 32 * 1024
    script = await RawUpstream(
        {}, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    ).start()
    requests = 1500
    try:
        server = await gateway_factory(simple_config(script.url, codec))
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, server.addresses[0])
        client = RawClient(sock)
        async with client:
            pipeline = b"GET /r HTTP/1.1\r\nHost: t\r\n\r\n" * requests
            sending = asyncio.create_task(push(sock, pipeline))  # never reads
            peak = 0
            deadline = loop.time() + 1.2
            while loop.time() < deadline and len(script.targets) < requests:
                buffered = [
                    c.transport.get_write_buffer_size()
                    for c in server.connections
                    if c.transport is not None
                ]
                peak = max([peak, *buffered])
                await asyncio.sleep(0.02)
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await sending
        assert peak < 4 * 1024 * 1024, (
            f"{peak / 2**20:.1f} MiB queued for a client that reads nothing "
            f"({len(script.targets)} of {requests} requests forwarded)"
        )
    finally:
        await script.stop()


# body_timeout does not run while the gateway itself has not asked for the body
# (100-continue, waiting for a pool slot).
async def test_expect_continue_request_waiting_for_a_pool_slot_is_not_timed_out(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    server = await gateway_factory(
        simple_config(
            h1_upstream.url,
            codec,
            upstream="    pool: {max_connections: 1, max_idle: 1, wait_timeout: 20s}",
            extra="limits: {body_timeout: 200ms}",
        )
    )
    async with (
        await RawClient.connect(server.addresses[0]) as busy,
        await RawClient.connect(server.addresses[0]) as client,
    ):
        await busy.send(b"GET /slow/700 HTTP/1.1\r\nHost: t\r\n\r\n")
        await eventually(
            lambda: [r.target for r in h1_upstream.requests] == ["/slow/700"],
            "the slow request to hold the only upstream connection",
        )
        # RFC 9110 section 10.1.1: the client waits for 100 Continue before the body.
        await client.send(
            b"POST /echo/e HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        interim = await client.response()
        final: RawResponse | None = None
        if interim.status == 100:
            await client.send(b"hello")
            final = await client.response()
        else:
            final = interim
        assert (await busy.response()).status == 200
    assert final.status == 200, f"{final.status} {final.body!r}"
    assert final.json()["body"] == "hello"
