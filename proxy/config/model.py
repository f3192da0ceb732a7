"""The configuration model: the frozen, typed objects that routes.yaml becomes (those
of `upstreams` are in proxy/config/upstream_model.py).

Runtime code only ever sees these objects: everything is validated once, at load time
(CONTRIBUTING.md, style), by `proxy.config.load`. Durations are float seconds, sizes are int bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from proxy.config.upstream_model import UpstreamConfig
from proxy.core.addresses import Network

DEFAULT_MAX_HEAD_BYTES = 32 * 1024
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 60.0
DEFAULT_KEEPALIVE_TIMEOUT_S = 75.0
DEFAULT_GRACE_PERIOD_S = 30.0
# Request bodies up to this size are read whole before an upstream connection is taken.
DEFAULT_REQUEST_BUFFER_BYTES = 1024 * 1024
# A route's `mirror` (proxy/exchange/mirror.py, docs/traffic.md).
DEFAULT_MIRROR_MAX_BODY = 64 * 1024
DEFAULT_MIRROR_MAX_IN_FLIGHT = 64
DEFAULT_MIRROR_TIMEOUT_S = 5.0
# HTTP/2 defences (see Http2Config for the attack each one stops).
DEFAULT_H2_MAX_CONCURRENT_STREAMS = 100
DEFAULT_H2_INITIAL_WINDOW_BYTES = 1024 * 1024
DEFAULT_H2_MAX_RESETS_PER_SECOND = 200
DEFAULT_H2_MAX_CONTROL_FRAMES_PER_SECOND = 500


LOG_FORMATS = ("text", "json")  # `logging.format`, `--log-format`


ACME_CHALLENGES = ("http-01", "tls-alpn-01")  # `tls.acme.challenge`
DEFAULT_ACME_RENEW_BEFORE_S = 30 * 86400.0


@dataclass(frozen=True, slots=True)
class AcmeConfig:
    """`listeners[i].tls.acme`: a certificate per name of `domains`, obtained from the
    ACME server (RFC 8555) whose directory URL is `directory`, kept in `storage` and
    renewed `renew_before` its expiry (proxy/acme/). `challenge` is how the names are
    proved: http-01 on the plaintext listeners, tls-alpn-01 on this one. `ca`: a PEM
    bundle that verifies the directory's HTTPS instead of the system's roots."""

    directory: str
    domains: tuple[str, ...]
    storage: str
    email: str | None = None
    challenge: str = ACME_CHALLENGES[0]
    ca: str | None = None
    renew_before: float = DEFAULT_ACME_RENEW_BEFORE_S

    def same_settings(self, other: AcmeConfig) -> bool:
        """Whether `other` obtains a name the same way (its `domains` aside)."""
        return replace(self, domains=()) == replace(other, domains=())


@dataclass(frozen=True, slots=True)
class TlsCertificate:
    """One certificate of a TLS listener: its PEM chain (leaf first) and private key."""

    cert: str
    key: str


CLIENT_AUTH_MODES = ("require", "optional")


@dataclass(frozen=True, slots=True)
class ClientAuth:
    """`listeners[i].tls.client_auth`: clients are asked for a certificate, verified
    against the PEM bundle `ca`. `require`: a handshake without a valid one fails.
    `optional`: a client may send none; one it sends must verify (as nginx's
    `ssl_verify_client optional`)."""

    ca: str
    mode: str = "require"  # require | optional


@dataclass(frozen=True, slots=True)
class ListenerTls:
    """`listeners[i].tls`: the certificates (PEM files, re-read on reload), chosen by the
    name the client sends (SNI), the first for a client that sends none or an unknown
    one (proxy/frontend/certificates.py). ALPN offers h2 and http/1.1; TLS 1.2 is the
    oldest version accepted unless `min_version` asks for 1.3."""

    certificates: tuple[TlsCertificate, ...]
    min_version: str = "1.2"
    client_auth: ClientAuth | None = None  # None: no client certificate is asked for
    acme: AcmeConfig | None = None  # certificates obtained for `acme.domains` (proxy/acme/)


REDIRECT_STATUSES = (301, 302, 303, 307, 308)
# The path prefix of RFC 8555 HTTP-01 challenges, which `redirect_https` leaves alone.
ACME_CHALLENGE_PREFIX = "/.well-known/acme-challenge/"


@dataclass(frozen=True, slots=True)
class HttpsRedirect:
    """`listeners[i].redirect_https`: every request on this plaintext listener is answered
    with a redirect to the same host and target over HTTPS on `port` (left out of the URL
    when 443), except ACME HTTP-01 challenges, which go on to be answered."""

    port: int = 443
    status: int = 308  # keeps the method and body, as 301 does not promise to


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """One client-facing socket (`listeners[i]`). Plaintext listeners speak HTTP/1.1 and
    h2c with prior knowledge (told apart by the connection preface); TLS listeners pick
    h2 or HTTP/1.1 by ALPN. `http2: false` turns HTTP/2 off on this listener.
    `proxy_protocol: true`: every connection must begin with a PROXY protocol header (v1
    or v2), read before TLS or HTTP; see proxy/frontend/listener.py."""

    host: str
    port: int
    name: str  # "listeners[0]" unless given with `name:`; used as a metrics label
    tls: ListenerTls | None = None
    http2: bool = True
    proxy_protocol: bool = False
    redirect_https: HttpsRedirect | None = None
    # Where it is written (reload errors name it); not part of what the listener is.
    line: int = field(default=1, compare=False)


CLIENT_IP_SOURCES = ("x-forwarded-for", "forwarded", "proxy_protocol")


@dataclass(frozen=True, slots=True)
class ClientIpConfig:
    """`client_ip`: who is believed about the client's address (proxy/core/client_ip.py).
    `trusted_proxies` are the proxies in front of the gateway; `source` is what they
    tell: `x-forwarded-for` (the rightmost untrusted entry), `forwarded` (RFC 7239
    `for=`) or `proxy_protocol` (the PROXY header of `proxy_protocol` listeners)."""

    trusted_proxies: tuple[Network, ...]
    source: str = "x-forwarded-for"


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The admin listener (`admin.bind`): /metrics, /healthz, /readyz, /config and
    POST /reload. Served by the supervising parent, never by a worker, so it answers
    for the whole gateway (metrics summed over the workers)."""

    host: str
    port: int
    # `token`: when set, every path but /healthz and /readyz needs
    # `Authorization: Bearer <token>` (metrics/admin_access.py).
    token: str | None = None
    # `hosts`: names the Host header may carry besides IP literals and localhost (DNS
    # rebinding: a browser sends the attacker's name, which is not listed).
    hosts: tuple[str, ...] = ()
    line: int = field(default=1, compare=False)  # where `admin.bind` is written


