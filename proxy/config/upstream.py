"""The `upstreams` section of routes.yaml: endpoints, protocol and TLS, pools and timeouts,
and the resilience settings (balance, health_check, outlier, retries, circuit_breaker,
resolve). `read_upstreams` is the section; the functions below it read its parts, each
given the reader that records their errors.
"""

from __future__ import annotations

from contextlib import suppress
from functools import partial

from yaml.nodes import Node, ScalarNode

from proxy.config.context import LoadContext
from proxy.config.reader import NodeReader, Reported, did_you_mean, join_path
from proxy.config.spec import keys_of, required_of
from proxy.config.upstream_keys import (
    BACKOFF,
    BALANCE,
    BUDGET,
    CIRCUIT_BREAKER,
    DEFAULT_RESOLVE_INTERVAL_S,
    DEFAULT_STICKY_COOKIE,
    ENDPOINT,
    HASH_ON,
    HEALTH_CHECK,
    HEALTH_CHECK_TYPES,
    OUTLIER,
    POOL,
    RESOLVE,
    RETRIES,
    SIMPLE_POLICIES,
    STICKY,
    TIMEOUTS,
    UPSTREAM,
    UPSTREAM_PROTOCOLS,
    UPSTREAM_TLS,
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
    BalanceConfig,
    CircuitBreakerConfig,
    EndpointConfig,
    HealthCheckConfig,
    OutlierConfig,
    PoolConfig,
    RetryConfig,
    UpstreamConfig,
    UpstreamTimeouts,
    UpstreamTls,
)
from proxy.config.values import parse_endpoint_url, tls_pair_problem

_MAX_CONNECTIONS = DEFAULT_POOL_MAX_CONNECTIONS


def read_upstreams(
    reader: NodeReader, context: LoadContext, node: Node, path: str
) -> dict[str, UpstreamConfig]:
    """`upstreams`: name -> upstream. Records in `context` the names defined (before
    reading them, so that a route naming a broken upstream is not told it does not exist)
    and the protocol of each upstream read (a route's WebSocket needs HTTP/1.1).

    Raises:
        Reported: the section is not a mapping (recorded).
    """
    entries = reader.entries(node, path)
    context.upstream_names = {name for _, name, _ in entries}
    upstreams: dict[str, UpstreamConfig] = {}
    for _, name, value in entries:
        with suppress(Reported):
            upstreams[name] = _upstream(reader, value, join_path(path, name), name)
    context.upstream_protocols = {name: up.protocol for name, up in upstreams.items()}
    return upstreams


def _upstream(reader: NodeReader, node: Node, path: str, name: str) -> UpstreamConfig:
    fields = reader.mapping(node, path, keys_of(UPSTREAM), required_of(UPSTREAM))
    default_outlier: OutlierConfig | None = OutlierConfig()
    upstream = UpstreamConfig(
        name=name,
        endpoints=fields.get("endpoints", partial(_endpoints, reader), ()),
        balance=fields.get("balance", partial(_balance, reader), BalanceConfig()),
        timeouts=fields.get("timeouts", partial(_timeouts, reader), UpstreamTimeouts()),
        pool=fields.get("pool", partial(_pool, reader), PoolConfig()),
        protocol=fields.get("protocol", partial(_upstream_protocol, reader), "http1"),
        tls=fields.get("tls", partial(_upstream_tls, reader), UpstreamTls()),
        health_check=fields.get("health_check", partial(_health_check, reader), None),
        outlier=fields.get("outlier", partial(_outlier, reader), default_outlier),
        retries=fields.get("retries", partial(_retries, reader), RetryConfig()),
        circuit_breaker=fields.get(
            "circuit_breaker", partial(_circuit_breaker, reader), CircuitBreakerConfig()
        ),
        resolve_interval=fields.get("resolve", partial(_resolve, reader), None),
    )
    schemes = {endpoint.scheme for endpoint in upstream.endpoints}
    if "protocol" in fields:
        if upstream.protocol == "h2c" and "https" in schemes:
            fields.error("protocol", "h2c is cleartext: use h2 for https:// endpoints")
        elif upstream.protocol == "h2" and "http" in schemes:
            fields.error("protocol", "h2 needs TLS (https:// endpoints); use h2c for http://")
    if "tls" in fields and schemes and "https" not in schemes:  # (no schemes: reported)
        fields.error("tls", "tls settings need https:// endpoints")
    return upstream


