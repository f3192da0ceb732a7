"""The pytest plugin (proxy/testing/plugin.py) as a user meets it: test files run by
pytester in a fresh directory, with the plugin loaded from its `pytest11` entry point and
a hygiene check (tests/support/kit_conftest.py) that fails a test leaving a task, socket
or thread behind."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

HYGIENE = (Path(__file__).parents[2] / "support" / "kit_conftest.py").read_text()

ROUTES = """
listeners:
  - bind: 0.0.0.0:8080          # the kit binds 127.0.0.1:<free port> instead
upstreams:
  users:
    endpoints: [http://users:9000]
  orders:
    endpoints: [https://orders.prod.internal:443]
    protocol: h2
middleware:
  keys: {type: api_key, keys: [{key: k1, consumer: alice}]}
global_middleware: [{type: request_id}]
routes:
  - name: users
    match: {path_prefix: /api/users}
    rewrite: {strip_prefix: /api}
    middleware: [keys]
    upstream: users
  - name: orders
    match: {path_prefix: /api/orders}
    upstream: orders
"""


def run(
    pytester: pytest.Pytester, test_code: str, *, mode: str = "auto", subprocess: bool = False
) -> pytest.RunResult:
    """Run `test_code` as a user's test file, in asyncio mode `mode` (in a child process
    when the test leaks on purpose: what it leaks must not reach this process)."""
    pytester.makeini(
        f"""
[pytest]
asyncio_mode = {mode}
asyncio_default_fixture_loop_scope = function
timeout = 30
filterwarnings = error
"""
    )
    pytester.makeconftest(HYGIENE)
    pytester.path.joinpath("routes.yaml").write_text(ROUTES)
    pytester.makepyfile(test_code)
    runner = pytester.runpytest_subprocess if subprocess else pytester.runpytest
    return runner("-p", "no:cacheprovider", "-p", "no:randomly")


USERS_TEST = """
import pytest

async def test_users_route(gatehouse, upstream):
    users = await upstream("users")
    users.on("GET", "/users/1").reply(json={"id": 1, "name": "ada"})
    orders = await upstream("orders", protocol="h2c")
    gateway = await gatehouse("routes.yaml", upstreams={"orders": orders})
    async with gateway.client() as client:
        response = await client.get("/api/users/1", headers={"x-api-key": "k1"})
        assert response.status_code == 200
        assert response.json() == {"id": 1, "name": "ada"}
        # What reached the upstream: the path after the rewrite, the consumer header.
        seen = gateway.upstream_request(response)
        assert seen.path == "/users/1"
        assert seen.headers["x-consumer"] == "alice"
        assert "x-gatehouse-exchange" not in seen.headers
        # Who handled it.
        assert gateway.route_of(response) == "users"
        assert gateway.middleware_of(response) == ("request_id", "keys")
        # The other upstream, over h2c.
        order = await client.get("/api/orders/7?full=1")
        assert order.status_code == 200
        assert gateway.upstream_request(order).http_version == "2"
        assert gateway.upstream_request(order).query == "full=1"
        assert order.json()["path"] == "/api/orders/7"
    assert gateway.metric("gatehouse_requests_total", route="users", code="200") == 1
    assert gateway.metric("gatehouse_requests_total") == 2
    assert 'route="users"' in await gateway.scrape()
"""


@pytest.mark.parametrize("mode", ["auto", "strict"])
def test_both_factories_in_auto_and_strict_mode(pytester: pytest.Pytester, mode: str) -> None:
    code = USERS_TEST
    if mode == "strict":
        code = code.replace("async def test_", "@pytest.mark.asyncio\nasync def test_")
    result = run(pytester, code, mode=mode)
    result.assert_outcomes(passed=1)


def test_without_the_marker_strict_mode_does_not_run_the_test(pytester: pytest.Pytester) -> None:
    # The control for the strict case above: there the marker is what makes it run.
    result = run(pytester, USERS_TEST, mode="strict")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*async def functions are not natively supported*"])


def test_scripted_replies_rules_and_recording(pytester: pytest.Pytester) -> None:
    code = """
import asyncio
import httpx

YAML = '''
listeners: [{bind: 127.0.0.1:1}]
upstreams:
  app: {endpoints: [http://app], retries: {attempts: 1}}
routes:
  - {name: all, match: {path_prefix: /}, upstream: app}
'''

async def test_rules(gatehouse, upstream):
    app = await upstream("app")
    app.reply(404, body="nothing here")                        # anything else
    app.on("GET", "/flaky").reply(503, times=2).reply(200, body="at last")
    app.on(prefix="/items/").reply(200, json={"item": True}, headers={"x-up": "1"})
    app.on("POST", "/echo").call(lambda request: __import__("proxy.testing").testing.Reply(
        201, [("x-len", str(len(request.body)))], request.body.upper()))

    async def slow(request):
        await asyncio.sleep(0.2)
        return __import__("proxy.testing").testing.Reply(200, [], b"slow")
    app.on(path="/slow").call(slow)
    app.on(path="/drop").reply(drop=True)
    gateway = await gatehouse(YAML)
    client = gateway.client()          # not closed here: the kit closes it
    assert [(await client.get("/flaky")).status_code for _ in range(3)] == [503, 503, 200]
    item = await client.get("/items/9")
    assert item.json() == {"item": True} and item.headers["x-up"] == "1"
    echoed = await client.post("/echo", content=b"abc", headers={"x-mine": "yes"})
    assert (echoed.status_code, echoed.content, echoed.headers["x-len"]) == (201, b"ABC", "3")
    assert (await client.get("/slow")).content == b"slow"
    dropped = await client.get("/drop")
    assert dropped.status_code == 502
    # Dropped on a reused connection, then on a fresh one (the keep-alive race retry).
    assert [r.path for r in gateway.upstream_requests(dropped)] == ["/drop", "/drop"]
    assert (await client.get("/other")).status_code == 404
    posted = app.requests[4]
    assert (posted.method, posted.path, posted.body) == ("POST", "/echo", b"abc")
    assert posted.headers["x-mine"] == "yes" and posted.http_version == "1.1"
    assert app.last.path == "/other"
    assert len(app.requests) == 9
"""
    run(pytester, code).assert_outcomes(passed=1)


def test_h2c_upstreams_websocket_echo_and_h2_clients(pytester: pytest.Pytester) -> None:
    code = """
YAML = '''
listeners: [{bind: 127.0.0.1:1}]
upstreams:
  grpcish: {endpoints: [http://grpcish], protocol: h2c}
  chat: {endpoints: [http://chat]}
routes:
  - {name: chat, match: {path_prefix: /chat}, upstream: chat, websocket: true}
  - {name: all, match: {path_prefix: /}, upstream: grpcish}
'''

async def test_h2(gatehouse, upstream):
    h2 = await upstream("grpcish", protocol="h2c")
    h2.on("POST", "/big").reply(200, body=b"z" * 300_000)
    await upstream("chat", websocket=True)
    gateway = await gatehouse(YAML)
    async with gateway.client(http2=True) as client:
        response = await client.post("/big", content=b"q" * 100_000)
        assert response.http_version == "HTTP/2"
        assert len(response.content) == 300_000
    assert h2.last.body == b"q" * 100_000 and h2.last.http_version == "2"
    async with gateway.websocket("/chat/room") as ws:
        await ws.send("hello")
        assert await ws.recv() == "hello"
        await ws.send(b"bytes")
        assert await ws.recv() == b"bytes"
    left_open = await gateway.websocket("/chat/other")   # the kit closes this one
    await left_open.send("x")
    assert await left_open.recv() == "x"
"""
    run(pytester, code).assert_outcomes(passed=1)


def test_reload_metrics_and_admin(pytester: pytest.Pytester) -> None:
    code = """
import httpx
import pytest
from proxy.config.document import ConfigError

BEFORE = '''
listeners: [{bind: 127.0.0.1:1}]
upstreams: {app: {endpoints: [http://app]}}
routes: [{name: old, match: {path_prefix: /}, upstream: app}]
'''

async def test_reload(gatehouse, upstream, tmp_path):
    await upstream("app")
    path = tmp_path / "routes.yaml"
    path.write_text(BEFORE)
    gateway = await gatehouse(path)
    async with gateway.client() as client:
        assert gateway.route_of(await client.get("/")) == "old"
        path.write_text(BEFORE.replace("name: old", "name: new"))
        await gateway.reload()
        assert gateway.route_of(await client.get("/")) == "new"
        with pytest.raises(ConfigError, match=r"<test config>:4: routes\\[0\\]"):
            await gateway.reload(BEFORE.replace("upstream: app", "upstream: nope"))
        assert gateway.route_of(await client.get("/")) == "new"
    assert gateway.metric("gatehouse_config_reloads_total", result="success") == 1
    assert gateway.metric("gatehouse_config_reloads_total", result="failure") == 1
    assert gateway.metric("gatehouse_requests_total", route="new") == 2
    assert gateway.metric("gatehouse_request_duration_seconds_count", route="new") == 2
    # X-Gatehouse-Admin: the admin listener takes no POST a browser could have sent.
    headers = {"X-Gatehouse-Admin": "1"}
    async with httpx.AsyncClient(base_url=gateway.admin_url, headers=headers) as admin:
        assert (await admin.get("/readyz")).status_code == 200
        assert (await admin.get("/config")).json()["config"]["routes"][0]["name"] == "new"
        path.write_text(BEFORE.replace("routes:", "routez:"))
        refused = await admin.post("/reload")
        assert refused.status_code == 422
        assert "routes.yaml:4: routez: unknown key 'routez'" in refused.text
        path.write_text(BEFORE)
        assert (await admin.post("/reload")).status_code == 200
    assert gateway.metric("gatehouse_config_reloads_total", result="failure") == 2
    async with gateway.client() as client:
        assert gateway.route_of(await client.get("/")) == "old"
"""
    run(pytester, code).assert_outcomes(passed=1)


def test_failure_messages_say_what_is_wrong(pytester: pytest.Pytester) -> None:
    code = """
import httpx

async def test_answered_by_the_gateway(gatehouse, upstream):
    await upstream("users")
    gateway = await gatehouse("routes.yaml", upstreams={"orders": await upstream("o")})
    async with gateway.client() as client:
        response = await client.get("/api/users/1")          # no API key: 401
    gateway.upstream_request(response)

async def test_not_from_the_gateway(gatehouse, upstream):
    await upstream("users")
    gateway = await gatehouse("routes.yaml", upstreams={"orders": await upstream("o")})
    gateway.route_of(httpx.Response(200))

async def test_unknown_metric(gatehouse, upstream):
    await upstream("users")
    gateway = await gatehouse("routes.yaml", upstreams={"orders": await upstream("o")})
    gateway.metric("gatehouse_request_total")

async def test_unknown_label(gatehouse, upstream):
    await upstream("users")
    gateway = await gatehouse("routes.yaml", upstreams={"orders": await upstream("o")})
    async with gateway.client() as client:
        await client.get("/nowhere")
    gateway.metric("gatehouse_requests_total", rout="users")

async def test_bad_yaml(gatehouse):
    await gatehouse("listeners: [{bind: 127.0.0.1:1}]\\nupstreams: {}\\nroutes: [{name: x}]\\n")

async def test_missing_file(gatehouse):
    await gatehouse("no-such-routes.yaml")

async def test_upstream_the_config_lacks(gatehouse, upstream):
    await gatehouse("routes.yaml", upstreams={"userz": await upstream("u")})

async def test_nothing_received(upstream):
    (await upstream("users")).last

async def test_two_upstreams_of_one_name(upstream):
    await upstream("users")
    await upstream("users")
"""
    result = run(pytester, code)
    result.assert_outcomes(failed=9)
    result.stdout.fnmatch_lines_random(
        [
            "*AssertionError: no kit upstream received GET /api/users/1 (route 'users', "
            "middleware: request_id, keys; the gateway answered 401 itself)",
            "*AssertionError: the response carries no x-gatehouse-exchange header*",
            "*LookupError: no metric named 'gatehouse_request_total' "
            "(did you mean 'gatehouse_requests_total'?)",
            "*LookupError: gatehouse_requests_total has no label 'rout'; its labels: code, "
            "method, protocol, route",
            "*ConfigError: <test config>:3: routes[[]0]: missing required key*",
            "*ConfigError: no-such-routes.yaml: cannot read: No such file or directory*",
            "*ConfigError: routes.yaml: upstreams={'userz': ...} names no upstream of the "
            "config; it has: orders, users",
            "*AssertionError: upstream 'users' has received no request",
            "*ValueError: this test already has an upstream named 'users'",
        ]
    )


def test_a_failed_test_reports_what_its_gateway_did(pytester: pytest.Pytester) -> None:
    code = """
async def test_fails(gatehouse, upstream):
    await upstream("users")
    gateway = await gatehouse("routes.yaml", upstreams={"orders": await upstream("o")})
    async with gateway.client() as client:
        await client.get("/api/users/1")
        await client.get("/api/orders/2?x=1")
        nowhere = await client.get("/nowhere")
    assert gateway.route_of(nowhere) == "users", "the test's own"

async def test_passes(gatehouse, upstream):
    await upstream("users")
    gateway = await gatehouse("routes.yaml", upstreams={"orders": await upstream("o")})
    async with gateway.client() as client:
        await client.get("/api/orders/2")
"""
    result = run(pytester, code)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*AssertionError: the test's own*",
            "*- gatehouse 1: exchanges -*",
            "3 exchanges through routes.yaml (http://127.0.0.1:*)",
            "  #1 GET /api/users/1 -> 401 (route users, request_id, keys; answered by the gateway)",
            "  #2 GET /api/orders/2 -> 200 (route orders, request_id; orders received GET "
            "/api/orders/2?x=1)",
            "  #3 GET /nowhere -> 404 (no route, request_id; answered by the gateway)",
        ]
    )
    assert (
        "exchanges through"
        not in result.stdout.str()
        .split("test_fails")[-1]
        .split("short test summary")[0]
        .split("_ test_passes _")[-1]
    )


def test_a_test_that_leaks_fails_the_hygiene_check(pytester: pytest.Pytester) -> None:
    # The control for every run above: the check does fail a test that leaves a socket
    # (a connection the test opened and never closed) or a task behind.
    code = """
import asyncio
import pathlib

KEPT = []  # so that garbage collection does not close the connection either

async def test_leaks_a_socket(gatehouse, upstream):
    await upstream("users")
    gateway = await gatehouse("routes.yaml", upstreams={"orders": await upstream("o")})
    host, port = gateway.server.addresses[0]
    KEPT.append(await asyncio.open_connection(host, port))

async def test_leaks_a_task():
    asyncio.get_running_loop().create_task(asyncio.sleep(30))

async def test_leaks_nothing(gatehouse, upstream):
    await upstream("users")
    await gatehouse("routes.yaml", upstreams={"orders": await upstream("o")})

async def test_leaks_nothing_with_a_writer_thread(gatehouse, upstream):
    # The access log writes from a thread of its own: it ends with the gateway.
    await upstream("users")
    text = pathlib.Path("routes.yaml").read_text().replace(
        "global_middleware: [", "global_middleware: [{type: access_log, output: stderr}, "
    )
    gateway = await gatehouse(text, upstreams={"orders": await upstream("o")})
    async with gateway.client() as client:
        assert (await client.get("/api/orders/1")).status_code == 200
"""
    result = run(pytester, code, subprocess=True)
    result.assert_outcomes(passed=4, errors=2)
    result.stdout.fnmatch_lines_random(
        [
            "*AssertionError: file descriptors left open: ['socket:*",
            "*AssertionError: tasks left behind: *sleep*",
        ]
    )


def test_without_pytest_asyncio_the_plugin_breaks_nothing(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # gatehouse installed without its `testing` extra, in a project with its own pytest:
    # pytest-asyncio is made unimportable (and its plugin not loaded).
    stub = pytester.mkdir("no_asyncio")
    (stub / "pytest_asyncio.py").write_text("raise ImportError('not installed')\n")
    monkeypatch.setenv("PYTHONPATH", str(stub))
    pytester.makepyfile(
        """
def test_unrelated(tmp_path):
    (tmp_path / "note").write_text("kept")
    assert (tmp_path / "note").read_text() == "kept"

def test_kit(gatehouse):
    pass
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:asyncio", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        ["*the gatehouse fixtures need pytest-asyncio: pip install 'gatehouse-proxy[[]testing]'*"]
    )
