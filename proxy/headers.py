"""Request headers for the upstream hop: hop-by-hop removal and forwarding headers.

RFC 9110 section 7.6.1: Connection and the fields it names, plus the classic hop-by-hop
set, describe only the client's hop and are dropped. Framing (Content-Length,
Transfer-Encoding) is re-derived for the upstream hop; `Expect` is answered by us.
X-Forwarded-For/-Proto/-Host are appended to (a list, like Via, RFC 9110 section 7.6.3).
"""

from __future__ import annotations

from proxy.models import RawHeaders, Request
from proxy.protocol.h1serialize import UnsafeHeader, request_head

REQUEST_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "expect",
        "host",  # re-added first, possibly rewritten
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "via",
    }
)
VIA_TOKEN = "gatehouse"
_VIA_HOPS = {version: f"{version} {VIA_TOKEN}".encode() for version in ("1.0", "1.1", "2")}


def _append(existing: list[str] | None, value: str) -> str:
    joined = ", ".join(existing) if existing else ""
    return f"{joined}, {value}" if joined else value


def upstream_headers(
    request: Request, host: str, body_length: int | None, chunked: bool
) -> list[tuple[str, str]]:
    """The header list to send upstream for `request`.

    `host` is the Host to send (the client's, or the route's rewrite); `body_length` /
    `chunked` give the framing of the body as it will be sent.
    """
    headers = request.headers
    out: list[tuple[str, str]] = [("Host", host)]
    connection = headers.get("connection")
    if connection is None and request.connection is not None:
        connection = request.connection.decode("latin-1")
    named = {token.strip().lower() for token in connection.split(",")} if connection else None
    # The values of each forwarding field, joined once at the end: joining as they come
    # would cost time quadratic in the number of fields a client repeats.
    forwarded: dict[str, list[str]] = {}
    for name, value in headers.items():
        lower = name.lower()
        if lower in REQUEST_HOP_BY_HOP:
            if lower in _FORWARDING_FIELDS:
                forwarded.setdefault(lower, []).append(value)
            elif lower == "te" and value.strip().lower() == "trailers":
                out.append(("TE", "trailers"))  # the one TE value that must pass (gRPC)
            continue
        if named is not None and lower in named:
            continue
        out.append((name, value))
    out.append(("X-Forwarded-For", _append(forwarded.get("x-forwarded-for"), request.client[0])))
    out.append(("X-Forwarded-Proto", _append(forwarded.get("x-forwarded-proto"), request.scheme)))
    if request.host:
        out.append(("X-Forwarded-Host", _append(forwarded.get("x-forwarded-host"), request.host)))
    out.append(("Via", _append(forwarded.get("via"), f"{request.http_version} {VIA_TOKEN}")))
    if chunked:
        out.append(("Transfer-Encoding", "chunked"))
    elif body_length is not None and (body_length or request.method not in _BODYLESS):
        out.append(("Content-Length", str(body_length)))
    return out


_FORWARDING_FIELDS = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "via"})


# Methods whose requests normally carry no body: no "Content-Length: 0" is added for them.
_BODYLESS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE"})


_RAW_HOP_BY_HOP = frozenset(name.encode() for name in REQUEST_HOP_BY_HOP)
# Connection values that name nothing beyond the fields dropped anyway.
_USUAL_CONNECTION_TOKENS = _RAW_HOP_BY_HOP | {b"close"}
_CONNECTION_TOKENS: dict[bytes, frozenset[bytes]] = {}
_CONNECTION_TOKENS_CACHED = 256


def connection_tokens(value: bytes) -> frozenset[bytes]:
    """The lower-cased field names in a Connection header value (RFC 9110 section 7.6.1).

    Peers repeat a handful of values ("keep-alive", "close"), so results are cached; the
    cache is bounded because the value comes from the network."""
    tokens = _CONNECTION_TOKENS.get(value)
    if tokens is None:
        tokens = frozenset(token.strip().lower() for token in value.split(b","))
        if len(_CONNECTION_TOKENS) < _CONNECTION_TOKENS_CACHED:
            _CONNECTION_TOKENS[value] = tokens
    return tokens


