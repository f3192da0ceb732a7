"""The key tables of `upstreams`: every key an upstream's entry accepts (`UPSTREAM` and
the tables under it), with its type, default and meaning (proxy/config/spec.py says what
an `Option` is). proxy/config/upstream.py reads an entry by them; proxy/config/keys.py
holds the tables of the file's other sections and of the top level, which names this one.
"""

from __future__ import annotations

from proxy.config.spec import (
    KeyTable,
    any_of,
    boolean,
    choice,
    duration,
    integer,
    list_of,
    mapping,
    nullable,
    raw,
    size,
    string,
)
from proxy.config.upstream_model import (
    DEFAULT_BASE_EJECTION_S,
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_HEALTH_INTERVAL_S,
    DEFAULT_HEALTH_TIMEOUT_S,
    DEFAULT_MAX_EJECTION_S,
    DEFAULT_POOL_IDLE_TIMEOUT_S,
    DEFAULT_POOL_MAX_CONNECTIONS,
    DEFAULT_POOL_MAX_IDLE,
    DEFAULT_POOL_WAIT_TIMEOUT_S,
    DEFAULT_READ_TIMEOUT_S,
    DEFAULT_RETRY_BACKOFF_BASE_S,
    DEFAULT_RETRY_BACKOFF_MAX_S,
    DEFAULT_RETRY_BODY_LIMIT,
    RETRY_CONDITIONS,
    RetryConfig,
)

UPSTREAM_PROTOCOLS = ("http1", "h2c", "h2")
SIMPLE_POLICIES = ("round_robin", "least_request", "random")
HEALTH_CHECK_TYPES = ("http", "tcp")

DEFAULT_RESOLVE_INTERVAL_S = 30.0
DEFAULT_STICKY_COOKIE = "gatehouse_sticky"

UPSTREAM_TLS: KeyTable = {
    "ca": string("PEM bundle to verify the upstream against (default: the system store)"),
    "verify": boolean("false turns certificate checks off", True),
    "sni": string("the name sent (SNI) and verified (default: the endpoint's host)"),
    "cert": string("PEM certificate chain presented to upstreams that ask for one (with key)"),
    "key": string("PEM private key of cert, not passphrase-protected"),
}

ENDPOINT: KeyTable = {
    "url": string("http://host[:port] or https://host[:port]", required=True),
    "weight": integer("the endpoint's share of requests", 1, minimum=1),
}

TIMEOUTS: KeyTable = {
    "connect": duration("a connect slower than this: 504", DEFAULT_CONNECT_TIMEOUT_S, True),
    "read": duration(
        "wait for the response head, and each gap between response body chunks: 504"
        " (no total deadline)",
        DEFAULT_READ_TIMEOUT_S,
        positive=True,
    ),
}

POOL: KeyTable = {
    "max_connections": integer(
        "connections per endpoint; requests beyond wait for wait_timeout",
        DEFAULT_POOL_MAX_CONNECTIONS,
        minimum=1,
    ),
    "max_idle": integer(
        "idle keep-alive connections kept per endpoint (at most max_connections; left"
        " out, the smaller of the two)",
        DEFAULT_POOL_MAX_IDLE,
    ),
    "idle_timeout": duration(
        "idle connections are closed after this; keep it below the upstream's own",
        DEFAULT_POOL_IDLE_TIMEOUT_S,
    ),
    "wait_timeout": duration(
        "how long a request waits for a connection, then 503", DEFAULT_POOL_WAIT_TIMEOUT_S
    ),
}

STICKY: KeyTable = {
    "cookie": string("the cookie that names the endpoint", DEFAULT_STICKY_COOKIE),
    "ttl": duration("the cookie's Max-Age (default: a session cookie)", positive=True),
}

HASH_ON: KeyTable = {
    "header": string("hash this request header"),
    "cookie": string("hash this cookie"),
}

BALANCE: KeyTable = {
    "hash": any_of(
        "consistent hashing: ip, path, {header: NAME} or {cookie: NAME}",
        choice(("ip", "path"), "hash the client address or the path"),
        raw("hash a header or a cookie", {**mapping(HASH_ON, "").schema, "maxProperties": 1}),
    ),
    "sticky": any_of(
        "a cookie pins each client to an endpoint",
        raw("the default cookie", {"enum": [None, False]}),
        mapping(STICKY, "the cookie's name and lifetime"),
    ),
}

