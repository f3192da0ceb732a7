"""HTTP/1.1 front end: client bytes -> `Request`s; `Response`s -> client bytes.

Requests on one connection are answered in order (pipelining, RFC 9112 section 9.3.2): heads
are queued as they parse and one task serves the queue, so a keep-alive connection costs no
task while it waits. Request bodies stream into a `Body` whose buffer pauses the socket;
response bodies stream out with `drain()` between chunks. Nothing the client sends escapes
from here as an exception: it becomes a local reply (400/408/413/431) and a close.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import deque
from collections.abc import Container

from metrics.traffic import HTTP1, count_request
from proxy.codec.h1 import H1Error, Headers, MessageHead, make_request_parser
from proxy.codec.h1serialize import (
    UnsafeHeader,
    chunk,
    last_chunk,
    reason_phrase,
    response_head,
)
from proxy.core.body import Body
from proxy.core.canonical import (
    KNOWN_AUTHORITIES,
    REGISTERED_METHODS,
    InvalidHeader,
    canonical_target,
    check_authority,
    check_method,
    client_fields,
)
from proxy.core.errors import BadRequest, BodyTooLarge, HeadTooLarge, ProxyError, RequestTimeout
from proxy.core.local_reply import local_reply
from proxy.core.models import Request, Response
from proxy.core.tracing import end_exchange
from proxy.exchange.dispatch import Run
from proxy.frontend.connection import ClientConnection, ConnectionPhase, ReadPause
from proxy.frontend.handover import start_h1_tunnel
from proxy.websocket.protocol import is_websocket

log = logging.getLogger(__name__)

# Beyond this many parsed-but-unanswered requests we stop reading: a client cannot make
# us queue without bound by pipelining.
MAX_PIPELINED_REQUESTS = 16
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"


class Http1Protocol:
    """One HTTP/1.1 client connection's protocol state (an `H1Sink` for the parser)."""

    __slots__ = (
        "_broken",
        "_closing",
        "_conn",
        "_inflight",
        "_parser",
        "_queue",
        "_receiving",
        "_server",
        "_serving",
        "_task",
        "_tunnel_rest",
    )

    def __init__(self, conn: ClientConnection) -> None:
        self._conn = conn
        self._server = conn.server
        self._parser = make_request_parser(
            conn.server.codec, self, conn.server.limits.max_head_bytes
        )
        self._queue: deque[Request | ProxyError] = deque()
        self._receiving: Body | None = None  # the body the parser is filling
        self._task: asyncio.Task[None] | None = None
        self._inflight: Request | None = None  # an exchange started without a task
        self._serving: Request | None = None  # the exchange the task is answering
        self._closing = False  # answer what is queued, then close
        self._broken = False  # the byte stream is unusable: parse nothing more
        self._tunnel_rest = b""  # what the client sent after a WebSocket upgrade's head

    def __repr__(self) -> str:
        busy = "BUSY" if self._task is not None else "IDLE"
        return f"<Http1Protocol {busy} queued={len(self._queue)} closing={self._closing}>"

    # -- input ----------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Parse client bytes; errors become queued local replies."""
        if self._broken:
            return
        try:
            rest = self._parser.feed(data)
        except H1Error as exc:
            self._fail_input(HeadTooLarge() if exc.too_large else BadRequest(str(exc)))
            return
        except ProxyError as error:  # not `exc`: mypyc gives one name one type
            self._fail_input(error)
            return
        if rest is not None:
            # Upgrade / CONNECT: the bytes after the head belong to a tunnel. A WebSocket
            # upgrade passes them on once the upstream said 101; otherwise (a refusal, an
            # upgrade to anything else) the head is answered and the connection closed.
            self._tunnel_rest = rest
            self._broken = True
            self._closing = True
            self._conn.pause_reading(ReadPause.BROKEN)

    def _fail_input(self, error: ProxyError) -> None:
        self._broken = True
        self._closing = True
        self._conn.pause_reading(ReadPause.BROKEN)
        body = self._receiving
        if body is not None:
            # The request being served learns of it when it reads its body.
            self._receiving = None
            body.fail(error)
            return
        self._queue.append(error)
        self._serve_soon()

    def on_head(self, head: MessageHead) -> None:
        """Parser callback: a request head is complete. It becomes a Request in the one
        canonical form every front end gives (proxy/core/canonical.py).

        Raises:
            BadRequest: the head is not one the gateway serves (answered 400, closed).
        """
        conn = self._conn
        if head.version != "1.1" and head.version != "1.0":
            raise BadRequest(f"unsupported HTTP version {head.version}")
        method = head.method.decode("ascii")
        if method not in REGISTERED_METHODS:
            check_method(method)
        if method == "CONNECT":
            raise BadRequest("CONNECT is not supported by a reverse proxy")
        server = self._server
        target, path, query, raw_target, authority = canonical_target(
            head.target, method, server.path_normalization
        )
        if head.host not in KNOWN_AUTHORITIES:
            check_authority(head.host)
        if head.repeated_singleton:
            raise InvalidHeader("more than one Authorization, Proxy-Authorization or Content-Type")
        headers = head.headers
        if head.connection is not None or head.underscore:
            headers = client_fields(
                headers, head.connection, head.underscore, server.headers_with_underscores
            )
        host = head.host
        if authority is not None:
            # RFC 9112 section 3.2.2: an absolute-form target's authority replaces Host.
            host = authority
            headers = [(n, v) for n, v in headers if n.lower() != b"host"] + [(b"Host", host)]
        upgrade = ""
        if head.upgrade:
            if head.chunked or head.content_length:
                # llhttp stops at an upgrade head, so its body would be lost.
                raise BadRequest("an Upgrade request with a body is not supported")
            if is_websocket(_field(head.headers, b"upgrade")):
                if method != "GET":
                    raise BadRequest("a WebSocket upgrade must be a GET (RFC 6455 4.1)")
                upgrade = "websocket"
            # Any other upgrade (h2c, say) is declined: served as an ordinary request.
        if not head.chunked and not head.content_length:
            body = Body.from_bytes(b"")
        else:
            limit = conn.limits.max_body_size
            if limit is not None and (head.content_length or 0) > limit:
                raise BodyTooLarge()
            body = Body(
                head.content_length,
                on_pause=conn.pause_for_body,
                on_resume=conn.resume_for_body,
                on_first_read=self._send_continue if head.expect_continue else None,
            )
            body.limit = limit
            self._receiving = body
            if not head.expect_continue:
                # With Expect: 100-continue the client waits for us: its body deadline
                # starts when we ask for the body (_send_continue), not now.
                conn.set_phase(ConnectionPhase.BODY)
        request = Request(
            method,
            target,
            headers,
            body,
            http_version=head.version,
            client=conn.client,
            scheme=conn.scheme,
            tls_version=conn.tls_version,
            listener=conn.listener,
            client_cert=conn.client_cert,
            keep_alive=head.keep_alive and not head.upgrade,
            host=host.decode("latin-1"),
            upgrade=upgrade,
            path=path,
            query=query,
            raw_target=raw_target,
        )
        resolve_client = self._server.client_ip
        if resolve_client is not None:
            resolve_client(request)  # `client_ip:` (proxy/core/client_ip.py)
        self._dispatch(request)

    def on_body(self, data: bytes) -> None:
        """Parser callback: a piece of the current request's body."""
        body = self._receiving
        if body is not None:
            body.feed(data)

    def on_end(self, trailers: Headers | None) -> None:
        """Parser callback: the current request is complete."""
        body = self._receiving
        if body is not None:
            self._receiving = None
            body.feed_eof(
                [(n.decode("latin-1"), v.decode("latin-1")) for n, v in trailers]
                if trailers
                else None
            )
            if self._conn.phase is ConnectionPhase.BODY:
                self._conn.set_phase(ConnectionPhase.BUSY)

    def on_eof(self) -> None:
        """The client half-closed: answer what is queued, then close."""
        self._closing = True
        body = self._receiving
        if body is not None:
            self._receiving = None
            body.fail(BadRequest("client closed before the body was complete"))
        if not self._busy and not self._queue:
            self._conn.close()

    def on_close(self) -> None:
        """The socket is gone: stop serving."""
        self._broken = True
        body = self._receiving
        if body is not None:
            self._receiving = None
            body.fail(BadRequest("client went away"))
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            inflight.exchange.cancel()  # a chain running without a task, a retry
        serving = self._serving
        if serving is not None:
            serving.exchange.cancel()
        task = self._task
        if task is not None:
            task.cancel()

    def on_timeout(self, phase: ConnectionPhase) -> None:
        """The connection's deadline passed in `phase`."""
        if phase is ConnectionPhase.IDLE:
            self._conn.close()
        elif phase is ConnectionPhase.BODY:
            self._conn.set_phase(ConnectionPhase.BUSY)
            self._fail_input(RequestTimeout("client too slow sending the body"))
        elif phase is ConnectionPhase.HEAD:
            self._conn.set_phase(ConnectionPhase.BUSY)
            if not self._busy and not self._queue:
                self._fail_input(RequestTimeout("client too slow sending the request head"))
            else:
                self._conn.close()

    def on_routes_removed(self, routes: Container[str]) -> None:
        """A reload removed `routes` and their grace period is over: an exchange still
        serving one is cut (HTTP/1.1 cannot end an exchange without its connection)."""
        request = self._serving or self._inflight
        if request is not None and request.exchange.route_name in routes:
            self._conn.abort()

    def on_drain_request(self) -> None:
        """Shutdown: close now if idle, else after the response in flight."""
        self._closing = True
        if not self._busy and not self._queue and self._receiving is None:
            self._conn.close()

    # -- serving --------------------------------------------------------------------
    @property
    def _busy(self) -> bool:
        return self._task is not None or self._inflight is not None

    def _dispatch(self, request: Request) -> None:
        """Start serving `request` now if nothing is ahead of it, else queue it."""
        if not self._busy and not self._queue and request.body.complete and not request.upgrade:
            # The exchange may run without a task (proxy/exchange/dispatch.py): its answer
            # then comes back through `_on_response`, with no task or future.
            self._inflight = request
            self._conn.set_phase(ConnectionPhase.BUSY)
            run = self._server.start_exchange(request, self._on_response)
            if run is None:
                return
            self._inflight = None
            self._task = self._conn.loop.create_task(self._serve(request, run))
            return
        self._queue.append(request)
        if len(self._queue) >= MAX_PIPELINED_REQUESTS:
            self._conn.pause_reading(ReadPause.PIPELINE)
        self._serve_soon()

    def _on_response(self, response: Response) -> None:
        # Called from an upstream connection's data_received: nothing may escape into it.
        try:
            self._respond(response)
        except Exception:
            log.exception("bug in the HTTP/1.1 front end answering without a task")
            self._conn.abort()

    def _respond(self, response: Response) -> None:
        request = self._inflight
        if request is None:
            # The client went away meanwhile: release what is still streaming.
            response.body.discard()
            return
        self._inflight = None
        conn = self._conn
        if conn.closed:
            response.body.discard()
            return
        keep_alive = self._keep_alive(request)
        if response.body.complete:
            if self._start_response(request, response, keep_alive) is not _Sent.DONE:
                conn.abort()
            elif not keep_alive:
                self._close(request)
            else:
                self._idle_or_next()
            return
        # A body still streaming needs a task to wait on it.
        self._serving = request
        self._task = conn.loop.create_task(self._finish_streaming(request, response))

    async def _finish_streaming(self, request: Request, response: Response) -> None:
        try:
            if not await self._write(request, response, keep_alive=self._keep_alive(request)):
                self._conn.abort()
                return
        finally:
            self._task = self._serving = None
        if not self._keep_alive(request):
            self._close(request)
        else:
            self._idle_or_next()

    def _close(self, request: Request | None) -> None:
        """Close after the last answer; linger when the client may still be sending."""
        if request is not None and request.body.complete and not self._broken:
            self._conn.close()
        else:
            self._conn.close_lingering()

    def _keep_alive(self, request: Request) -> bool:
        # A body the exchange did not read to its end would be parsed as the next
        # request: only a complete one lets the connection live on.
        if not request.keep_alive or not request.body.complete:
            return False
        if self._closing or self._server.draining:
            # Closing: what is already queued (pipelined requests, a parse error's
            # reply) is still answered; the last answer carries Connection: close.
            return bool(self._queue)
        return True

    def _idle_or_next(self) -> None:
        if self._queue:
            self._serve_soon()
        elif self._closing and self._receiving is None:
            self._conn.close()
        elif self._conn.phase is ConnectionPhase.BUSY:
            # Part of the next head may have arrived already: then the header timeout,
            # not the keep-alive one, bounds the rest.
            idle = self._parser.idle
            self._conn.set_phase(ConnectionPhase.IDLE if idle else ConnectionPhase.HEAD)

    def _serve_soon(self) -> None:
        if not self._busy:
            self._task = self._conn.loop.create_task(self._serve())

    async def _serve(self, first: Request | None = None, first_run: Run | None = None) -> None:
        """Answer `first` (already started, its Run given), then whatever is queued."""
        conn = self._conn
        queue = self._queue
        try:
            while not conn.closed:
                if first is not None:
                    item: Request | ProxyError = first
                    run, first = first_run, None
                elif queue:
                    item, run = queue.popleft(), None
                    if len(queue) < MAX_PIPELINED_REQUESTS:
                        conn.resume_reading(ReadPause.PIPELINE)
                else:
                    break
                if isinstance(item, ProxyError):
                    await self._write(None, local_reply(item, None), keep_alive=False)
                    self._close(None)
                    return
                if conn.phase is not ConnectionPhase.BODY:
                    conn.set_phase(ConnectionPhase.BUSY)
                self._serving = item
                response = await (run() if run is not None else self._exchange(item))
                if response.upgrade is not None:
                    # The upstream said 101: the socket becomes a tunnel (or, with the
                    # client gone meanwhile, the upstream's connection is closed).
                    start_h1_tunnel(conn, item, response, self._tunnel_rest)
                    return
                keep_alive = self._keep_alive(item)
                if not await self._write(item, response, keep_alive=keep_alive):
                    conn.abort()
                    return
                self._serving = None
                if not keep_alive or not item.keep_alive:
                    self._close(item)
                    return
                if conn.write_paused:
                    # Answers to pipelined requests must not pile up unread in memory.
                    await conn.drain()
        except asyncio.CancelledError:
            return  # the client went away
        except Exception:
            log.exception("bug in the HTTP/1.1 front end")
            conn.abort()
            return
        finally:
            self._task = self._serving = None
        self._idle_or_next()

    async def _exchange(self, request: Request) -> Response:
        """Start a queued request's exchange from the serving task and wait for its
        answer (which may come without the task's help, proxy/exchange/dispatch.py)."""
        answer: asyncio.Future[Response] = self._conn.loop.create_future()

        def reply(response: Response) -> None:
            if answer.done():  # the client went away meanwhile
                response.body.discard()
            else:
                answer.set_result(response)

        run = self._server.start_exchange(request, reply)
        if run is not None:
            return await run()
        return await answer

    def _send_continue(self) -> None:
        # RFC 9110 section 10.1.1: the client waits for this before sending the body; we
        # send it when the exchange first reads the body, so a request refused before
        # that (404, 401, 413) never makes the client upload.
        self._conn.write(CONTINUE_100)
        if self._receiving is not None:
            self._conn.set_phase(ConnectionPhase.BODY)

    async def _write(
        self, request: Request | None, response: Response, *, keep_alive: bool
    ) -> bool:
        """Serialize `response`; False when it broke off midway (the caller aborts)."""
        sent = self._start_response(request, response, keep_alive)
        if sent is _Sent.DONE:
            return True
        if sent is _Sent.FAILED:
            return False
        conn = self._conn
        body = response.body
        chunked = sent is _Sent.STREAM_CHUNKED
        try:
            while True:
                data = await body.read()
                if not data:
                    break
                conn.write(chunk(data) if chunked else data)
                if conn.write_paused:
                    await conn.drain()
            if chunked:
                conn.write(last_chunk(body.trailers))
        except (ProxyError, ConnectionError, UnsafeHeader) as exc:
            log.debug("response body broke off: %r", exc)
            body.discard()
            return False
        except asyncio.CancelledError:
            body.discard()  # the client went away: the upstream must not wait on us
            raise
        finally:
            # Ended, or broke off after the head.
            count_request(request, response.status, body.bytes_read, HTTP1)
            end_exchange(request, response.status)
        return True

    def _start_response(
        self, request: Request | None, response: Response, keep_alive: bool
    ) -> _Sent:
        """Write the head, and the body too when it is complete (one write)."""
        conn = self._conn
        status = response.status
        body = response.body
        head_only = (request is not None and request.method == "HEAD") or status in (204, 304)
        http10 = request is not None and request.http_version == "1.0"
        framing: list[bytes] = []
        streaming = _Sent.DONE
        if body.complete:
            data = body.take_all()
            if head_only:
                if body.length is not None and status not in (204, 304):
                    framing.append(b"Content-Length: %d\r\n" % body.length)
                data = b""
            elif body.trailers and not http10:
                # Trailers only travel in chunked encoding (RFC 9112 section 7.1.2).
                framing.append(b"Transfer-Encoding: chunked\r\n")
                data = (chunk(data) if data else b"") + last_chunk(body.trailers)
            else:
                framing.append(b"Content-Length: %d\r\n" % len(data))
        else:
            data = b""
            if head_only:
                body.discard()
            elif body.length is not None:
                framing.append(b"Content-Length: %d\r\n" % body.length)
                streaming = _Sent.STREAM_RAW
            elif http10:
                # Close-delimited: the only framing HTTP/1.0 knows. The caller sees the
                # request is no longer keep-alive and closes at the end.
                keep_alive = False
                if request is not None:
                    request.keep_alive = False
                streaming = _Sent.STREAM_RAW
            else:
                framing.append(b"Transfer-Encoding: chunked\r\n")
                streaming = _Sent.STREAM_CHUNKED
        if not keep_alive:
            framing.append(b"Connection: close\r\n")
        elif http10:
            framing.append(b"Connection: keep-alive\r\n")
        try:
            head = response_head_bytes(response, framing)
        except UnsafeHeader:
            log.exception("refusing to send an unsafe response header")
            body.discard()
            conn.write(_UNSAFE_REPLY)
            count_request(request, 500, 0, HTTP1)
            end_exchange(request, 500)
            return _Sent.FAILED
        conn.write_head_and_body(head, data)
        if streaming is _Sent.DONE:
            # Streamed bodies are counted by `_write`.
            count_request(request, status, 0 if head_only else body.bytes_read, HTTP1)
            end_exchange(request, status)
        return streaming


