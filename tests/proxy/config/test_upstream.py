"""The `upstreams` section (proxy/config/upstream.py): endpoints, the pool's limits, and the
resilience settings (balance, health_check, outlier, retries, circuit_breaker), their
defaults and their errors. Protocols and TLS are in test_upstream_tls.py."""

from __future__ import annotations

import pytest

from proxy.config.upstream_model import (
    BalanceConfig,
    CircuitBreakerConfig,
    HealthCheckConfig,
    OutlierConfig,
    RetryConfig,
    UpstreamConfig,
)
from tests.support.config_helpers import errors_of, one_error, parse


def upstream_with(settings: str) -> str:
    """A config whose upstream `u` has `settings` (a flow mapping's inside) added."""
    return f"""\
        listeners: [{{bind: ':0'}}]
        upstreams: {{u: {{endpoints: [http://a:1, http://b:2], {settings}}}}}
        routes: []
    """


def upstream(settings: str) -> UpstreamConfig:
    return parse(upstream_with(settings)).upstreams["u"]


def test_defaults_retry_what_was_never_sent_and_eject_on_failures_only() -> None:
    config = parse(upstream_with("protocol: http1")).upstreams["u"]
    assert config.balance == BalanceConfig()
    assert config.health_check is None
    assert config.outlier == OutlierConfig(consecutive_failures=5, consecutive_5xx=None)
    assert config.retries == RetryConfig(
        attempts=2, on=frozenset({"connect-failure", "refused-stream"})
    )
    assert config.circuit_breaker == CircuitBreakerConfig()


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("least_request", BalanceConfig(policy="least_request")),
        ("random", BalanceConfig(policy="random")),
        (
            "{hash: {header: X-User}}",
            BalanceConfig(policy="hash", hash_on="header", hash_key="x-user"),
        ),
        (
            "{hash: {cookie: Session}}",
            BalanceConfig(policy="hash", hash_on="cookie", hash_key="Session"),
        ),
        ("{hash: ip}", BalanceConfig(policy="hash", hash_on="ip")),
        ("{hash: path}", BalanceConfig(policy="hash", hash_on="path")),
        ("sticky", BalanceConfig(policy="sticky")),
        (
            "{sticky: {cookie: aff, ttl: 1h}}",
            BalanceConfig(policy="sticky", cookie="aff", cookie_ttl=3600.0),
        ),
    ],
)
def test_balance_policies(written: str, expected: BalanceConfig) -> None:
    assert upstream(f"balance: {written}").balance == expected


@pytest.mark.parametrize(
    ("written", "message"),
    [
        (
            "hash",
            "balance: hash needs a key: {hash: {header: NAME}}, {hash: {cookie: NAME}}, "
            "{hash: ip} or {hash: path}",
        ),
        (
            "{hash: {header: a, cookie: b}}",
            "balance.hash: expected one of: header, cookie (or ip, path)",
        ),
        ("{hash: host}", "balance.hash: unsupported hash key 'host' (supported: ip, path)"),
        ("{hash: a, sticky: b}", "balance: expected one of: hash, sticky"),
    ],
)
def test_balance_mistakes_are_reported(written: str, message: str) -> None:
    assert one_error(upstream_with(f"balance: {written}")).startswith(
        f"routes.yaml:2: upstreams.u.{message}"
    )


def test_health_check_settings_and_status_ranges() -> None:
    check = upstream(
        "health_check: {path: /healthz, expect: [200, '300-399'], interval: 2s, timeout: 500ms,"
        " healthy_threshold: 1, unhealthy_threshold: 4, jitter: 0.2}"
    ).health_check
    assert check == HealthCheckConfig(
        path="/healthz",
        expect=((200, 200), (300, 399)),
        interval=2.0,
        timeout=0.5,
        healthy_threshold=1,
        unhealthy_threshold=4,
        jitter=0.2,
    )
    assert upstream("health_check: {type: tcp, jitter: '5%'}").health_check == HealthCheckConfig(
        type="tcp", jitter=0.05
    )


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ("{type: tcp, path: /x}", "health_check.type: path and expect are for type: http"),
        ("{path: healthz}", "health_check.path: expected a path like '/healthz', got 'healthz'"),
        (
            "{expect: [700]}",
            "health_check.expect[0]: expected a status (100-599) or a range 'A-B', got '700'",
        ),
        ("{expect: ['400-300']}", "health_check.expect[0]: expected a status (100-599) or a range"),
        (
            "{jitter: 2}",
            "health_check.jitter: expected a fraction from 0 to 1 or 0% to 100%, got 2",
        ),
        ("{interval: 0s}", "health_check.interval: "),
        ("{type: udp}", "health_check.type: unsupported health check type 'udp'"),
    ],
)
def test_health_check_mistakes_are_reported(written: str, message: str) -> None:
    assert one_error(upstream_with(f"health_check: {written}")).startswith(
        f"routes.yaml:2: upstreams.u.{message}"
    )


def test_outlier_settings_and_off() -> None:
    assert upstream(
        "outlier: {consecutive_failures: 2, consecutive_5xx: 3, base_ejection: 1s,"
        " max_ejection: 8s, max_ejection_percent: 34}"
    ).outlier == OutlierConfig(2, 3, 1.0, 8.0, 34)
    assert upstream("outlier: false").outlier is None