HEALTH_CHECK: KeyTable = {
    "type": choice(HEALTH_CHECK_TYPES, "an HTTP request, or a TCP connect", "http"),
    "path": string("the path requested (type http)", "/"),
    "expect": list_of(
        raw(
            "a status, or a range 'A-B'",
            {"anyOf": [{"type": "integer", "minimum": 100, "maximum": 599},
                       {"type": "string", "pattern": r"^\d{3}(-\d{3})?$"}]},
        ),
        "statuses that count as healthy (type http)",
        min_items=1,
        default=["200-399"],
    ),
    "interval": duration("time between checks", DEFAULT_HEALTH_INTERVAL_S, positive=True),
    "timeout": duration("a check slower than this fails", DEFAULT_HEALTH_TIMEOUT_S, True),
    "healthy_threshold": integer("passes in a row that make an endpoint healthy", 2, 1),
    "unhealthy_threshold": integer("failures in a row that make it unhealthy", 3, 1),
    "jitter": raw(
        "spread of the interval: a fraction (0.1) or a percentage ('10%')",
        {"anyOf": [{"type": "number", "minimum": 0, "maximum": 1},
                   {"type": "string", "pattern": r"^\s*\d+(\.\d+)?%$"}]},
        0.1,
    ),
}  # fmt: skip

OUTLIER: KeyTable = {
    "consecutive_failures": integer(
        "connect failures, resets and timeouts in a row that eject an endpoint", 5, 1
    ),
    "consecutive_5xx": nullable(
        integer("5xx answers in a row that eject it (default off)", None, 1)
    ),
    "base_ejection": duration(
        "the first ejection's length; each next one is longer",
        DEFAULT_BASE_EJECTION_S,
        positive=True,
    ),
    "max_ejection": duration("the longest ejection", DEFAULT_MAX_EJECTION_S, positive=True),
    "max_ejection_percent": integer("at most this share of endpoints is ejected", 50, 0, 100),
}

BACKOFF: KeyTable = {
    "base": duration("the first back-off", DEFAULT_RETRY_BACKOFF_BASE_S, positive=True),
    "max": duration("the longest back-off", DEFAULT_RETRY_BACKOFF_MAX_S, positive=True),
}

BUDGET: KeyTable = {
    "percent": integer("retries in flight, as a percentage of requests in flight", 20, 0, 100),
    "min": integer("retries always allowed", 3),
}

RETRIES: KeyTable = {
    "attempts": integer("total tries (1: no retry)", 2, minimum=1),
    "on": raw(
        "what is retried",
        {"type": "array", "items": {"enum": [
            *RETRY_CONDITIONS, *(int(c) for c in RETRY_CONDITIONS if c.isdigit())
        ]}},
        sorted(RetryConfig().on),
    ),
    "per_try_timeout": duration("a deadline for each try", positive=True),
    "backoff": mapping(BACKOFF, "jittered exponential back-off between tries"),
    "budget": mapping(BUDGET, "retries stay under this share of the upstream's requests"),
    "body_limit": size(
        "largest request body kept to be sent again", DEFAULT_RETRY_BODY_LIMIT
    ),
}  # fmt: skip

CIRCUIT_BREAKER: KeyTable = {
    "max_connections": nullable(integer("open connections to the upstream", None, 1)),
    "max_pending": nullable(integer("requests waiting for a connection", None)),
    "max_requests": nullable(integer("requests in flight", None, 1)),
}

RESOLVE: KeyTable = {
    "interval": duration(
        "how often the endpoints' names are resolved again (each address is an endpoint)",
        DEFAULT_RESOLVE_INTERVAL_S,
        positive=True,
        required=True,
    ),
}

UPSTREAM: KeyTable = {
    "endpoints": list_of(
        any_of(
            "an endpoint",
            string("http://host[:port] or https://host[:port]"),
            mapping(ENDPOINT, "an endpoint with a weight"),
        ),
        "the upstream's endpoints",
        min_items=1,
        required=True,
    ),
    "balance": any_of(
        "how an endpoint is chosen",
        choice((*SIMPLE_POLICIES, "sticky"), "a policy"),
        raw(
            "hash or sticky, with their settings",
            {**mapping(BALANCE, "").schema, "minProperties": 1, "maxProperties": 1},
        ),
        default=SIMPLE_POLICIES[0],
    ),
    "timeouts": mapping(TIMEOUTS, "connect and read timeouts"),
    "pool": mapping(POOL, "connection pool, per endpoint"),
    "protocol": choice(
        UPSTREAM_PROTOCOLS,
        "http1, h2c (HTTP/2 cleartext) or h2 (HTTP/2 over TLS, https:// endpoints)",
        UPSTREAM_PROTOCOLS[0],
    ),
    "tls": mapping(UPSTREAM_TLS, "TLS to https:// endpoints"),
    "health_check": mapping(HEALTH_CHECK, "active health checks (default none)"),
    "outlier": any_of(
        "passive ejection of failing endpoints; false: none",
        raw("no passive ejection", {"const": False}),
        mapping(OUTLIER, "ejection settings"),
    ),
    "retries": mapping(RETRIES, "the retry policy"),
    "circuit_breaker": mapping(CIRCUIT_BREAKER, "limits past which requests fail fast (503)"),
    "resolve": mapping(RESOLVE, "re-resolve the endpoints' host names (DNS)"),
}