DEFAULT_RELOAD_WATCH_INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True)
class ReloadConfig:
    """`reload`: besides SIGHUP and `gatehouse reload`, the config file is watched (its
    size, mtime and inode polled every `interval`) and reloaded once a change has held
    still for one interval, so a half-written file is not loaded."""

    watch: bool = True
    interval: float = DEFAULT_RELOAD_WATCH_INTERVAL_S


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """`metrics`: `enabled: false` turns off the per-request counting on the data path
    (for measuring what it costs); /metrics then shows only what needs no counting."""

    enabled: bool = True


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """`tracing`: W3C trace propagation always happens; with `otlp_endpoint`, sampled
    exchanges are exported as OpenTelemetry spans (proxy/core/tracing.py,
    metrics/traces.py)."""

    otlp_endpoint: str | None = None  # the collector's base URL (spans go to /v1/traces)
    sample_ratio: float = 1.0  # of traces that start here (or all, without parent_based)
    parent_based: bool = True  # follow the caller's sampled flag when it sends one
    service_name: str = "gatehouse"  # the `service.name` resource attribute
    headers: tuple[tuple[str, str], ...] = ()  # sent with every export (credentials)


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """`match.headers[i]`: exactly one of `value` (exact), `regex` (full match), or neither
    (the header must be present). `name` is lower-cased (header names are case-insensitive)."""

    name: str
    value: str | None = None
    regex: str | None = None


@dataclass(frozen=True, slots=True)
class QueryMatch:
    """`match.query[i]`: same rules as HeaderMatch, on a query parameter."""

    name: str
    value: str | None = None
    regex: str | None = None


@dataclass(frozen=True, slots=True)
class MatchConfig:
    """`routes[i].match`. At most one of path / path_prefix / path_regex."""

    host: str | None = None  # "api.example.com" or "*.example.com", lower-cased
    path: str | None = None
    path_prefix: str | None = None
    path_regex: str | None = None  # full match, named groups allowed
    methods: tuple[str, ...] | None = None  # upper-cased
    headers: tuple[HeaderMatch, ...] = ()
    query: tuple[QueryMatch, ...] = ()


@dataclass(frozen=True, slots=True)
class RewriteConfig:
    """`routes[i].rewrite`: applied to the path in this order: regex, strip_prefix,
    add_prefix. `host` replaces the Host header (preserved when None)."""

    strip_prefix: str | None = None
    add_prefix: str | None = None
    regex: str | None = None
    replacement: str | None = None  # with regex; `\\g<name>` / `\\1` references
    host: str | None = None


