"""HTTP/1.1 message parsing, behind one small interface with two implementations.

httptools (llhttp, Node.js's parser) is the hot path: ~1-2 us a message against h11's ~37 us.
h11 is the pure-Python codec (`http1_parser: h11`, or when httptools cannot import). Both
deliver the same three calls to a sink, `on_head`, `on_body`, `on_end`, and both apply the
same strict framing rules on top of their own (`scan_head`), so a message one accepts
the other accepts too. Nothing here does I/O; serialization lives in `h1serialize`.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Callable
from typing import Any, Protocol

# The implementations live in h1_httptools.py and h1_h11.py.
HTTPTOOLS_AVAILABLE = importlib.util.find_spec("httptools") is not None

Headers = list[tuple[bytes, bytes]]


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
        "repeated_singleton",
        "status",
        "target",
        "underscore",
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
        self.underscore = False  # a field name holds "_" (headers_with_underscores)
        # A request repeats Authorization, Proxy-Authorization or Content-Type.
        self.repeated_singleton = False

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

    @property
    def idle(self) -> bool:
        """True when no part of a next message has been received."""
        ...

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
_UNDERSCORE = 0x5F  # "_"
_TE_LINE = re.compile(rb"(?im)^transfer-encoding:(.*)$")
_CL_LINE = re.compile(rb"(?im)^content-length:(.*)$")


def scan_head(head: MessageHead, *, request: bool) -> None:
    """One pass over the headers: apply the framing rules both codecs share and note the
    fields the proxy needs (Host, Connection, Expect) on `head`.

    Raises:
        H1Error: duplicate or invalid Content-Length, Transfer-Encoding other than exactly
            `chunked`, both together (RFC 9112 section 6.3), or TE on an HTTP/1.0 request;
            in a request, a second Host or none in HTTP/1.1.
    """
    chunked = False
    content_length: int | None = None
    te_seen = False
    hosts = 0
    authorizations = proxy_authorizations = content_types = 0
    upgrade_header = False
    underscore = False
    # Repeated Connection fields are joined once at the end: joining as they come would
    # cost time quadratic in their number.
    connections: list[bytes] | None = None
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
                if connections is None:
                    connections = [value]
                else:
                    connections.append(value)
        elif size == 6:
            if name.lower() == b"expect":
                head.expect_continue = value.lower() == b"100-continue"
        elif size == 7:
            if name.lower() == b"upgrade":
                upgrade_header = True
        elif request and (size == 13 or size == 19 or size == 12):
            lower = name.lower()
            if lower == b"authorization":
                authorizations += 1
            elif lower == b"proxy-authorization":
                proxy_authorizations += 1
            elif lower == b"content-type":
                content_types += 1
        # An int: memchr (a one-byte bytes needle costs several times more).
        if request and _UNDERSCORE in name:
            underscore = True
    if connections:
        head.connection = connections[0] if len(connections) == 1 else b",".join(connections)
    if request:
        # RFC 9112 section 3.2: exactly one Host in HTTP/1.1, at most one in HTTP/1.0.
        if hosts > 1:
            raise H1Error("more than one Host header")
        if hosts == 0 and head.version == "1.1":
            raise H1Error("missing Host header")
        head.repeated_singleton = (
            authorizations > 1 or proxy_authorizations > 1 or content_types > 1
        )
        if upgrade_header and head.connection and b"upgrade" in head.connection.lower():
            head.upgrade = True
    if chunked and content_length is not None:
        raise H1Error("Content-Length with Transfer-Encoding")
    if chunked and request and head.version == "1.0":
        raise H1Error("Transfer-Encoding in an HTTP/1.0 request")
    head.chunked = chunked
    head.content_length = content_length
    head.underscore = underscore


def check_raw_head(raw: bytes) -> None:
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


def resolve_codec(name: str) -> str:
    """`auto` -> httptools where it imports, else h11."""
    if name == "auto":
        return "httptools" if HTTPTOOLS_AVAILABLE else "h11"
    if name == "httptools" and not HTTPTOOLS_AVAILABLE:
        return "h11"
    return name


def make_request_parser(codec: str, sink: H1Sink, max_head_bytes: int) -> RequestParser:
    """A server-side parser of the named codec ("httptools" or "h11")."""
    request_parser: Callable[[H1Sink, int], RequestParser] = _parsers(codec)[0]
    return request_parser(sink, max_head_bytes)


def make_response_parser(codec: str, sink: H1Sink, max_head_bytes: int) -> ResponseParser:
    """A client-side parser of the named codec ("httptools" or "h11")."""
    response_parser: Callable[[H1Sink, int], ResponseParser] = _parsers(codec)[1]
    return response_parser(sink, max_head_bytes)


# codec -> its (request parser, response parser) classes, imported on first use (the
# adapters import this module; httptools may be missing). Kept here rather than looked
# up in sys.modules on each call: a test harness that restores sys.modules (pytester)
# must not take them away from a running gateway.
_PARSERS: dict[str, tuple[Any, Any]] = {}


def _parsers(codec: str) -> tuple[Any, Any]:
    found = _PARSERS.get(codec)
    if found is None:
        if codec == "httptools":
            module = importlib.import_module("proxy.codec.h1_httptools")
            found = (module.HttptoolsRequestParser, module.HttptoolsResponseParser)
        else:
            module = importlib.import_module("proxy.codec.h1_h11")
            found = (module.H11RequestParser, module.H11ResponseParser)
        _PARSERS[codec] = found
    return found
