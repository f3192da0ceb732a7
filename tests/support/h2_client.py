"""A raw HTTP/2 client over a real socket, built on the h2 library, for the edge cases and
attacks that httpx and curl will not produce: every frame is the test's choice, and every
event the gateway sends back is kept."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Self

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
import hyperframe.exceptions
import hyperframe.frame

READ_BYTES = 65536
CLIENT_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 section 3.4


@dataclass
class StreamResult:
    """What came back on one stream."""

    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[bytes, bytes]] | None = None
    ended: bool = False
    reset_code: int | None = None

    def header(self, name: bytes) -> bytes | None:
        """The first value of `name`, or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


class _SocketClient:
    """What both clients share: the socket, the reader task, waiting on what arrives."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.closed = False
        self._changed = asyncio.Event()
        self._reader_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the socket and stop reading."""
        if self._reader_task is not None:
            self._reader_task.cancel()
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()

    async def send_raw(self, data: bytes) -> None:
        """Write bytes as they are; a connection the gateway closed just sets `closed`."""
        if self.closed:
            return
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, ssl.SSLError):
            self.closed = True
            self._changed.set()

    async def wait_for(
        self, what: str, predicate: Callable[[], bool], timeout_s: float = 10.0
    ) -> None:
        """Wait until `predicate()` is true (re-checked as input arrives).

        Raises:
            AssertionError: the connection closed first.
            TimeoutError: `timeout_s` passed.
        """
        async with asyncio.timeout(timeout_s):
            while not predicate():
                if self.closed:
                    raise AssertionError(f"connection closed while waiting for {what}")
                self._changed.clear()
                await self._changed.wait()

    async def _read_chunk(self) -> bytes | None:
        """The next bytes from the gateway; None (and `closed` set) at EOF or reset."""
        try:
            data = await self.reader.read(READ_BYTES)
        except (ConnectionError, ssl.SSLError):
            data = b""
        if not data:
            self.closed = True
            self._changed.set()
            return None
        return data

    async def _read_h2(
        self,
        conn: h2.connection.H2Connection,
        on_event: Callable[[h2.events.Event], object],
        after_read: Callable[[], Awaitable[None]],
    ) -> None:
        """Feed what arrives to `conn` until EOF or a protocol error (then `closed`):
        each event goes to `on_event`, and `after_read` runs after each read (sending
        what h2 queued in answer)."""
        while True:
            data = await self._read_chunk()
            if data is None:
                return
            try:
                events = conn.receive_data(data)
            except h2.exceptions.ProtocolError:
                self.closed = True
                self._changed.set()
                return
            for event in events:
                on_event(event)
            await after_read()
            self._changed.set()

    async def wait_closed(self, timeout_s: float = 10.0) -> None:
        """Wait until the gateway closes the connection (EOF or reset)."""
        async with asyncio.timeout(timeout_s):
            while not self.closed:
                self._changed.clear()
                await self._changed.wait()


