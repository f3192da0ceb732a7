"""The output side of the HTTP/2 front end: responses as HEADERS, DATA and trailers within
the client's flow-control windows (RFC 9113 section 6.9), resets and window updates, all
written through one buffer so that what many streams produce in one loop iteration goes
out in one send.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import h2.connection
import h2.exceptions
from h2.errors import ErrorCodes

from metrics.definitions import Http2Limit, count_http2_limit
from proxy.codec.h2fields import trailer_fields
from proxy.core.body import Body
from proxy.core.errors import ProxyError
from proxy.core.models import Request, Response
from proxy.frontend.connection import COPY_BELOW_BYTES, ClientConnection
from proxy.frontend.h2.conn import H2Exchange
from proxy.frontend.h2.data import complete_response, frame_data
from proxy.frontend.h2.fields import response_fields

log = logging.getLogger(__name__)

# A response chunk at least this large is written at once (so write backpressure is
# seen); smaller writes of one loop iteration are coalesced into one send.
FLUSH_NOW_BYTES = 16 * 1024


class ResponseWriter:
    """Writes for one connection. `streams` is the front end's live table (a stream that
    left it was reset or closed: its sender stops); `on_wait` is called when a sender
    starts waiting on the client's window, so the connection's deadline can follow."""

    def __init__(
        self,
        h2conn: h2.connection.H2Connection,
        conn: ClientConnection,
        streams: dict[int, H2Exchange],
        on_wait: Callable[[], None],
    ) -> None:
        self._h2 = h2conn
        self._conn = conn
        self._streams = streams
        self._on_wait = on_wait
        self._scheduled = False
        self._queued_bytes = 0  # in `out`, apart from what h2 had queued
        # Frames we made, in order after what h2 had queued; DATA as views of the body.
        self.out: list[bytes | memoryview] = []

    def __repr__(self) -> str:
        return f"<ResponseWriter queued={len(self.out)} scheduled={self._scheduled}>"

    def begin(
        self, stream: H2Exchange, request: Request | None, response: Response
    ) -> tuple[bytes, Body] | None:
        """Send the head, and the body too when it is complete and fits the windows.

        Returns None when the whole response is out; else what is left to send: bytes
        already taken from the body, and the body (which may still be streaming).
        """
        h2conn = self._h2
        stream_id = stream.id
        body = response.body
        status = response.status
        head_only = stream.head_request or status in (204, 304)
        stream.response_started = True
        stream.status = status
        if stream.tunnel_reading:
            stream.record_response()
        elif not head_only:
            stream.response_body = body
        if not body.complete:
            if head_only:
                body.discard()
                h2conn.send_headers(stream_id, response_fields(response, None), end_stream=True)
                self.flush_soon()
                return None
            h2conn.send_headers(stream_id, response_fields(response, body.length))
            self.flush_soon()
            return b"", body
        data = body.take_all()
        trailers = body.trailers
        if head_only:
            length = body.length if status not in (204, 304) else None
            h2conn.send_headers(stream_id, response_fields(response, length), end_stream=True)
            self.flush_soon()
            return None
        if not trailers:
            # The common case, a whole small response: framed by h2data in one go.
            frames = complete_response(
                h2conn, stream_id, response_fields(response, len(data)), data
            )
            if frames is not None:
                self.queue_frames(frames)
                return None
        h2conn.send_headers(stream_id, response_fields(response, None if trailers else len(data)))
        if data:
            window = min(
                h2conn.local_flow_control_window(stream_id), h2conn.max_outbound_frame_size
            )
            if len(data) > window:
                self.flush_soon()
                return data, body
            h2conn.send_data(stream_id, data, end_stream=not trailers)
        if trailers:
            h2conn.send_headers(stream_id, trailer_fields(trailers), end_stream=True)
        self.flush_soon()
        return None

    async def send_rest(self, stream: H2Exchange, data: bytes, body: Body) -> None:
        """Send what `begin` left: `data`, then the body's remaining chunks,
        then its trailers or END_STREAM."""
        stream_id = stream.id
        try:
            if data:
                await self.send_data(stream, data, end=body.complete and not body.trailers)
                if body.complete and not body.trailers:
                    return
            while chunk := await body.read():
                await self.send_data(stream, chunk, end=False)
            if stream_id not in self._streams:
                raise ConnectionResetError("stream closed")
            if body.trailers:
                self._h2.send_headers(stream_id, trailer_fields(body.trailers), end_stream=True)
            else:
                self._h2.send_data(stream_id, b"", end_stream=True)
            self.flush_soon()
        except (ProxyError, ConnectionError) as exc:
            # After the head, a broken response can only be signalled by a reset
            # (docs/errors.md).
            log.debug("response body on stream %d broke off: %r", stream_id, exc)
            body.discard()
            self.reset(stream_id, ErrorCodes.INTERNAL_ERROR)
        except asyncio.CancelledError:
            body.discard()
            raise

    async def send_data(self, stream: H2Exchange, data: bytes, *, end: bool) -> None:
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
                # HTTP/1.1 (WRITE), it gets body_timeout to open it (`expire`).
                self.flush()
                stream.window_waiter = conn.loop.create_future()
                stream.window_deadline = conn.loop.time() + conn.limits.body_timeout
                self._on_wait()
                try:
                    await stream.window_waiter
                finally:
                    stream.window_waiter = None
                    stream.window_deadline = 0.0
                continue
            frame_limit = h2conn.max_outbound_frame_size
            sent = min(len(view), window)
            last = sent == len(view)
            if end and last:
                # All but the last frame are framed here (data.py); the last goes through
                # h2, which sets END_STREAM and keeps its stream state in step.
                middle = (sent - 1) // frame_limit * frame_limit
                if middle:
                    self.queue_frames(frame_data(h2conn, stream_id, view[:middle], frame_limit))
                h2conn.send_data(stream_id, view[middle:sent].tobytes(), end_stream=True)
            else:
                self.queue_frames(frame_data(h2conn, stream_id, view[:sent], frame_limit))
            view = view[sent:]
            if sent >= FLUSH_NOW_BYTES or conn.write_paused:
                self.flush()
                if conn.write_paused:
                    await conn.drain()
            else:
                self.flush_soon()

    def expire(self, stream: H2Exchange, now: float) -> None:
        """Give up on `stream`'s response if the client has held its window shut past
        the deadline (the connection's on_timeout asks)."""
        waiter = stream.window_waiter
        if stream.window_deadline and stream.window_deadline <= now and waiter:
            # The response's sender gives up; the stream is reset.
            count_http2_limit(Http2Limit.WINDOW_TIMEOUT)
            stream.window_deadline = 0.0
            if not waiter.done():
                waiter.set_exception(ConnectionResetError("window kept shut"))

    def acknowledge(self, stream_id: int, size: int) -> None:
        if size <= 0 or self._conn.closed:
            return
        try:
            self._h2.acknowledge_received_data(size, stream_id)
        except h2.exceptions.ProtocolError:
            return  # the connection is closing
        self.flush()

    def reset(self, stream_id: int, code: ErrorCodes) -> None:
        try:
            self._h2.reset_stream(stream_id, error_code=code)
        except h2.exceptions.StreamClosedError:
            pass
        except h2.exceptions.ProtocolError:
            return
        self.flush()

    def flush(self) -> None:
        self._scheduled = False
        data = self._h2.data_to_send()
        out = self.out
        if out:
            if data:
                out.append(data)
            if len(out) == 1:
                self._conn.write(out[0])
            elif self._queued_bytes > COPY_BELOW_BYTES:
                self._conn.write_pieces(out)  # one writev: the body is not copied again
            else:
                self._conn.write(b"".join(out))
            self.out = []
            self._queued_bytes = 0
        elif data:
            self._conn.write(data)

    def discard_queued(self) -> None:
        """Drop what is queued and not yet written (the connection is being torn down)."""
        self.out = []
        self._queued_bytes = 0

    def queue_frames(self, frames: bytes | list[bytes | memoryview]) -> None:
        """Queue frames made outside h2 (data.py) behind what h2 has queued already."""
        pending = self._h2.data_to_send()
        out = self.out
        if pending:
            out.append(pending)
        if isinstance(frames, bytes):
            out.append(frames)
            self._queued_bytes += len(frames)
        else:
            out.extend(frames)
            for piece in frames:
                self._queued_bytes += len(piece)
        self.flush_soon()

    def flush_soon(self) -> None:
        """Write what h2 has queued at the end of this loop iteration: the answers of
        many streams that complete together go out in one send."""
        if not self._scheduled:
            self._scheduled = True
            self._conn.loop.call_soon(self.flush)
