"""The `upstreams` section of routes.yaml: endpoints, protocol and TLS, pools and timeouts,
and the resilience settings (balance, health_check, outlier, retries, circuit_breaker,
resolve). A mixin of the loader like `config_routes.RouteSections`.
"""

from __future__ import annotations

from contextlib import suppress

from yaml.nodes import Node, ScalarNode

from proxy.config.model import (
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
from proxy.config.reader import NodeReader, Reported, did_you_mean, join_path
from proxy.config.values import ca_bundle_problem, parse_endpoint_url

_UPSTREAM_PROTOCOLS = ("http1", "h2c", "h2")
_SIMPLE_POLICIES = ("round_robin", "least_request", "random")
_HASH_KEYS = ("header", "cookie", "ip", "path")
_HEALTH_TYPES = ("http", "tcp")
_MAX_CONNECTIONS = DEFAULT_POOL_MAX_CONNECTIONS


class UpstreamSections(NodeReader):
    """Reads `upstreams`."""

    _upstream_names: set[str] | None = None
    _upstream_protocols: dict[str, str]

    def _upstreams(self, node: Node, path: str) -> dict[str, UpstreamConfig]:
        entries = self.entries(node, path)
        self._upstream_names = {name for _, name, _ in entries}
        upstreams: dict[str, UpstreamConfig] = {}
        for _, name, value in entries:
            with suppress(Reported):
                upstreams[name] = self._upstream(value, join_path(path, name), name)
        self._upstream_protocols = {name: up.protocol for name, up in upstreams.items()}
        return upstreams

    def _upstream(self, node: Node, path: str, name: str) -> UpstreamConfig:
        keys = ("endpoints", "balance", "timeouts", "pool", "protocol", "tls", "health_check",
                "outlier", "retries", "circuit_breaker", "resolve")  # fmt: skip
        fields = self.mapping(node, path, keys, ("endpoints",))
        default_outlier: OutlierConfig | None = OutlierConfig()
        upstream = UpstreamConfig(
            name=name,
            endpoints=fields.get("endpoints", self._endpoints, ()),
            balance=fields.get("balance", self._balance, BalanceConfig()),
            timeouts=fields.get("timeouts", self._timeouts, UpstreamTimeouts()),
            pool=fields.get("pool", self._pool, PoolConfig()),
            protocol=fields.get("protocol", self._upstream_protocol, "http1"),
            tls=fields.get("tls", self._upstream_tls, UpstreamTls()),
            health_check=fields.get("health_check", self._health_check, None),
            outlier=fields.get("outlier", self._outlier, default_outlier),
            retries=fields.get("retries", self._retries, RetryConfig()),
            circuit_breaker=fields.get(
                "circuit_breaker", self._circuit_breaker, CircuitBreakerConfig()
            ),
            resolve_interval=fields.get("resolve", self._resolve, None),
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

    def _upstream_protocol(self, node: Node, path: str) -> str:
        return self.choice(node, path, _UPSTREAM_PROTOCOLS, "protocol")

    def _upstream_tls(self, node: Node, path: str) -> UpstreamTls:
        fields = self.mapping(node, path, ("ca", "verify", "sni"))
        return UpstreamTls(
            ca=fields.get("ca", self._ca_bundle, None),
            verify=fields.get("verify", self.boolean, True),
            sni=fields.get("sni", self.name, None),
        )

    def _ca_bundle(self, node: Node, path: str) -> str:
        ca = self.readable_file(node, path)
        problem = ca_bundle_problem(ca)
        if problem is not None:
            raise self.error(node, path, problem)
        return ca

    def _endpoints(self, node: Node, path: str) -> tuple[EndpointConfig, ...]:
        endpoints: dict[str, tuple[EndpointConfig, str]] = {}
        for item, item_path in self.nonempty_items(node, path, "at least one endpoint is required"):
            with suppress(Reported):
                endpoint = self._endpoint(item, item_path)
                if endpoint.url in endpoints:
                    also = endpoints[endpoint.url][1]
                    message = f"duplicate endpoint {endpoint.url!r} (also {also}; use weight)"
                    raise self.error(item, item_path, message)
                endpoints[endpoint.url] = (endpoint, item_path)
        return tuple(endpoint for endpoint, _ in endpoints.values())

    def _endpoint(self, node: Node, path: str) -> EndpointConfig:
        url_node, url_path, weight = node, path, 1
        if self.value(node, path) is node:  # a mapping (or, wrongly, a list)
            fields = self.mapping(node, path, ("url", "weight"), ("url",))
            weight = fields.get("weight", self.positive_integer, 1)
            if "url" not in fields:
                raise Reported
            url_node, url_path = fields.nodes["url"], fields.key_path("url")
        expected = "a URL like 'http://host:port', or a mapping with url and weight"
        scheme, host, port, url = self.convert(url_node, url_path, parse_endpoint_url, expected)
        return EndpointConfig(url, scheme, host, port, weight)

    def _timeouts(self, node: Node, path: str) -> UpstreamTimeouts:
        fields = self.mapping(node, path, ("connect", "read"))
        return UpstreamTimeouts(
            connect=fields.get("connect", self.positive_duration, DEFAULT_CONNECT_TIMEOUT_S),
            read=fields.get("read", self.positive_duration, DEFAULT_READ_TIMEOUT_S),
        )

    def _pool(self, node: Node, path: str) -> PoolConfig:
        keys = ("max_connections", "max_idle", "idle_timeout", "wait_timeout")
        fields = self.mapping(node, path, keys)
        max_connections = fields.get("max_connections", self.positive_integer, _MAX_CONNECTIONS)
        pool = PoolConfig(
            max_connections=max_connections,
            # Left out, the idle cap follows a smaller max_connections down.
            max_idle=fields.get(
                "max_idle", self.integer, min(DEFAULT_POOL_MAX_IDLE, max_connections)
            ),
            idle_timeout=fields.get("idle_timeout", self.duration, DEFAULT_POOL_IDLE_TIMEOUT_S),
            wait_timeout=fields.get("wait_timeout", self.duration, DEFAULT_POOL_WAIT_TIMEOUT_S),
        )
        if pool.max_idle > pool.max_connections:
            key = "max_idle"
            limits = f"max_idle ({pool.max_idle}) > max_connections ({pool.max_connections})"
            fields.error(key, f"{limits}: idle connections are part of max_connections")
        return pool

    # --- resilience ---

    def _balance(self, node: Node, path: str) -> BalanceConfig:
        """`round_robin` | `least_request` | `random` | `{hash: ...}` | `{sticky: ...}`."""
        if isinstance(node, ScalarNode):
            policies = (*_SIMPLE_POLICIES, "hash", "sticky")
            policy = self.choice(node, path, policies, "balance")
            if policy == "hash":
                raise self.error(
                    node,
                    path,
                    "hash needs a key: {hash: {header: NAME}}, "
                    "{hash: {cookie: NAME}}, {hash: ip} or {hash: path}",
                )
            if policy == "sticky":
                return BalanceConfig(policy="sticky")
            return BalanceConfig(policy=policy)
        fields = self.mapping(node, path, ("hash", "sticky"))
        if len(fields.nodes) != 1:
            raise self.error(node, path, "expected one of: hash, sticky")
        if "hash" in fields.nodes:
            return self._hash(fields.nodes["hash"], fields.key_path("hash"))
        sticky_node = fields.nodes["sticky"]
        sticky_path = fields.key_path("sticky")
        if isinstance(sticky_node, ScalarNode) and not self.value(sticky_node, sticky_path):
            return BalanceConfig(policy="sticky")
        sticky = self.mapping(sticky_node, sticky_path, ("cookie", "ttl"))
        return BalanceConfig(
            policy="sticky",
            cookie=sticky.get("cookie", self.name, "gatehouse_sticky"),
            cookie_ttl=sticky.get("ttl", self.positive_duration, None),
        )

    def _hash(self, node: Node, path: str) -> BalanceConfig:
        if isinstance(node, ScalarNode):
            on = self.choice(node, path, ("ip", "path"), "hash key")
            return BalanceConfig(policy="hash", hash_on=on)
        fields = self.mapping(node, path, ("header", "cookie"))
        if len(fields.nodes) != 1:
            raise self.error(node, path, "expected one of: header, cookie (or ip, path)")
        on = next(iter(fields.nodes))
        key = fields.get(on, self.name, "")
        return BalanceConfig(
            policy="hash", hash_on=on, hash_key=key.lower() if on == "header" else key
        )

    def _health_check(self, node: Node, path: str) -> HealthCheckConfig:
        keys = ("type", "path", "expect", "interval", "timeout", "healthy_threshold",
                "unhealthy_threshold", "jitter")  # fmt: skip
        fields = self.mapping(node, path, keys)
        check = HealthCheckConfig(
            type=fields.get("type", self._health_type, "http"),
            path=fields.get("path", self._health_path, "/"),
            expect=fields.get("expect", self._statuses, ((200, 399),)),
            interval=fields.get("interval", self.positive_duration, DEFAULT_HEALTH_INTERVAL_S),
            timeout=fields.get("timeout", self.positive_duration, DEFAULT_HEALTH_TIMEOUT_S),
            healthy_threshold=fields.get("healthy_threshold", self.positive_integer, 2),
            unhealthy_threshold=fields.get("unhealthy_threshold", self.positive_integer, 3),
            jitter=fields.get("jitter", self._fraction, 0.1),
        )
        if check.type == "tcp" and ("path" in fields.nodes or "expect" in fields.nodes):
            fields.error("type", "path and expect are for type: http")
        return check

    def _health_type(self, node: Node, path: str) -> str:
        return self.choice(node, path, _HEALTH_TYPES, "health check type")

    def _health_path(self, node: Node, path: str) -> str:
        value = self.string(node, path)
        if not value.startswith("/") or any(c.isspace() for c in value):
            raise self.error(node, path, f"expected a path like '/healthz', got {value!r}")
        return value

    def _statuses(self, node: Node, path: str) -> tuple[tuple[int, int], ...]:
        """A list of statuses (200) and ranges ("200-299")."""
        ranges: list[tuple[int, int]] = []
        for item, item_path in self.nonempty_items(node, path, "at least one status"):
            with suppress(Reported):
                value = self.value(item, item_path)
                if isinstance(value, int) and not isinstance(value, bool):
                    value = str(value)
                if not isinstance(value, str):
                    raise self.type_error(item, item_path, "a status or 'A-B'")
                try:
                    ranges.append(_status_range(value))
                except ValueError:
                    message = f"expected a status (100-599) or a range 'A-B', got {value!r}"
                    raise self.error(item, item_path, message) from None
        return tuple(ranges)

    def _fraction(self, node: Node, path: str) -> float:
        """A fraction, written as a number (0.1) or a percentage ("10%")."""
        value = self.value(node, path)
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise self.type_error(node, path, "a fraction like 0.1 or '10%'")
        try:
            return _fraction(str(value))
        except ValueError:
            raise self.error(
                node, path, f"expected a fraction from 0 to 1 or 0% to 100%, got {value!r}"
            ) from None

    def _outlier(self, node: Node, path: str) -> OutlierConfig | None:
        if isinstance(node, ScalarNode) and self.value(node, path) is False:
            return None  # `outlier: false`: no passive ejection
        keys = ("consecutive_failures", "consecutive_5xx", "base_ejection", "max_ejection",
                "max_ejection_percent")  # fmt: skip
        fields = self.mapping(node, path, keys)
        outlier = OutlierConfig(
            consecutive_failures=fields.get("consecutive_failures", self.positive_integer, 5),
            consecutive_5xx=fields.get(
                "consecutive_5xx", self.optional(self.positive_integer), None
            ),
            base_ejection=fields.get(
                "base_ejection", self.positive_duration, DEFAULT_BASE_EJECTION_S
            ),
            max_ejection=fields.get("max_ejection", self.positive_duration, DEFAULT_MAX_EJECTION_S),
            max_ejection_percent=fields.get("max_ejection_percent", self._percent, 50),
        )
        if outlier.max_ejection < outlier.base_ejection:
            fields.error("max_ejection", "must be at least base_ejection")
        return outlier

    def _percent(self, node: Node, path: str) -> int:
        value = self.integer(node, path)
        if value > 100:
            raise self.error(node, path, f"a percentage is at most 100, got {value}")
        return value

    def _retries(self, node: Node, path: str) -> RetryConfig:
        keys = ("attempts", "on", "per_try_timeout", "backoff", "budget", "body_limit")
        fields = self.mapping(node, path, keys)
        base, most = DEFAULT_RETRY_BACKOFF_BASE_S, DEFAULT_RETRY_BACKOFF_MAX_S
        if "backoff" in fields.nodes:
            backoff = self.mapping(
                fields.nodes["backoff"], fields.key_path("backoff"), ("base", "max")
            )
            base = backoff.get("base", self.positive_duration, base)
            most = backoff.get("max", self.positive_duration, max(most, base))
            if most < base:
                backoff.error("max", "must be at least base")
        percent, minimum = 20.0, 3
        if "budget" in fields.nodes:
            budget = self.mapping(
                fields.nodes["budget"], fields.key_path("budget"), ("percent", "min")
            )
            percent = float(budget.get("percent", self._percent, 20))
            minimum = budget.get("min", self.integer, 3)
        return RetryConfig(
            attempts=fields.get("attempts", self.positive_integer, 2),
            on=fields.get("on", self._retry_on, RetryConfig().on),
            per_try_timeout=fields.get("per_try_timeout", self.positive_duration, None),
            backoff_base=base,
            backoff_max=most,
            budget_percent=percent,
            budget_min=minimum,
            body_limit=fields.get("body_limit", self.size, DEFAULT_RETRY_BODY_LIMIT),
        )

    def _retry_on(self, node: Node, path: str) -> frozenset[str]:
        """Conditions by name; statuses may be written as numbers (`[reset, 502, 503]`)."""
        conditions: set[str] = set()
        for index, item in enumerate(self.sequence(node, path)):
            item_path = f"{path}[{index}]"
            with suppress(Reported):
                value = self.value(item, item_path)
                if isinstance(value, int) and not isinstance(value, bool):
                    value = str(value)
                if value not in RETRY_CONDITIONS:
                    supported = ", ".join(RETRY_CONDITIONS)
                    hint = did_you_mean(str(value), RETRY_CONDITIONS)
                    message = f"unsupported retry condition {value!r} (supported: {supported})"
                    raise self.error(item, item_path, message + hint)
                conditions.add(str(value))
        return frozenset(conditions)

    def _circuit_breaker(self, node: Node, path: str) -> CircuitBreakerConfig:
        fields = self.mapping(node, path, ("max_connections", "max_pending", "max_requests"))
        limit = self.optional(self.positive_integer)
        return CircuitBreakerConfig(
            max_connections=fields.get("max_connections", limit, None),
            max_pending=fields.get("max_pending", self.optional(self.integer), None),
            max_requests=fields.get("max_requests", limit, None),
        )

    def _resolve(self, node: Node, path: str) -> float:
        fields = self.mapping(node, path, ("interval",), ("interval",))
        return fields.get("interval", self.positive_duration, 30.0)


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
