"""The one entry for an exchange (proxy/exchange/dispatch.py): `Dispatcher.start` matches
the route once, applies the checks every mode shares, and either runs the exchange
without a task (None; the answer comes to `reply`) or hands back a Run. Real Runtimes
built from routes.yaml text, against a real upstream on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from proxy.config.load import parse_config
from proxy.core.body import Body
from proxy.core.models import Request, Response
from proxy.exchange.dispatch import Run
from proxy.exchange.routing import RouteMatch, RouteTable
from proxy.exchange.runtime import Runtime
from tests.support.helpers import eventually
from tests.support.upstreams import UpstreamServer

CONFIG = """
listeners:
  - bind: 127.0.0.1:0
upstreams:
  app:
    endpoints: [{url}]
middleware:
  role: {{type: headers, request: {{set: {{X-Role: gateway}}}}}}
routes:
  - name: plain
    match: {{path_prefix: /plain}}
    upstream: app
  - name: limited
    match: {{path_prefix: /limited}}
    upstream: app
    max_body_size: 4
  - name: roles
    match: {{path_prefix: /roles}}
    upstream: app
    middleware: [role]
  - name: sockets
    match: {{path_prefix: /sockets}}
    upstream: app
    websocket: false
"""


@pytest.fixture
async def runtime_for() -> AsyncIterator[Callable[[UpstreamServer], Runtime]]:
    runtimes: list[Runtime] = []

    def build(server: UpstreamServer) -> Runtime:
        runtime = Runtime(parse_config(CONFIG.format(url=server.url)), "httptools")
        runtimes.append(runtime)
        return runtime

    yield build
    for runtime in runtimes:
        await runtime.aclose()
    await asyncio.sleep(0.01)  # the closed transports' connection_lost


def request(
    target: bytes, body: bytes = b"", *, method: str = "GET", upgrade: str = "", **fields: str
) -> Request:
    headers = [(b"host", b"app.example")]
    headers += [(name.replace("_", "-").encode(), value.encode()) for name, value in fields.items()]
    return Request(method, target, headers, Body.from_bytes(body), upgrade=upgrade)


class CountingTable(RouteTable):
    """A route table recording each lookup's path (a subclass, as the compiled dispatcher
    accepts only a RouteTable)."""

    paths: list[str]

    def match(self, method: str, host: str, path: str, *rest: Any) -> RouteMatch | None:
        self.paths.append(path)
        return super().match(method, host, path, *rest)


def count_matches(runtime: Runtime) -> list[str]:
    """Record each route-table lookup the dispatcher makes."""
    counting = CountingTable(runtime.config.routes)
    counting.paths = []
    runtime.dispatcher._table = counting
    return counting.paths


async def run_to_response(run: Run | None) -> Response:
    assert run is not None, "expected a Run for the front end's task"
    response = await run()
    return response


async def read_all(response: Response) -> bytes:
    data = bytearray()
    while chunk := await response.body.read():
        data += chunk
    return bytes(data)


@pytest.mark.socket
async def test_the_route_is_matched_once_when_the_fast_path_declines(
    runtime_for: Callable[[UpstreamServer], Runtime], h1_upstream: UpstreamServer
) -> None:
    runtime = runtime_for(h1_upstream)
    seen = count_matches(runtime)
    first = request(b"/plain/one")
    # No idle upstream connection yet: the fast path declines, and the Run goes on with
    # the route already found (and the endpoint already chosen).
    response = await run_to_response(runtime.dispatcher.start(first, lambda _: None))
    assert response.status == 200
    await read_all(response)
    assert seen == ["/plain/one"]
    assert first.exchange.route_name == "plain"
    assert first.exchange.endpoint == h1_upstream.url.removeprefix("http://")


@pytest.mark.socket
async def test_a_bodiless_request_on_a_route_without_middleware_runs_without_a_task(
    runtime_for: Callable[[UpstreamServer], Runtime], h1_upstream: UpstreamServer
) -> None:
    runtime = runtime_for(h1_upstream)
    await read_all(
        await run_to_response(runtime.dispatcher.start(request(b"/plain/warm"), lambda _: None))
    )
    answers: list[Response] = []
    fast = request(b"/plain/fast")
    assert runtime.dispatcher.start(fast, answers.append) is None
    await eventually(lambda: bool(answers), "the answer from the upstream's callback")
    [response] = answers
    assert response.status == 200
    assert b'"/plain/fast"' in await read_all(response)
    assert h1_upstream.connections == 1  # the warm-up's connection, reused


@pytest.mark.socket
async def test_a_body_over_the_routes_limit_is_413_before_anything_is_sent(
    runtime_for: Callable[[UpstreamServer], Runtime], h1_upstream: UpstreamServer
) -> None:
    runtime = runtime_for(h1_upstream)
    big = request(b"/limited/x", b"12345", method="POST")
    response = await run_to_response(runtime.dispatcher.start(big, lambda _: None))
    assert response.status == 413
    assert b"body_too_large" in await read_all(response)
    small = request(b"/limited/x", b"1234", method="POST")
    response = await run_to_response(runtime.dispatcher.start(small, lambda _: None))
    assert response.status == 200
    await read_all(response)
    assert [r.target for r in h1_upstream.requests] == ["/limited/x"]  # the small one only


async def test_an_upgrade_on_a_route_without_websocket_is_refused_403(
    runtime_for: Callable[[UpstreamServer], Runtime], h1_upstream: UpstreamServer
) -> None:
    runtime = runtime_for(h1_upstream)
    upgrade = request(b"/sockets/chat", upgrade="websocket")
    response = await run_to_response(runtime.dispatcher.start(upgrade, lambda _: None))
    assert response.status == 403
    assert b"websocket_not_allowed" in await read_all(response)
    assert h1_upstream.requests == []


async def test_no_route_is_a_404_run(
    runtime_for: Callable[[UpstreamServer], Runtime], h1_upstream: UpstreamServer
) -> None:
    runtime = runtime_for(h1_upstream)
    lost = request(b"/nowhere")
    response = await run_to_response(runtime.dispatcher.start(lost, lambda _: None))
    assert response.status == 404
    assert b"no_route" in await read_all(response)
    assert lost.exchange.route_name == ""


@pytest.mark.socket
async def test_the_clients_copies_of_the_fields_the_chain_sets_are_removed_first(
    runtime_for: Callable[[UpstreamServer], Runtime], h1_upstream: UpstreamServer
) -> None:
    runtime = runtime_for(h1_upstream)
    # Two spellings of the field the `headers` middleware sets: neither may reach the
    # upstream beside the gateway's own value.
    forged = request(b"/roles/me", X_Role="admin")
    forged.headers.add("x_role", "admin")
    answers: list[Response] = []
    run = runtime.dispatcher.start(forged, answers.append)
    # `headers` only awaits call_next: its chain runs without a task (eager), and with
    # no idle connection it moves to one of its own; either way the answer comes back.
    assert run is None
    await eventually(lambda: bool(answers), "the chain's answer")
    [response] = answers
    assert response.status == 200
    await read_all(response)
    [received] = h1_upstream.requests
    assert [
        value for name, value in received.headers if name.lower().replace("_", "-") == "x-role"
    ] == ["gateway"]
