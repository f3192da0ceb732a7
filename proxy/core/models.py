"""The exchange model shared by every front end, the middleware chain and forwarding.

`Request` and `Response` never know which protocol carried them (CONTRIBUTING.md, style). Bodies are
`Body` streams: a connection produces chunks, the other side consumes them, and a bounded
buffer with high/low watermarks pauses the producer, so backpressure crosses every hop.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING, Protocol

from multidict import CIMultiDict

from proxy.codec.h1serialize import check_headers
from proxy.core.client_cert import ClientCertificate
from proxy.core.errors import BodyTooLarge
from proxy.core.exchange import Exchange

if TYPE_CHECKING:
    from yarl import URL

    from proxy.config.model import ListenerConfig

BODY_HIGH_WATER_BYTES = 256 * 1024
BODY_LOW_WATER_BYTES = 64 * 1024
READ_JOINED_BYTES = 64 * 1024  # what `Body.read_joined` gathers at most

Trailers = list[tuple[str, str]]


class Body:
    """An async byte stream with a bounded buffer.

    The producer calls `feed`, `feed_eof` or `fail`; the consumer calls `read` (b"" at the
    end) or, when `complete`, `take_all`. When more than `high_water` bytes wait unread,
    `on_pause` is called (the producer stops reading its socket); when the consumer has
    drained them below the low watermark, `on_resume` is called. Before reading, the
    consumer may `fill` the buffer: wait for the whole body, up to a size (request
    buffering, proxy/exchange/forward.py).
    """

    __slots__ = (
        "_buffered",
        "_chunks",
        "_done",
        "_eof",
        "_error",
        "_filling",
        "_full",
        "_high_water",
        "_on_first_read",
        "_on_pause",
        "_on_resume",
        "_paused",
        "_waiter",
        "bytes_fed",
        "bytes_read",
        "length",
        "limit",
        "on_abandon",
        "on_consumed",
        "on_done",
        "on_fill",
        "tap",
        "trailers",
    )

    def __init__(
        self,
        length: int | None = None,
        *,
        on_pause: Callable[[], None] | None = None,
        on_resume: Callable[[], None] | None = None,
        on_first_read: Callable[[], None] | None = None,
    ) -> None:
        self.length = length  # declared length, when the message had one
        self.trailers: Trailers | None = None
        self.bytes_read = 0
        self.bytes_fed = 0
        self.limit: int | None = None  # max_body_size: feeding past it fails the body (413)
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._eof = False
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._on_pause = on_pause
        self._on_resume = on_resume
        self._on_first_read = on_first_read
        self._paused = False
        self._high_water = BODY_HIGH_WATER_BYTES  # raised while the consumer fills
        self._full = False  # the producer can deliver no more until something is read
        self._filling = False
        # Called when the consumer gives up before the end (the producer can stop).
        self.on_abandon: Callable[[], None] | None = None
        # Called with the size of each chunk the consumer took (or that was dropped):
        # HTTP/2 re-opens its flow-control window only for bytes that have moved on.
        self.on_consumed: Callable[[int], None] | None = None
        # Called once when the consumer is done with the body: read to its end, taken
        # whole, failed or discarded (what an access log waits for).
        self.on_done: Callable[[], None] | None = None
        # Called when the consumer starts to `fill`: from then on the producer is the
        # slow side, though nothing was read (HTTP/2 restarts the body deadline).
        self.on_fill: Callable[[], None] | None = None
        # Given each chunk as the consumer takes it, then b"" at the end it reads: a
        # route's mirror copies a streamed body this way (proxy/exchange/mirror.py).
        self.tap: Callable[[bytes], None] | None = None

    @classmethod
    def from_bytes(cls, data: bytes) -> Body:
        """A complete body holding `data`."""
        body = cls(len(data))
        if data:
            body._chunks.append(data)
            body._buffered = len(data)
        body._eof = True
        return body

    def __repr__(self) -> str:
        state = "FAILED" if self._error else "EOF" if self._eof else "OPEN"
        return f"<Body {state} buffered={self._buffered} read={self.bytes_read}>"

    # -- producer side ---------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Append a chunk; pauses the producer above the high watermark."""
        if self._done or self._error is not None:
            # The consumer gave up, or the stream already failed: drop.
            if self.on_consumed is not None:
                self.on_consumed(len(data))
            return
        self.bytes_fed += len(data)
        if self.limit is not None and self.bytes_fed > self.limit:
            self.fail(BodyTooLarge())
            if self.on_consumed is not None:
                self.on_consumed(len(data))
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._waiter is not None:
            self._wake()
        if self._buffered > self._high_water and not self._paused and self._on_pause:
            self._paused = True
            self._on_pause()

    def feed_eof(self, trailers: Trailers | None = None) -> None:
        """Mark the end of the stream."""
        self._eof = True
        self.trailers = trailers
        if self._waiter is not None:
            self._wake()

    def window_full(self) -> None:
        """The producer can deliver nothing more before the consumer reads (an HTTP/2
        stream's or connection's flow-control window is spent): a `fill` ends now."""
        self._full = True
        if self._waiter is not None:
            self._wake()

    def fail(self, exc: BaseException) -> None:
        """End the stream with an error that the consumer's next `read` raises."""
        if self._eof or self._error is not None:
            return
        self._error = exc
        self._drop_buffered()
        if self._waiter is not None:
            self._wake()

    # -- consumer side ---------------------------------------------------------------
    @property
    def waits_on_producer(self) -> bool:
        """True when the consumer has taken every byte, or is filling: what comes next
        is the producer's to deliver (a client's body deadline runs)."""
        return self.bytes_fed == self.bytes_read or self._filling

    @property
    def complete(self) -> bool:
        """True when the whole body has arrived (the fast path can `take_all`)."""
        return self._eof and self._error is None

    async def fill(self, limit: int) -> bool:
        """Wait, reading nothing, until the whole body has arrived, more than `limit`
        bytes wait, or the producer says it can deliver no more (`window_full`); the
        producer is not paused below `limit`. True when the body is complete (then
        `take_all` has it). Like `read`, this is when a client that expects 100-continue
        is asked for the body.

        Raises:
            Whatever the producer passed to `fail` (a ProxyError: 408, 413, 400).
        """
        if self._on_first_read is not None:
            callback, self._on_first_read = self._on_first_read, None
            callback()
        self._high_water = max(limit, BODY_HIGH_WATER_BYTES)
        if self._paused and self._on_resume and self._buffered <= limit:
            self._paused = False
            self._on_resume()
        self._filling = True
        if self.on_fill is not None:
            self.on_fill()
        try:
            while not self._eof and self._error is None and self._buffered <= limit:
                if self._full:
                    break
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
        finally:
            self._high_water = BODY_HIGH_WATER_BYTES
            self._filling = False
        if self._error is not None:
            if self.on_done is not None:
                self._finished()
            raise self._error
        return self._eof

    def take_all(self) -> bytes:
        """Everything buffered, as one bytes object (for `complete` bodies)."""
        if self._on_first_read is not None:
            self._on_first_read = None
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        self.bytes_read += len(data)
        if self.on_consumed is not None:
            self.on_consumed(len(data))
        if self.tap is not None:
            self.tap(data)
            self.tap(b"")  # (a complete body: nothing comes after)
        if self.on_done is not None:
            self._finished()
        return data

    async def read(self) -> bytes:
        """The next chunk, or b"" at the end.

        Raises:
            Whatever the producer passed to `fail` (a ProxyError), once the buffer is empty.
        """
        if self._on_first_read is not None:
            callback, self._on_first_read = self._on_first_read, None
            callback()
        while not self._chunks:
            if self._error is not None:
                if self.on_done is not None:
                    self._finished()
                raise self._error
            if self._eof:
                if self.tap is not None:
                    self.tap(b"")
                if self.on_done is not None:
                    self._finished()
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._chunks.popleft()
        self._took(len(data))
        if self.tap is not None:
            self.tap(data)
        return data

    async def read_joined(self, limit: int = READ_JOINED_BYTES) -> bytes:
        """`read`, joined with the chunks already buffered behind it while the total
        stays within `limit` bytes (one larger chunk comes alone).

        A client's many small chunks (or HTTP/2 DATA frames) then cost the consumer one
        write, not one each: the per-chunk work downstream stays a small constant.

        Raises:
            What `read` raises.
        """
        data = await self.read()
        chunks = self._chunks
        if not data or not chunks or len(data) + len(chunks[0]) > limit:
            return data
        parts = [data]
        size = len(data)
        while chunks and size + len(chunks[0]) <= limit:
            part = chunks.popleft()
            parts.append(part)
            size += len(part)
            if self.tap is not None:
                self.tap(part)
        self._took(size - len(data))
        return b"".join(parts)

    def _took(self, size: int) -> None:
        """The consumer took `size` bytes off the buffer."""
        self._buffered -= size
        self.bytes_read += size
        if self.on_consumed is not None:
            self.on_consumed(size)
        if self._paused and self._buffered <= BODY_LOW_WATER_BYTES and self._on_resume:
            self._paused = False
            self._on_resume()

    def discard(self) -> None:
        """The consumer will read no more: drop what is buffered and what comes."""
        self._done = True
        if self.on_done is not None:
            self._finished()
        self._drop_buffered()
        if self._paused and self._on_resume:
            self._paused = False
            self._on_resume()
        if not self._eof and self._error is None and self.on_abandon is not None:
            callback, self.on_abandon = self.on_abandon, None
            callback()

    def _finished(self) -> None:
        callback, self.on_done = self.on_done, None
        if callback is not None:
            callback()

    def _drop_buffered(self) -> None:
        dropped = self._buffered
        self._chunks.clear()
        self._buffered = 0
        if dropped and self.on_consumed is not None:
            self.on_consumed(dropped)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


