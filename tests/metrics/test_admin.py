"""metrics.admin: the admin listener's HTTP layer on a real loopback socket, with a small
AdminApp standing in for the supervising parent (which the end-to-end tests run): each
path's status, type and body, HEAD, 404/405, keep-alive and pipelining, and clients that
send garbage or nothing."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import Metric
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_prometheus

from metrics import admin
from metrics.admin import AdminServer
from metrics.aggregate import merge, snapshot
from tests.support.helpers import RawClient

pytestmark = pytest.mark.socket

PATHS = [
    "/",
    "/cache/purge",
    "/certificates",
    "/config",
    "/healthz",
    "/metrics",
    "/middleware",
    "/readyz",
    "/reload",
    "/routes",
    "/upstreams",
]
WRITE = {"X-Gatehouse-Admin": "1"}  # what a non-browser client sends with a POST


class App:
    """An AdminApp whose answers the test sets, recording what it was asked."""

    def __init__(self) -> None:
        self.readiness = (True, "ready: 2 of 2 workers serving")
        self.view: dict[str, Any] = {"source": "routes.yaml", "config": {"workers": 2}}
        self.reload_result: tuple[bool, list[str]] = (True, [])
        self.reloads: list[str] = []
        self.purges: list[tuple[str, str, str | None]] = []
        self.scrapes = 0
        workers = []
        for count in (3, 4):
            registry = CollectorRegistry()
            requests = Counter("t_requests", "requests", ["route"], registry=registry)
            requests.labels("users").inc(count)
            Gauge("t_open", "open now", registry=registry).set(1)
            workers.append(snapshot(registry))
        self._workers = workers

    def ready(self) -> tuple[bool, str]:
        return self.readiness

    async def metrics(self) -> list[Metric]:
        self.scrapes += 1
        return merge(self._workers)

    def config_view(self) -> dict[str, Any]:
        return self.view

    async def reload(self, reason: str) -> tuple[bool, list[str]]:
        self.reloads.append(reason)
        return self.reload_result

    async def upstreams(self) -> list[dict[str, Any]]:
        return [{"name": "app", "endpoints": []}]

    def routes(self) -> list[dict[str, Any]]:
        return [{"name": "users"}]

    def middleware(self) -> list[dict[str, Any]]:
        return [{"name": "cors"}]

    def certificates(self) -> list[dict[str, Any]]:
        return []

    async def status_page(self) -> bytes:
        return b"<!DOCTYPE html><title>status</title>"

    async def purge_cache(
        self, middleware: str, key: str, prefix: str | None
    ) -> tuple[int, dict[str, Any]]:
        self.purges.append((middleware, key, prefix))
        return 200, {"ok": True, "purged": {"pages": 2}, "errors": []}


class Admin:
    def __init__(self, server: AdminServer, app: App) -> None:
        assert server.address is not None
        self.server = server
        self.app = app
        self.address = server.address
        self.url = "http://{}:{}".format(*server.address)


@pytest.fixture(autouse=True)
def nothing_logged_as_a_problem(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """No test here makes the listener log a bug (or asyncio an error): a client's garbage,
    silence or going away is routine."""
    yield
    records = caplog.get_records("setup") + caplog.get_records("call")
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []


@pytest.fixture
async def running() -> AsyncIterator[Admin]:
    app = App()
    server = AdminServer(app)
    await server.start("127.0.0.1", 0)
    yield Admin(server, app)
    await server.close()


@pytest.fixture
async def client(running: Admin) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=running.url, timeout=5) as http:
        yield http


# --- each path ------------------------------------------------------------------------


async def test_healthz_says_ok(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert (response.status_code, response.reason_phrase) == (200, "OK")
    assert response.headers["content-type"] == "text/plain"
    assert response.text == "ok\n"


async def test_readyz_follows_the_app(running: Admin, client: httpx.AsyncClient) -> None:
    ready = await client.get("/readyz")
    running.app.readiness = (False, "draining")
    draining = await client.get("/readyz")

    assert (ready.status_code, ready.text) == (200, "ready: 2 of 2 workers serving\n")
    assert (draining.status_code, draining.text) == (503, "draining\n")
    assert draining.reason_phrase == "Service Unavailable"
    assert draining.headers["content-type"] == "text/plain"


async def test_the_live_views_are_json_and_the_status_page_html(
    client: httpx.AsyncClient,
) -> None:
    for path, key, expected in (
        ("/upstreams", "upstreams", [{"name": "app", "endpoints": []}]),
        ("/routes", "routes", [{"name": "users"}]),
        ("/middleware", "middleware", [{"name": "cors"}]),
        ("/certificates", "certificates", []),
    ):
        response = await client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"] == "application/json"
        assert response.json() == {key: expected}
    page = await client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "script-src" not in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.text == "<!DOCTYPE html><title>status</title>"
    head = await client.head("/")
    assert (head.status_code, head.content) == (200, b"")


async def test_metrics_are_prometheus_text_by_default(client: httpx.AsyncClient) -> None:
    response = await client.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = {
        (s.name, tuple(s.labels.items())): s.value
        for family in parse_prometheus(response.text)
        for s in family.samples
    }
    assert samples == {("t_requests_total", (("route", "users"),)): 7.0, ("t_open", ()): 2.0}


async def test_metrics_are_openmetrics_when_accept_asks(client: httpx.AsyncClient) -> None:
    response = await client.get(
        "/metrics",
        headers={"Accept": "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"},
    )

    assert response.status_code == 200
    assert response.headers["content-type"].startswith(
        "application/openmetrics-text; version=1.0.0"
    )
    assert response.text.endswith("# EOF\n")
    families = list(parse_openmetrics(response.text))  # type: ignore[no-untyped-call]
    assert [(f.name, f.type) for f in families] == [("t_requests", "counter"), ("t_open", "gauge")]
    assert families[0].samples[0].value == 7.0


async def test_config_is_the_apps_view_as_json(running: Admin, client: httpx.AsyncClient) -> None:
    running.app.view = {"source": "/etc/gatehouse/routes.yaml", "config": {"a": ["é", None]}}
    response = await client.get("/config")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == running.app.view


async def test_reload_success_is_200(running: Admin, client: httpx.AsyncClient) -> None:
    response = await client.post("/reload", headers=WRITE)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"ok": True}
    assert running.app.reloads == ["admin API"]


async def test_reload_refused_is_422_with_the_errors(
    running: Admin, client: httpx.AsyncClient
) -> None:
    errors = ["routes.yaml:4: routes[0].upstream: unknown upstream 'x'", "worker 12: gone"]
    running.app.reload_result = (False, errors)
    response = await client.post("/reload", content=b"ignored body", headers=WRITE)
    assert (response.status_code, response.reason_phrase) == (422, "Unprocessable Entity")
    assert response.json() == {"ok": False, "errors": errors}
    assert running.app.reloads == ["admin API"]


async def test_query_strings_are_ignored(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz", params={"probe": "kubelet"})
    assert (response.status_code, response.text) == (200, "ok\n")


# --- HEAD, 404, 405 -------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/config"])
async def test_head_answers_like_get_without_a_body(
    running: Admin, client: httpx.AsyncClient, path: str
) -> None:
    running.app.readiness = (False, "no worker is serving yet")
    got = await client.get(path)

    async with await RawClient.connect(running.address) as raw:
        await raw.send(f"HEAD {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        head = await raw.response(head=True)
        await raw.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        after = await raw.response()  # no body bytes came between the two

    assert head.status == got.status_code
    assert head.header("content-type") == got.headers["content-type"]
    assert head.header("content-length") == str(len(got.content)) != "0"
    assert (after.status, after.body) == (200, b"ok\n")


@pytest.mark.parametrize("path", ["/index.html", "/nope", "/healthz/", "/metrics/x", "/HEALTHZ"])
async def test_unknown_paths_get_404_with_the_list_of_paths(
    client: httpx.AsyncClient, path: str
) -> None:
    response = await client.get(path)
    assert (response.status_code, response.reason_phrase) == (404, "Not Found")
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": "not_found", "paths": PATHS}


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", "/healthz", "GET"),
        ("DELETE", "/config", "GET"),
        ("PUT", "/metrics", "GET"),
        ("GET", "/reload", "POST"),
        ("HEAD", "/reload", "POST"),
    ],
)
async def test_wrong_methods_get_405_with_allow(
    running: Admin, client: httpx.AsyncClient, method: str, path: str, allow: str
) -> None:
    response = await client.request(method, path)
    assert (response.status_code, response.reason_phrase) == (405, "Method Not Allowed")
    assert response.headers["allow"] == allow
    if method != "HEAD":
        assert response.json() == {"error": "method_not_allowed"}
    assert running.app.reloads == []
    assert running.app.scrapes == 0


# --- connections ----------------------------------------------------------------------


async def test_one_connection_serves_several_requests(running: Admin) -> None:
    connects: list[str] = []

    async def trace(event: str, info: dict[str, Any]) -> None:
        if event == "connection.connect_tcp.started":
            connects.append(event)

    async with httpx.AsyncClient(base_url=running.url, timeout=5) as http:
        statuses = [
            (
                await http.request(method, path, headers=WRITE, extensions={"trace": trace})
            ).status_code
            for method, path in [
                ("GET", "/healthz"),
                ("GET", "/metrics"),
                ("POST", "/reload"),
                ("GET", "/nope"),
                ("POST", "/healthz"),
                ("HEAD", "/config"),
                ("GET", "/readyz"),
            ]
        ]
    assert statuses == [200, 200, 200, 404, 405, 200, 200]
    assert connects == ["connection.connect_tcp.started"]


async def test_pipelined_requests_are_answered_in_order(running: Admin) -> None:
    async with await RawClient.connect(running.address) as raw:
        await raw.send(
            b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            b"POST /reload HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Gatehouse-Admin: 1\r\n"
            b"Content-Length: 5\r\n\r\nhello"
            b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n"
            b"GET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        responses = [await raw.response() for _ in range(4)]
        assert await raw.closed()
    assert [r.status for r in responses] == [200, 200, 200, 404]
    assert responses[1].json() == {"ok": True}
    assert running.app.reloads == ["admin API"]


@pytest.mark.parametrize(
    "garbage",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /healthz\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),  # a TLS ClientHello
        b"GET /healthz HTTP/1.1\r\nX: " + b"a" * (admin.MAX_REQUEST_BYTES + 10) + b"\r\n\r\n",
    ],
    ids=["request-line", "no-version", "header-line", "tls", "oversized-head"],
)
async def test_a_malformed_request_closes_that_connection_only(
    running: Admin, client: httpx.AsyncClient, garbage: bytes
) -> None:
    async with await RawClient.connect(running.address) as raw:
        await raw.send(garbage)
        data = await raw.read_until_closed()
    assert data.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 431 ")), data
    assert b'"error": "bad_request"' in data
    response = await client.get("/healthz")
    assert (response.status_code, response.text) == (200, "ok\n")


@pytest.mark.parametrize(
    "sent",
    [
        b"",
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    ],
    ids=["nothing", "half-a-head", "idle-after-a-response"],
)
async def test_a_silent_client_is_dropped_after_the_read_timeout(
    running: Admin, monkeypatch: pytest.MonkeyPatch, sent: bytes
) -> None:
    monkeypatch.setattr(admin, "READ_TIMEOUT_S", 0.1)
    async with await RawClient.connect(running.address) as raw:
        await raw.send(sent)
        if sent.endswith(b"\r\n\r\n"):
            assert (await raw.response()).status == 200
        # the default timeout (10 s) would leave it open well past this
        assert await raw.closed(wait_s=5.0)


async def test_a_client_within_the_read_timeout_is_kept(
    running: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin, "READ_TIMEOUT_S", 5.0)  # room for a busy machine's request
    async with await RawClient.connect(running.address) as raw:
        assert not await raw.closed(wait_s=0.2)
        await raw.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert (await raw.response()).status == 200


async def test_close_ends_open_connections_and_stops_listening(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = AdminServer(App())
    await server.start("127.0.0.1", 0)
    assert server.address is not None
    address = server.address
    assert len(server.filenos()) == 1
    async with await RawClient.connect(address) as idle, await RawClient.connect(address) as used:
        await used.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert (await used.response()).status == 200
        await idle.send(b"GET /heal")
        await asyncio.sleep(0.05)  # both are read from now
        with caplog.at_level(logging.DEBUG):
            async with asyncio.timeout(5):
                await server.close()
            assert await idle.closed()
            assert await used.closed()
            await asyncio.sleep(0.05)  # callbacks of the ended connections run
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert server.filenos() == []
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(*address)


async def test_close_ends_a_request_the_app_is_still_answering(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = App()
    started, never = asyncio.Event(), asyncio.Event()

    async def slow_reload(reason: str) -> tuple[bool, list[str]]:
        started.set()
        await never.wait()
        return True, []

    app.reload = slow_reload  # type: ignore[method-assign]
    server = AdminServer(app)
    await server.start("127.0.0.1", 0)
    assert server.address is not None
    async with await RawClient.connect(server.address) as raw:
        await raw.send(
            b"POST /reload HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Gatehouse-Admin: 1\r\n"
            b"Content-Length: 0\r\n\r\n"
        )
        async with asyncio.timeout(5):
            await started.wait()
        with caplog.at_level(logging.DEBUG):
            async with asyncio.timeout(5):
                await server.close()
            assert await raw.closed()
            await asyncio.sleep(0.05)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_an_app_that_fails_is_a_500_and_the_listener_serves_on(
    running: Admin, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken() -> list[Metric]:
        raise ValueError("a snapshot that does not merge")

    running.app.metrics = broken  # type: ignore[method-assign]
    response = await client.get("/metrics")
    assert response.status_code == 500
    assert response.json() == {"error": "internal_error"}
    assert (await client.get("/healthz")).status_code == 200
    assert "bug in the admin listener" in caplog.text
    caplog.clear()  # the one problem this test provokes


async def test_start_on_a_taken_address_raises_oserror(running: Admin) -> None:
    other = AdminServer(App())
    with pytest.raises(OSError, match="in use"):
        await other.start(*running.address)
    await other.close()


async def test_cache_purge_passes_a_key_or_a_prefix_to_the_app(
    running: Admin, client: httpx.AsyncClient
) -> None:
    purged = await client.post("/cache/purge", params={"prefix": "GET a/"}, headers=WRITE)
    assert purged.status_code == 200
    assert purged.json() == {"ok": True, "purged": {"pages": 2}, "errors": []}
    everything = await client.post("/cache/purge?prefix=", headers=WRITE)
    assert everything.status_code == 200
    one = await client.post(
        "/cache/purge", params={"key": "GET a/1", "middleware": "pages"}, headers=WRITE
    )
    assert one.status_code == 200
    assert running.app.purges == [("", "", "GET a/"), ("", "", ""), ("pages", "GET a/1", None)]
    for bad in ("/cache/purge", "/cache/purge?key=a&prefix=b", "/cache/purge?key=a&key=b"):
        refused = await client.post(bad, headers=WRITE)
        assert refused.status_code == 400, bad
    assert (await client.get("/cache/purge")).status_code == 405
    assert (await client.post("/cache/purge?prefix=")).status_code == 403  # cross-site check
    assert len(running.app.purges) == 3