def _upstream_protocol(reader: NodeReader, node: Node, path: str) -> str:
    return reader.choice(node, path, UPSTREAM_PROTOCOLS, "protocol")


def _upstream_tls(reader: NodeReader, node: Node, path: str) -> UpstreamTls:
    fields = reader.mapping(node, path, keys_of(UPSTREAM_TLS))
    cert = fields.get("cert", reader.readable_file, None)
    key = fields.get("key", reader.readable_file, None)
    if ("cert" in fields) != ("key" in fields):
        missing = "key" if "cert" in fields else "cert"
        reader.error(node, path, f"a client certificate needs both cert and key ({missing!r})")
    elif cert is not None and key is not None:
        problem = tls_pair_problem(cert, key)
        if problem is not None:
            culprit, message = problem
            if culprit is None:
                reader.error(node, path, message)
            else:
                fields.error(culprit, message)
    return UpstreamTls(
        ca=fields.get("ca", reader.ca_bundle, None),
        verify=fields.get("verify", reader.boolean, True),
        sni=fields.get("sni", reader.name, None),
        cert=cert,
        key=key,
    )


def _endpoints(reader: NodeReader, node: Node, path: str) -> tuple[EndpointConfig, ...]:
    endpoints: dict[str, tuple[EndpointConfig, str]] = {}
    for item, item_path in reader.nonempty_items(node, path, "at least one endpoint is required"):
        with suppress(Reported):
            endpoint = _endpoint(reader, item, item_path)
            if endpoint.url in endpoints:
                also = endpoints[endpoint.url][1]
                message = f"duplicate endpoint {endpoint.url!r} (also {also}; use weight)"
                raise reader.error(item, item_path, message)
            endpoints[endpoint.url] = (endpoint, item_path)
    return tuple(endpoint for endpoint, _ in endpoints.values())


def _endpoint(reader: NodeReader, node: Node, path: str) -> EndpointConfig:
    url_node, url_path, weight = node, path, 1
    if reader.value(node, path) is node:  # a mapping (or, wrongly, a list)
        fields = reader.mapping(node, path, keys_of(ENDPOINT), required_of(ENDPOINT))
        weight = fields.get("weight", reader.positive_integer, 1)
        if "url" not in fields:
            raise Reported
        url_node, url_path = fields.nodes["url"], fields.key_path("url")
    expected = "a URL like 'http://host:port', or a mapping with url and weight"
    scheme, host, port, url = reader.convert(url_node, url_path, parse_endpoint_url, expected)
    return EndpointConfig(url, scheme, host, port, weight)


def _timeouts(reader: NodeReader, node: Node, path: str) -> UpstreamTimeouts:
    fields = reader.mapping(node, path, keys_of(TIMEOUTS))
    return UpstreamTimeouts(
        connect=fields.get("connect", reader.positive_duration, DEFAULT_CONNECT_TIMEOUT_S),
        read=fields.get("read", reader.positive_duration, DEFAULT_READ_TIMEOUT_S),
    )


def _pool(reader: NodeReader, node: Node, path: str) -> PoolConfig:
    fields = reader.mapping(node, path, keys_of(POOL))
    max_connections = fields.get("max_connections", reader.positive_integer, _MAX_CONNECTIONS)
    pool = PoolConfig(
        max_connections=max_connections,
        # Left out, the idle cap follows a smaller max_connections down.
        max_idle=fields.get(
            "max_idle", reader.integer, min(DEFAULT_POOL_MAX_IDLE, max_connections)
        ),
        idle_timeout=fields.get("idle_timeout", reader.duration, DEFAULT_POOL_IDLE_TIMEOUT_S),
        wait_timeout=fields.get("wait_timeout", reader.duration, DEFAULT_POOL_WAIT_TIMEOUT_S),
    )
    if pool.max_idle > pool.max_connections:
        key = "max_idle"
        limits = f"max_idle ({pool.max_idle}) > max_connections ({pool.max_connections})"
        fields.error(key, f"{limits}: idle connections are part of max_connections")
    return pool


# --- resilience ---


