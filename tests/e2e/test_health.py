"""Upstream health end to end: active health checks and outlier ejection through an
in-process gateway, with real loopback upstreams the test switches between answering
well, answering 5xx, and refusing connections (stopped, then started on the same port)."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Iterable

import httpx
import pytest

from metrics.traffic import UPSTREAM_EJECTIONS, UPSTREAM_HEALTH_CHECKS, UPSTREAM_PANIC
from proxy.config.load import parse_config
from proxy.process.server import Server
from proxy.testing import ScriptedUpstream, start_upstream
from tests.proxy.upstream.test_outlier import Clock
from tests.support.gateway import GatewayFactory, base_url
from tests.support.helpers import eventually

pytestmark = pytest.mark.socket


class Switchable:
    """An HTTP/1.1 upstream on 127.0.0.1 that answers every request with `status` (and
    `/healthz` with `health_status`), its port as the body. `stop` refuses connections
    from then on; `start` listens on the same port again."""

    def __init__(self) -> None:
        self.status = 200
        self.health_status = 200
        self.hits = 0  # requests other than health checks
        self.health_hits = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> Switchable:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for writer in list(self._writers):
            writer.close()
        await server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.split(b" ", 2)[1] == b"/healthz":
                    self.health_hits += 1
                    status = self.health_status
                else:
                    self.hits += 1
                    status = self.status
                body = str(self.port).encode()
                writer.write(
                    b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)
                )
                await writer.drain()
                if b"\r\nconnection: close" in head.lower():
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


@pytest.fixture
async def endpoints() -> AsyncIterator[list[Switchable]]:
    """Three running upstreams; all stopped at teardown."""
    servers = [await Switchable().start() for _ in range(3)]
    yield servers
    for server in servers:
        await server.stop()


def _config(servers: Iterable[Switchable | ScriptedUpstream], upstream: str) -> str:
    urls = ", ".join(server.url for server in servers)
    return f"""
listeners:
  - bind: 127.0.0.1:0
upstreams:
  app:
    endpoints: [{urls}]
    retries: {{attempts: 1}}  # every failure shows
{upstream}
routes:
  - name: all
    match: {{path_prefix: /}}
    upstream: app
"""


# Checks come every 30 ms, but a healthy endpoint's check has 5 s to answer: a busy
# machine that kept two answers waiting would otherwise take it out of rotation.
HEALTH = """
    health_check: {path: /healthz, interval: 30ms, timeout: 5s, jitter: "10%",
                   healthy_threshold: 2, unhealthy_threshold: 2}
    outlier: false
"""


async def _send(server: Server, count: int) -> Counter[tuple[int, str]]:
    """`count` requests one after another: (status, answering port or '') of each."""
    answers: Counter[tuple[int, str]] = Counter()
    async with httpx.AsyncClient(base_url=base_url(server), timeout=5) as client:
        for _ in range(count):
            response = await client.get("/work")
            port = response.text if response.text.isdigit() else ""
            answers[(response.status_code, port)] += 1
    return answers


def _ok(*servers: Switchable) -> set[tuple[int, str]]:
    return {(200, str(server.port)) for server in servers}


def _healthy(server: Server) -> list[bool]:
    return [e.healthy for e in server.runtime.upstreams["app"].endpoints]


async def test_endpoint_failing_health_checks_leaves_rotation_and_returns_after_recovery(
    gateway_factory: GatewayFactory,
    endpoints: list[Switchable],
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b, c = endpoints
    gateway = await gateway_factory(_config(endpoints, HEALTH))
    await eventually(lambda: min(s.health_hits for s in endpoints) >= 2, "first checks")
    assert set(await _send(gateway, 9)) == _ok(a, b, c)

    b.health_status = 503  # still serves traffic: only the checks take it out
    with caplog.at_level(logging.INFO, logger="proxy.upstream.health"):
        await eventually(lambda: _healthy(gateway) == [True, False, True], "b unhealthy")
    assert f"upstream app endpoint 127.0.0.1:{b.port} unhealthy: status 503" in caplog.text
    hits = b.hits
    answers = await _send(gateway, 20)
    assert answers == {(200, str(a.port)): 10, (200, str(c.port)): 10}
    assert b.hits == hits

    b.health_status = 200
    await eventually(lambda: _healthy(gateway) == [True, True, True], "b back")
    assert set(await _send(gateway, 9)) == _ok(a, b, c)
    series = {values: child.value for values, child in UPSTREAM_HEALTH_CHECKS.children()}
    assert series[("app", f"127.0.0.1:{b.port}", "failed")] >= 2
    assert series[("app", f"127.0.0.1:{a.port}", "ok")] >= 4


async def test_tcp_checks_take_out_an_endpoint_that_refuses_connections(
    gateway_factory: GatewayFactory, endpoints: list[Switchable]
) -> None:
    a, b, c = endpoints
    tcp = HEALTH.replace("path: /healthz,", "type: tcp,")
    gateway = await gateway_factory(_config(endpoints, tcp))
    await c.stop()
    await eventually(lambda: _healthy(gateway) == [True, True, False], "c unhealthy")
    assert await _send(gateway, 10) == {(200, str(a.port)): 5, (200, str(b.port)): 5}
    assert a.health_hits == 0  # a TCP check sends nothing
    await c.start()
    await eventually(lambda: _healthy(gateway) == [True, True, True], "c back")
    assert set(await _send(gateway, 6)) == _ok(a, b, c)


async def test_all_endpoints_failing_checks_is_panic_mode_and_requests_are_still_tried(
    gateway_factory: GatewayFactory, endpoints: list[Switchable]
) -> None:
    a, b, c = endpoints
    gateway = await gateway_factory(_config(endpoints, HEALTH))
    for server in endpoints:
        server.health_status = 500
    await eventually(lambda: _healthy(gateway) == [False, False, False], "all unhealthy")
    assert gateway.runtime.upstreams["app"].panic
    assert set(await _send(gateway, 6)) == _ok(a, b, c)
    assert UPSTREAM_PANIC.labels("app").value >= 6


# Ejections no test waits out, so that an endpoint stays out for the requests a test
# sends however slowly a busy machine sends them; the tests that see an ejection end
# move a clock of their own.
OUTLIER = """
    outlier: {consecutive_failures: 3, base_ejection: 10s, max_ejection: 60s}
