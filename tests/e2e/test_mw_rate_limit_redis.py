"""`rate_limit` with `backend: redis` end to end: two gateway processes (one worker each,
one on uvloop and one on asyncio) share one real redis-server, so a limit holds across
them exactly; when Redis dies, `on_redis_error` decides (allow: through without headers,
deny: 503), the outage is logged once, and the limit applies again once Redis is back.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.gateway_process import Gateway, free_port, gateway_config, run_gateway
from tests.support.redis_server import RedisServer, running_redis
from tests.support.upstreams import UpstreamServer, serve_in_thread

pytestmark = pytest.mark.socket

CLIENT_TIMEOUT_S = 10.0
REQUESTS = 60
# The configs' redis.timeout: what a frozen Redis costs each request, and long enough
# that a busy machine's Redis is never taken for a frozen one (an outage logged too many).
REDIS_TIMEOUT_S = 1.0
# How much longer than the Redis timeout a request may take (the upstream, the client,
# a busy machine's scheduling).
MARGIN_S = 4.0


@pytest.fixture
def h1_upstream() -> Iterator[UpstreamServer]:
    """The test upstream on its own loop in a thread (these tests are synchronous)."""
    with serve_in_thread(UpstreamServer()) as server:
        yield server


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path) as server:
        yield server


def limit_config(port: int, upstream_url: str, redis_url: str, *, key: str, on_error: str) -> str:
    return gateway_config(
        port,
        upstream_url,
        extra=f"""
middleware:
  limit:
    type: rate_limit
    rate: 10/h
    burst: 9
    key: "{key}"
    backend: redis
    redis: {{url: "{redis_url}", timeout: {REDIS_TIMEOUT_S}s, on_redis_error: {on_error}}}
global_middleware: [limit]
""",
    )


@contextlib.contextmanager
def two_gateways(
    tmp_path: Path, upstream: UpstreamServer, redis: RedisServer, *, key: str, on_error: str
) -> Iterator[tuple[Gateway, Gateway]]:
    """Two separate `gatehouse run` processes with the same limit on the same Redis."""
    with contextlib.ExitStack() as stack:
        gateways = []
        for loop in ("uvloop", "asyncio"):
            port = free_port()
            config = limit_config(port, upstream.url, redis.url, key=key, on_error=on_error)
            args = ("--workers", "1", "--loop", loop)
            gateways.append(
                stack.enter_context(run_gateway(config, tmp_path, port=port, args=args))
            )
        yield gateways[0], gateways[1]


def get(gateway: Gateway, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
        return client.get(gateway.url + path, headers=headers)


def spread(
    gateways: tuple[Gateway, Gateway], count: int, headers: dict[str, str] | None = None
) -> list[httpx.Response]:
    """`count` requests alternating between the gateways, 12 in flight at a time."""
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(get, gateways[i % 2], f"/echo/{i}", headers) for i in range(count)]
        return [future.result(CLIENT_TIMEOUT_S) for future in futures]


def statuses(responses: list[httpx.Response]) -> dict[int, int]:
    counted: dict[int, int] = {}
    for response in responses:
        counted[response.status_code] = counted.get(response.status_code, 0) + 1
    return counted


@pytest.mark.parametrize(
    ("key", "headers"), [("ip", None), ("header:X-Tenant", {"X-Tenant": "acme"})]
)
def test_limit_is_exact_across_two_gateway_processes(
    tmp_path: Path,
    h1_upstream: UpstreamServer,
    redis_server: RedisServer,
    key: str,
    headers: dict[str, str] | None,
) -> None:
    with two_gateways(tmp_path, h1_upstream, redis_server, key=key, on_error="deny") as gateways:
        # One admitted by each gateway first (in a concurrent burst, a busy machine could
        # let one gateway decide all ten), then the rest of the burst over both at once.
        first = [get(gateway, "/echo/first", headers) for gateway in gateways]
        assert [response.status_code for response in first] == [200, 200]
        responses = first + spread(gateways, REQUESTS - 2, headers)
        assert statuses(responses) == {200: 10, 429: REQUESTS - 10}
        for response in responses:
            if response.status_code == 200:
                assert response.headers["RateLimit-Limit"] == "10"
            else:
                assert response.json()["error"] == "rate_limited"
                assert response.headers["RateLimit-Remaining"] == "0"
                assert 1 <= int(response.headers["Retry-After"]) <= 360  # an emission
        assert len(h1_upstream.requests) == 10
        if headers is not None:  # another tenant has its own budget
            other = spread(gateways, 12, {"X-Tenant": "globex"})
            assert statuses(other) == {200: 10, 429: 2}


@pytest.mark.parametrize(("on_error", "down_status"), [("allow", 200), ("deny", 503)])
def test_redis_outage_follows_on_redis_error_and_the_limit_returns_with_redis(
    tmp_path: Path,
    h1_upstream: UpstreamServer,
    redis_server: RedisServer,
    on_error: str,
    down_status: int,
) -> None:
    """Frozen (every call times out after the Redis timeout), then killed (refused at once): either
    way on_redis_error answers, each outage is logged once at each end, and when Redis is
    back the limit holds again."""
    tenant = {"X-Tenant": "acme"}
    with two_gateways(
        tmp_path, h1_upstream, redis_server, key="header:X-Tenant", on_error=on_error
    ) as gateways:
        assert statuses(spread(gateways, 4, tenant)) == {200: 4}

        redis_server.freeze()
        try:
            for gateway in (*gateways, *gateways):
                started = time.monotonic()
                response = get(gateway, "/echo/frozen", tenant)
                assert response.status_code == down_status, response.text
                assert time.monotonic() - started < REDIS_TIMEOUT_S + MARGIN_S
        finally:
            redis_server.thaw()
        assert statuses(spread(gateways, 2, tenant)) == {200: 2}  # answering again

        redis_server.kill()
        down = spread(gateways, 20, tenant)
        assert statuses(down) == {down_status: 20}
        for response in down:
            assert "RateLimit-Limit" not in response.headers
            if on_error == "deny":
                assert response.json()["error"] == "rate_limit_unavailable"

        redis_server.start()  # empty: the budget starts afresh
        back = spread(gateways, 14, tenant)
        assert statuses(back) == {200: 10, 429: 4}

        for gateway in gateways:
            log = gateway.stderr()
            # each outage logged when it started and when it ended, not per request
            assert log.count("is unavailable") == 2, log
            assert log.count("answers again") == 2, log