def _balance(reader: NodeReader, node: Node, path: str) -> BalanceConfig:
    """`round_robin` | `least_request` | `random` | `{hash: ...}` | `{sticky: ...}`."""
    if isinstance(node, ScalarNode):
        policies = (*SIMPLE_POLICIES, "hash", "sticky")
        policy = reader.choice(node, path, policies, "balance")
        if policy == "hash":
            raise reader.error(
                node,
                path,
                "hash needs a key: {hash: {header: NAME}}, "
                "{hash: {cookie: NAME}}, {hash: ip} or {hash: path}",
            )
        if policy == "sticky":
            return BalanceConfig(policy="sticky")
        return BalanceConfig(policy=policy)
    fields = reader.mapping(node, path, keys_of(BALANCE))
    if len(fields.nodes) != 1:
        raise reader.error(node, path, "expected one of: hash, sticky")
    if "hash" in fields.nodes:
        return _hash(reader, fields.nodes["hash"], fields.key_path("hash"))
    sticky_node = fields.nodes["sticky"]
    sticky_path = fields.key_path("sticky")
    if isinstance(sticky_node, ScalarNode) and not reader.value(sticky_node, sticky_path):
        return BalanceConfig(policy="sticky")
    sticky = reader.mapping(sticky_node, sticky_path, keys_of(STICKY))
    return BalanceConfig(
        policy="sticky",
        cookie=sticky.get("cookie", reader.name, DEFAULT_STICKY_COOKIE),
        cookie_ttl=sticky.get("ttl", reader.positive_duration, None),
    )


def _hash(reader: NodeReader, node: Node, path: str) -> BalanceConfig:
    if isinstance(node, ScalarNode):
        on = reader.choice(node, path, ("ip", "path"), "hash key")
        return BalanceConfig(policy="hash", hash_on=on)
    fields = reader.mapping(node, path, keys_of(HASH_ON))
    if len(fields.nodes) != 1:
        raise reader.error(node, path, "expected one of: header, cookie (or ip, path)")
    on = next(iter(fields.nodes))
    key = fields.get(on, reader.name, "")
    return BalanceConfig(policy="hash", hash_on=on, hash_key=key.lower() if on == "header" else key)


def _health_check(reader: NodeReader, node: Node, path: str) -> HealthCheckConfig:
    fields = reader.mapping(node, path, keys_of(HEALTH_CHECK))
    check = HealthCheckConfig(
        type=fields.get("type", partial(_health_type, reader), "http"),
        path=fields.get("path", partial(_health_path, reader), "/"),
        expect=fields.get("expect", partial(_statuses, reader), ((200, 399),)),
        interval=fields.get("interval", reader.positive_duration, DEFAULT_HEALTH_INTERVAL_S),
        timeout=fields.get("timeout", reader.positive_duration, DEFAULT_HEALTH_TIMEOUT_S),
        healthy_threshold=fields.get("healthy_threshold", reader.positive_integer, 2),
        unhealthy_threshold=fields.get("unhealthy_threshold", reader.positive_integer, 3),
        jitter=fields.get("jitter", partial(_jitter, reader), 0.1),
    )
    if check.type == "tcp" and ("path" in fields.nodes or "expect" in fields.nodes):
        fields.error("type", "path and expect are for type: http")
    return check


def _health_type(reader: NodeReader, node: Node, path: str) -> str:
    return reader.choice(node, path, HEALTH_CHECK_TYPES, "health check type")


def _health_path(reader: NodeReader, node: Node, path: str) -> str:
    value = reader.string(node, path)
    if not value.startswith("/") or any(c.isspace() for c in value):
        raise reader.error(node, path, f"expected a path like '/healthz', got {value!r}")
    return value


def _statuses(reader: NodeReader, node: Node, path: str) -> tuple[tuple[int, int], ...]:
    """A list of statuses (200) and ranges ("200-299")."""
    ranges: list[tuple[int, int]] = []
    for item, item_path in reader.nonempty_items(node, path, "at least one status"):
        with suppress(Reported):
            value = reader.value(item, item_path)
            if isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, str):
                raise reader.type_error(item, item_path, "a status or 'A-B'")
            try:
                ranges.append(_status_range(value))
            except ValueError:
                message = f"expected a status (100-599) or a range 'A-B', got {value!r}"
                raise reader.error(item, item_path, message) from None
    return tuple(ranges)


def _jitter(reader: NodeReader, node: Node, path: str) -> float:
    """A fraction, written as a number (0.1) or a percentage ("10%")."""
    value = reader.value(node, path)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise reader.type_error(node, path, "a fraction like 0.1 or '10%'")
    try:
        return _fraction(str(value))
    except ValueError:
        raise reader.error(
            node, path, f"expected a fraction from 0 to 1 or 0% to 100%, got {value!r}"
        ) from None


