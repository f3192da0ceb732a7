"""A real HTTP/2 upstream server for tests (asyncio + h2), on 127.0.0.1:0: h2c with prior
knowledge, or h2 over TLS when given a server context (ALPN "h2").

Paths (the response body is sent as the client's window allows):
  /echo...          200, JSON of what arrived: method, path, authority, scheme, headers,
                    body (text, first 1 MiB), body_size, body_sha256
  /bytes/N          N bytes of b"x" with content-length
  /download/N       the first N bytes of `tests.upstream.pattern_block()` repeated
  /sink             reads the body; answers JSON {"size", "sha256"}
  /status/CODE      that status, small body
  /slow/MS          answers after MS milliseconds
  /slowbody/MS      head at once, body after MS milliseconds
  /held             answers 200 once the test has called `release_held()` (never, if not)
  /heldbody         head at once, body once the test has called `release_held()`
  /trailers         gRPC-style: content-type application/grpc, a body, then trailers
                    grpc-status: 0, grpc-message: ok
  /trailers-only    gRPC-style error: one HEADERS frame with END_STREAM carrying :status
                    200, grpc-status: 5, grpc-message: not found
  /reset            RST_STREAM INTERNAL_ERROR instead of an answer
  /resetbody        head and 1000 body bytes, then RST_STREAM INTERNAL_ERROR
  /goaway           while `goaways` is above 0 (then decremented): GOAWAY with a
                    last_stream_id below this stream, which is never answered; streams
                    below it are still served, then the connection closes. Later /goaway
                    requests are answered like /echo.
  /stall            reads the head, never acknowledges body data, never answers
Options: `tls` (server context), `max_concurrent_streams`, `refuse_streams` (the first N
streams, server-wide, get RST_STREAM REFUSED_STREAM right after their head),
`initial_window` (the server's receive window per stream, default 65535).
Every request is recorded in `requests`; `response_bytes_sent` counts body bytes sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import ssl
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from tests.support.upstreams.fast import pattern_chunks
from tests.support.upstreams.h1 import Gate

SEND_CHUNK_BYTES = 16 * 1024
Headers = list[tuple[bytes, bytes]]


@dataclass
class H2Recorded:
    """One request as the upstream received it."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body_size: int = 0
    connection: int = 0  # which connection (1-based, in accept order)
    stream_id: int = 0

    def header(self, name: str) -> str | None:
        """The first value of header `name` (lower-case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


class _StreamState:
    def __init__(self, stream_id: int, headers: Headers) -> None:
        self.stream_id = stream_id
        self.headers = {name: value for name, value in headers}
        self.all_headers = headers
        self.body = bytearray()
        self.size = 0
        self.sha = hashlib.sha256()
        self.ended = asyncio.Event()
        self.window = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


class _Connection(asyncio.Protocol):
    def __init__(self, server: H2UpstreamServer) -> None:
        self.server = server
        self.index = 0
        self.transport: asyncio.Transport | None = None
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config)
        self.streams: dict[int, _StreamState] = {}
        self.goaway_last: int | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = typing.cast(asyncio.Transport, transport)
        if self.server.stopping:
            # Accepted as the server stopped (asyncio hands an accepted socket over a loop
            # turn later, after `stop` closed the open ones): closed here, not leaked.
            self.transport.abort()
            return
        self.server.connections += 1
        self.index = self.server.connections
        self.server.open.add(self)
        settings: dict[h2.settings.SettingCodes | int, int] = {}
        if self.server.max_concurrent_streams is not None:
            settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = (
                self.server.max_concurrent_streams
            )
        if self.server.initial_window is not None:
            settings[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE] = self.server.initial_window
        self.h2.initiate_connection()
        if settings:
            self.h2.update_settings(settings)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.open.discard(self)
        for task in list(self.tasks):
            task.cancel()
        for stream in self.streams.values():
            stream.window.set()
            stream.ended.set()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.flush()
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            self.handle(event)
        self.flush()

    def handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self.on_request(event.stream_id or 0, list(event.headers or []))
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id or 0)
            size = event.flow_controlled_length or 0
            if stream is None:
                return
            data = event.data or b""
            stream.size += len(data)
            stream.sha.update(data)
            if len(stream.body) < 1024 * 1024:
                stream.body += data
            if stream.headers.get(b":path") != b"/stall":
                with contextlib.suppress(h2.exceptions.StreamClosedError):
                    self.h2.acknowledge_received_data(size, event.stream_id or 0)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                stream.ended.set()
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.pop(event.stream_id or 0, None)
            if stream is not None:
                self.server.resets_received.append(event.error_code)
                if stream.task is not None:
                    stream.task.cancel()
            self.maybe_close()
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            for stream in self.streams.values():
                stream.window.set()
        elif isinstance(event, h2.events.ConnectionTerminated) and self.transport is not None:
            self.transport.close()

    def on_request(self, stream_id: int, headers: Headers) -> None:
        server = self.server
        if server.refuse_streams > 0:
            server.refuse_streams -= 1
            server.refused += 1
            self.h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        stream = _StreamState(stream_id, headers)
        self.streams[stream_id] = stream
        task = asyncio.get_running_loop().create_task(self.serve(stream))
        stream.task = task
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def serve(self, stream: _StreamState) -> None:
        try:
            await self.respond(stream)
        except (asyncio.CancelledError, h2.exceptions.StreamClosedError, ConnectionError):
            pass
        except h2.exceptions.ProtocolError:
            pass
        finally:
            if self.streams.get(stream.stream_id) is stream:
                del self.streams[stream.stream_id]
            self.maybe_close()

    def maybe_close(self) -> None:
        # After our GOAWAY, the connection closes once the streams below it are done.
        last = self.goaway_last
        if last is None or self.transport is None:
            return
        if not any(sid <= last for sid in self.streams):
            self.transport.close()

    async def respond(self, stream: _StreamState) -> None:
        server = self.server
        sid = stream.stream_id
        path = stream.headers.get(b":path", b"/").decode()
        parts = path.split("?")[0].strip("/").split("/")
        record = H2Recorded(
            stream.headers.get(b":method", b"").decode(),
            path,
            [(n.decode(), v.decode()) for n, v in stream.all_headers],
            connection=self.index,
            stream_id=sid,
        )
        server.requests.append(record)
        if parts[0] == "goaway" and server.goaways > 0:
            server.goaways -= 1
            # Written as a raw frame: h2 would close its own state machine on sending
            # GOAWAY and refuse to finish the streams below it.
            self.goaway_last = max(0, sid - 2)
            frame = GoAwayFrame(0)
            frame.last_stream_id = self.goaway_last
            frame.error_code = 0
            assert self.transport is not None
            self.flush()
            self.transport.write(frame.serialize())
            self.maybe_close()
            return
        if parts[0] == "stall":
            await asyncio.Event().wait()
        if parts[0] == "reset":
            self.h2.reset_stream(sid, ErrorCodes.INTERNAL_ERROR)
            self.flush()
            return
        if parts[0] == "trailers-only":
            self.h2.send_headers(
                sid,
                [
                    (b":status", b"200"),
                    (b"content-type", b"application/grpc"),
                    (b"grpc-status", b"5"),
                    (b"grpc-message", b"not found"),
                ],
                end_stream=True,
            )
            self.flush()
            return
        await stream.ended.wait()
        record.body_size = stream.size
        if parts[0] == "slow":
            await asyncio.sleep(int(parts[1]) / 1000)
            await self.answer(stream, 200, [b"slow"])
        elif parts[0] == "held":
            if await self.server._gate.wait():
                await self.answer(stream, 200, [b"held"])
        elif parts[0] == "heldbody":
            self.send_head(stream, 200, [(b"content-length", b"4")])
            if await self.server._gate.wait():
                await self.send_body(stream, [b"late"])
        elif parts[0] == "slowbody":
            self.send_head(stream, 200, [(b"content-length", b"4")])
            await asyncio.sleep(int(parts[1]) / 1000)
            await self.send_body(stream, [b"late"])
        elif parts[0] == "bytes":
            await self.answer(stream, 200, [b"x" * int(parts[1])])
        elif parts[0] == "download":
            total = int(parts[1])
            self.send_head(stream, 200, [(b"content-length", str(total).encode())])
            await self.send_body(stream, (bytes(piece) for piece in pattern_chunks(total)))
        elif parts[0] == "sink":
            payload = {"size": stream.size, "sha256": stream.sha.hexdigest()}
            await self.answer(stream, 200, [json.dumps(payload).encode()])
        elif parts[0] == "status":
            await self.answer(stream, int(parts[1]), [f"status {parts[1]}".encode()])
        elif parts[0] == "trailers":
            self.send_head(stream, 200, [(b"content-type", b"application/grpc")])
            await self.send_body(stream, [b"hello"], end=False)
            self.h2.send_headers(
                sid, [(b"grpc-status", b"0"), (b"grpc-message", b"ok")], end_stream=True
            )
            self.flush()
        elif parts[0] == "resetbody":
            self.send_head(stream, 200, [(b"content-length", b"100000")])
            await self.send_body(stream, [b"r" * 1000], end=False)
            await asyncio.sleep(0.05)
            self.h2.reset_stream(sid, ErrorCodes.INTERNAL_ERROR)
            self.flush()
        else:
            payload = {
                "method": record.method,
                "path": path,
                "authority": stream.headers.get(b":authority", b"").decode(),
                "scheme": stream.headers.get(b":scheme", b"").decode(),
                "headers": record.headers,
                "body": bytes(stream.body).decode("latin-1"),
                "body_size": stream.size,
                "body_sha256": stream.sha.hexdigest(),
            }
            body = json.dumps(payload).encode()
            await self.answer(stream, 200, [body], [(b"content-type", b"application/json")])

    def send_head(
        self, stream: _StreamState, status: int, extra: Headers, end: bool = False
    ) -> None:
        headers = [(b":status", str(status).encode()), *extra]
        self.h2.send_headers(stream.stream_id, headers, end_stream=end)
        self.flush()

    async def answer(
        self, stream: _StreamState, status: int, chunks: list[bytes], extra: Headers | None = None
    ) -> None:
        length = sum(len(c) for c in chunks)
        head_only = stream.headers.get(b":method") == b"HEAD"  # RFC 9110 section 9.3.2
        fields = [(b"content-length", str(length).encode()), *(extra or [])]
        self.send_head(stream, status, fields, end=head_only)
        if not head_only:
            await self.send_body(stream, chunks)

    async def send_body(
        self, stream: _StreamState, chunks: Iterable[bytes], end: bool = True
    ) -> None:
        sid = stream.stream_id
        for data in chunks:
            view = memoryview(data)
            while view:
                window = min(self.h2.local_flow_control_window(sid), SEND_CHUNK_BYTES)
                if window <= 0:
                    stream.window.clear()
                    await stream.window.wait()
                    if self.transport is None or self.transport.is_closing():
                        raise ConnectionError("closed")
                    continue
                piece = view[:window].tobytes()
                self.h2.send_data(sid, piece)
                self.server.response_bytes_sent += len(piece)
                view = view[window:]
                self.flush()
                await asyncio.sleep(0)
        if end:
            self.h2.end_stream(sid)
            self.flush()


@dataclass
class H2UpstreamServer:
    """Start with `await server.start()`; `server.port` is then bound."""

    tls: ssl.SSLContext | None = None
    max_concurrent_streams: int | None = None
    refuse_streams: int = 0
    initial_window: int | None = None
    goaways: int = 1
    requests: list[H2Recorded] = field(default_factory=list)
    connections: int = 0
    refused: int = 0
    response_bytes_sent: int = 0
    resets_received: list[int] = field(default_factory=list)
    open: set[_Connection] = field(default_factory=set)
    stopping: bool = False  # `stop` has begun: a connection accepted now is closed at once
    port: int = 0
    _gate: Gate = field(default_factory=Gate)  # see /held
    _server: asyncio.Server | None = None

    def release_held(self) -> None:
        """Let /held and /heldbody requests be answered, those waiting and any later ones
        (from any thread: the server's loop does it)."""
        self._gate.release()

    async def start(self, port: int = 0) -> H2UpstreamServer:
        loop = asyncio.get_running_loop()
        self.stopping = False  # (started again after a stop: the tests that restart one)
        self._gate.bind()
        self._server = await loop.create_server(
            lambda: _Connection(self), "127.0.0.1", port, ssl=self.tls
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        """Stop listening and close every open connection (held requests unanswered)."""
        self.stopping = True
        self._gate.close()
        if self._server is not None:
            self._server.close()
        for conn in list(self.open):
            for task in list(conn.tasks):
                task.cancel()
            if conn.transport is not None:
                conn.transport.abort()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        self._server = None
