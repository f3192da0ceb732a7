"""The worker's metric registry, and the metrics of what happens besides the traffic of
requests: HTTP/2 defences that fired, WebSocket tunnels, the span export, the middleware's
own (time spent, auth failures, JWKS fetches, OIDC sessions, rate limits, caches,
compression), PROXY headers refused and access log lines dropped (docs/operations.md).
The data path's metrics, counted per request and labelled by route or upstream, are
metrics/traffic.py's.

Metrics live on an explicit registry (not prometheus-client's global one), in base units,
with bounded labels. Each worker counts in its own memory; the supervising parent sums
the workers' samples for the admin listener (metrics/aggregate.py), so everything here
must add up across workers: counters, histograms, and gauges that count things. (The
one gauge that does not add up, `gatehouse_upstream_healthy`, is merged by `min`.)

What the middleware count on every request uses the lock-free families of
metrics/local.py. The gauges of what is open now (connections, pools, health) are read
when scraped (metrics/live.py) and cost the data path nothing.
"""

from __future__ import annotations

import enum

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics

from metrics.local import LocalCounter, LocalHistogram

# A `_created` sample per series is a per-process timestamp: it cannot be summed across
# workers, so no family here exports one.
disable_created_metrics()  # type: ignore[no-untyped-call]

REGISTRY = CollectorRegistry(auto_describe=True)


class Http2Limit(enum.Enum):
    """An HTTP/2 defence that fired (`Http2Config` names the attack each one stops)."""

    RAPID_RESET = "rapid_reset"  # GOAWAY ENHANCE_YOUR_CALM: too many resets per second
    CONTROL_FLOOD = "control_flood"  # GOAWAY ENHANCE_YOUR_CALM: SETTINGS/PING/... flood
    REFUSED_STREAM = "refused_stream"  # a stream beyond max_concurrent_streams
    HEADER_LIST = "header_list"  # 431: a request's fields over max_header_list_size
    MALFORMED = "malformed"  # RST_STREAM PROTOCOL_ERROR: fields break RFC 9113 section 8
    CONNECTION_ERROR = "connection_error"  # GOAWAY: h2 refused the connection's input
    BODY_TIMEOUT = "body_timeout"  # 408: a request body stopped coming
    WINDOW_TIMEOUT = "window_timeout"  # RST_STREAM: the client kept its window shut
    IDLE_TIMEOUT = "idle_timeout"  # GOAWAY NO_ERROR: no stream for keepalive_timeout


HTTP2_LIMIT_HITS = Counter(
    "gatehouse_http2_limit_hits",
    "HTTP/2 defences that fired, by limit",
    ["limit"],
    registry=REGISTRY,
)
_HTTP2_LIMIT_CHILDREN = {limit: HTTP2_LIMIT_HITS.labels(limit.value) for limit in Http2Limit}


def count_http2_limit(limit: Http2Limit) -> None:
    """One more hit of `limit`."""
    _HTTP2_LIMIT_CHILDREN[limit].inc()


class TunnelClose(enum.Enum):
    """Why a WebSocket tunnel ended: the side that ended it first, and how."""

    CLIENT_CLOSED = "client_closed"  # the client closed its side (after its close frame)
    UPSTREAM_CLOSED = "upstream_closed"
    CLIENT_RESET = "client_reset"  # the client's connection broke (reset, stream reset)
    UPSTREAM_RESET = "upstream_reset"
    IDLE_TIMEOUT = "idle_timeout"  # no byte either way for the route's idle_timeout
    MAX_DURATION = "max_duration"  # open longer than the route's max_duration
    SHUTDOWN = "shutdown"  # the grace period ended: 1001 going away to both sides
    ROUTE_REMOVED = "route_removed"  # a reload removed its route; the grace period ended


class TunnelDirection(enum.Enum):
    """Which way tunnelled bytes went."""

    UPSTREAM = "upstream"  # client -> upstream
    DOWNSTREAM = "downstream"  # upstream -> client


WEBSOCKET_TUNNELS_OPEN = Gauge(
    "gatehouse_websocket_tunnels_open",
    "WebSocket tunnels open now",
    registry=REGISTRY,
)
WEBSOCKET_BYTES = Counter(
    "gatehouse_websocket_bytes",
    "Bytes tunnelled through WebSocket connections, by direction",
    ["direction"],
    registry=REGISTRY,
)
WEBSOCKET_CLOSES = Counter(
    "gatehouse_websocket_closes",
    "WebSocket tunnels ended, by reason",
    ["reason"],
    registry=REGISTRY,
)
_WEBSOCKET_BYTES_CHILDREN = {
    direction: WEBSOCKET_BYTES.labels(direction.value) for direction in TunnelDirection
}
_WEBSOCKET_CLOSE_CHILDREN = {
    reason: WEBSOCKET_CLOSES.labels(reason.value) for reason in TunnelClose
}


# Spans of the gateway's traces (metrics/traces.py): exported, dropped when the queue to
# the export thread is full, or failed (the collector refused or could not be reached).
# A prometheus-client Counter, locked: the export thread counts too.
TRACING_SPANS = Counter(
    "gatehouse_tracing_spans",
    "Spans of the gateway's traces: exported, dropped (queue full) or failed (export)",
    ["result"],
    registry=REGISTRY,
)


def count_tunnel_bytes(direction: TunnelDirection, size: int) -> None:
    """`size` more bytes tunnelled `direction` (added in batches, not per chunk)."""
    if size:
        _WEBSOCKET_BYTES_CHILDREN[direction].inc(size)


