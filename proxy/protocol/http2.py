"""HTTP/2 front end: one `Request` per stream, served concurrently; `Response`s back as
HEADERS, DATA and trailers, with real flow control.

The h2 library does the framing and HPACK (sans-IO); this module turns its events into the
exchange model and back, and adds the defences a server exposed to the internet needs
(`Http2Config` names the attack each limit stops). Flow control follows RFC 9113 section
5.2 end to end: a request's DATA is acknowledged (WINDOW_UPDATE) only once the exchange has
taken it from the body buffer, so a slow upstream slows the client instead of filling our
memory; a response is sent no faster than the client's windows allow.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from h2.stream import H2Stream
from hyperframe.frame import GoAwayFrame

from metrics.definitions import Http2Limit, count_http2_limit
from proxy.config_model import Http2Config
from proxy.connection import ClientConnection, ConnectionPhase
from proxy.errors import BadRequest, BodyTooLarge, ProxyError, RequestTimeout
from proxy.local_reply import local_reply
from proxy.models import Body, Request, Response
from proxy.protocol.h2data import complete_response, frame_data
from proxy.protocol.h2fields import (
    MalformedRequest,
    request_fields,
    request_trailers,
    response_fields,
    trailer_fields,
)
from proxy.protocol.h2limits import RateWindow
from proxy.protocol.hpack_cache import memoise_hpack
from proxy.upstream.http1 import StaleConnection

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 section 3.4
# The connection-level receive window: bounds what all streams together may have in
# flight towards us (and so our buffering per connection), well above one stream's.
CONNECTION_WINDOW_FACTOR = 4
# An HPACK block may decode to this multiple of max_header_list_size before h2 gives up
# on the connection (HPACK bomb); between 1x and this, the stream gets a 431.
HEADER_LIST_HARD_CAP_FACTOR = 4
# h2 itself enforces this multiple of max_concurrent_streams as a connection error; up
# to it, streams beyond the advertised limit are refused one by one.
STREAM_HARD_CAP_FACTOR = 2
# A response chunk at least this large is written at once (so write backpressure is
# seen); smaller writes of one loop iteration are coalesced into one send.
FLUSH_NOW_BYTES = 16 * 1024


class _FrontEndConfig(h2.config.H2Configuration):
    """The front end's h2 configuration. It also marks the front end's streams, whose
    content-length h2 must leave to us: h2 treats a mismatch (or a non-number) as a
    connection error, killing every stream in flight, where RFC 9113 section 8.1.1 asks
    for a stream error; `_on_data` / `_on_stream_ended` check it per stream instead."""


def _unless_front_end(method: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(method)
    def checked(stream: H2Stream, *args: object) -> None:
        if isinstance(stream.config, _FrontEndConfig):
            return None
        return method(stream, *args)

    return checked


if not getattr(H2Stream, "_gatehouse_content_length", False):
    # Upstream (client) connections keep h2's own check; see _FrontEndConfig.
    H2Stream._initialize_content_length = _unless_front_end(  # type: ignore[method-assign]
        H2Stream._initialize_content_length
    )
    H2Stream._track_content_length = _unless_front_end(  # type: ignore[method-assign]
        H2Stream._track_content_length
    )
    H2Stream._gatehouse_content_length = True  # type: ignore[attr-defined]


class _Stream:
    """One request/response exchange on the connection."""

    __slots__ = (
        "body",
        "body_deadline",
        "id",
        "request",
        "reset_when_done",
        "response_started",
        "task",
        "trailers",
        "window_deadline",
        "window_waiter",
    )

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.body_deadline = 0.0  # while receiving: when the client's silence is a 408
        self.reset_when_done = False  # the client may still send: RST_STREAM at the end
        self.window_deadline = 0.0  # while waiting for WINDOW_UPDATE: when to give up
        self.request: Request | None = None
        self.body: Body | None = None  # the request body while the client still sends it
        self.trailers: list[tuple[str, str]] | None = None
        self.task: asyncio.Task[None] | None = None
        self.window_waiter: asyncio.Future[None] | None = None
        self.response_started = False

    def __repr__(self) -> str:
        return f"<_Stream {self.id} started={self.response_started}>"


class Http2Protocol:
    """One HTTP/2 client connection (h2c with prior knowledge, or h2 chosen by ALPN)."""

    def __init__(self, conn: ClientConnection) -> None:
        self._conn = conn
        self._server = conn.server
        settings: Http2Config = conn.server.http2
        self._settings = settings
        # Field validation is done in one pass by h2fields (h2's generator chain costs
        # more than the rest of a request); outbound fields are built lower-cased.
        config = _FrontEndConfig(
            client_side=False,
            header_encoding=None,
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self._h2 = h2.connection.H2Connection(config=config)
        memoise_hpack(self._h2)
        self._streams: dict[int, _Stream] = {}
        self._resets = RateWindow(settings.max_resets_per_second, conn.loop.time)
        self._control = RateWindow(settings.max_control_frames_per_second, conn.loop.time)
        self._header_limit = settings.max_header_list_size
        self._hard_header_cap = settings.max_header_list_size * HEADER_LIST_HARD_CAP_FACTOR
        self._closing = False  # GOAWAY sent or received: no new streams
        self._dead = False  # terminated: nothing more is read or sent
        self._flush_scheduled = False
        self._out: list[bytes] = []  # frames we made, in order after what h2 had queued
        self._last_stream_id = 0  # the highest stream we took (for our GOAWAY)
        self._idle_deadline = conn.loop.time() + conn.limits.keepalive_timeout
        self._h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: settings.max_concurrent_streams,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: settings.initial_window_size,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: settings.max_header_list_size,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self._h2.initiate_connection()
        # The SETTINGS frame above advertises max_concurrent_streams. h2 would treat a
        # stream beyond it as a connection error, killing the streams in flight; RFC 9113
        # section 5.1.2 asks for a stream error, so h2 gets a looser limit and
        # `_on_request` refuses the extra stream itself (REFUSED_STREAM: safe to retry).
        self._h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: settings.max_concurrent_streams
                * STREAM_HARD_CAP_FACTOR,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: settings.initial_window_size,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: settings.max_header_list_size,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self._h2.decoder.max_header_list_size = self._hard_header_cap
        window = settings.initial_window_size * CONNECTION_WINDOW_FACTOR
        if window > 65535:
            self._h2.increment_flow_control_window(window - 65535)
        self._flush()

    def __repr__(self) -> str:
        state = "CLOSING" if self._closing else "OPEN"
        return f"<Http2Protocol {state} streams={len(self._streams)}>"

    # -- input ----------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Process client bytes: frames become stream events; protocol errors GOAWAY."""
        if self._dead:
            return
        h2conn = self._h2
        pending = h2conn.data_to_send()
        if pending:
            # Kept apart from what h2 queues while reading, which a connection error
            # replaces with our own GOAWAY.
            self._out.append(pending)
        try:
            events = h2conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._connection_error(exc)
            return
        # RFC 9113 section 4.2: h2 checks a frame's length only once all of it is here;
        # the 9-byte header already tells, so an oversized frame is never buffered.
        # (h2 4.x keeps the partial frame in `incoming_buffer._data`.)
        if len(h2conn.incoming_buffer._data) > h2conn.max_inbound_frame_size + 9:
            count_http2_limit(Http2Limit.CONNECTION_ERROR)
            self._terminate(ErrorCodes.FRAME_SIZE_ERROR)
            return
        for event in events:
            handler = _HANDLERS.get(type(event))
            if handler is None:
                if type(event) not in _IGNORED:
                    # Only server-side events reach here; a new one must be looked at.
                    raise AssertionError(f"unhandled HTTP/2 event {event!r}")
                continue
            handler(self, event)
            if self._stopped():
                return
        self._flush()
        self._update_phase()

    def _stopped(self) -> bool:
        return self._dead or self._conn.closed

    def _connection_error(self, exc: h2.exceptions.ProtocolError) -> None:
        log.debug("HTTP/2 connection error from %s: %s", self._conn.client[0], exc)
        count_http2_limit(Http2Limit.CONNECTION_ERROR)
        code = getattr(exc, "error_code", None) or ErrorCodes.PROTOCOL_ERROR
        # h2 queued a GOAWAY of its own naming the highest stream it parsed, which may be
        # one whose events were lost with the exception: ours names the last we took.
        self._h2.clear_outbound_data_buffer()
        self._terminate(code)

    def _terminate(self, code: ErrorCodes) -> None:
        """Send GOAWAY with `code` and close: the connection is unusable."""
        self._dead = True
        with contextlib.suppress(h2.exceptions.ProtocolError):  # h2 may consider it closed
            self._h2.close_connection(error_code=code, last_stream_id=self._last_stream_id)
        self._flush()
        self._conn.close()
        self._cancel_all()

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        if self._closing:
            # After our GOAWAY: RFC 9113 section 6.8, streams above last_stream_id are
            # ignored; telling the client it may retry them elsewhere is kinder.
            self._reset(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        self._last_stream_id = stream_id
        if len(self._streams) >= self._settings.max_concurrent_streams:
            self._refuse(stream_id)
            return
        try:
            fields = request_fields(event.headers or [], self._header_limit)
        except MalformedRequest as exc:
            # RFC 9113 section 8.1.1: a malformed request is a stream error.
            log.debug("malformed HTTP/2 request on stream %d: %s", stream_id, exc)
            count_http2_limit(Http2Limit.MALFORMED)
            self._reset(stream_id, ErrorCodes.PROTOCOL_ERROR)
            return
        except ProxyError as exc:  # 431
            count_http2_limit(Http2Limit.HEADER_LIST)
            stream = self._streams[stream_id] = _Stream(stream_id)
            self._start_task(stream, None, exc)
            return
        stream = self._streams[stream_id] = _Stream(stream_id)
        conn = self._conn
        if event.stream_ended:
            body = Body.from_bytes(b"")
        else:
            stream.body_deadline = conn.loop.time() + conn.limits.body_timeout
            length = fields.content_length
            limit = conn.limits.max_body_size
            body = Body(length)
            body.limit = limit
            body.on_consumed = functools.partial(self._on_consumed, stream_id)
            stream.body = body
            if limit is not None and (length or 0) > limit:
                self._start_task(stream, None, BodyTooLarge())
                return
        if fields.method == b"CONNECT":
            self._start_task(
                stream, None, BadRequest("CONNECT is not supported by a reverse proxy")
            )
            return
        request = Request(
            fields.method.decode("ascii", "replace"),
            fields.path,
            fields.headers,
            body,
            http_version="2",
            client=conn.client,
            scheme=conn.scheme,
            host=fields.authority.decode("latin-1"),
        )
        stream.request = request
        if event.stream_ended and self._server.try_fast(
            request, functools.partial(self._on_fast_response, stream)
        ):
            return  # answered from the upstream connection's callback: no task
        self._start_task(stream, request, None)

    def _on_data(self, event: h2.events.DataReceived) -> None:
        stream = self._streams.get(event.stream_id)
        data = event.data or b""
        padding = (event.flow_controlled_length or 0) - len(data)
        if not data and not event.stream_ended and self._control.exceeded():
            self._calm_down(Http2Limit.CONTROL_FLOOD)  # empty DATA frames cost us work
            return
        body = stream.body if stream is not None else None
        if body is None:
            # Nobody reads this stream's body any more: hand the window straight back.
            self._acknowledge(event.stream_id, len(data) + padding)
            return
        if padding:
            self._acknowledge(event.stream_id, padding)
        if data:
            assert stream is not None
            if body.length is not None and body.bytes_fed + len(data) > body.length:
                self._acknowledge(event.stream_id, len(data))
                self._malformed_body(stream, "more DATA than content-length")
                return
            stream.body_deadline = self._conn.loop.time() + self._conn.limits.body_timeout
            body.feed(data)  # acknowledged when the exchange reads it (on_consumed)

    def _on_trailers(self, event: h2.events.TrailersReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        try:
            stream.trailers = request_trailers(event.headers or [])
        except MalformedRequest as exc:
            self._malformed_body(stream, str(exc))

    def _on_stream_ended(self, event: h2.events.StreamEnded) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None or stream.body is None:
            return
        body = stream.body
        if body.length is not None and body.bytes_fed != body.length:
            self._malformed_body(stream, "less DATA than content-length")
            return
        stream.body = None
        body.feed_eof(stream.trailers)

    def _malformed_body(self, stream: _Stream, why: str) -> None:
        """RFC 9113 section 8.1.1: a malformed request is a stream error PROTOCOL_ERROR;
        the exchange reading its body sees it fail."""
        log.debug("malformed HTTP/2 request body on stream %d: %s", stream.id, why)
        count_http2_limit(Http2Limit.MALFORMED)
        body = stream.body
        stream.body = None
        self._streams.pop(stream.id, None)
        if body is not None:
            body.fail(BadRequest(why))
        if stream.task is not None:
            stream.task.cancel()
        self._reset(stream.id, ErrorCodes.PROTOCOL_ERROR)

    def _on_reset(self, event: h2.events.StreamReset) -> None:
        # CVE-2023-44487: opening and cancelling streams costs the client nothing and us
        # a request's work each time. Resets the client provokes (a stream error h2
        # answers for us, e.g. a window overflow: "MadeYouReset", CVE-2025-8671) count
        # the same.
        if self._resets.exceeded():
            self._calm_down(Http2Limit.RAPID_RESET)
            return
        stream = self._streams.pop(event.stream_id, None)
        if stream is None:
            return
        if stream.body is not None:
            stream.body.fail(BadRequest("client reset the stream"))
            stream.body = None
        if stream.task is not None:
            stream.task.cancel()
        self._wake(stream)

    def _on_window_update(self, event: h2.events.WindowUpdated) -> None:
        if event.stream_id:
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                self._wake(stream)
        else:
            for stream in self._streams.values():
                self._wake(stream)

    def _on_settings(self, event: h2.events.RemoteSettingsChanged) -> None:
        if self._control.exceeded():
            self._calm_down(Http2Limit.CONTROL_FLOOD)
            return
        # A new INITIAL_WINDOW_SIZE changes every stream's send window.
        for stream in self._streams.values():
            self._wake(stream)

    def _on_settings_acked(self, event: h2.events.SettingsAcknowledged) -> None:
        # h2 makes the advertised MAX_HEADER_LIST_SIZE its decoder's limit once acked, and
        # would tear the connection down at it; we keep the hard cap there and answer
        # the advertised limit per stream with 431.
        self._h2.decoder.max_header_list_size = self._hard_header_cap

    def _on_control_frame(self, event: h2.events.Event) -> None:
        if self._control.exceeded():
            self._calm_down(Http2Limit.CONTROL_FLOOD)

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        self._closing = True
        if event.error_code:
            self._conn.close()
            self._cancel_all()
        elif not self._streams:
            self._flush()
            self._conn.close()  # the client is done with us and nothing is in flight

    def _calm_down(self, reason: Http2Limit) -> None:
        log.info("HTTP/2 %s from %s: GOAWAY", reason.value, self._conn.client[0])
        count_http2_limit(reason)
        # Replies h2 queued for the flood (PING and SETTINGS acks) are not sent.
        self._h2.clear_outbound_data_buffer()
        self._out.clear()
        self._terminate(ErrorCodes.ENHANCE_YOUR_CALM)

    def _refuse(self, stream_id: int) -> None:
        """A stream beyond max_concurrent_streams: refused, and counted like a reset (a
        client that keeps trying is flooding)."""
        if self._resets.exceeded():
            self._calm_down(Http2Limit.RAPID_RESET)
            return
        count_http2_limit(Http2Limit.REFUSED_STREAM)
        self._reset(stream_id, ErrorCodes.REFUSED_STREAM)

    # -- serving --------------------------------------------------------------------
    def _start_task(
        self, stream: _Stream, request: Request | None, error: ProxyError | None
    ) -> None:
        stream.task = self._conn.loop.create_task(
            self._guarded(stream, self._serve, stream, request, error)
        )

    def _on_fast_response(
        self, stream: _Stream, response: Response | None, error: ProxyError | None
    ) -> None:
        # Called from the upstream connection's data_received: nothing may escape.
        try:
            request = stream.request
            if self._streams.get(stream.id) is not stream or self._dead:
                if response is not None:
                    response.body.discard()  # the client reset the stream meanwhile
                return
            if response is None:
                if isinstance(error, StaleConnection):
                    # The keep-alive race: the general path retries on a fresh connection.
                    self._start_task(stream, request, None)
                    return
                assert error is not None
                response = local_reply(error, request)
            rest = self._begin_response(stream, request, response)
            if rest is not None:
                # The response did not fit the windows, or is still streaming.
                stream.task = self._conn.loop.create_task(
                    self._guarded(stream, self._send_rest, stream, *rest)
                )
                return
        except Exception:
            log.exception("bug in the HTTP/2 front end's fast path")
            self._reset(stream.id, ErrorCodes.INTERNAL_ERROR)
        self._stream_done(stream)

    async def _guarded(
        self, stream: _Stream, work: Callable[..., Awaitable[None]], *args: object
    ) -> None:
        """Run a stream's task: a cancel (client reset, connection gone) just ends it, a
        bug resets the stream, and either way the stream is done afterwards."""
        try:
            await work(*args)
        except asyncio.CancelledError:
            return
        except Exception:
            log.exception("bug in the HTTP/2 front end")
            self._reset(stream.id, ErrorCodes.INTERNAL_ERROR)
        finally:
            stream.task = None
            self._stream_done(stream)

    async def _serve(
        self, stream: _Stream, request: Request | None, error: ProxyError | None
    ) -> None:
        if request is None:
            assert error is not None
            response = local_reply(error, None)
        else:
            response = await self._server.handle(request)
        if self._streams.get(stream.id) is not stream:
            response.body.discard()
            return
        rest = self._begin_response(stream, request, response)
        if rest is not None:
            await self._send_rest(stream, *rest)

    def _begin_response(
        self, stream: _Stream, request: Request | None, response: Response
    ) -> tuple[bytes, Body] | None:
        """Send the head, and the body too when it is complete and fits the windows.

        Returns None when the whole response is out; else what is left to send: bytes
        already taken from the body, and the body (which may still be streaming).
        """
        h2conn = self._h2
        stream_id = stream.id
        body = response.body
        status = response.status
        head_only = (request is not None and request.method == "HEAD") or status in (204, 304)
        stream.response_started = True
        if not body.complete:
            if head_only:
                body.discard()
                h2conn.send_headers(stream_id, response_fields(response, None), end_stream=True)
                self._flush_soon()
                return None
            h2conn.send_headers(stream_id, response_fields(response, body.length))
            self._flush_soon()
            return b"", body
        data = body.take_all()
        trailers = body.trailers
        if head_only:
            length = body.length if status not in (204, 304) else None
            h2conn.send_headers(stream_id, response_fields(response, length), end_stream=True)
            self._flush_soon()
            return None
        if not trailers:
            # The common case, a whole small response: framed by h2data in one go.
            frames = complete_response(
                h2conn, stream_id, response_fields(response, len(data)), data
            )
            if frames is not None:
                self._queue_frames(frames)
                return None
        h2conn.send_headers(stream_id, response_fields(response, None if trailers else len(data)))
        if data:
            window = min(
                h2conn.local_flow_control_window(stream_id), h2conn.max_outbound_frame_size
            )
            if len(data) > window:
                self._flush_soon()
                return data, body
            h2conn.send_data(stream_id, data, end_stream=not trailers)
        if trailers:
            h2conn.send_headers(stream_id, trailer_fields(trailers), end_stream=True)
        self._flush_soon()
        return None

    async def _send_rest(self, stream: _Stream, data: bytes, body: Body) -> None:
        """Send what `_begin_response` left: `data`, then the body's remaining chunks,
        then its trailers or END_STREAM."""
        stream_id = stream.id
        try:
            if data:
                await self._send_data(stream, data, end=body.complete and not body.trailers)
                if body.complete and not body.trailers:
                    return
            while chunk := await body.read():
                await self._send_data(stream, chunk, end=False)
            if stream_id not in self._streams:
                raise ConnectionResetError("stream closed")
            if body.trailers:
                self._h2.send_headers(stream_id, trailer_fields(body.trailers), end_stream=True)
            else:
                self._h2.send_data(stream_id, b"", end_stream=True)
            self._flush_soon()
        except (ProxyError, ConnectionError) as exc:
            # After the head, a broken response can only be signalled by a reset
            # (DESIGN.md, errors).
            log.debug("response body on stream %d broke off: %r", stream_id, exc)
            body.discard()
            self._reset(stream_id, ErrorCodes.INTERNAL_ERROR)
        except asyncio.CancelledError:
            body.discard()
            raise

    async def _send_data(self, stream: _Stream, data: bytes, *, end: bool) -> None:
        """Send `data` as the client's windows allow (RFC 9113 section 6.9): as many
        frames as fit, then one write; wait for WINDOW_UPDATE or a drained socket."""
        h2conn = self._h2
        conn = self._conn
        stream_id = stream.id
        view = memoryview(data)
        while view:
            if stream_id not in self._streams or conn.closed:
                raise ConnectionResetError("stream closed")
            window = h2conn.local_flow_control_window(stream_id)
            if window <= 0:
                # The client holds the window shut: like a client that stops reading
                # HTTP/1.1 (WRITE), it gets body_timeout to open it (on_timeout).
                self._flush()
                stream.window_waiter = conn.loop.create_future()
                stream.window_deadline = conn.loop.time() + conn.limits.body_timeout
                self._update_phase()
                try:
                    await stream.window_waiter
                finally:
                    stream.window_waiter = None
                    stream.window_deadline = 0.0
                continue
            frame_limit = h2conn.max_outbound_frame_size
            sent = min(len(view), window)
            # All but the last frame of what fits are framed here (h2data); the last goes
            # through h2, which sets END_STREAM and keeps its stream state in step.
            middle = (sent - 1) // frame_limit * frame_limit
            if middle:
                self._queue_frames(frame_data(h2conn, stream_id, view[:middle], frame_limit))
            last = sent == len(view)
            h2conn.send_data(stream_id, view[middle:sent].tobytes(), end_stream=end and last)
            view = view[sent:]
            if sent >= FLUSH_NOW_BYTES or conn.write_paused:
                self._flush()
                if conn.write_paused:
                    await conn.drain()
            else:
                self._flush_soon()

    def _stream_done(self, stream: _Stream) -> None:
        if self._streams.get(stream.id) is stream:
            del self._streams[stream.id]
        body = stream.body
        if body is not None or stream.reset_when_done:
            # Answered before the client finished its upload: RFC 9113 section 8.1 lets
            # us stop it with RST_STREAM NO_ERROR; the window comes back as it arrives.
            stream.body = None
            if body is not None:
                body.discard()
            self._reset(stream.id, ErrorCodes.NO_ERROR)
        if self._conn.closed:
            return
        self._update_phase()
        if self._closing and not self._streams:
            self._flush()
            self._conn.close()
        else:
            self._flush_soon()

    def _update_phase(self) -> None:
        """Give the connection the deadline that matters now: the earliest stream body
        that waits on the client (body_timeout), else none while streams run, else the
        idle timeout."""
        conn = self._conn
        if conn.closed or conn.phase is ConnectionPhase.WRITE:
            return
        if self._streams:
            deadline = 0.0
            for stream in self._streams.values():
                body = stream.body
                # Only a body whose every byte has been taken waits on the client; one
                # with bytes unread waits on us (the window is not re-opened meanwhile).
                waits_on_client = body is not None and body.bytes_fed == body.bytes_read
                if waits_on_client and (not deadline or stream.body_deadline < deadline):
                    deadline = stream.body_deadline
                window_deadline = stream.window_deadline
                if window_deadline and (not deadline or window_deadline < deadline):
                    deadline = window_deadline
            if deadline:
                conn.phase = ConnectionPhase.BODY
                conn.deadline = deadline
            else:
                conn.phase = ConnectionPhase.BUSY
            return
        if conn.phase is not ConnectionPhase.IDLE:
            if conn.phase is not ConnectionPhase.HEAD:
                self._idle_deadline = conn.loop.time() + conn.limits.keepalive_timeout
            conn.phase = ConnectionPhase.IDLE
        conn.deadline = self._idle_deadline  # frames without streams do not extend it

    # -- helpers --------------------------------------------------------------------
    def _on_consumed(self, stream_id: int, size: int) -> None:
        """The exchange took `size` bytes of a request body: re-open the window, and if
        it has caught up, the stream now waits on the client (its deadline restarts)."""
        stream = self._streams.get(stream_id)
        if stream is not None and stream.body is not None:
            body = stream.body
            if body.bytes_fed == body.bytes_read:
                conn = self._conn
                stream.body_deadline = conn.loop.time() + conn.limits.body_timeout
                if conn.phase is ConnectionPhase.BUSY:
                    self._update_phase()
        self._acknowledge(stream_id, size)

    def _acknowledge(self, stream_id: int, size: int) -> None:
        if size <= 0 or self._conn.closed:
            return
        try:
            self._h2.acknowledge_received_data(size, stream_id)
        except h2.exceptions.ProtocolError:
            return  # the connection is closing
        self._flush()

    def _reset(self, stream_id: int, code: ErrorCodes) -> None:
        try:
            self._h2.reset_stream(stream_id, error_code=code)
        except h2.exceptions.StreamClosedError:
            pass
        except h2.exceptions.ProtocolError:
            return
        self._flush()

    @staticmethod
    def _wake(stream: _Stream) -> None:
        waiter = stream.window_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _flush(self) -> None:
        self._flush_scheduled = False
        data = self._h2.data_to_send()
        out = self._out
        if out:
            if data:
                out.append(data)
            data = b"".join(out)
            out.clear()
        if data:
            self._conn.write(data)

    def _queue_frames(self, frames: bytes) -> None:
        """Queue frames made outside h2 (h2data) behind what h2 has queued already."""
        pending = self._h2.data_to_send()
        if pending:
            self._out.append(pending)
        self._out.append(frames)
        self._flush_soon()

    def _flush_soon(self) -> None:
        """Write what h2 has queued at the end of this loop iteration: the answers of
        many streams that complete together go out in one send."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._conn.loop.call_soon(self._flush)

    def _cancel_all(self) -> None:
        for stream in list(self._streams.values()):
            if stream.body is not None:
                stream.body.fail(BadRequest("connection closed"))
                stream.body = None
            if stream.task is not None:
                stream.task.cancel()
        self._streams.clear()

    # -- connection callbacks (FrontEnd) ----------------------------------------------
    def on_eof(self) -> None:
        """The client half-closed: no more frames will come; finish and close."""
        self._closing = True
        for stream in self._streams.values():
            if stream.body is not None:
                stream.body.fail(BadRequest("client closed before the body was complete"))
                stream.body = None
        if not self._streams:
            self._conn.close()

    def on_close(self) -> None:
        """The socket is gone: cancel every exchange."""
        self._cancel_all()

    def on_timeout(self, phase: ConnectionPhase) -> None:
        """Idle too long (no streams): say goodbye and close."""
        if phase is ConnectionPhase.BODY:
            now = self._conn.loop.time()
            for stream in self._streams.values():
                body = stream.body
                waits_on_client = body is not None and body.bytes_fed == body.bytes_read
                if body is not None and waits_on_client and stream.body_deadline <= now:
                    # The exchange reading it answers 408 (or resets, if its response
                    # has begun); the client's late DATA is dropped.
                    stream.body = None
                    stream.reset_when_done = True
                    count_http2_limit(Http2Limit.BODY_TIMEOUT)
                    body.fail(RequestTimeout("client too slow sending the body"))
                waiter = stream.window_waiter
                if stream.window_deadline and stream.window_deadline <= now and waiter:
                    # The response's sender gives up; the stream is reset.
                    count_http2_limit(Http2Limit.WINDOW_TIMEOUT)
                    stream.window_deadline = 0.0
                    if not waiter.done():
                        waiter.set_exception(ConnectionResetError("window kept shut"))
            self._update_phase()
            return
        count_http2_limit(Http2Limit.IDLE_TIMEOUT)
        self._goaway()
        self._conn.close()

    def on_drain_request(self) -> None:
        """Shutdown or reload: GOAWAY, finish the streams already taken, then close."""
        if self._closing:
            return
        self._goaway()
        if not self._streams:
            self._conn.close()

    def _goaway(self) -> None:
        # A graceful GOAWAY (NO_ERROR) is written by hand: h2's close_connection moves
        # its state machine to CLOSED, after which the streams in flight could not be
        # answered (RFC 9113 section 6.8 lets them finish).
        self._closing = True
        self._flush()
        frame = GoAwayFrame(0)
        frame.last_stream_id = self._last_stream_id
        frame.error_code = ErrorCodes.NO_ERROR
        self._conn.write(frame.serialize())


_Handler = Callable[[Http2Protocol, h2.events.Event], None]
_HANDLERS: dict[type[h2.events.Event], _Handler] = {
    h2.events.RequestReceived: Http2Protocol._on_request,  # type: ignore[dict-item]
    h2.events.DataReceived: Http2Protocol._on_data,  # type: ignore[dict-item]
    h2.events.TrailersReceived: Http2Protocol._on_trailers,  # type: ignore[dict-item]
    h2.events.StreamEnded: Http2Protocol._on_stream_ended,  # type: ignore[dict-item]
    h2.events.StreamReset: Http2Protocol._on_reset,  # type: ignore[dict-item]
    h2.events.WindowUpdated: Http2Protocol._on_window_update,  # type: ignore[dict-item]
    h2.events.RemoteSettingsChanged: Http2Protocol._on_settings,  # type: ignore[dict-item]
    h2.events.SettingsAcknowledged: Http2Protocol._on_settings_acked,  # type: ignore[dict-item]
    h2.events.PingReceived: Http2Protocol._on_control_frame,
    h2.events.PriorityUpdated: Http2Protocol._on_control_frame,
    h2.events.ConnectionTerminated: Http2Protocol._on_goaway,  # type: ignore[dict-item]
}
# Events that need nothing from us: h2 answers pings itself, and unknown frame types
# must be ignored (RFC 9113 section 5.5).
_IGNORED: frozenset[type[h2.events.Event]] = frozenset(
    {
        h2.events.PingAckReceived,
        h2.events.UnknownFrameReceived,
        h2.events.AlternativeServiceAvailable,
    }
)
