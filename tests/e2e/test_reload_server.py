"""A worker's side of reload (`Server.prepare_reload`, `commit_reload`, `abort_reload`),
in-process against real sockets: what a reload keeps, what it replaces, and that an
exchange running when it happens finishes on the config it started with.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from metrics.definitions import REGISTRY
from proxy.config.load import parse_config
from proxy.process import worker
from proxy.process.server import ReloadRefused, Server
from tests.support.gateway import H1UpstreamFactory, base_url
from tests.support.helpers import eventually
from tests.support.plugins import stamp
from tests.support.tls import make_tls_files
from tests.support.upstreams import UpstreamServer

pytestmark = pytest.mark.socket


def config_text(
    upstream: UpstreamServer, *, stamp_value: str = "one", routes: str = "", grace: str = "300ms"
) -> str:
    return f"""
listeners:
  - bind: 127.0.0.1:0
shutdown: {{grace_period: {grace}}}
upstreams:
  app:
    endpoints: [{upstream.url}]
middleware:
  mark: {{type: tests.support.plugins.stamp:Stamp, value: {stamp_value}}}
  limit: {{type: rate_limit, rate: 5/h, burst: 5, key: ip}}
routes:
  - name: stamped
    match: {{path_prefix: /stamped}}
    middleware: [mark]
    upstream: app
  - name: limited
    match: {{path_prefix: /limited}}
    middleware: [limit]
    upstream: app
{routes}
"""


async def started(text: str) -> Server:
    server = Server(parse_config(text))
    await server.start()
    return server


async def reload(server: Server, text: str) -> None:
    await server.prepare_reload(parse_config(text))
    await server.commit_reload()


@pytest.fixture(autouse=True)
def clear_events() -> None:
    stamp.EVENTS.clear()


async def test_unchanged_middleware_keeps_its_instance_and_state(
    h1_upstream: UpstreamServer,
) -> None:
    server = await started(config_text(h1_upstream))
    try:
        mark = server.runtime.routes["stamped"].chain[0].instance
        async with httpx.AsyncClient(base_url=base_url(server)) as client:
            for _ in range(3):
                assert (await client.get("/limited/x")).status_code == 200
            await reload(server, config_text(h1_upstream, routes=_route("extra")))
            assert server.runtime.routes["stamped"].chain[0].instance is mark
            # The rate limit's table came through: 3 of the 6 (burst 5 + 1) are left.
            statuses = [(await client.get("/limited/x")).status_code for _ in range(4)]
            assert statuses == [200, 200, 200, 429]
            assert (await client.get("/extra/x")).status_code == 200
        assert stamp.EVENTS == ["start:mark"]  # not started a second time
    finally:
        await server.shutdown(grace_period=1.0)


async def test_changed_middleware_is_replaced_and_the_old_one_closed_after_the_grace_period(
    h1_upstream: UpstreamServer,
) -> None:
    server = await started(config_text(h1_upstream))
    try:
        old = server.runtime.routes["stamped"].chain[0].instance
        await reload(server, config_text(h1_upstream, stamp_value="two"))
        new = server.runtime.routes["stamped"].chain[0].instance
        assert new is not old
        assert stamp.EVENTS == ["start:mark", "start:mark"]
        async with httpx.AsyncClient(base_url=base_url(server)) as client:
            response = await client.get("/stamped/x")
        assert response.headers["x-stamp"] == "two"
        # Closed when the 300 ms grace period has passed (not at once: see above).
        await eventually(lambda: len(stamp.EVENTS) == 3, "the old instance to be closed")
        assert stamp.EVENTS == ["start:mark", "start:mark", "close:mark"]
    finally:
        await server.shutdown(grace_period=1.0)
    assert stamp.EVENTS[-1] == "close:mark"


async def test_an_unchanged_upstream_keeps_its_pooled_connection(
    h1_upstream: UpstreamServer,
) -> None:
    server = await started(config_text(h1_upstream))
    try:
        async with httpx.AsyncClient(base_url=base_url(server)) as client:
            assert (await client.get("/stamped/a")).status_code == 200
            await reload(server, config_text(h1_upstream, routes=_route("extra")))
            assert (await client.get("/extra/b")).status_code == 200
        assert h1_upstream.connections == 1  # the idle connection was reused after the swap
    finally:
        await server.shutdown(grace_period=1.0)


async def test_a_changed_upstream_gets_new_pools_and_the_old_idle_ones_close(
    h1_upstream: UpstreamServer, h1_upstream_factory: object
) -> None:
    server = await started(config_text(h1_upstream))
    try:
        old_pool = server.runtime.upstreams["app"].pools[0]
        async with httpx.AsyncClient(base_url=base_url(server)) as client:
            assert (await client.get("/stamped/a")).status_code == 200
            assert old_pool.occupancy().idle == 1
            changed = config_text(h1_upstream).replace(
                f"endpoints: [{h1_upstream.url}]",
                f"endpoints: [{h1_upstream.url}]\n    timeouts: {{read: 5s}}",
            )
            await reload(server, changed)
            assert server.runtime.upstreams["app"].pools[0] is not old_pool
            assert old_pool.occupancy().idle == 0
            assert (await client.get("/stamped/b")).status_code == 200
        assert h1_upstream.connections == 2
    finally:
        await server.shutdown(grace_period=1.0)


async def test_an_exchange_running_across_a_reload_finishes_on_its_route(
    h1_upstream: UpstreamServer,
) -> None:
    held = "  - name: held\n    match: {path_prefix: /held}\n    upstream: app\n"
    # A grace period no busy machine outlasts: the exchange ends when the test says.
    server = await started(config_text(h1_upstream, routes=held, grace="30s"))
    try:
        async with httpx.AsyncClient(base_url=base_url(server)) as client:
            running = asyncio.create_task(client.get("/held"))
            await eventually(lambda: len(h1_upstream.requests) == 1, "the exchange to be under way")
            await reload(server, config_text(h1_upstream, grace="30s"))  # the route is gone
            assert (await client.get("/held")).status_code == 404
            h1_upstream.release_held()
            response = await running
        assert response.status_code == 200
    finally:
        await server.shutdown(grace_period=1.0)


async def test_a_prepared_reload_that_is_aborted_changes_nothing(
    h1_upstream: UpstreamServer,
) -> None:
    server = await started(config_text(h1_upstream))
    try:
        runtime = server.runtime
        await server.prepare_reload(parse_config(config_text(h1_upstream, stamp_value="two")))
        await server.abort_reload()
        assert server.runtime is runtime
        assert stamp.EVENTS == ["start:mark", "start:mark", "close:mark"]  # the new one
        async with httpx.AsyncClient(base_url=base_url(server)) as client:
            assert (await client.get("/stamped/x")).headers["x-stamp"] == "one"
        await server.commit_reload()  # nothing pending: nothing happens
        assert server.runtime is runtime
    finally:
        await server.shutdown(grace_period=1.0)


async def test_a_listener_that_cannot_bind_refuses_the_reload(h1_upstream: UpstreamServer) -> None:
    server = await started(config_text(h1_upstream))
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    taken = blocker.sockets[0].getsockname()[1]
    try:
        text = config_text(h1_upstream).replace(
            "  - bind: 127.0.0.1:0\n", f"  - bind: 127.0.0.1:0\n  - bind: 127.0.0.1:{taken}\n"
        )
        with pytest.raises(ReloadRefused) as refused:
            await server.prepare_reload(parse_config(text))
        # The line of the listener that cannot bind (the text starts with a newline).
        assert refused.value.errors[0].startswith(
            f"<string>:4: cannot start the new config: listeners[1]: "
            f"cannot listen on 127.0.0.1:{taken}: "
        )
        assert len(server.addresses) == 1
        assert stamp.EVENTS == ["start:mark"]  # the new chain never started
    finally:
        blocker.close()
        await server.shutdown(grace_period=1.0)


async def test_a_middleware_that_cannot_start_refuses_the_reload_at_its_line(
    h1_upstream: UpstreamServer,
) -> None:
    server = await started(config_text(h1_upstream))
    try:
        failing = config_text(h1_upstream, stamp_value="two, fail_start: true")
        with pytest.raises(ReloadRefused) as refused:
            await server.prepare_reload(parse_config(failing))
        assert refused.value.errors == [
            "<string>:9: cannot start the new config: middleware 'mark' cannot start: "
            "ConnectionRefusedError: the stamp backend is not there"
        ]
        assert stamp.EVENTS == ["start:mark", "start:mark", "close:mark"]  # tried, let go
        async with httpx.AsyncClient(base_url=base_url(server)) as client:
            assert (await client.get("/stamped")).headers["x-stamp"] == "one"
    finally:
        await server.shutdown(grace_period=1.0)


async def test_a_draining_server_refuses_a_reload(h1_upstream: UpstreamServer) -> None:
    server = await started(config_text(h1_upstream))
    await server.shutdown(grace_period=0.1)
    with pytest.raises(ReloadRefused, match="draining"):
        await server.prepare_reload(parse_config(config_text(h1_upstream)))


def _route(name: str) -> str:
    return f"  - name: {name}\n    match: {{path_prefix: /{name}}}\n    upstream: app\n"


async def test_a_reload_serves_a_renewed_certificate_to_new_connections(
    h1_upstream: UpstreamServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    first = make_tls_files(tmp_path_factory.mktemp("first"))
    second = make_tls_files(tmp_path_factory.mktemp("second"))
    text = f"""
