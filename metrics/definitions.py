"""Every metric Gatehouse exports, declared in one place (DESIGN.md, operations).

Metrics live on an explicit registry (not prometheus-client's global one), in base units,
with bounded labels. The admin listener that serves them, and their aggregation across
workers, come with the operations work; until then the counters are kept per process.
"""

from __future__ import annotations

import enum

from prometheus_client import CollectorRegistry, Counter, Gauge

from metrics.local import LocalHistogram

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
    "JWKS fetches by the jwt middleware, by instance name and result (ok, timeout, "
    "unreachable, bad_status, invalid, error)",
    ["middleware", "result"],
    registry=REGISTRY,
)


def count_jwks_refresh(middleware: str, result: str) -> None:
    """One more JWKS fetch by jwt middleware `middleware`, ending in `result`."""
    JWKS_REFRESHES.labels(middleware, result).inc()


RATE_LIMIT_DECISIONS = Counter(
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


ACCESS_LOG_DROPPED = Counter(
    "gatehouse_access_log_dropped",
    "Access log lines dropped: the queue to the writer was full (output blocked or too "
    "slow) or the write failed",
    registry=REGISTRY,
)