"""


async def test_endpoint_refusing_connections_is_ejected_and_returns_after_the_ejection(
    gateway_factory: GatewayFactory,
    endpoints: list[Switchable],
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b, c = endpoints
    gateway = await gateway_factory(_config(endpoints, OUTLIER))
    upstream = gateway.runtime.upstreams["app"]
    assert upstream.outlier is not None
    # The ejection on a clock the test moves: it ends when the test says, not when the
    # requests below have taken a busy machine long enough.
    clock = Clock()
    upstream.now = upstream.outlier.now = clock
    await c.stop()
    with caplog.at_level(logging.INFO, logger="proxy.upstream.outlier"):
        answers = await _send(gateway, 9)  # c's 3rd failure ejects it
    assert answers == {(200, str(a.port)): 3, (200, str(b.port)): 3, (502, ""): 3}
    assert f"upstream app endpoint 127.0.0.1:{c.port} ejected for 10s (ejection 1)" in (caplog.text)
    assert await _send(gateway, 10) == {(200, str(a.port)): 5, (200, str(b.port)): 5}
    assert [e.eligible(clock()) for e in upstream.endpoints] == [True, True, False]
    await c.start()
    clock.time = upstream.endpoints[2].ejected_until  # the ejection runs out
    assert set(await _send(gateway, 6)) == _ok(a, b, c)
    await eventually(lambda: upstream.all_eligible, "the sweeper to see c back")
    series = dict(UPSTREAM_EJECTIONS.children())
    assert series[("app", f"127.0.0.1:{c.port}")].value == 1.0


async def test_repeated_ejections_last_longer(
    gateway_factory: GatewayFactory, endpoints: list[Switchable]
) -> None:
    c = endpoints[2]
    short = OUTLIER.replace("10s, max_ejection: 60s", "300ms, max_ejection: 1s")
    gateway = await gateway_factory(_config(endpoints, short))
    upstream = gateway.runtime.upstreams["app"]
    assert upstream.outlier is not None
    # Ejections on a clock the test moves: on the loop's, the time a busy machine takes
    # to send the requests that eject c again counts as time back in rotation, which
    # takes a step off the next ejection (outlier.py) and kept this test going round.
    clock = Clock()
    upstream.now = upstream.outlier.now = clock
    state = upstream.endpoints[2]
    await c.stop()
    for ejection, length in ((1, 0.3), (2, 0.6)):
        while state.ejections < ejection:
            await _send(gateway, 1)
        assert state.ejected_until == pytest.approx(clock.time + length)
        clock.time += length  # the ejection runs out, and c is back at once
    assert state.ejections == 2


async def test_no_more_than_max_ejection_percent_are_ejected(
    gateway_factory: GatewayFactory, endpoints: list[Switchable]
) -> None:
    a, b, c = endpoints
    gateway = await gateway_factory(_config(endpoints, OUTLIER))  # 50% of 3: one
    upstream = gateway.runtime.upstreams["app"]
    await b.stop()
    await c.stop()
    answers = await _send(gateway, 30)
    now = asyncio.get_running_loop().time()
    assert sum(not e.eligible(now) for e in upstream.endpoints) == 1
    # The other refusing endpoint stays in rotation (it is not ejected) with a.
    assert answers[(200, str(a.port))] >= 14
    assert answers[(502, "")] >= 14


async def test_consecutive_5xx_eject_only_when_configured(
    gateway_factory: GatewayFactory, endpoints: list[Switchable]
) -> None:
    a, b, c = endpoints
    c.status = 503
    gateway = await gateway_factory(_config(endpoints, OUTLIER))
    answers = await _send(gateway, 30)
    assert answers == {(200, str(a.port)): 10, (200, str(b.port)): 10, (503, str(c.port)): 10}

    five_xx = OUTLIER.replace("consecutive_failures: 3,", "consecutive_5xx: 2,")
    gateway = await gateway_factory(_config(endpoints, five_xx))
    answers = await _send(gateway, 30)
    assert answers[(503, str(c.port))] == 2
    assert answers[(200, str(a.port))] + answers[(200, str(b.port))] == 28


async def test_all_ejected_is_panic_mode_and_an_endpoint_that_recovers_answers_at_once(
    gateway_factory: GatewayFactory, endpoints: list[Switchable]
) -> None:
    b = endpoints[1]
    everything = """
    outlier: {consecutive_failures: 1, base_ejection: 10s, max_ejection_percent: 100}
