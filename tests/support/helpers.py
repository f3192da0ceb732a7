"""Test fakes and small HTTP/1.1 tools shared by the protocol, property and e2e tests.

- `RecordingConnection`: stands in for `proxy.frontend.connection.ClientConnection` under an
  `Http1Protocol`, recording what the protocol writes and does to the socket.
- `FakeServer`: the `server` such a connection belongs to; its `handle` answers each
  request with a canned `Response` (reading the request body first, as forwarding does).
- `decode_responses`: decodes what the protocol wrote with a real `h11.Connection(CLIENT)`.
- `parse_response` / `RawClient`: a lenient response reader for raw-socket e2e tests, where
  the gateway's output must be inspected byte for byte (and h11 would refuse what it is
  meant to catch).
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import h11
from multidict import CIMultiDict

from proxy.config.model import Http2Config, LimitsConfig, PathNormalization
from proxy.core.body import Body
from proxy.core.client_ip import ClientResolver
from proxy.core.errors import ProxyError
from proxy.core.local_reply import local_reply
from proxy.core.models import Request, Response
from proxy.exchange.dispatch import Reply, Run
from proxy.frontend.connection import ClientConnection, ConnectionPhase, ReadPause
from proxy.frontend.h1 import Http1Protocol

# ------------------------------------------------------------------------ protocol fakes


Handler = Callable[[Request], Awaitable[Response]]
FastResponder = Callable[[Request], tuple[Response | None, ProxyError | None]]


async def echo_handler(request: Request) -> Response:
    """Read the whole body, answer 200 with a JSON summary of the request."""
    data = bytearray()
    try:
        while chunk := await request.body.read():
            data += chunk
    except ProxyError as exc:
        return local_reply(exc, request)
    payload = {
        "method": request.method,
        "target": request.target.decode("latin-1"),
        "body": data.decode("latin-1"),
        "version": request.http_version,
    }
    headers: CIMultiDict[str] = CIMultiDict([("Content-Type", "application/json")])
    return Response(200, headers, Body.from_bytes(json.dumps(payload).encode()))


@dataclass
class FakeServer:
    """What `Http1Protocol` needs of the server: codec, limits, draining, handle."""

    codec: str = "httptools"
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    http2: Http2Config = field(default_factory=Http2Config)
    path_normalization: PathNormalization = field(default_factory=PathNormalization)
    headers_with_underscores: str = "drop"
    client_ip: ClientResolver | None = None
    draining: bool = False
    handler: Handler = echo_handler
    fast: FastResponder | None = None
    requests: list[Request] = field(default_factory=list)  # through `handler`
    fast_requests: list[Request] = field(default_factory=list)  # answered without a task
    seen: list[Request] = field(default_factory=list)  # both, in the order they came

    def start_exchange(self, request: Request, reply: Reply) -> Run | None:
        """The dispatcher's entry (`Dispatcher.start`): with `fast` set, a bodiless
        request runs without a task: `reply` is called on a later loop iteration with
        what `fast` returns (an error as its local reply); anything else goes through
        `handler`, run by the front end's task."""
        self.seen.append(request)
        if self.fast is None or request.body.length != 0 or request.upgrade:
            self.requests.append(request)
            return partial(self.handler, request)
        self.fast_requests.append(request)
        response, error = self.fast(request)
        if response is None:
            assert error is not None
            response = local_reply(error, request)
        asyncio.get_running_loop().call_soon(reply, response)
        return None


