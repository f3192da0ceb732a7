"""HTTP/2 field sections <-> the exchange model: request header and trailer validation
(RFC 9113 sections 8.2 and 8.3) and response field lists (response trailers:
proxy/codec/h2fields.py, shared with the upstream client).

The h2 library can validate and normalise fields itself, but does it through a chain of
generators that cost more than the rest of a request together; these checks are the same
rules in one pass. They matter beyond HTTP/2: a request's fields are copied to HTTP/1.1
upstreams byte for byte, so a CR, LF or NUL let through here would split the upstream
request (smuggling).
"""

from __future__ import annotations

import logging
import re

from proxy.codec.h2fields import CONNECTION_SPECIFIC, FORBIDDEN_TRAILERS
from proxy.core.body import Trailers
from proxy.core.canonical import (
    SINGLETON_FIELDS,
    InvalidHeader,
    InvalidHost,
    InvalidMethod,
    check_authority,
    check_method,
    underscore_allowed,
)
from proxy.core.errors import HeadTooLarge
from proxy.core.models import RawHeaders, Response

log = logging.getLogger(__name__)

# RFC 9113 section 6.5.2: each field counts its name, value and 32 bytes of overhead.
HEADER_FIELD_OVERHEAD_BYTES = 32

# RFC 9113 section 8.2.1: names are lower-case tokens; values carry no CR, LF or NUL and
# no leading or trailing whitespace.
_NAME_RE = re.compile(rb"[!#$%&'*+.^_`|~0-9a-z-]+")
_BAD_VALUE_RE = re.compile(rb"[\x00\r\n]|^[ \t]|[ \t]$")
# :method is a token (RFC 9110 section 9.1); :path and :authority carry no whitespace or
# control bytes (RFC 3986), since they are copied into HTTP/1.1 request lines and Host.
_METHOD_RE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TARGET_RE = re.compile(rb"[\x21-\x7e\x80-\xff]*")
_PSEUDO_REQUEST_FIELDS = frozenset({b":method", b":scheme", b":authority", b":path", b":protocol"})


class MalformedRequest(Exception):
    """The request's fields break RFC 9113 section 8: a stream error PROTOCOL_ERROR."""


class RequestFields:
    """A request's pseudo-header fields and its regular fields (validated). A plain class,
    not a dataclass: the compiled build compiles its __init__ (one per request)."""

    __slots__ = ("authority", "content_length", "headers", "method", "path", "protocol", "scheme")

    def __init__(
        self,
        method: bytes,
        scheme: bytes,
        authority: bytes,
        path: bytes,
        protocol: bytes,  # extended CONNECT (RFC 8441); b"" when absent
        headers: RawHeaders,
        content_length: int | None,
    ) -> None:
        self.method = method
        self.scheme = scheme
        self.authority = authority
        self.path = path
        self.protocol = protocol
        self.headers = headers
        self.content_length = content_length


def request_fields(
    fields: list[tuple[bytes, bytes]], max_list_bytes: int, underscores: str = "drop"
) -> RequestFields:
    """Validate a request's decoded field list and split it.

    Cookie crumbs are joined again (RFC 9113 section 8.2.3), since HTTP/1.1 upstreams
    expect one field; Host is kept when there is no :authority. Names holding "_" are
    dropped, refused or kept as `underscores` (`headers_with_underscores`) says.

    Raises:
        MalformedRequest: a field or pseudo-header breaks RFC 9113 section 8, or the
            method is a registered one in the wrong case (proxy/core/canonical.py).
        HeadTooLarge: the list is larger than `max_list_bytes` (answered with 431).
        BadRequest: answered 400, as on HTTP/1.1: `:authority` or Host is not an
            authority, they disagree, a singleton field (Authorization,
            Proxy-Authorization, Host, Content-Type) is repeated, or a name holds "_"
            under `reject`.
    """
    pseudo: dict[bytes, bytes] = {}
    headers: RawHeaders = []
    cookies: list[bytes] = []
    size = 0
    content_length: int | None = None
    singletons: set[bytes] | None = None
    name_ok = _NAME_RE.fullmatch
    value_bad = _BAD_VALUE_RE.search
    for name, value in fields:
        size += len(name) + len(value) + HEADER_FIELD_OVERHEAD_BYTES
        if value_bad(value) is not None:
            raise MalformedRequest(f"invalid value for field {name!r}")
        if name[:1] == b":":
            if headers or cookies:
                raise MalformedRequest("pseudo-header field after a regular field")
            if name not in _PSEUDO_REQUEST_FIELDS or name in pseudo:
                raise MalformedRequest(f"unknown or repeated pseudo-header {name!r}")
            pseudo[name] = value
            continue
        if name_ok(name) is None:
            raise MalformedRequest(f"invalid field name {name!r}")
        if name in CONNECTION_SPECIFIC:
            raise MalformedRequest(f"connection-specific field {name!r}")
        if name == b"cookie":
            cookies.append(value)
            continue
        if name == b"te" and value != b"trailers":
            raise MalformedRequest("te other than 'trailers'")
        if name == b"content-length":
            if not value.isdigit() or (content_length is not None and int(value) != content_length):
                raise MalformedRequest("invalid content-length")
            content_length = int(value)
        elif name in SINGLETON_FIELDS:
            if singletons is None:
                singletons = set()
            elif name in singletons:
                raise InvalidHeader(f"more than one {name.decode()} field")
            singletons.add(name)
        if 0x5F in name and not underscore_allowed(name, underscores):  # 0x5F: "_"
            continue
        headers.append((name, value))
    if size > max_list_bytes:
        raise HeadTooLarge()
    if cookies:
        headers.append((b"cookie", b"; ".join(cookies)))
    method = pseudo.get(b":method", b"")
    protocol = pseudo.get(b":protocol", b"")
    if not method or (protocol and method != b"CONNECT"):
        raise MalformedRequest("missing :method, or :protocol without CONNECT")
    if _METHOD_RE.fullmatch(method) is None:
        raise MalformedRequest("invalid :method")
    try:
        check_method(method.decode("ascii"))
    except InvalidMethod as exc:
        raise MalformedRequest(str(exc)) from None
    path = pseudo.get(b":path", b"")
    if method != b"CONNECT" or protocol:
        if not path or not pseudo.get(b":scheme"):
            raise MalformedRequest("missing :path or :scheme")
        if path[:1] != b"/" and not (path == b"*" and method == b"OPTIONS"):
            raise MalformedRequest("invalid :path")
    authority = pseudo.get(b":authority", b"")
    host = next((value for name, value in headers if name == b"host"), None)
    if not authority and host is not None:
        authority = host
    elif host is not None and host != authority:
        # RFC 9113 section 8.3.1: a Host naming another entity than :authority.
        raise InvalidHost("the host field and :authority differ")
    if _TARGET_RE.fullmatch(path) is None or _TARGET_RE.fullmatch(authority) is None:
        raise MalformedRequest("whitespace or a control byte in :path or :authority")
    check_authority(authority)
    return RequestFields(
        method,
        pseudo.get(b":scheme", b""),
        authority,
        path,
        protocol,
        headers,
        content_length,
    )


