"""The rate_limit middleware without sockets: its options and their errors (file:line),
GCRA through the middleware, keys, the 429 and the RateLimit-* headers, metrics, and what
a backend that cannot decide leads to."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap

import pytest
from multidict import CIMultiDict

from metrics.definitions import REGISTRY
from middleware.rate_limit import (
    KeySpec,
    Rate,
    RateLimit,
    key_function,
    parse_key,
    parse_rate,
)
from middleware.rate_limit_local import LocalBackend
from middleware.rate_limit_redis import BackendState, RedisBackend
from proxy.config.document import ConfigError
from proxy.config.load import parse_config
from proxy.config.values import ConfigValueError
from proxy.core.body import Body
from proxy.core.models import Request, Response
from tests.middleware.test_rate_limit_local import FakeClock
from tests.support.gateway_process import REPO_ROOT, free_port

HEAD = """\
listeners: [{bind: 127.0.0.1:0}]
upstreams: {app: {endpoints: ["http://127.0.0.1:9"]}}
routes: [{match: {path: /}, upstream: app, middleware: [limit]}]
middleware:
"""


def config_text(options: str) -> str:
    """HEAD plus `limit: {type: rate_limit, <options>}` on line 5."""
    return HEAD + f"  limit: {{type: rate_limit, {options}}}\n"


def errors_of(options: str) -> list[str]:
    with pytest.raises(ConfigError) as failed:
        parse_config(config_text(options))
    return str(failed.value).splitlines()


def limiter(options: str, clock: FakeClock | None = None) -> RateLimit:
    """The `limit` instance built from `options`; on `clock`'s time when one is given."""
    instance = parse_config(config_text(options)).middleware["limit"].instance
    assert isinstance(instance, RateLimit)
    if clock is not None:
        instance.use_backend(LocalBackend(64, now=clock))
    return instance


def request(
    headers: dict[str, str] | None = None,
    *,
    ip: str = "10.0.0.1",
    consumer: str = "",
    route: str = "all",
) -> Request:
    made = Request("GET", b"/x", CIMultiDict(headers or {}), Body.from_bytes(b""))
    made.client = (ip, 40000)
    made.consumer = consumer
    made.exchange.route_name = route
    return made


class Upstream:
    """The rest of the chain: answers 200 with `headers` (raw bytes, as the forwarder's
    responses are, or a CIMultiDict) and counts the requests that reached it."""

    def __init__(self, headers: list[tuple[bytes, bytes]] | CIMultiDict[str] | None = None):
        self.headers = headers
        self.calls = 0

    async def __call__(self, request: Request) -> Response:
        self.calls += 1
        headers = self.headers
        if isinstance(headers, list):
            return Response(200, list(headers))
        return Response(200, CIMultiDict(headers or {}))


def decisions(name: str, result: str) -> float:
    value = REGISTRY.get_sample_value(
        "gatehouse_rate_limit_decisions_total", {"middleware": name, "result": result}
    )
    return value or 0.0


# -- values ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("100/s", Rate(100, 1.0)),
        ("1000/min", Rate(1000, 60.0)),
        ("1000/m", Rate(1000, 60.0)),
        ("10/h", Rate(10, 3600.0)),
        ("5/10s", Rate(5, 10.0)),
        (" 3 / 2 min ", Rate(3, 120.0)),
        ("1/D", Rate(1, 86400.0)),
    ],
)
def test_rates_parse(text: str, rate: Rate) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10/fortnight", "invalid rate '10/fortnight' (e.g. '100/s', '1000/min', '10/h'"),
        ("10", "invalid rate '10' ("),
        ("ten/s", "invalid rate 'ten/s' ("),
        ("-1/s", "invalid rate '-1/s' ("),
        ("0/s", "invalid rate '0/s': must allow at least one request"),
        ("5/0s", "invalid rate '5/0s': must allow at least one request"),
    ],
)
def test_bad_rates_say_why(text: str, message: str) -> None:
    with pytest.raises(ConfigValueError) as failed:
        parse_rate(text)
    assert str(failed.value).startswith(message)


