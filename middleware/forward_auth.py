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

The HTTP client is the gateway's own upstream pool (keep-alive, LIFO reuse, the
keep-alive race retried once); it is created in `start()` once the loop runs.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from urllib.parse import urlsplit

from multidict import CIMultiDict

from metrics.definitions import count_auth_failure
from middleware.base import Handler
from middleware.options import Options
from proxy.codec.h1 import resolve_codec
from proxy.codec.h1serialize import UnsafeHeader, request_head
from proxy.config.model import (
    DEFAULT_MAX_HEAD_BYTES,
    EndpointConfig,
    PoolConfig,
    UpstreamConfig,
    UpstreamTimeouts,
    UpstreamTls,
)
from proxy.config.values import ConfigValueError, ca_bundle_problem, parse_endpoint_url
from proxy.core.errors import (
    AuthBadResponse,
    AuthTimeout,
    AuthUnavailable,
    BadRequest,
    PoolTimeout,
    ProxyError,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamTimeout,
)
from proxy.core.headers import REQUEST_HOP_BY_HOP
from proxy.core.models import Body, Request, Response
from proxy.upstream.h1 import RESPONSE_HOP_BY_HOP, StaleConnection
from proxy.upstream.pool import UpstreamPool
from proxy.upstream.tls import client_context, server_hostname

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 2.0
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
_EMPTY_BODY = Body.from_bytes(b"")  # the auth request has none (sent with the head)