_FORWARDED = {
    b"x-forwarded-for": 0,
    b"x-forwarded-proto": 1,
    b"x-forwarded-host": 2,
    b"via": 3,
}


# The values a client sent of each forwarding field (`_FORWARDED` order), kept as lists and
# joined once (`_forwarding_values`): joining them field by field would cost time
# quadratic in the number of fields a client repeats.
Forwarded = list[list[bytes] | None]


def _end_to_end(
    pairs: RawHeaders, named: frozenset[bytes] | None
) -> tuple[RawHeaders, Forwarded, bool]:
    """Split raw request fields for the upstream hop: the end-to-end ones (as received),
    the values of X-Forwarded-For/-Proto/-Host and Via to be appended to, and whether
    the client sent `TE: trailers` (the one TE value that passes, for gRPC). `named` is
    the set of fields the client's Connection header names (dropped as hop-by-hop)."""
    kept: RawHeaders = []
    forwarded: Forwarded = [None, None, None, None]
    te_trailers = False
    for name, value in pairs:
        lower = name.lower()
        if lower in _RAW_HOP_BY_HOP:
            slot = _FORWARDED.get(lower)
            if slot is not None:
                values = forwarded[slot]
                if values is None:
                    forwarded[slot] = [value]
                else:
                    values.append(value)
            elif lower == b"te" and value.strip().lower() == b"trailers":
                te_trailers = True
            continue
        if named is not None and lower in named:
            continue
        kept.append((name, value))
    return kept, forwarded, te_trailers


def _forwarding_values(
    request: Request, forwarded: Forwarded
) -> tuple[bytes, bytes, bytes | None, bytes]:
    """X-Forwarded-For, -Proto, -Host (None without a Host) and Via for the upstream
    hop: what the client sent, with this hop appended (RFC 9110 section 7.6.3)."""
    xff, proto, fhost, via = forwarded
    host: bytes | None = None
    if request.host:
        host = _appended(fhost, request.host.encode("latin-1"))
    hop = _VIA_HOPS.get(request.http_version) or b"%s %s" % (
        request.http_version.encode(),
        VIA_TOKEN.encode(),
    )
    return (
        _appended(xff, request.client[0].encode()),
        _appended(proto, request.scheme.encode()),
        host,
        _appended(via, hop),
    )


def _appended(values: list[bytes] | None, value: bytes) -> bytes:
    """The list field whose client-sent values are `values`, with `value` appended."""
    if values is None:
        return value
    values.append(value)
    return b", ".join(values)


def upstream_request_head(
    request: Request, target: bytes, host: str, body_length: int | None, chunked: bool
) -> bytes:
    """The serialized request head for the upstream hop.

    Headers still in their raw form were validated by the parser, so they are copied as
    bytes without decoding or re-checking (the hot path for routes without middleware);
    headers a middleware touched go through the checked serializer.

    Raises:
        UnsafeHeader: a header set by middleware (or the rewritten target) would split
            the message.
    """
    raw = request.raw_headers
    if raw is None:
        return request_head(
            request.method, target, upstream_headers(request, host, body_length, chunked)
        )
    if b" " in target or b"\r" in target or b"\n" in target:
        raise UnsafeHeader("unsafe request target")
    return _raw_head(request, raw, target, host, body_length, chunked)


def _raw_head(
    request: Request,
    raw: RawHeaders,
    target: bytes,
    host: str,
    body_length: int | None,
    chunked: bool,
) -> bytes:
    parts = [request.method.encode(), b" ", target, b" HTTP/1.1\r\nHost: ", host.encode("latin-1")]
    connection = request.connection
    named = connection_tokens(connection) if connection else None
    if named is not None and named <= _USUAL_CONNECTION_TOKENS:
        named = None  # "keep-alive", "close": nothing beyond the usual set
    # `_end_to_end`'s rule, inline: this is the HTTP/1.1 hot path, and building the list
    # of kept fields first costs ~1 us per request (3%) here.
    forwarded: Forwarded = [None, None, None, None]
    for name, value in raw:
        lower = name.lower()
        if lower in _RAW_HOP_BY_HOP:
            slot = _FORWARDED.get(lower)
            if slot is not None:
                values = forwarded[slot]
                if values is None:
                    forwarded[slot] = [value]
                else:
                    values.append(value)
            elif lower == b"te" and value.strip().lower() == b"trailers":
                parts.append(b"\r\nTE: trailers")
            continue
        if named is not None and lower in named:
            continue
        parts += (b"\r\n", name, b": ", value)
    xff, proto, fhost, via = _forwarding_values(request, forwarded)
    parts += (b"\r\nX-Forwarded-For: ", xff, b"\r\nX-Forwarded-Proto: ", proto)
    if fhost is not None:
        parts += (b"\r\nX-Forwarded-Host: ", fhost)
    parts += (b"\r\nVia: ", via)
    if chunked:
        parts.append(b"\r\nTransfer-Encoding: chunked")
    elif body_length is not None and (body_length or request.method not in _BODYLESS):
        parts.append(b"\r\nContent-Length: %d" % body_length)
    parts.append(b"\r\n\r\n")
    return b"".join(parts)