listeners:
  - bind: 127.0.0.1:0
    tls: {{cert: {first.cert}, key: {first.key}}}
upstreams:
  app:
    endpoints: [{h1_upstream.url}]
routes:
  - name: all
    match: {{path_prefix: /}}
    upstream: app
"""
    server = await started(text)
    try:
        url = f"https://localhost:{server.addresses[0][1]}/echo"
        old_trust = first.client_context(["http/1.1"])
        async with httpx.AsyncClient(verify=old_trust) as kept:
            assert (await kept.get(url)).status_code == 200
            # The renewal writes over the same files; the config itself is unchanged.
            first.cert.write_bytes(second.cert.read_bytes())
            first.key.write_bytes(second.key.read_bytes())
            await reload(server, text)
            assert (await kept.get(url)).status_code == 200  # its connection is untouched
        async with httpx.AsyncClient(verify=second.client_context(["http/1.1"])) as client:
            assert (await client.get(url)).status_code == 200
        async with httpx.AsyncClient(verify=old_trust) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get(url)
    finally:
        await server.shutdown(grace_period=1.0)


HELD_ROUTE = "  - name: held\n    match: {path_prefix: /held}\n    upstream: app\n"


async def test_an_exchange_on_a_removed_route_still_running_after_the_grace_period_is_cut_h1(
    h1_upstream: UpstreamServer,
) -> None:
    server = await started(config_text(h1_upstream, routes=HELD_ROUTE))
    try:
        async with httpx.AsyncClient(base_url=base_url(server), timeout=10) as client:
            waiting = asyncio.create_task(client.get("/held"))  # never answered
            await eventually(lambda: len(h1_upstream.requests) == 1, "the exchange to be under way")
            started_at = asyncio.get_running_loop().time()
            await reload(server, config_text(h1_upstream))  # the held route is gone
            with pytest.raises(httpx.TransportError):
                await waiting  # only the cut can end it
            elapsed = asyncio.get_running_loop().time() - started_at
            # Cut no sooner than the 300 ms grace period (uvloop's clock counts ms).
            assert elapsed >= 0.3 - 0.001
    finally:
        await server.shutdown(grace_period=1.0)


async def test_an_exchange_on_a_removed_route_still_running_after_the_grace_period_is_reset_h2(
    h1_upstream: UpstreamServer,
) -> None:
    server = await started(config_text(h1_upstream, routes=HELD_ROUTE + _route("kept")))
    try:
        async with httpx.AsyncClient(
            base_url=base_url(server), http1=False, http2=True, timeout=10
        ) as client:
            doomed = asyncio.create_task(client.get("/held"))  # never answered
            await eventually(lambda: len(h1_upstream.requests) == 1, "the exchange to be under way")
            await reload(server, config_text(h1_upstream, routes=_route("kept")))
            with pytest.raises(httpx.RemoteProtocolError):
                await doomed  # its stream is reset at the end of the grace period
            # The connection it rode on serves on.
            assert (await client.get("/kept/x")).status_code == 200
            assert len(server.connections) == 1
    finally:
        await server.shutdown(grace_period=1.0)


async def test_a_reload_drops_the_metric_series_of_an_endpoint_it_removed(
    h1_upstream: UpstreamServer, h1_upstream_factory: H1UpstreamFactory
) -> None:
    other = await h1_upstream_factory()
    server = await started(config_text(h1_upstream))
    old_endpoint = h1_upstream.url.removeprefix("http://")

    def endpoints_counted() -> set[str]:
        return {
            sample.labels["endpoint"]
            for family in REGISTRY.collect()
            if family.name == "gatehouse_upstream_requests"
            for sample in family.samples
        }

    try:
        async with httpx.AsyncClient(base_url=base_url(server)) as client:
            assert (await client.get("/stamped/a")).status_code == 200
            assert old_endpoint in endpoints_counted()
            await reload(server, config_text(h1_upstream).replace(h1_upstream.url, other.url))
            assert (await client.get("/stamped/b")).status_code == 200
        assert old_endpoint not in endpoints_counted()
        assert other.url.removeprefix("http://") in endpoints_counted()
    finally:
        await server.shutdown(grace_period=1.0)


async def test_a_bug_while_a_worker_loads_a_reload_is_a_refusal_with_a_line(
    h1_upstream: UpstreamServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = await started(config_text(h1_upstream))
    buggy = config_text(h1_upstream).replace(
        "  limit:", "  bad: {type: 'tests.support.plugins.stamp:Misdeclared'}\n  limit:"
    )
    try:
        answer = await worker._prepare(server, {"text": buggy, "source": "routes.yaml"})
        assert answer["ok"] is False
        assert answer["errors"][0].startswith("routes.yaml:1: cannot load the config: TypeError(")
        assert "bug while loading the config for a reload" in caplog.text  # with its traceback
        async with httpx.AsyncClient(base_url=base_url(server)) as client:
            assert (await client.get("/stamped")).headers["x-stamp"] == "one"
    finally:
        await server.shutdown(grace_period=1.0)