def test_keys_parse() -> None:
    assert parse_key("ip") == KeySpec("ip")
    assert parse_key("consumer") == KeySpec("consumer")
    assert parse_key("route") == KeySpec("route")
    assert parse_key("header:X-API-Key") == KeySpec("header", "X-API-Key")
    for bad in ("nonsense", "header:", "header:X Key", "jwt:sub", "IP"):
        with pytest.raises(ConfigValueError):
            parse_key(bad)


def test_key_functions_fall_back_to_the_ip_when_the_header_or_consumer_is_absent() -> None:
    by_ip = key_function(KeySpec("ip"))
    by_header = key_function(KeySpec("header", "X-API-Key"))
    by_consumer = key_function(KeySpec("consumer"))
    by_route = key_function(KeySpec("route"))
    assert by_ip(request(ip="10.1.1.1")) == "10.1.1.1"
    assert by_header(request({"x-api-key": "k1"})) == "h:k1"
    assert by_header(request(ip="10.1.1.1")) == "ip:10.1.1.1"
    assert by_header(request({"X-API-Key": ""}, ip="10.1.1.1")) == "ip:10.1.1.1"
    assert by_consumer(request(consumer="alice")) == "c:alice"
    assert by_consumer(request(ip="10.1.1.1")) == "ip:10.1.1.1"
    assert by_route(request(route="users")) == "users"


# -- options and their errors ----------------------------------------------------------


def test_defaults() -> None:
    limit = limiter("rate: 100/s")
    assert (limit.emission_s, limit.tolerance_s, limit.limit) == (0.01, 0.0, 1)
    assert limit.key == KeySpec("ip")
    assert limit.headers is True
    assert limit.backend_name == "local"
    assert isinstance(limit.backend, LocalBackend)
    assert limit.backend.max_keys == 65536
    assert repr(limit) == (
        "<RateLimit 'limit' 100/1s burst=0 key=ip "
        "<LocalBackend slots=131072 probe=8 max_keys=65536>>"
    )


def test_every_option() -> None:
    limit = limiter("rate: 10/min, burst: 9, key: 'header:X-API-Key', headers: false, max_keys: 10")
    assert (limit.emission_s, limit.tolerance_s, limit.limit) == (6.0, 54.0, 10)
    assert limit.key == KeySpec("header", "X-API-Key")
    assert limit.headers is False
    assert isinstance(limit.backend, LocalBackend)
    assert limit.backend.slots == 32
    assert "key=header:X-API-Key" in repr(limit)