# Distinct request field lists validated once per connection (see `FieldsMemo`).
MAX_MEMOISED_FIELD_LISTS = 32


class FieldsMemo:
    """`request_fields`, memoised per connection: clients repeat the same field list
    (the HPACK memo hands back the same tuples), and validating it again costs more than
    a dictionary lookup. Only valid lists are kept, a bounded number of them; a reload
    that changes `headers_with_underscores` starts the memo over."""

    __slots__ = ("_limit", "_memo", "_underscores")

    def __init__(self, max_list_bytes: int) -> None:
        self._limit = max_list_bytes
        self._underscores = ""
        self._memo: dict[tuple[tuple[bytes, bytes], ...], RequestFields] = {}

    def __call__(self, headers: list[tuple[bytes, bytes]], underscores: str) -> RequestFields:
        """Raises what `request_fields` raises."""
        if underscores != self._underscores:
            self._underscores = underscores
            self._memo.clear()
        key = tuple(headers)
        fields = self._memo.get(key)
        if fields is None:
            fields = request_fields(headers, self._limit, underscores)
            if len(self._memo) < MAX_MEMOISED_FIELD_LISTS:
                self._memo[key] = fields
        return fields


def request_trailers(fields: list[tuple[bytes, bytes]]) -> Trailers:
    """Validate a request's trailer section (RFC 9113 section 8.1: no pseudo-headers; the
    same name and value rules as the header section) and decode it for the model.

    Raises:
        MalformedRequest: a pseudo-header, a bad name or value, or a field a trailer
            section must not carry.
    """
    out: Trailers = []
    for name, value in fields:
        if _NAME_RE.fullmatch(name) is None or name in FORBIDDEN_TRAILERS:
            raise MalformedRequest(f"invalid trailer field {name!r}")
        if _BAD_VALUE_RE.search(value) is not None:
            raise MalformedRequest(f"invalid value for trailer field {name!r}")
        out.append((name.decode("latin-1"), value.decode("latin-1")))
    return out


def response_fields(response: Response, content_length: int | None) -> list[tuple[bytes, bytes]]:
    """`:status` and the response's fields, lower-cased, without connection-specific ones;
    `content-length` when given.

    Fields set through the model are checked for CR, LF and NUL (RFC 9113 section 8.2.1)
    and dropped with a warning when they carry one; raw upstream fields were validated
    by the upstream's parser.
    """
    out: list[tuple[bytes, bytes]] = [(b":status", b"%d" % response.status)]
    raw = response.raw_headers
    if raw is not None:
        for name, value in raw:
            lower = name.lower()
            if lower not in CONNECTION_SPECIFIC and lower != b"content-length":
                out.append((lower, value))
    else:
        for text_name, text_value in response.headers.items():
            lower = text_name.lower().encode("latin-1")
            if lower in CONNECTION_SPECIFIC or lower == b"content-length":
                continue
            value = text_value.encode("latin-1")
            if b"\r" in value or b"\n" in value or b"\0" in value:
                log.warning("dropping response field %r: CR, LF or NUL in its value", text_name)
                continue
            out.append((lower, value))
    if content_length is not None:
        out.append((b"content-length", b"%d" % content_length))
    return out
