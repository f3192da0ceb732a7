"""HTTP/1.1 message parsing, behind one small interface with two implementations.

httptools (llhttp, Node.js's parser) is the hot path: ~1-2 us a message against h11's ~37 us.
h11 is the pure-Python codec (`http1_parser: h11`, or when httptools cannot import). Both
deliver the same three calls to a sink, `on_head`, `on_body`, `on_end`, and both apply the
same strict framing rules on top of their own (`scan_head`), so a message one accepts
the other accepts too. Nothing here does I/O; serialization lives in `h1serialize`.
"""

from __future__ import annotations

import re
from typing import Protocol

import h11

try:
    import httptools

    HTTPTOOLS_AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only where the C extension is missing
    HTTPTOOLS_AVAILABLE = False

Headers = list[tuple[bytes, bytes]]
_OWS = (b" ", b"\t")


class H1Error(Exception):
    """A malformed message. `too_large` marks a head over the size limit (431)."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


class MessageHead:
    """A parsed request or response head; `headers` keep their original bytes and order."""

    __slots__ = (
        "chunked",
        "connection",
        "content_length",
        "expect_continue",
        "headers",
        "host",
        "keep_alive",
        "method",
        "reason",
        "status",
        "target",
        "upgrade",
        "version",
    )

    def __init__(
        self,
        headers: Headers,
        version: str,
        keep_alive: bool,
        *,
        method: bytes = b"",
        target: bytes = b"",
        status: int = 0,
        reason: bytes = b"",
        upgrade: bool = False,
    ) -> None:
        self.headers = headers
        self.version = version
        self.keep_alive = keep_alive
        self.method = method
        self.target = target
        self.status = status
        self.reason = reason
        self.upgrade = upgrade
        # Filled by `scan_head` in the same pass that checks framing:
        self.chunked = False
        self.content_length: int | None = None
        self.host = b""
        self.connection: bytes | None = None  # the Connection header's value
        self.expect_continue = False

    def __repr__(self) -> str:
        first = f"{self.method.decode()} {self.target!r}" if self.method else str(self.status)
        return f"<MessageHead {first} HTTP/{self.version} headers={len(self.headers)}>"


class H1Sink(Protocol):
    """What a parser reports to: one head, any number of body chunks, one end."""

    def on_head(self, head: MessageHead) -> None: ...

    def on_body(self, data: bytes) -> None: ...

    def on_end(self, trailers: Headers | None) -> None: ...


class RequestParser(Protocol):
    """Server side: bytes from a client in, request events out."""

    def feed(self, data: bytes) -> bytes | None:
        """Parse `data`. Returns the bytes that follow an Upgrade/CONNECT head (the start of
        a tunnel; parsing stops there), else None.

        Raises:
            H1Error: the input is not valid HTTP/1.1. Any other exception is a bug, or one
                the sink raised.
        """
        ...


class ResponseParser(Protocol):
    """Client side: bytes from an upstream in, response events out."""

    def begin(self, method: bytes) -> None:
        """Announce the request whose response comes next (HEAD responses have no body)."""
        ...

    def feed(self, data: bytes) -> None:
        """Parse `data`.

        Raises:
            H1Error: the upstream's response is not valid HTTP/1.1.
        """
        ...

    def feed_eof(self) -> None:
        """The upstream closed: ends a close-delimited body.

        Raises:
            H1Error: the response was incomplete.
        """
        ...

    @property
    def reusable(self) -> bool:
        """True when the last response ended cleanly and allows keep-alive."""
        ...


# RFC 9112 section 6.1: a Transfer-Encoding we accept is exactly "chunked" (any case).
# Anything else, whitespace-padded or stacked ("chunked, identity"), is a smuggling vector.
_TE_LINE = re.compile(rb"(?im)^transfer-encoding:(.*)$")
_CL_LINE = re.compile(rb"(?im)^content-length:(.*)$")


def scan_head(head: MessageHead, *, request: bool) -> None:
    """One pass over the headers: apply the framing rules both codecs share and note the
    fields the proxy needs (Host, Connection, Expect) on `head`.

    Raises:
        H1Error: duplicate or invalid Content-Length, Transfer-Encoding other than exactly
            `chunked`, both together (RFC 9112 section 6.3), or TE on an HTTP/1.0 request.
    """
    chunked = False
    content_length: int | None = None
    te_seen = False
    hosts = 0
    upgrade_header = False
    for name, value in head.headers:
        size = len(name)
        # Compare lower-cased names only when the length could match (cheap filter).
        if size == 4:
            if name.lower() == b"host":
                head.host = value
                hosts += 1
        elif size == 14:
            if name.lower() == b"content-length":
                if content_length is not None:
                    raise H1Error("duplicate Content-Length")
                if not value.isdigit() or len(value) > 18:
                    raise H1Error("invalid Content-Length")
                content_length = int(value)
        elif size == 17:
            if name.lower() == b"transfer-encoding":
                if te_seen:
                    raise H1Error("duplicate Transfer-Encoding")
                te_seen = True
                if value.lower() != b"chunked":
                    raise H1Error("unsupported Transfer-Encoding")
                chunked = True
        elif size == 10:
            if name.lower() == b"connection":
                head.connection = (
                    value if head.connection is None else head.connection + b"," + value
                )
        elif size == 6:
            if name.lower() == b"expect":
                head.expect_continue = value.lower() == b"100-continue"
        elif size == 7 and name.lower() == b"upgrade":
            upgrade_header = True
    if request:
        # RFC 9112 section 3.2: exactly one Host in HTTP/1.1, at most one in HTTP/1.0.
        if hosts > 1:
            raise H1Error("more than one Host header")
        if hosts == 0 and head.version == "1.1":
            raise H1Error("missing Host header")
        if upgrade_header and head.connection and b"upgrade" in head.connection.lower():
            head.upgrade = True
    if chunked and content_length is not None:
        raise H1Error("Content-Length with Transfer-Encoding")
    if chunked and request and head.version == "1.0":
        raise H1Error("Transfer-Encoding in an HTTP/1.0 request")
    head.chunked = chunked
    head.content_length = content_length


def _check_raw_head(raw: bytes) -> None:
    """Strictness h11 lacks: CRLF only, no obs-fold, no padded Transfer-Encoding."""
    end = raw.find(b"\r\n\r\n")
    head = raw if end < 0 else raw[: end + 2]
    if head.count(b"\n") != head.count(b"\r\n"):
        raise H1Error("bare LF in message head")
    if b"\r\n " in head or b"\r\n\t" in head:
        raise H1Error("obsolete line folding in message head")
    for match in _TE_LINE.finditer(head):
        if match.group(1).strip(b"\r").lstrip(b" \t").lower() != b"chunked":
            raise H1Error("unsupported Transfer-Encoding")
    # h11 merges repeated or listed Content-Length values that agree; we refuse them, as
    # llhttp does, so both codecs draw the same line.
    lengths = _CL_LINE.findall(head)
    if len(lengths) > 1:
        raise H1Error("duplicate Content-Length")
    if lengths and not lengths[0].strip(b"\r \t").isdigit():
        raise H1Error("invalid Content-Length")


# ------------------------------------------------------------------------ httptools
class HttptoolsRequestParser:
    """RequestParser over llhttp. The parser calls back into this object's methods."""

    __slots__ = (
        "_error",
        "_head_bytes",
        "_headers",
        "_in_head",
        "_max_head_bytes",
        "_parser",
        "_sink",
        "_trailers",
        "_url",
    )

    def __init__(self, sink: H1Sink, max_head_bytes: int) -> None:
        self._sink = sink
        self._max_head_bytes = max_head_bytes
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: Headers = []
        self._trailers: Headers | None = None
        self._in_head = True
        self._head_bytes = 0
        self._error: BaseException | None = None

    def feed(self, data: bytes) -> bytes | None:
        if self._in_head:
            # A head that never ends (one endless header line) is caught after this feed;
            # completed heads are measured exactly in on_headers_complete.
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            return data[exc.args[0] :]
        except httptools.HttpParserCallbackError:
            error, self._error = self._error, None
            assert error is not None
            raise error from None
        except httptools.HttpParserError as exc:
            raise H1Error(str(exc)) from None
        if self._in_head and self._head_bytes > self._max_head_bytes:
            raise H1Error("request head too large", too_large=True)
        return None

    # llhttp callbacks -------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._trailers = None
        self._in_head = True
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if value[-1:] in _OWS and name.lower() != b"transfer-encoding":
            # llhttp keeps trailing whitespace, which is not part of the value (RFC 9110
            # section 5.5). A padded Transfer-Encoding stays padded: scan_head refuses it.
            value = value.rstrip(b" \t")
        if self._in_head:
            self._headers.append((name, value))
        else:
            if self._trailers is None:
                self._trailers = []
            self._trailers.append((name, value))

    def on_headers_complete(self) -> None:
        try:
            self._in_head = False
            parser = self._parser
            headers = self._headers
            size = len(self._url) + sum(len(n) + len(v) + 4 for n, v in headers)
            if size > self._max_head_bytes:
                raise H1Error("request head too large", too_large=True)
            version = parser.get_http_version()
            head = MessageHead(
                headers,
                version,
                parser.should_keep_alive(),
                method=parser.get_method(),
                target=self._url,
                upgrade=parser.should_upgrade(),
            )
            scan_head(head, request=True)
            self._sink.on_head(head)
        except BaseException as exc:
            self._error = exc
            raise

    def on_body(self, body: bytes) -> None:
        try:
            self._sink.on_body(body)
        except BaseException as exc:
            self._error = exc
            raise

    def on_message_complete(self) -> None:
        try:
            self._in_head = True
            self._head_bytes = 0
            self._sink.on_end(self._trailers)
        except BaseException as exc:
            self._error = exc
            raise


