"""The httptools (llhttp) implementations of the HTTP/1.1 codec interface: the hot path.

llhttp calls back into the parser object's `on_*` methods; they collect the head, apply
`scan_head`, and report to the sink. An exception raised in a callback is kept and
re-raised after llhttp returns (httptools would otherwise wrap it).
"""

from __future__ import annotations

import httptools

from proxy.codec.h1 import H1Error, H1Sink, Headers, MessageHead, scan_head

_OWS = (0x20, 0x09)  # space, tab: indexing bytes gives ints, with no slice allocated


class _LlhttpCallbacks:
    """What the request and response parsers share: header collection (head, then
    trailers), body relay, and keeping an exception raised inside a callback."""

    __slots__ = (
        "_error",
        "_head_bytes",
        "_headers",
        "_in_head",
        "_max_head_bytes",
        "_quiet_bytes",
        "_sink",
        "_trailers",
    )

    def __init__(self, sink: H1Sink, max_head_bytes: int) -> None:
        self._sink = sink
        self._max_head_bytes = max_head_bytes
        self._headers: Headers = []
        self._trailers: Headers | None = None
        self._in_head = True
        self._head_bytes = 0
        # Bytes of a message's body section fed since the last body data: chunk framing,
        # and the trailer section (see HttptoolsRequestParser.feed).
        self._quiet_bytes = 0
        self._error: BaseException | None = None

    def _kept_error(self) -> BaseException:
        error, self._error = self._error, None
        assert error is not None
        return error

    def on_header(self, name: bytes, value: bytes) -> None:
        if value and value[-1] in _OWS and name.lower() != b"transfer-encoding":
            # llhttp keeps trailing whitespace, which is not part of the value (RFC 9110
            # section 5.5). A padded Transfer-Encoding stays padded: scan_head refuses it.
            value = value.rstrip(b" \t")
        if self._in_head:
            self._headers.append((name, value))
        else:
            if self._trailers is None:
                self._trailers = []
            self._trailers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self._quiet_bytes = 0
        try:
            self._sink.on_body(body)
        except BaseException as exc:
            self._error = exc
            raise


class HttptoolsRequestParser(_LlhttpCallbacks):
    """RequestParser over llhttp. The parser calls back into this object's methods."""

    __slots__ = ("_in_message", "_parser", "_url")

    def __init__(self, sink: H1Sink, max_head_bytes: int) -> None:
        super().__init__(sink, max_head_bytes)
        self._parser = httptools.HttpRequestParser(self)
        # The pieces of the request target as llhttp reports them (one per feed it
        # spans), joined once: joining as they come costs O(pieces^2).
        self._url: list[bytes] = []
        self._in_message = False  # llhttp has seen the first byte of a message

    @property
    def idle(self) -> bool:
        return not self._in_message

    def feed(self, data: bytes) -> bytes | None:
        in_body = self._in_message and not self._in_head
        if in_body:
            # llhttp keeps the trailer section (RFC 9112 section 7.1.2) without a bound of
            # its own: what comes between body data counts against max_head_bytes, as h11
            # bounds it (and as the head is). A feed with body data in it starts again.
            self._quiet_bytes += len(data)
        else:
            # A head that never ends (one endless header line) is caught after this feed;
            # completed heads are measured exactly in on_headers_complete.
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            return data[exc.args[0] :]
        except httptools.HttpParserCallbackError:
            raise self._kept_error() from None
        except httptools.HttpParserError as error:  # its own name: mypyc types it
            raise H1Error(str(error)) from None
        if self._in_head and self._head_bytes > self._max_head_bytes:
            raise H1Error("request head too large", too_large=True)
        if in_body and self._in_message and self._quiet_bytes > self._max_head_bytes:
            raise H1Error("request trailer section too large", too_large=True)
        return None

    # llhttp callbacks -------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._in_message = True
        self._url = []
        self._headers = []
        self._trailers = None
        self._in_head = True
        self._head_bytes = 0
        self._quiet_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url.append(url)

    def on_headers_complete(self) -> None:
        try:
            self._in_head = False
            parser = self._parser
            headers = self._headers
            url = self._url[0] if len(self._url) == 1 else b"".join(self._url)
            size = len(url) + sum(len(n) + len(v) + 4 for n, v in headers)
            if size > self._max_head_bytes:
                raise H1Error("request head too large", too_large=True)
            version = parser.get_http_version()
            head = MessageHead(
                headers,
                version,
                parser.should_keep_alive(),
                method=parser.get_method(),
                target=url,
                upgrade=parser.should_upgrade(),
            )
            scan_head(head, request=True)
            self._sink.on_head(head)
        except BaseException as exc:
            self._error = exc
            raise

    def on_message_complete(self) -> None:
        try:
            self._in_message = False
            self._in_head = True
            self._head_bytes = 0
            self._sink.on_end(self._trailers)
        except BaseException as exc:
            self._error = exc
            raise


class _SkipBody(Exception):
    """Raised inside llhttp to stop at the end of a HEAD response's head."""


class HttptoolsResponseParser(_LlhttpCallbacks):
    """ResponseParser over llhttp."""

    __slots__ = (
        "_body_left",
        "_close_delimited",
        "_done",
        "_informational",
        "_keep_alive",
        "_no_body",
        "_parser",
        "_reason",
    )

    def __init__(self, sink: H1Sink, max_head_bytes: int) -> None:
        super().__init__(sink, max_head_bytes)
        self._parser = httptools.HttpResponseParser(self)
        self._reason = b""
        self._no_body = False
        self._informational = False
        self._close_delimited = False
        self._keep_alive = False
        self._done = True
        # Of a body of known length that llhttp is reading: the bytes still to come
        # (0 when there is no such body).
        self._body_left = 0

    @property
    def reusable(self) -> bool:
        return self._done and self._keep_alive

    def begin(self, method: bytes) -> None:
        self._no_body = method == b"HEAD"
        self._done = False
        self._keep_alive = False

    def feed(self, data: bytes) -> None:
        left = self._body_left
        if left:
            # The rest of a body of known length goes to the sink as it came: llhttp
            # would hand it on as a copy (a 1 MiB response copied once more, 5% of the
            # gateway's CPU on /1m), and there is nothing in it to parse.
            size = len(data)
            if size < left:
                self._body_left = left - size
                self._sink.on_body(data)
                return
            self._sink.on_body(data if size == left else data[:left])
            # llhttp still expects that body: a fresh parser reads the next response.
            self._parser = httptools.HttpResponseParser(self)
            self._finish(None)
            if size == left:
                return
            data = data[left:]  # what follows (an error: nothing was asked for)
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            error = self._kept_error()
            if isinstance(error, _SkipBody):
                # The parser is mid-message now; a fresh one serves the next response.
                self._parser = httptools.HttpResponseParser(self)
                self._finish(None)
                return
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
        self._body_left = 0
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
            if not no_body and not head.chunked and head.content_length:
                self._body_left = head.content_length
            self._sink.on_head(head)
            if self._no_body:
                raise _SkipBody
        except BaseException as exc:
            self._error = exc
            raise

    def on_body(self, body: bytes) -> None:
        self._quiet_bytes = 0
        if self._body_left:
            self._body_left -= len(body)
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