@pytest.mark.parametrize(
    ("options", "error"),
    [
        (
            "rate: 10/fortnight",
            "<string>:5: middleware.limit.rate: invalid rate '10/fortnight' (e.g. '100/s', "
            "'1000/min', '10/h', '5/10s'; units s, m or min, h, d)",
        ),
        (
            "rate: 100",
            "<string>:5: middleware.limit.rate: expected a rate like '100/s', got an integer "
            "(100); quote it to use it as text",
        ),
        (
            "rate: 1/s, burst: -1",
            "<string>:5: middleware.limit.burst: must be at least 0, got -1",
        ),
        (
            "rate: 1/s, key: nonsense",
            "<string>:5: middleware.limit.key: invalid key 'nonsense' (expected 'ip', "
            "'header:NAME', 'consumer' or 'route')",
        ),
        (
            "rate: 1/s, key: 'header:X Key'",
            "<string>:5: middleware.limit.key: invalid header name 'X Key' in key 'header:X Key'",
        ),
        (
            "rate: 1/s, backend: memcached",
            "<string>:5: middleware.limit.backend: unsupported backend 'memcached' "
            "(supported: local, redis)",
        ),
        (
            "rate: 1/s, max_keys: 0",
            "<string>:5: middleware.limit.max_keys: must be at least 1, got 0",
        ),
        (
            "rate: 1/s, max_keys: 100000000",
            "<string>:5: middleware.limit.max_keys: must be at most 16777216, got 100000000",
        ),
        (
            "rate: 1/s, headers: 'yes'",
            "<string>:5: middleware.limit.headers: expected true or false, got a string ('yes')",
        ),
        (
            "rate: 1/s, redis: {url: 'redis://127.0.0.1:6379'}",
            "<string>:5: middleware.limit.redis: only used with backend: redis",
        ),
        (
            "rate: 1/s, backend: redis",
            "<string>:5: middleware.limit: backend: redis needs a 'redis: {url: ...}' mapping",
        ),
        (
            "rate: 1/s, backend: redis, redis: {timeout: 1s}",
            "<string>:5: middleware.limit.redis: missing required key 'url'",
        ),
        (
            "rate: 1/s, backend: redis, redis: {url: 'redis://h', on_redis_error: maybe}",
            "<string>:5: middleware.limit.redis.on_redis_error: unsupported on_redis_error "
            "'maybe' (supported: allow, deny)",
        ),
        (
            "rate: 1/s, backend: redis, redis: {url: 'redis://h', timeout: 0s}",
            "<string>:5: middleware.limit.redis.timeout: must be greater than 0",
        ),
        (
            "rate: 1/s, backend: redis, redis: {url: 'redis://h'}, max_keys: 5",
            "<string>:5: middleware.limit.max_keys: only used with backend: local",
        ),
        (
            "rate: 1/s, burts: 5",
            "<string>:5: middleware.limit.burts: unknown key 'burts' (did you mean 'burst'?)",
        ),
        ("burst: 5", "<string>:5: middleware.limit: missing required key 'rate'"),
    ],
)
def test_option_errors_name_the_line_and_key(options: str, error: str) -> None:
    errors = errors_of(options)
    assert len(errors) == 1, errors
    assert errors[0].startswith(error), errors


def test_every_option_error_is_reported_together() -> None:
    errors = errors_of("rate: 10/fortnight, burst: -1, key: nonsense, backend: memcached")
    assert [line.split(": ")[1] for line in errors] == [
        "middleware.limit.rate",
        "middleware.limit.burst",
        "middleware.limit.key",
        "middleware.limit.backend",
    ]


def test_a_local_config_does_not_import_redis() -> None:
    """The redis backend (and redis-py) are imported only for `backend: redis`."""
    script = textwrap.dedent(f"""
        import json, sys
        from proxy.config.load import parse_config
        parse_config({config_text("rate: 1/s")!r})
        print(json.dumps([m in sys.modules for m in ("middleware.rate_limit_redis", "redis")]))
    """)
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert json.loads(result.stdout) == [False, False]


# -- decisions through the middleware ---------------------------------------------------


