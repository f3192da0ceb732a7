"""Who may ask the admin listener what: its three gates, checked in this order on every
request before it is answered (metrics/admin.py).

1. **Host allow-list** (every path). The Host header must name an IP literal (IPv4, or
   bracketed IPv6, with or without a port), `localhost`, or one of `admin.hosts`;
   anything else gets 421 Misdirected Request (RFC 9110 section 15.5.20: this server does
   not answer for that name). DNS rebinding is a page on `attacker.example` whose name
   the attacker then resolves to 127.0.0.1: the browser sends it to the admin listener as
   a same-origin request, but with `Host: attacker.example`, which is not on the list.
   Probes are unaffected: the kubelet and the image's HEALTHCHECK ask by IP, and a
   Prometheus that scrapes by service name lists that name in `admin.hosts`.
2. **Bearer token** (every path but /healthz and /readyz, which probes ask without
   credentials). With `admin.token` set, `Authorization: Bearer <token>` is required
   (RFC 6750), compared in constant time; otherwise 401 with
   `WWW-Authenticate: Bearer realm="gatehouse-admin"`.
3. **No cross-site writes** (every method but GET and HEAD that a path takes, i.e. POST
   /reload; checked once the path and method are known, so a wrong one is still 405). 403
   unless the request carries a header no browser adds to a cross-site request of its own
   accord, and no sign of coming from a browser page:
   - it must have `X-Gatehouse-Admin` (any value; `gatehouse reload` sends it) or a
     Bearer `Authorization`. A form, or a `fetch()` with only CORS-safelisted headers, can
     send neither; adding either makes the browser ask first with a CORS preflight
     (OPTIONS), which this listener refuses and never answers with any
     `Access-Control-Allow-*`, so the browser never sends the request itself;
   - it must have no `Origin` (browsers send it with every cross-origin request and with
     same-origin POSTs; `gatehouse reload`, curl and scripts do not) and no
     `Sec-Fetch-Site` other than `none` (Fetch Metadata: `cross-site`, `same-site` and
     `same-origin` all come from a page). This refuses what a preflight would not catch:
     a page on the same site (another port of localhost) and a rebound name.

Refusals are counted in `gatehouse_admin_refusals_total{reason}`: `host`,
`unauthorized`, `cross_site`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # no token: liveness and readiness probes
SAFE_METHODS = frozenset({"GET", "HEAD"})  # read-only; every other method changes state
CSRF_HEADER = "X-Gatehouse-Admin"  # what a non-browser client sends on a POST
REALM = "gatehouse-admin"

Headers = Sequence[tuple[bytes, bytes]]  # lower-case names, as h11 gives them


@dataclass(frozen=True, slots=True)
class AdminAccess:
    """The admin listener's access settings (`admin.token`, `admin.hosts`)."""

    token: str | None = None
    hosts: frozenset[str] = frozenset()  # lower-case names, no trailing dot

    @classmethod
    def of(cls, token: str | None, hosts: Iterable[str]) -> AdminAccess:
        """From the config's values (names are matched case-insensitively)."""
        return cls(token, frozenset(name.lower().rstrip(".") for name in hosts))


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is not answered: its status, `error` code, metric reason, a message
    for the operator, and headers to add."""

    status: int
    error: str
    reason: str
    message: str
    headers: tuple[tuple[str, str], ...] = ()


def admit(access: AdminAccess, path: str, headers: Headers) -> Refusal | None:
    """Gates 1 and 2, for every request before it is routed: the refusal, or None."""
    for name, value in headers:
        if name == b"host" and not host_allowed(value.decode("latin-1"), access.hosts):
            return Refusal(
                421,
                "misdirected_request",
                "host",
                "the Host header names neither an IP address, localhost, nor one of admin.hosts",
            )
    if access.token is not None and path not in OPEN_PATHS:
        return _authorize(access.token, headers)
    return None


def host_allowed(value: str, names: frozenset[str]) -> bool:
    """Whether a Host header value (`host[:port]`, RFC 9110 section 7.2) names this
    listener: an IPv4 literal, a bracketed IPv6 literal, `localhost` or one of `names`."""
    host = value.strip().lower()
    if host.startswith("["):
        literal, bracket, port = host[1:].partition("]")
        if not bracket or not _port(port):
            return False
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            return False
        return "%" not in literal  # a zone id names a link on the client's machine
    name, colon, port = host.partition(":")
    if colon and not _port(colon + port):
        return False
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        pass
    else:
        return True
    name = name.removesuffix(".")  # `localhost.` is the same name, fully qualified
    return bool(name) and (name == "localhost" or name in names)


def _port(text: str) -> bool:
    """`` or `:digits` (RFC 3986 section 3.2.3: the port may be empty)."""
    return text == "" or (text.startswith(":") and (text[1:] == "" or text[1:].isdigit()))


def _authorize(token: str, headers: Headers) -> Refusal | None:
    values = [value for name, value in headers if name == b"authorization"]
    challenge = f'Bearer realm="{REALM}"'
    if not values:
        message = "this admin listener needs 'Authorization: Bearer <admin.token>'"
        return Refusal(
            401, "unauthorized", "unauthorized", message, (("www-authenticate", challenge),)
        )
    given = _bearer(values)
    # Digests of equal length, compared in constant time: neither the token's bytes nor
    # its length show in how long a wrong guess takes.
    if given is None or not hmac.compare_digest(
        hashlib.sha256(given).digest(), hashlib.sha256(token.encode()).digest()
    ):
        challenge += ', error="invalid_token"'  # RFC 6750 section 3.1
        return Refusal(
            401,
            "unauthorized",
            "unauthorized",
            "the bearer token is not admin.token",
            (("www-authenticate", challenge),),
        )
    return None


def _bearer(values: list[bytes]) -> bytes | None:
    """The credentials of one `Bearer` Authorization field (the scheme is
    case-insensitive, RFC 9110 section 11.1); None for anything else."""
    if len(values) != 1:
        return None
    scheme, _, credentials = values[0].strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return credentials.strip() or None


def cross_site(headers: Headers) -> Refusal | None:
    """Gate 3, for a request that changes state (routed, its method allowed): the
    refusal, or None."""
    names = {name for name, _ in headers}
    fetch_site = [value.strip().lower() for name, value in headers if name == b"sec-fetch-site"]
    if b"origin" in names or any(site != b"none" for site in fetch_site):
        message = (
            "a request with Origin or Sec-Fetch-Site comes from a web page; this listener "
            "takes no state-changing request from a browser"
        )
        return Refusal(403, "cross_site_request", "cross_site", message)
    bearer = _bearer([value for name, value in headers if name == b"authorization"])
    if CSRF_HEADER.lower().encode() not in names and bearer is None:
        message = (
            f"send the header '{CSRF_HEADER}: 1' (or Authorization: Bearer): a browser "
            "cannot add it to a cross-site request"
        )
        return Refusal(403, "cross_site_request", "cross_site", message)
    return None
