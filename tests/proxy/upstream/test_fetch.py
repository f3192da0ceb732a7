"""The gateway's own HTTP client (proxy/upstream/fetch.py) against real servers on
127.0.0.1: a raw HTTP/1.1 server whose every answer the test writes byte for byte, the
testing kit's scripted upstreams (HTTP/1.1 and h2c), and an https one with a test CA.
URL parsing and the bounded body read need no socket."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from proxy.codec.h1serialize import UnsafeHeader
from proxy.config.values import ConfigValueError
from proxy.core.body import Body
from proxy.core.errors import (
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)
from proxy.testing import start_upstream
from proxy.upstream.fetch import (
    FetchUrl,
    HttpClient,
    fetch,
    parse_url,
    read_body,
    tls_context,
)
from proxy.upstream.h1 import StaleConnection
from tests.support.tls import TlsFiles
from tests.support.upstreams import H2UpstreamServer

# Answers of the raw server: bytes to write, or one of these.
HANG = "hang"  # read the request, never answer (until the client leaves or the server stops)
DROP = "drop"  # read the request, close without answering
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Answer: yes\r\n\r\nok"


class RawServer:
    """HTTP/1.1 on 127.0.0.1: answers the requests of every connection, in order, with
    `answers` (the last one repeats). Records each request (head and body) and counts
    connections. `drop_reused`: a second request on one connection is read and the
    connection closed without an answer, as a server closing an idle keep-alive
    connection just as a request arrives does (the keep-alive race)."""

    def __init__(self, *answers: bytes | str, drop_reused: bool = False) -> None:
        self.answers = list(answers) or [OK]
        self.drop_reused = drop_reused
        self.requests: list[bytes] = []
        self.connections = 0
        self.received = asyncio.Event()  # set when a request has been read
        self.closed = asyncio.Event()  # set when a connection ends (either side)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for writer in self._writers:
            writer.transport.abort()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def url(self, target: bytes = b"/check") -> FetchUrl:
        return FetchUrl("http", "127.0.0.1", self.port, target)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                self.requests.append(head + await reader.readexactly(length))
                self.received.set()
                answer = self.answers[min(len(self.requests) - 1, len(self.answers) - 1)]
                if (self.drop_reused and served) or answer == DROP:
                    return
                if answer == HANG:
                    await reader.read()  # until the client closes
                    return
                assert isinstance(answer, bytes)
                writer.write(answer)
                await writer.drain()
                served += 1
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            self.closed.set()


@pytest.fixture
async def refused_port() -> int:
    """A port nothing listens on (bound, then closed)."""
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    return port


@pytest.fixture
async def client_for() -> AsyncIterator[list[HttpClient]]:
    """Clients a test made, closed after it."""
    clients: list[HttpClient] = []
    yield clients
    for client in clients:
        client.close()


# -- URLs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "origin", "target", "host"),
    [
        ("http://auth:9000/check", "http://auth:9000", b"/check", "auth:9000"),
        ("http://Auth", "http://auth:80", b"/", "auth"),
        ("https://idp.example.com/keys?v=2", "https://idp.example.com:443", b"/keys?v=2",
         "idp.example.com"),
        ("http://[::1]:8080/x", "http://[::1]:8080", b"/x", "[::1]:8080"),
        ("https://[::1]/", "https://[::1]:443", b"/", "[::1]"),
    ],
)  # fmt: skip
def test_parse_url_gives_the_origin_the_target_and_the_host(
    url: str, origin: str, target: bytes, host: str
) -> None:
    parsed = parse_url(url)
    assert (parsed.origin, parsed.target, parsed.host_header) == (origin, target, host)


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("ftp://auth/", "unsupported scheme 'ftp' in 'ftp://auth/' (http:// or https://)"),
        ("http://u:p@auth/",
         "invalid url 'http://u:p@auth/': credentials in the URL are not allowed"),
        ("http://auth/#x", "'http://auth/#x': a fragment is not allowed"),
        ("http://[::1/", "invalid url 'http://[::1/': Invalid IPv6 URL"),
        ("http://auth:99999/", "port 99999 is out of range 1..65535"),
        ("http://auth/a b", "'http://auth/a b': the path must be percent-encoded"),
        ("http://auth/\u20ac", "'http://auth/\u20ac': the path must be percent-encoded"),
    ],
)  # fmt: skip
def test_parse_url_refuses_with_the_reason(url: str, error: str) -> None:
    with pytest.raises(ConfigValueError) as refused:
        parse_url(url)
    assert str(refused.value) == error


def test_an_explicit_authority_is_sent_as_given() -> None:
    assert FetchUrl("http", "10.0.0.1", 80, b"/", "10.0.0.1:80").host_header == "10.0.0.1:80"
    assert FetchUrl("https", "idp", 8443).host_header == "idp:8443"


# -- the bounded body read -----------------------------------------------------------------

LIMIT = 64 * 1024


async def test_read_body_takes_a_complete_body_whole() -> None:
    assert await read_body(Body.from_bytes(b"denied"), LIMIT) == b"denied"
    assert await read_body(Body.from_bytes(b"x" * (LIMIT + 1)), LIMIT) is None
    assert await read_body(Body.from_bytes(b""), 0) == b""


async def test_read_body_reads_a_streamed_body_within_the_limit() -> None:
    body = Body(None)
    body.feed(b"a" * 1000)
    reading = asyncio.create_task(read_body(body, LIMIT))
    await asyncio.sleep(0)  # the reader takes the first chunk and waits for more
    body.feed(b"b" * 1000)
    body.feed_eof()
    async with asyncio.timeout(5):
        assert await reading == b"a" * 1000 + b"b" * 1000


async def test_read_body_gives_up_on_a_declared_or_streamed_excess() -> None:
    abandoned: list[str] = []
    declared = Body(LIMIT + 1)
    declared.on_abandon = lambda: abandoned.append("declared")
    assert await read_body(declared, LIMIT) is None
    streamed = Body(None)
    streamed.on_abandon = lambda: abandoned.append("streamed")
    streamed.feed(b"x" * LIMIT)
    streamed.feed(b"x")
    assert await read_body(streamed, LIMIT) is None
    unwanted = Body(None)  # a limit of 0: a body of unknown length is not waited for
    unwanted.on_abandon = lambda: abandoned.append("unwanted")
    assert await read_body(unwanted, 0) is None
    assert abandoned == ["declared", "streamed", "unwanted"]  # each connection is dropped


# -- HTTP/1.1 ------------------------------------------------------------------------------


@pytest.mark.socket
async def test_a_get_adds_host_and_reads_status_headers_and_body() -> None:
    async with RawServer() as server:
        answer = await fetch("GET", server.url(b"/check?x=1"), [("Accept", "*/*")], timeout_s=10)
    assert (answer.status, answer.reason, answer.body) == (200, "OK", b"ok")
    assert answer.headers["X-Answer"] == "yes"
    assert "Content-Length" not in answer.headers  # framing is the client's, as forwarding
    assert server.requests == [
        f"GET /check?x=1 HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nAccept: */*\r\n"
        "Connection: close\r\n\r\n".encode()
    ]


@pytest.mark.socket
async def test_a_body_goes_with_its_length_and_a_given_host_is_kept() -> None:
    async with RawServer() as server:
        url = f"http://127.0.0.1:{server.port}/submit"
        headers = [("Host", "service.internal"), ("Content-Type", "text/plain")]
        assert (await fetch("POST", url, headers, b"hello", timeout_s=10)).status == 200
        assert (await fetch("POST", url, timeout_s=10)).status == 200
    assert server.requests[0] == (
        b"POST /submit HTTP/1.1\r\nHost: service.internal\r\nContent-Type: text/plain\r\n"
        b"Content-Length: 5\r\nConnection: close\r\n\r\nhello"
    )
    assert b"\r\nContent-Length: 0\r\n" in server.requests[1]  # POST says it has none


@pytest.mark.socket
async def test_a_client_keeps_its_connection_alive_and_reuses_it(
    client_for: list[HttpClient],
) -> None:
    async with RawServer() as server:
        client = HttpClient(server.url(), timeout_s=10)
        client_for.append(client)
        for _ in range(3):
            assert (await client.fetch("GET", headers=[("X-N", "1")])).body == b"ok"
        assert server.connections == 1
        assert "active=0 idle=1" in repr(client)
        assert b"Connection" not in server.requests[0]
        other = await client.fetch("GET", b"/other")
        assert other.status == 200
        assert server.requests[-1].startswith(b"GET /other ")
        client.close()
        assert repr(client) == f"<HttpClient http://127.0.0.1:{server.port} pool=None>"


@pytest.mark.socket
async def test_the_keep_alive_race_is_retried_on_a_fresh_connection(
    client_for: list[HttpClient],
) -> None:
    # The server closes every connection on its second request, without an answer.
    async with RawServer(drop_reused=True) as server:
        client = HttpClient(server.url(), timeout_s=10)
        client_for.append(client)
        for _ in range(3):
            assert (await client.fetch("POST", body=b"again")).status == 200
    # Each reused connection failed once (StaleConnection, never raised) and the request
    # went again, body and all, on a new one.
    assert server.connections == 3
    assert len(server.requests) == 5
    assert all(request.endswith(b"\r\n\r\nagain") for request in server.requests)


@pytest.mark.socket
async def test_a_fresh_connection_that_closes_is_a_reset_not_a_stale_connection() -> None:
    async with RawServer(DROP) as server:
        with pytest.raises(UpstreamReset) as failed:
            await fetch("GET", server.url(), timeout_s=10)
    assert not isinstance(failed.value, StaleConnection)
    assert failed.value.message == "upstream closed the connection"


@pytest.mark.socket
async def test_a_body_over_max_body_is_not_read_and_its_connection_closes(
    client_for: list[HttpClient],
) -> None:
    # Declared larger than wanted, and still arriving: not waited for.
    big = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    async with RawServer(big, chunked, OK) as server:
        client = HttpClient(server.url(), timeout_s=10)
        client_for.append(client)
        answer = await client.fetch("GET", max_body=99_999)
        assert (answer.status, answer.body) == (401, None)
        assert "active=0 idle=0" in repr(client)  # its connection was closed
        assert (await client.fetch("GET", max_body=5)).body == b"hello"
        # A body that came whole with the head was read already: its connection stays.
        assert (await client.fetch("GET", max_body=1)).body is None
        assert server.connections == 2
        assert "active=0 idle=1" in repr(client)


@pytest.mark.socket
async def test_the_timeout_bounds_the_head_and_the_body(client_for: list[HttpClient]) -> None:
    stalled = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10
    async with RawServer(HANG, stalled, OK) as server:
        client = HttpClient(server.url(), timeout_s=10)
        client_for.append(client)
        for _ in range(2):
            with pytest.raises(UpstreamTimeout) as failed:
                await client.fetch("GET", timeout_s=0.2)
            assert failed.value.message == (
                f"http://127.0.0.1:{server.port} did not answer within 0.2s"
            )
        # Neither connection is reused: the next request opens a third.
        assert (await client.fetch("GET")).body == b"ok"
        assert server.connections == 3


@pytest.mark.socket
async def test_a_cancelled_fetch_drops_its_connection(client_for: list[HttpClient]) -> None:
    async with RawServer(HANG) as server:
        client = HttpClient(server.url(), timeout_s=30)
        client_for.append(client)
        task = asyncio.create_task(client.fetch("GET"))
        async with asyncio.timeout(10):
            await server.received.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with asyncio.timeout(10):
            await server.closed.wait()
        assert "active=0 idle=0" in repr(client)


@pytest.mark.socket
async def test_connect_and_protocol_failures_are_proxy_errors(refused_port: int) -> None:
    with pytest.raises(UpstreamConnectError, match=r"connect to 127\.0\.0\.1:\d+ failed"):
        await fetch("GET", f"http://127.0.0.1:{refused_port}/", timeout_s=10)
    async with RawServer(b"SSH-2.0-OpenSSH_9.6\r\n\r\n") as server:
        with pytest.raises(UpstreamProtocolError, match="malformed response"):
            await fetch("GET", server.url(), timeout_s=10, codec="httptools")


@pytest.mark.socket
@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ([("X-Bad", "a\r\nInjected: 1")], "unsafe header 'X-Bad'"),
        ([("Content-Length", "5")], "'Content-Length' is written by the client itself"),
        ([("Connection", "close")], "'Connection' is written by the client itself"),
    ],
    ids=["crlf", "framing", "connection"],
)
async def test_a_request_that_cannot_be_written_is_refused_before_sending(
    headers: list[tuple[str, str]], why: str
) -> None:
    async with RawServer() as server:
        for http2 in (False, True):
            with pytest.raises(UnsafeHeader) as refused:
                await fetch("GET", server.url(), headers, timeout_s=10, http2=http2)
            assert str(refused.value) == why
    assert server.connections == 0


# -- the testing kit's upstreams: HTTP/1.1 and h2c -----------------------------------------


@pytest.mark.socket
@pytest.mark.parametrize("protocol", ["http1", "h2c"])
async def test_both_protocols_against_a_scripted_upstream(protocol: str) -> None:
    upstream = await start_upstream("svc", protocol=protocol)
    upstream.on("POST", "/echo").reply(201, body="made", headers={"x-made": "1"})
    try:
        url = f"http://127.0.0.1:{upstream.port}/echo"
        http2 = protocol == "h2c"
        headers = [("Accept", "text/plain")]
        answer = await fetch("POST", url, headers, b"payload", timeout_s=10, http2=http2)
        assert (answer.status, answer.body, answer.headers["x-made"]) == (201, b"made", "1")
        received = upstream.last
        assert (received.http_version, received.body) == ("2" if http2 else "1.1", b"payload")
        assert received.headers["accept"] == "text/plain"
        # HTTP/2 sends the authority as :authority, never as Host (RFC 9113 section 8.3.1).
        host = None if http2 else f"127.0.0.1:{upstream.port}"
        assert received.headers.get("host") == host
    finally:
        await upstream.stop()


# -- https ---------------------------------------------------------------------------------


@pytest.mark.socket
async def test_https_verifies_the_certificate_against_the_given_ca(tls_files: TlsFiles) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(OK)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server_tls = tls_files.server_context(["http/1.1"])
    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_tls)
    port = server.sockets[0].getsockname()[1]
    try:
        url = FetchUrl("https", "127.0.0.1", port)
        trusted = tls_context(str(tls_files.ca))
        answer = await fetch("GET", url, timeout_s=10, tls=trusted, sni="localhost")
        assert answer.body == b"ok"
        # The system's store does not know the test CA.
        with pytest.raises(UpstreamConnectError, match="certificate verify failed"):
            await fetch("GET", url, timeout_s=10, sni="localhost")
        # The certificate names 127.0.0.1 too, but not this name.
        assert (await fetch("GET", url, timeout_s=10, tls=trusted)).status == 200
        with pytest.raises(UpstreamConnectError, match="Hostname mismatch"):
            await fetch("GET", url, timeout_s=10, tls=trusted, sni="other.example")
        unchecked = tls_context(verify=False)
        assert (await fetch("GET", url, timeout_s=10, tls=unchecked)).status == 200
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.socket
async def test_h2_over_tls_is_chosen_by_alpn_and_sends_the_authority(tls_files: TlsFiles) -> None:
    h2 = await H2UpstreamServer(tls=tls_files.server_context(["h2"])).start()
    http1_only = await H2UpstreamServer(tls=tls_files.server_context(["http/1.1"])).start()
    try:
        trusted = tls_context(str(tls_files.ca), http2=True)
        url = FetchUrl("https", "127.0.0.1", h2.port, b"/echo?x=1", "api.internal")
        answer = await fetch(
            "GET", url, [("X-Token", "t")], timeout_s=10, tls=trusted, sni="localhost", http2=True
        )
        assert answer.status == 200
        assert answer.body is not None
        echoed = json.loads(answer.body)
        assert (echoed["authority"], echoed["scheme"], echoed["path"]) == (
            "api.internal",
            "https",
            "/echo?x=1",
        )
        assert ["x-token", "t"] in echoed["headers"]
        other = FetchUrl("https", "127.0.0.1", http1_only.port)
        with pytest.raises(UpstreamConnectError, match="did not select h2 by ALPN"):
            await fetch("GET", other, timeout_s=10, tls=trusted, sni="localhost", http2=True)
    finally:
        await h2.stop()
        await http1_only.stop()
