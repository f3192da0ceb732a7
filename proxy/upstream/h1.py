"""HTTP/1.1 client connection to one upstream endpoint.

One exchange at a time (no pipelining upstream: a failure could not be attributed). The
response body is a `Body` fed from `data_received`; its buffer pauses this socket when the
client reads slower than the upstream writes. When a response ends cleanly on a keep-alive
connection whose request was fully sent, the connection goes back to its pool.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING, cast

from metrics.traffic import cancelled_code, failure_code
from proxy.codec.h1 import H1Error, Headers, MessageHead, make_response_parser
from proxy.codec.h1serialize import chunk, last_chunk
from proxy.core.body import Body
from proxy.core.errors import ProxyError, UpstreamProtocolError, UpstreamReset, UpstreamTimeout
from proxy.core.headers import connection_tokens
from proxy.core.models import Response
from proxy.upstream.errors import StaleConnection as StaleConnection
from proxy.upstream.replay import BodyCopy

if TYPE_CHECKING:
    from proxy.upstream.pool import UpstreamPool

log = logging.getLogger(__name__)

# Response headers that describe this hop only (RFC 9110 section 7.6.1); framing is
# re-derived by the front end that writes the response.
RESPONSE_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "content-length",
        "upgrade",
        "trailer",
    }
)


_RAW_HOP_BY_HOP = frozenset(name.encode() for name in RESPONSE_HOP_BY_HOP)
_USUAL_CONNECTION_TOKENS = _RAW_HOP_BY_HOP | {b"close"}


# In callback mode, a response body up to this size is gathered before delivery.
FAST_BUFFER_BYTES = 64 * 1024
# A body up to this size is sent joined to the head; a larger one beside it (writelines).
COPY_BELOW_BYTES = 4096
ResponseCallback = Callable[[Response | None, ProxyError | None], None]


class UpstreamConnState(enum.Enum):
    """Lifecycle of an upstream connection (httpcore's HTTPConnectionState)."""

    CONNECTING = "connecting"
    IDLE = "idle"
    ACTIVE = "active"
    CLOSED = "closed"


class Http1UpstreamConnection(asyncio.Protocol):
    """An HTTP/1.1 connection owned by an `UpstreamPool`."""

    def __init__(self, pool: UpstreamPool, codec: str, max_head_bytes: int) -> None:
        self.pool = pool
        self.state = UpstreamConnState.CONNECTING
        self.requests = 0
        self.idle_since = 0.0
        self.deadline = 0.0
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._read_timeout = pool.read_timeout
        self._parser = make_response_parser(codec, self, max_head_bytes)
        # Who gets the response: the fast path's callback, or `exchange`'s waiter.
        self._callback: ResponseCallback | None = None
        self._pending: tuple[Response, ResponseCallback] | None = None
        self._body: Body | None = None
        self._head_only = False
        self._received = False  # any byte of the current response
        self._sender: asyncio.Task[None] | None = None
        self._request_sent = False
        self._reading_paused = False
        # The whole streamed body just sent, when small: replayable after the keep-alive
        # race (a StaleConnection) even though the client's stream is consumed.
        self.sent_body: bytes | None = None
        self._write_paused = False
        self._sender_waits_on_client = False
        self._awaiting_response = False  # a request was sent and its response not ended
        self._sent_at = 0.0  # perf_counter when the request went out, until its head came
        self._drain_waiter: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return (
            f"<Http1UpstreamConnection {self.pool.endpoint.host}:{self.pool.endpoint.port} "
            f"{self.state.name} requests={self.requests}>"
        )

    # -- asyncio callbacks -----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.state = UpstreamConnState.ACTIVE

    def data_received(self, data: bytes) -> None:
        if self.state is not UpstreamConnState.ACTIVE:
            # Bytes on an idle connection are a protocol violation: drop the connection.
            self.close()
            return
        self._received = True
        self.deadline = self._loop.time() + self._read_timeout
        try:
            self._parser.feed(data)
        except H1Error as exc:
            self._fail(UpstreamProtocolError(f"malformed response: {exc}"))
            self.close()
        pending = self._pending
        if pending is not None:
            body = pending[0].body
            # A small body still on its way (nginx sends head and file separately) is
            # waited for, so the client gets one write and the front end needs no task.
            if body.complete or body.length is None or body.length > FAST_BUFFER_BYTES:
                self._deliver()

    def eof_received(self) -> bool:
        if self.state is UpstreamConnState.ACTIVE:
            try:
                self._parser.feed_eof()
            except H1Error:
                self._fail(self._reset_error())
        self.close()  # delivers a response that EOF completed, fails an incomplete one
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state is not UpstreamConnState.CLOSED:
            self.state = UpstreamConnState.CLOSED
            self._fail(self._reset_error())
            self.pool.on_closed(self)
        sender = self._sender
        if sender is not None:
            sender.cancel()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the exchange ----------------------------------------------------------------
    def forget_sent_body(self) -> None:
        """Drop the copy of the previous request's streamed body."""
        self.sent_body = None

    async def exchange(
        self, method: str, head: bytes, body: Body, body_bytes: bytes | None
    ) -> Response:
        """Send one request and wait for the response head.

        `body_bytes` is the whole body when it is already in memory (sent with the head in
        one write); otherwise `body` streams, framed by its declared length or chunked.

        Raises:
            StaleConnection: a reused connection died before any response byte.
            UpstreamReset, UpstreamProtocolError, UpstreamTimeout: as their names say.
            ProxyError: reading the client's body failed (408, 413, 400).
        """
        transport = self.transport
        assert transport is not None
        assert self.state is UpstreamConnState.ACTIVE
        self._begin(method)
        waiter: asyncio.Future[Response] = self._loop.create_future()

        def settle(response: Response | None, error: ProxyError | None) -> None:
            if waiter.done():  # cancelled: the client left, nobody takes the response
                if response is not None:
                    response.body.discard()
            elif response is not None:
                waiter.set_result(response)
            else:
                waiter.set_exception(error or UpstreamReset())

        # The waiter is settled by the same delivery as the fast path's callback.
        self._callback = settle
        if body_bytes is not None:
            if len(body_bytes) <= COPY_BELOW_BYTES:  # one buffer, one send
                transport.write(head + body_bytes)
            else:  # one writev, no copy of the body
                transport.writelines((head, body_bytes))
            self._request_sent = True
        else:
            self._request_sent = False
            transport.write(head)
            self._sender = self._loop.create_task(self._send_body(body))
        try:
            return await waiter
        except asyncio.CancelledError as cancelled:
            # The client went away (or the try's per_try_timeout ran out). If our response
            # has not been delivered, this connection is mid-exchange and cannot be
            # reused; once delivered, it may already serve someone else, and `settle`
            # has dropped our response.
            pending = self._pending
            if self._callback is settle or (pending is not None and pending[1] is settle):
                self._callback = None
                self._pending = None
                self._count_failure(cancelled_code(cancelled))
                self.close()
            raise

    def start(self, method: str, head: bytes, on_response: ResponseCallback) -> None:
        """Send a request whose head (and body, if any) is all in `head`; the response
        (or the error) goes to `on_response` once, with no task or future involved. It
        is called when the head and whatever of the body came with it have been parsed,
        so a small response arrives complete."""
        transport = self.transport
        assert transport is not None
        self._begin(method)
        self._callback = on_response
        self._request_sent = True
        transport.write(head)

    def _begin(self, method: str) -> None:
        """Ready the connection for the response to a request of `method` being sent now
        (`exchange` and `start`): the parser, the read deadline, the counters."""
        self.requests += 1
        self._received = False
        self._head_only = method == "HEAD"
        self._parser.begin(method.encode("ascii"))
        self._awaiting_response = True
        self.deadline = self._loop.time() + self._read_timeout
        self._sent_at = perf_counter()

    def _deliver(self) -> None:
        pending = self._pending
        assert pending is not None
        self._pending = None
        response, callback = pending
        callback(response, None)

    async def _send_body(self, body: Body) -> None:
        transport = self.transport
        assert transport is not None
        chunked = body.length is None
        # Kept until the response head arrives, so that the keep-alive race can be retried.
        copy = BodyCopy()
        self.sent_body = None
        try:
            while True:
                # Waiting for the client is the client's timeout (body_timeout), not ours.
                self._sender_waits_on_client = True
                data = await body.read_joined()
                self._sender_waits_on_client = False
                if not data:
                    break
                transport.write(chunk(data) if chunked else data)
                copy.add(data)
                if self._write_paused:
                    # The upstream reads slower than the client sends: wait, and the
                    # client's body buffer fills and pauses the client in turn. An
                    # upstream that stops reading altogether hits the read timeout.
                    self.deadline = self._loop.time() + self._read_timeout
                    self._drain_waiter = self._loop.create_future()
                    await self._drain_waiter
                    self._drain_waiter = None
                    if transport.is_closing():
                        return
            if chunked:
                transport.write(last_chunk(body.trailers))
            self._request_sent = True
            self.sent_body = copy.joined()
            self.deadline = self._loop.time() + self._read_timeout
            if (
                self._parser.reusable
                and self._body is None
                and self.state is UpstreamConnState.ACTIVE
            ):
                self._release()
        except ProxyError as exc:
            # The client's body failed (too slow, too large, malformed): the upstream
            # got a truncated request, so this connection is done.
            self._fail(exc)
            self.close()
        finally:
            self._sender = None
            self._sender_waits_on_client = False

    def _reset_error(self) -> ProxyError:
        if not self._received and self.requests > 1:
            return StaleConnection("upstream closed a reused connection")
        return UpstreamReset("upstream closed the connection")

    def _count_failure(self, code: str) -> None:
        """The attempt under way (if its head has not come) ended without a response."""
        if self._sent_at:
            self._sent_at = 0.0
            self.pool.metrics.failure(code)

    def _fail(self, error: ProxyError) -> None:
        if self._sent_at:
            self._count_failure(failure_code(error))
        pending = self._pending
        if pending is not None:
            self._pending = None
            response, on_response = pending
            if response.body.complete:
                on_response(response, None)  # whole already: closing does not hurt it
            else:
                on_response(None, error)  # nothing reached the client yet: a local reply
        callback = self._callback
        if callback is not None:
            self._callback = None
            callback(None, error)
        body = self._body
        if body is not None:
            self._body = None
            body.fail(error)

    # -- parser sink -----------------------------------------------------------------
    def on_head(self, head: MessageHead) -> None:
        """Parser callback: the response head.

        Raises:
            H1Error: a response nobody asked for (bytes after the previous response).
        """
        if not self._awaiting_response:
            raise H1Error("response without a request")
        sent_at = self._sent_at
        if sent_at:
            self._sent_at = 0.0
            self.pool.metrics.response(head.status, sent_at)
        raw = [(name, value) for name, value in head.headers if name.lower() not in _RAW_HOP_BY_HOP]
        if head.connection:
            # RFC 9110 section 7.6.1: fields named in Connection are hop-by-hop too. Most
            # name only "keep-alive" or "close", already dropped: skip the second pass.
            named = connection_tokens(head.connection)
            if not named <= _USUAL_CONNECTION_TOKENS:
                raw = [(name, value) for name, value in raw if name.lower() not in named]
        length = None if head.chunked else head.content_length
        body = Body(length, on_pause=self._pause_reading, on_resume=self._resume_reading)
        body.on_abandon = self._abandon
        self._body = body
        response = Response(head.status, raw, body, head.reason.decode("latin-1"))
        callback = self._callback
        if callback is not None:
            # Delivered at the end of this data_received, with whatever body came along.
            self._callback = None
            self._pending = (response, callback)

    def on_body(self, data: bytes) -> None:
        """Parser callback: a piece of the response body."""
        body = self._body
        if body is not None:
            body.feed(data)

    def on_end(self, trailers: Headers | None) -> None:
        """Parser callback: the response is complete."""
        self._awaiting_response = False
        body = self._body
        self._body = None
        if body is not None:
            body.feed_eof(
                [(n.decode("latin-1"), v.decode("latin-1")) for n, v in trailers]
                if trailers
                else None
            )
        if not self._request_sent:
            # The upstream answered before taking the whole body (an early 413, say):
            # what is left of the body would be read as the next request.
            sender = self._sender
            if sender is not None:
                sender.cancel()
            self.close()
        elif self._parser.reusable:
            self._release()
        else:
            self.close()

    # -- pool bookkeeping ------------------------------------------------------------
    def _release(self) -> None:
        if self._reading_paused:
            self._resume_reading()
        self.pool.release(self)

    def _abandon(self) -> None:
        # The client stopped reading this response: its remaining bytes have nowhere to go.
        if self.state is UpstreamConnState.ACTIVE:
            self._body = None
            self.close()

    def _pause_reading(self) -> None:
        if self.transport is not None and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.transport is not None and self._reading_paused:
            self._reading_paused = False
            # The pause was the client's doing: the upstream's read deadline restarts.
            self.deadline = self._loop.time() + self._read_timeout
            if not self.transport.is_closing():
                self.transport.resume_reading()

    def timed_out(self, now: float) -> bool:
        """True when an active exchange waited past its read deadline (not while the
        client, not the upstream, is the slow side and has paused us)."""
        return (
            self.state is UpstreamConnState.ACTIVE
            and not self._reading_paused
            and not self._sender_waits_on_client
            and now >= self.deadline
        )

    def time_out(self) -> None:
        """Fail the exchange with 504 and drop the connection."""
        self._fail(UpstreamTimeout("upstream did not answer in time"))
        self.close()

    def close(self) -> None:
        """Drop the connection (never returns to the pool)."""
        if self.state is not UpstreamConnState.CLOSED:
            self.state = UpstreamConnState.CLOSED
            self._fail(self._reset_error())
            self.pool.on_closed(self)
        if self.transport is not None:
            # abort, not close: a failed exchange may leave unsent bytes for a peer that
            # does not read, and close() would wait for them forever.
            self.transport.abort()