def _outlier(reader: NodeReader, node: Node, path: str) -> OutlierConfig | None:
    if isinstance(node, ScalarNode) and reader.value(node, path) is False:
        return None  # `outlier: false`: no passive ejection
    fields = reader.mapping(node, path, keys_of(OUTLIER))
    outlier = OutlierConfig(
        consecutive_failures=fields.get("consecutive_failures", reader.positive_integer, 5),
        consecutive_5xx=fields.get(
            "consecutive_5xx", reader.optional(reader.positive_integer), None
        ),
        base_ejection=fields.get(
            "base_ejection", reader.positive_duration, DEFAULT_BASE_EJECTION_S
        ),
        max_ejection=fields.get("max_ejection", reader.positive_duration, DEFAULT_MAX_EJECTION_S),
        max_ejection_percent=fields.get("max_ejection_percent", partial(_percent, reader), 50),
    )
    if outlier.max_ejection < outlier.base_ejection:
        if "max_ejection" in fields:
            fields.error("max_ejection", "must be at least base_ejection")
        else:  # the default 5m: the key to point at is base_ejection
            fields.error(
                "base_ejection",
                f"must be at most max_ejection (default {DEFAULT_MAX_EJECTION_S:g}s);"
                " set max_ejection too",
            )
    return outlier


def _percent(reader: NodeReader, node: Node, path: str) -> int:
    value = reader.integer(node, path)
    if value > 100:
        raise reader.error(node, path, f"a percentage is at most 100, got {value}")
    return value


def _retries(reader: NodeReader, node: Node, path: str) -> RetryConfig:
    fields = reader.mapping(node, path, keys_of(RETRIES))
    base, most = DEFAULT_RETRY_BACKOFF_BASE_S, DEFAULT_RETRY_BACKOFF_MAX_S
    if "backoff" in fields.nodes:
        backoff = reader.mapping(
            fields.nodes["backoff"], fields.key_path("backoff"), keys_of(BACKOFF)
        )
        base = backoff.get("base", reader.positive_duration, base)
        most = backoff.get("max", reader.positive_duration, max(most, base))
        if most < base:
            backoff.error("max", "must be at least base")
    percent, minimum = 20.0, 3
    if "budget" in fields.nodes:
        budget = reader.mapping(fields.nodes["budget"], fields.key_path("budget"), keys_of(BUDGET))
        percent = float(budget.get("percent", partial(_percent, reader), 20))
        minimum = budget.get("min", reader.integer, 3)
    return RetryConfig(
        attempts=fields.get("attempts", reader.positive_integer, 2),
        on=fields.get("on", partial(_retry_on, reader), RetryConfig().on),
        per_try_timeout=fields.get("per_try_timeout", reader.positive_duration, None),
        backoff_base=base,
        backoff_max=most,
        budget_percent=percent,
        budget_min=minimum,
        body_limit=fields.get("body_limit", reader.size, DEFAULT_RETRY_BODY_LIMIT),
    )


def _retry_on(reader: NodeReader, node: Node, path: str) -> frozenset[str]:
    """Conditions by name; statuses may be written as numbers (`[reset, 502, 503]`)."""
    conditions: set[str] = set()
    for item, item_path in reader.items(node, path):
        with suppress(Reported):
            value = reader.value(item, item_path)
            if isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            if value not in RETRY_CONDITIONS:
                supported = ", ".join(RETRY_CONDITIONS)
                hint = did_you_mean(str(value), RETRY_CONDITIONS)
                message = f"unsupported retry condition {value!r} (supported: {supported})"
                raise reader.error(item, item_path, message + hint)
            conditions.add(str(value))
    return frozenset(conditions)


def _circuit_breaker(reader: NodeReader, node: Node, path: str) -> CircuitBreakerConfig:
    fields = reader.mapping(node, path, keys_of(CIRCUIT_BREAKER))
    limit = reader.optional(reader.positive_integer)
    return CircuitBreakerConfig(
        max_connections=fields.get("max_connections", limit, None),
        max_pending=fields.get("max_pending", reader.optional(reader.integer), None),
        max_requests=fields.get("max_requests", limit, None),
    )


def _resolve(reader: NodeReader, node: Node, path: str) -> float:
    fields = reader.mapping(node, path, keys_of(RESOLVE), required_of(RESOLVE))
    return fields.get("interval", reader.positive_duration, DEFAULT_RESOLVE_INTERVAL_S)


def _status_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    first, last = int(low), int(high or low)
    if not 100 <= first <= last <= 599:
        raise ValueError(text)
    return first, last


def _fraction(text: str) -> float:
    value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError(text)
    return value
