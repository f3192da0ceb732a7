"""`oidc` through real sockets: a browser-like httpx client (tests/support/oidc_provider.py)
that follows redirects and posts the provider's forms, the gateway, a real upstream that
echoes what reached it, and a real, certified OpenID Provider (node-oidc-provider, run with
the machine's Node.js) whose request log shows what the gateway asked of it.

Token expiry is waited for as a condition: the test reads the session's expiry out of
its cookie (it has the cookie secret) and waits until the clock has passed it."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Iterator
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest

from metrics.definitions import REGISTRY
from middleware.oidc_cookies import CookieSealer, Session, join, open_session
from proxy.config.load import parse_config
from proxy.process.server import Server
from tests.support.gateway import base_url
from tests.support.gateway_process import free_port
from tests.support.oidc_provider import API_AUDIENCE, NAVIGATE, SECRET, Browser, OidcProvider
from tests.support.upstreams import UpstreamServer

pytestmark = pytest.mark.socket

COOKIE_SECRET = "an-oidc-cookie-secret-of-32-bytes-or-more"
SEALER = CookieSealer([COOKIE_SECRET.encode()])
JSON = {"Accept": "application/json"}


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    server = OidcProvider(tmp_path_factory.mktemp("oidc")).start()
    yield server
    server.stop()


def config(upstream: UpstreamServer, issuer: str, **options: str) -> str:
    """A gateway: `/bye` and `/open/` without the middleware, `/api/` in api mode, the
    rest behind a login (its options overridden by `options`)."""
    login = {
        "issuer": issuer,
        "client_id": "app",
        "client_secret": SECRET,
        "scopes": "[openid, email, profile]",
        "cookie_secret": COOKIE_SECRET,
        "post_logout_redirect_uri": "/bye",
        "forward_claims": "{sub: X-User, email: X-Email, groups: X-Groups}",
        "forward_access_token": "true",
        "timeout": "3s",
    } | options
    written = "\n".join(f"    {key}: {value}" for key, value in login.items())
    return f"""
listeners:
  - bind: 127.0.0.1:0
upstreams:
  app:
    endpoints: [{upstream.url}]
middleware:
  login:
    type: oidc
{written}
  api:
    type: oidc
    mode: api
    issuer: {issuer}
    client_id: app
    client_secret: {SECRET}
    audience: {API_AUDIENCE}
    forward_claims: {{sub: X-User, client_id: X-Client}}
    timeout: {login["timeout"]}
routes:
  - {{match: {{path: /bye}}, upstream: app}}
  - {{match: {{path_prefix: /open/}}, upstream: app}}
  - {{match: {{path_prefix: /api/}}, upstream: app, middleware: [api]}}
  - {{match: {{path_prefix: /}}, upstream: app, middleware: [login]}}
