"""Request headers for the upstream hop: hop-by-hop removal and forwarding headers.

RFC 9110 section 7.6.1: Connection and the fields it names, plus the classic hop-by-hop
set, describe only the client's hop and are dropped. The fields the client's Connection
nominates are removed when the request comes in (`proxy/core/canonical.py`), before any
middleware runs, so that a client can never nominate away a field the gateway itself
sets (X-Consumer, say); here only the fixed set is dropped. Framing (Content-Length,
Transfer-Encoding) is re-derived for the upstream hop; `Expect` is answered by us.

Where a request came from (`_forwarding_values`): Via is always appended to (RFC 9110
section 7.6.3). X-Forwarded-For, -Proto and -Host, Forwarded (RFC 7239) and X-Real-IP
are what earlier proxies say about the client, and are believed only from a peer in
`client_ip.trusted_proxies` (`Request.peer_trusted`, proxy/core/client_ip.py):
- from a trusted peer they are kept, and this hop appended to X-Forwarded-For, -Proto,
  -Host (the peer, the scheme, the Host) and to a Forwarded that came with the request
  (its `for`/`host`/`proto` element); X-Real-IP, a single value, passes as it is. The
  X-Forwarded-* lists then stay aligned hop for hop, which is how their readers count
  trusted hops from the right (Werkzeug's ProxyFix, Rails, Express `trust proxy`).
- from anyone else they are the client's own claims: X-Forwarded-For becomes the peer
  alone, -Proto the scheme, -Host the Host, and Forwarded and X-Real-IP are removed (the
  gateway does not write them of its own, as nginx, Envoy, Traefik and Caddy do not).
  A client cannot make an upstream believe another address (X-Forwarded-For, X-Real-IP,
  Forwarded `for`), that plain HTTP was HTTPS (-Proto: secure cookies, HTTPS-only
  checks) or another host (-Host: the host of links in password-reset mails).

X-Forwarded-Client-Cert is never taken from a request, trusted peer or not (Envoy's
`SANITIZE_SET`): the upstream gets the gateway's own value (Envoy's format,
proxy/core/client_cert.py) when the connection verified a client certificate, and none
otherwise, so no client can claim a certificate it did not present.
"""

from __future__ import annotations

from proxy.codec.h1serialize import UnsafeHeader, request_head
from proxy.core.forwarded import forwarded_element
from proxy.core.ids import new_traceparent
from proxy.core.models import RawHeaders, Request
from proxy.core.tracing import TRACEPARENT, TRACESTATE, propagation_only

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
# What a request says about where it came from, besides the X-Forwarded-* fields: kept
# only from a trusted peer (see the module docstring).
_CLIENT_STATEMENTS = frozenset({"forwarded", "x-real-ip"})
# W3C Trace Context: the gateway writes its own traceparent for each upstream try, and
# passes tracestate on only with the trace it continues (proxy/core/tracing.py).
_TRACE_FIELDS = frozenset({TRACEPARENT, TRACESTATE})
# The verified client certificate (proxy/core/client_cert.py): only the gateway's own
# value reaches the upstream, whoever the peer is.
CLIENT_CERT_FIELD = "x-forwarded-client-cert"
_MANAGED = REQUEST_HOP_BY_HOP | _CLIENT_STATEMENTS | _TRACE_FIELDS | {CLIENT_CERT_FIELD}
VIA_TOKEN = "gatehouse"
_VIA_HOPS = {version: f"{version} {VIA_TOKEN}".encode() for version in ("1.0", "1.1", "2")}


def upstream_headers(
    request: Request, host: str, body_length: int | None, chunked: bool
) -> list[tuple[str, str]]:
    """The header list to send upstream for `request`.

    `host` is the Host to send (the client's, or the route's rewrite); `body_length` /
    `chunked` give the framing of the body as it will be sent.
    """
    headers = request.headers
    out: list[tuple[str, str]] = [("Host", host)]
    forwarded: Forwarded = [None] * len(_FORWARDED)
    for name, value in headers.items():
        lower = name.lower()
        if lower in _MANAGED:
            slot = _FORWARDED.get(lower.encode())
            if slot is not None:
                _collect(forwarded, slot, value.encode("latin-1"))
            elif lower == "te" and value.strip().lower() == "trailers":
                out.append(("TE", "trailers"))  # the one TE value that must pass (gRPC)
            continue
        out.append((name, value))
    xff, proto, fhost, via, fwd, real_ip = _forwarding_values(request, forwarded)
    out.append(("X-Forwarded-For", xff.decode("latin-1")))
    out.append(("X-Forwarded-Proto", proto.decode("latin-1")))
    if fhost is not None:
        out.append(("X-Forwarded-Host", fhost.decode("latin-1")))
    if fwd is not None:
        out.append(("Forwarded", fwd.decode("latin-1")))
    if real_ip is not None:
        out.append(("X-Real-IP", real_ip.decode("latin-1")))
    out.append(("Via", via.decode("latin-1")))
    client_cert = request.client_cert
    if client_cert is not None:
        out.append(("X-Forwarded-Client-Cert", client_cert.xfcc))
    traceparent, tracestate = _trace_fields(request, forwarded)
    out.append(("traceparent", traceparent.decode()))
    if tracestate is not None:
        out.append(("tracestate", tracestate.decode("latin-1")))
    if chunked:
        out.append(("Transfer-Encoding", "chunked"))
    elif body_length is not None and (body_length or request.method not in _BODYLESS):
        out.append(("Content-Length", str(body_length)))
    return out