class RecordingConnection(ClientConnection):
    """A `ClientConnection` without a socket: records writes, pauses and closes. (A
    subclass, since the compiled front ends accept only a ClientConnection; its own
    constructor, since it has no socket.)

    Mirrors the real one where the protocol can observe it: writes after close are
    dropped, `drain` raises once closed, `set_phase` is a no-op once closed.
    """

    def __init__(self, server: FakeServer, client: tuple[str, int] = ("10.0.0.1", 4321)) -> None:
        self.server = server  # type: ignore[assignment]  # the parts of a Server it needs
        self.limits = server.limits
        self.client = client
        self.scheme = "http"
        self.tls_version = ""
        self.listener = None  # type: ignore[assignment]  # no listener: nothing it says applies
        self.client_cert = None
        self.deadline = 0.0
        self.phase = ConnectionPhase.HEAD
        self.phases: list[ConnectionPhase] = []
        self.write_paused = False
        self.output = bytearray()
        self.pieces_writes = 0  # write_pieces calls (one writev each on a real connection)
        self.reading = True
        self.paused_for: set[ReadPause] = set()
        self.pauses = 0
        self.closed_by: str | None = None  # "close" or "abort"
        self.front_end: Http1Protocol | None = None
        # Made in a test's running loop (an attribute: the compiled front ends read the
        # real connection's slot, past any property of a subclass).
        self.loop = asyncio.get_running_loop()

    def __repr__(self) -> str:
        return f"<RecordingConnection {self.phase.name} wrote={len(self.output)}>"

    @property
    def closed(self) -> bool:
        return self.phase is ConnectionPhase.CLOSED

    def set_phase(self, phase: ConnectionPhase) -> None:
        if self.phase is ConnectionPhase.CLOSED:
            return
        self.phase = phase
        self.phases.append(phase)

    def write(self, data: bytes | memoryview) -> None:
        if not self.closed:
            self.output += data

    def write_pieces(self, pieces: list[bytes | memoryview]) -> None:
        self.pieces_writes += 1
        for piece in pieces:
            self.write(piece)

    def write_head_and_body(self, head: bytes, body: bytes) -> None:
        self.write(head + body)

    async def drain(self) -> None:
        if self.closed:
            raise ConnectionResetError("client went away")

    def pause_reading(self, reason: ReadPause) -> None:
        if not self.paused_for:
            self.pauses += 1
        self.paused_for.add(reason)
        self.reading = False

    def resume_reading(self, reason: ReadPause) -> None:
        self.paused_for.discard(reason)
        self.reading = not self.paused_for

    def pause_for_body(self) -> None:
        self.pause_reading(ReadPause.BODY)

    def resume_for_body(self) -> None:
        self.resume_reading(ReadPause.BODY)

    def close(self) -> None:
        self._lose("close")

    def close_lingering(self) -> None:
        self._lose("close")  # the lingering itself is socket work: tested end to end

    def abort(self) -> None:
        self._lose("abort")

    def _lose(self, how: str) -> None:
        # As asyncio does: connection_lost (and so the front end's on_close) follows on a
        # later loop iteration, and no data is received after close.
        if not self.closed:
            self.closed_by = how
            self.phase = ConnectionPhase.CLOSED
            if self.front_end is not None:
                asyncio.get_running_loop().call_soon(self.front_end.on_close)


def make_protocol(
    codec: str = "httptools",
    *,
    handler: Handler = echo_handler,
    limits: LimitsConfig | None = None,
    fast: FastResponder | None = None,
) -> tuple[Http1Protocol, RecordingConnection, FakeServer]:
    """An `Http1Protocol` over a `RecordingConnection` of a `FakeServer`."""
    server = FakeServer(codec=codec, limits=limits or LimitsConfig(), handler=handler, fast=fast)
    conn = RecordingConnection(server)
    protocol = Http1Protocol(conn)
    conn.front_end = protocol
    return protocol, conn, server


async def settle(protocol: Http1Protocol, *, wait_s: float = 10.0) -> None:
    """Run the loop until the protocol's serving task and fast-path exchange (if any)
    have finished.

    Raises:
        TimeoutError: it did not finish within `wait_s` (a hang).
    """
    async with asyncio.timeout(wait_s):
        for _ in range(3):  # a finished task may have scheduled one more step
            await asyncio.sleep(0)
            while True:
                task = protocol._task
                if task is not None:
                    await asyncio.wait({task})
                elif getattr(protocol, "_inflight", None) is not None:
                    await asyncio.sleep(0)  # a fast-path exchange awaits its callback
                else:
                    break
                await asyncio.sleep(0)


@dataclass
class DecodedResponse:
    """One response as h11 decoded it."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None."""
        wanted = name.lower().encode()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value.decode("latin-1")
        return None

    def json(self) -> Any:
        return json.loads(self.body)