async def test_burst_plus_one_pass_then_429_until_the_next_emission() -> None:
    clock = FakeClock()
    limit = limiter("rate: 10/min, burst: 2", clock)
    upstream = Upstream()
    statuses = [(await limit(request(), upstream)).status for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    assert upstream.calls == 3
    clock.advance(5.9)
    assert (await limit(request(), upstream)).status == 429
    clock.advance(0.1)  # one emission (6s) after the first request
    assert (await limit(request(), upstream)).status == 200
    assert (await limit(request(), upstream)).status == 429
    clock.advance(18.0)  # three emissions: the whole burst is back
    statuses = [(await limit(request(), upstream)).status for _ in range(4)]
    assert statuses == [200, 200, 200, 429]


async def test_the_429_has_retry_after_and_ratelimit_headers() -> None:
    clock = FakeClock()
    limit = limiter("rate: 2/5s, burst: 1", clock)  # emission 2.5s
    upstream = Upstream()
    await limit(request(), upstream)
    await limit(request(), upstream)
    refused = await limit(request({"X-Request-ID": "rid-1"}), upstream)
    assert refused.status == 429
    assert refused.headers["Retry-After"] == "3"  # 2.5s, rounded up
    assert refused.headers["RateLimit-Limit"] == "2"
    assert refused.headers["RateLimit-Remaining"] == "0"
    assert refused.headers["RateLimit-Reset"] == "5"  # both emissions to pay back
    assert refused.headers["Content-Type"] == "application/json"
    body = json.loads(refused.body.take_all())
    assert body == {
        "error": "rate_limited",
        "message": "rate limit exceeded: retry in 3s",
        "request_id": "rid-1",
    }
    clock.advance(2.4)
    assert (await limit(request(), upstream)).headers["Retry-After"] == "1"  # 0.1s -> 1


async def test_the_headers_count_whole_seconds_on_a_clock_just_below_a_power_of_two() -> None:
    # At 2047.3 s, 2047.3 + 60 crosses 2048 and rounds up: (now + 60) - now is
    # 60.00000000000023, which a plain ceil() reported as a reset 61 s away (seen in CI
    # whenever the monotonic clock was within a minute below 1024 s, 2048 s, 4096 s...).
    clock = FakeClock(2047.3)
    assert (clock() + 60.0) - clock() > 60.0
    limit = limiter("rate: 1/min, burst: 2", clock)
    upstream = Upstream(headers=CIMultiDict())
    allowed = [await limit(request(), upstream) for _ in range(3)]
    refused = await limit(request(), upstream)
    assert [r.headers["RateLimit-Reset"] for r in allowed] == ["60", "120", "180"]
    assert refused.headers["RateLimit-Reset"] == "180"
    assert refused.headers["Retry-After"] == "60"
    clock.advance(59.0)  # one second from the next emission, whatever the rounding
    assert (await limit(request(), upstream)).headers["Retry-After"] == "1"


async def test_retry_after_is_at_least_one_second() -> None:
    clock = FakeClock()
    limit = limiter("rate: 100/s", clock)
    upstream = Upstream()
    await limit(request(), upstream)
    refused = await limit(request(), upstream)
    assert refused.status == 429
    assert refused.headers["Retry-After"] == "1"  # 10ms away, but the header is seconds


async def test_allowed_responses_carry_the_ratelimit_headers() -> None:
    clock = FakeClock()
    limit = limiter("rate: 1/s, burst: 2", clock)
    raw_upstream = Upstream([(b"X-Up", b"1")])
    first = await limit(request(), raw_upstream)
    assert first.raw_headers == [  # the upstream's raw bytes, appended to
        (b"X-Up", b"1"),
        (b"RateLimit-Limit", b"3"),
        (b"RateLimit-Remaining", b"2"),
        (b"RateLimit-Reset", b"1"),
    ]
    second = await limit(request(), Upstream(CIMultiDict({"X-Up": "2"})))
    assert list(second.headers.items()) == [
        ("X-Up", "2"),
        ("RateLimit-Limit", "3"),
        ("RateLimit-Remaining", "1"),
        ("RateLimit-Reset", "2"),
    ]


async def test_the_gateways_headers_replace_the_upstreams() -> None:
    clock = FakeClock()
    limit = limiter("rate: 1/s", clock)
    upstream = Upstream([(b"ratelimit-limit", b"500"), (b"RateLimit-Policy", b"500;w=60")])
    response = await limit(request(), upstream)
    assert response.headers.getall("RateLimit-Limit") == ["1"]
    assert response.headers["RateLimit-Remaining"] == "0"
    assert response.headers["RateLimit-Policy"] == "500;w=60"  # not one of ours: kept


async def test_headers_false_leaves_allowed_responses_alone_but_not_the_429() -> None:
    clock = FakeClock()
    limit = limiter("rate: 1/s, headers: false", clock)
    upstream = Upstream([(b"X-Up", b"1")])
    allowed = await limit(request(), upstream)
    assert allowed.raw_headers == [(b"X-Up", b"1")]
    refused = await limit(request(), upstream)
    assert refused.status == 429
    assert refused.headers["RateLimit-Limit"] == "1"
    assert refused.headers["Retry-After"] == "1"


@pytest.mark.parametrize(
    ("key", "same", "other"),
    [
        ("ip", request(ip="10.0.0.1"), request(ip="10.0.0.2")),
        (
            "'header:X-API-Key'",
            request({"X-API-Key": "one"}, ip="10.0.0.1"),
            request({"X-API-Key": "two"}, ip="10.0.0.1"),
        ),
        ("consumer", request(consumer="alice"), request(consumer="bob")),
        ("route", request(route="users", ip="10.0.0.1"), request(route="orders", ip="10.0.0.1")),
    ],
)
async def test_each_key_has_its_own_budget(key: str, same: Request, other: Request) -> None:
    limit = limiter(f"rate: 1/min, key: {key}", FakeClock())
    upstream = Upstream()
    assert (await limit(same, upstream)).status == 200
    assert (await limit(same, upstream)).status == 429
    assert (await limit(other, upstream)).status == 200  # a different key: a fresh budget


async def test_header_key_without_the_header_spends_the_ips_budget() -> None:
    limit = limiter("rate: 1/min, key: 'header:X-API-Key'", FakeClock())
    upstream = Upstream()
    assert (await limit(request(ip="10.0.0.7"), upstream)).status == 200
    assert (await limit(request(ip="10.0.0.7"), upstream)).status == 429
    assert (await limit(request(ip="10.0.0.8"), upstream)).status == 200
    # A header whose value looks like an IP is still a header key, not that IP's budget.
    assert (await limit(request({"X-API-Key": "10.0.0.7"}), upstream)).status == 200


async def test_decisions_are_counted() -> None:
    limit = limiter("rate: 1/min", FakeClock())
    before = decisions("limit", "allowed"), decisions("limit", "limited")
    upstream = Upstream()
    for _ in range(3):
        await limit(request(), upstream)
    after = decisions("limit", "allowed"), decisions("limit", "limited")
    assert (after[0] - before[0], after[1] - before[1]) == (1, 2)


# -- a backend that cannot decide: a real Redis client, and nothing listening -----------


def redis_limiter(on_error: str) -> RateLimit:
    url = f"redis://127.0.0.1:{free_port()}"  # free a moment ago: connections are refused
    return limiter(
        f"rate: 1/min, backend: redis, redis: {{url: '{url}', timeout: 500ms, "
        f"on_redis_error: {on_error}}}"
    )


async def test_on_redis_error_allow_passes_without_headers_and_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limit = redis_limiter("allow")
    assert isinstance(limit.backend, RedisBackend)
    assert limit.backend.key_prefix == "gatehouse:rate_limit:limit:"
    upstream = Upstream([(b"X-Up", b"1")])
    before = decisions("limit", "backend_error")
    with caplog.at_level(logging.INFO):
        await limit.start()  # Redis is down: logged, not raised
        responses = [await limit(request(), upstream) for _ in range(3)]
    await limit.close()
    assert [r.status for r in responses] == [200, 200, 200]
    assert upstream.calls == 3
    assert responses[0].raw_headers == [(b"X-Up", b"1")]  # no decision, no RateLimit-*
    assert decisions("limit", "backend_error") - before == 3
    # One outage, one log line: not one per request.
    assert [r.levelname for r in caplog.records if "unavailable" in r.getMessage()] == ["WARNING"]
    assert limit.backend.state is BackendState.CLOSED  # close() reached the backend


async def test_on_redis_error_deny_answers_503() -> None:
    limit = redis_limiter("deny")
    upstream = Upstream()
    before = decisions("limit", "backend_error")
    try:
        response = await limit(request({"X-Request-ID": "rid-2"}), upstream)
    finally:
        await limit.close()
    assert response.status == 503
    assert upstream.calls == 0
    body = json.loads(response.body.take_all())
    assert body["error"] == "rate_limit_unavailable"
    assert body["request_id"] == "rid-2"
    assert "Retry-After" not in response.headers
    assert decisions("limit", "backend_error") - before == 1


def test_a_redis_url_redis_py_cannot_use_is_a_config_error() -> None:
    errors = errors_of("rate: 1/s, backend: redis, redis: {url: 'http://example.com'}")
    assert len(errors) == 1
    assert errors[0].startswith("<string>:5: middleware.limit.redis.url: invalid Redis URL: ")
