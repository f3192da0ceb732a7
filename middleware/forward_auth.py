"""`forward_auth`: ask an external HTTP service whether a request may pass (Traefik's
ForwardAuth, NGINX's `auth_request`).

For each request a `GET` goes to `url` with the client's headers (all of them, or those
listed in `forward_headers`; never hop-by-hop ones or the client's own forwarding
headers) and, set by the gateway alone, X-Forwarded-Method, -Proto, -Host, -Uri (the
request target in canonical form, as the upstream gets it) and X-Forwarded-For (as the
upstream gets it: the list a trusted proxy forwarded with its address appended, or the
peer alone; proxy/core/headers.py). A client's Forwarded and X-Real-IP go only when its peer
is a trusted proxy (`client_ip.trusted_proxies`). The request body is not sent.

- A 2xx answer lets the request on. The response headers named in `copy_headers` are
  copied onto it (an X-User the auth service vouches for); copies the client sent itself
  are removed from every request first, so they cannot be forged.
- Any other answer (401 with WWW-Authenticate, 302 to a login page, 403...) goes back to
  the client as it came: status, headers (minus hop-by-hop ones) and body, which is read
  whole first and may be at most AUTH_BODY_LIMIT_BYTES.
- Failures are the gateway's own replies: auth service unreachable (refused, no route,
  TLS handshake failed) 503 `auth_unavailable`; no full answer within `timeout` (connect
  included) 504 `auth_timeout`; connection reset, a malformed answer or a refusal body
  over the limit 502 `auth_bad_response`.

Every refusal and failure counts in `gatehouse_auth_failures_total{middleware,reason}`
with reason `denied`, `unavailable`, `timeout` or `bad_response`.

The HTTP client is the gateway's own (proxy/upstream/fetch.py: the upstream pool and
codec, keep-alive with LIFO reuse, the keep-alive race retried once); its pool is made in
`start()` once the loop runs.
"""

from __future__ import annotations

import logging
import re
import ssl
from typing import ClassVar

from multidict import CIMultiDict