def decode_responses(
    output: bytes, methods: list[str], *, strict: bool = False
) -> list[DecodedResponse]:
    """Decode `output` as the responses to requests with `methods`, in order, using a real
    `h11.Connection(h11.CLIENT)`. Stops early (returning fewer) when the output ends or the
    server closed; raises `h11.RemoteProtocolError` on anything malformed. `strict`: also
    fail (AssertionError) when bytes are left over or a response is cut short.
    """
    responses = _decode(output, methods, strict)
    return responses


def _decode(output: bytes, methods: list[str], strict: bool) -> list[DecodedResponse]:
    client = h11.Connection(h11.CLIENT)
    if output:  # b"" would mean EOF to h11
        client.receive_data(output)
    eof_fed = False  # fed only to end a close-delimited body: h11 refuses EOF before a head
    responses: list[DecodedResponse] = []
    for method in methods:
        if client.our_state is h11.DONE and client.their_state is h11.DONE:
            client.start_next_cycle()
        if client.our_state is not h11.IDLE:
            break
        client.send(h11.Request(method=method, target="/", headers=[("Host", "test")]))
        client.send(h11.EndOfMessage())
        status = 0
        headers: list[tuple[bytes, bytes]] = []
        body = bytearray()
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA and status and not eof_fed:
                client.receive_data(b"")
                eof_fed = True
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = list(event.headers.raw_items())
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                responses.append(DecodedResponse(status, headers, bytes(body)))
                break
            else:  # ConnectionClosed or NEED_DATA: the output ended
                if strict:
                    assert status == 0, f"response cut short: {output[-200:]!r}"
                return responses
    if strict:
        assert client.trailing_data[0] == b"", f"bytes left over: {client.trailing_data!r}"
    return responses


# ----------------------------------------------------------------------- raw-socket tools


@dataclass
class RawResponse:
    """A response read off a raw socket."""

    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    chunked: bool = False
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None."""
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def header_all(self, name: str) -> list[str]:
        """Every value of header `name` (case-insensitive)."""
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


class Incomplete(Exception):
    """More bytes are needed to parse a response."""


def _parse_headers(lines: list[bytes]) -> list[tuple[str, str]]:
    headers = []
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep:
            raise ValueError(f"malformed header line {line!r}")
        headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))
    return headers


def parse_response(
    data: bytes, *, head: bool = False, eof: bool = False
) -> tuple[RawResponse, int]:
    """Parse one response from the start of `data`; returns it and the bytes used.

    `head`: the response answers a HEAD (no body). `eof`: the peer closed after `data`
    (ends a close-delimited body).

    Raises:
        Incomplete: `data` does not hold a whole response yet.
        ValueError: the bytes are not a response.
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if eof and data:
            raise ValueError(f"truncated response head {data[:200]!r}")
        raise Incomplete
    lines = data[:end].split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    code, _, reason = rest.partition(b" ")
    if not version.startswith(b"HTTP/") or not code.isdigit():
        raise ValueError(f"not a status line: {lines[0]!r}")
    status = int(code)
    headers = _parse_headers(lines[1:])
    response = RawResponse(version.decode()[5:], status, reason.decode("latin-1"), headers, b"")
    pos = end + 4
    if head or 100 <= status < 200 or status in (204, 304):
        return response, pos
    te = response.header("transfer-encoding")
    length = response.header("content-length")
    if te is not None and te.lower() == "chunked":
        response.chunked = True
        body = bytearray()
        while True:
            line_end = data.find(b"\r\n", pos)
            if line_end < 0:
                raise Incomplete
            size = int(data[pos:line_end].split(b";")[0], 16)
            pos = line_end + 2
            if size == 0:
                trailer_end = data.find(b"\r\n\r\n", pos - 2)
                if trailer_end < 0:
                    raise Incomplete
                trailer_lines = data[pos:trailer_end].split(b"\r\n") if trailer_end > pos else []
                response.trailers = _parse_headers([t for t in trailer_lines if t])
                response.body = bytes(body)
                return response, trailer_end + 4
            if len(data) < pos + size + 2:
                raise Incomplete
            body += data[pos : pos + size]
            if data[pos + size : pos + size + 2] != b"\r\n":
                raise ValueError("chunk not followed by CRLF")
            pos += size + 2
    if length is not None:
        size = int(length)
        if len(data) < pos + size:
            raise Incomplete
        response.body = data[pos : pos + size]
        return response, pos + size
    if not eof:
        raise Incomplete
    response.body = data[pos:]
    return response, len(data)


