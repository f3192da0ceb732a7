"""`cache` with `backend: redis` end to end: a gateway of two workers (uvloop) and a
second gateway process (asyncio) share one real redis-server, so a response one stored
is a hit for the other; the admin API's POST /cache/purge empties every worker's cache
and Redis; and with Redis gone, requests bypass the cache and never fail."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from middleware.cache_rules import format_http_date
from proxy.testing.upstream import ScriptedUpstream
from tests.support.admin_client import WRITE_HEADERS, wait_ready
from tests.support.gateway_process import Gateway, free_port, run_gateway, wait_until
from tests.support.redis_server import RedisServer, running_redis
from tests.support.upstreams import serve_in_thread

pytestmark = pytest.mark.socket

CLIENT_TIMEOUT_S = 10.0
PREFIX = "gatehouse:cache:shared:"


@pytest.fixture
def origin() -> Iterator[ScriptedUpstream]:
    upstream = ScriptedUpstream("origin")
    upstream.on("GET", prefix="/doc").reply(
        body="shared body",
        headers={"Date": format_http_date(time.time()), "Cache-Control": "max-age=600"},
    )
    with serve_in_thread(upstream) as server:  # type: ignore[type-var]
        yield server


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path) as server:
        yield server


def config(
    port: int, upstream_url: str, redis_url: str, *, admin: int = 0, workers: int = 1
) -> str:
    admin_section = f"admin: {{bind: 127.0.0.1:{admin}}}\n" if admin else ""
    return f"""
listeners: [{{bind: 127.0.0.1:{port}}}]
{admin_section}workers: {workers}
reload: {{watch: false}}
upstreams: {{app: {{endpoints: [{upstream_url}]}}}}
middleware:
  shared:
    type: cache
    backend: redis
    redis: {{url: "{redis_url}", timeout: 1s}}
    key: {{host: false}}  # the two gateways listen on different ports (Host)
routes:
  - {{name: all, match: {{path_prefix: /}}, upstream: app, middleware: [shared]}}
"""


@contextlib.contextmanager
def two_gateways(
    tmp_path: Path, origin: ScriptedUpstream, redis: RedisServer
) -> Iterator[tuple[Gateway, Gateway, int]]:
    """A two-worker gateway with an admin listener, and a one-worker one, on one Redis."""
    with contextlib.ExitStack() as stack:
        port, admin, other = free_port(), free_port(), free_port()
        first = stack.enter_context(
            run_gateway(
                config(port, origin.url, redis.url, admin=admin, workers=2),
                tmp_path,
                port=port,
                args=("--loop", "uvloop"),
            )
        )
        wait_ready(admin)
        second = stack.enter_context(
            run_gateway(
                config(other, origin.url, redis.url),
                tmp_path,
                port=other,
                args=("--loop", "asyncio"),
            )
        )
        yield first, second, admin


def get(gateway: Gateway, path: str) -> httpx.Response:
    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:  # a new connection each time
        return client.get(gateway.url + path)


def stored_keys(redis_url: str) -> int:
    with redis.Redis.from_url(redis_url) as client:
        return len(client.keys(PREFIX + "*"))


def upstream_saw(origin: ScriptedUpstream, path: str) -> int:
    return sum(1 for request in list(origin.requests) if request.path == path)


def test_workers_and_gateways_share_one_redis_and_purge_empties_it(
    tmp_path: Path, origin: ScriptedUpstream, redis_server: RedisServer
) -> None:
    with two_gateways(tmp_path, origin, redis_server) as (first, second, admin):
        miss = get(first, "/doc/1")
        assert (miss.status_code, miss.text) == (200, "shared body")
        assert miss.headers["cache-status"].endswith("; stored")
        wait_until(lambda: stored_keys(redis_server.url) == 1, 10.0, "the entry in Redis")
        # The other gateway (another process, another loop) finds it in Redis, and so
        # does every worker of the first, whichever takes each new connection.
        hit = get(second, "/doc/1")
        assert hit.headers["cache-status"].startswith("gatehouse; hit; ttl=")
        assert hit.text == "shared body"
        for _ in range(8):
            assert get(first, "/doc/1").headers["cache-status"].startswith("gatehouse; hit")
        assert upstream_saw(origin, "/doc/1") == 1

        get(first, "/doc/2")
        wait_until(lambda: stored_keys(redis_server.url) == 2, 10.0, "two entries in Redis")
        purged = httpx.post(
            f"http://127.0.0.1:{admin}/cache/purge",
            params={"prefix": ""},
            headers=WRITE_HEADERS,
            timeout=CLIENT_TIMEOUT_S,
        )
        assert purged.status_code == 200, purged.text
        assert purged.json()["ok"] is True
        assert purged.json()["purged"]["shared"] == 2
        assert stored_keys(redis_server.url) == 0
        assert "fwd=uri-miss" in get(second, "/doc/1").headers["cache-status"]
        assert upstream_saw(origin, "/doc/1") == 2

        bad = httpx.post(
            f"http://127.0.0.1:{admin}/cache/purge", headers=WRITE_HEADERS, timeout=CLIENT_TIMEOUT_S
        )
        assert bad.status_code == 400
        unknown = httpx.post(
            f"http://127.0.0.1:{admin}/cache/purge",
            params={"key": "x", "middleware": "nope"},
            headers=WRITE_HEADERS,
            timeout=CLIENT_TIMEOUT_S,
        )
        assert unknown.status_code == 404


def test_an_unreachable_redis_bypasses_the_cache_and_never_fails_a_request(
    tmp_path: Path, origin: ScriptedUpstream, redis_server: RedisServer
) -> None:
    port = free_port()
    with run_gateway(config(port, origin.url, redis_server.url), tmp_path, port=port) as gateway:
        get(gateway, "/doc/a")
        wait_until(lambda: stored_keys(redis_server.url) == 1, 10.0, "the entry in Redis")
        redis_server.kill()
        for _ in range(3):
            answer = get(gateway, "/doc/a")
            assert (answer.status_code, answer.text) == (200, "shared body")
            assert answer.headers["cache-status"] == (
                "gatehouse; fwd=bypass; detail=backend-unavailable"
            )
        assert gateway.stderr().count("is unavailable") == 1