class _SkipBody(Exception):
    """Raised inside llhttp to stop at the end of a HEAD response's head."""


class HttptoolsResponseParser:
    """ResponseParser over llhttp."""

    __slots__ = (
        "_close_delimited",
        "_done",
        "_error",
        "_head_bytes",
        "_headers",
        "_in_head",
        "_informational",
        "_keep_alive",
        "_max_head_bytes",
        "_no_body",
        "_parser",
        "_reason",
        "_sink",
        "_trailers",
    )

    def __init__(self, sink: H1Sink, max_head_bytes: int) -> None:
        self._sink = sink
        self._max_head_bytes = max_head_bytes
        self._parser = httptools.HttpResponseParser(self)
        self._headers: Headers = []
        self._trailers: Headers | None = None
        self._reason = b""
        self._in_head = True
        self._head_bytes = 0
        self._no_body = False
        self._informational = False
        self._close_delimited = False
        self._keep_alive = False
        self._done = True
        self._error: BaseException | None = None

    @property
    def reusable(self) -> bool:
        return self._done and self._keep_alive

    def begin(self, method: bytes) -> None:
        self._no_body = method == b"HEAD"
        self._done = False
        self._keep_alive = False

    def feed(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            error, self._error = self._error, None
            if isinstance(error, _SkipBody):
                # The parser is mid-message now; a fresh one serves the next response.
                self._parser = httptools.HttpResponseParser(self)
                self._finish(None)
                return
            assert error is not None
            raise error from None
        except httptools.HttpParserUpgrade:
            raise H1Error("unexpected upgrade from upstream") from None
        except httptools.HttpParserError as exc:
            raise H1Error(str(exc)) from None
        if self._in_head and self._head_bytes > self._max_head_bytes:
            raise H1Error("response head too large", too_large=True)

    def feed_eof(self) -> None:
        if self._done:
            return
        if self._close_delimited and not self._in_head:
            self._keep_alive = False
            self._finish(self._trailers)
            return
        raise H1Error("upstream closed the connection before the response was complete")

    def _finish(self, trailers: Headers | None) -> None:
        self._done = True
        self._in_head = True
        self._head_bytes = 0
        self._sink.on_end(trailers)

    # llhttp callbacks -------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._headers = []
        self._trailers = None
        self._in_head = True

    def on_status(self, reason: bytes) -> None:
        self._reason = reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:
            self._headers.append((name, value))
        else:
            if self._trailers is None:
                self._trailers = []
            self._trailers.append((name, value))

    def on_headers_complete(self) -> None:
        try:
            self._in_head = False
            parser = self._parser
            status = parser.get_status_code()
            if 100 <= status < 200 and status != 101:
                self._informational = True  # 100/103: not forwarded, the real head follows
                return
            headers = self._headers
            version = parser.get_http_version()
            head = MessageHead(
                headers, version, parser.should_keep_alive(), status=status, reason=self._reason
            )
            scan_head(head, request=False)
            self._keep_alive = head.keep_alive
            no_body = self._no_body or status in (204, 304)
            self._close_delimited = not (no_body or head.chunked or head.content_length is not None)
            self._sink.on_head(head)
            if self._no_body:
                raise _SkipBody
        except BaseException as exc:
            self._error = exc
            raise

    def on_body(self, body: bytes) -> None:
        try:
            self._sink.on_body(body)
        except BaseException as exc:
            self._error = exc
            raise

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            self._in_head = True
            return
        try:
            self._keep_alive = self._keep_alive and self._parser.should_keep_alive()
            self._finish(self._trailers)
        except BaseException as exc:
            self._error = exc
            raise


# ------------------------------------------------------------------------------- h11
def _h11_headers(headers: h11._headers.Headers) -> Headers:
    return list(headers.raw_items())


class H11RequestParser:
    """RequestParser over h11, the pure-Python codec.

    h11 insists on seeing our response before the next request; we answer its state
    machine with a stub response (its bytes are discarded: serialization is ours) so it
    parses pipelined requests, and we check the raw head for what h11 tolerates.
    """

    __slots__ = ("_conn", "_max_head_bytes", "_raw", "_sink")

    def __init__(self, sink: H1Sink, max_head_bytes: int) -> None:
        self._sink = sink
        self._max_head_bytes = max_head_bytes
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head_bytes)
        self._raw: bytearray | None = bytearray()

    def feed(self, data: bytes) -> bytes | None:
        if self._raw is not None:
            self._raw += data
        self._conn.receive_data(data)
        return self._drain()

    def _drain(self) -> bytes | None:
        while True:
            conn = self._conn  # _next_cycle may replace it
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise H1Error(str(exc), too_large=exc.error_status_hint == 431) from None
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return None
            if isinstance(event, h11.Request):
                self._on_request(event)
                if event.method == b"CONNECT":
                    return bytes(conn.trailing_data[0])
            elif isinstance(event, h11.Data):
                self._sink.on_body(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self._sink.on_end(_h11_headers(event.headers) or None)
                self._next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                return None
            else:  # pragma: no cover - h11 has no other server-side events
                raise AssertionError(f"unexpected h11 event {event!r}")

    def _on_request(self, event: h11.Request) -> None:
        if self._raw is not None:
            _check_raw_head(bytes(self._raw))
            self._raw = None
        headers = _h11_headers(event.headers)
        # h11 bounds only heads that arrive in pieces; one that came whole is measured here.
        size = len(event.target) + sum(len(n) + len(v) + 4 for n, v in headers)
        if size > self._max_head_bytes:
            raise H1Error("request head too large", too_large=True)
        version = event.http_version.decode()
        head = MessageHead(headers, version, False, method=event.method, target=event.target)
        scan_head(head, request=True)
        # RFC 9112 section 9.3: 1.1 persists unless "close"; 1.0 only with "keep-alive".
        tokens = head.connection.lower() if head.connection else b""
        head.keep_alive = b"close" not in tokens if version == "1.1" else b"keep-alive" in tokens
        self._sink.on_head(head)

    def _next_cycle(self) -> None:
        conn = self._conn
        if conn.our_state is h11.SEND_RESPONSE:
            conn.send(h11.Response(status_code=204, headers=[]))
            conn.send(h11.EndOfMessage())
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            self._raw = bytearray(conn.trailing_data[0])
        else:
            # h11 closes after HTTP/1.0 (even with keep-alive) and after a declined
            # upgrade; the front end decides that, so a fresh h11 takes what follows.
            leftover = bytes(conn.trailing_data[0])
            self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_head_bytes)
            if leftover:  # receive_data(b"") would mean EOF to h11
                self._conn.receive_data(leftover)
            self._raw = bytearray(leftover)


