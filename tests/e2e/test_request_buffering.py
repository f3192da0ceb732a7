"""Request buffering (issue 14, item 6): a request body is read before an upstream
connection is taken, so clients that trickle their bodies (slowhttptest's slow-body
mode) hold only their own sockets and never drain the pool; bodies past the route's
`request_buffering.max_size`, routes that turn it off and gRPC stream as before."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator

import httpx
import pytest

from proxy.frontend.connection import ConnectionPhase
from proxy.process.server import Server
from tests.support.gateway import GatewayFactory, base_url, simple_config
from tests.support.h2_client import H2Client
from tests.support.helpers import RawClient, eventually
from tests.support.upstreams import UpstreamServer

pytestmark = pytest.mark.socket

SLOW_CLIENTS = 300
PROBES = 20
# A small pool: without buffering, the slow bodies hold every connection and the probes
# queue behind them until the wait runs out (503 pool_timeout). With buffering, 20 probes
# share the 4 connections; the wait is long enough for a busy machine to serve them.
POOL = "    pool: {max_connections: 4, wait_timeout: 10s}"


def buffered_config(upstream: UpstreamServer, codec: str, route: str = "", extra: str = "") -> str:
    config = simple_config(upstream.url, codec, route=route, extra=extra)
    return config.replace(f"endpoints: [{upstream.url}]", f"endpoints: [{upstream.url}]\n{POOL}")


@contextlib.asynccontextmanager
async def slow_bodies(server: Server, count: int) -> AsyncIterator[list[RawClient]]:
    """`count` clients that sent a head and 10 bytes of a 100 kB body, and then nothing,
    each with its head taken in by the gateway (its connection waits on the body)."""
    clients = []
    try:
        for _ in range(count):
            client = await RawClient.connect(server.addresses[0])
            clients.append(client)
            await client.send(
                b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10
            )
        await eventually(
            lambda: sum(c.phase is ConnectionPhase.BODY for c in server.connections) == count,
            f"{count} connections waiting on their bodies",
            within_s=30,
        )
        yield clients
    finally:
        for client in clients:
            client.close()


async def probe(server: Server, count: int) -> list[int]:
    async with httpx.AsyncClient(base_url=base_url(server), timeout=10) as client:
        answers = await asyncio.gather(*(client.get(f"/echo/{n}") for n in range(count)))
    return [answer.status_code for answer in answers]


async def test_hundreds_of_slow_bodies_leave_the_pool_to_other_clients(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    server = await gateway_factory(buffered_config(h1_upstream, codec))
    async with slow_bodies(server, SLOW_CLIENTS) as clients:
        assert await probe(server, PROBES) == [200] * PROBES
        # No slow body reached the upstream, and the pool stayed small (the probes'
        # connections only, at most its limit).
        assert [r.method for r in h1_upstream.requests] == ["GET"] * PROBES
        assert h1_upstream.connections <= 4
        # A slow client that finishes is forwarded, whole, framed by its length.
        await clients[0].send(b"y" * (100000 - 10))
        answer = await clients[0].response()
    assert answer.status == 200
    assert json.loads(answer.body)["body"] == "x" * 10 + "y" * (100000 - 10)
    assert h1_upstream.requests[-1].header("content-length") == "100000"


async def test_a_body_that_stops_coming_is_refused_with_408_and_never_sent_upstream(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    server = await gateway_factory(
        buffered_config(h1_upstream, codec, extra="limits: {body_timeout: 200ms}")
    )
    clients = [await RawClient.connect(server.addresses[0]) for _ in range(3)]
    try:
        for client in clients:
            await client.send(
                b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10
            )
        answers = [await client.response(wait_s=30) for client in clients]
    finally:
        for client in clients:
            client.close()
    assert [answer.status for answer in answers] == [408] * 3
    assert (h1_upstream.connections, h1_upstream.requests) == (0, [])


async def test_chunked_bodies_are_buffered_and_sent_with_their_length(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    server = await gateway_factory(buffered_config(h1_upstream, codec))
    async with await RawClient.connect(server.addresses[0]) as client:
        await client.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        await eventually(
            lambda: any(c.phase is ConnectionPhase.BODY for c in server.connections), "the head"
        )
        for piece in (b"ab", b"cde"):
            await client.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        assert h1_upstream.connections == 0
        await client.send(b"0\r\n\r\n")
        answer = await client.response()
    assert json.loads(answer.body)["body"] == "abcde"
    assert h1_upstream.requests[0].header("content-length") == "5"
    assert h1_upstream.requests[0].header("transfer-encoding") is None


@pytest.mark.parametrize(
    ("route", "sent_first"),
    [
        ("    request_buffering: {max_size: 64KiB}", 100 * 1024),  # past max_size: streams
        ("    request_buffering: false", 10),  # off: streams from the first byte
    ],
)
async def test_a_body_past_max_size_or_on_a_route_without_buffering_streams(
    gateway_factory: GatewayFactory,
    h1_upstream: UpstreamServer,
    codec: str,
    route: str,
    sent_first: int,
) -> None:
    server = await gateway_factory(buffered_config(h1_upstream, codec, route=route))
    payload = os.urandom(200 * 1024)
    async with await RawClient.connect(server.addresses[0]) as client:
        head = b"POST /sink HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(payload)
        await client.send(head + payload[:sent_first])
        # The upstream is reached while the client is still sending.
        await eventually(lambda: h1_upstream.connections == 1, "an upstream connection")
        await client.send(payload[sent_first:])
        answer = await client.response()
    assert json.loads(answer.body)["size"] == len(payload)


async def test_a_chunked_body_with_trailers_keeps_them(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    server = await gateway_factory(buffered_config(h1_upstream, codec))
    async with await RawClient.connect(server.addresses[0]) as client:
        await client.send(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\nX-Checksum: 42\r\n\r\n"
        )
        answer = await client.response()
    assert json.loads(answer.body)["body"] == "abc"
    assert h1_upstream.requests[0].header("transfer-encoding") == "chunked"


async def test_http2_slow_bodies_leave_the_pool_to_other_clients(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    server = await gateway_factory(buffered_config(h1_upstream, "httptools"))
    host, port = server.addresses[0]
    async with await H2Client.connect(host, port) as slow:
        streams = [
            slow.send_request(
                "/echo", method="POST", headers=[("content-length", "100000")], end_stream=False
            )
            for _ in range(50)
        ]
        await slow.flush()
        for stream in streams:
            await slow.send_body(stream, b"x" * 10, end=False)
        assert await probe(server, PROBES) == [200] * PROBES
        assert [r.method for r in h1_upstream.requests] == ["GET"] * PROBES
        await slow.send_body(streams[0], b"y" * (100000 - 10))
        await slow.wait_for("the answer", lambda: slow.streams[streams[0]].ended)
    assert slow.streams[streams[0]].status == 200
    assert h1_upstream.requests[-1].header("content-length") == "100000"


async def test_http2_buffering_never_waits_on_a_window_the_client_cannot_send_past(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    """Streams whose bodies outgrow the stream window, and together the connection's:
    buffering must hand them on rather than wait for bytes that cannot come."""
    server = await gateway_factory(
        buffered_config(h1_upstream, "httptools", extra="http2: {initial_window_size: 64KiB}")
    )
    host, port = server.addresses[0]
    payload = os.urandom(300 * 1024)
    async with await H2Client.connect(host, port) as client:
        answers = await asyncio.gather(
            *(client.request("/sink", method="POST", body=payload, timeout_s=30) for _ in range(6))
        )
    expected = {"size": len(payload)}
    assert all(json.loads(answer.body).items() >= expected.items() for answer in answers)
