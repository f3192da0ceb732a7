"""`rate_limit` (local backend) through real sockets: the burst then 429 with Retry-After
and RateLimit-* headers, the keys (ip, header, consumer set by an earlier middleware,
route), a named instance shared by two routes, HTTP/2, and a gateway with two worker
processes that admits exactly the limit in total, restarted worker included, also after a
reload that changes the instance (each worker builds it anew and they share one table)."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from middleware.base import Handler
from middleware.options import Options
from middleware.rate_limit import RateLimit
from middleware.rate_limit_local import LocalBackend
from proxy.core.models import Request, Response
from proxy.process.server import Server
from tests.middleware.test_rate_limit_local import FakeClock
from tests.support.admin_client import admin_reload
from tests.support.gateway import GatewayFactory, base_url
from tests.support.gateway_process import (
    child_pids,
    free_port,
    gateway_config,
    listening,
    pids_connected_to,
    run_gateway,
    wait_until,
)
from tests.support.h2_client import H2Client
from tests.support.upstreams import UpstreamServer, serve_in_thread

pytestmark = pytest.mark.socket

CLIENT_TIMEOUT_S = 10.0


class SetConsumer:
    """A stand-in for an auth middleware (a plugin, loaded by dotted path): the caller is
    whoever `X-User` names."""

    OPTIONS = ()

    def __init__(self, options: Options) -> None:
        pass

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        request.consumer = request.header("X-User") or ""
        return await call_next(request)


def config(upstream: UpstreamServer, sections: str, middleware: str = "[limit]") -> str:
    """Two routes, /a/ and /b/, both running `middleware`."""
    return f"""
listeners: [{{bind: 127.0.0.1:0}}]
upstreams: {{app: {{endpoints: [{upstream.url}]}}}}
{sections}
routes:
  - {{name: a, match: {{path_prefix: /a/}}, upstream: app, middleware: {middleware}}}
  - {{name: b, match: {{path_prefix: /b/}}, upstream: app, middleware: {middleware}}}
"""


def stop_the_clock(server: Server) -> None:
    """The `limit` instance of `server` decides on a clock that stands still: the exact
    RateLimit-Reset and Retry-After values hold for requests at one logical time, which
    a busy machine can spread over more than a second of the real clock (119, not 120)."""
    limit = server.config.middleware["limit"].instance
    assert isinstance(limit, RateLimit)
    limit.use_backend(LocalBackend(64, now=FakeClock()))


async def statuses(
    client: httpx.AsyncClient, url: str, count: int, headers: dict[str, str] | None = None
) -> list[int]:
    return [(await client.get(url, headers=headers)).status_code for _ in range(count)]


async def test_the_burst_passes_then_429_with_retry_after_and_ratelimit_headers(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    server = await gateway_factory(
        config(h1_upstream, "middleware: {limit: {type: rate_limit, rate: 1/min, burst: 2}}")
    )
    stop_the_clock(server)
    url = base_url(server) + "/a/echo"
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as client:
        allowed = [await client.get(url) for _ in range(3)]
        refused = await client.get(url, headers={"X-Request-ID": "rid-429"})
    assert [r.status_code for r in allowed] == [200, 200, 200]
    assert [r.headers["RateLimit-Limit"] for r in allowed] == ["3", "3", "3"]
    assert [r.headers["RateLimit-Remaining"] for r in allowed] == ["2", "1", "0"]
    assert [r.headers["RateLimit-Reset"] for r in allowed] == ["60", "120", "180"]
    assert len(h1_upstream.requests) == 3  # the refused one never reached it
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "60"
    assert refused.headers["RateLimit-Limit"] == "3"
    assert refused.headers["RateLimit-Remaining"] == "0"
    assert refused.headers["RateLimit-Reset"] == "180"
    assert refused.headers["X-Request-ID"] == "rid-429"
    assert refused.json() == {
        "error": "rate_limited",
        "message": "rate limit exceeded: retry in 60s",
        "request_id": "rid-429",
    }


async def test_a_post_body_refused_with_429_does_not_break_the_connection(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    sections = f"http1_parser: {codec}\nmiddleware: {{limit: {{type: rate_limit, rate: 1/min}}}}"
    server = await gateway_factory(config(h1_upstream, sections))
    url = base_url(server) + "/a/echo"
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as client:
        first = await client.post(url, content=b"x" * 100_000)
        second = await client.post(url, content=b"y" * 100_000)  # same connection
        third = await client.get(url)
    assert (first.status_code, second.status_code, third.status_code) == (200, 429, 429)
    assert first.json()["body"] == "x" * 100_000


async def test_header_key_gives_each_api_key_its_budget(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    sections = """
middleware:
  limit: {type: rate_limit, rate: 1/min, burst: 1, key: "header:X-API-Key", headers: false}
