"""HTTP/2 front end: one `Request` per stream, served concurrently; `Response`s back as
HEADERS, DATA and trailers, with real flow control.

The h2 library does the framing and HPACK (sans-IO); this module turns its events into the
exchange model and back, and adds the defences a server exposed to the internet needs
(`Http2Config` names the attack each limit stops). Flow control follows RFC 9113 section
5.2 end to end: a request's DATA is acknowledged (WINDOW_UPDATE) only once the exchange has
taken it from the body buffer, so a slow upstream slows the client instead of filling our
memory (request bodies: proxy/frontend/h2/receive.py); a response is sent no faster than
the client's windows allow (proxy/frontend/h2/send.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Container
from typing import Final

import h2.events
import h2.exceptions
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from metrics.definitions import Http2Limit, count_http2_limit
from proxy.codec.h2compat import (
    buffered_frame_bytes,
    open_stream_directly,
    reopen_after_goaway,
    set_header_list_cap,
    takes_whole_frames,
)
from proxy.config.model import Http2Config
from proxy.core.body import Body
from proxy.core.errors import BadRequest, BodyTooLarge, HeadTooLarge, ProxyError
from proxy.core.local_reply import local_reply
from proxy.core.models import Request, Response
from proxy.exchange.dispatch import Run
from proxy.frontend.connection import ClientConnection, ConnectionPhase
from proxy.frontend.h2.conn import H2Exchange, hard_header_cap, server_connection
from proxy.frontend.h2.fields import FieldsMemo, MalformedRequest
from proxy.frontend.h2.limits import RateWindow
from proxy.frontend.h2.receive import BodyReceiver
from proxy.frontend.h2.request import stream_request
from proxy.frontend.h2.send import ResponseWriter
from proxy.frontend.handover import start_h2_tunnel

log = logging.getLogger(__name__)

# RFC 9113 section 4.1 (the frame header), 6.2 (HEADERS) and 6.6 (PUSH_PROMISE).
FRAME_HEADER_BYTES: Final = 9
HEADERS_FRAME: Final = 0x1
PUSH_PROMISE_FRAME: Final = 0x5
CONTINUATION_FRAME: Final = 0x9
END_STREAM: Final = 0x1
END_HEADERS: Final = 0x4
PADDED: Final = 0x8
PRIORITY: Final = 0x20
# A HEADERS frame read without h2 has END_HEADERS and neither of the others.
_DIRECT_FLAGS_MASK: Final = END_HEADERS | PADDED | PRIORITY
_HEADER_BLOCK_FRAMES: Final = (HEADERS_FRAME, PUSH_PROMISE_FRAME)


class Http2Protocol:
    """One HTTP/2 client connection (h2c with prior knowledge, or h2 chosen by ALPN)."""

    def __init__(self, conn: ClientConnection) -> None:
        self._conn = conn
        self._server = conn.server
        settings: Http2Config = conn.server.http2
        self._settings = settings
        self._h2 = server_connection(settings)
        self._streams: dict[int, H2Exchange] = {}
        self._writer = ResponseWriter(self._h2, conn, self._streams, self._update_phase)
        self._resets = RateWindow(settings.max_resets_per_second, conn.loop.time)
        self._control = RateWindow(settings.max_control_frames_per_second, conn.loop.time)
        self._request_fields = FieldsMemo(settings.max_header_list_size)
        self._hard_header_cap = hard_header_cap(settings)
        self._closing = False  # GOAWAY sent or received: no new streams
        self._dead = False  # terminated: nothing more is read or sent
        self._last_stream_id = 0  # the highest stream we took (for our GOAWAY)
        self._idle_deadline = conn.loop.time() + conn.limits.keepalive_timeout
        # The request bodies the client sends, and their windows (for request buffering).
        self._receiver = BodyReceiver(
            conn, self._streams, self._writer, settings, self._update_phase
        )
        self.streams_read_directly = 0  # opened by _read_directly, not through h2
        self._writer.flush()

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
            self._writer.out.append(pending)
        if not self._closing and takes_whole_frames(h2conn):
            data = self._read_directly(data)
            if self._stopped():
                return
        if data:
            self._receive_through_h2(data)
            if self._stopped():
                return
        self._writer.flush()
        self._update_phase()

    def _read_directly(self, data: bytes) -> bytes:
        """Open the streams of the whole HEADERS frames in `data` without h2's generic
        receive path (its frame objects, event objects and the walk over every stream
        cost more than the rest of a request); the frames between them go to h2 in
        order. Returns what is left for h2: the frames after the last one read here and
        a partial frame.

        Only a HEADERS frame that is complete (END_HEADERS), unpadded and without a
        priority, on a new stream, outside another header block, is read here
        (`open_stream_directly`); h2 takes anything else, which keeps every error it
        finds where it was.
        """
        h2conn = self._h2
        size = len(data)
        limit = h2conn.max_inbound_frame_size
        handed = 0  # data[:handed] has been read, here or by h2
        position = 0
        in_block = False  # within a header block that CONTINUATION frames carry on
        while position + FRAME_HEADER_BYTES <= size:
            length = (data[position] << 16) | (data[position + 1] << 8) | data[position + 2]
            end = position + FRAME_HEADER_BYTES + length
            if end > size or length > limit:
                break  # h2 buffers the partial frame, or refuses the oversized one
            kind = data[position + 3]
            flags = data[position + 4]
            if kind == HEADERS_FRAME and flags & _DIRECT_FLAGS_MASK == END_HEADERS and not in_block:
                if handed < position:
                    self._receive_through_h2(data[handed:position])
                    handed = position
                    if self._stopped() or self._closing or not takes_whole_frames(h2conn):
                        break
                stream_id = int.from_bytes(data[position + 5 : position + 9], "big") & 0x7FFFFFFF
                try:
                    fields = open_stream_directly(
                        h2conn, stream_id, data[position + 9 : end], bool(flags & END_STREAM)
                    )
                except h2.exceptions.ProtocolError as exc:
                    self._connection_error(exc)
                    return b""
                if fields is not None:
                    self.streams_read_directly += 1
                    self._open_stream(stream_id, fields, bool(flags & END_STREAM))
                    handed = end
                    if self._stopped():
                        return b""
            elif kind in _HEADER_BLOCK_FRAMES and not flags & END_HEADERS:
                in_block = True  # h2 joins the block (or refuses what interrupts it)
            elif kind == CONTINUATION_FRAME and flags & END_HEADERS:
                in_block = False
            position = end
        return data[handed:] if handed else data

    def _receive_through_h2(self, data: bytes) -> None:
        """Hand client bytes to h2 and serve the events they make."""
        h2conn = self._h2
        try:
            events = h2conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._connection_error(exc)
            return
        # RFC 9113 section 4.2: h2 checks a frame's length only once all of it is here;
        # the 9-byte header already tells, so an oversized frame is never buffered.
        if buffered_frame_bytes(h2conn) > h2conn.max_inbound_frame_size + 9:
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
        self._writer.flush()
        self._conn.close()
        self._cancel_all()

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        self._open_stream(event.stream_id, event.headers or [], event.stream_ended is not None)

    def _open_stream(self, stream_id: int, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        """The client opened stream `stream_id` with request `headers` (and no body when
        `ended`): refuse it, answer it locally, or start its exchange."""
        if self._closing:
            # After our GOAWAY: RFC 9113 section 6.8, streams above last_stream_id are
            # ignored; telling the client it may retry them elsewhere is kinder.
            self._writer.reset(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        self._last_stream_id = stream_id
        if len(self._streams) >= self._settings.max_concurrent_streams:
            self._refuse(stream_id)
            return
        server = self._server
        try:
            fields = self._request_fields(headers, server.headers_with_underscores)
        except MalformedRequest as exc:
            # RFC 9113 section 8.1.1: a malformed request is a stream error.
            log.debug("malformed HTTP/2 request on stream %d: %s", stream_id, exc)
            count_http2_limit(Http2Limit.MALFORMED)
            self._writer.reset(stream_id, ErrorCodes.PROTOCOL_ERROR)
            return
        except ProxyError as error:  # 431, or 400 as HTTP/1.1 answers it (h2fields.py)
            if isinstance(error, HeadTooLarge):
                count_http2_limit(Http2Limit.HEADER_LIST)
            stream = self._streams[stream_id] = H2Exchange(stream_id)
            stream.head_request = (b":method", b"HEAD") in headers
            stream.reset_when_done = not ended
            self._start_task(stream, None, error)
            return
        stream = self._streams[stream_id] = H2Exchange(stream_id)
        stream.head_request = fields.method == b"HEAD"
        conn = self._conn
        if ended:
            body = Body.from_bytes(b"")
        else:
            body = self._receiver.open(stream, fields.content_length)
            if body.limit is not None and (body.length or 0) > body.limit:
                self._start_task(stream, None, BodyTooLarge())
                return
        try:
            request = stream_request(fields, body, stream, conn, ended)
        except ProxyError as refused:  # not `exc`: mypyc gives one name one type
            self._start_task(stream, None, refused)
            return
        stream.request = request
        run = self._server.start_exchange(request, functools.partial(self._on_response, stream))
        if run is None:
            return  # answered without a task (proxy/exchange/dispatch.py)
        self._start_task(stream, request, None, run)

    def _on_data(self, event: h2.events.DataReceived) -> None:
        data = event.data or b""
        if not data and not event.stream_ended and self._control.exceeded():
            self._calm_down(Http2Limit.CONTROL_FLOOD)  # empty DATA frames cost us work
            return
        padding = (event.flow_controlled_length or 0) - len(data)
        self._receiver.data(event.stream_id, data, padding)

    def _on_trailers(self, event: h2.events.TrailersReceived) -> None:
        self._receiver.trailers(event.stream_id, event.headers or [])

    def _on_stream_ended(self, event: h2.events.StreamEnded) -> None:
        self._receiver.ended(event.stream_id)

    def _on_reset(self, event: h2.events.StreamReset) -> None:
        # CVE-2023-44487: opening and cancelling streams costs the client nothing and us
        # a request's work each time. Resets the client provokes (a stream error h2
        # answers for us, e.g. a window overflow: "MadeYouReset", CVE-2025-8671) count
        # the same.
        if self._resets.exceeded():
            self._calm_down(Http2Limit.RAPID_RESET)
            return
        self._drop(event.stream_id, "client reset the stream")

    def _drop(self, stream_id: int, why: str) -> None:
        """Stop serving a stream that was reset (by the client, or by us)."""
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return
        if stream.body is not None:
            stream.body.fail(BadRequest(why))
            stream.body = None
        stream.cancel()
        self._wake(stream)

    def on_routes_removed(self, routes: Container[str]) -> None:
        """A reload removed `routes` and their grace period is over: streams still
        serving one are reset with CANCEL (WebSocket tunnels end on their own)."""
        for stream in list(self._streams.values()):
            request = stream.request
            if request is not None and request.exchange.route_name in routes and not stream.tunnel:
                self._writer.reset(stream.id, ErrorCodes.CANCEL)
                self._drop(stream.id, "its route was removed by a reload")

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
        set_header_list_cap(self._h2, self._hard_header_cap)

    def _on_control_frame(self, event: h2.events.Event) -> None:
        if self._control.exceeded():
            self._calm_down(Http2Limit.CONTROL_FLOOD)

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        self._closing = True
        if event.error_code:
            self._conn.close()
            self._cancel_all()
        elif not self._streams:
            self._writer.flush()
            self._conn.close()  # the client is done with us and nothing is in flight
        else:
            # h2 closes its state machine on any GOAWAY (python-hyper/h2 #1181), but a
            # graceful one lets the streams already open finish (RFC 9113 section 6.8).
            reopen_after_goaway(self._h2)

    def _calm_down(self, reason: Http2Limit) -> None:
        log.info("HTTP/2 %s from %s: GOAWAY", reason.value, self._conn.client[0])
        count_http2_limit(reason)
        # Replies h2 queued for the flood (PING and SETTINGS acks) are not sent.
        self._h2.clear_outbound_data_buffer()
        self._writer.discard_queued()
        self._terminate(ErrorCodes.ENHANCE_YOUR_CALM)

    def _refuse(self, stream_id: int) -> None:
        """A stream beyond max_concurrent_streams: refused, and counted like a reset (a
        client that keeps trying is flooding)."""
        if self._resets.exceeded():
            self._calm_down(Http2Limit.RAPID_RESET)
            return
        count_http2_limit(Http2Limit.REFUSED_STREAM)
        self._writer.reset(stream_id, ErrorCodes.REFUSED_STREAM)

    # -- serving --------------------------------------------------------------------
    def _start_task(
        self,
        stream: H2Exchange,
        request: Request | None,
        error: ProxyError | None,
        run: Run | None = None,
    ) -> None:
        stream.task = self._conn.loop.create_task(
            self._guarded(stream, self._serve, stream, request, error, run)
        )

    def _on_response(self, stream: H2Exchange, response: Response) -> None:
        # Called from an upstream connection's data_received: nothing may escape.
        try:
            request = stream.request
            if self._streams.get(stream.id) is not stream or self._dead:
                response.body.discard()  # the client reset the stream meanwhile
                return
            rest = self._writer.begin(stream, request, response)
            if rest is not None:
                # The response did not fit the windows, or is still streaming.
                stream.task = self._conn.loop.create_task(
                    self._guarded(stream, self._writer.send_rest, stream, *rest)
                )
                return
        except Exception:
            log.exception("bug in the HTTP/2 front end's fast path")
            self._writer.reset(stream.id, ErrorCodes.INTERNAL_ERROR)
        self._stream_done(stream)

    async def _guarded(
        self, stream: H2Exchange, work: Callable[..., Awaitable[None]], *args: object
    ) -> None:
        """Run a stream's task: a cancel (client reset, connection gone) just ends it, a
        bug resets the stream, and either way the stream is done afterwards."""
        try:
            await work(*args)
        except asyncio.CancelledError:
            return
        except Exception:
            log.exception("bug in the HTTP/2 front end")
            self._writer.reset(stream.id, ErrorCodes.INTERNAL_ERROR)
        finally:
            stream.task = None
            self._stream_done(stream)

    async def _serve(
        self,
        stream: H2Exchange,
        request: Request | None,
        error: ProxyError | None,
        run: Run | None,
    ) -> None:
        if run is None:
            assert error is not None
            response = local_reply(error, request)
        else:
            response = await run()
        if self._streams.get(stream.id) is not stream:
            if response.upgrade is not None:
                response.upgrade.close()
            response.body.discard()
            return
        if response.upgrade is not None:
            assert request is not None
            response = start_h2_tunnel(self._server, request, response)
            stream.tunnel_started(request.body)
        rest = self._writer.begin(stream, request, response)
        if rest is not None:
            await self._writer.send_rest(stream, *rest)
        if stream.tunnel_reading:
            await stream.wait_half_closed(self._h2, self._conn.loop)  # RFC 8441 section 5

    def _stream_done(self, stream: H2Exchange) -> None:
        stream.record_response()
        if self._streams.get(stream.id) is stream:
            del self._streams[stream.id]
        request = stream.request
        if request is not None and stream.body is None and not stream.tunnel_reading:
            # A complete body the exchange never read (a 401, 404 or early answer): what
            # is buffered is dropped, and its share of the windows handed back. (A tunnel
            # still reading reads it to the end: the client's last frames are in it.)
            request.body.discard()
        body = stream.body
        if body is not None or stream.reset_when_done:
            # Answered before the client finished its upload: RFC 9113 section 8.1 lets
            # us stop it with RST_STREAM NO_ERROR; the window comes back as it arrives.
            stream.body = None
            if body is not None:
                body.discard()
            self._writer.reset(stream.id, ErrorCodes.NO_ERROR)
        if self._conn.closed:
            return
        self._update_phase()
        if self._closing and not self._streams:
            self._writer.flush()
            self._conn.close()
        else:
            self._writer.flush_soon()

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
                # Only a body whose every byte has been taken (or that the exchange is
                # filling) waits on the client; one with bytes unread waits on us (the
                # window is not re-opened meanwhile).
                waits_on_client = body is not None and body.waits_on_producer and not stream.tunnel
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
    @staticmethod
    def _wake(stream: H2Exchange) -> None:
        waiter = stream.window_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _cancel_all(self) -> None:
        for stream in list(self._streams.values()):
            if stream.body is not None:
                stream.body.fail(BadRequest("connection closed"))
                stream.body = None
            stream.cancel()
        self._streams.clear()

    # -- connection callbacks (FrontEnd) ----------------------------------------------
    def on_eof(self) -> None:
        """The client half-closed: no more frames will come; finish and close."""
        self._closing = True
        for stream in self._streams.values():
            if stream.body is not None:
                stream.body.fail(BadRequest("client closed before the body was complete"))
                stream.body = None
                stream.client_gone()
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
                self._receiver.expire(stream, now)  # a request body the client stopped
                self._writer.expire(stream, now)  # a response its window holds back
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
        self._writer.flush()
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
