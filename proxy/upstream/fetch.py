"""The gateway's own HTTP client: one request to an origin, sent over the same pools,
codec, TLS and connect-error mapping as forwarding. The active health checks,
`forward_auth` and the JWKS refresh use it, and so may a plugin (it is part of `proxy`,
the plugin surface).

    client = HttpClient(parse_url("http://auth:9000/check"), timeout_s=2.0)
    answer = await client.fetch("GET", headers=[("Authorization", token)], max_body=65536)
    answer.status, answer.headers, answer.body       # body None: larger than max_body
    client.close()

    answer = await fetch("GET", "https://idp/keys", timeout_s=5.0)   # one connection, closed after

- HTTP/1.1 goes through an `UpstreamPool` (pool.py, connections of h1.py) with the
  configured codec (httptools or h11); HTTP/2 through an `H2Pool` (h2/pool.py): h2c with
  prior knowledge on http://, h2 chosen by ALPN on https://. Connects and TLS handshakes
  are transport.py's; the TLS context is tls.py's (`tls_context`).
- An `HttpClient` keeps its HTTP/1.1 connections alive and reuses them (LIFO). When the
  other side closed an idle connection just as the request went out (the keep-alive race,
  `StaleConnection`), the request is sent once more on a fresh connection: a caller never
  sees that error. The one-shot `fetch` says `Connection: close` on a connection of its
  own and closes it after.
- `timeout_s` bounds the whole request: waiting for a pooled connection, connect, TLS
  handshake, the response head and its body.
- The response body is read whole when it has at most `max_body` bytes. A larger one
  comes back as `body` None; if it was still arriving it is not waited for and its
  connection is closed (`max_body=0`: only the status and headers are wanted).

Errors are ProxyErrors, as for forwarding: UpstreamConnectError (refused, unreachable, the
name did not resolve, TLS refused), UpstreamConnectTimeout, PoolTimeout, UpstreamTimeout
(no whole answer within `timeout_s`), UpstreamReset (closed before the answer ended),
UpstreamProtocolError (not an HTTP answer). A request that cannot be written (a header
value with CR or LF, a framing field given by the caller) is a ValueError (UnsafeHeader),
raised before anything is sent.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from multidict import CIMultiDict

from proxy.codec.h1 import resolve_codec
from proxy.codec.h1serialize import UnsafeHeader, check_headers, request_head
from proxy.config.model import DEFAULT_MAX_HEAD_BYTES
from proxy.config.upstream_model import (
    EndpointConfig,
    PoolConfig,
    UpstreamConfig,
    UpstreamTimeouts,
    UpstreamTls,
)
from proxy.config.values import ConfigValueError, parse_endpoint_url
from proxy.core.body import Body
from proxy.core.errors import UpstreamTimeout
from proxy.core.models import RawHeaders, Response
from proxy.upstream.h1 import StaleConnection
from proxy.upstream.h2.pool import H2Pool
from proxy.upstream.pool import UpstreamPool
from proxy.upstream.tls import client_context, server_hostname

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 1024 * 1024
# Methods whose request says its (possibly empty) body's length (RFC 9110 section 8.6).
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# The client writes these itself: a caller's copy would break the framing or the pool.
_CLIENT_FIELDS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class FetchUrl:
    """Where a request goes: the origin to connect to, the request target, and the
    authority sent as Host (HTTP/1.1) or :authority (HTTP/2)."""

    scheme: str  # http or https
    host: str  # to connect to: a name or an address (IPv6 without brackets)
    port: int
    target: bytes = b"/"  # path and query
    authority: str = ""  # "": host, and the port unless it is the scheme's default

    @property
    def origin(self) -> str:
        """`scheme://host:port`, the port always written (logs, repr)."""
        return f"{self.scheme}://{_bracketed(self.host)}:{self.port}"

    @property
    def host_header(self) -> str:
        """The authority sent with the request."""
        if self.authority:
            return self.authority
        if self.port == _DEFAULT_PORTS.get(self.scheme):
            return _bracketed(self.host)
        return f"{_bracketed(self.host)}:{self.port}"


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def parse_url(url: str) -> FetchUrl:
    """An http:// or https:// URL with an optional path and query (no credentials, no
    fragment). The host is lower-cased; the port is the scheme's default when absent.

    Raises:
        ConfigValueError: anything else, with the reason.
    """
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # an unbalanced "[" in the host
        raise ConfigValueError(f"invalid url {url!r}: {exc}") from None
    origin = f"{parts.scheme}://{parts.netloc}"
    if parts.fragment:
        raise ConfigValueError(f"{url!r}: a fragment is not allowed")
    try:
        scheme, host, port, _ = parse_endpoint_url(origin)
    except ConfigValueError as exc:
        # The endpoint parser names the origin it was given: name the whole url.
        message = str(exc).replace("invalid endpoint", "invalid url")
        raise ConfigValueError(message.replace(repr(origin), repr(url))) from None
    path = parts.path or "/"
    target = f"{path}?{parts.query}" if parts.query else path
    unsafe = ConfigValueError(f"{url!r}: the path must be percent-encoded")
    if any(c in target for c in " \r\n\x00"):
        raise unsafe
    try:
        return FetchUrl(scheme, host, port, target.encode("latin-1"))
    except UnicodeEncodeError:
        raise unsafe from None


@dataclass(frozen=True, slots=True)
class FetchResponse:
    """An answer, read whole: `body` is None when it was larger than `max_body`.
    `headers` are the end-to-end ones (framing and hop-by-hop fields are
    removed, as for a forwarded response)."""

    status: int
    headers: CIMultiDict[str]
    body: bytes | None
    reason: str = ""


def tls_context(
    ca: str | None = None, *, verify: bool = True, http2: bool = False
) -> ssl.SSLContext:
    """A client TLS context as an upstream's (tls.py): certificates checked against `ca`
    (the system store when None) unless `verify` is False, TLS 1.2 at least, ALPN
    offering h2 or http/1.1. Build it at config load: it reads `ca`.

    Raises:
        OSError, ssl.SSLError: `ca` cannot be read or holds no certificate.
    """
    endpoint = EndpointConfig("https://fetch:443", "https", "fetch", 443)
    config = UpstreamConfig(
        "fetch", (endpoint,), protocol="h2" if http2 else "http1", tls=UpstreamTls(ca, verify)
    )
    context = client_context(config)
    assert context is not None  # the endpoint is https
    return context


async def read_body(body: Body, limit: int) -> bytes | None:
    """The whole of `body`, or None when it is larger than `limit` bytes: it is then
    discarded unread (which closes the connection it was coming on)."""
    if body.complete:
        data = body.take_all()
        return data if len(data) <= limit else None
    length = body.length
    if (length is not None and length > limit) or (length is None and limit == 0):
        body.discard()
        return None
    parts: list[bytes] = []
    size = 0
    while chunk := await body.read():
        size += len(chunk)
        if size > limit:
            body.discard()
            return None
        parts.append(chunk)
    return b"".join(parts)


class HttpClient:
    """Requests to one origin over a pool of its own (see the module docstring).

    Construct it at config load (it touches no event loop); the pool is made by `open`
    or the first `fetch`, in the running loop, and `close` drops it (a later `fetch`
    makes a new one). `tls`: the context for an https origin (`tls_context()` when None);
    `sni`: the name sent and checked against the certificate (the host when None).
    `keep_alive` False: every request on a fresh connection, with `Connection: close`.
    """

    def __init__(
        self,
        url: FetchUrl,
        *,
        timeout_s: float,
        tls: ssl.SSLContext | None = None,
        sni: str | None = None,
        http2: bool = False,
        keep_alive: bool = True,
        codec: str = "auto",
        max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES,
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.http2 = http2
        self.keep_alive = keep_alive
        self._endpoint = EndpointConfig(url.origin, url.scheme, url.host, url.port)
        https = url.scheme == "https"
        self.tls = (tls or tls_context(http2=http2)) if https else None
        config = UpstreamConfig("fetch", (self._endpoint,), tls=UpstreamTls(sni=sni))
        self.server_hostname = server_hostname(self._endpoint, config)
        self._codec = resolve_codec(codec)
        self._max_head_bytes = max_head_bytes
        self._pool: UpstreamPool | H2Pool | None = None

    def __repr__(self) -> str:
        return f"<HttpClient {self.url.origin} pool={self._pool!r}>"

    def open(self) -> None:
        """Make the pool now (in the running loop); nothing when it is there."""
        if self._pool is None:
            timeout_s = self.timeout_s
            timeouts = UpstreamTimeouts(connect=timeout_s, read=timeout_s)
            limits = PoolConfig(wait_timeout=timeout_s)
            tls, name = self.tls, self.server_hostname
            if self.http2:
                self._pool = H2Pool(self._endpoint, limits, timeouts, tls=tls, server_hostname=name)
            else:
                self._pool = UpstreamPool(
                    self._endpoint,
                    limits,
                    timeouts,
                    self._codec,
                    self._max_head_bytes,
                    tls=tls,
                    server_hostname=name,
                )

    def close(self) -> None:
        """Close the idle connections and drop the pool (busy ones close when done)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    async def fetch(
        self,
        method: str = "GET",
        target: bytes | None = None,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        *,
        timeout_s: float | None = None,
        max_body: int = DEFAULT_MAX_BODY_BYTES,
    ) -> FetchResponse:
        """Send `method` for `target` (the url's when None) with `headers` (Host is added
        unless given) and `body`, and read the answer.

        Raises:
            ValueError: the request cannot be written (UnsafeHeader), nothing was sent.
            ProxyError: as the module docstring says; never StaleConnection.
        """
        seconds = self.timeout_s if timeout_s is None else timeout_s
        path = self.url.target if target is None else target
        fields = list(headers)
        if self.http2:
            request: bytes | RawHeaders = self._h2_fields(method, path, fields, body)
        else:
            request = self._h1_head(method, path, fields, body)
        self.open()
        pool = self._pool
        assert pool is not None
        response: Response | None = None
        try:
            async with asyncio.timeout(seconds):
                if isinstance(pool, H2Pool):
                    assert isinstance(request, list)
                    response = await pool.exchange(request, Body.from_bytes(b""), body)
                else:
                    assert isinstance(request, bytes)
                    response = await self._exchange_h1(pool, method, request, body)
                data = await read_body(response.body, max_body)
        except TimeoutError:
            if response is not None:
                response.body.discard()  # the rest will never be read: close
            raise UpstreamTimeout(f"{self.url.origin} did not answer within {seconds:g}s") from None
        except BaseException:
            if response is not None:
                response.body.discard()  # failed or cancelled mid-body: close
            raise
        return FetchResponse(response.status, response.headers, data, response.reason)

    async def _exchange_h1(
        self, pool: UpstreamPool, method: str, head: bytes, body: bytes
    ) -> Response:
        unused = Body.from_bytes(b"")  # the body goes out with the head, from `body`
        if self.keep_alive:
            conn = await pool.acquire()
            try:
                return await conn.exchange(method, head, unused, body)
            except StaleConnection:
                # The keep-alive race: the other side closed the idle connection as we
                # sent on it, before reading anything. The body is in memory: send again.
                log.debug("%r: reused connection was closed; retrying on a fresh one", self)
        conn = await pool.acquire(fresh=True)
        return await conn.exchange(method, head, unused, body)

    def _h1_head(
        self, method: str, target: bytes, fields: list[tuple[str, str]], body: bytes
    ) -> bytes:
        _check_fields(fields)
        if not any(name.lower() == "host" for name, _ in fields):
            fields.insert(0, ("Host", self.url.host_header))
        if body or method in _BODY_METHODS:
            fields.append(("Content-Length", str(len(body))))
        if not self.keep_alive:
            fields.append(("Connection", "close"))
        return request_head(method, target, fields)

    def _h2_fields(
        self, method: str, target: bytes, fields: list[tuple[str, str]], body: bytes
    ) -> RawHeaders:
        _check_fields(fields)
        check_headers(fields)
        if b" " in target or b"\r" in target or b"\n" in target or b"\x00" in target:
            raise UnsafeHeader("unsafe request target")
        authority = self.url.host_header
        rest: RawHeaders = []
        for name, value in fields:
            if name.lower() == "host":
                authority = value  # RFC 9113 section 8.3.1: :authority, not Host
            else:
                rest.append((name.lower().encode("latin-1"), value.encode("latin-1")))
        if body or method in _BODY_METHODS:
            rest.append((b"content-length", str(len(body)).encode("ascii")))
        pseudo: RawHeaders = [
            (b":method", method.encode("ascii")),
            (b":scheme", self.url.scheme.encode("ascii")),
            (b":authority", authority.encode("latin-1")),
            (b":path", target),
        ]
        return pseudo + rest