"""
    server = await gateway_factory(config(h1_upstream, sections))
    url = base_url(server) + "/a/echo"
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as client:
        one = await statuses(client, url, 3, {"X-API-Key": "one"})
        two = await statuses(client, url, 3, {"X-API-Key": "two"})
        allowed = await client.get(url, headers={"X-API-Key": "three"})
    assert one == two == [200, 200, 429]
    assert "RateLimit-Limit" not in allowed.headers  # headers: false
    # The upstream still gets the key: rate limiting reads it, never strips it.
    assert [r.header("X-API-Key") for r in h1_upstream.requests] == [
        "one",
        "one",
        "two",
        "two",
        "three",
    ]


async def test_consumer_key_uses_what_an_earlier_middleware_found(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    sections = """
middleware:
  who: {type: "tests.e2e.test_mw_rate_limit:SetConsumer"}
  limit: {type: rate_limit, rate: 1/min, key: consumer}
"""
    server = await gateway_factory(config(h1_upstream, sections, "[who, limit]"))
    url = base_url(server) + "/a/echo"
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as client:
        alice = await statuses(client, url, 2, {"X-User": "alice"})
        bob = await statuses(client, url, 2, {"X-User": "bob"})
        anonymous = await statuses(client, url, 2)  # no consumer: the client IP's budget
    assert alice == bob == anonymous == [200, 429]


async def test_a_named_instance_on_two_routes_is_one_budget_unless_keyed_by_route(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    sections = """
middleware:
  per-ip: {type: rate_limit, rate: 1/min, burst: 1}
  per-route: {type: rate_limit, rate: 1/min, key: route}
"""
    shared = await gateway_factory(config(h1_upstream, sections, "[per-ip]"))
    by_route = await gateway_factory(config(h1_upstream, sections, "[per-route]"))
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as client:
        a = await statuses(client, base_url(shared) + "/a/echo", 1)
        b = await statuses(client, base_url(shared) + "/b/echo", 2)
        route_a = await statuses(client, base_url(by_route) + "/a/echo", 2)
        route_b = await statuses(client, base_url(by_route) + "/b/echo", 2)
    assert a + b == [200, 200, 429]  # two allowed across both routes
    assert route_a == route_b == [200, 429]


async def test_http2_gets_the_same_answers(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    server = await gateway_factory(
        config(h1_upstream, "middleware: {limit: {type: rate_limit, rate: 1/min}}")
    )
    stop_the_clock(server)
    host, port = server.addresses[0]
    async with await H2Client.connect(host, port) as client:
        allowed = await client.request("/a/echo")
        refused = await client.request("/a/echo")
    assert allowed.status == 200
    assert allowed.header(b"ratelimit-limit") == b"1"
    assert allowed.header(b"ratelimit-remaining") == b"0"
    assert refused.status == 429
    assert refused.header(b"retry-after") == b"60"
    assert refused.header(b"ratelimit-reset") == b"60"
    assert b'"error": "rate_limited"' in refused.body


# -- several worker processes ------------------------------------------------------------


@pytest.fixture
def threaded_upstream() -> Iterator[UpstreamServer]:
    """The test upstream on its own loop in a thread (the process test is synchronous)."""
    with serve_in_thread(UpstreamServer()) as server:
        yield server


async def _by_worker(
    port: int, count: int, workers: set[int]
) -> tuple[list[int], dict[int, list[int]]]:
    """`count` connections opened together, one GET each, all sent before any answer is
    read: the statuses, and which statuses each worker answered (found in /proc while the
    connections are still open)."""
    connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]
    try:
        for index, (_, writer) in enumerate(connections):
            writer.write(f"GET /echo/{index} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
        codes: list[int] = []
        by_worker: dict[int, list[int]] = {pid: [] for pid in workers}
        async with asyncio.timeout(CLIENT_TIMEOUT_S):
            for reader, writer in connections:
                head = await reader.readuntil(b"\r\n\r\n")
                fields = dict(
                    line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:] if line
                )
                await reader.readexactly(int(fields[b"content-length"]))
                status = int(head.split(b" ")[1])
                if status == 429:
                    # One emission (3600s / 10) after the first admitted request, minus
                    # the time since (whole seconds on a slow or loaded host).
                    assert 0 < int(fields[b"retry-after"]) <= 360, head
                    assert fields[b"ratelimit-remaining"] == b"0", head
                codes.append(status)
                holders = pids_connected_to(writer.get_extra_info("sockname")[1], workers)
                assert len(holders) == 1, holders
                by_worker[holders.pop()].append(status)
        return codes, by_worker
    finally:
        for _, writer in connections:
            writer.close()


def test_two_workers_admit_exactly_the_limit_in_total(
    tmp_path: Path, threaded_upstream: UpstreamServer
) -> None:
    """rate 10/h, burst 9: ten at once, the next one six minutes later. 60 requests on 60
    parallel connections spread over two workers: exactly 10 are admitted, 50 refused,
    and both workers decided some. A worker that dies and is replaced shares the table
    too: the replacement admits nothing more."""
    port = free_port()
    extra = """
