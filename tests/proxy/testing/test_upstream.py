"""The testing kit's scripted upstreams used directly, without the pytest plugin
(proxy/testing/upstream.py): `start_upstream`, `ScriptedUpstream`, its rules and replies,
over HTTP/1.1 and h2c, inside and outside a test gateway."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from proxy.testing import ReceivedRequest, Reply, ScriptedUpstream, running_gateway, start_upstream
from tests.support.helpers import eventually

pytestmark = pytest.mark.socket  # on uvloop too (tests/conftest.py): users run either loop


@pytest.fixture
async def users() -> AsyncIterator[ScriptedUpstream]:
    upstream = await start_upstream("users")
    yield upstream
    await upstream.stop()


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
