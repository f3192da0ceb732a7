"""Harness for tests/e2e/test_linear_cost.py: what a batch of client units costs the worker.

A one-worker gateway runs as a subprocess (tests/support/gateway_process.py); the supervising
parent forks the worker, whose CPU time the kernel keeps in nanoseconds in
/proc/PID/task/TID/schedstat (the first field: time spent on a CPU). Comparing CPU time,
not wall time, keeps the verdict independent of what else the machine is doing.

`HeldUpstream` is an HTTP/1.1 and WebSocket upstream (httptools, in a thread) that counts
what reaches it and holds the answer to a big request until the test releases it, so a
test can prove, by the order of events alone, that another connection was served while
the big request was in flight:

    big request sent -> upstream has begun receiving it (`started`) -> probe sent on
    another connection -> probe answered -> `release()` -> big request answered

Its answers are JSON: what arrived (`Received`), so a test also checks that all the
units it sent went through (a gateway that refused them early would look cheap).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

import h2.config
import h2.connection
import h2.events
import httptools

from tests.support.gateway_process import child_pids, wait_until

SOCKET_TIMEOUT_S = 30.0
EVENT_TIMEOUT_S = 30.0
HELD_PREFIX = b"/held"
PROBE_PATH = "/probe"
# RFC 6455 section 1.3
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
WS_DONE_FRAME = b"\x81\x04done"  # an unmasked text frame: the upstream's answer


def cpu_ns(pid: int) -> int:
    """CPU time `pid` has used so far, all its threads, in nanoseconds (schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            total += int((task / "schedstat").read_text().split()[0])
    return total


def worker_pid(supervisor: int) -> int:
    """The one worker a `--workers 1` gateway's supervisor has forked."""
    wait_until(lambda: len(child_pids(supervisor)) == 1, EVENT_TIMEOUT_S, "the worker")
    (pid,) = child_pids(supervisor)
    return pid


@dataclass
class Received:
    """What the upstream counted of one request (its JSON answer)."""

    target: str = ""
    headers: int = 0  # header fields
    body: int = 0  # body bytes
    cookies: int = 0  # name=value pairs over all Cookie fields
    forwarded_for: int = 0  # entries of X-Forwarded-For
    query: int = 0  # query parameters
    websocket: int = 0  # bytes received in the tunnel


class _Connection(asyncio.Protocol):
    """One upstream connection: requests parsed by httptools, answered in order."""

    def __init__(self, owner: HeldUpstream) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.current = Received()
        self.url = b""
        self.websocket_key = b""
        self.tunnel_expected = -1  # bytes the tunnel waits for; -1: not a tunnel

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.tunnel_expected >= 0:
            self._tunnel_data(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._accept_websocket()
            rest = data[upgrade.args[0] :]
            if rest:
                self._tunnel_data(rest)

    # -- httptools callbacks -------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.current = Received()
        self.url = b""
        self.websocket_key = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        current = self.current
        current.headers += 1
        lower = name.lower()
        if lower == b"cookie":
            current.cookies += value.count(b";") + 1
        elif lower == b"x-forwarded-for":
            current.forwarded_for += value.count(b",") + 1
        elif lower == b"sec-websocket-key":
            self.websocket_key = value

    def on_headers_complete(self) -> None:
        current = self.current
        current.target = self.url.decode("latin-1")
        path, _, query = current.target.partition("?")
        current.query = len(parse_qsl(query, keep_blank_values=True))
        if path.encode().startswith(HELD_PREFIX) and not self.websocket_key:
            self.owner.started.set()

    def on_body(self, body: bytes) -> None:
        self.current.body += len(body)

    def on_message_complete(self) -> None:
        if self.websocket_key:
            return  # answered with 101 once httptools hands the connection over
        received = self.current
        answer = self._response(json.dumps(asdict(received)).encode())
        if received.target.encode().startswith(HELD_PREFIX):
            self.owner.hold(lambda: self._write(answer))
        else:
            self._write(answer)

    # -- WebSocket -------------------------------------------------------------------------
    def _accept_websocket(self) -> None:
        accept = base64.b64encode(hashlib.sha1(self.websocket_key.strip() + WS_GUID).digest())
        self._write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        query = dict(parse_qsl(self.current.target.partition("?")[2]))
        self.tunnel_expected = int(query["bytes"])

    def _tunnel_data(self, data: bytes) -> None:
        current = self.current
        if not current.websocket:
            self.owner.started.set()
        current.websocket += len(data)
        if current.websocket == self.tunnel_expected:
            self.owner.hold(lambda: self._write(WS_DONE_FRAME))

    # -- output ----------------------------------------------------------------------------
    @staticmethod
    def _response(body: bytes) -> bytes:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        return head % len(body) + body

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)


@dataclass
class HeldUpstream:
    """The upstream (see the module docstring). `started` is set when a held request (a
    path starting /held, or a tunnel's first bytes) begins to arrive; its answer waits for
    `release()`. Use `serve_in_thread` from tests/support/upstreams/h1.py to run it."""

    port: int = 0
    started: threading.Event = field(default_factory=threading.Event)
    _held: list[Callable[[], None]] = field(default_factory=list)
    _released: bool = False
    _server: asyncio.Server | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    async def start(self, port: int = 0) -> HeldUpstream:
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(lambda: _Connection(self), "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def arm(self) -> None:
        """Start a batch: the next held answer waits for `release()`."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._arm)
        done = threading.Event()
        self._loop.call_soon_threadsafe(done.set)
        assert done.wait(EVENT_TIMEOUT_S)

    def _arm(self) -> None:
        self.started.clear()
        self._released = False

    def hold(self, answer: Callable[[], None]) -> None:
        """(On the upstream's loop.) Answer now if released, else when released."""
        if self._released:
            answer()
        else:
            self._held.append(answer)

    def release(self) -> None:
        """Let the held answers go."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._release)

    def _release(self) -> None:
        self._released = True
        held, self._held = self._held, []
        for answer in held:
            answer()


# -- clients ---------------------------------------------------------------------------------


def connect(port: int) -> socket.socket:
    """A blocking TCP connection to the gateway."""
    return socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S)


@contextlib.contextmanager
def sending(sock: socket.socket, payload: bytes) -> Iterator[None]:
    """`sendall(payload)` in a thread while the block reads (a big request may fill the
    socket buffers before the gateway answers anything)."""
    error: list[BaseException] = []

    def send() -> None:
        try:
            sock.sendall(payload)
        except OSError as exc:
            error.append(exc)

    thread = threading.Thread(target=send, name="sender", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join(SOCKET_TIMEOUT_S)
    assert not thread.is_alive(), "the gateway stopped reading the request"
    assert not error, error


class ResponseReader:
    """Reads HTTP/1.1 responses (Content-Length framed, as the gateway sends small
    ones) off a blocking socket, in order."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def _fill(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise AssertionError(f"the gateway closed the connection: {bytes(self.buffer)!r}")
        self.buffer += data

    def read(self) -> tuple[int, bytes]:
        """The next response's status and body."""
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            self._fill()
        head = bytes(self.buffer[:end]).decode("latin-1")
        del self.buffer[: end + 4]
        status = int(head.split(" ", 2)[1])
        length = 0
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        while len(self.buffer) < length:
            self._fill()
        body = bytes(self.buffer[:length])
        del self.buffer[:length]
        return status, body

    def read_exactly(self, size: int) -> bytes:
        """The next `size` raw bytes (a tunnel's)."""
        while len(self.buffer) < size:
            self._fill()
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data


def probe(port: int) -> None:
    """A request on a connection of its own, answered with 200.

    Raises:
        AssertionError: it was not.
    """
    with connect(port) as sock:
        sock.sendall(b"GET " + PROBE_PATH.encode() + b" HTTP/1.1\r\nHost: probe\r\n\r\n")
        status, body = ResponseReader(sock).read()
    assert status == 200, body


def received(body: bytes) -> Received:
    """The upstream's JSON answer."""
    return Received(**json.loads(body))


# -- HTTP/2 ----------------------------------------------------------------------------------

_FRAME_HEADER = struct.Struct(">BHBBL")  # RFC 9113 section 4.1
DATA_FRAME = 0x0
END_STREAM = 0x1


def frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    """One HTTP/2 frame, framed by hand: a client library's per-frame work would cost the
    test more than the gateway."""
    size = len(payload)
    return _FRAME_HEADER.pack(size >> 16, size & 0xFFFF, kind, flags, stream_id) + payload


class H2Client:
    """A blocking h2c client (prior knowledge): the h2 library frames the request heads
    and reads the responses; bulk DATA frames are made by `frame`. The stream windows of
    the requests are the gateway's initial ones: the tests send less than that."""

    def __init__(self, port: int) -> None:
        self.sock = connect(port)
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())
        self.status: dict[int, int] = {}
        self.bodies: dict[int, bytearray] = {}
        self.ended: set[int] = set()

    def close(self) -> None:
        self.sock.close()

    def send_headers(self, stream_id: int, fields: list[tuple[bytes, bytes]], *, end: bool) -> None:
        self.conn.send_headers(stream_id, fields, end_stream=end)
        self.sock.sendall(self.conn.data_to_send())

    def read_until(self, done: Callable[[], bool]) -> None:
        """Read and handle frames until `done()`.

        Raises:
            AssertionError: the gateway reset a stream or closed the connection first.
        """
        while not done():
            data = self.sock.recv(1 << 20)
            if not data:
                raise AssertionError("the gateway closed the connection")
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    headers = dict(event.headers or [])
                    self.status[event.stream_id] = int(headers[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    self.bodies.setdefault(event.stream_id, bytearray()).extend(event.data or b"")
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length or 0, event.stream_id
                    )
                elif isinstance(event, h2.events.StreamEnded):
                    self.ended.add(event.stream_id)
                elif isinstance(event, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                    raise AssertionError(f"the gateway stopped the exchange: {event!r}")
            self.sock.sendall(self.conn.data_to_send())

    def response(self, stream_id: int) -> tuple[int, bytes]:
        """Read until `stream_id` has ended; its status and body."""
        self.read_until(lambda: stream_id in self.ended)
        return self.status[stream_id], bytes(self.bodies.get(stream_id, b""))