RawHeaders = list[tuple[bytes, bytes]]


class _Message:
    """Headers that stay the parser's (already validated) byte pairs in `raw_headers`
    until something reads `headers`; from then on the CIMultiDict is the only truth and
    `raw_headers` is None. A route with no middleware never pays for the conversion."""

    __slots__ = ("_headers", "raw_headers")

    def _init_headers(self, headers: CIMultiDict[str] | RawHeaders | None) -> None:
        if isinstance(headers, list):
            self.raw_headers: RawHeaders | None = headers
            self._headers: CIMultiDict[str] | None = None
        else:
            self.raw_headers = None
            self._headers = headers if headers is not None else CIMultiDict()

    @property
    def headers(self) -> CIMultiDict[str]:
        """The headers (built from `raw_headers` on first use)."""
        headers = self._headers
        if headers is None:
            assert self.raw_headers is not None
            headers = self._headers = CIMultiDict(
                [(n.decode("latin-1"), v.decode("latin-1")) for n, v in self.raw_headers]
            )
            self.raw_headers = None
        return headers

    @headers.setter
    def headers(self, value: CIMultiDict[str]) -> None:
        self._headers = value
        self.raw_headers = None

    # Header access that keeps raw headers raw. Middleware on the hot path uses these: a
    # message whose headers stay raw is serialized by copying bytes, while reading
    # `headers` builds a CIMultiDict and sends the message down the checked text path.

    def header(self, name: str) -> str | None:
        """The first value of field `name` (case-insensitive), or None."""
        raw = self.raw_headers
        if raw is None:
            assert self._headers is not None
            return self._headers.get(name)
        wanted = name.lower().encode("latin-1")
        for field, value in raw:
            if len(field) == len(wanted) and field.lower() == wanted:
                return value.decode("latin-1")
        return None

    def set_header(self, name: str, value: str) -> None:
        """Replace every `name` field with one `name: value`.

        Raises:
            UnsafeHeader: the name is not a token, or the value holds CR, LF or NUL.
        """
        raw = self.raw_headers
        if raw is None:
            assert self._headers is not None
            self._headers[name] = value
            return
        field = _checked_field(name, value)
        wanted = field[0].lower()
        size = len(wanted)
        kept = [pair for pair in raw if len(pair[0]) != size or pair[0].lower() != wanted]
        kept.append(field)
        self.raw_headers = kept

    def add_header(self, name: str, value: str) -> None:
        """Append a `name: value` field (after any others of that name).

        Raises:
            UnsafeHeader: as `set_header`.
        """
        raw = self.raw_headers
        if raw is None:
            assert self._headers is not None
            self._headers.add(name, value)
            return
        self.raw_headers = [*raw, _checked_field(name, value)]

    def remove_header(self, name: str) -> None:
        """Drop every `name` field."""
        raw = self.raw_headers
        if raw is None:
            assert self._headers is not None
            self._headers.popall(name, None)
            return
        wanted = name.lower().encode("latin-1")
        size = len(wanted)
        for field, _ in raw:
            if len(field) == size and field.lower() == wanted:
                break
        else:
            return  # absent: the list stays as it is (the common case: nothing to strip)
        self.raw_headers = [
            pair for pair in raw if len(pair[0]) != size or pair[0].lower() != wanted
        ]


