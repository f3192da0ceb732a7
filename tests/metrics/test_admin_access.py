"""metrics.admin_access through a real admin listener on a loopback socket: the Host
allow-list (DNS rebinding), the bearer token, and the refusal of state-changing requests
that a browser page could have sent (CSRF), each counted by reason. The end-to-end tests
run the same gates in a gateway process (tests/e2e/test_admin_security.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from metrics.admin import AdminServer
from metrics.admin_access import AdminAccess
from metrics.gateway import GATEWAY_REGISTRY
from tests.metrics.test_admin import App
from tests.support.helpers import RawClient

pytestmark = pytest.mark.socket

TOKEN = "0123456789abcdef-admin-token"
NAME = "gatehouse-admin.internal"
WRITE = {"X-Gatehouse-Admin": "1"}
CHALLENGE = 'Bearer realm="gatehouse-admin"'


class Listener:
    """An AdminServer with `access` on 127.0.0.1, and the app behind it."""

    def __init__(self, server: AdminServer, app: App) -> None:
        assert server.address is not None
        self.server = server
        self.app = app
        self.address = server.address
        self.url = "http://{}:{}".format(*server.address)

    async def raw(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        """One request exactly as written (Host and all): status, headers, body."""
        async with await RawClient.connect(self.address) as raw:
            await raw.send(request)
            response = await raw.response()
        return response.status, {k.lower(): v for k, v in response.headers}, response.body


async def started(access: AdminAccess) -> AsyncIterator[Listener]:
    app = App()
    server = AdminServer(app, access)
    await server.start("127.0.0.1", 0)
    try:
        yield Listener(server, app)
    finally:
        await server.close()


@pytest.fixture
async def open_listener() -> AsyncIterator[Listener]:
    """No token, `NAME` allowed."""
    async for listener in started(AdminAccess.of(None, [NAME])):
        yield listener


@pytest.fixture
async def guarded() -> AsyncIterator[Listener]:
    """admin.token set."""
    async for listener in started(AdminAccess.of(TOKEN, [])):
        yield listener


def refusals(reason: str) -> float:
    found = GATEWAY_REGISTRY.get_sample_value("gatehouse_admin_refusals_total", {"reason": reason})
    return found or 0.0


# --- Host allow-list ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.0.0.1:9901",
        "10.1.2.3:80",
        "[::1]",
        "[::1]:9901",
        "[2001:db8::7]:9901",
        "localhost",
        "LocalHost:9901",
        "localhost.",
        NAME,
        f"{NAME.upper()}:9901",
        f"{NAME}.",
        "127.0.0.1:",
    ],
)
async def test_ip_literals_localhost_and_configured_names_are_served(
    open_listener: Listener, host: str
) -> None:
    for path in ("/healthz", "/config"):
        request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        status, _, _ = await open_listener.raw(request)
        assert status == 200, (host, path)


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:9901",
        "127.0.0.1.evil.example",  # a name that starts like an address
        "localhost.evil.example",
        f"{NAME}.evil.example",
        f"x{NAME}",
        "sub.localhost",
        "::1",  # IPv6 without brackets is not a Host
        "[::1",
        "[fe80::1%25eth0]",
        "[evil.example]",
        "127.0.0.1:port",
        "0x7f000001",
        "",
    ],
)
async def test_any_other_host_gets_421_on_every_path(open_listener: Listener, host: str) -> None:
    before = refusals("host")
    for method, path in [("GET", "/healthz"), ("GET", "/config"), ("POST", "/reload")]:
        head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nX-Gatehouse-Admin: 1\r\n"
        status, headers, body = await open_listener.raw(f"{head}Content-Length: 0\r\n\r\n".encode())
        assert status == 421, (host, path)
        assert headers["content-type"] == "application/json"
        assert b'"error": "misdirected_request"' in body
    assert open_listener.app.reloads == []
    assert refusals("host") == before + 3


async def test_a_second_host_header_is_refused(open_listener: Listener) -> None:
    request = b"GET /config HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n"

    status, _, _ = await open_listener.raw(request)

    assert status == 400  # h11 refuses it first (RFC 9112 section 3.2: exactly one Host)


async def test_a_request_without_host_is_served(open_listener: Listener) -> None:
    # HTTP/1.0 has no Host; a browser always sends one, so its absence is no rebinding.
    status, _, body = await open_listener.raw(b"GET /healthz HTTP/1.0\r\n\r\n")

    assert (status, body) == (200, b"ok\n")


# --- bearer token -------------------------------------------------------------------------


async def test_without_the_token_every_path_but_the_probes_is_401(guarded: Listener) -> None:
    before = refusals("unauthorized")
    async with httpx.AsyncClient(base_url=guarded.url, timeout=5) as client:
        assert (await client.get("/healthz")).text == "ok\n"
        assert (await client.get("/readyz")).status_code == 200
        for method, path in [
            ("GET", "/metrics"),
            ("GET", "/config"),
            ("HEAD", "/config"),
            ("POST", "/reload"),
            ("GET", "/nope"),  # not even the list of paths
        ]:
            response = await client.request(method, path, headers=WRITE)
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"] == CHALLENGE
            if method != "HEAD":
                assert response.json()["error"] == "unauthorized"
                assert "paths" not in response.json()
    assert guarded.app.reloads == []
    assert guarded.app.scrapes == 0
    assert refusals("unauthorized") == before + 5


@pytest.mark.parametrize(
    "authorization",
    [
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        "Bearer",
        f"Basic {TOKEN}",
        TOKEN,
        f"Bearer{TOKEN}",
        f"Bearer {TOKEN.upper()}",
    ],
)
async def test_a_wrong_token_is_401_invalid_token(guarded: Listener, authorization: str) -> None:
    async with httpx.AsyncClient(base_url=guarded.url, timeout=5) as client:
        response = await client.get("/config", headers={"Authorization": authorization})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == f'{CHALLENGE}, error="invalid_token"'


async def test_two_authorization_fields_are_refused_even_with_the_token(guarded: Listener) -> None:
    request = (
        f"GET /config HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Authorization: Bearer {TOKEN}\r\n\r\n"
    ).encode()

    status, _, _ = await guarded.raw(request)

    assert status == 401


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
async def test_the_token_opens_every_path(guarded: Listener, scheme: str) -> None:
    headers = {"Authorization": f"{scheme} {TOKEN}"}
    async with httpx.AsyncClient(base_url=guarded.url, headers=headers, timeout=5) as client:
        assert (await client.get("/metrics")).status_code == 200
        assert (await client.get("/config")).json() == guarded.app.view
        # The Authorization header is a header no browser adds on its own: no other needed.
        assert (await client.post("/reload")).json() == {"ok": True}
    assert guarded.app.reloads == ["admin API"]


async def test_a_new_token_holds_from_the_next_request(guarded: Listener) -> None:
    async with httpx.AsyncClient(base_url=guarded.url, timeout=5) as client:
        old = {"Authorization": f"Bearer {TOKEN}"}
        assert (await client.get("/config", headers=old)).status_code == 200
        guarded.server.access = AdminAccess.of("another-token-0123456789", [])
        assert (await client.get("/config", headers=old)).status_code == 401
        new = {"Authorization": "Bearer another-token-0123456789"}
        assert (await client.get("/config", headers=new)).status_code == 200


# --- cross-site requests ------------------------------------------------------------------


def browser_form_post(origin: str, fetch_site: str) -> bytes:
    """What a browser sends when a page on `origin` submits a form to /reload: a "simple"
    request, which it sends without asking first (no CORS preflight)."""
    return (
        "POST /reload HTTP/1.1\r\nHost: 127.0.0.1:9901\r\n"
        f"Origin: {origin}\r\nSec-Fetch-Site: {fetch_site}\r\nSec-Fetch-Mode: navigate\r\n"
        "Sec-Fetch-Dest: document\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        "User-Agent: Mozilla/5.0\r\nContent-Length: 3\r\n\r\na=1"
    ).encode()


@pytest.mark.parametrize(
    ("origin", "fetch_site"),
    [
        ("https://evil.example", "cross-site"),
        ("http://localhost:3000", "same-site"),  # another local port: same site
        ("null", "cross-site"),  # a sandboxed frame or a data: URL
    ],
)
async def test_a_browsers_cross_site_form_post_is_refused(
    open_listener: Listener, origin: str, fetch_site: str
) -> None:
    before = refusals("cross_site")

    status, _, body = await open_listener.raw(browser_form_post(origin, fetch_site))

    assert status == 403
    assert b'"error": "cross_site_request"' in body
    assert open_listener.app.reloads == []
    assert refusals("cross_site") == before + 1


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://127.0.0.1:9901", "X-Gatehouse-Admin": "1"},  # rebound, same origin
        {"Sec-Fetch-Site": "same-origin", "X-Gatehouse-Admin": "1"},
        {"Sec-Fetch-Site": "cross-site", "Authorization": "Bearer x"},
    ],
)
async def test_a_post_showing_a_browser_page_is_refused_whatever_it_carries(
    open_listener: Listener, headers: dict[str, str]
) -> None:
    async with httpx.AsyncClient(base_url=open_listener.url, timeout=5) as client:
        response = await client.post("/reload", headers=headers)
    assert response.status_code == 403
    assert open_listener.app.reloads == []


@pytest.mark.parametrize(
    "headers",
    [
        {},  # curl -X POST: a form could send exactly this
        {"Content-Type": "text/plain"},
        {"Authorization": "Basic dXNlcjpwYXNz"},  # a browser may add cached Basic credentials
    ],
)
async def test_a_post_without_a_header_a_page_cannot_send_is_refused(
    open_listener: Listener, headers: dict[str, str]
) -> None:
    async with httpx.AsyncClient(base_url=open_listener.url, timeout=5) as client:
        response = await client.post("/reload", headers=headers)
    assert response.status_code == 403
    assert "X-Gatehouse-Admin" in response.json()["message"]
    assert open_listener.app.reloads == []


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Gatehouse-Admin": "1"},
        {"X-Gatehouse-Admin": "1", "Sec-Fetch-Site": "none"},  # typed by the user: no page
        {"Authorization": "Bearer anything"},  # no token configured: a header all the same
    ],
)
async def test_a_post_from_a_client_that_is_not_a_page_is_taken(
    open_listener: Listener, headers: dict[str, str]
) -> None:
    async with httpx.AsyncClient(base_url=open_listener.url, timeout=5) as client:
        response = await client.post("/reload", headers=headers)
    assert response.status_code == 200
    assert open_listener.app.reloads == ["admin API"]


async def test_a_preflight_gets_no_cors_permission(open_listener: Listener) -> None:
    # What a browser asks before a fetch() that adds X-Gatehouse-Admin: nothing in the
    # answer allows it, so the browser never sends the POST.
    request = (
        b"OPTIONS /reload HTTP/1.1\r\nHost: 127.0.0.1:9901\r\nOrigin: https://evil.example\r\n"
        b"Access-Control-Request-Method: POST\r\n"
        b"Access-Control-Request-Headers: x-gatehouse-admin\r\n\r\n"
    )

    status, headers, _ = await open_listener.raw(request)

    assert status == 405
    assert not [name for name in headers if name.startswith("access-control-")]
    assert open_listener.app.reloads == []


async def test_reads_need_no_header(open_listener: Listener) -> None:
    async with httpx.AsyncClient(base_url=open_listener.url, timeout=5) as client:
        assert (await client.get("/config")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200