from metrics.definitions import count_auth_failure
from proxy import (
    REQUEST_HOP_BY_HOP,
    RESPONSE_HOP_BY_HOP,
    AuthBadResponse,
    AuthTimeout,
    AuthUnavailable,
    BadRequest,
    Body,
    ConfigValueError,
    FetchResponse,
    FetchUrl,
    Handler,
    HttpClient,
    Option,
    Options,
    PoolTimeout,
    ProxyError,
    Request,
    Response,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamTimeout,
    ca_bundle_problem,
    parse_url,
    tls_context,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 2.0
TLS_OPTIONS: dict[str, Option] = {
    "ca": Option.string("PEM bundle to verify the auth service (default: the system store)"),
    "verify": Option.boolean("false turns certificate checks off", True),
    "sni": Option.string("the name sent and verified (default: the url's host)"),
}
# The body of an auth answer is read whole (a refusal's is relayed to the client, a 2xx's
# is dropped): a login page or a JSON error fits; anything larger is refused with a 502.
AUTH_BODY_LIMIT_BYTES = 64 * 1024

# RFC 9110 section 5.6.2: a field name is a token.
_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# The gateway writes these itself on the auth request: a client's copy is never sent.
_FORWARDING = ("X-Forwarded-Method", "X-Forwarded-Proto", "X-Forwarded-Host", "X-Forwarded-Uri")
_NOT_FORWARDED = REQUEST_HOP_BY_HOP | {name.lower() for name in _FORWARDING}
# What a client says about where it came from: sent only from a trusted peer.
_CLIENT_STATEMENTS = frozenset({"forwarded", "x-real-ip"})


class ForwardAuth:
    """Lets a request on only when the auth service at `url` answers 2xx."""

    # It decides who gets through: no cache may come before it in a chain
    # (proxy/plugin/base.py).
    ACCESS_CONTROL: ClassVar[bool] = True

    OPTIONS: ClassVar[dict[str, Option]] = {
        "url": Option.string("the auth service: http(s)://host[:port]/path", required=True),
        "timeout": Option.duration(
            "the whole auth exchange; slower: 504", DEFAULT_TIMEOUT_S, positive=True
        ),
        "forward_headers": Option.strings(
            "request headers sent to the auth service (default: all but hop-by-hop ones)"
        ),
        "copy_headers": Option.strings("headers of a 2xx answer copied onto the request", ()),
        "tls": Option.mapping(TLS_OPTIONS, "TLS to an https:// auth service"),
    }
    REQUIRED = ("url",)

    def __init__(self, options: Options) -> None:
        self.name = options.name
        self.timeout = options.duration("timeout", DEFAULT_TIMEOUT_S, positive=True)
        self.url = options.string("url")
        self.target = self._parse_url(options)  # where the auth requests go
        listed = options.strings("forward_headers") if "forward_headers" in options else None
        # None: every end-to-end header of the client's (Traefik's default).
        self.forward_headers = self._header_names(options, "forward_headers", listed)
        copied = options.strings("copy_headers")
        self.copy_headers = self._header_names(options, "copy_headers", copied) or ()
        tls, sni = self._tls_options(options)
        self.client = HttpClient(self.target, timeout_s=self.timeout, tls=tls, sni=sni)

    def __repr__(self) -> str:
        return f"<ForwardAuth {self.name} {self.url} {self.client!r}>"

    # -- config load -----------------------------------------------------------------
    def _parse_url(self, options: Options) -> FetchUrl:
        """`url` as the origin to connect to, the request target and the Host to send."""
        fallback = FetchUrl("http", "localhost", 80)
        if not self.url:
            if "url" in options and not options.failed:
                options.error("url", "must not be empty")
            return fallback
        if "://" not in self.url:
            options.error("url", f"expected a URL like 'http://auth:9000/check', got {self.url!r}")
            return fallback
        try:
            return parse_url(self.url)
        except ConfigValueError as exc:
            options.error("url", str(exc))
            return fallback

    @staticmethod
    def _header_names(
        options: Options, key: str, names: tuple[str, ...] | None
    ) -> tuple[str, ...] | None:
        if names is None:
            return None
        for name in names:
            lower = name.lower()
            if not _TOKEN_RE.fullmatch(name):
                options.error(key, f"{name!r} is not a valid header name")
            elif key == "forward_headers" and lower in _NOT_FORWARDED:
                options.error(
                    key, f"{name!r} is not sent from the client: forward_auth writes its own"
                )
            elif key == "copy_headers" and (
                lower in REQUEST_HOP_BY_HOP or lower in RESPONSE_HOP_BY_HOP
            ):
                options.error(key, f"{name!r} is hop-by-hop or framing and cannot be copied")
        return names

    def _tls_options(self, options: Options) -> tuple[ssl.SSLContext | None, str | None]:
        """The TLS context and SNI name for an https:// url (None, None otherwise)."""
        tls_options = options.nested("tls", TLS_OPTIONS)
        ca: str | None = None
        verify, sni = True, None
        if tls_options is not None:
            ca = tls_options.optional_string("ca")
            if ca is not None and (problem := ca_bundle_problem(ca)) is not None:
                tls_options.error("ca", problem)
                ca = None
            verify = tls_options.boolean("verify", True)
            sni = tls_options.optional_string("sni")
            if self.target.scheme != "https":
                options.error("tls", "only applies to an https:// url")
        if self.target.scheme != "https":
            return None, None
        try:
            return tls_context(ca, verify=verify), sni
        except (OSError, ssl.SSLError) as exc:  # pragma: no cover - the CA was checked above
            options.error("tls", f"cannot load the TLS settings: {exc}")  # (it changed since)
            return None, None

    # -- lifecycle -------------------------------------------------------------------
    def identity_headers(self) -> tuple[str, ...]:
        """The headers copied from the auth service's answer (middleware/base.py)."""
        return tuple(self.copy_headers)

    async def start(self) -> None:
        """Make the connection pool to the auth service (needs the running loop)."""
        self.client.open()

    async def close(self) -> None:
        """Close idle connections to the auth service."""
        self.client.close()

    # -- per request -----------------------------------------------------------------
    async def __call__(self, request: Request, call_next: Handler) -> Response:
        headers = request.headers
        copy = self.copy_headers
        for name in copy:
            headers.popall(name, None)  # only the auth service may set these
        answer = await self._ask(self._auth_headers(request, headers))
        status = answer.status
        if 200 <= status < 300:
            for name in copy:
                for value in answer.headers.getall(name, ()):
                    headers.add(name, value)
            return await call_next(request)
        count_auth_failure(self.name, "denied")
        log.debug("%s: auth service answered %d", self.name, status)
        return Response(status, answer.headers, Body.from_bytes(answer.body or b""), answer.reason)

    def _auth_headers(self, request: Request, headers: CIMultiDict[str]) -> list[tuple[str, str]]:
        out = [("Host", self.target.host_header)]
        wanted = self.forward_headers
        trusted = request.peer_trusted
        if wanted is None:
            # (The fields the client's Connection names were removed on arrival.)
            for name, value in headers.items():
                lower = name.lower()
                if lower not in _NOT_FORWARDED and (trusted or lower not in _CLIENT_STATEMENTS):
                    out.append((name, value))
        else:
            for name in wanted:
                if trusted or name.lower() not in _CLIENT_STATEMENTS:
                    out += [(name, value) for value in headers.getall(name, ())]
        # As the upstream gets it (proxy/core/headers.py): a trusted proxy's list, this hop
        # appended; from anyone else, the peer alone.
        forwarded_for = ", ".join(headers.getall("x-forwarded-for", ())) if trusted else ""
        peer = request.peer[0]
        out += (("X-Forwarded-Method", request.method), ("X-Forwarded-Proto", request.scheme))
        if request.host:  # an HTTP/1.0 request may come without one
            out.append(("X-Forwarded-Host", request.host))
        out += (
            ("X-Forwarded-Uri", request.target.decode("latin-1")),
            ("X-Forwarded-For", f"{forwarded_for}, {peer}" if forwarded_for else peer),
        )
        return out

    async def _ask(self, headers: list[tuple[str, str]]) -> FetchResponse:
        """Send the auth request; the answer, with its body unless it is a 2xx's (a
        refusal's body is at most AUTH_BODY_LIMIT_BYTES).

        Raises:
            BadRequest: an earlier middleware set a header that cannot be sent.
            AuthUnavailable, AuthTimeout, AuthBadResponse: as the module docstring says.
        """
        try:
            answer = await self.client.fetch("GET", headers=headers, max_body=AUTH_BODY_LIMIT_BYTES)
        except ValueError as exc:  # set by an earlier middleware (the parser checked ours)
            raise BadRequest(f"cannot send the auth request: {exc}") from None
        except (UpstreamConnectTimeout, UpstreamTimeout):
            # Ours, or the pool's connect timeout (the same length: whichever fires first).
            count_auth_failure(self.name, "timeout")
            raise AuthTimeout(f"auth service {self.url} did not answer in time") from None
        except (UpstreamConnectError, PoolTimeout) as exc:
            count_auth_failure(self.name, "unavailable")
            raise AuthUnavailable(f"auth service unavailable: {exc.message}") from None
        except ProxyError as exc:  # reset, malformed response
            count_auth_failure(self.name, "bad_response")
            raise AuthBadResponse(f"auth service {self.url}: {exc.message}") from None
        if answer.body is None and not 200 <= answer.status < 300:  # a 2xx's is not needed
            count_auth_failure(self.name, "bad_response")
            raise AuthBadResponse(
                f"auth service answered {answer.status} with a body over "
                f"{AUTH_BODY_LIMIT_BYTES} bytes"
            )
        return answer