# Methods whose requests normally carry no body: no "Content-Length: 0" is added for them.
_BODYLESS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE"})


_RAW_HOP_BY_HOP = frozenset(name.encode() for name in _MANAGED)
# Connection values that name nothing beyond the fields always dropped (the forwarding
# fields are not: a trusted proxy's are kept), so nothing need be removed for them.
USUAL_CONNECTION_TOKENS = frozenset(
    name.encode() for name in REQUEST_HOP_BY_HOP if not name.startswith(("x-", "via"))
) | {b"close"}
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
    b"forwarded": 4,
    b"x-real-ip": 5,
    b"traceparent": 6,
    b"tracestate": 7,
}
# The lines a request carried of each `_FORWARDED` field, in that order (None: none),
# joined once in `_forwarding_values`: joining them as they come would cost time
# quadratic in the number of lines a client repeats.
Forwarded = list[list[bytes] | None]
_NOTHING_FORWARDED: Forwarded = [None] * len(_FORWARDED)
_TRACEPARENT_SLOT = 6
_TRACESTATE_SLOT = 7


def _collect(forwarded: Forwarded, slot: int, value: bytes) -> None:
    lines = forwarded[slot]
    if lines is None:
        forwarded[slot] = [value]
    else:
        lines.append(value)


def _joined(lines: list[bytes] | None) -> bytes | None:
    if lines is None:
        return None
    return lines[0] if len(lines) == 1 else b", ".join(lines)


def _end_to_end(pairs: RawHeaders) -> tuple[RawHeaders, Forwarded, bool]:
    """Split raw request fields for the upstream hop: the end-to-end ones (as received),
    the values of the `_FORWARDED` fields (X-Forwarded-For/-Proto/-Host, Via, Forwarded,
    X-Real-IP; each field's lines joined), and whether the client sent `TE: trailers`
    (the one TE value that passes, for gRPC)."""
    kept: RawHeaders = []
    forwarded: Forwarded = [None] * len(_FORWARDED)
    te_trailers = False
    for name, value in pairs:
        lower = name.lower()
        if lower in _RAW_HOP_BY_HOP:
            slot = _FORWARDED.get(lower)
            if slot is not None:
                _collect(forwarded, slot, value)
            elif lower == b"te" and value.strip().lower() == b"trailers":
                te_trailers = True
            continue
        kept.append((name, value))
    return kept, forwarded, te_trailers


def _forwarding_values(
    request: Request, forwarded: Forwarded
) -> tuple[bytes, bytes, bytes | None, bytes, bytes | None, bytes | None]:
    """X-Forwarded-For, -Proto, -Host (None without a Host), Via, Forwarded and X-Real-IP
    (None: not sent) for the upstream hop, from what the request carried (`forwarded`):
    kept with this hop appended from a trusted peer, replaced from anyone else (see the
    module docstring)."""
    if forwarded == _NOTHING_FORWARDED:  # most requests: none of them came
        xff = proto = fhost = via = fwd = real_ip = None
    else:
        xff, proto, fhost, via, fwd, real_ip = [_joined(lines) for lines in forwarded[:6]]
    peer = request.peer[0].encode()
    scheme = request.scheme.encode()
    host: bytes | None = request.host.encode("latin-1") if request.host else None
    hop = _VIA_HOPS.get(request.http_version) or b"%s %s" % (
        request.http_version.encode(),
        VIA_TOKEN.encode(),
    )
    via = hop if via is None else via + b", " + hop
    if not request.peer_trusted:
        return peer, scheme, host, via, None, None
    if fwd is not None:
        element = forwarded_element(request.peer[0], request.scheme, request.host)
        fwd += b", " + element.encode("latin-1")
    return (
        peer if xff is None else xff + b", " + peer,
        scheme if proto is None else proto + b", " + scheme,
        host if fhost is None or host is None else fhost + b", " + host,
        via,
        fwd,
        real_ip,
    )


