"""The exchange model shared by every front end, the middleware chain and forwarding.

`Request` and `Response` never know which protocol carried them (CONTRIBUTING.md, style).
Their bodies are `Body` streams (proxy/core/body.py), their context the `Exchange`
(proxy/core/exchange.py).
"""

from __future__ import annotations

from time import perf_counter
from typing import TYPE_CHECKING, Protocol

from multidict import CIMultiDict

from proxy.codec.h1serialize import check_headers
from proxy.core.body import Body
from proxy.core.client_cert import ClientCertificate
from proxy.core.exchange import Exchange

if TYPE_CHECKING:
    from yarl import URL

    from proxy.config.model import ListenerConfig

RawHeaders = list[tuple[bytes, bytes]]


class _Message:
    """Headers that stay the parser's (already validated) byte pairs in `raw_headers`
    until something reads `headers`; from then on the CIMultiDict is the only truth and
    `raw_headers` is None. A route with no middleware never pays for the conversion."""

    __slots__ = ("_headers", "raw_headers")

    def _init_headers(self, headers: CIMultiDict[str] | RawHeaders | None) -> None:
        if isinstance(headers, list):
            self.raw_headers: RawHeaders | None = headers
            self._headers: CIMultiDict[str] | None = None
        else:
            self.raw_headers = None
            self._headers = headers if headers is not None else CIMultiDict()

    @property
    def headers(self) -> CIMultiDict[str]:
        """The headers (built from `raw_headers` on first use)."""
        headers = self._headers
        if headers is None:
            assert self.raw_headers is not None
            headers = self._headers = CIMultiDict(
                [(n.decode("latin-1"), v.decode("latin-1")) for n, v in self.raw_headers]
            )
            self.raw_headers = None
        return headers

    @headers.setter
    def headers(self, value: CIMultiDict[str]) -> None:
        self._headers = value
        self.raw_headers = None

    # Header access that keeps raw headers raw. Middleware on the hot path uses these: a
    # message whose headers stay raw is serialized by copying bytes, while reading
    # `headers` builds a CIMultiDict and sends the message down the checked text path.

    def header(self, name: str) -> str | None:
        """The first value of field `name` (case-insensitive), or None."""
        raw = self.raw_headers
        if raw is None:
            assert self._headers is not None
            return self._headers.get(name)
        wanted = name.lower().encode("latin-1")
        for field, value in raw:
            if len(field) == len(wanted) and field.lower() == wanted:
                return value.decode("latin-1")
        return None

    def set_header(self, name: str, value: str) -> None:
        """Replace every `name` field with one `name: value`.

        Raises:
            UnsafeHeader: the name is not a token, or the value holds CR, LF or NUL.
        """
        raw = self.raw_headers
        if raw is None:
            assert self._headers is not None
            self._headers[name] = value
            return
        field = _checked_field(name, value)
        wanted = field[0].lower()
        size = len(wanted)
        kept = [pair for pair in raw if len(pair[0]) != size or pair[0].lower() != wanted]
        kept.append(field)
        self.raw_headers = kept

    def add_header(self, name: str, value: str) -> None:
        """Append a `name: value` field (after any others of that name).

        Raises:
            UnsafeHeader: as `set_header`.
        """
        raw = self.raw_headers
        if raw is None:
            assert self._headers is not None
            self._headers.add(name, value)
            return
        self.raw_headers = [*raw, _checked_field(name, value)]

    def remove_header(self, name: str) -> None:
        """Drop every `name` field."""
        raw = self.raw_headers
        if raw is None:
            assert self._headers is not None
            self._headers.popall(name, None)
            return
        wanted = name.lower().encode("latin-1")
        size = len(wanted)
        for field, _ in raw:
            if len(field) == size and field.lower() == wanted:
                break
        else:
            return  # absent: the list stays as it is (the common case: nothing to strip)
        self.raw_headers = [
            pair for pair in raw if len(pair[0]) != size or pair[0].lower() != wanted
        ]


