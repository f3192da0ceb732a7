"""Request headers for the upstream hop: hop-by-hop removal and forwarding headers.

RFC 9110 section 7.6.1: Connection and the fields it names, plus the classic hop-by-hop
set, describe only the client's hop and are dropped. Framing (Content-Length,
Transfer-Encoding) is re-derived for the upstream hop; `Expect` is answered by us.
X-Forwarded-For/-Proto/-Host are appended to (a list, like Via, RFC 9110 section 7.6.3).
"""

from __future__ import annotations

from proxy.models import Request

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


def _append(existing: str | None, value: str) -> str:
    return f"{existing}, {value}" if existing else value


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
    named = {token.strip().lower() for token in connection.split(",")} if connection else None
    forwarded_for = forwarded_proto = forwarded_host = via = None
    for name, value in headers.items():
        lower = name.lower()
        if lower in REQUEST_HOP_BY_HOP:
            if lower == "x-forwarded-for":
                forwarded_for = _append(forwarded_for, value)
            elif lower == "x-forwarded-proto":
                forwarded_proto = _append(forwarded_proto, value)
            elif lower == "x-forwarded-host":
                forwarded_host = _append(forwarded_host, value)
            elif lower == "via":
                via = _append(via, value)
            elif lower == "te" and value.strip().lower() == "trailers":
                out.append(("TE", "trailers"))  # the one TE value that must pass (gRPC)
            continue
        if named is not None and lower in named:
            continue
        out.append((name, value))
    out.append(("X-Forwarded-For", _append(forwarded_for, request.client[0])))
    out.append(("X-Forwarded-Proto", _append(forwarded_proto, request.scheme)))
    if request.host:
        out.append(("X-Forwarded-Host", _append(forwarded_host, request.host)))
    out.append(("Via", _append(via, f"{request.http_version} {VIA_TOKEN}")))
    if chunked:
        out.append(("Transfer-Encoding", "chunked"))
    elif body_length is not None and (body_length or request.method not in _BODYLESS):
        out.append(("Content-Length", str(body_length)))
    return out


# Methods whose requests normally carry no body: no "Content-Length: 0" is added for them.
_BODYLESS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE"})