class H11ResponseParser:
    """ResponseParser over h11. A stub request tells h11 which method it answers."""

    __slots__ = ("_conn", "_done", "_raw", "_sink")

    def __init__(self, sink: H1Sink, max_head_bytes: int) -> None:
        self._sink = sink
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head_bytes)
        self._done = True
        self._raw: bytearray | None = None

    @property
    def reusable(self) -> bool:
        conn = self._conn
        return self._done and conn.our_state is h11.DONE and conn.their_state is h11.DONE

    def begin(self, method: bytes) -> None:
        conn = self._conn
        if conn.our_state is h11.DONE:
            conn.start_next_cycle()
        conn.send(h11.Request(method=method, target="/", headers=[("host", "upstream")]))
        conn.send(h11.EndOfMessage())
        self._done = False
        self._raw = bytearray()

    def feed(self, data: bytes) -> None:
        if self._raw is not None:
            self._raw += data
        self._conn.receive_data(data)
        self._drain()

    def feed_eof(self) -> None:
        if self._done:
            return
        self._conn.receive_data(b"")
        self._drain()
        if not self._done:
            raise H1Error("upstream closed the connection before the response was complete")

    def _drain(self) -> None:
        conn = self._conn
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise H1Error(str(exc), too_large=exc.error_status_hint == 431) from None
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.InformationalResponse):
                self._raw = bytearray(conn.trailing_data[0])
            elif isinstance(event, h11.Response):
                if self._raw is not None:
                    _check_raw_head(bytes(self._raw))
                    self._raw = None
                headers = _h11_headers(event.headers)
                version = event.http_version.decode()
                head = MessageHead(
                    headers,
                    version,
                    h11._connection._keep_alive(event),
                    status=event.status_code,
                    reason=bytes(event.reason),
                )
                scan_head(head, request=False)
                self._sink.on_head(head)
            elif isinstance(event, h11.Data):
                self._sink.on_body(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self._done = True
                self._sink.on_end(_h11_headers(event.headers) or None)
                return
            elif isinstance(event, h11.ConnectionClosed):
                return
            else:  # pragma: no cover - h11 has no other client-side events
                raise AssertionError(f"unexpected h11 event {event!r}")


def resolve_codec(name: str) -> str:
    """`auto` -> httptools where it imports, else h11."""
    if name == "auto":
        return "httptools" if HTTPTOOLS_AVAILABLE else "h11"
    if name == "httptools" and not HTTPTOOLS_AVAILABLE:
        return "h11"
    return name


def make_request_parser(codec: str, sink: H1Sink, max_head_bytes: int) -> RequestParser:
    """A server-side parser of the named codec ("httptools" or "h11")."""
    if codec == "httptools":
        return HttptoolsRequestParser(sink, max_head_bytes)
    return H11RequestParser(sink, max_head_bytes)


def make_response_parser(codec: str, sink: H1Sink, max_head_bytes: int) -> ResponseParser:
    """A client-side parser of the named codec ("httptools" or "h11")."""
    if codec == "httptools":
        return HttptoolsResponseParser(sink, max_head_bytes)
    return H11ResponseParser(sink, max_head_bytes)
