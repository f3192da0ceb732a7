"""HTTP/2 client connection to one upstream endpoint (h2c prior knowledge, or h2 over TLS).

Many exchanges share one connection, each on its own stream, up to the peer's
SETTINGS_MAX_CONCURRENT_STREAMS; `H2Pool` (h2pool.py) chooses connections and opens more.
The h2 library keeps the protocol state; this class feeds it bytes, turns its events into
our `Response` and `Body`, and writes what it wants to send.

Flow control (RFC 9113 section 5.2), both ways:
- request bodies go out only as far as the peer's stream and connection windows allow; the
  sender waits for WINDOW_UPDATE (and for the socket to drain) before sending more;
- response DATA is acknowledged on the stream as soon as it is in the `Body`, unless the
  Body is paused (the client reads slower than the upstream sends). While paused, the
  bytes are counted and acknowledged when the Body resumes, so the upstream is held back
  by at most one stream window and memory stays bounded. The connection window is
  acknowledged at once: a paused stream must not stall its neighbours.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes

from metrics.traffic import cancelled_code, failure_code
from proxy.codec.h2compat import linear_literals, reopen_after_goaway
from proxy.codec.h2fields import trailer_fields
from proxy.core.body import Body
from proxy.core.errors import (
    BadRequest,
    ProxyError,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)
from proxy.core.models import RawHeaders, Response
from proxy.upstream.h2.stream import (
    CONNECTION_ACK_BYTES,
    CONNECTION_WINDOW_BYTES,
    DEFAULT_WINDOW_BYTES,
    DROPPED_RESPONSE_FIELDS,
    LAST_STREAM_ID,
    STREAM_ACK_BYTES,
    STREAM_WINDOW_BYTES,
    H2ConnState,
    H2StreamState,
    StreamRefused,
    UpstreamStream,
)

if TYPE_CHECKING:
    from proxy.upstream.h2.pool import H2Pool

log = logging.getLogger(__name__)


class H2UpstreamConnection(asyncio.Protocol):
    """One HTTP/2 connection owned by an `H2Pool`; exchanges run on its streams."""

    def __init__(self, pool: H2Pool) -> None:
        self.pool = pool
        self.state = H2ConnState.CONNECTING
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, UpstreamStream] = {}
        self.requests = 0
        self.idle_since = 0.0
        self._loop = asyncio.get_running_loop()
        self._read_timeout = pool.read_timeout
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self._h2 = h2.connection.H2Connection(config=config)
        linear_literals(self._h2)  # a response head's cost is linear in its fields
        # Settled when the peer's SETTINGS arrive (its preface, RFC 9113 section 3.4).
        self.ready: asyncio.Future[None] = self._loop.create_future()
        self._conn_unacked = 0
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._close_error: ProxyError | None = None

    def __repr__(self) -> str:
        endpoint = self.pool.endpoint
        return (
            f"<H2UpstreamConnection {endpoint.host}:{endpoint.port} {self.state.name} "
            f"streams={len(self.streams)}/{self.max_streams} requests={self.requests}>"
        )

    # -- capacity --------------------------------------------------------------------
    @property
    def max_streams(self) -> int:
        """The peer's SETTINGS_MAX_CONCURRENT_STREAMS (unbounded until it says)."""
        return int(self._h2.remote_settings.max_concurrent_streams)

    @property
    def available(self) -> bool:
        """True when a new stream may be opened now."""
        return self.state is H2ConnState.READY and len(self.streams) < self.max_streams

    # -- asyncio callbacks -----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        h2c = self._h2
        h2c.initiate_connection()
        h2c.update_settings(
            {
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW_BYTES,
            }
        )
        h2c.increment_flow_control_window(CONNECTION_WINDOW_BYTES - DEFAULT_WINDOW_BYTES)
        self._flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # A connection error (RFC 9113 section 5.4.1): h2 has queued the GOAWAY.
            self._flush()
            self._abort(UpstreamProtocolError(f"upstream HTTP/2 protocol error: {exc}"))
            return
        try:
            for event in events:
                self._handle(event)
        except Exception:
            log.exception("bug in the HTTP/2 upstream connection %r", self)
            self._abort(UpstreamProtocolError("internal error on the upstream connection"))
            return
        self._flush()

    def eof_received(self) -> bool:
        self._abort(UpstreamReset("upstream closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        error = self._close_error or UpstreamReset("upstream closed the connection")
        self._abort(error)
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- events ----------------------------------------------------------------------
    def _handle(self, event: h2.events.Event) -> None:
        """Dispatch one h2 event (every event type has a branch; unknown ones raise)."""
        if isinstance(event, h2.events.DataReceived):
            self._on_data(event)
        elif isinstance(event, h2.events.ResponseReceived):
            self._on_response(event)
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self._stream(event.stream_id)
            if stream is not None:
                stream.trailers = [
                    (bytes(n).decode("latin-1"), bytes(v).decode("latin-1"))
                    for n, v in event.headers or ()
                ]
        elif isinstance(event, h2.events.StreamEnded):
            self._on_stream_ended(event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            self._on_stream_reset(event)
        elif isinstance(event, h2.events.WindowUpdated):
            self._wake_senders(event.stream_id or None)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._on_settings(event)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._on_goaway(event)
        elif isinstance(event, h2.events.InformationalResponseReceived):
            stream = self._stream(event.stream_id)
            if stream is not None:  # 1xx (100 Continue, 103): not forwarded; still alive
                stream.deadline = self._loop.time() + self._read_timeout
        elif isinstance(
            event,
            h2.events.SettingsAcknowledged
            | h2.events.PingReceived  # h2 answers PINGs itself
            | h2.events.PingAckReceived
            | h2.events.PriorityUpdated
            | h2.events.UnknownFrameReceived  # RFC 9113 section 5.5: ignored
            | h2.events.AlternativeServiceAvailable,
        ):
            pass
        else:
            # PushedStreamReceived cannot happen (ENABLE_PUSH 0: h2 refuses a PUSH_PROMISE),
            # nor can RequestReceived on a client connection.
            raise TypeError(f"unexpected HTTP/2 event {event!r}")

    def _stream(self, stream_id: int | None) -> UpstreamStream | None:
        return self.streams.get(stream_id) if stream_id is not None else None

    def _on_settings(self, event: h2.events.RemoteSettingsChanged) -> None:
        if self.state is H2ConnState.CONNECTING:
            self.state = H2ConnState.READY
            self.idle_since = self._loop.time()
            if not self.ready.done():
                self.ready.set_result(None)
        # A larger window (INITIAL_WINDOW_SIZE) can unblock senders; a new stream limit
        # can give the pool room.
        self._wake_senders(None)
        if h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS in event.changed_settings:
            self.pool.on_capacity(self)

    def _on_response(self, event: h2.events.ResponseReceived) -> None:
        stream = self._stream(event.stream_id)
        if stream is None or stream.state is not H2StreamState.AWAITING_HEAD:
            return
        status = 0
        length: int | None = None
        raw: RawHeaders = []
        for name, value in event.headers or ():
            name, value = bytes(name), bytes(value)
            if name.startswith(b":"):
                if name == b":status":
                    status = int(value)
                continue  # h2 has validated the pseudo-header set
            if name in DROPPED_RESPONSE_FIELDS:
                if name == b"content-length":
                    length = int(value)  # h2 checked it is a number matching the DATA
                continue
            raw.append((name, value))
        stream.deadline = self._loop.time() + self._read_timeout
        self.pool.metrics.response(status, stream.sent_at)
        stream.sent_at = 0.0
        sid = stream.stream_id
        body = Body(
            length,
            on_pause=lambda: self._pause_stream(sid),
            on_resume=lambda: self._resume_stream(sid),
        )
        body.on_abandon = lambda: self._abandon(sid)
        stream.body = body
        stream.state = H2StreamState.STREAMING
        if not stream.head_waiter.done():
            stream.head_waiter.set_result(Response(status, raw, body))
        else:  # the exchange was cancelled just now: nobody takes this response
            self._reset(stream, ErrorCodes.CANCEL)

    def _on_data(self, event: h2.events.DataReceived) -> None:
        size = event.flow_controlled_length or 0
        # The connection window is re-opened at once (see the module docstring).
        self._conn_unacked += size
        if self._conn_unacked >= CONNECTION_ACK_BYTES:
            self._h2.increment_flow_control_window(self._conn_unacked)
            self._conn_unacked = 0
        stream = self._stream(event.stream_id)
        if stream is None or stream.body is None:
            return  # a stream we reset: its window no longer matters
        stream.deadline = self._loop.time() + self._read_timeout
        stream.unacked += size
        if event.data:
            stream.body.feed(bytes(event.data))
        if not stream.paused:
            # Until the peer acknowledges our SETTINGS the stream window is still 64 KiB:
            # acknowledge within whatever window is in force, or the stream would stall.
            window = self._h2.local_settings.initial_window_size
            self._ack_stream(stream, min(STREAM_ACK_BYTES, window // 4))

    def _ack_stream(self, stream: UpstreamStream, threshold: int) -> None:
        if stream.unacked >= max(threshold, 1) and stream.state is H2StreamState.STREAMING:
            increment, stream.unacked = stream.unacked, 0
            try:
                self._h2.increment_flow_control_window(increment, stream.stream_id)
            except h2.exceptions.StreamClosedError:
                return  # the upstream ended the stream meanwhile: nothing to re-open

    def _on_stream_ended(self, stream_id: int | None) -> None:
        stream = self._stream(stream_id)
        if stream is None:
            return
        body = stream.body
        if body is None:
            # RFC 9113 section 8.1: END_STREAM before any response head is malformed.
            self._finish(
                stream, UpstreamProtocolError("upstream ended a stream without a response")
            )
            return
        body.feed_eof(stream.trailers)
        stream.body = None
        if not stream.request_done:
            # A complete response before the whole request (an early 413, a gRPC
            # server done with its input): stop sending (RFC 9113 section 8.1).
            self._reset(stream, ErrorCodes.NO_ERROR)
        else:
            self._finish(stream, None)

    def _on_stream_reset(self, event: h2.events.StreamReset) -> None:
        stream = self._stream(event.stream_id)
        if stream is None:
            return
        code = event.error_code
        name = code.name if isinstance(code, ErrorCodes) else str(code)
        error: ProxyError
        if code == ErrorCodes.REFUSED_STREAM and stream.state is H2StreamState.AWAITING_HEAD:
            error = StreamRefused("upstream refused the stream", self._replay(stream))
        elif code == ErrorCodes.NO_ERROR and stream.state is not H2StreamState.AWAITING_HEAD:
            # After a complete response this only asks us to stop sending (section 8.1);
            # before the response ends it cuts the body.
            error = UpstreamReset("upstream reset the stream (NO_ERROR) before the end")
        else:
            error = UpstreamReset(f"upstream reset the stream ({name})")
        self._finish(stream, error)

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        last = event.last_stream_id if event.last_stream_id is not None else 0
        code = event.error_code
        log.debug("%r: GOAWAY last_stream_id=%d error=%s", self, last, code)
        if self.state is not H2ConnState.CLOSED:
            self.state = H2ConnState.DRAINING
        # Streams above last_stream_id were never processed (RFC 9113 section 6.8).
        for stream in [s for s in self.streams.values() if s.stream_id > last]:
            self._finish(
                stream,
                StreamRefused("upstream sent GOAWAY before the stream", self._replay(stream)),
            )
        if code not in (ErrorCodes.NO_ERROR, None):
            self._close_error = UpstreamReset(f"upstream closed the connection (GOAWAY {code})")
        if self.streams and self.state is H2ConnState.DRAINING:
            # RFC 9113 section 6.8: streams up to last_stream_id may still complete, but
            # h2 closes its state machine on any GOAWAY (python-hyper/h2 issue #1181).
            # Re-open it for them; this connection opens no new stream (DRAINING).
            reopen_after_goaway(self._h2)
        self.pool.on_draining(self)
        self._close_if_drained()

    # -- flow control of response bodies ---------------------------------------------
    def _pause_stream(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.paused = True

    def _resume_stream(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None and stream.paused:
            stream.paused = False
            # The pause was the client's doing: the upstream's read deadline restarts.
            stream.deadline = self._loop.time() + self._read_timeout
            self._ack_stream(stream, 1)
            self._flush()

    def _abandon(self, stream_id: int) -> None:
        # The client stopped reading: the rest of this response has nowhere to go.
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.body = None
            self._reset(stream, ErrorCodes.CANCEL)
            self._flush()

    # -- the exchange ----------------------------------------------------------------
    async def exchange(
        self, headers: RawHeaders, prefix: bytes, body: Body | None, trailers: bool = True
    ) -> Response:
        """Open a stream, send the request and wait for the response head.

        The request body is `prefix` followed, unless `body` is None, by what `body`
        yields. The caller checked `available`.

        Raises:
            StreamRefused: the upstream did not process the stream (retry elsewhere).
            UpstreamReset, UpstreamProtocolError, UpstreamTimeout: as their names say.
            BadRequest: h2 refused the header list (a middleware-made field).
            ProxyError: reading the client's body failed (408, 413, 400).
        """
        assert self.available
        h2c = self._h2
        stream_id = h2c.get_next_available_stream_id()
        end_stream = not prefix and body is None
        try:
            h2c.send_headers(stream_id, headers, end_stream=end_stream)
        except h2.exceptions.ProtocolError as exc:
            # Nothing went out (validation comes first): the connection is unharmed.
            raise BadRequest(f"request headers refused for HTTP/2: {exc}") from None
        waiter: asyncio.Future[Response] = self._loop.create_future()
        stream = UpstreamStream(stream_id, waiter, self._loop.time() + self._read_timeout)
        self.streams[stream_id] = stream
        self.requests += 1
        if stream_id >= LAST_STREAM_ID - 2:
            self.state = H2ConnState.DRAINING  # ids exhausted: let a new connection start
            self.pool.on_draining(self)
        if end_stream:
            stream.request_done = True
        else:
            stream.sender = self._loop.create_task(self._send_body(stream, prefix, body))
        self._flush()
        try:
            return await waiter
        except asyncio.CancelledError as cancelled:
            # The client went away (or the try's per_try_timeout ran out): this stream
            # only, never the connection.
            if stream.state is not H2StreamState.DONE:
                self._count_failure(stream, cancelled_code(cancelled))
                self._reset(stream, ErrorCodes.CANCEL)
                self._flush()
            elif waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                waiter.result().body.discard()
            raise

    async def _send_body(self, stream: UpstreamStream, prefix: bytes, body: Body | None) -> None:
        consumed = stream.consumed
        try:
            if prefix:
                consumed.add(prefix)
                await self._send_data(stream, prefix)
            if body is not None:
                while True:
                    # Waiting for the client is the client's timeout, not the upstream's.
                    stream.waits_on_client = True
                    data = await body.read_joined()
                    stream.waits_on_client = False
                    if not data:
                        break
                    consumed.add(data)
                    await self._send_data(stream, data)
                trailers = body.trailers
            else:
                trailers = None
            if stream.state is H2StreamState.DONE:
                return
            fields = trailer_fields(trailers) if trailers else []
            if fields:
                self._h2.send_headers(stream.stream_id, fields, end_stream=True)
            else:
                self._h2.end_stream(stream.stream_id)
            stream.request_done = True
            stream.deadline = self._loop.time() + self._read_timeout
            self._flush()
        except ProxyError as exc:
            # The client's body failed (too slow, too large, malformed): the upstream
            # must not take a truncated request as whole.
            if stream.state is not H2StreamState.DONE:
                self._reset(stream, ErrorCodes.CANCEL, exc)
                self._flush()
        except h2.exceptions.StreamClosedError:
            pass  # reset meanwhile; the exchange already has its answer or error
        finally:
            stream.sender = None
            stream.waits_on_client = False

    async def _send_data(self, stream: UpstreamStream, data: bytes) -> None:
        """Send `data` on the stream as the peer's windows allow (RFC 9113 section 5.2)."""
        h2c = self._h2
        view = memoryview(data)
        sid = stream.stream_id
        while view:
            if stream.state is H2StreamState.DONE or self.state is H2ConnState.CLOSED:
                return
            window = min(h2c.local_flow_control_window(sid), h2c.max_outbound_frame_size)
            if window <= 0:
                # The upstream is the slow side now: its read deadline runs.
                stream.deadline = self._loop.time() + self._read_timeout
                stream.window_waiter = self._loop.create_future()
                try:
                    await stream.window_waiter
                finally:
                    stream.window_waiter = None
                continue
            size = min(window, len(view))
            h2c.send_data(sid, view[:size].tobytes())
            view = view[size:]
            self._flush()
            transport = self.transport
            if self._write_paused and transport is not None and not transport.is_closing():
                stream.deadline = self._loop.time() + self._read_timeout
                waiter = self._loop.create_future()
                self._drain_waiters.append(waiter)
                await waiter

    def _wake_senders(self, stream_id: int | None) -> None:
        streams = self.streams.values() if stream_id is None else [self.streams.get(stream_id)]
        for stream in streams:
            waiter = stream.window_waiter if stream is not None else None
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def _replay(self, stream: UpstreamStream) -> bytes | None:
        """The body to resend after a refusal: everything consumed from the client."""
        # A chunk read but not yet (wholly) sent is in `consumed` too: nothing is lost.
        return stream.consumed.joined()

    # -- ending streams --------------------------------------------------------------
    def _reset(
        self, stream: UpstreamStream, code: ErrorCodes, error: ProxyError | None = None
    ) -> None:
        """Reset the stream (RST_STREAM `code`) and free its slot."""
        if stream.state is not H2StreamState.DONE and self.state is not H2ConnState.CLOSED:
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                self._h2.reset_stream(stream.stream_id, code)  # may be closed both ways
        self._finish(stream, error or UpstreamReset("stream reset"))

    def _finish(self, stream: UpstreamStream, error: ProxyError | None) -> None:
        """The stream is over: settle its waiter or body, stop its sender, free its slot."""
        if stream.state is H2StreamState.DONE:
            return
        stream.state = H2StreamState.DONE
        waiter = stream.head_waiter
        if error is not None:
            self._count_failure(stream, failure_code(error))
            if not waiter.done():
                waiter.set_exception(error)
            body = stream.body
            stream.body = None
            if body is not None:
                body.fail(error)
        sender = stream.sender
        if sender is not None and sender is not asyncio.current_task():
            sender.cancel()
        if stream.window_waiter is not None and not stream.window_waiter.done():
            stream.window_waiter.set_result(None)
        self.streams.pop(stream.stream_id, None)
        if not self.streams:
            self.idle_since = self._loop.time()
        if self.state is not H2ConnState.CLOSED:
            self.pool.on_stream_closed(self)
            self._close_if_drained()

    def _count_failure(self, stream: UpstreamStream, code: str) -> None:
        """The stream ended before its response head (once: `sent_at` is then 0)."""
        if stream.sent_at:
            stream.sent_at = 0.0
            self.pool.metrics.failure(code)

    def _close_if_drained(self) -> None:
        if self.state is H2ConnState.DRAINING and not self.streams:
            self.close()

    # -- timeouts and closing --------------------------------------------------------
    def expire(self, now: float) -> None:
        """Sweeper tick: a stream silent past its read deadline gets 504 and a reset
        (that stream only). Not while the client is the slow side: the sender waiting
        for the client's body, or the response Body paused."""
        for stream in list(self.streams.values()):
            if stream.paused or stream.waits_on_client or now < stream.deadline:
                continue
            self._reset(
                stream, ErrorCodes.CANCEL, UpstreamTimeout("upstream did not answer in time")
            )
        self._flush()

    def close(self) -> None:
        """Send GOAWAY and close; streams still open fail with 502."""
        if self.state is H2ConnState.CLOSED:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._h2.close_connection()  # unless h2 closed already (a GOAWAY came)
        self._flush()
        self._abort(UpstreamReset("upstream connection closed"), graceful=True)

    def _abort(self, error: ProxyError, *, graceful: bool = False) -> None:
        if self.state is H2ConnState.CLOSED:
            return
        was_connecting = self.state is H2ConnState.CONNECTING
        self.state = H2ConnState.CLOSED
        if not self.ready.done():
            if was_connecting and not isinstance(error, UpstreamProtocolError):
                error = UpstreamConnectError(
                    f"{self.pool.endpoint.host}:{self.pool.endpoint.port} closed the "
                    "connection before its HTTP/2 SETTINGS"
                )
            self.ready.set_exception(error)
            self.ready.exception()  # retrieved: nobody may be waiting any more
        for stream in list(self.streams.values()):
            self._finish(stream, error)
        transport = self.transport
        if transport is not None:
            if graceful:
                transport.close()  # the GOAWAY goes out first
            else:
                transport.abort()
        self.pool.on_closed(self)

    def _flush(self) -> None:
        data = self._h2.data_to_send()
        transport = self.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)