class H2Client(_SocketClient):
    """`async with await H2Client.connect(host, port) as client:` then `request`, or drive
    `conn` (the h2 connection) directly and call `flush` / `read_events`."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        auto_ack: bool = True,
    ) -> None:
        super().__init__(reader, writer)
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.streams: dict[int, StreamResult] = {}
        self.events: list[h2.events.Event] = []
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.remote_settings: dict[int, int] = {}
        self.auto_ack = auto_ack  # hand the window back as data arrives

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        settings: dict[int, int] | None = None,
        auto_ack: bool = True,
        preface: bool = True,
    ) -> H2Client:
        """Open a connection; send the preface and SETTINGS unless `preface` is False."""
        reader, writer = await asyncio.open_connection(
            host, port, ssl=ssl_context, server_hostname="localhost" if ssl_context else None
        )
        client = cls(reader, writer, auto_ack=auto_ack)
        if preface:
            if settings:
                client.conn.local_settings = h2.settings.Settings(
                    client=True,
                    initial_values={h2.settings.SettingCodes(k): v for k, v in settings.items()},
                )
            client.conn.initiate_connection()
            await client.flush()
        client._reader_task = asyncio.get_running_loop().create_task(client._read_forever())
        return client

    async def flush(self) -> None:
        """Send what h2 has queued."""
        data = self.conn.data_to_send()
        if data:
            await self.send_raw(data)

    async def _read_forever(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await self._read_h2(self.conn, self._record, self.flush)

    def _record(self, event: h2.events.Event) -> None:
        self.events.append(event)
        if isinstance(event, h2.events.ResponseReceived):
            result = self.streams.setdefault(event.stream_id, StreamResult())
            for name, value in event.headers or []:
                if name == b":status":
                    result.status = int(value)
                else:
                    result.headers.append((name, value))
        elif isinstance(event, h2.events.DataReceived):
            result = self.streams.setdefault(event.stream_id, StreamResult())
            result.body += event.data or b""
            if self.auto_ack and event.flow_controlled_length:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.TrailersReceived):
            self.streams.setdefault(event.stream_id, StreamResult()).trailers = list(
                event.headers or []
            )
        elif isinstance(event, h2.events.StreamEnded):
            self.streams.setdefault(event.stream_id, StreamResult()).ended = True
        elif isinstance(event, h2.events.StreamReset):
            self.streams.setdefault(event.stream_id, StreamResult()).reset_code = int(
                event.error_code or 0
            )
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            for code, setting in event.changed_settings.items():
                self.remote_settings[int(code)] = setting.new_value

    def send_request(
        self,
        path: str,
        *,
        method: str = "GET",
        authority: str = "gateway.test",
        headers: list[tuple[str, str]] | None = None,
        end_stream: bool = True,
    ) -> int:
        """Queue a request's HEADERS (call `flush`); returns the stream id."""
        stream_id = self.conn.get_next_available_stream_id()
        request_headers = [
            (":method", method),
            (":scheme", "http"),
            (":authority", authority),
            (":path", path),
            *(headers or []),
        ]
        self.conn.send_headers(stream_id, request_headers, end_stream=end_stream)
        self.streams[stream_id] = StreamResult()
        return stream_id

    async def request(
        self,
        path: str,
        *,
        method: str = "GET",
        authority: str = "gateway.test",
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
        trailers: list[tuple[str, str]] | None = None,
        timeout_s: float = 10.0,
    ) -> StreamResult:
        """One whole exchange: send, then wait for the stream to end or be reset."""
        stream_id = self.send_request(
            path,
            method=method,
            authority=authority,
            headers=headers,
            end_stream=not body and not trailers,
        )
        await self.flush()
        if body:
            await self.send_body(stream_id, body, end=not trailers)
        if trailers:
            self.conn.send_headers(stream_id, trailers, end_stream=True)
            await self.flush()
        result = self.streams[stream_id]
        await self.wait_for(
            f"stream {stream_id}",
            lambda: result.ended or result.reset_code is not None,
            timeout_s,
        )
        return result

    async def send_body(self, stream_id: int, body: bytes, *, end: bool = True) -> None:
        """Send `body` as the gateway's windows allow."""
        view = memoryview(body)
        while view:
            window = min(
                self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size
            )
            if window <= 0:
                self._changed.clear()
                async with asyncio.timeout(10):
                    await self._changed.wait()
                continue
            piece = view[:window]
            view = view[window:]
            self.conn.send_data(stream_id, piece.tobytes(), end_stream=end and not view)
            await self.flush()
        if end and not body:
            self.conn.end_stream(stream_id)
            await self.flush()


# --- a frame-level client for the attack tests ----------------------------------------------