class ForwardAuth:
    """Lets a request on only when the auth service at `url` answers 2xx."""

    OPTIONS = ("url", "timeout", "forward_headers", "copy_headers", "tls")
    REQUIRED = ("url",)

    def __init__(self, options: Options) -> None:
        self.name = options.name
        self.timeout = options.duration("timeout", DEFAULT_TIMEOUT_S, positive=True)
        self.url = options.string("url")
        self.endpoint, self._target, self._host = self._parse_url(options)
        listed = options.strings("forward_headers") if "forward_headers" in options else None
        # None: every end-to-end header of the client's (Traefik's default).
        self.forward_headers = self._header_names(options, "forward_headers", listed)
        copied = options.strings("copy_headers")
        self.copy_headers = self._header_names(options, "copy_headers", copied) or ()
        self._tls, self._server_hostname = self._tls_context(options)
        self._codec = resolve_codec("auto")
        self._pool: UpstreamPool | None = None

    def __repr__(self) -> str:
        return f"<ForwardAuth {self.name} {self.url} pool={self._pool!r}>"

    # -- config load -----------------------------------------------------------------
    def _parse_url(self, options: Options) -> tuple[EndpointConfig, bytes, str]:
        """`url` as the endpoint, the request target and the Host header to send."""
        fallback = (EndpointConfig("http://localhost:80", "http", "localhost", 80), b"/", "")
        if not self.url:
            if "url" in options and not options.failed:
                options.error("url", "must not be empty")
            return fallback
        if "://" not in self.url:
            options.error("url", f"expected a URL like 'http://auth:9000/check', got {self.url!r}")
            return fallback
        url = self.url
        try:
            parts = urlsplit(url)
        except ValueError as exc:  # an unbalanced "[" in the host
            options.error("url", f"invalid url {url!r}: {exc}")
            return fallback
        origin = f"{parts.scheme}://{parts.netloc}"
        try:
            if parts.fragment:
                raise ConfigValueError(f"{url!r}: a fragment is not allowed")
            scheme, host, port, normal = parse_endpoint_url(origin)
        except ConfigValueError as exc:
            # The endpoint parser names the origin it was given: name the whole url.
            message = str(exc).replace("invalid endpoint", "invalid url")
            options.error("url", message.replace(repr(origin), repr(url)))
            return fallback
        path = parts.path or "/"
        target = f"{path}?{parts.query}" if parts.query else path
        if any(c in target for c in " \r\n\x00"):
            options.error("url", f"{self.url!r}: the path must be percent-encoded")
            return fallback
        default_port = 443 if scheme == "https" else 80
        bracketed = f"[{host}]" if ":" in host else host
        host_header = bracketed if port == default_port else f"{bracketed}:{port}"
        return EndpointConfig(normal, scheme, host, port), target.encode("latin-1"), host_header

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

    def _tls_context(self, options: Options) -> tuple[ssl.SSLContext | None, str | None]:
        tls_options = options.nested("tls", ("ca", "verify", "sni"))
        tls = UpstreamTls()
        if tls_options is not None:
            ca = tls_options.optional_string("ca")
            if ca is not None and (problem := ca_bundle_problem(ca)) is not None:
                tls_options.error("ca", problem)
                ca = None
            tls = UpstreamTls(
                ca=ca,
                verify=tls_options.boolean("verify", True),
                sni=tls_options.optional_string("sni"),
            )
            if self.endpoint.scheme != "https":
                options.error("tls", "only applies to an https:// url")
        if self.endpoint.scheme != "https":
            return None, None
        config = UpstreamConfig(f"forward_auth:{self.name}", (self.endpoint,), tls=tls)
        try:
            context = client_context(config)
        except (OSError, ssl.SSLError) as exc:  # pragma: no cover - the CA was checked above
            options.error("tls", f"cannot load the TLS settings: {exc}")  # (it changed since)
            return None, None
        return context, server_hostname(self.endpoint, config)

    # -- lifecycle -------------------------------------------------------------------
    def identity_headers(self) -> tuple[str, ...]:
        """The headers copied from the auth service's answer (middleware/base.py)."""
        return tuple(self.copy_headers)

    async def start(self) -> None:
        """Create the connection pool to the auth service (needs the running loop)."""
        if self._pool is None:
            self._pool = self._new_pool()

    async def close(self) -> None:
        """Close idle connections to the auth service."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def _new_pool(self) -> UpstreamPool:
        timeout = self.timeout
        return UpstreamPool(
            self.endpoint,
            PoolConfig(wait_timeout=timeout),
            UpstreamTimeouts(connect=timeout, read=timeout),
            self._codec,
            DEFAULT_MAX_HEAD_BYTES,
            tls=self._tls,
            server_hostname=self._server_hostname,
        )

    # -- per request -----------------------------------------------------------------
    async def __call__(self, request: Request, call_next: Handler) -> Response:
        headers = request.headers
        copy = self.copy_headers
        for name in copy:
            headers.popall(name, None)  # only the auth service may set these
        try:
            head = request_head("GET", self._target, self._auth_headers(request, headers))
        except UnsafeHeader as exc:  # set by an earlier middleware (the parser checked ours)
            raise BadRequest(f"cannot send the auth request: {exc}") from None
        status, answer_headers, body, reason = await self._ask(head)
        if 200 <= status < 300:
            for name in copy:
                for value in answer_headers.getall(name, ()):
                    headers.add(name, value)
            return await call_next(request)
        count_auth_failure(self.name, "denied")
        log.debug("%s: auth service answered %d", self.name, status)
        return Response(status, answer_headers, Body.from_bytes(body), reason)

    def _auth_headers(self, request: Request, headers: CIMultiDict[str]) -> list[tuple[str, str]]:
        out = [("Host", self._host)]
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

    async def _ask(self, head: bytes) -> tuple[int, CIMultiDict[str], bytes, str]:
        """Send the auth request; the answer's status, headers, body and reason phrase.

        Raises:
            AuthUnavailable, AuthTimeout, AuthBadResponse: as the module docstring says.
        """
        pool = self._pool
        if pool is None:  # used without the server's start() (a plugin host, a test)
            pool = self._pool = self._new_pool()
        response: Response | None = None
        try:
            async with asyncio.timeout(self.timeout):
                conn = await pool.acquire()
                try:
                    response = await conn.exchange("GET", head, _EMPTY_BODY, b"")
                except StaleConnection:
                    # The keep-alive race: the service closed the idle connection as we
                    # sent on it. A GET without a body is safe to send again.
                    conn = await pool.acquire(fresh=True)
                    response = await conn.exchange("GET", head, _EMPTY_BODY, b"")
                body = await _read_body(response.body)
        except (TimeoutError, UpstreamConnectTimeout, UpstreamTimeout):
            # Ours, or the pool's connect timeout (the same length: whichever fires first).
            self._failed("timeout", response)
            raise AuthTimeout(f"auth service {self.url} did not answer in time") from None
        except (UpstreamConnectError, PoolTimeout) as exc:
            self._failed("unavailable", response)
            raise AuthUnavailable(f"auth service unavailable: {exc.message}") from None
        except ProxyError as exc:  # reset, malformed response
            self._failed("bad_response", response)
            raise AuthBadResponse(f"auth service {self.url}: {exc.message}") from None
        except BaseException:
            if response is not None:
                response.body.discard()  # cancelled (the client left): drop the connection
            raise
        status = response.status
        if body is None:
            if 200 <= status < 300:
                return status, response.headers, b"", response.reason  # the body is not needed
            self._failed("bad_response", None)
            raise AuthBadResponse(
                f"auth service answered {status} with a body over {AUTH_BODY_LIMIT_BYTES} bytes"
            )
        return status, response.headers, body, response.reason

    def _failed(self, reason: str, response: Response | None) -> None:
        if response is not None:
            response.body.discard()  # the rest of it would never be read: close
        count_auth_failure(self.name, reason)


async def _read_body(body: Body) -> bytes | None:
    """The whole body, or None (discarded, the connection closed) when it is larger than
    AUTH_BODY_LIMIT_BYTES."""
    if body.complete:
        data = body.take_all()
    else:
        if body.length is not None and body.length > AUTH_BODY_LIMIT_BYTES:
            body.discard()
            return None
        parts: list[bytes] = []
        size = 0
        while chunk := await body.read():
            size += len(chunk)
            if size > AUTH_BODY_LIMIT_BYTES:
                body.discard()
                return None
            parts.append(chunk)
        data = b"".join(parts)
    return data if len(data) <= AUTH_BODY_LIMIT_BYTES else None
