"""One canonical form of every request, decided before routing (issue 14: the gateway is the
one place where access is decided).

A route's auth, IP rules and method lists hold only if the gateway and the upstream agree
on what was asked. Upstreams decode `%61dmin`, merge `//admin` and resolve `/x/../admin`
(nginx, Go, Werkzeug all do), so routing on the bytes as received lets `/%61dmin` walk
around a route `/admin` into a catch-all. Every front end (HTTP/1.1 on either codec,
HTTP/2) passes its request through here, so they all route, and forward, the same thing:

- **Path** (RFC 3986 sections 2 and 5.2.4, as nginx and Envoy's `normalize_path` +
  `merge_slashes` do): percent-encoded unreserved characters are decoded, the hex of the
  escapes that remain is upper-cased, characters a path may not hold raw are encoded,
  repeated slashes are merged (`path_normalization.merge_slashes`), and dot segments are
  removed, encoded dots included. A `..` above the root is refused (400), as nginx does.
  A fragment (never sent by a conforming client) is dropped.
- **Escaped slashes.** `%2F` and `%5C` (and a raw `\\`, which some servers take for a
  separator) follow `path_normalization.escaped_slashes`, Envoy's
  `path_with_escaped_slashes_action`: `reject` (400, the default: no upstream can then
  read a separator the gateway did not see), `unescape` (`%2F` becomes a separator, `%5C`
  a literal backslash, as nginx decodes them), or `keep` (left encoded, one opaque
  character of its segment).
- **Absolute-form** targets (`GET http://host/admin`, RFC 9112 section 3.2.2) are routed by
  their own authority and path and forwarded in origin-form; userinfo is refused
  (RFC 9110 section 4.2.4).
- **Host** / `:authority` must be an RFC 3986 authority without userinfo (RFC 9112
  section 3.2, RFC 9110 section 7.2): `a b` or `evil.com/x@y` get 400, as from nginx.
- **Method case.** Method names are case-sensitive (RFC 9110 section 9.1), but upstreams
  such as Werkzeug upper-case them, so `dElEtE` would slip past a route that lists only
  `GET`. A method equal to a registered one only when case is ignored is refused: 400 on
  HTTP/1.1, a stream error on HTTP/2.

- **Header fields.** A second Authorization, Proxy-Authorization, Host or Content-Type is
  refused (the gateway and the upstream could each believe a different one). The fields
  the client's Connection nominates are removed on arrival, never later from what the
  gateway sets (RFC 9110 section 7.6.1). Names holding "_" follow
  `headers_with_underscores` (WSGI servers fold them into "-"), and every spelling of a
  field a route's middleware sets for the upstream is removed before its chain runs.

The common request (a plain path, a known method, a Host seen before, no "_" and no
unusual Connection) pays one regex match and two set lookups; the rest is done only for
what needs it.
"""

from __future__ import annotations

import re

from proxy.config.model import PathNormalization
from proxy.core.errors import InvalidHeader as InvalidHeader
from proxy.core.errors import InvalidHost as InvalidHost
from proxy.core.errors import InvalidMethod as InvalidMethod
from proxy.core.errors import InvalidTarget as InvalidTarget
from proxy.core.headers import USUAL_CONNECTION_TOKENS, connection_tokens
from proxy.core.models import RawHeaders, Request

# -- the path ----------------------------------------------------------------------------

# RFC 3986 section 2.3.
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# What a path segment may hold raw (pchar without pct-encoded, RFC 3986 section 3.3).
_SEGMENT_RAW = _UNRESERVED | frozenset("!$&'()*+,;=:@")
_HEX = frozenset("0123456789ABCDEFabcdef")
# A path that is canonical as it stands, when it also has no "//" (merged) and no "/."
# (a possible dot segment): most requests, which then cost this one match.
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@/]*")
# Bytes as ints: `int in bytes` is a memchr, where a bytes needle costs several times more.
_SLASH, _BACKSLASH, _HASH, _UNDERSCORE = 0x2F, 0x5C, 0x23, 0x5F