class RawH2Client(_SocketClient):
    """An HTTP/2 client with no state machine: the test writes whatever frames it likes
    (`send_frames`, `send_raw`, headers encoded by `headers_frame`) and every frame the
    gateway sends back is parsed with hyperframe and kept, so a GOAWAY or RST_STREAM is
    seen even after the test broke every rule. Only the server's SETTINGS are ACKed (when
    `ack_settings`), and response header blocks are decoded with the connection's HPACK
    decoder so `status(stream_id)` works."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        ack_settings: bool = True,
    ) -> None:
        super().__init__(reader, writer)
        self.ack_settings = ack_settings
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.frames: list[hyperframe.frame.Frame] = []
        self.goaway: hyperframe.frame.GoAwayFrame | None = None
        self.resets: dict[int, int] = {}
        self.responses: dict[int, list[tuple[bytes, bytes]]] = {}
        self.data: dict[int, bytearray] = {}
        self.ended: set[int] = set()
        self.ping_acks = 0
        self.error: BaseException | None = None  # a frame we could not parse
        self._header_block: list[
            hyperframe.frame.HeadersFrame | hyperframe.frame.ContinuationFrame
        ] = []

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        preface: bool = True,
        ack_settings: bool = True,
    ) -> RawH2Client:
        """Open a connection; send the preface and an empty SETTINGS unless `preface` is
        False (then the test writes the first bytes)."""
        reader, writer = await asyncio.open_connection(
            host, port, ssl=ssl_context, server_hostname="localhost" if ssl_context else None
        )
        client = cls(reader, writer, ack_settings=ack_settings)
        if preface:
            await client.send_raw(CLIENT_PREFACE + hyperframe.frame.SettingsFrame(0).serialize())
        client._reader_task = asyncio.get_running_loop().create_task(client._read_forever())
        return client

    async def send_frames(self, *frames: hyperframe.frame.Frame) -> None:
        """Serialize and write `frames` in one write."""
        await self.send_raw(b"".join(frame.serialize() for frame in frames))

    def headers_frame(
        self,
        stream_id: int,
        path: str = "/",
        *,
        method: str = "GET",
        headers: list[tuple[str, str]] | None = None,
        end_stream: bool = True,
        end_headers: bool = True,
    ) -> hyperframe.frame.HeadersFrame:
        """A request's HEADERS frame, encoded with this connection's HPACK encoder (frames
        must then be sent in the order they were built)."""
        fields = [
            (":method", method),
            (":scheme", "http"),
            (":authority", "gateway.test"),
            (":path", path),
            *(headers or []),
        ]
        frame = hyperframe.frame.HeadersFrame(stream_id)
        frame.data = self.encoder.encode(fields)
        if end_stream:
            frame.flags.add("END_STREAM")
        if end_headers:
            frame.flags.add("END_HEADERS")
        return frame

    def status(self, stream_id: int) -> int | None:
        """The response `:status` on `stream_id`, once its head has arrived."""
        for name, value in self.responses.get(stream_id, []):
            if name == b":status":
                return int(value)
        return None

    async def wait_goaway(self, timeout_s: float = 10.0) -> hyperframe.frame.GoAwayFrame:
        """Wait for the gateway's GOAWAY (it may close right after).

        Raises:
            AssertionError: the connection closed without one, or none came in time.
        """
        try:
            async with asyncio.timeout(timeout_s):
                while self.goaway is None:
                    if self.closed:
                        raise AssertionError(f"closed without a GOAWAY; frames: {self._summary()}")
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"no GOAWAY within {timeout_s}s; frames: {self._summary()}"
            ) from None
        return self.goaway

    def _summary(self) -> str:
        """The frame types received so far, with counts (for failure messages)."""
        counts: dict[str, int] = {}
        for frame in self.frames:
            name = type(frame).__name__
            counts[name] = counts.get(name, 0) + 1
        return ", ".join(f"{name} x{count}" for name, count in counts.items())

    async def _read_forever(self) -> None:
        buffer = bytearray()
        try:
            while True:
                data = await self._read_chunk()
                if data is None:
                    return
                buffer += data
                replies: list[hyperframe.frame.Frame] = []
                while len(buffer) >= 9:
                    try:
                        frame, length = hyperframe.frame.Frame.parse_frame_header(
                            memoryview(buffer)[:9]
                        )
                        if len(buffer) < 9 + length:
                            break
                        frame.parse_body(memoryview(buffer)[9 : 9 + length])
                    except hyperframe.exceptions.HyperframeError as exc:
                        self.error = exc
                        self.closed = True
                        self._changed.set()
                        return
                    del buffer[: 9 + length]
                    replies.extend(self._record(frame))
                if replies:
                    await self.send_frames(*replies)
                self._changed.set()
        except asyncio.CancelledError:
            return

    def _record(self, frame: hyperframe.frame.Frame) -> list[hyperframe.frame.Frame]:
        self.frames.append(frame)
        replies: list[hyperframe.frame.Frame] = []
        if isinstance(frame, hyperframe.frame.GoAwayFrame):
            self.goaway = frame
        elif isinstance(frame, hyperframe.frame.RstStreamFrame):
            self.resets[frame.stream_id] = frame.error_code
        elif isinstance(frame, hyperframe.frame.SettingsFrame):
            if "ACK" not in frame.flags and self.ack_settings:
                replies.append(hyperframe.frame.SettingsFrame(0, flags=["ACK"]))
        elif isinstance(frame, hyperframe.frame.PingFrame):
            if "ACK" in frame.flags:
                self.ping_acks += 1
        elif isinstance(frame, hyperframe.frame.DataFrame):
            self.data.setdefault(frame.stream_id, bytearray()).extend(frame.data)
            if "END_STREAM" in frame.flags:
                self.ended.add(frame.stream_id)
            if frame.flow_controlled_length:  # hand the window straight back
                increment = frame.flow_controlled_length
                replies.append(hyperframe.frame.WindowUpdateFrame(0, window_increment=increment))
                if "END_STREAM" not in frame.flags:
                    replies.append(
                        hyperframe.frame.WindowUpdateFrame(
                            frame.stream_id, window_increment=increment
                        )
                    )
        elif isinstance(frame, (hyperframe.frame.HeadersFrame, hyperframe.frame.ContinuationFrame)):
            self._header_block.append(frame)
            if "END_HEADERS" in frame.flags:
                first = self._header_block[0]
                block = b"".join(bytes(f.data) for f in self._header_block)
                self._header_block = []
                decoded = self.decoder.decode(block, raw=True)
                self.responses.setdefault(first.stream_id, []).extend(
                    (bytes(name), bytes(value)) for name, value in decoded
                )
                if "END_STREAM" in first.flags:
                    self.ended.add(first.stream_id)
        return replies