# Names `_checked_field` found to be tokens (middleware set the same few on every request).
_TOKEN_NAMES: set[str] = set()
_TOKEN_NAMES_MAX = 1024


def _checked_field(name: str, value: str) -> tuple[bytes, bytes]:
    if name not in _TOKEN_NAMES or "\r" in value or "\n" in value or "\x00" in value:
        check_headers([(name, value)])  # raises for an unsafe one
        if len(_TOKEN_NAMES) < _TOKEN_NAMES_MAX:
            _TOKEN_NAMES.add(name)
    return name.encode("latin-1"), value.encode("latin-1")


class Upgraded(Protocol):
    """An upstream connection that answered 101 and waits to become a tunnel."""

    def close(self) -> None: ...


class Request(_Message):
    """One request, as every front end produces it.

    `target` is the request target in canonical origin-form (proxy/core/canonical.py), what
    routing matches and the upstream gets unless a rewrite changes it; `path` and `query`
    are its halves as text. `raw_target` is the origin-form target as the client sent it
    (a route with `forward_raw_path` forwards that). Headers: see `_Message`.
    """

    __slots__ = (
        "_url",
        "body",
        "client",
        "client_cert",
        "consumer",
        "exchange",
        "host",
        "http_version",
        "keep_alive",
        "listener",
        "method",
        "path",
        "peer",
        "peer_trusted",
        "query",
        "raw_target",
        "request_id",
        "scheme",
        "target",
        "tls_version",
        "upgrade",
    )

    def __init__(
        self,
        method: str,
        target: bytes,
        headers: CIMultiDict[str] | RawHeaders,
        body: Body,
        *,
        http_version: str = "1.1",
        client: tuple[str, int] = ("", 0),
        scheme: str = "http",
        keep_alive: bool = True,
        host: str | None = None,
        upgrade: str = "",
        path: str | None = None,
        query: str = "",
        raw_target: bytes | None = None,
        tls_version: str = "",
        listener: ListenerConfig | None = None,
        client_cert: ClientCertificate | None = None,
    ) -> None:
        self.method = method
        self.target = target
        self.raw_target = target if raw_target is None else raw_target
        if path is None:  # not split by the front end (a request built by hand)
            raw_path, _, raw_query = target.partition(b"?")
            path, query = raw_path.decode("latin-1"), raw_query.decode("latin-1")
        self.path = path
        self.query = query
        self._init_headers(headers)
        self.body = body
        self.http_version = http_version
        # The client's address: the connection's peer until proxy/core/client_ip.py decides
        # otherwise (`client_ip:`), which every consumer of "the client" reads. `peer` is
        # the address the request came from (the TCP peer, or the source a believed PROXY
        # header gave), and `peer_trusted` whether it is one of `client_ip.trusted_proxies`
        # (what it forwarded is then kept, proxy/core/headers.py).
        self.client = client
        self.peer = client
        self.peer_trusted = False
        self.scheme = scheme
        self.tls_version = tls_version  # the client connection's: "TLSv1.3", "" without TLS
        # The listener the request came in on (None for a request built by hand): what
        # it says about every request on it (`redirect_https`) is applied by the dispatcher.
        self.listener = listener
        # The client certificate the connection verified (`tls.client_auth`), or None.
        self.client_cert = client_cert
        self.keep_alive = keep_alive
        self.host = host if host is not None else self.headers.get("host", "")
        # "websocket" when the client asks for a tunnel (HTTP/1.1 Upgrade, or HTTP/2's
        # extended CONNECT, RFC 8441); "" for an ordinary request.
        self.upgrade = upgrade
        self.request_id = ""
        self.consumer = ""  # who an auth middleware found the caller to be
        # The exchange's context: route, endpoint, timings (proxy/exchange/dispatch.py).
        self.exchange = Exchange(perf_counter())
        self._url: URL | None = None

    def set_target(self, target: bytes) -> None:
        """Replace the request target, keeping `path`, `query`, `raw_target` and `url` in
        step (what a middleware that edits the path or the query string calls). A new
        query on the same path keeps the client's own spelling of the path in
        `raw_target`; a new path replaces it."""
        raw_path, question, raw_query = target.partition(b"?")
        path = raw_path.decode("latin-1")
        if path == self.path:
            raw_path = self.raw_target.partition(b"?")[0]
            self.raw_target = raw_path + question + raw_query
        else:
            self.raw_target = target
        self.target = target
        self.path = path
        self.query = raw_query.decode("latin-1")
        self._url = None

    def copy_head(
        self,
        headers: CIMultiDict[str] | RawHeaders | None = None,
        body: Body | None = None,
    ) -> Request:
        """A new request that the gateway sends on this one's behalf (a route mirror's
        copy, a cache's revalidation in the background), with `body` (or none).

        Kept: the method and target (`target`, `raw_target`, `path`, `query`), `host`,
        `http_version`, `scheme`, who sent it (`client`, `peer`, `peer_trusted`,
        `tls_version`, `client_cert`, `listener`), `request_id`, `consumer`, and the
        route it matched (`exchange.route_name`, a copy of `exchange.params`). The header
        fields are `headers` when given (taken as they are, not copied), else a copy of
        this request's: raw pairs stay raw.

        Not kept: the body, `upgrade` (a copy is never a tunnel), `keep_alive` (the
        client connection's), and the rest of the exchange's record: the copy's context
        is its own, arrived now, with no endpoint, retries or trace yet.
        """
        if headers is None:
            raw = self.raw_headers
            headers = list(raw) if raw is not None else CIMultiDict(self.headers)
        copy = Request(
            self.method,
            self.target,
            headers,
            body if body is not None else Body.from_bytes(b""),
            http_version=self.http_version,
            client=self.client,
            scheme=self.scheme,
            host=self.host,
            path=self.path,
            query=self.query,
            raw_target=self.raw_target,
            tls_version=self.tls_version,
            listener=self.listener,
            client_cert=self.client_cert,
        )
        copy.peer = self.peer
        copy.peer_trusted = self.peer_trusted
        copy.request_id = self.request_id
        copy.consumer = self.consumer
        exchange = copy.exchange
        exchange.route_name = self.exchange.route_name
        exchange.params = dict(self.exchange.params)
        return copy

    def get_headers(self) -> CIMultiDict[str]:
        """`headers`, as a method (routing asks for headers only when it needs them)."""
        return self.headers

    @property
    def url(self) -> URL:
        """The target parsed as a yarl.URL (built on first use: most requests never ask)."""
        if self._url is None:
            from yarl import URL

            self._url = URL.build(
                scheme=self.scheme,
                authority=self.host or "localhost",
                path=self.path,
                query_string=self.query,
                encoded=True,
            )
        return self._url

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.target!r} HTTP/{self.http_version}>"


class Response(_Message):
    """One response, as forwarding or a local reply produces it.

    As with Request, an upstream's headers stay raw bytes (`raw_headers`, hop-by-hop
    fields already removed) until something reads `headers`. Framing headers
    (Content-Length, Transfer-Encoding, Connection) are never here: each front end
    derives them from the body.
    """

    __slots__ = ("body", "reason", "status", "upgrade")

    def __init__(
        self,
        status: int,
        headers: CIMultiDict[str] | RawHeaders | None = None,
        body: Body | None = None,
        reason: str = "",
    ) -> None:
        self.status = status
        self._init_headers(headers)
        self.body = body if body is not None else Body.from_bytes(b"")
        self.reason = reason
        # A 101 from the upstream: its connection, waiting to become a tunnel
        # (proxy/websocket/upstream.py's UpstreamHandshake).
        self.upgrade: Upgraded | None = None

    def __repr__(self) -> str:
        return f"<Response {self.status}>"