def normalize_path(path: str, policy: PathNormalization) -> str:
    """The canonical form of an origin-form path (module docstring). `path` is the text
    before `?`, decoded as latin-1 (one character per byte).

    Raises:
        InvalidTarget: a malformed escape, an escaped slash under `reject`, or `..` that
            climbs above the root.
    """
    if (
        _PLAIN_PATH.fullmatch(path) is not None
        and "/." not in path
        and not (policy.merge_slashes and "//" in path)
    ):
        return path
    return _rebuild(_segments(path, policy.escaped_slashes), policy.merge_slashes)


def _segments(path: str, escaped_slashes: str) -> list[str]:
    """Split `path` (after its leading "/") into segments, each in canonical encoding."""
    segments: list[str] = []
    current: list[str] = []
    size = len(path)
    index = 1
    while index < size:
        char = path[index]
        index += 1
        if char == "/":
            segments.append("".join(current))
            current = []
        elif char in _SEGMENT_RAW:
            current.append(char)
        elif char == "%":
            escape = path[index : index + 2]
            if len(escape) != 2 or escape[0] not in _HEX or escape[1] not in _HEX:
                raise InvalidTarget("malformed percent-encoding in the path")
            index += 2
            value = int(escape, 16)
            decoded = chr(value)
            if decoded in _UNRESERVED:
                current.append(decoded)
            elif value in (_SLASH, _BACKSLASH):
                if escaped_slashes == "reject":
                    raise InvalidTarget(f"escaped slash %{escape} in the path")
                if escaped_slashes == "unescape" and value == _SLASH:
                    segments.append("".join(current))
                    current = []
                else:  # kept, or a backslash unescaped to the literal character it is
                    current.append("%2F" if value == _SLASH else "%5C")
            elif value == 0:
                raise InvalidTarget("NUL in the path")
            else:
                current.append("%" + escape.upper())
        elif char == "\\":
            if escaped_slashes == "reject":
                raise InvalidTarget("backslash in the path")
            current.append("%5C")
        else:  # a byte a path may not hold raw (RFC 3986 section 2.1): encoded
            current.append(f"%{ord(char):02X}")
    segments.append("".join(current))
    return segments


def _rebuild(segments: list[str], merge_slashes: bool) -> str:
    """Remove dot segments (RFC 3986 section 5.2.4) and, when merging, empty segments (a
    trailing one stays: `/a/` is not `/a`)."""
    kept: list[str] = []
    last = len(segments) - 1
    for position, segment in enumerate(segments):
        if segment == "..":
            if not kept:
                # RFC 3986 would drop it; nginx refuses it, and no browser sends one.
                raise InvalidTarget("'..' above the root of the path")
            kept.pop()
        elif segment != ".":
            if segment or not merge_slashes or position == last:
                kept.append(segment)
            continue
        if position == last:
            kept.append("")  # `/a/.` and `/a/b/..` name the directory: `/a/`
    return "/" + "/".join(kept)


# -- the target --------------------------------------------------------------------------

_ABSOLUTE_FORM = re.compile(rb"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)")


# A request target as routing and forwarding see it: (target, path, query, raw,
# authority). `target` is the origin-form to forward (canonical path, `?query` as
# received), `path` and `query` its halves as text, `raw` the origin-form as the client
# spelt it (no fragment), `authority` an absolute-form target's own (None otherwise). A
# plain tuple: it is built for every request.
CanonicalTarget = tuple[bytes, str, str, bytes, bytes | None]


def canonical_target(raw: bytes, method: str, policy: PathNormalization) -> CanonicalTarget:
    """The canonical form of a request target as received (origin-form, absolute-form, or
    `*` for OPTIONS).

    Raises:
        InvalidTarget: a form the gateway does not serve (authority-form, a relative
            path, a scheme other than http(s)), or a path `normalize_path` refuses.
        InvalidHost: an absolute-form target with a bad authority or userinfo.
    """
    known = _PLAIN_TARGETS.get(raw)
    if known is not None:
        return known
    if raw[:1] == b"/" and _HASH not in raw:
        raw_path, _, raw_query = raw.partition(b"?")
        path = raw_path.decode("latin-1")
        if _PLAIN_PATH.fullmatch(path) is not None and "/." not in path:
            # Canonical as it stands: most requests end here.
            found = raw, path, raw_query.decode("latin-1") if raw_query else "", raw, None
            if "//" not in path:
                # The same under every policy and method: remembered.
                if len(raw) <= _PLAIN_TARGET_CACHED_BYTES:
                    if len(_PLAIN_TARGETS) >= _PLAIN_TARGETS_CACHED:
                        _PLAIN_TARGETS.clear()
                    _PLAIN_TARGETS[raw] = found
                return found
            if not policy.merge_slashes:
                return found
    return _rebuilt_target(raw, method, policy)