# Names `_checked_field` found to be tokens (middleware set the same few on every request).
_TOKEN_NAMES: set[str] = set()
_TOKEN_NAMES_MAX = 1024


def _checked_field(name: str, value: str) -> tuple[bytes, bytes]:
    if name not in _TOKEN_NAMES or "\r" in value or "\n" in value or "\x00" in value:
        check_headers([(name, value)])  # raises for an unsafe one
        if len(_TOKEN_NAMES) < _TOKEN_NAMES_MAX:
            _TOKEN_NAMES.add(name)
    return name.encode("latin-1"), value.encode("latin-1")


class Upgraded(Protocol):
    """An upstream connection that answered 101 and waits to become a tunnel."""

    def close(self) -> None: ...


class Request(_Message):
    """One request, as every front end produces it.

    `target` is the request target in canonical origin-form (proxy/core/canonical.py), what
    routing matches and the upstream gets unless a rewrite changes it; `path` and `query`
    are its halves as text. `raw_target` is the origin-form target as the client sent it
    (a route with `forward_raw_path` forwards that). Headers: see `_Message`.
    """

    __slots__ = (
        "_url",
        "body",
        "client",
        "client_cert",
        "consumer",
        "exchange",
        "host",
        "http_version",
        "keep_alive",
        "listener",
        "method",
        "path",
        "peer",
        "peer_trusted",
        "query",
        "raw_target",
        "request_id",
        "scheme",
        "target",
        "tls_version",
        "upgrade",
    )

    def __init__(
        self,
        method: str,
        target: bytes,
        headers: CIMultiDict[str] | RawHeaders,
        body: Body,
        *,
        http_version: str = "1.1",
        client: tuple[str, int] = ("", 0),
        scheme: str = "http",
        keep_alive: bool = True,
        host: str | None = None,
        upgrade: str = "",
        path: str | None = None,
        query: str = "",
        raw_target: bytes | None = None,
        tls_version: str = "",
        listener: ListenerConfig | None = None,
        client_cert: ClientCertificate | None = None,
    ) -> None:
        self.method = method
        self.target = target
        self.raw_target = target if raw_target is None else raw_target
        if path is None:  # not split by the front end (a request built by hand)
            raw_path, _, raw_query = target.partition(b"?")
            path, query = raw_path.decode("latin-1"), raw_query.decode("latin-1")
        self.path = path
        self.query = query
        self._init_headers(headers)
        self.body = body
        self.http_version = http_version
        # The client's address: the connection's peer until proxy/core/client_ip.py decides
        # otherwise (`client_ip:`), which every consumer of "the client" reads. `peer` is
        # the address the request came from (the TCP peer, or the source a believed PROXY
        # header gave), and `peer_trusted` whether it is one of `client_ip.trusted_proxies`
        # (what it forwarded is then kept, proxy/core/headers.py).
        self.client = client
        self.peer = client
        self.peer_trusted = False
        self.scheme = scheme
        self.tls_version = tls_version  # the client connection's: "TLSv1.3", "" without TLS
        # The listener the request came in on (None for a request built by hand): what
        # it says about every request on it (`redirect_https`) is applied by the dispatcher.
        self.listener = listener
        # The client certificate the connection verified (`tls.client_auth`), or None.
        self.client_cert = client_cert
        self.keep_alive = keep_alive
        self.host = host if host is not None else self.headers.get("host", "")
        # "websocket" when the client asks for a tunnel (HTTP/1.1 Upgrade, or HTTP/2's
        # extended CONNECT, RFC 8441); "" for an ordinary request.
        self.upgrade = upgrade
        self.request_id = ""
        self.consumer = ""  # who an auth middleware found the caller to be
        # The exchange's context: route, endpoint, timings (proxy/exchange/dispatch.py).
        self.exchange = Exchange(perf_counter())
        self._url: URL | None = None

    def set_target(self, target: bytes) -> None:
        """Replace the request target, keeping `path`, `query`, `raw_target` and `url` in
        step (what a middleware that edits the path or the query string calls). A new
        query on the same path keeps the client's own spelling of the path in
        `raw_target`; a new path replaces it."""
        raw_path, question, raw_query = target.partition(b"?")
        path = raw_path.decode("latin-1")
        if path == self.path:
            raw_path = self.raw_target.partition(b"?")[0]
            self.raw_target = raw_path + question + raw_query
        else:
            self.raw_target = target
        self.target = target
        self.path = path
        self.query = raw_query.decode("latin-1")
        self._url = None

    def get_headers(self) -> CIMultiDict[str]:
        """`headers`, as a method (routing asks for headers only when it needs them)."""
        return self.headers

    @property
    def url(self) -> URL:
        """The target parsed as a yarl.URL (built on first use: most requests never ask)."""
        if self._url is None:
            from yarl import URL

            self._url = URL.build(
                scheme=self.scheme,
                authority=self.host or "localhost",
                path=self.path,
                query_string=self.query,
                encoded=True,
            )
        return self._url

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.target!r} HTTP/{self.http_version}>"


class Response(_Message):
    """One response, as forwarding or a local reply produces it.

    As with Request, an upstream's headers stay raw bytes (`raw_headers`, hop-by-hop
    fields already removed) until something reads `headers`. Framing headers
    (Content-Length, Transfer-Encoding, Connection) are never here: each front end
    derives them from the body.
    """

    __slots__ = ("body", "reason", "status", "upgrade")

    def __init__(
        self,
        status: int,
        headers: CIMultiDict[str] | RawHeaders | None = None,
        body: Body | None = None,
        reason: str = "",
    ) -> None:
        self.status = status
        self._init_headers(headers)
        self.body = body if body is not None else Body.from_bytes(b"")
        self.reason = reason
        # A 101 from the upstream: its connection, waiting to become a tunnel
        # (proxy/websocket/upstream.py's UpstreamHandshake).
        self.upgrade: Upgraded | None = None

    def __repr__(self) -> str:
        return f"<Response {self.status}>"