def _trace_fields(request: Request, forwarded: Forwarded) -> tuple[bytes, bytes | None]:
    """`traceparent` for this upstream try and the `tracestate` to pass on (None: none).

    A gateway that traces gave the exchange its TraceContext on arrival. Otherwise a
    request that came with trace fields (`forwarded`'s trace slots) gets one at its
    first try; one that came without any, the usual case, gets a new unsampled trace
    kept as the header alone (`Exchange.traceparent`), and its retries stay in it."""
    exchange = request.exchange
    trace = exchange.trace
    if trace is None:
        parents = forwarded[_TRACEPARENT_SLOT]
        if parents is None:
            last = exchange.traceparent
            header = exchange.traceparent = new_traceparent(last[3:35] if last else b"")
            return header, None
        states = forwarded[_TRACESTATE_SLOT]
        trace = exchange.trace = propagation_only(
            [line.decode("latin-1") for line in parents],
            [line.decode("latin-1") for line in states] if states is not None else [],
        )
    state = trace.tracestate
    return trace.new_hop(), state.encode("latin-1") if state is not None else None


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
    # Ints, not one-byte bytes: `int in bytes` is a memchr and several times cheaper.
    if 0x20 in target or 0x0D in target or 0x0A in target:  # SP, CR, LF
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
    # `_end_to_end`'s rule, inline: this is the HTTP/1.1 hot path, and building the list
    # of kept fields first costs ~1 us per request (3%) here.
    forwarded: Forwarded = [None, None, None, None, None, None, None, None]  # _FORWARDED's
    for name, value in raw:
        lower = name.lower()
        if lower in _RAW_HOP_BY_HOP:
            slot = _FORWARDED.get(lower)
            if slot is not None:
                _collect(forwarded, slot, value)
            elif lower == b"te" and value.strip().lower() == b"trailers":
                parts.append(b"\r\nTE: trailers")
            continue
        parts += (b"\r\n", name, b": ", value)
    xff, proto, fhost, via, fwd, real_ip = _forwarding_values(request, forwarded)
    parts += (b"\r\nX-Forwarded-For: ", xff, b"\r\nX-Forwarded-Proto: ", proto)
    if fhost is not None:
        parts += (b"\r\nX-Forwarded-Host: ", fhost)
    if fwd is not None:
        parts += (b"\r\nForwarded: ", fwd)
    if real_ip is not None:
        parts += (b"\r\nX-Real-IP: ", real_ip)
    parts += (b"\r\nVia: ", via)
    client_cert = request.client_cert
    if client_cert is not None:
        parts += (b"\r\nX-Forwarded-Client-Cert: ", client_cert.xfcc.encode("latin-1"))
    traceparent, tracestate = _trace_fields(request, forwarded)
    parts += (b"\r\ntraceparent: ", traceparent)
    if tracestate is not None:
        parts += (b"\r\ntracestate: ", tracestate)
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
    by `:authority`, section 8.3.1), with the forwarding fields kept or replaced as
    `upstream_headers` does (`_forwarding_values`). `content-length` is added when
    `body_length` is known; an unknown length needs no framing in HTTP/2 (END_STREAM ends
    the body).

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
    kept, forwarded, te_trailers = _end_to_end(pairs)
    if te_trailers:
        out.append((b"te", b"trailers"))  # the one TE value HTTP/2 allows (gRPC)
    out += [(name.lower(), value) for name, value in kept]
    xff, proto, fhost, via, fwd, real_ip = _forwarding_values(request, forwarded)
    out += ((b"x-forwarded-for", xff), (b"x-forwarded-proto", proto))
    if fhost is not None:
        out.append((b"x-forwarded-host", fhost))
    if fwd is not None:
        out.append((b"forwarded", fwd))
    if real_ip is not None:
        out.append((b"x-real-ip", real_ip))
    out.append((b"via", via))
    client_cert = request.client_cert
    if client_cert is not None:
        out.append((b"x-forwarded-client-cert", client_cert.xfcc.encode("latin-1")))
    traceparent, tracestate = _trace_fields(request, forwarded)
    out.append((b"traceparent", traceparent))
    if tracestate is not None:
        out.append((b"tracestate", tracestate))
    if body_length is not None and (body_length or request.method not in _BODYLESS):
        out.append((b"content-length", b"%d" % body_length))
    return out
