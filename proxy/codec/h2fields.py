"""HTTP/2 field rules both sides share: the HTTP/1.1 hop fields an HTTP/2 message must not
carry (RFC 9113 section 8.2.2), and trailer sections as HTTP/2 field lists, which the
front end sends with responses and the upstream client with requests.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# RFC 9113 section 8.2.2: fields that only mean something for one HTTP/1.1 hop.
CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)

# RFC 9110 section 6.5.1: fields a trailer section must not carry (framing, routing).
FORBIDDEN_TRAILERS = CONNECTION_SPECIFIC | {b"content-length", b"host", b"te", b"trailer"}


def trailer_fields(trailers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """Trailers as an HTTP/2 field list: lower-cased names; fields a trailer section must
    not carry, and values with CR, LF or NUL, are dropped (an h2 client would treat the
    whole response as malformed)."""
    out: list[tuple[bytes, bytes]] = []
    for name, value in trailers:
        lower = name.lower().encode("latin-1")
        encoded = value.encode("latin-1")
        if lower in FORBIDDEN_TRAILERS or lower[:1] == b":":
            continue
        if b"\r" in encoded or b"\n" in encoded or b"\0" in encoded:
            log.warning("dropping trailer %r: CR, LF or NUL in its value", name)
            continue
        out.append((lower, encoded))
    return out