def parse_all(data: bytes, *, head: bool = False) -> list[RawResponse]:
    """Every response in `data` (all the bytes a closed connection sent)."""
    responses = []
    while data:
        response, used = parse_response(data, head=head, eof=True)
        responses.append(response)
        data = data[used:]
    return responses


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


class RawClient:
    """A raw TCP client: send bytes, read responses one at a time, observe the close.

    Built on a plain non-blocking socket rather than StreamReader, which raises a reset
    before handing over the bytes that arrived ahead of it: a test must see a response
    the gateway sent just before it closed. Its waits (`wait_s`) bound a hang, not how
    fast a busy machine answers: 10 s by default.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.eof = False
        self.reset = False  # the connection ended with a reset, not a FIN
        self._loop = asyncio.get_running_loop()

    @classmethod
    async def connect(cls, address: tuple[str, int]) -> RawClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.get_running_loop().sock_connect(sock, address)
        return cls(sock)

    async def __aenter__(self) -> RawClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def send(self, data: bytes) -> None:
        """Send `data`.

        Raises:
            ConnectionError: the gateway closed or reset the connection.
        """
        await self._loop.sock_sendall(self.sock, data)

    def shutdown_write(self) -> None:
        """Half-close: the gateway reads EOF."""
        self.sock.shutdown(socket.SHUT_WR)

    async def _read_more(self) -> None:
        try:
            data = await self._loop.sock_recv(self.sock, 65536)
        except ConnectionError:
            self.reset = True
            data = b""
        if not data:
            self.eof = True
        self.buffer += data

    async def response(self, *, head: bool = False, wait_s: float = 10.0) -> RawResponse:
        """The next response.

        Raises:
            TimeoutError: none arrived within `wait_s`.
            ConnectionError: the connection closed before a whole response.
        """
        async with asyncio.timeout(wait_s):
            while True:
                try:
                    response, used = parse_response(bytes(self.buffer), head=head, eof=self.eof)
                except Incomplete:
                    if self.eof:
                        how = "reset" if self.reset else "closed"
                        raise ConnectionError(f"{how} after {bytes(self.buffer)[:200]!r}") from None
                    await self._read_more()
                    continue
                del self.buffer[:used]
                return response

    async def read_exactly(self, size: int, *, wait_s: float = 10.0) -> bytes:
        """The next `size` raw bytes (fewer if the connection ends first)."""
        async with asyncio.timeout(wait_s):
            while len(self.buffer) < size and not self.eof:
                await self._read_more()
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def read_until_closed(self, wait_s: float = 10.0) -> bytes:
        """Everything until the gateway closes (raises TimeoutError if it does not)."""
        async with asyncio.timeout(wait_s):
            while not self.eof:
                await self._read_more()
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    async def closed(self, wait_s: float = 10.0) -> bool:
        """True when the peer closes within `wait_s` with no further bytes; False when
        it stays open. Raises AssertionError when unexpected bytes arrive first."""
        try:
            async with asyncio.timeout(wait_s):
                while not self.eof:
                    await self._read_more()
        except TimeoutError:
            return False
        assert not self.buffer, f"unexpected bytes before close: {bytes(self.buffer)[:200]!r}"
        return True

    def close(self) -> None:
        self.sock.close()


async def eventually(predicate: Callable[[], bool], what: str, within_s: float = 10.0) -> None:
    """Wait for `predicate` to hold: for state the gateway changes on its own (a socket
    closing, a pool emptying), which no event of ours announces. `within_s` bounds a
    hang, not how fast a busy machine gets there."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not predicate():
        if loop.time() >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
