"""A WebSocket over HTTP/2 client (RFC 8441) for the end-to-end tests: extended CONNECT
streams opened with the `h2` library, WebSocket frames spoken on them with `wsproto`.

`wsproto.connection.Connection(CLIENT)` frames messages without a handshake of its own,
which is what RFC 8441 needs: the stream's 200 is the handshake, and its DATA frames carry
the WebSocket bytes (client frames masked, RFC 8441 section 5). Several tunnels share one
connection; each `WsStream` buffers what it is to send and the connection hands it to h2
as the stream and connection windows allow, and every DATA frame received is acknowledged
at once, so the gateway's windows reopen.

    async with await WsH2Client.connect(host, port) as client:
        ws = await client.open_websocket("/chat")
        await ws.send("hello")
        assert await ws.receive() == "hello"
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable, Iterable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    TextMessage,
)

from tests.support.h2_client import _SocketClient

# The receive windows this client offers: large, so big messages are paced by the
# gateway's windows rather than ours (ours are handed back as DATA arrive anyway).
CLIENT_WINDOW_BYTES = 4 * 1024 * 1024
ENABLE_CONNECT_PROTOCOL = h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL


class TunnelEnded(AssertionError):
    """The stream ended (or was reset) while a message was awaited."""


class WsStream:
    """One extended CONNECT stream: its response head, then WebSocket messages both ways.

    A refused handshake leaves `status` (not 200) and the refusal's `body`. Pings from
    the far end are answered, and a close frame is answered with the same code followed
    by END_STREAM (RFC 8441 section 5: the TCP close maps to the stream's end), unless
    `auto_close` is False.
    """

    def __init__(self, client: WsH2Client, stream_id: int, *, auto_close: bool = True) -> None:
        self.client = client
        self.stream_id = stream_id
        self.auto_close = auto_close
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()  # a refusal's body (any DATA before a 200 head)
        self.ended = False  # END_STREAM from the gateway
        self.reset_code: int | None = None  # RST_STREAM from the gateway
        self.local_ended = False  # our END_STREAM (or RST_STREAM) was queued
        self.ws = Connection(ConnectionType.CLIENT)
        self.messages: deque[str | bytes] = deque()
        self.pongs: list[bytes] = []
        self.pings: list[bytes] = []
        self.close: CloseConnection | None = None  # the close frame we received
        self.received_bytes = 0  # WebSocket bytes received on the stream
        self._outgoing: deque[memoryview] = deque()
        self._end_after_outgoing = False
        self._text: list[str] = []  # the fragments of the message under way
        self._binary: list[bytes] = []

    def __repr__(self) -> str:
        return (
            f"<WsStream {self.stream_id} status={self.status} ws={self.ws.state.name}"
            f" ended={self.ended} reset={self.reset_code}>"
        )

    @property
    def gone(self) -> bool:
        """The gateway ended or reset the stream."""
        return self.ended or self.reset_code is not None

    def header(self, name: bytes) -> bytes | None:
        """The first response field `name`, or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    # -- sending ---------------------------------------------------------------------
    async def send(
        self, message: str | bytes, *, fin: bool = True, timeout_s: float = 10.0
    ) -> None:
        """Send a text (str) or binary (bytes) message, or with `fin=False` one fragment
        of it (the next `send` calls are its continuation frames, RFC 6455 section 5.4)."""
        if isinstance(message, str):
            data = self.ws.send(TextMessage(message, message_finished=fin))
        else:
            data = self.ws.send(BytesMessage(message, message_finished=fin))
        await self.send_bytes(data, timeout_s=timeout_s)

    async def ping(self, payload: bytes, timeout_s: float = 10.0) -> None:
        """Send a ping and wait for the pong that echoes `payload`."""
        await self.send_bytes(self.ws.send(Ping(payload)))
        await self.client.wait_for(
            f"pong on {self!r}", lambda: payload in self.pongs or self.gone, timeout_s
        )
        assert payload in self.pongs, f"no pong on {self!r}"

    async def close_websocket(
        self, code: int, reason: str = "", *, end_first: bool = False, timeout_s: float = 10.0
    ) -> CloseConnection:
        """The closing handshake started here: our close frame, the peer's answer (which
        is returned), then END_STREAM; with `end_first`, END_STREAM goes right after our
        close frame (a half-close, RFC 8441 section 5) and the answer comes after it."""
        await self.send_bytes(self.ws.send(CloseConnection(code, reason)))
        if end_first:
            await self.end()
        await self.client.wait_for(
            f"close answer on {self!r}", lambda: self.close is not None or self.gone, timeout_s
        )
        assert self.close is not None, f"no close answer on {self!r}"
        await self.end()
        return self.close

    async def send_bytes(self, data: bytes, *, timeout_s: float = 10.0) -> None:
        """Queue raw WebSocket bytes and wait until h2 has taken them all (the windows
        allowed it): backpressure for the caller."""
        assert not self.local_ended, f"{self!r} already ended"
        if data:
            self._outgoing.append(memoryview(data))
        await self.client.pump()
        await self.client.wait_for(
            f"send window on {self!r}", lambda: not self._outgoing or self.gone, timeout_s
        )

    async def end(self) -> None:
        """END_STREAM once what is queued has been sent."""
        if self.local_ended or self._end_after_outgoing:
            return
        self._end_after_outgoing = True
        await self.client.pump()

    async def reset(self, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """RST_STREAM (CANCEL unless told): the client walks away from the tunnel."""
        self.local_ended = True
        self._outgoing.clear()
        self.client.conn.reset_stream(self.stream_id, code)
        await self.client.flush()

    # -- receiving -------------------------------------------------------------------
    async def receive(self, timeout_s: float = 10.0) -> str | bytes:
        """The next whole message.

        Raises:
            TunnelEnded: a close frame, END_STREAM or RST_STREAM came first.
            TimeoutError: nothing within `timeout_s`.
        """
        await self.client.wait_for(
            f"a message on {self!r}",
            lambda: bool(self.messages) or self.close is not None or self.gone,
            timeout_s,
        )
        if self.messages:
            return self.messages.popleft()
        raise TunnelEnded(f"no message: {self!r} close={self.close}")

    async def wait_close(self, timeout_s: float = 10.0) -> CloseConnection:
        """Wait for the peer's close frame."""
        await self.client.wait_for(
            f"a close frame on {self!r}", lambda: self.close is not None or self.gone, timeout_s
        )
        assert self.close is not None, f"no close frame on {self!r}"
        return self.close

    async def wait_gone(self, timeout_s: float = 10.0) -> None:
        """Wait for the gateway's END_STREAM or RST_STREAM."""
        await self.client.wait_for(f"the end of {self!r}", lambda: self.gone, timeout_s)

    # -- driven by the connection ----------------------------------------------------
    def _take(self, budget: int) -> bytes:
        """Up to `budget` queued bytes, removed from the queue."""
        pieces: list[memoryview] = []
        while self._outgoing and budget > 0:
            head = self._outgoing[0]
            if len(head) <= budget:
                pieces.append(self._outgoing.popleft())
                budget -= len(head)
            else:
                pieces.append(head[:budget])
                self._outgoing[0] = head[budget:]
                budget = 0
        return b"".join(pieces)

    def _pump(self, conn: h2.connection.H2Connection) -> None:
        """Hand h2 what the windows allow; END_STREAM when asked and all is sent."""
        if self.local_ended:
            return
        if self.gone and self.reset_code is not None:
            self._outgoing.clear()
            self.local_ended = True
            return
        try:
            while self._outgoing:
                budget = min(
                    conn.local_flow_control_window(self.stream_id), conn.max_outbound_frame_size
                )
                if budget <= 0:
                    return
                conn.send_data(self.stream_id, self._take(budget))
            if self._end_after_outgoing:
                conn.end_stream(self.stream_id)
                self.local_ended = True
        except h2.exceptions.StreamClosedError:
            self._outgoing.clear()
            self.local_ended = True

    def _on_data(self, data: bytes) -> None:
        if self.status != 200:
            self.body += data
            return
        self.received_bytes += len(data)
        if self.ws.state is ConnectionState.CLOSED:
            return  # bytes after the close handshake are not WebSocket any more
        self.ws.receive_data(data)
        for event in self.ws.events():
            self._on_ws_event(event)

    def _on_ws_event(self, event: Event) -> None:
        if isinstance(event, TextMessage):
            self._text.append(event.data)
            if event.message_finished:
                self.messages.append("".join(self._text))
                self._text = []
        elif isinstance(event, BytesMessage):
            self._binary.append(bytes(event.data))
            if event.message_finished:
                self.messages.append(b"".join(self._binary))
                self._binary = []
        elif isinstance(event, Ping):
            self.pings.append(bytes(event.payload))
            self._outgoing.append(memoryview(self.ws.send(event.response())))
        elif isinstance(event, Pong):
            self.pongs.append(bytes(event.payload))
        elif isinstance(event, CloseConnection):
            self.close = event
            if self.auto_close and self.ws.state is ConnectionState.REMOTE_CLOSING:
                self._outgoing.append(memoryview(self.ws.send(event.response())))
                self._end_after_outgoing = True
        else:
            raise AssertionError(f"unexpected WebSocket event {event!r}")

    def _on_ended(self) -> None:
        self.ended = True


class WsH2Client(_SocketClient):
    """One HTTP/2 connection carrying any number of WebSocket tunnels.

    `async with await WsH2Client.connect(host, port) as client:`; `open_websocket` for a
    tunnel, `open_stream` for any other head (a CONNECT the gateway must refuse).
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer)
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.streams: dict[int, WsStream] = {}
        self.remote_settings: dict[int, int] = {}
        self.settings_received = False
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.scheme = "http"
        self.failure: Exception | None = None  # what broke the reader (a bug)

    def __repr__(self) -> str:
        return f"<WsH2Client streams={len(self.streams)} closed={self.closed}>"

    @classmethod
    async def connect(
        cls, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None
    ) -> WsH2Client:
        """Open a connection (h2c with prior knowledge, or TLS where `ssl_context` must
        offer ALPN h2) and send the preface with large receive windows."""
        reader, writer = await asyncio.open_connection(
            host, port, ssl=ssl_context, server_hostname="localhost" if ssl_context else None
        )
        if ssl_context is not None:
            alpn = writer.get_extra_info("ssl_object").selected_alpn_protocol()
            if alpn != "h2":
                writer.close()
                raise AssertionError(f"ALPN chose {alpn!r}, not h2")
        client = cls(reader, writer)
        client.scheme = "https" if ssl_context is not None else "http"
        client.conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: CLIENT_WINDOW_BYTES},
        )
        client.conn.initiate_connection()
        client.conn.increment_flow_control_window(CLIENT_WINDOW_BYTES)
        await client.flush()
        client._reader_task = asyncio.get_running_loop().create_task(client._read_forever())
        return client

    async def wait_settings(self, timeout_s: float = 10.0) -> dict[int, int]:
        """The server's first SETTINGS (as changed from the defaults)."""
        await self.wait_for("the server's SETTINGS", lambda: self.settings_received, timeout_s)
        return self.remote_settings

    async def open_websocket(
        self,
        path: str = "/",
        *,
        authority: str = "gateway.test",
        subprotocols: Iterable[str] = (),
        headers: Iterable[tuple[str, str]] = (),
        auto_close: bool = True,
        timeout_s: float = 10.0,
    ) -> WsStream:
        """An extended CONNECT (RFC 8441 section 4) for `path`, once the server has said
        it supports it; returns when the response head (or the stream's end) arrived.

        Raises:
            AssertionError: the server did not send SETTINGS_ENABLE_CONNECT_PROTOCOL=1.
        """
        settings = await self.wait_settings(timeout_s)
        assert settings.get(ENABLE_CONNECT_PROTOCOL) == 1, f"no extended CONNECT: {settings}"
        fields = [
            (":method", "CONNECT"),
            (":protocol", "websocket"),
            (":scheme", self.scheme),
            (":path", path),
            (":authority", authority),
            ("sec-websocket-version", "13"),
        ]
        offered = ", ".join(subprotocols)
        if offered:
            fields.append(("sec-websocket-protocol", offered))
        fields.extend(headers)
        return await self.open_stream(fields, auto_close=auto_close, timeout_s=timeout_s)

    async def open_stream(
        self,
        fields: list[tuple[str, str]],
        *,
        end_stream: bool = False,
        auto_close: bool = True,
        timeout_s: float = 10.0,
    ) -> WsStream:
        """A stream with the request head `fields` as given; returns once the response
        head arrived or the stream ended or was reset."""
        stream_id = self.conn.get_next_available_stream_id()
        stream = self.streams[stream_id] = WsStream(self, stream_id, auto_close=auto_close)
        self.conn.send_headers(stream_id, fields, end_stream=end_stream)
        stream.local_ended = end_stream
        await self.flush()
        await self.wait_for(
            f"the response head on {stream!r}",
            lambda: bool(stream.status) or stream.gone,
            timeout_s,
        )
        return stream

    async def flush(self) -> None:
        """Send what h2 has queued."""
        data = self.conn.data_to_send()
        if data:
            await self.send_raw(data)

    async def pump(self) -> None:
        """Give h2 every stream's queued bytes the windows allow, and send them."""
        for stream in list(self.streams.values()):
            stream._pump(self.conn)
        await self.flush()

    async def wait_for(
        self, what: str, predicate: Callable[[], bool], timeout_s: float = 10.0
    ) -> None:
        """As `_SocketClient.wait_for`, and a bug in this client's reader fails the wait
        at once instead of leaving it to time out."""
        await super().wait_for(what, lambda: predicate() or self.failure is not None, timeout_s)
        if not predicate():
            raise AssertionError(f"the client's reader failed: {self.failure!r}")

    async def _read_forever(self) -> None:
        try:
            await self._read_frames()
        except asyncio.CancelledError:
            return
        except Exception as exc:  # a bug here: kept for the test to see
            self.failure = exc
            self.closed = True
            self._changed.set()

    async def _read_frames(self) -> None:
        # after each read: window updates, pongs, close answers
        await self._read_h2(self.conn, self._on_event, self.pump)

    def _on_event(self, event: h2.events.Event) -> None:
        stream_id = getattr(event, "stream_id", 0)
        stream = self.streams.get(stream_id) if stream_id else None
        if isinstance(event, h2.events.ResponseReceived):
            assert stream is not None, f"response on unknown stream {stream_id}"
            for name, value in event.headers or []:
                if name == b":status":
                    stream.status = int(value)
                else:
                    stream.headers.append((name, value))
        elif isinstance(event, h2.events.DataReceived):
            if event.flow_controlled_length:
                self.conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
            if stream is not None:
                stream._on_data(event.data or b"")
        elif isinstance(event, h2.events.StreamEnded):
            if stream is not None:
                stream._on_ended()
        elif isinstance(event, h2.events.StreamReset):
            if stream is not None:
                stream.reset_code = int(event.error_code or 0)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            for code, setting in event.changed_settings.items():
                self.remote_settings[int(code)] = setting.new_value
            self.settings_received = True
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event
            if event.error_code == h2.errors.ErrorCodes.NO_ERROR:
                # h2 closes its state machine on any GOAWAY (python-hyper/h2 #1181), but a
                # graceful one lets the streams already open finish (RFC 9113 section
                # 6.8): a draining gateway's close frames still arrive on them.
                self.conn.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