middleware:
  limit: {type: rate_limit, rate: 10/h, burst: 9}
global_middleware: [limit]
shutdown: {grace_period: 5s}
"""
    config_text = gateway_config(port, threaded_upstream.url, extra=extra)
    with run_gateway(config_text, tmp_path, port=port, args=("--workers", "2")) as gw:
        wait_until(lambda: len(child_pids(gw.pid)) == 2, 10.0, "2 workers")
        workers = child_pids(gw.pid)
        for worker in workers:
            wait_until(functools.partial(listening, worker, port), 10.0, f"{worker} to bind")

        codes, by_worker = asyncio.run(_by_worker(port, 60, workers))
        assert (codes.count(200), codes.count(429)) == (10, 50), codes
        assert len(threaded_upstream.requests) == 10
        assert all(by_worker.values()), by_worker  # both workers decided some

        # A replacement worker is forked from the same parent: same table, no new budget.
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: victim not in child_pids(gw.pid) and len(child_pids(gw.pid)) == 2,
            10.0,
            "a replacement worker",
        )
        (replacement,) = child_pids(gw.pid) - workers
        wait_until(lambda: listening(replacement, port), 10.0, "the replacement to bind")
        workers = child_pids(gw.pid)
        codes, by_worker = asyncio.run(_by_worker(port, 40, workers))
        assert codes == [429] * 40, codes
        assert by_worker[replacement], by_worker  # it decided some, and refused them all
        assert len(threaded_upstream.requests) == 10


def test_a_limit_changed_by_a_reload_is_exact_across_workers_and_a_restarted_one(
    tmp_path: Path, threaded_upstream: UpstreamServer
) -> None:
    """A reload that changes the instance (burst 9 -> 4) makes each worker build it on its
    own, after the fork: they open one table in the gateway's shared directory, so 60
    requests over both workers admit exactly the new 5. A worker restarted after the
    reload (forked from the parent, which built it too) admits nothing more."""
    port, admin = free_port(), free_port()

    def config_with(burst: int) -> str:
        extra = f"""
admin: {{bind: 127.0.0.1:{admin}}}
reload: {{watch: false}}
middleware:
  limit: {{type: rate_limit, rate: 10/h, burst: {burst}}}
global_middleware: [limit]
shutdown: {{grace_period: 5s}}
"""
        return gateway_config(port, threaded_upstream.url, extra=extra)

    with run_gateway(config_with(9), tmp_path, port=port, args=("--workers", "2")) as gw:
        wait_until(lambda: len(child_pids(gw.pid)) == 2, 10.0, "2 workers")
        workers = child_pids(gw.pid)
        for worker in workers:
            wait_until(functools.partial(listening, worker, port), 10.0, f"{worker} to bind")
        gw.config_path.write_text(config_with(4))
        reloaded = admin_reload(admin)
        assert reloaded.status_code == 200, reloaded.text
        assert child_pids(gw.pid) == workers  # the same workers built the new instance

        codes, by_worker = asyncio.run(_by_worker(port, 60, workers))
        assert (codes.count(200), codes.count(429)) == (5, 55), codes
        assert all(by_worker.values()), by_worker  # both workers decided some

        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: victim not in child_pids(gw.pid) and len(child_pids(gw.pid)) == 2,
            10.0,
            "a replacement worker",
        )
        (replacement,) = child_pids(gw.pid) - workers
        wait_until(lambda: listening(replacement, port), 10.0, "the replacement to bind")
        workers = child_pids(gw.pid)
        codes, by_worker = asyncio.run(_by_worker(port, 40, workers))
        assert codes == [429] * 40, codes
        assert by_worker[replacement], by_worker
        assert len(threaded_upstream.requests) == 5
