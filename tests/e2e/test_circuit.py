"""The circuit breaker through real sockets: past max_requests, max_pending or
max_connections a request gets 503 `upstream_overloaded` at once, not a place in a
queue; the requests within the limits are served."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from metrics.traffic import UPSTREAM_OVERLOADED
from proxy.process.server import Server
from tests.support.gateway import GatewayFactory, H1UpstreamFactory, base_url
from tests.support.upstreams import H2UpstreamServer, UpstreamServer

pytestmark = pytest.mark.socket


def config(
    upstream: UpstreamServer | H2UpstreamServer, options: str, protocol: str = "http1"
) -> str:
    return f"""
listeners:
  - bind: 127.0.0.1:0
upstreams:
  app:
    endpoints: [{upstream.url}]
    protocol: {protocol}
    {options}
routes:
  - name: all
    match: {{path_prefix: /}}
    upstream: app
"""


async def wait_for(condition: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


# The requests that fill a limit are held by the upstream (its /held path) until the
# test lets them go, after the refused request was answered: a request queued behind
# them would not be answered at all (the client would time out).


async def overloaded_at_once(
    server: Server, limit: str, holders: list[asyncio.Task[httpx.Response]]
) -> None:
    """One more request is refused with 503 upstream_overloaded, counted, while the
    requests holding the limit are still in flight (it did not wait for them)."""
    counter = UPSTREAM_OVERLOADED.labels("app", limit)
    before = counter.value
    async with httpx.AsyncClient(base_url=base_url(server), timeout=5) as client:
        response = await client.get("/slow/1")
    assert response.status_code == 503
    assert response.json()["error"] == "upstream_overloaded"
    assert not any(holder.done() for holder in holders)
    assert counter.value == before + 1


async def test_max_requests_refuses_the_third_concurrent_request_at_once(
    gateway_factory: GatewayFactory, h1_upstream_factory: H1UpstreamFactory
) -> None:
    upstream = await h1_upstream_factory()
    server = await gateway_factory(config(upstream, "circuit_breaker: {max_requests: 2}"))
    async with httpx.AsyncClient(base_url=base_url(server), timeout=5) as client:
        held = [asyncio.create_task(client.get(f"/held?n={n}")) for n in range(2)]
        await wait_for(lambda: len(upstream.requests) == 2)
        await overloaded_at_once(server, "max_requests", held)
        upstream.release_held()
        assert [(await task).status_code for task in held] == [200, 200]
        # The limit counts requests in flight, not requests ever made.
        assert (await client.get("/echo/after")).status_code == 200


async def test_max_pending_refuses_a_request_that_would_wait_past_it(
    gateway_factory: GatewayFactory, h1_upstream_factory: H1UpstreamFactory
) -> None:
    upstream = await h1_upstream_factory()
    options = "pool: {max_connections: 1}\n    circuit_breaker: {max_pending: 1}"
    server = await gateway_factory(config(upstream, options))
    pool = server.runtime.upstreams["app"].pools[0]
    async with httpx.AsyncClient(base_url=base_url(server), timeout=5) as client:
        first = asyncio.create_task(client.get("/held?n=1"))
        await wait_for(lambda: len(upstream.requests) == 1)
        second = asyncio.create_task(client.get("/slow/1?n=2"))  # waits for the connection
        await wait_for(lambda: pool.occupancy().waiting == 1)
        await overloaded_at_once(server, "max_pending", [first, second])
        upstream.release_held()
        assert (await first).status_code == 200
        assert (await second).status_code == 200  # the one waiting within the limit


async def test_max_connections_refuses_a_request_that_needs_one_more(
    gateway_factory: GatewayFactory, h1_upstream_factory: H1UpstreamFactory
) -> None:
    upstream = await h1_upstream_factory()
    server = await gateway_factory(config(upstream, "circuit_breaker: {max_connections: 1}"))
    async with httpx.AsyncClient(base_url=base_url(server), timeout=5) as client:
        first = asyncio.create_task(client.get("/held"))
        await wait_for(lambda: len(upstream.requests) == 1)
        await overloaded_at_once(server, "max_connections", [first])
        upstream.release_held()
        assert (await first).status_code == 200
        # Its connection is idle again: the next request reuses it, within the limit.
        assert (await client.get("/echo/reuse")).status_code == 200
    assert upstream.connections == 1


async def test_max_requests_on_an_http2_upstream(gateway_factory: GatewayFactory) -> None:
    upstream = await H2UpstreamServer().start()
    try:
        yaml = config(upstream, "circuit_breaker: {max_requests: 1}", protocol="h2c")
        server = await gateway_factory(yaml)
        async with httpx.AsyncClient(base_url=base_url(server), timeout=5) as client:
            held = asyncio.create_task(client.get("/held"))
            await wait_for(lambda: len(upstream.requests) == 1)
            await overloaded_at_once(server, "max_requests", [held])
            upstream.release_held()
            assert (await held).status_code == 200
    finally:
        await upstream.stop()