# Targets found canonical as they stand (a client repeats its few paths), by their bytes.
# Bounded, as they come from the network: short ones only, and started over when full.
_PLAIN_TARGETS: dict[bytes, CanonicalTarget] = {}
_PLAIN_TARGETS_CACHED = 4096
_PLAIN_TARGET_CACHED_BYTES = 256


def _rebuilt_target(raw: bytes, method: str, policy: PathNormalization) -> CanonicalTarget:
    authority: bytes | None = None
    if raw[:1] != b"/":
        if raw == b"*":
            if method != "OPTIONS":
                raise InvalidTarget("'*' is only a target for OPTIONS")
            return raw, "*", "", raw, None
        found = _ABSOLUTE_FORM.match(raw)
        if found is None:
            raise InvalidTarget("the request target must be a path or an absolute URI")
        if found.group(1).lower() not in (b"http", b"https"):
            raise InvalidTarget("the request target's scheme must be http or https")
        authority = found.group(2)
        check_authority(authority)
        raw = raw[found.end() :] or b"/"
        if raw[:1] != b"/":  # "http://host?q": the path is empty, so "/"
            raw = b"/" + raw
    if _HASH in raw:
        raw = raw.partition(b"#")[0]  # a fragment is the client's own (RFC 9110 4.2.1)
    raw_path, question, raw_query = raw.partition(b"?")
    path = raw_path.decode("latin-1")
    canonical = normalize_path(path, policy)
    query = raw_query.decode("latin-1") if raw_query else ""
    if canonical is path:
        return raw, path, query, raw, authority
    return canonical.encode("latin-1") + question + raw_query, canonical, query, raw, authority


# -- the authority -----------------------------------------------------------------------

# RFC 3986 section 3.2.2 host (IP-literal or reg-name; an IPv4 address is a reg-name here)
# and section 3.2.3 port. No userinfo: RFC 9110 section 7.2 defines Host without it.
_AUTHORITY = re.compile(
    rb"(?:\[[0-9A-Fa-f:.]+\]|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*)(?::[0-9]*)?"
)
# Authorities already checked (a front end tests membership before calling
# `check_authority`); bounded, since they come from the network.
KNOWN_AUTHORITIES: set[bytes] = set()
_KNOWN_AUTHORITIES_CACHED = 4096


def check_authority(authority: bytes) -> None:
    """Refuse a Host value or `:authority` that is not `host[:port]` (empty is allowed:
    RFC 9112 section 3.2 asks for an empty Host when the target has no authority).

    Raises:
        InvalidHost: anything else (whitespace, `/`, `@`, a bad escape).
    """
    if authority in KNOWN_AUTHORITIES:
        return
    if _AUTHORITY.fullmatch(authority) is None:
        raise InvalidHost(f"invalid host {authority.decode('latin-1')!r}")
    if len(KNOWN_AUTHORITIES) >= _KNOWN_AUTHORITIES_CACHED:
        KNOWN_AUTHORITIES.clear()
    KNOWN_AUTHORITIES.add(authority)


# -- the method --------------------------------------------------------------------------

# The IANA HTTP Method Registry (RFC 9110 section 18.2 and the WebDAV, PATCH and QUERY
# registrations), with the extensions llhttp knows (PURGE, LINK...).
REGISTERED_METHODS = frozenset(
    {
        "ACL", "BASELINE-CONTROL", "BIND", "CHECKIN", "CHECKOUT", "CONNECT", "COPY", "DELETE",
        "GET", "HEAD", "LABEL", "LINK", "LOCK", "MERGE", "MKACTIVITY", "MKCALENDAR", "MKCOL",
        "MKREDIRECTREF", "MKWORKSPACE", "MOVE", "OPTIONS", "ORDERPATCH", "PATCH", "POST",
        "PRI", "PROPFIND", "PROPPATCH", "PUT", "QUERY", "REBIND", "REPORT", "SEARCH", "TRACE",
        "UNBIND", "UNCHECKOUT", "UNLINK", "UNLOCK", "UPDATE", "UPDATEREDIRECTREF",
        "VERSION-CONTROL", "M-SEARCH", "NOTIFY", "SUBSCRIBE", "UNSUBSCRIBE", "PURGE",
        "DESCRIBE", "ANNOUNCE", "SETUP", "PLAY", "PAUSE", "TEARDOWN", "GET_PARAMETER",
        "SET_PARAMETER", "REDIRECT", "RECORD", "FLUSH", "SOURCE",
    }
)  # fmt: skip


