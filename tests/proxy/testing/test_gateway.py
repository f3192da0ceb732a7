"""The testing kit's gateway used directly, without the pytest plugin (proxy/testing/
gateway.py): `running_gateway` and `RunningGateway`, how a config is rewritten for a test,
metric readings."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from middleware.base import Handler
from middleware.options import Options
from proxy.config.document import ConfigError
from proxy.core.models import Request, Response
from proxy.testing import (
    RunningGateway,
    ScriptedUpstream,
    running_gateway,
    start_upstream,
)
from proxy.testing.gateway import config_for_test
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
        "global_middleware: [{type: 'tests.proxy.testing.test_gateway:FailsToStart'}]\nroutes:",
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