@dataclass(frozen=True, slots=True, eq=False)
class MiddlewareSpec:
    """One middleware instance: `middleware.NAME` (shared by every chain naming it) or an
    entry written inline in a chain (named after its type)."""

    name: str  # the metrics label and log name
    type: str  # as written: a built-in name, `package.module:Factory` or an entry point
    instance: Any  # what the type's factory built from the options (middleware/base.py)
    # The options as written (canonical YAML): a reload keeps the running instance, and
    # its state (rate-limit tables, key caches, connections), when name, type and this
    # are unchanged.
    options: str = ""
    line: int = 1  # where the instance is written: errors starting it name it


@dataclass(frozen=True, slots=True)
class WebSocketConfig:
    """`routes[i].websocket`: whether the route tunnels WebSocket upgrades (HTTP/1.1
    Upgrade and HTTP/2 extended CONNECT), and the tunnels' deadlines. On by default for
    routes whose upstream speaks HTTP/1.1 (the upstream hop is an HTTP/1.1 Upgrade);
    upgrade requests on a route without it get 403."""

    enabled: bool = True
    idle_timeout: float | None = None  # no byte either way for this long: 1001, closed
    max_duration: float | None = None  # open for this long: 1001, closed


# A redirect's `to`, parsed (proxy/config/values.py, parse_redirect_template): literal
# text, and the names of the placeholders between them, in order.
RedirectTemplate = tuple[tuple[str, bool], ...]  # (text, True for a placeholder name)


@dataclass(frozen=True, slots=True)
class RedirectConfig:
    """`routes[i].redirect`: the route answers with `status` and a Location made from
    the template `to` (`{scheme}`, `{host}`, `{port}`, `{path}`, `{query}`, `{uri}`,
    and the named groups of the route's `path_regex`)."""

    to: str
    template: RedirectTemplate
    status: int = 302


@dataclass(frozen=True, slots=True)
class RespondConfig:
    """`routes[i].respond`: the route answers itself with `status`, `body` and `headers`
    (a maintenance page, a health stub, robots.txt); no upstream is involved."""

    status: int = 200
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class SplitSide:
    """One side of a weighted split: an upstream and its share (`weight` of the sum)."""

    upstream: str
    weight: int


@dataclass(frozen=True, slots=True)
class SplitConfig:
    """A route's `upstream: {split: [...], sticky: ...}` (proxy/exchange/split.py): the
    sides in file order; with `sticky_cookie` or `sticky_header`, a request carrying that
    value goes to the side its hash falls on, others take turns by weight."""

    sides: tuple[SplitSide, ...]
    sticky_cookie: str | None = None
    sticky_header: str | None = None  # lower case


@dataclass(frozen=True, slots=True)
class MirrorConfig:
    """A route's `mirror` (proxy/exchange/mirror.py): a copy of `percent` of its
    forwarded requests goes to `upstream`, whose answers are read and dropped."""

    upstream: str
    percent: float = 100.0
    max_body: int = DEFAULT_MIRROR_MAX_BODY  # a larger body is not copied
    max_in_flight: int = DEFAULT_MIRROR_MAX_IN_FLIGHT  # copies beyond it are dropped
    timeout: float = DEFAULT_MIRROR_TIMEOUT_S  # the whole copy's exchange


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """`routes[i]`. Exactly one of `upstream`, `redirect` and `respond` says what
    answers; `upstream` is "" for a route that answers itself. A split route's
    `upstream` is its first side's (`split` has them all)."""

    name: str
    match: MatchConfig
    upstream: str
    rewrite: RewriteConfig = field(default_factory=RewriteConfig)
    max_body_size: int | None = None  # None: the server-wide limit applies
    websocket: WebSocketConfig = field(default_factory=WebSocketConfig)
    middleware: tuple[MiddlewareSpec, ...] = ()  # after global_middleware, in order
    # Forward the path as the client sent it rather than in canonical form (for
    # upstreams that need the raw bytes); routing still uses the canonical form.
    forward_raw_path: bool = False
    # `request_buffering.max_size`: a request body up to this size is read whole before
    # an upstream connection is taken, so a slow client holds only its own socket (as
    # nginx's proxy_request_buffering); a larger one streams once this much has come.
    # None (`request_buffering: false`): bodies stream from the first byte (big
    # uploads, client-streaming RPCs). gRPC requests always stream.
    request_buffering: int | None = DEFAULT_REQUEST_BUFFER_BYTES
    index: int = 0  # position in the file: ties in specificity go to the earlier route
    redirect: RedirectConfig | None = None
    respond: RespondConfig | None = None
    split: SplitConfig | None = None  # `upstream: {split: ...}`
    mirror: MirrorConfig | None = None


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """`limits`: server-wide defences, each mapped to one status (docs/errors.md)."""

    max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES  # 431
    max_body_size: int | None = None  # 413; None = unlimited
    header_timeout: float = DEFAULT_HEADER_TIMEOUT_S  # 408
    body_timeout: float = DEFAULT_BODY_TIMEOUT_S  # 408, idle gap between body chunks
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT_S