def _check_fields(fields: list[tuple[str, str]]) -> None:
    for name, _ in fields:
        if name.lower() in _CLIENT_FIELDS:
            raise UnsafeHeader(f"{name!r} is written by the client itself")


async def fetch(
    method: str,
    url: FetchUrl | str,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    timeout_s: float,
    max_body: int = DEFAULT_MAX_BODY_BYTES,
    tls: ssl.SSLContext | None = None,
    sni: str | None = None,
    http2: bool = False,
    codec: str = "auto",
    max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES,
) -> FetchResponse:
    """One request on a connection of its own, closed after the answer (HTTP/1.1 says
    `Connection: close`); the arguments are `HttpClient`'s and its `fetch`'s.

    Raises:
        ValueError: `url` is not an http(s) URL (ConfigValueError), or the request cannot
            be written (UnsafeHeader).
        ProxyError: as the module docstring says.
    """
    where = parse_url(url) if isinstance(url, str) else url
    client = HttpClient(
        where,
        timeout_s=timeout_s,
        tls=tls,
        sni=sni,
        http2=http2,
        keep_alive=False,
        codec=codec,
        max_head_bytes=max_head_bytes,
    )
    try:
        return await client.fetch(method, None, headers, body, max_body=max_body)
    finally:
        client.close()