def _field(headers: Headers, name: bytes) -> bytes:
    """The first value of field `name` (lower-case) in a raw header list, or b""."""
    for field_name, value in headers:
        if field_name.lower() == name:
            return value
    return b""


class _Sent(enum.Enum):
    """What `_start_response` wrote."""

    DONE = "done"  # the whole response
    STREAM_RAW = "stream_raw"  # the head: body bytes follow as they are
    STREAM_CHUNKED = "stream_chunked"  # the head: body follows in chunks
    FAILED = "failed"  # nothing usable: the connection must be aborted


_UNSAFE_REPLY = (
    b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
)
_STATUS_LINES = {
    status: b"HTTP/1.1 %d %s\r\n" % (status, reason_phrase(status).encode())
    for status in range(100, 600)
    if reason_phrase(status)
}


def response_head_bytes(response: Response, framing: list[bytes]) -> bytes:
    """Status line, headers, our framing lines, blank line.

    Raw upstream headers were validated by the parser and are copied as they are; headers
    set through the model are checked by the serializer.

    Raises:
        UnsafeHeader: a header set through the model would split the message.
    """
    status = response.status
    raw = response.raw_headers
    if raw is None:
        reason = response.reason or reason_phrase(status)
        head = response_head(status, reason, list(response.headers.items()))
        return head[:-2] + b"".join(framing) + b"\r\n"
    parts = [_STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status]
    for name, value in raw:
        parts += (name, b": ", value, b"\r\n")
    parts += framing
    parts.append(b"\r\n")
    return b"".join(parts)