ESCAPED_SLASH_ACTIONS = ("reject", "unescape", "keep")
UNDERSCORE_ACTIONS = ("drop", "reject", "allow")


@dataclass(frozen=True, slots=True)
class PathNormalization:
    """`path_normalization`: how request paths are put in canonical form before routing
    (proxy/core/canonical.py). `escaped_slashes` decides `%2F`, `%5C` and a raw backslash:
    `reject` (400), `unescape` (`%2F` a separator, `%5C` a literal backslash) or `keep`
    (left encoded); `merge_slashes` folds `//` into `/`, as nginx does."""

    escaped_slashes: str = "reject"  # reject | unescape | keep
    merge_slashes: bool = True


@dataclass(frozen=True, slots=True)
class Http2Config:
    """`http2`: the HTTP/2 front end's settings and the attacks each one stops.

    - max_concurrent_streams: SETTINGS_MAX_CONCURRENT_STREAMS; a stream beyond it is
      refused (RST_STREAM REFUSED_STREAM, counted with the resets), and beyond twice
      it the connection is closed. Bounds the work one connection can start.
    - max_header_list_size: a request whose decoded header list is larger gets 431 on its
      stream; a block far beyond it (an HPACK bomb) is a connection error (GOAWAY).
    - initial_window_size: per-stream receive window. A window is re-opened only after
      the data was forwarded, so a slow upstream slows the client (bounded memory).
    - max_resets_per_second: streams reset per second (cancelled by the client, or reset
      by us for an error the client made) before GOAWAY ENHANCE_YOUR_CALM: rapid reset
      (CVE-2023-44487) and its provoked-reset variant (CVE-2025-8671).
    - max_control_frames_per_second: SETTINGS, PING and PRIORITY frames (and empty DATA
      frames) per second before GOAWAY ENHANCE_YOUR_CALM: settings/ping floods, which
      cost us work and replies without the client doing any.
    CONTINUATION floods are bounded by h2 itself (64 frames per header block) and by
    max_header_list_size; a frame declared larger than 16 KiB is refused from its header;
    idle connections get GOAWAY after limits.keepalive_timeout; a stream whose request body
    stops coming gets 408, and one whose response the client's window holds back is reset,
    after limits.body_timeout.
    """

    max_concurrent_streams: int = DEFAULT_H2_MAX_CONCURRENT_STREAMS
    max_header_list_size: int = DEFAULT_MAX_HEAD_BYTES
    initial_window_size: int = DEFAULT_H2_INITIAL_WINDOW_BYTES
    max_resets_per_second: int = DEFAULT_H2_MAX_RESETS_PER_SECOND
    max_control_frames_per_second: int = DEFAULT_H2_MAX_CONTROL_FRAMES_PER_SECOND


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated file."""

    listeners: tuple[ListenerConfig, ...]
    upstreams: dict[str, UpstreamConfig]
    routes: tuple[RouteConfig, ...]
    admin: AdminConfig | None = None
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    http2: Http2Config = field(default_factory=Http2Config)
    http1_parser: str = "auto"  # auto | httptools | h11
    workers: int | None = None  # None: one per core
    grace_period: float = DEFAULT_GRACE_PERIOD_S  # `shutdown.grace_period`
    middleware: dict[str, MiddlewareSpec] = field(default_factory=dict)  # named instances
    global_middleware: tuple[MiddlewareSpec, ...] = ()  # before every route's own chain
    reload: ReloadConfig = field(default_factory=ReloadConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    path_normalization: PathNormalization = field(default_factory=PathNormalization)
    # Client header fields whose name holds "_": dropped, refused (400) or passed on.
    # Upstreams such as WSGI and CGI servers fold "_" into "-", so "X_Consumer" would
    # reach them as the "X-Consumer" a middleware sets (nginx drops them too).
    headers_with_underscores: str = "drop"  # drop | reject | allow
    client_ip: ClientIpConfig | None = None  # None: the client is the connection's peer
    # `logging.format`: the process logs as "text" or "json" (--log-format overrides it;
    # read at start, a reload does not change it).
    log_format: str = "text"
    tracing: TracingConfig | None = None  # None: propagation only, no spans
    source: str = "<string>"
    # Start offsets, in the file's text, of the values /config hides by where they are
    # (header values a middleware sends, route matcher values): proxy/config/view.py.
    concealed: frozenset[int] = frozenset()

    def tls_certificates(self) -> list[tuple[str, str]]:
        """(listener name, certificate chain file) of each certificate of each TLS
        listener, in the listeners' order and each listener's."""
        return [
            (item.name, certificate.cert)
            for item in self.listeners
            if item.tls is not None
            for certificate in item.tls.certificates
        ]
