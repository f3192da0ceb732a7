"""The input side of the HTTP/2 front end's request bodies: each stream's DATA fed into
its `Body` within the declared content-length, its trailers and its end, and the
flow-control windows re-opened only as the exchange takes the bytes (RFC 9113 section
5.2), so a slow upstream slows the client instead of filling our memory. Also the
deadline of a body that waits on the client (limits.body_timeout).

The counterpart of proxy/frontend/h2/send.py, the output side; both are driven by the
connection's protocol (proxy/frontend/h2/protocol.py).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator

from h2.errors import ErrorCodes

from metrics.definitions import Http2Limit, count_http2_limit
from proxy.config.model import Http2Config
from proxy.core.body import Body
from proxy.core.errors import BadRequest, RequestTimeout
from proxy.frontend.connection import ClientConnection, ConnectionPhase
from proxy.frontend.h2.conn import H2Exchange, connection_window
from proxy.frontend.h2.fields import MalformedRequest, request_trailers
from proxy.frontend.h2.send import ResponseWriter

log = logging.getLogger(__name__)


class BodyReceiver:
    """The request bodies of one connection. `streams` is the front end's live table;
    `writer` re-opens windows (acknowledges DATA) and resets streams; `on_wait` is called
    when a stream of a busy connection starts waiting on the client, so the connection's
    deadline can follow."""

    def __init__(
        self,
        conn: ClientConnection,
        streams: dict[int, H2Exchange],
        writer: ResponseWriter,
        settings: Http2Config,
        on_wait: Callable[[], None],
    ) -> None:
        self._conn = conn
        self._streams = streams
        self._writer = writer
        self._on_wait = on_wait
        self._windows = ReceiveWindows(settings)  # for request buffering

    def __repr__(self) -> str:
        return f"<BodyReceiver unread={self._windows.unread}>"

    def open(self, stream: H2Exchange, length: int | None) -> Body:
        """The body of `stream`'s request, which the client still sends (`length`: its
        content-length, if any), bounded by limits.max_body_size; the client's silence
        counts from now."""
        conn = self._conn
        stream.body_deadline = conn.loop.time() + conn.limits.body_timeout
        body = Body(length)
        body.limit = conn.limits.max_body_size
        body.on_consumed = functools.partial(self._on_consumed, stream.id)
        body.on_fill = functools.partial(self._on_fill, stream.id)
        stream.body = body
        return body

    def data(self, stream_id: int, data: bytes, padding: int) -> None:
        """A DATA frame carrying `data` and `padding` bytes of padding."""
        stream = self._streams.get(stream_id)
        body = stream.body if stream is not None else None
        if body is None:
            # Nobody reads this stream's body any more: hand the window straight back.
            self._writer.acknowledge(stream_id, len(data) + padding)
            return
        if padding:
            self._writer.acknowledge(stream_id, padding)
        if data:
            assert stream is not None
            if body.length is not None and body.bytes_fed + len(data) > body.length:
                self._writer.acknowledge(stream_id, len(data))
                self._malformed_body(stream, "more DATA than content-length")
                return
            stream.body_deadline = self._conn.loop.time() + self._conn.limits.body_timeout
            body.feed(data)  # acknowledged when the exchange reads it (on_consumed)
            self._windows.fed(body, len(data), self._bodies())

    def trailers(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        """The request's trailers (a HEADERS frame after its DATA)."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        try:
            stream.trailers = request_trailers(headers)
        except MalformedRequest as exc:
            self._malformed_body(stream, str(exc))

    def ended(self, stream_id: int) -> None:
        """The client ended the stream (END_STREAM): the body is complete."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.body is None:
            return
        body = stream.body
        if body.length is not None and body.bytes_fed != body.length:
            self._malformed_body(stream, "less DATA than content-length")
            return
        stream.body = None
        body.feed_eof(stream.trailers)
        stream.wake_client_done()

    def expire(self, stream: H2Exchange, now: float) -> None:
        """Fail `stream`'s body if it has waited on the client past its deadline."""
        body = stream.body
        waits_on_client = body is not None and body.waits_on_producer and not stream.tunnel
        if body is not None and waits_on_client and stream.body_deadline <= now:
            # The exchange reading it answers 408 (or resets, if its response
            # has begun); the client's late DATA is dropped.
            stream.body = None
            stream.reset_when_done = True
            count_http2_limit(Http2Limit.BODY_TIMEOUT)
            body.fail(RequestTimeout("client too slow sending the body"))

    def _malformed_body(self, stream: H2Exchange, why: str) -> None:
        """RFC 9113 section 8.1.1: a malformed request is a stream error PROTOCOL_ERROR;
        the exchange reading its body sees it fail."""
        log.debug("malformed HTTP/2 request body on stream %d: %s", stream.id, why)
        count_http2_limit(Http2Limit.MALFORMED)
        body = stream.body
        stream.body = None
        self._streams.pop(stream.id, None)
        if body is not None:
            body.fail(BadRequest(why))
        stream.cancel()
        self._writer.reset(stream.id, ErrorCodes.PROTOCOL_ERROR)

    def _on_consumed(self, stream_id: int, size: int) -> None:
        """The exchange took `size` bytes of a request body: re-open the window, and if
        it has caught up, the stream now waits on the client (its deadline restarts)."""
        self._windows.taken(size)
        stream = self._streams.get(stream_id)
        if stream is not None and stream.body is not None:
            body = stream.body
            if body.bytes_fed == body.bytes_read:
                self._waits_on_client(stream)
        self._writer.acknowledge(stream_id, size)

    def _on_fill(self, stream_id: int) -> None:
        """The exchange waits for the whole body before going upstream (request
        buffering): the client is the slow side now."""
        stream = self._streams.get(stream_id)
        if stream is not None and stream.body is not None:
            self._waits_on_client(stream)
            self._windows.check(stream.body, self._bodies())

    def _waits_on_client(self, stream: H2Exchange) -> None:
        conn = self._conn
        stream.body_deadline = conn.loop.time() + conn.limits.body_timeout
        if conn.phase is ConnectionPhase.BUSY:
            self._on_wait()

    def _bodies(self) -> Iterator[Body]:
        return (stream.body for stream in self._streams.values() if stream.body is not None)


class ReceiveWindows:
    """What the client's flow-control windows hold of request bodies, so that request
    buffering (`Body.fill`) never waits for bytes the client may not send: DATA is
    acknowledged only once an exchange takes it, so a fill that waited past half a
    stream's window, or while the connection's is half held by unread bodies, could
    wait until body_timeout (the client may stop at either)."""

    __slots__ = ("_connection", "_spent", "_stream", "unread")

    def __init__(self, settings: Http2Config) -> None:
        self._stream = settings.initial_window_size
        self._connection = connection_window(settings)
        self.unread = 0  # body bytes received and not yet taken (or dropped)
        self._spent = False  # bodies have been told the connection's window is held

    def fed(self, body: Body, size: int, bodies: Iterable[Body]) -> None:
        """`size` bytes went into `body`; `bodies` are the connection's open ones."""
        self.unread += size
        self.check(body, bodies)

    def taken(self, size: int) -> None:
        """An exchange took (or dropped) `size` body bytes: the client may send them again."""
        self.unread -= size
        if self._spent and self.unread * 2 < self._connection:
            self._spent = False

    def check(self, body: Body, bodies: Iterable[Body]) -> None:
        """End the fills that could wait in vain (see the class docstring)."""
        if (body.bytes_fed - body.bytes_read) * 2 >= self._stream:
            body.window_full()
        if not self._spent and self.unread * 2 >= self._connection:
            self._spent = True
            for other in bodies:
                other.window_full()
