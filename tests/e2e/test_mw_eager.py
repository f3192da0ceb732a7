"""Chains of middleware that declare `EAGER = True` run without a task (proxy/exchange/eager.py):
the same answers as a task would give, on the fast path when an idle connection is
there, handed to a task when it is not, and retried after the keep-alive race."""

from __future__ import annotations

import asyncio
import socket
import struct

import httpx
import pytest

from proxy.core.models import Request
from proxy.exchange.dispatch import Reply, Run
from proxy.process.server import Server
from tests.support.gateway import GatewayFactory, H1UpstreamFactory, base_url
from tests.support.h2_client import H2Client
from tests.support.helpers import eventually
from tests.support.plugins import stamp
from tests.support.upstreams import UpstreamServer

pytestmark = pytest.mark.socket

EAGER = '"tests.support.plugins.stamp:EagerStamp"'
TASKED = '"tests.support.plugins.stamp:Stamp"'


def config(upstream: UpstreamServer, outer: str, inner: str) -> str:
    return f"""
listeners: [{{bind: 127.0.0.1:0}}]
upstreams: {{app: {{endpoints: [{upstream.url}]}}}}
middleware:
  outer: {{type: {outer}, value: outer, refuse_header: X-Refuse}}
  inner: {{type: {inner}, value: inner}}
routes:
  - {{name: all, match: {{path_prefix: /}}, upstream: app, middleware: [outer, inner]}}
"""


def count_eager_starts(server: Server) -> list[bool]:
    """Record, for each request, whether the dispatcher started it without a task."""
    started: list[bool] = []
    start = server.start_exchange

    def spy(request: Request, reply: Reply) -> Run | None:
        run = start(request, reply)
        started.append(run is None)
        return run

    server.start_exchange = spy
    return started


async def get_stamps(server: Server, client: httpx.AsyncClient, **headers: str) -> httpx.Response:
    return await client.get(base_url(server) + "/echo/x", headers=headers)


async def test_an_eager_chain_answers_like_a_task_would(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    server = await gateway_factory(config(h1_upstream, EAGER, EAGER))
    started = count_eager_starts(server)
    async with httpx.AsyncClient() as client:
        # The first request finds no idle connection (handed to a task), the next ones do.
        responses = [await get_stamps(server, client) for _ in range(3)]
    assert started == [True, True, True]
    for response in responses:
        assert response.status_code == 200
        seen = {name.lower(): value for name, value in response.json()["headers"]}
        assert seen["x-stamp"] == "outer,inner"
        assert response.headers.get_list("x-stamp") == ["inner", "outer"]
    assert len(h1_upstream.requests) == 3


async def test_a_chain_with_one_non_eager_middleware_takes_a_task(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    server = await gateway_factory(config(h1_upstream, EAGER, TASKED))
    started = count_eager_starts(server)
    async with httpx.AsyncClient() as client:
        response = await get_stamps(server, client)
    assert started == [False]
    assert response.headers.get_list("x-stamp") == ["inner", "outer"]


async def test_a_proxy_error_raised_in_an_eager_chain_is_a_local_reply(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    server = await gateway_factory(config(h1_upstream, EAGER, EAGER))
    async with httpx.AsyncClient() as client:
        refused = await get_stamps(server, client, **{"X-Refuse": "1"})
        after = await get_stamps(server, client)
    assert refused.status_code == 418
    assert refused.json()["error"] == "stamp_refused"
    assert after.status_code == 200  # the connection serves on
    assert len(h1_upstream.requests) == 1


async def test_the_keep_alive_race_is_retried_from_an_eager_chain(
    gateway_factory: GatewayFactory, h1_upstream_factory: H1UpstreamFactory
) -> None:
    upstream = await h1_upstream_factory(drop_reused=True)  # closes a reused connection unanswered
    server = await gateway_factory(config(upstream, EAGER, EAGER))
    started = count_eager_starts(server)
    async with httpx.AsyncClient() as client:
        first = await get_stamps(server, client)
        second = await get_stamps(server, client)  # meets the pooled connection, dropped
    assert started == [True, True]
    assert first.status_code == second.status_code == 200
    assert second.headers.get_list("x-stamp") == ["inner", "outer"]


async def wait_for_events(expected: list[str], within_s: float = 10.0) -> None:
    async with asyncio.timeout(within_s):
        while sorted(stamp.EVENTS) != sorted(expected):  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_a_client_leaving_cancels_an_eager_chain_http1(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    server = await gateway_factory(config(h1_upstream, EAGER, EAGER))
    started = count_eager_starts(server)
    async with httpx.AsyncClient() as client:
        await get_stamps(server, client)  # leaves an idle pooled connection: the fast path
    stamp.EVENTS.clear()
    host, port = server.addresses[0]
    _reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")  # never answered
    await writer.drain()
    await eventually(lambda: h1_upstream.requests[-1].target == "/held", "the chain to wait on it")
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()  # the client vanishes: a reset, not a half-close
    await wait_for_events(["cancelled:inner", "cancelled:outer"])
    assert started == [True, True]


async def test_a_stream_reset_cancels_an_eager_chain_http2(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    server = await gateway_factory(config(h1_upstream, EAGER, EAGER))
    async with httpx.AsyncClient() as client:
        await get_stamps(server, client)
    stamp.EVENTS.clear()
    async with await H2Client.connect(*server.addresses[0]) as h2_client:
        stream_id = h2_client.send_request("/held")  # never answered
        await h2_client.flush()
        await eventually(lambda: h1_upstream.requests[-1].target == "/held", "the chain to wait")
        h2_client.conn.reset_stream(stream_id)
        await h2_client.flush()
        await wait_for_events(["cancelled:inner", "cancelled:outer"])
