"""forward_auth through real sockets: a client (httpx), the gateway, a scripted external
auth service (tests/support/auth_service.py) and the echo upstream, which shows what passed."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx
import pytest

from metrics.definitions import REGISTRY
from middleware.forward_auth import DEFAULT_TIMEOUT_S
from proxy.process.server import Server
from tests.support.auth_service import AuthAnswer, AuthService, unused_port
from tests.support.gateway import GatewayFactory, base_url, simple_config
from tests.support.tls import TlsFiles
from tests.support.upstreams import UpstreamServer

pytestmark = pytest.mark.socket

CHALLENGE = 'Bearer realm="example", error="invalid_token"'


@pytest.fixture
async def auth() -> AsyncIterator[AuthService]:
    service = await AuthService().start()
    yield service
    await service.stop()


async def start(
    gateway_factory: GatewayFactory, upstream: UpstreamServer, url: str, options: str = ""
) -> Server:
    """A gateway whose catch-all route runs one forward_auth named `auth` at `url`."""
    extra = f"""
middleware:
  auth: {{type: forward_auth, url: "{url}", {options}}}
"""
    route = "    middleware: [auth]"
    return await gateway_factory(simple_config(upstream.url, "httptools", route=route, extra=extra))


async def get(server: Server, path: str = "/echo/x", **headers: str) -> httpx.Response:
    """GET `path`; keyword headers are written with dashes (`X_User` is `X-User`)."""
    sent = {name.replace("_", "-"): value for name, value in headers.items()}
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.get(base_url(server) + path, headers=sent)


def echoed(response: httpx.Response) -> dict[str, list[str]]:
    """The headers the echo upstream received, by lower-cased name."""
    assert response.status_code == 200, response.text
    headers: dict[str, list[str]] = {}
    for name, value in response.json()["headers"]:
        headers.setdefault(name.lower(), []).append(value)
    return headers


def failures(reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "gatehouse_auth_failures_total", {"middleware": "auth", "reason": reason}
    )
    return value or 0.0


# -- 2xx: on to the upstream ---------------------------------------------------------------


async def test_a_2xx_lets_the_request_on_with_the_copied_headers(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, auth: AuthService
) -> None:
    auth.answer = AuthAnswer(200, [("X-User", "ada"), ("X-Email", "ada@example.com")], b"ok")
    server = await start(
        gateway_factory, h1_upstream, auth.url + "/check", "copy_headers: [X-User]"
    )
    headers = echoed(await get(server, X_User="mallory", X_Email="mallory@example.com"))
    assert headers["x-user"] == ["ada"]  # the client's copy is gone, the service's is there
    # Not in copy_headers: the client's own value passes untouched, the service's does not.
    assert headers["x-email"] == ["mallory@example.com"]
    assert len(auth.requests) == 1
    assert auth.requests[0].target == "/check"
    assert auth.requests[0].method == "GET"


async def test_a_spoofed_copy_is_removed_even_when_the_service_sends_none(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, auth: AuthService
) -> None:
    auth.answer = AuthAnswer(204)
    server = await start(gateway_factory, h1_upstream, auth.url, "copy_headers: [X-User, X-Groups]")
    headers = echoed(await get(server, X_User="root", X_Groups="admin"))
    assert "x-user" not in headers
    assert "x-groups" not in headers
    assert auth.requests[0].target == "/"
    assert auth.requests[0].header("x-user") is None  # not shown to the service either


async def test_the_request_body_still_reaches_the_upstream(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, auth: AuthService
) -> None:
    server = await start(gateway_factory, h1_upstream, auth.url)
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(base_url(server) + "/echo/post", content=b"payload" * 1000)
    assert response.status_code == 200
    assert response.json()["body"] == "payload" * 1000
    assert auth.requests[0].body == b""  # the service gets no body
    assert auth.requests[0].header("content-length") is None
    assert auth.requests[0].header("x-forwarded-method") == "POST"


async def test_connections_to_the_service_are_kept_alive_and_reused(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, auth: AuthService
) -> None:
    server = await start(gateway_factory, h1_upstream, auth.url)
    for _ in range(5):
        assert (await get(server)).status_code == 200
    assert len(auth.requests) == 5
    assert auth.connections == 1


async def test_a_2xx_with_a_large_body_still_lets_the_request_on(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, auth: AuthService
) -> None:
    auth.answer = AuthAnswer(200, [("X-User", "ada")], b"x" * (200 * 1024))
    server = await start(gateway_factory, h1_upstream, auth.url, "copy_headers: X-User")
    assert echoed(await get(server))["x-user"] == ["ada"]


# -- what the service sees ------------------------------------------------------------------


async def test_the_service_sees_the_listed_headers_and_the_forwarding_headers(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, auth: AuthService
) -> None:
    server = await start(
        gateway_factory,
        h1_upstream,
        auth.url + "/verify?app=1",
        "forward_headers: [Authorization, Cookie]",
    )
    response = await get(
        server,
        "/echo/a%20b?q=1",
        Authorization="Bearer t0ken",
        Cookie="session=s3",
        X_Other="not listed",
        X_Forwarded_Uri="/spoofed",
        X_Forwarded_Method="DELETE",
        X_Forwarded_For="192.0.2.1",
    )
    assert response.status_code == 200
    seen = auth.requests[0]
    assert seen.target == "/verify?app=1"
    assert seen.header("authorization") == "Bearer t0ken"
    assert seen.header("cookie") == "session=s3"
    assert seen.header("x-other") is None
    assert seen.header("host") == f"127.0.0.1:{auth.port}"
    host, port = server.addresses[0]
    assert seen.header("x-forwarded-host") == f"{host}:{port}"
    assert seen.header("x-forwarded-method") == "GET"
    assert seen.header("x-forwarded-proto") == "http"
    assert seen.header("x-forwarded-uri") == "/echo/a%20b?q=1"
    # The client is not a trusted proxy: its own X-Forwarded-For is not passed on.
    assert seen.header("x-forwarded-for") == "127.0.0.1"
    names = [name.lower() for name, _ in seen.headers]
    assert names.count("x-forwarded-uri") == 1
    assert names.count("x-forwarded-method") == 1


async def test_without_forward_headers_every_end_to_end_header_goes(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, auth: AuthService
) -> None:
    server = await start(gateway_factory, h1_upstream, auth.url)
    response = await get(server, X_Other="yes", X_Hop="secret", Connection="X-Hop", TE="trailers")
    assert response.status_code == 200
    seen = auth.requests[0]
    assert seen.header("x-other") == "yes"
    assert seen.header("x-hop") is None  # named by Connection: hop-by-hop
    assert seen.header("te") is None
    assert (
        seen.header(
            "user-agent",
        )
        is not None
    )


# -- refusals: returned as they came -------------------------------------------------------


async def test_a_401_comes_back_as_is_with_its_challenge_and_body(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, auth: AuthService
) -> None:
    body = b'{"error": "invalid_token", "detail": "expired"}'
    auth.answer = AuthAnswer(
        401,
        [
            ("WWW-Authenticate", CHALLENGE),
            ("Content-Type", "application/problem+json"),
            ("X-Auth-Trace", "t-1"),
            ("Connection", "X-Auth-Hop"),
            ("X-Auth-Hop", "hop"),
            ("Keep-Alive", "timeout=5"),
        ],
        body,
    )
    server = await start(gateway_factory, h1_upstream, auth.url)
    before = failures("denied")
    response = await get(server)
    assert response.status_code == 401
    assert response.content == body
    assert response.headers["www-authenticate"] == CHALLENGE
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["x-auth-trace"] == "t-1"
    assert response.headers["content-length"] == str(len(body))
    assert "x-auth-hop" not in response.headers
    assert "keep-alive" not in response.headers
    assert h1_upstream.requests == []
    assert failures("denied") == before + 1


async def test_a_302_to_the_login_page_comes_back_with_its_location(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, auth: AuthService
) -> None:
    location = "https://login.example.com/?rd=http%3A%2F%2Fapp%2Fecho%2Fx"
    auth.answer = AuthAnswer(302, [("Location", location), ("Set-Cookie", "csrf=1; HttpOnly")])
    server = await start(gateway_factory, h1_upstream, auth.url)
    response = await get(server)
    assert response.status_code == 302
    assert response.headers["location"] == location
    assert response.headers["set-cookie"] == "csrf=1; HttpOnly"
    assert response.content == b""
    assert h1_upstream.requests == []


async def test_a_403_and_then_a_200_on_the_same_service_connection(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, auth: AuthService
) -> None:
    auth.answer = AuthAnswer(403, [("Content-Type", "text/plain")], b"no entry")
    server = await start(gateway_factory, h1_upstream, auth.url)
    refused = await get(server)
    assert (refused.status_code, refused.text) == (403, "no entry")
    auth.answer = AuthAnswer(200)
    assert (await get(server)).status_code == 200
    assert auth.connections == 1


# -- failures: the gateway's own replies, never a hang -------------------------------------


def assert_local_reply(response: httpx.Response, status: int, error: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"] == error


async def test_a_service_that_is_not_running_gives_503_at_once(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    url = f"http://127.0.0.1:{unused_port()}/check"
    server = await start(gateway_factory, h1_upstream, url, "timeout: 30s")
    before = failures("unavailable")
    started = time.monotonic()
    response = await get(server)
    elapsed = time.monotonic() - started
    assert_local_reply(response, 503, "auth_unavailable")
    assert elapsed < 10.0  # at once, not after the 30 s timeout (room for a busy machine)
    assert h1_upstream.requests == []
    assert failures("unavailable") == before + 1


async def test_a_silent_service_is_bounded_by_the_timeout_with_504(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, auth: AuthService
) -> None:
    auth.answer = AuthAnswer(hang=True)
    server = await start(gateway_factory, h1_upstream, auth.url, "timeout: 300ms")
    before = failures("timeout")
    started = time.monotonic()
    response = await get(server)
    elapsed = time.monotonic() - started
    assert_local_reply(response, 504, "auth_timeout")
    # After the 300 ms (to uvloop's millisecond clock), and before the 2 s default would
    # have ended it: the configured timeout did.
    assert 0.3 - 0.001 <= elapsed < DEFAULT_TIMEOUT_S
    assert h1_upstream.requests == []
    assert failures("timeout") == before + 1
    # The connection that timed out is not reused: the next request gets a fresh one.
    auth.answer = AuthAnswer(200)
    assert (await get(server)).status_code == 200
    assert auth.connections == 2


async def test_a_service_that_stalls_in_its_body_is_bounded_by_the_timeout_too(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, auth: AuthService
) -> None:
    auth.answer = AuthAnswer(401, body=b"partial", stall=True)
    server = await start(gateway_factory, h1_upstream, auth.url, "timeout: 300ms")
    started = time.monotonic()
    response = await get(server)
    assert_local_reply(response, 504, "auth_timeout")
    assert time.monotonic() - started < DEFAULT_TIMEOUT_S  # the configured 300 ms ended it
    auth.answer = AuthAnswer(200)
    assert (await get(server)).status_code == 200
    assert auth.connections == 2  # the stalled connection was dropped


async def test_a_service_that_drops_the_connection_gives_502(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, auth: AuthService
) -> None:
    auth.answer = AuthAnswer(drop=True)
    server = await start(gateway_factory, h1_upstream, auth.url)
    assert_local_reply(await get(server), 502, "auth_bad_response")


async def test_a_refusal_too_large_to_relay_gives_502(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, auth: AuthService
) -> None:
    auth.answer = AuthAnswer(401, [("WWW-Authenticate", CHALLENGE)], b"x" * (65 * 1024))
    server = await start(gateway_factory, h1_upstream, auth.url)
    before = failures("bad_response")
    assert_local_reply(await get(server), 502, "auth_bad_response")
    assert failures("bad_response") == before + 1


async def test_the_keep_alive_race_with_the_service_is_retried(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    # This service closes every connection after one answer, without saying so.
    service = await AuthService(drop_reused=True).start()
    try:
        server = await start(gateway_factory, h1_upstream, service.url)
        for _ in range(3):
            assert (await get(server)).status_code == 200
        assert len(service.requests) == 3
    finally:
        await service.stop()


# -- https -------------------------------------------------------------------------------


async def test_an_https_service_verified_against_its_ca(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, tls_files: TlsFiles
) -> None:
    service = await AuthService(answer=AuthAnswer(200, [("X-User", "tls-ada")])).start(
        tls=tls_files.server_context(["http/1.1"])
    )
    try:
        url = f"https://localhost:{service.port}/check"
        options = f"copy_headers: [X-User], tls: {{ca: '{tls_files.ca}'}}"
        server = await start(gateway_factory, h1_upstream, url, options)
        assert echoed(await get(server))["x-user"] == ["tls-ada"]
        assert service.requests[0].header("host") == f"localhost:{service.port}"
        # Without the CA the certificate is not trusted: the service counts as unavailable.
        untrusting = await start(gateway_factory, h1_upstream, url)
        assert_local_reply(await get(untrusting), 503, "auth_unavailable")
    finally:
        await service.stop()
