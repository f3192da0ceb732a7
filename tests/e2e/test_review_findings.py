"""Regression tests for bugs found reviewing the HTTP/1.1 data path (each fails today).

Every wait is bounded (a hang shows up as a TimeoutError or an assertion naming what did
not happen), by far more than a busy machine needs and far less than the default timeout
that would otherwise answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket

import pytest

from proxy.config.model import EndpointConfig, PoolConfig, UpstreamTimeouts
from proxy.core.errors import PoolTimeout
from proxy.process.server import Server
from proxy.upstream.pool import UpstreamPool
from tests.support.gateway import GatewayFactory
from tests.support.helpers import RawClient, RawResponse, eventually
from tests.support.upstreams import UpstreamServer

pytestmark = pytest.mark.socket


def config(url: str, codec: str, *, upstream: str = "", extra: str = "") -> str:
    """A one-route routes.yaml; `upstream` adds keys to the upstream `app`."""
    return f"""
listeners:
  - bind: 127.0.0.1:0
http1_parser: {codec}
upstreams:
  app:
    endpoints: [{url}]
{upstream}
routes:
  - name: all
    match: {{path_prefix: /}}
    upstream: app
{extra}
"""


def pool_of(server: Server) -> UpstreamPool:
    return server.runtime.upstreams["app"].pools[0]


def pool_counts(pool: UpstreamPool) -> tuple[int, int]:
    """(active, idle) as the pool's repr shows them."""
    match = re.search(r"active=(-?\d+) idle=(\d+)", repr(pool))
    assert match is not None, repr(pool)
    return int(match.group(1)), int(match.group(2))


class ScriptUpstream:
    """A tiny HTTP/1.1 upstream for bodiless requests: `answer(target)` gives the bytes
    written (in one write) for each request head; keep-alive, no pipelining."""

    def __init__(self, answer: dict[str, bytes], default: bytes) -> None:
        self.answer = answer
        self.default = default
        self.targets: list[str] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> ScriptUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                target = head.split(b" ", 2)[1].decode()
                self.targets.append(target)
                writer.write(self.answer.get(target, self.default))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1)


async def push(sock: socket.socket, data: bytes) -> None:
    """Send `data` without the loop's writer machinery (cancelling a pending sock_sendall
    wedges uvloop's loop.close()): non-blocking sends, polling while the peer is full."""
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view[:65536])
        except BlockingIOError:
            await asyncio.sleep(0.005)
            continue
        view = view[sent:]


class StallUpstream(asyncio.Protocol):
    """An upstream that reads the first bytes of a request, then never reads again and
    never answers (a stuck service). `await StallUpstream.start()` -> (server, url)."""

    transports: set[asyncio.BaseTransport]

    def __init__(self, transports: set[asyncio.BaseTransport]) -> None:
        self.transports = transports

    @classmethod
    async def start(cls) -> tuple[asyncio.Server, str, set[asyncio.BaseTransport]]:
        transports: set[asyncio.BaseTransport] = set()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: cls(transports), "127.0.0.1", 0)
        return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", transports

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transports.add(transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.pause_reading()  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transports.discard(self.transport)


# -- 1. an upstream that stops reading an upload: nothing ever times out ----------------


async def test_upload_to_upstream_that_stops_reading_is_answered_and_released(
    gateway_factory: GatewayFactory, codec: str
) -> None:
    stall, stall_url, stall_transports = await StallUpstream.start()
    server: Server | None = None
    try:
        server = await gateway_factory(
            config(
                stall_url,
                codec,
                upstream="    timeouts: {read: 300ms}",
                extra="limits: {body_timeout: 300ms}",
            )
        )
        async with await RawClient.connect(server.addresses[0]) as client:
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
            await client.send(
                b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (1 << 30)
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
        for transport in list(stall_transports):
            transport.abort()  # type: ignore[attr-defined]
        stall.close()


# -- 2. a pool waiter cancelled just after being handed a connection leaks it -----------


async def test_pool_waiter_cancelled_after_handoff_does_not_leak_the_connection(
    h1_upstream: UpstreamServer,
) -> None:
    pool = UpstreamPool(
        EndpointConfig(h1_upstream.url, "http", "127.0.0.1", h1_upstream.port),
        PoolConfig(max_connections=1, max_idle=1, wait_timeout=0.3),
        UpstreamTimeouts(),
        "httptools",
        32 * 1024,
    )
    try:
        first = await pool.acquire()
        waiting = asyncio.create_task(pool.acquire())
        await eventually(lambda: "waiting=1" in repr(pool), "the second acquire to wait")
        # The exchange on `first` ends just as the waiting request's client goes away
        # (Http1Protocol.on_close cancels its task): both in one loop iteration.
        pool.release(first)
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        try:
            again = await pool.acquire()
        except PoolTimeout:
            pytest.fail(f"the handed-over connection leaked: {pool!r}")
        again.close()
    finally:
        pool.close()
        for conn in list(pool._connections):
            conn.close()


# -- 3. bytes after a complete upstream response: double release / response desync -----


async def test_unsolicited_upstream_response_is_never_delivered_or_pooled_twice(
    gateway_factory: GatewayFactory, codec: str
) -> None:
    double = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nevil!"
    )
    script = await ScriptUpstream({"/double": double}, b"").start()
    script.default = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    try:
        server = await gateway_factory(config(script.url, codec))
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


# -- 4. complete responses are written without ever checking write backpressure --------


async def test_pipelining_client_that_never_reads_does_not_grow_gateway_buffers(
    gateway_factory: GatewayFactory, codec: str
) -> None:
    body = b"b" * 32 * 1024
    script = await ScriptUpstream(
        {}, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    ).start()
    requests = 1500
    try:
        server = await gateway_factory(config(script.url, codec))
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


# -- 5. body_timeout runs while the gateway itself has not asked for the body -----------


async def test_expect_continue_request_waiting_for_a_pool_slot_is_not_timed_out(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    server = await gateway_factory(
        config(
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


# -- 6. a partial head that arrived during an exchange gets keepalive, not header timeout


async def test_partial_pipelined_head_gets_408_after_header_timeout(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    server = await gateway_factory(
        config(
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