"""
    gateway = await gateway_factory(_config(endpoints, everything))
    upstream = gateway.runtime.upstreams["app"]
    for server in endpoints:
        await server.stop()
    assert await _send(gateway, 3) == {(502, ""): 3}
    assert upstream.panic
    await b.start()
    # Every endpoint is ejected for 10 s, yet requests are still tried on all of them.
    answers = await _send(gateway, 6)
    assert answers == {(502, ""): 4, (200, str(b.port)): 2}


async def test_reload_keeps_the_checks_of_an_unchanged_upstream_and_replaces_changed_ones(
    gateway_factory: GatewayFactory, endpoints: list[Switchable]
) -> None:
    a, b, c = endpoints
    text = _config([a, b], HEALTH)
    gateway = await gateway_factory(text)
    first = gateway.runtime.upstreams["app"]
    assert first.health is not None
    await eventually(lambda: first.health is not None and first.health.rounds >= 1, "a round")
    assert "RUNNING" in repr(first.health)

    await gateway.prepare_reload(parse_config(text))
    await gateway.commit_reload()
    assert gateway.runtime.upstreams["app"] is first  # kept, and so are its checks
    assert "RUNNING" in repr(first.health)

    # A prepared reload that is abandoned stops the checks it started.
    await gateway.prepare_reload(parse_config(_config([a, c], HEALTH)))
    pending = gateway._pending
    assert pending is not None
    abandoned = pending.runtime.upstreams["app"].health
    assert abandoned is not None
    assert "RUNNING" in repr(abandoned)
    await gateway.abort_reload()
    assert "STOPPED" in repr(abandoned)
    assert "RUNNING" in repr(first.health)

    await gateway.prepare_reload(parse_config(_config([a, b, c], HEALTH)))
    await gateway.commit_reload()
    second = gateway.runtime.upstreams["app"]
    assert second is not first
    assert "STOPPED" in repr(first.health)  # stopped at the switch
    assert second.health is not None
    await eventually(lambda: c.health_hits >= 1, "the new upstream's checks")
    assert "RUNNING" in repr(second.health)
    await gateway.shutdown(grace_period=0.1)
    assert "STOPPED" in repr(second.health)


async def test_h2c_endpoints_are_checked_over_http2_and_leave_rotation(
    gateway_factory: GatewayFactory,
) -> None:
    a = await start_upstream("a", protocol="h2c")
    b = await start_upstream("b", protocol="h2c")
    try:
        b.on("GET", "/healthz").reply(503)
        h2c = HEALTH.replace("outlier: false", "outlier: false\n    protocol: h2c")
        gateway = await gateway_factory(_config([a, b], h2c))
        await eventually(lambda: _healthy(gateway) == [True, False], "b out of rotation")
        async with httpx.AsyncClient(base_url=base_url(gateway), timeout=5) as client:
            for _ in range(4):
                assert (await client.get("/work")).status_code == 200
        assert [r.path for r in b.requests if r.path != "/healthz"] == []
        assert len([r for r in a.requests if r.path == "/work"]) == 4
        assert {r.http_version for r in a.requests + b.requests} == {"2"}
    finally:
        await a.stop()
        await b.stop()
