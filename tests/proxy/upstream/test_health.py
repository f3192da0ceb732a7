"""Active health checks: thresholds and rounds with a scripted check (no sockets), and
`check_endpoint` against tiny loopback servers that answer as the test says (the answers
are parsed by the forwarder's codec, proxy/upstream/fetch.py: httptools here)."""

from __future__ import annotations

import asyncio
import logging
import ssl

import pytest

from metrics.traffic import UPSTREAM_HEALTH_CHECKS
from proxy.config.upstream_model import (
    EndpointConfig,
    HealthCheckConfig,
    UpstreamConfig,
    UpstreamTls,
)
from proxy.testing import start_upstream
from proxy.upstream.balancer import EndpointState, Upstream
from proxy.upstream.health import HealthChecker, HealthCheckFailed, check_endpoint, status_expected
from tests.support.helpers import eventually
from tests.support.tls import TlsFiles
from tests.support.upstreams import H2UpstreamServer


def _upstream(count: int, check: HealthCheckConfig, name: str = "app") -> Upstream:
    endpoints = tuple(
        EndpointConfig(f"http://10.1.0.{i}:80", "http", f"10.1.0.{i}", 80, 1)
        for i in range(1, count + 1)
    )
    return Upstream(UpstreamConfig(name, endpoints, health_check=check), "httptools", 4096)


class Script:
    """A check whose result per endpoint index the test sets (None: pass)."""

    def __init__(self) -> None:
        self.failing: dict[int, str] = {}
        self.calls: list[int] = []

    async def __call__(self, state: EndpointState) -> None:
        self.calls.append(state.index)
        why = self.failing.get(state.index)
        if why == "bug":
            raise ZeroDivisionError("oops")
        if why is not None:
            raise HealthCheckFailed(why)


def _checker(
    upstream: Upstream, script: Script, config: HealthCheckConfig | None = None
) -> HealthChecker:
    return HealthChecker(
        upstream.name,
        config or HealthCheckConfig(healthy_threshold=2, unhealthy_threshold=3),
        upstream.endpoints,
        upstream.refresh_eligibility,
        script,
        rng=lambda: 0.5,
    )


async def test_endpoint_leaves_after_unhealthy_threshold_and_returns_after_healthy_threshold(
    caplog: pytest.LogCaptureFixture,
) -> None:
    upstream = _upstream(3, HealthCheckConfig())
    script = Script()
    checker = _checker(upstream, script)
    second = upstream.endpoints[1]
    script.failing[1] = "status 503"
    with caplog.at_level(logging.INFO, logger="proxy.upstream.health"):
        await checker.check_round()
        await checker.check_round()
        assert (second.healthy, upstream.all_eligible) == (True, True)
        await checker.check_round()
    assert (second.healthy, upstream.all_eligible) == (False, False)
    assert "upstream app endpoint 10.1.0.2:80 unhealthy: status 503" in caplog.text
    assert {upstream.choose().index for _ in range(10)} == {0, 2}

    del script.failing[1]
    await checker.check_round()
    assert (second.healthy, upstream.all_eligible) == (False, False)
    with caplog.at_level(logging.INFO, logger="proxy.upstream.health"):
        await checker.check_round()
    assert (second.healthy, upstream.all_eligible) == (True, True)
    assert "upstream app endpoint 10.1.0.2:80 healthy again: 2 checks passed in a row" in (
        caplog.text
    )
    assert script.calls == [0, 1, 2] * 5
    assert repr(checker) == "<HealthChecker app STOPPED healthy=3/3 rounds=5>"


async def test_a_passed_check_breaks_a_failure_streak() -> None:
    upstream = _upstream(1, HealthCheckConfig())
    script = Script()
    checker = _checker(upstream, script)
    only = upstream.endpoints[0]
    for failing in (True, True, False, True, True, False, True, True):
        if failing:
            script.failing[0] = "refused"
        else:
            script.failing.clear()
        await checker.check_round()
    assert only.healthy
    assert checker.streaks == [-2]


async def test_all_endpoints_unhealthy_means_panic_mode_tries_them_all() -> None:
    upstream = _upstream(2, HealthCheckConfig(), name="allsick")
    script = Script()
    checker = _checker(upstream, script, HealthCheckConfig(unhealthy_threshold=1))
    script.failing = {0: "refused", 1: "refused"}
    await checker.check_round()
    assert upstream.panic
    assert [upstream.choose().index for _ in range(4)] == [0, 1, 0, 1]


async def test_a_bug_in_a_check_counts_as_a_failure_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    upstream = _upstream(2, HealthCheckConfig())
    script = Script()
    checker = _checker(upstream, script, HealthCheckConfig(unhealthy_threshold=1))
    script.failing[0] = "bug"
    with caplog.at_level(logging.INFO, logger="proxy.upstream.health"):
        await checker.check_round()
    assert not upstream.endpoints[0].healthy
    assert "bug while health checking app endpoint 10.1.0.1:80" in caplog.text
    assert "unhealthy: bug: ZeroDivisionError('oops')" in caplog.text


