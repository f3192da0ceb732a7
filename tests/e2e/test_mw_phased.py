"""The built-in middleware offer phases (proxy/exchange/phased.py): a route whose chain
is access_log, request_id, api_key and a rate_limit (local, or in Redis: a waiting phase)
runs as one function. The same
chain with one more middleware that has no phases runs through coroutines. Both routes of
one gateway must answer every request alike (status, headers, body) and send the same
request upstream, and log the same access-log fields."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import httpx
import pytest

from proxy.exchange.runtime import Runtime
from tests.support.gateway import GatewayFactory, base_url
from tests.support.helpers import eventually
from tests.support.redis_server import running_redis
from tests.support.upstreams import UpstreamServer

pytestmark = pytest.mark.socket

ROUNDS = 3  # the third request of a key is over its rate limit on either route
# Headers that differ between any two requests, whichever the route (and the length of
# an echo, which shows the stamp the coroutine route adds: the body is compared without).
VOLATILE = {"date", "x-request-id", "ratelimit-reset", "content-length"}


def config(upstream: UpstreamServer, redis_url: str | None = None) -> str:
    # One limiter per route, alike: each route's requests spend their own budget. The
    # coroutine route has one more middleware, EAGER without phases (EagerRun drives it).
    # With `redis_url`, the limiters decide in Redis: the phased route waits on a Pending.
    backend = f"backend: redis, redis: {{url: '{redis_url}', timeout: 10s}}" if redis_url else ""
    return f"""
listeners: [{{bind: 127.0.0.1:0}}]
upstreams: {{app: {{endpoints: [{upstream.url}]}}}}
middleware:
  log: {{type: access_log, fields: [method, path, route, status, consumer]}}
  ids: {{type: request_id}}
  keys: {{type: api_key, query: api_key, keys: [{{key: k1, consumer: alice}}]}}
  limit_p: {{type: rate_limit, rate: 3/min, burst: 1, key: consumer, {backend}}}
  limit_c: {{type: rate_limit, rate: 3/min, burst: 1, key: consumer, {backend}}}
  stamp: {{type: "tests.support.plugins.stamp:EagerStamp", value: s, header: X-Stamp}}
routes:
  - {{name: phased, match: {{path_prefix: /p/}}, upstream: app,
      middleware: [log, ids, keys, limit_p], rewrite: {{strip_prefix: /p}}}}
  - {{name: coroutines, match: {{path_prefix: /c/}}, upstream: app,
      middleware: [log, ids, keys, limit_c, stamp], rewrite: {{strip_prefix: /c}}}}
"""


def comparable(response: httpx.Response) -> tuple[int, list[tuple[str, str]], bytes]:
    headers = [
        (name.lower(), value)
        for name, value in response.headers.multi_items()
        if name.lower() not in VOLATILE and name.lower() != "x-stamp"
    ]
    body = response.content
    if response.headers.get("content-type") == "application/json":
        document = response.json()
        document.pop("request_id", None)
        if "headers" in document:  # the echo upstream: what it was sent
            document["headers"] = [
                (name.lower(), value)
                for name, value in document["headers"]
                # Random per exchange: request ids, and the span id of the upstream try.
                if name.lower() not in ("x-request-id", "x-stamp", "traceparent")
            ]
        body = json.dumps(document, sort_keys=True).encode()
    return response.status_code, headers, body


@pytest.mark.parametrize("backend", ["local", "redis"])
@pytest.mark.parametrize(
    "target",
    [
        "echo/a?api_key=k1",  # admitted, headers from the limiter
        "echo/b?x=1&api_key=k1&y=2",  # the key cut out of the query
        "echo/c",  # no key: 401
        "echo/d?api_key=wrong",  # 403
        "status/503?api_key=k1",  # the upstream's error
    ],
)
async def test_the_phased_chain_answers_as_the_coroutine_chain_does(
    backend: str,
    target: str,
    gateway_factory: GatewayFactory,
    h1_upstream: UpstreamServer,
    capfd: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    with contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(running_redis(tmp_path)).url if backend == "redis" else None
        await compare_routes(target, gateway_factory, h1_upstream, capfd, redis_url)


async def compare_routes(
    target: str,
    gateway_factory: GatewayFactory,
    h1_upstream: UpstreamServer,
    capfd: pytest.CaptureFixture[str],
    redis_url: str | None,
) -> None:
    server = await gateway_factory(config(h1_upstream, redis_url))
    runtime: Runtime = server.runtime
    assert runtime.routes["phased"].phased is not None
    assert runtime.routes["coroutines"].phased is None
    assert runtime.routes["coroutines"].eager is (redis_url is None)
    statuses = []
    async with httpx.AsyncClient() as client:
        # The first round finds no idle upstream connection, the next ones do.
        for _ in range(ROUNDS):
            phased = await client.get(f"{base_url(server)}/p/{target}")
            coroutines = await client.get(f"{base_url(server)}/c/{target}")
            assert comparable(phased) == comparable(coroutines)
            statuses.append(phased.status_code)
    assert len(set(statuses)) == 1 or statuses[-1] == 429  # (the limit is reached)
    lines: list[dict[str, object]] = []

    def logged() -> bool:
        lines.extend(json.loads(line) for line in capfd.readouterr().out.splitlines())
        return len(lines) >= 2 * ROUNDS

    await eventually(logged, "the access log lines")
    by_route = {
        route: [
            (line["method"], str(line["path"])[2:], line["status"], line["consumer"])
            for line in lines
            if line["route"] == route
        ]
        for route in ("phased", "coroutines")
    }
    assert by_route["phased"] == by_route["coroutines"]
    assert [status for _, _, status, _ in by_route["phased"]] == statuses