# RFC 9113 section 8.2.1: these make a field value invalid in HTTP/2 (and in HTTP/1.1).
_H2_UNSAFE_VALUE = (b"\r", b"\n", b"\x00")


def upstream_h2_headers(
    request: Request, target: bytes, authority: str, scheme: str, body_length: int | None
) -> RawHeaders:
    """The HTTP/2 header list to send upstream for `request` (RFC 9113 section 8.3.1).

    Pseudo-headers first: `:method`, `:scheme` (the endpoint's), `:authority` (the Host
    to send: the client's or the route's rewrite) and `:path` (`target`). Then the
    request's fields, lower-cased (section 8.2.1), without the connection-specific ones
    (section 8.2.2: Connection and what it names, Keep-Alive, Proxy-Connection,
    Transfer-Encoding, Upgrade, and TE unless it is "trailers"), without Host (carried
    by `:authority`, section 8.3.1), with X-Forwarded-For/-Proto/-Host and Via appended
    to as `upstream_headers` does. `content-length` is added when `body_length` is known;
    an unknown length needs no framing in HTTP/2 (END_STREAM ends the body).

    Raises:
        UnsafeHeader: a field set by middleware (or the rewritten target) holds CR, LF
            or NUL, which HTTP/2 forbids as well.
    """
    if any(bad in target for bad in (*_H2_UNSAFE_VALUE, b" ")) or not target:
        raise UnsafeHeader("unsafe request target")
    out: RawHeaders = [
        (b":method", request.method.encode("ascii")),
        (b":scheme", scheme.encode("ascii")),
        (b":authority", authority.encode("latin-1")),
        (b":path", target),
    ]
    raw = request.raw_headers
    if raw is None:
        pairs: RawHeaders = []
        for text_name, text_value in request.headers.items():
            name_b, value_b = text_name.encode("latin-1"), text_value.strip().encode("latin-1")
            if any(bad in name_b or bad in value_b for bad in _H2_UNSAFE_VALUE):
                raise UnsafeHeader(f"unsafe header {text_name!r}")
            pairs.append((name_b, value_b))
    else:
        pairs = raw
    # Raw headers came with their Connection value parsed out; a model's are scanned.
    named: frozenset[bytes] | None = None
    if request.connection:
        named = connection_tokens(request.connection)
    if raw is None:
        # One set for every Connection field: a union per field would cost time quadratic
        # in the number of fields.
        tokens = set(named or ())
        for name, value in pairs:
            if name.lower() == b"connection":
                tokens.update(connection_tokens(value))
        if tokens:
            named = frozenset(tokens)
    if named is not None and named <= _USUAL_CONNECTION_TOKENS:
        named = None
    kept, forwarded, te_trailers = _end_to_end(pairs, named)
    if te_trailers:
        out.append((b"te", b"trailers"))  # the one TE value HTTP/2 allows (gRPC)
    out += [(name.lower(), value) for name, value in kept]
    xff, proto, fhost, via = _forwarding_values(request, forwarded)
    out += ((b"x-forwarded-for", xff), (b"x-forwarded-proto", proto))
    if fhost is not None:
        out.append((b"x-forwarded-host", fhost))
    out.append((b"via", via))
    if body_length is not None and (body_length or request.method not in _BODYLESS):
        out.append((b"content-length", b"%d" % body_length))
    return out