async def test_checks_are_counted_by_result() -> None:
    upstream = _upstream(2, HealthCheckConfig(), name="countme")
    script = Script()
    checker = _checker(upstream, script)
    script.failing[1] = "refused"
    for _ in range(3):
        await checker.check_round()
    series = {values: child.value for values, child in UPSTREAM_HEALTH_CHECKS.children()}
    assert series[("countme", "10.1.0.1:80", "ok")] == 3.0
    assert series[("countme", "10.1.0.2:80", "failed")] == 3.0
    assert ("countme", "10.1.0.1:80", "failed") not in series


@pytest.mark.parametrize(("draw", "expected"), [(0.0, 9.0), (0.5, 10.0), (1.0, 11.0)])
async def test_rounds_are_interval_apart_give_or_take_jitter(draw: float, expected: float) -> None:
    upstream = _upstream(1, HealthCheckConfig())
    config = HealthCheckConfig(interval=10.0, jitter=0.1)
    checker = HealthChecker("app", config, upstream.endpoints, lambda: None, rng=lambda: draw)
    assert checker.delay() == pytest.approx(expected)


async def test_the_task_checks_in_rounds_until_closed() -> None:
    config = HealthCheckConfig(interval=0.01, jitter=0.5)
    upstream = _upstream(2, config)
    script = Script()
    checker = _checker(upstream, script, config)
    checker.start()
    checker.start()  # a second start does nothing
    await eventually(lambda: checker.rounds >= 3, "three rounds")
    assert repr(checker).startswith("<HealthChecker app RUNNING healthy=2/2")
    await checker.aclose()
    rounds = checker.rounds
    await asyncio.sleep(0.03)
    assert checker.rounds == rounds
    assert "STOPPED" in repr(checker)
    await checker.aclose()  # idempotent


async def test_upstream_close_cancels_the_checks_and_aclose_health_waits() -> None:
    upstream = _upstream(1, HealthCheckConfig(interval=0.01, jitter=0.0))
    assert upstream.health is not None
    upstream.start_health()
    upstream.close()
    await upstream.aclose_health()
    assert "STOPPED" in repr(upstream.health)
    plain = Upstream(UpstreamConfig("plain", upstream.config.endpoints), "h11", 4096)
    assert plain.health is None
    plain.start_health()
    await plain.aclose_health()


def test_status_expected_takes_inclusive_ranges() -> None:
    expect = ((200, 299), (404, 404))
    assert [status_expected(s, expect) for s in (199, 200, 299, 300, 404, 405)] == [
        False,
        True,
        True,
        False,
        True,
        False,
    ]


# -- check_endpoint against real loopback servers ---------------------------------------


class Answer:
    """A loopback server that answers each connection with `reply` (or nothing)."""

    def __init__(self, reply: bytes | None, *, tls: ssl.SSLContext | None = None) -> None:
        self.reply = reply
        self.tls = tls
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Answer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.requests.append(await reader.readuntil(b"\r\n\r\n"))
            if self.reply is None:
                await asyncio.sleep(5)
            elif self.reply:
                writer.write(self.reply)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def endpoint(self, scheme: str = "http", host: str = "127.0.0.1") -> EndpointConfig:
        return EndpointConfig(f"{scheme}://{host}:{self.port}", scheme, host, self.port, 1)


@pytest.fixture
async def refused_port() -> int:
    """A port nothing listens on (bound, then closed)."""
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    return port


# Checks that must end on what the server does, not on their timeout: one a busy machine
# cannot reach (a TLS handshake and an answer within 0.3 s it can miss).
CHECK = HealthCheckConfig(path="/healthz", timeout=10.0)
# The timeout a silent server meets.
SILENT_TIMEOUT_S = 0.3