"""


@pytest.fixture
async def gateway_for(h1_upstream: UpstreamServer, provider: OidcProvider) -> AsyncIterator[object]:
    """`await gateway_for(**options)`: a gateway of `config`, drained at teardown."""
    servers: list[Server] = []

    async def start(**options: str) -> Server:
        server = Server(parse_config(config(h1_upstream, provider.issuer, **options)))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.shutdown(grace_period=1.0)


def echoed(response: httpx.Response, name: str) -> list[str]:
    """The values of header `name` as the upstream received it."""
    assert response.status_code == 200, response.text
    headers: list[list[str]] = response.json()["headers"]
    return [value for key, value in headers if key.lower() == name.lower()]


def failures(reason: str, middleware: str = "login") -> float:
    value = REGISTRY.get_sample_value(
        "gatehouse_auth_failures_total", {"middleware": middleware, "reason": reason}
    )
    return value or 0.0


def sessions(event: str, middleware: str = "login") -> float:
    value = REGISTRY.get_sample_value(
        "gatehouse_oidc_sessions_total", {"middleware": middleware, "event": event}
    )
    return value or 0.0


def stored_session(browser: Browser, name: str = "gatehouse_oidc") -> Session:
    """The session in the browser's cookies, opened with the test's secret."""
    cookies = {cookie.name: cookie.value or "" for cookie in browser.client.cookies.jar}
    value = join(cookies, name)
    assert value is not None, cookies
    session = open_session(SEALER, name, value)
    assert session is not None
    return session


async def until_past(moment: float) -> None:
    """Wait until the wall clock is past `moment`: token times are Unix times, which no
    event marks (the loop's sleep runs on the monotonic clock: a margin covers the two)."""
    remaining = moment - time.time()
    assert remaining < 10, remaining
    await asyncio.sleep(max(remaining, 0.0) + 0.02)
    assert time.time() > moment


async def log_in(browser: Browser, server: Server, path: str = "/page?x=1") -> httpx.Response:
    response = await browser.navigate(base_url(server) + path)
    assert response.status_code == 200, (response, browser.hops)
    assert response.json()["target"] == path
    return response


async def test_a_full_login_reaches_the_upstream_with_the_claims_and_no_client_copies(
    gateway_for: object, provider: OidcProvider, h1_upstream: UpstreamServer
) -> None:
    server = await gateway_for()  # type: ignore[operator]
    async with Browser("alice") as browser:
        spoofed = {"X-User": "root", "X-Email": "root@evil", "x_user": "root"}
        response = await browser.navigate(base_url(server) + "/page?x=1", headers=spoofed)
        assert response.status_code == 200, browser.hops
        assert browser.forms == ["login", "consent"]
        # The way there: the gateway, the provider's authorization endpoint, its login
        # and consent pages, the callback, the page first asked for.
        first, callback = browser.hops[0], browser.hops[-2]
        authorize = urlsplit(first.headers["location"])
        assert f"{authorize.scheme}://{authorize.netloc}" == provider.issuer
        query = parse_qs(authorize.query)
        assert query["response_type"] == ["code"]
        assert query["code_challenge_method"] == ["S256"]
        assert query["redirect_uri"] == [base_url(server) + "/oidc/callback"]
        assert query["scope"] == ["openid email profile"]
        assert len(query["state"][0]) >= 43
        assert len(query["nonce"][0]) >= 43
        login_cookie = first.headers["set-cookie"]
        assert "Path=/oidc/callback" in login_cookie
        assert "HttpOnly" in login_cookie
        assert "SameSite=Lax" in login_cookie
        assert callback.url.path == "/oidc/callback"
        assert callback.headers["location"] == "/page?x=1"
        set_cookies = callback.headers.get_list("set-cookie")
        assert any(c.startswith("gatehouse_oidc=") and "HttpOnly" in c for c in set_cookies)
        assert any(c.startswith("gatehouse_oidc_login_") and "Max-Age=0" in c for c in set_cookies)
        # What the upstream got: the ID token's claims, never the client's copies.
        assert echoed(response, "X-User") == ["alice"]
        assert echoed(response, "X-Email") == ["alice@example.test"]
        assert echoed(response, "X-Groups") == ["staff,team-alice"]
        assert echoed(response, "x_user") == []
        cookie_line = ",".join(echoed(response, "Cookie"))
        assert "gatehouse_oidc" not in cookie_line  # the session stays between browser and gateway
        (authorization,) = echoed(response, "Authorization")
        access_token = authorization.removeprefix("Bearer ")
        claims = jwt.decode(access_token, options={"verify_signature": False})
        assert (claims["sub"], claims["aud"]) == ("alice", API_AUDIENCE)
        # The session cookie is sealed: neither tokens nor claims can be read from it.
        sealed = browser.cookie("gatehouse_oidc")
        assert sealed is not None
        assert b"alice" not in base64.urlsafe_b64decode(sealed + "=" * (-len(sealed) % 4))
        assert stored_session(browser).subject == "alice"
    assert sessions("login") >= 1


async def test_a_session_is_reused_across_requests_without_asking_the_provider(
    gateway_for: object, provider: OidcProvider
) -> None:
    server = await gateway_for()  # type: ignore[operator]
    async with Browser("bob") as browser:
        await log_in(browser, server)
        asked = len(provider.requests())
        for path in ("/a", "/b?y=2", "/c"):
            response = await browser.client.get(base_url(server) + path, headers=JSON)
            assert echoed(response, "X-User") == ["bob"]
            assert "set-cookie" not in response.headers
        assert provider.requests()[asked:] == []


async def test_without_a_session_a_page_goes_to_the_provider_and_a_script_gets_401(
    gateway_for: object, provider: OidcProvider
) -> None:
    server = await gateway_for()  # type: ignore[operator]
    async with httpx.AsyncClient(timeout=10) as client:
        page = await client.get(base_url(server) + "/page", headers=NAVIGATE)
        assert page.status_code == 302
        assert page.headers["location"].startswith(provider.issuer + "/auth?")
        assert page.headers["cache-control"] == "no-store"
        fetch = await client.get(base_url(server) + "/data", headers=JSON)
        assert fetch.status_code == 401
        assert fetch.json()["error"] == "oidc_login_required"
        assert fetch.headers["www-authenticate"] == 'OIDC realm="gatehouse"'
        posted = await client.post(base_url(server) + "/form", data={"a": "1"})
        assert posted.status_code == 401


async def test_a_tampered_session_cookie_is_refused_and_the_browser_logs_in_again(
    gateway_for: object, provider: OidcProvider
) -> None:
    server = await gateway_for()  # type: ignore[operator]
    async with Browser("carol") as browser:
        await log_in(browser, server)
        sealed = browser.cookie("gatehouse_oidc")
        assert sealed is not None
        middle = len(sealed) // 2
        flipped = "A" if sealed[middle] != "A" else "B"
        forged = sealed[:middle] + flipped + sealed[middle + 1 :]
        before = failures("invalid_session")
        for value in (forged, sealed[:-4], "not-sealed", sealed + sealed):
            cookie = {"Cookie": f"gatehouse_oidc={value}"}
            async with httpx.AsyncClient(timeout=10) as other:
                fetch = await other.get(base_url(server) + "/data", headers=JSON | cookie)
                assert fetch.status_code == 401, value
                page = await other.get(base_url(server) + "/page", headers=NAVIGATE | cookie)
                assert page.status_code == 302
                assert page.headers["location"].startswith(provider.issuer + "/auth?")
                cleared = page.headers.get_list("set-cookie")
                assert any(c.startswith("gatehouse_oidc=;") and "Max-Age=0" in c for c in cleared)
        assert failures("invalid_session") - before == 8
        # The genuine cookie still works.
        response = await browser.client.get(base_url(server) + "/data", headers=JSON)
        assert echoed(response, "X-User") == ["carol"]


async def test_a_callback_with_a_wrong_state_is_refused(
    gateway_for: object, provider: OidcProvider, h1_upstream: UpstreamServer
) -> None:
    server = await gateway_for()  # type: ignore[operator]
    callback = base_url(server) + "/oidc/callback"
    before = failures("state_mismatch")
    async with Browser("dave") as browser:
        started = await browser.get(base_url(server) + "/page")
        state = parse_qs(urlsplit(started.headers["location"]).query)["state"][0]
        wrong = state[:16] + ("x" if state[16] != "x" else "y") + state[17:]  # same cookie name
        for query in (f"code=abc&state={wrong}", "code=abc", f"code=abc&state={state[:20]}"):
            refused = await browser.get(f"{callback}?{query}")
            assert refused.status_code == 403, query
            assert refused.json()["error"] == "oidc_state_mismatch"
        # The right state from another browser (no login cookie) is refused too.
        async with httpx.AsyncClient(timeout=10) as other:
            refused = await other.get(f"{callback}?code=abc&state={state}")
            assert refused.json()["error"] == "oidc_state_mismatch"
        # A login completed, its callback replayed: the login cookie is gone.
        await browser.navigate(base_url(server) + "/page")
        replayed = browser.hops[-2]
        assert replayed.url.path == "/oidc/callback"
        again = await browser.get(str(replayed.url))
        assert again.json()["error"] == "oidc_state_mismatch"
    assert failures("state_mismatch") - before == 5
    assert all(request.target != "/oidc/callback" for request in h1_upstream.requests)


async def test_the_provider_s_error_on_the_callback_is_a_403(
    gateway_for: object, provider: OidcProvider
) -> None:
    server = await gateway_for(auth_params="{prompt: none}")  # type: ignore[operator]
    async with Browser("erin") as browser:
        # prompt=none without a provider session: the provider answers login_required.
        response = await browser.navigate(base_url(server) + "/page")
        assert response.status_code == 403
        assert response.json()["error"] == "oidc_login_denied"
        assert "login_required" in response.json()["message"]
        assert browser.forms == []


async def test_expired_tokens_are_renewed_with_the_refresh_token(
    gateway_for: object, provider: OidcProvider
) -> None:
    server = await gateway_for(client_id="short")  # type: ignore[operator]
    async with Browser("frank") as browser:
        await log_in(browser, server)
        first = stored_session(browser)
        assert first.refresh_token
        assert first.expires - first.started <= 2  # the provider's TTL for `short`: 1 s
        await until_past(first.expires)
        asked = len(provider.requests())
        renewed_before = sessions("refresh")
        # Three requests at once with the expired session: one renewal serves them all.
        responses = await asyncio.gather(
            *(browser.client.get(base_url(server) + f"/r{i}", headers=JSON) for i in range(3))
        )
        for response in responses:
            assert echoed(response, "X-User") == ["frank"]
            assert "gatehouse_oidc=" in response.headers["set-cookie"]
            assert response.headers["cache-control"] == "private, no-store"
        assert provider.requests()[asked:].count("POST /token") == 1
        assert sessions("refresh") - renewed_before == 1
        second = stored_session(browser)
        assert second.expires > first.expires
        assert (second.started, second.ends) == (first.started, first.ends)
        # The renewed access token is the one forwarded now.
        (authorization,) = echoed(responses[0], "Authorization")
        assert second.access_token == authorization.removeprefix("Bearer ")
        assert second.access_token != first.access_token


async def test_logout_clears_the_session_and_ends_the_provider_s(
    gateway_for: object, provider: OidcProvider
) -> None:
    server = await gateway_for()  # type: ignore[operator]
    async with Browser("grace") as browser:
        await log_in(browser, server)
        id_token = stored_session(browser).id_token
        logout = await browser.get(base_url(server) + "/oidc/logout")
        assert logout.status_code == 302
        target = urlsplit(logout.headers["location"])
        assert f"{target.scheme}://{target.netloc}{target.path}" == provider.issuer + "/session/end"
        query = parse_qs(target.query)
        assert query["id_token_hint"] == [id_token]
        assert query["post_logout_redirect_uri"] == [base_url(server) + "/bye"]
        assert query["client_id"] == ["app"]
        assert any(
            c.startswith("gatehouse_oidc=;") and "Max-Age=0" in c
            for c in logout.headers.get_list("set-cookie")
        )
        assert browser.cookie("gatehouse_oidc") is None
        # On to the provider: it asks to confirm, then sends the browser to /bye.
        browser.forms.clear()
        done = await browser.navigate(str(target.geturl()))
        assert browser.forms == ["logout"]
        assert done.json()["target"] == "/bye"
        # Logged out at the provider too: the next login shows its form again.
        browser.forms.clear()
        await log_in(browser, server)
        assert browser.forms == ["login", "consent"]
    assert sessions("logout") >= 1


async def test_an_expired_session_logs_in_again(
    gateway_for: object, provider: OidcProvider
) -> None:
    server = await gateway_for(session_lifetime="1s")  # type: ignore[operator]
    async with Browser("heidi") as browser:
        started = await browser.get(base_url(server) + "/page")
        assert started.status_code == 302
        # Up to the callback, which sets the session; its page is not asked for yet.
        callback = await browser.navigate(started.headers["location"], stop_at="/oidc/callback")
        assert callback.headers["location"] == "/page"
        session = stored_session(browser)
        assert session.ends - session.started == pytest.approx(1, abs=0.002)
        sealed = browser.cookie("gatehouse_oidc")
        before = failures("session_expired")
        await until_past(session.ends)
        # The browser has dropped the cookie (its Max-Age is the session's end) ...
        again = await browser.get(base_url(server) + "/page")
        assert again.status_code == 302
        assert again.headers["location"].startswith(provider.issuer + "/auth?")
        # ... and the gateway refuses it if it comes all the same: the end is sealed in it.
        kept = {"Cookie": f"gatehouse_oidc={sealed}"}
        async with httpx.AsyncClient(timeout=10) as replay:
            page = await replay.get(base_url(server) + "/page", headers=NAVIGATE | kept)
            assert page.status_code == 302
            assert page.headers["location"].startswith(provider.issuer + "/auth?")
            fetch = await replay.get(base_url(server) + "/data", headers=JSON | kept)
            assert fetch.json()["error"] == "oidc_login_required"
        assert failures("session_expired") - before == 2


async def test_api_mode_takes_the_provider_s_access_tokens_and_refuses_the_rest(
    gateway_for: object, provider: OidcProvider, h1_upstream: UpstreamServer
) -> None:
    server = await gateway_for()  # type: ignore[operator]
    tokens = await provider.client_credentials()
    url = base_url(server) + "/api/items"
    async with httpx.AsyncClient(timeout=10) as client:
        bearer = {"Authorization": f"Bearer {tokens['access_token']}"}
        response = await client.get(url, headers=bearer | {"X-User": "root"})
        assert echoed(response, "X-User") == ["app"]  # a client's token: sub is the client
        assert echoed(response, "X-Client") == ["app"]
        missing = await client.get(url, headers=NAVIGATE)
        assert missing.status_code == 401  # never a redirect in api mode
        assert missing.headers["www-authenticate"] == 'Bearer realm="gatehouse"'
        for token, description in (
            ("not-a-jwt", "malformed token"),
            (tokens["access_token"][:-6] + "AAAAAA", "invalid signature"),
        ):
            refused = await client.get(url, headers={"Authorization": f"Bearer {token}"})
            assert refused.status_code == 401
            assert f'error_description="{description}"' in refused.headers["www-authenticate"]
    # An ID token (its aud is the client, not the API) is no access token.
    async with Browser("ivan") as browser:
        await log_in(browser, server)
        id_token = stored_session(browser).id_token
        refused = await browser.client.get(url, headers={"Authorization": f"Bearer {id_token}"})
        assert refused.status_code == 401
        assert 'error_description="invalid audience"' in refused.headers["www-authenticate"]
    assert all(r.header("X-User") != "root" for r in h1_upstream.requests)


async def test_an_unreachable_provider_is_a_503(h1_upstream: UpstreamServer) -> None:
    issuer = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    server = Server(parse_config(config(h1_upstream, issuer, timeout="300ms")))
    await server.start()
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            page = await client.get(base_url(server) + "/page", headers=NAVIGATE)
            assert page.status_code == 503
            assert page.json()["error"] == "oidc_provider_unavailable"
            api = await client.get(
                base_url(server) + "/api/x", headers={"Authorization": "Bearer a.b.c"}
            )
            assert api.status_code == 503
            # Logging out needs no provider: the cookies go, the browser goes to /bye.
            logout = await client.get(base_url(server) + "/oidc/logout", headers=NAVIGATE)
            assert logout.status_code == 302
            assert logout.headers["location"] == base_url(server) + "/bye"
    finally:
        await server.shutdown(grace_period=1.0)


async def test_a_refused_refresh_token_sends_the_browser_to_log_in_again(
    gateway_for: object, provider: OidcProvider
) -> None:
    server = await gateway_for(client_id="short")  # type: ignore[operator]
    async with Browser("judy") as browser:
        await log_in(browser, server)
        session = stored_session(browser)
        async with httpx.AsyncClient(timeout=10) as client:  # the provider forgets it
            revoked = await client.post(
                f"{provider.issuer}/token/revocation",
                data={"token": session.refresh_token, "token_type_hint": "refresh_token"},
                auth=("short", SECRET),
            )
            assert revoked.status_code == 200, revoked.text
        before = failures("refresh_failed")
        await until_past(session.expires)
        asked = len(provider.requests())
        fetch = await browser.client.get(base_url(server) + "/data", headers=JSON)
        assert fetch.json()["error"] == "oidc_login_required"
        page = await browser.get(base_url(server) + "/page")
        assert page.status_code == 302
        assert page.headers["location"].startswith(provider.issuer + "/auth?")
        # The second request reused the first one's answer: one refused renewal.
        assert failures("refresh_failed") - before == 2
        assert provider.requests()[asked:] == ["POST /token"]


async def test_a_claim_that_cannot_be_a_header_fails_the_login_not_the_gateway(
    gateway_for: object, provider: OidcProvider, h1_upstream: UpstreamServer
) -> None:
    server = await gateway_for()  # type: ignore[operator]
    # The provider makes `sub` from the login typed into its form.
    async with Browser("mallory\r\nX-Injected: 1") as browser:
        before = failures("bad_token_answer")
        response = await browser.navigate(base_url(server) + "/page")
        assert response.status_code == 502
        assert response.json()["error"] == "oidc_bad_response"
        assert "claim sub is not a valid header value" in response.json()["message"]
        assert browser.cookie("gatehouse_oidc") is None
        assert failures("bad_token_answer") - before == 1
    assert all(r.header("X-Injected") is None for r in h1_upstream.requests)
