"""The configuration model of `upstreams`: the frozen, typed objects an upstream's
entry becomes (proxy/config/upstream.py reads them; proxy/config/model.py holds the rest
of the file's model, and `Config.upstreams` these).

Like the rest of the model, validated once at load time; durations are float seconds,
sizes int bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_CONNECT_TIMEOUT_S = 2.0
DEFAULT_READ_TIMEOUT_S = 30.0
DEFAULT_POOL_MAX_CONNECTIONS = 256
DEFAULT_POOL_MAX_IDLE = 64
# Below the usual upstream keep-alive timeouts (nginx 75 s, Node.js 5 s, gunicorn 2 s is the
# outlier) so that we, not the upstream, normally close an idle connection.
DEFAULT_POOL_IDLE_TIMEOUT_S = 4.0
DEFAULT_POOL_WAIT_TIMEOUT_S = 5.0
DEFAULT_HEALTH_INTERVAL_S = 5.0
DEFAULT_HEALTH_TIMEOUT_S = 1.0
DEFAULT_BASE_EJECTION_S = 30.0
DEFAULT_MAX_EJECTION_S = 300.0
DEFAULT_RETRY_BACKOFF_BASE_S = 0.025
DEFAULT_RETRY_BACKOFF_MAX_S = 0.25
DEFAULT_RETRY_BODY_LIMIT = 64 * 1024


@dataclass(frozen=True, slots=True)
class UpstreamTimeouts:
    """`upstreams.X.timeouts`. `read` bounds the wait for the response head and each gap
    between body chunks (like nginx proxy_read_timeout); there is no total deadline."""

    connect: float = DEFAULT_CONNECT_TIMEOUT_S
    read: float = DEFAULT_READ_TIMEOUT_S


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """`upstreams.X.pool`: per-endpoint connection pool limits."""

    max_connections: int = DEFAULT_POOL_MAX_CONNECTIONS
    max_idle: int = DEFAULT_POOL_MAX_IDLE
    idle_timeout: float = DEFAULT_POOL_IDLE_TIMEOUT_S
    wait_timeout: float = DEFAULT_POOL_WAIT_TIMEOUT_S


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """`upstreams.X.tls`, for https:// endpoints: the server certificate is verified
    against `ca` (a PEM bundle; the system store when None) and `sni` (the endpoint's
    host when None). `verify: false` must be written out to turn verification off.
    `cert`/`key`: the certificate the gateway presents to an upstream that asks for one
    (mutual TLS; both or neither)."""

    ca: str | None = None
    verify: bool = True
    sni: str | None = None
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    """One upstream server: `http://host:port` or `https://host:port`."""

    url: str
    scheme: str
    host: str
    port: int
    weight: int = 1
    # The host name an address came from, when `resolve` expanded one (SNI and the
    # certificate check use it); "" for an endpoint as written.
    name: str = ""


@dataclass(frozen=True, slots=True)
class BalanceConfig:
    """`upstreams.X.balance`: how an endpoint is chosen among the eligible ones.

    - `round_robin`: smooth weighted round robin (nginx's).
    - `least_request`: power of two choices: two endpoints drawn at random (by weight),
      the one with fewer requests in flight wins.
    - `random`: weighted random.
    - `{hash: {header: NAME} | {cookie: NAME} | ip | path}`: consistent hashing of that
      key (a key lacking falls back to round robin), so adding an endpoint moves ~1/N
      of the keys.
    - `{sticky: {cookie: NAME, ttl: DURATION}}`: the gateway sets a cookie naming the
      endpoint it chose and sends later requests carrying it to the same endpoint while
      that one is eligible (round robin otherwise)."""

    policy: str = "round_robin"  # round_robin | least_request | random | hash | sticky
    hash_on: str | None = None  # hash: header | cookie | ip | path
    hash_key: str | None = None  # hash: the header or cookie name
    cookie: str = "gatehouse_sticky"  # sticky: the cookie's name
    cookie_ttl: float | None = None  # sticky: Max-Age; None: a session cookie


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    """`upstreams.X.health_check`: active checks of every endpoint, each `interval`
    (give or take `jitter`, a fraction of it). An endpoint leaves rotation after
    `unhealthy_threshold` failed checks in a row and comes back after `healthy_threshold`
    passed ones. `type: http` GETs `path` and expects a status in `expect`; `type: tcp`
    only connects."""

    type: str = "http"  # http | tcp
    path: str = "/"
    expect: tuple[tuple[int, int], ...] = ((200, 399),)  # inclusive status ranges
    interval: float = DEFAULT_HEALTH_INTERVAL_S
    timeout: float = DEFAULT_HEALTH_TIMEOUT_S
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    jitter: float = 0.1


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """`upstreams.X.outlier`: passive health. An endpoint that fails
    `consecutive_failures` requests in a row (cannot connect, reset, timed out), or
    answers `consecutive_5xx` 5xx in a row (None: 5xx never eject), is ejected for
    `base_ejection` times the number of times it has been ejected (at most
    `max_ejection`). At most `max_ejection_percent` of an upstream's endpoints are out
    at once (the rest keep serving); if no endpoint is left eligible, all are tried
    (panic mode) rather than failing every request."""

    consecutive_failures: int = 5
    consecutive_5xx: int | None = None
    base_ejection: float = DEFAULT_BASE_EJECTION_S
    max_ejection: float = DEFAULT_MAX_EJECTION_S
    max_ejection_percent: int = 50


RETRY_CONDITIONS = ("connect-failure", "refused-stream", "reset", "timeout", "502", "503", "504")


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """`upstreams.X.retries`. `attempts` is the total number of tries (1: no retry).
    A request is retried only when it is safe: nothing of it reached the upstream
    (connect-failure, refused-stream), or its method is idempotent and its body, if any,
    was at most `body_limit` bytes (kept to be sent again). A retry goes to another
    endpoint when there is one, after a jittered exponential back-off, and only while
    retries in flight stay under `budget_percent` of the upstream's requests in flight
    (`budget_min` retries are always allowed): retries never multiply an outage."""

    attempts: int = 2
    on: frozenset[str] = frozenset({"connect-failure", "refused-stream"})
    per_try_timeout: float | None = None  # None: the upstream's read timeout bounds a try
    backoff_base: float = DEFAULT_RETRY_BACKOFF_BASE_S
    backoff_max: float = DEFAULT_RETRY_BACKOFF_MAX_S
    budget_percent: float = 20.0
    budget_min: int = 3
    body_limit: int = DEFAULT_RETRY_BODY_LIMIT


@dataclass(frozen=True, slots=True)
class CircuitBreakerConfig:
    """`upstreams.X.circuit_breaker`: limits for the whole upstream (all endpoints).
    Past one, a request gets 503 at once (`upstream_overloaded`) instead of queueing
    without bound. None: no limit beyond each pool's own."""

    max_connections: int | None = None  # connections open to the upstream
    max_pending: int | None = None  # requests waiting for a connection
    max_requests: int | None = None  # requests in flight


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """`upstreams.NAME`."""

    name: str
    endpoints: tuple[EndpointConfig, ...]
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    timeouts: UpstreamTimeouts = field(default_factory=UpstreamTimeouts)
    pool: PoolConfig = field(default_factory=PoolConfig)
    # http1, h2c (HTTP/2 with prior knowledge on http:// endpoints) or h2 (HTTP/2 chosen
    # by ALPN on https:// endpoints).
    protocol: str = "http1"
    tls: UpstreamTls = field(default_factory=UpstreamTls)
    health_check: HealthCheckConfig | None = None  # None: no active checks
    outlier: OutlierConfig | None = field(default_factory=OutlierConfig)  # None: off
    retries: RetryConfig = field(default_factory=RetryConfig)
    circuit_breaker: CircuitBreakerConfig = field(default_factory=CircuitBreakerConfig)
    # Re-resolve endpoint host names this often; every A/AAAA record is an endpoint and
    # one that disappears drains. None: names are resolved when connecting, as given.
    resolve_interval: float | None = None