@pytest.mark.socket
async def test_http_check_sends_get_with_host_and_connection_close_and_passes_on_200() -> None:
    async with Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n") as server:
        await check_endpoint(server.endpoint(), CHECK)
    request = server.requests[0]
    assert request.startswith(b"GET /healthz HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{server.port}\r\n".encode() in request
    assert b"Connection: close\r\n" in request


@pytest.mark.socket
@pytest.mark.parametrize(
    ("reply", "why"),
    [
        (b"HTTP/1.1 503 Service Unavailable\r\n\r\n", "status 503"),
        (b"HTTP/1.1 302 Found\r\n\r\n", "status 302"),  # outside expect 200-299 below
        (b"SSH-2.0-OpenSSH_9.6\r\n", "not an HTTP response: Expected HTTP/, RTSP/ or ICE/"),
        (b"HTTP/1.1 200", "connection closed before a status line"),
        (b"", "connection closed before a status line"),
        (b"x" * 9000, "not an HTTP response: Expected HTTP/, RTSP/ or ICE/"),
        (None, f"no answer within {SILENT_TIMEOUT_S}s"),
    ],
    ids=["503", "302", "ssh", "cut", "empty", "long", "silent"],
)
async def test_http_check_fails_with_the_reason(reply: bytes | None, why: str) -> None:
    timeout = SILENT_TIMEOUT_S if reply is None else CHECK.timeout
    config = HealthCheckConfig(path="/healthz", timeout=timeout, expect=((200, 299),))
    async with Answer(reply) as server:
        with pytest.raises(HealthCheckFailed) as caught:
            await check_endpoint(server.endpoint(), config, codec="httptools")
    assert str(caught.value) == why


@pytest.mark.socket
async def test_checks_fail_on_a_refused_connection(refused_port: int) -> None:
    endpoint = EndpointConfig(f"http://127.0.0.1:{refused_port}", "http", "127.0.0.1", refused_port)
    for config in (CHECK, HealthCheckConfig(type="tcp", timeout=CHECK.timeout)):
        with pytest.raises(HealthCheckFailed, match=r"connect to 127\.0\.0\.1:\d+ failed"):
            await check_endpoint(endpoint, config)


@pytest.mark.socket
async def test_tcp_check_passes_on_connect_without_sending_anything() -> None:
    async with Answer(b"") as server:
        await check_endpoint(server.endpoint(), HealthCheckConfig(type="tcp", timeout=10.0))
        await asyncio.sleep(0.02)
    assert server.requests == []


@pytest.mark.socket
async def test_https_check_verifies_the_upstream_certificate(tls_files: TlsFiles) -> None:
    reply = b"HTTP/1.1 204 No Content\r\n\r\n"
    server_tls = tls_files.server_context(["http/1.1"])
    async with Answer(reply, tls=server_tls) as server:
        endpoint = server.endpoint("https", "localhost")
        config = UpstreamConfig(
            "secure",
            (endpoint,),
            tls=UpstreamTls(ca=str(tls_files.ca)),
            health_check=CHECK,
        )
        upstream = Upstream(config, "h11", 4096)
        assert upstream.health is not None
        checker = upstream.health
        await checker.check_round()
        assert checker.streaks == [1]
        assert server.requests[0].startswith(b"GET /healthz HTTP/1.1\r\n")
        # Without the CA the certificate is not trusted: the check fails.
        untrusted = ssl.create_default_context()
        with pytest.raises(HealthCheckFailed, match="certificate verify failed"):
            await check_endpoint(endpoint, CHECK, untrusted, "localhost")


@pytest.mark.socket
async def test_h2c_and_h2_upstreams_are_checked_over_http2(tls_files: TlsFiles) -> None:
    # An upstream that speaks only HTTP/2 (the HTTP/1.1 check of before failed on it).
    h2c = await start_upstream("h2c-only", protocol="h2c")
    h2c.on("GET", "/healthz").reply(204)
    h2 = await H2UpstreamServer(tls=tls_files.server_context(["h2"])).start()
    try:
        config = UpstreamConfig("plain", (_endpoint(h2c.port),), protocol="h2c")
        await check_endpoint(config.endpoints[0], CHECK, http2=True)
        assert (h2c.last.http_version, h2c.last.path) == ("2", "/healthz")
        assert h2c.last.headers["user-agent"] == "gatehouse-health-check"
        h2c.reset()
        h2c.on("GET", "/healthz").reply(503)
        with pytest.raises(HealthCheckFailed, match="status 503"):
            await check_endpoint(config.endpoints[0], CHECK, http2=True)
        # h2 over TLS: the upstream's own context, offering h2 by ALPN, and its name.
        secure = UpstreamConfig(
            "secure",
            (_endpoint(h2.port, "https", "localhost"),),
            protocol="h2",
            tls=UpstreamTls(ca=str(tls_files.ca)),
            health_check=HealthCheckConfig(path="/status/200", timeout=10.0),
        )
        upstream = Upstream(secure, "h11", 4096)
        assert upstream.health is not None
        await upstream.health.check_round()
        assert upstream.health.streaks == [1]
        assert [r.path for r in h2.requests] == ["/status/200"]
    finally:
        await h2c.stop()
        await h2.stop()


@pytest.mark.socket
async def test_an_http1_answer_to_an_http2_check_fails_it() -> None:
    async with Answer(b"HTTP/1.1 200 OK\r\n\r\n") as server:
        with pytest.raises(
            HealthCheckFailed, match=r"closed the connection before its HTTP/2 SETTINGS"
        ):
            await check_endpoint(server.endpoint(), CHECK, http2=True)


def _endpoint(port: int, scheme: str = "http", host: str = "127.0.0.1") -> EndpointConfig:
    return EndpointConfig(f"{scheme}://{host}:{port}", scheme, host, port, 1)