def check_method(method: str) -> None:
    """Refuse a registered method spelt in another case.

    Raises:
        InvalidMethod: `method` is not registered as it is, but is once upper-cased.
    """
    if method not in REGISTERED_METHODS and method.upper() in REGISTERED_METHODS:
        raise InvalidMethod(f"method {method!r} must be written {method.upper()!r}")


# -- the header fields -------------------------------------------------------------------

# Fields of which a request may carry one: two Authorization fields leave the gateway and
# the upstream free to believe different ones (RFC 9110 sections 11.6.2, 11.7.2, 7.2,
# 8.3 define each as a single value).
SINGLETON_FIELDS = (b"authorization", b"proxy-authorization", b"host", b"content-type")


def client_fields(
    headers: RawHeaders, connection: bytes | None, underscore: bool, underscores: str
) -> RawHeaders:
    """The client's header fields as the gateway takes them in (HTTP/1.1), before any
    middleware runs: without the fields its Connection header nominates (RFC 9110
    section 7.6.1: they describe the client's hop only; removed here, so that they can
    never remove a field the gateway sets later), and with names holding "_" treated
    by `underscores` (`headers_with_underscores`). `underscore` says whether any name
    holds one (the parser noticed while scanning).

    Raises:
        InvalidHeader: a name with "_" under `reject`.
    """
    named: frozenset[bytes] | None = None
    if connection:
        named = connection_tokens(connection)
        if named <= USUAL_CONNECTION_TOKENS:
            named = None  # "keep-alive", "close", "upgrade": dropped on the way out anyway
    if named is None and not underscore:
        return headers
    kept: RawHeaders = []
    for name, value in headers:
        if named is not None and name.lower() in named:
            continue
        if _UNDERSCORE in name and not underscore_allowed(name, underscores):
            continue
        kept.append((name, value))
    return kept


# Fields the gateway itself sets or frames by: under `allow`, their "_" spellings are
# still dropped, or an upstream that folds "_" into "-" would take them for the
# gateway's (a client's X_Forwarded_For beside the real one, a second Content-Length).
GATEWAY_FIELDS = frozenset(
    {
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-real-ip",
        b"forwarded",
        b"via",
        b"x-forwarded-client-cert",
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"connection",
    }
)


def underscore_allowed(name: bytes, underscores: str) -> bool:
    """Whether a field whose name holds "_" is kept (`headers_with_underscores`): never
    under `drop`, never in the spelling of a field in GATEWAY_FIELDS.

    Raises:
        InvalidHeader: under `reject`.
    """
    if underscores == "reject":
        raise InvalidHeader(f"header {name.decode('latin-1')!r}: '_' in a field name")
    return underscores == "allow" and name.lower().replace(b"_", b"-") not in GATEWAY_FIELDS


def spelling(name: str) -> bytes:
    """The one spelling of a field name that `without_spellings` compares: lower case,
    `_` as `-` (how WSGI and CGI servers fold names: `X_Consumer` is `x-consumer`)."""
    return name.lower().replace("_", "-").encode("latin-1")


def without_spellings(request: Request, spellings: frozenset[bytes]) -> None:
    """Remove from `request` every field whose name, in any case and with `_` for `-`, is
    one of `spellings` (see `spelling`): the identity headers the route's middleware set
    for the upstream to believe, which a client must not be able to send in any form."""
    raw = request.raw_headers
    if raw is not None:
        kept = [(n, v) for n, v in raw if n.lower().replace(b"_", b"-") not in spellings]
        if len(kept) != len(raw):
            request.raw_headers = kept
        return
    headers = request.headers
    for name in {key for key in headers if spelling(key) in spellings}:
        headers.popall(name, None)