@pytest.mark.parametrize(
    ("written", "message"),
    [
        (
            "{max_ejection_percent: 150}",
            "outlier.max_ejection_percent: a percentage is at most 100, got 150",
        ),
        (
            "{base_ejection: 10s, max_ejection: 5s}",
            "outlier.max_ejection: must be at least base_ejection",
        ),
        (  # above the default max_ejection, which the file does not write
            "{base_ejection: 10m}",
            "outlier.base_ejection: must be at most max_ejection (default 300s)",
        ),
        ("{consecutive_failures: 0}", "outlier.consecutive_failures: "),
    ],
)
def test_outlier_mistakes_are_reported(written: str, message: str) -> None:
    assert one_error(upstream_with(f"outlier: {written}")).startswith(
        f"routes.yaml:2: upstreams.u.{message}"
    )


def test_retries_with_statuses_as_numbers_backoff_and_budget() -> None:
    retries = upstream(
        "retries: {attempts: 3, on: [connect-failure, reset, 502, 503], per_try_timeout: 1s,"
        " backoff: {base: 10ms, max: 100ms}, budget: {percent: 10, min: 1}, body_limit: 1KiB}"
    ).retries
    assert retries == RetryConfig(
        attempts=3,
        on=frozenset({"connect-failure", "reset", "502", "503"}),
        per_try_timeout=1.0,
        backoff_base=0.01,
        backoff_max=0.1,
        budget_percent=10.0,
        budget_min=1,
        body_limit=1024,
    )
    assert upstream("retries: {attempts: 1}").retries.attempts == 1  # no retry


@pytest.mark.parametrize(
    ("written", "message"),
    [
        (
            "{on: [resett]}",
            "retries.on[0]: unsupported retry condition 'resett' (supported: "
            "connect-failure, refused-stream, reset, timeout, 502, 503, 504) "
            "(did you mean 'reset'?)",
        ),
        ("{on: [404]}", "retries.on[0]: unsupported retry condition '404'"),
        ("{attempts: 0}", "retries.attempts: "),
        ("{backoff: {base: 1s, max: 10ms}}", "retries.backoff.max: must be at least base"),
        (
            "{budget: {percent: 101}}",
            "retries.budget.percent: a percentage is at most 100, got 101",
        ),
    ],
)
def test_retry_mistakes_are_reported(written: str, message: str) -> None:
    assert one_error(upstream_with(f"retries: {written}")).startswith(
        f"routes.yaml:2: upstreams.u.{message}"
    )


def test_circuit_breaker_limits() -> None:
    assert upstream(
        "circuit_breaker: {max_connections: 10, max_pending: 0, max_requests: 5}"
    ).circuit_breaker == CircuitBreakerConfig(10, 0, 5)
    assert one_error(upstream_with("circuit_breaker: {max_requests: 0}")).startswith(
        "routes.yaml:2: upstreams.u.circuit_breaker.max_requests: "
    )


# --- upstreams ---


def test_endpoint_errors_name_the_endpoint() -> None:
    text = """\
        listeners: [{bind: ':0'}]
        upstreams:
          users:
            endpoints:
              - ftp://a
              - {url: http://b, weight: 0}
              - {weight: 2}
              - http://b:80
        routes: []
    """

    assert errors_of(text) == [
        "routes.yaml:5: upstreams.users.endpoints[0]: unsupported scheme 'ftp' in "
        "'ftp://a' (http:// or https://)",
        "routes.yaml:6: upstreams.users.endpoints[1].weight: must be at least 1, got 0",
        "routes.yaml:7: upstreams.users.endpoints[2]: missing required key 'url'",
        "routes.yaml:8: upstreams.users.endpoints[3]: duplicate endpoint 'http://b:80' "
        "(also upstreams.users.endpoints[1]; use weight)",
    ]


def test_an_upstream_needs_endpoints() -> None:
    assert one_error("listeners: [{bind: ':0'}]\nupstreams: {users: {}}\nroutes: []\n") == (
        "routes.yaml:2: upstreams.users: missing required key 'endpoints'"
    )


def test_an_unknown_balance_policy_is_an_error_with_a_suggestion() -> None:
    text = """\
        listeners: [{bind: ':0'}]
        upstreams: {u: {endpoints: [http://x], balance: randon}}
        routes: []
    """

    assert one_error(text) == (
        "routes.yaml:2: upstreams.u.balance: unsupported balance 'randon' (supported: "
        "round_robin, least_request, random, hash, sticky) (did you mean 'random'?)"
    )


def test_max_idle_cannot_exceed_max_connections() -> None:
    text = """\
        listeners: [{bind: ':0'}]
        upstreams:
          u:
            endpoints: [http://x]
            pool: {max_connections: 2, max_idle: 3}
        routes: []
    """

    assert one_error(text) == (
        "routes.yaml:5: upstreams.u.pool.max_idle: max_idle (3) > max_connections (2): "
        "idle connections are part of max_connections"
    )


def test_pool_limits_have_minimums() -> None:
    text = """\
        listeners: [{bind: ':0'}]
        upstreams: {u: {endpoints: [http://x], pool: {max_connections: 0, max_idle: -1}}}
        routes: []
    """

    assert errors_of(text) == [
        "routes.yaml:2: upstreams.u.pool.max_connections: must be at least 1, got 0",
        "routes.yaml:2: upstreams.u.pool.max_idle: must be at least 0, got -1",
    ]