def count_tunnel_close(reason: TunnelClose) -> None:
    """One more tunnel ended for `reason`."""
    _WEBSOCKET_CLOSE_CHILDREN[reason].inc()


# Observed on every request by every middleware: a lock-free local histogram (local.py).
MIDDLEWARE_SECONDS = LocalHistogram(
    "gatehouse_middleware_duration_seconds",
    "Time spent in each middleware itself (not in what it called next), by instance name",
    ["middleware"],
    buckets=(0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0),
    registry=REGISTRY,
)


AUTH_FAILURES = Counter(
    "gatehouse_auth_failures",
    "Requests an auth middleware refused, by instance name and reason (each middleware's "
    "own fixed set: missing, invalid, expired, denied, unavailable...)",
    ["middleware", "reason"],
    registry=REGISTRY,
)


def count_auth_failure(middleware: str, reason: str) -> None:
    """One more request that auth middleware `middleware` refused. `reason` comes from
    the middleware's own fixed set: `missing` (no credentials) and `invalid` for all, and
    finer ones where a middleware knows more (jwt: `expired`, `bad_signature`...;
    forward_auth: `denied`, `unavailable`, `timeout`, `bad_response`)."""
    AUTH_FAILURES.labels(middleware, reason).inc()


JWKS_REFRESHES = Counter(
    "gatehouse_jwks_refreshes",
    "JWKS fetches by the jwt and oidc middleware, by instance name and result (ok, timeout, "
    "unreachable, bad_status, invalid, error)",
    ["middleware", "result"],
    registry=REGISTRY,
)


def count_jwks_refresh(middleware: str, result: str) -> None:
    """One more JWKS fetch by jwt middleware `middleware`, ending in `result`."""
    JWKS_REFRESHES.labels(middleware, result).inc()


OIDC_SESSIONS = Counter(
    "gatehouse_oidc_sessions",
    "Sessions the oidc middleware began, renewed with a refresh token and ended, by "
    "instance name and event (login, refresh, logout)",
    ["middleware", "event"],
    registry=REGISTRY,
)


def count_oidc_session(middleware: str, event: str) -> None:
    """One more `login`, `refresh` or `logout` by oidc middleware `middleware`."""
    OIDC_SESSIONS.labels(middleware, event).inc()


RATE_LIMIT_DECISIONS = LocalCounter(  # one per request through a rate_limit: no lock
    "gatehouse_rate_limit_decisions",
    "Requests a rate_limit middleware decided, by instance name and result (allowed, "
    "limited, backend_error)",
    ["middleware", "result"],
    registry=REGISTRY,
)
RATE_LIMIT_EVICTIONS = Counter(
    "gatehouse_rate_limit_evictions",
    "Live keys a rate_limit local table forgot to make room for a new key (max_keys too "
    "small for the keys active at once), by instance name",
    ["middleware"],
    registry=REGISTRY,
)


CACHE_LOOKUPS = LocalCounter(  # one per request through a cache: no lock
    "gatehouse_cache_lookups",
    "Requests a cache middleware answered or passed on, by instance name and result (hit, "
    "miss, stale, revalidated, bypass)",
    ["middleware", "result"],
    registry=REGISTRY,
)
CACHE_EVICTIONS = Counter(
    "gatehouse_cache_evictions",
    "Entries a cache's memory backend evicted to make room (max_size), by instance name",
    ["middleware"],
    registry=REGISTRY,
)


COMPRESS_RESPONSES = LocalCounter(  # one per response through a compress: no lock
    "gatehouse_compress_responses",
    "Responses a compress middleware saw, by instance name, the coding sent (gzip, br, "
    "zstd, or identity) and why (compressed, or why not: not_accepted, head, too_small, "
    "incompressible, content_type, already_encoded, no_transform, range, status)",
    ["middleware", "encoding", "reason"],
    registry=REGISTRY,
)
COMPRESS_BYTES = LocalCounter(  # per response, or per piece of a streamed one
    "gatehouse_compress_bytes",
    "Body bytes of the responses a compress middleware compressed, by instance name and "
    "direction: in (as the upstream sent them) and out (as compressed)",
    ["middleware", "direction"],
    registry=REGISTRY,
)


class ProxyHeaderRefusal(enum.Enum):
    """Why a connection on a `proxy_protocol` listener was closed before any HTTP."""

    INVALID = "invalid"  # not a PROXY header, malformed, or over its bounds
    TIMEOUT = "timeout"  # not complete within limits.header_timeout
    CLOSED = "closed"  # the peer closed or reset the connection before the header ended


PROXY_HEADERS_REFUSED = Counter(
    "gatehouse_proxy_protocol_refused",
    "Connections on proxy_protocol listeners closed for want of a valid PROXY header, by "
    "reason (invalid, timeout, closed)",
    ["reason"],
    registry=REGISTRY,
)
_PROXY_REFUSED_CHILDREN = {
    reason: PROXY_HEADERS_REFUSED.labels(reason.value) for reason in ProxyHeaderRefusal
}


def count_proxy_header_refused(reason: ProxyHeaderRefusal) -> None:
    """One more connection closed for want of a valid PROXY header."""
    _PROXY_REFUSED_CHILDREN[reason].inc()


ACCESS_LOG_DROPPED = Counter(
    "gatehouse_access_log_dropped",
    "Access log lines dropped: the queue to the writer was full (output blocked or too "
    "slow) or the write failed",
    registry=REGISTRY,
)
