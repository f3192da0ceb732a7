"""The testing kit's parts used directly, without the pytest plugin: `start_upstream`,
`running_gateway`, how a config is rewritten for a test, metric readings."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from middleware.base import Handler
from middleware.options import Options
from proxy.config.document import ConfigError
from proxy.core.models import Request, Response
from proxy.testing import (
    ReceivedRequest,
    Reply,
    RunningGateway,
    ScriptedUpstream,
    running_gateway,
    start_upstream,
)
from proxy.testing.gateway import config_for_test
from tests.support.helpers import eventually
from tests.support.tls import TlsFiles

pytestmark = pytest.mark.socket  # on uvloop too (tests/conftest.py): users run either loop


@pytest.fixture
async def users() -> AsyncIterator[ScriptedUpstream]:
    upstream = await start_upstream("users")
    yield upstream
    await upstream.stop()


TWO_LISTENERS = """
listeners:
  - {bind: 0.0.0.0:8080, name: public}
  - {bind: 10.1.2.3:8081, name: internal, http2: false}
upstreams:
  users:
    endpoints: [http://users:9000, {url: "http://users", weight: 3}, http://10.9.9.9:80]
    resolve: {interval: 5s}
  billing:
    endpoints: [http://billing.internal:80]
routes:
  - {name: all, match: {path_prefix: /}, upstream: users}
"""


def test_the_config_a_test_runs(users: ScriptedUpstream) -> None:
    config = config_for_test(TWO_LISTENERS, "<t>", fixtures={"users": users}, upstreams={})
    assert [(lst.name, lst.host, lst.port, lst.http2) for lst in config.listeners] == [
        ("public", "127.0.0.1", 0, True),
        ("internal", "127.0.0.1", 0, False),
    ]
    assert config.admin is not None
    assert (config.admin.host, config.admin.port) == ("127.0.0.1", 0)
    endpoints = config.upstreams["users"].endpoints
    # Endpoints named after the kit upstream go to it, weights kept; the others stay.
    assert [(e.host, e.port, e.weight) for e in endpoints] == [
        ("127.0.0.1", users.port, 1),
        ("127.0.0.1", users.port, 3),
        ("10.9.9.9", 80, 1),
    ]
    assert config.upstreams["users"].resolve_interval is None
    assert (
        config.upstreams["billing"]
        == config_for_test(TWO_LISTENERS, "<t>", fixtures={}, upstreams={}).upstreams["billing"]
    )


async def test_one_upstream_cannot_speak_two_protocols(users: ScriptedUpstream) -> None:
    h2 = await start_upstream("users-h2", protocol="h2c")
    try:
        text = TWO_LISTENERS.replace("http://10.9.9.9:80", "http://users-h2")
        with pytest.raises(ConfigError, match="speaking h2c and http1; one upstream speaks one"):
            config_for_test(text, "<t>", fixtures={"users": users, "users-h2": h2}, upstreams={})
        # Sent whole to the h2c one instead, the upstream speaks h2c.
        config = config_for_test(text, "<t>", fixtures={}, upstreams={"users": h2})
        assert config.upstreams["users"].protocol == "h2c"
    finally:
        await h2.stop()


def test_bad_arguments_are_refused_at_once() -> None:
    with pytest.raises(ValueError, match="protocol must be one of http1, h2c, not 'h3'"):
        ScriptedUpstream("x", protocol="h3")
    with pytest.raises(ValueError, match=r"WebSocket upstreams speak HTTP/1\.1"):
        ScriptedUpstream("x", protocol="h2c", websocket=True)
    upstream = ScriptedUpstream("x")
    with pytest.raises(ValueError, match="give path= or prefix=, not both"):
        upstream.on(path="/a", prefix="/b")
    with pytest.raises(ValueError, match="times must be at least 1, not 0"):
        upstream.on().reply(200, times=0)


async def test_running_gateway_outside_pytest_fixtures_with_named_listeners(
    users: ScriptedUpstream,
) -> None:
    users.on("HEAD", "/").reply(204, headers={"x-head": "yes"})
    async with running_gateway(TWO_LISTENERS, fixtures={"users": users}) as gateway:
        assert set(gateway.urls) == {"public", "internal"}
        async with gateway.client("internal") as client:
            head = await client.head("/")
            assert (head.status_code, head.headers["x-head"]) == (204, "yes")
            # A gauge is read as it is: the client's keep-alive connection.
            assert gateway.metric("gatehouse_open_connections", listener="internal") == 1
        assert gateway.exchange(head).endpoint == f"127.0.0.1:{users.port}"
        assert gateway.metric("gatehouse_requests_total", method="HEAD") == 1
        assert gateway.metric("gatehouse_upstream_requests_total", upstream="users") == 1
        openmetrics = await gateway.scrape(openmetrics=True)
        assert openmetrics.rstrip().endswith("# EOF")
    assert gateway.server.draining


async def test_tls_listeners_get_https_urls(users: ScriptedUpstream, tls_files: TlsFiles) -> None:
    text = f"""
listeners:
  - bind: 0.0.0.0:443
    tls: {{cert: {tls_files.cert}, key: {tls_files.key}}}
upstreams: {{users: {{endpoints: [http://users]}}}}
routes: [{{name: all, match: {{path_prefix: /}}, upstream: users}}]
"""
    async with running_gateway(text, fixtures={"users": users}) as gateway:
        assert gateway.url.startswith("https://127.0.0.1:")
        async with gateway.client(verify=tls_files.client_context(["http/1.1"])) as client:
            response = await client.get("/over-tls")
        assert response.json()["path"] == "/over-tls"
        assert gateway.upstream_request(response).headers["x-forwarded-proto"] == "https"


async def test_h2c_upstream_delays_drops_and_large_answers() -> None:
    h2 = await start_upstream("app", protocol="h2c")
    h2.on(path="/late").reply(200, body="late", delay=0.2)
    h2.on(path="/gone").reply(drop=True)
    h2.on(path="/big").call(lambda request: Reply(200, [], b"b" * 1_000_000))
    text = """
listeners: [{bind: 127.0.0.1:1}]
upstreams: {app: {endpoints: [http://app], protocol: h2c, retries: {attempts: 1}}}
routes: [{name: all, match: {path_prefix: /}, upstream: app}]
"""
    try:
        async with running_gateway(text, fixtures={"app": h2}) as gateway:
            client = gateway.client()
            late, gone, big = await asyncio.gather(
                client.get("/late"), client.get("/gone"), client.get("/big")
            )
            assert (late.status_code, late.text) == (200, "late")
            assert gone.status_code == 502
            assert len(big.content) == 1_000_000
            h2.reset()
            assert h2.requests == []
            assert (await client.get("/late")).json()["path"] == "/late"  # rules gone: echo
    finally:
        await h2.stop()


async def test_an_upstream_outside_any_gateway(users: ScriptedUpstream) -> None:
    users.on("PUT", "/doc").reply(json={"saved": True}, times=1)
    async with httpx.AsyncClient(base_url=users.url) as client:
        saved = await client.put("/doc?v=2", content=b"text")
        again = await client.put("/doc?v=2", content=b"text")
    assert saved.json() == {"saved": True}
    assert again.json()["query"] == "v=2"  # the rule was used up: the echo answers
    assert users.last.exchange == ""  # not through a test gateway
    assert users.last.body == b"text"
    assert users.connections == 1


class FailsToStart:
    """A middleware whose start() hook fails (a Redis that is not there, say)."""

    OPTIONS = ()

    def __init__(self, options: Options) -> None:
        pass

    async def start(self) -> None:
        raise OSError("the backend is not there")

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        return await call_next(request)


async def test_a_gateway_that_cannot_start_closes_what_it_opened(users: ScriptedUpstream) -> None:
    text = TWO_LISTENERS.replace(
        "routes:",
        "global_middleware: [{type: 'tests.proxy.testing.test_kit_parts:FailsToStart'}]\nroutes:",
    )
    gateway = RunningGateway(text, fixtures={"users": users})
    with pytest.raises(OSError, match="the backend is not there"):
        await gateway.start()
    # Both listeners were bound before the middleware failed; they are closed again.
    assert gateway.server.draining
    assert gateway.server.addresses
    for host, port in gateway.server.addresses:
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(host, port)


async def test_stopping_an_upstream_mid_reply_is_quiet(caplog: pytest.LogCaptureFixture) -> None:
    upstream = await start_upstream("slow")
    upstream.reply(200, delay=30)
    reader, writer = await asyncio.open_connection(upstream.host, upstream.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await eventually(lambda: bool(upstream.requests), "the request to arrive")
    await upstream.stop()  # the handler is waiting out the delay: it is cancelled
    assert await reader.read() == b""
    writer.close()
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []


async def test_a_responder_that_raises_answers_500_and_logs_why(
    users: ScriptedUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    def buggy(request: ReceivedRequest) -> Reply:
        return Reply(int(request.headers["x-missing"]))

    users.on(path="/bug").call(buggy)
    async with httpx.AsyncClient(base_url=users.url) as client:
        response = await client.get("/bug")
    assert (response.status_code, response.text) == (500, "responder failed: KeyError('x-missing')")
    assert "upstream 'users': the responder for <Rule * /bug" in caplog.text
