"""`jwt` through real sockets: an httpx client, the gateway, a real upstream that echoes
what reached it, and a real JWKS server (tests/support/jwks_server.py) that the tests rotate,
flood with unknown kids, stop and black-hole. The JWKS rate limit runs on an injected
clock, so no test sleeps to wait it out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from metrics.definitions import REGISTRY
from middleware.base import Handler
from middleware.jwt_auth import JwtAuth
from middleware.options import Options
from proxy.config.load import parse_config
from proxy.core.models import Request, Response
from proxy.process.server import Server
from tests.support.gateway import base_url
from tests.support.jwks_server import JwksServer, SigningKey
from tests.support.upstreams import UpstreamServer

pytestmark = pytest.mark.socket

SECRET = b"0123456789abcdef0123456789abcdef"
HS = SigningKey.hmac(SECRET)
RSA_1 = SigningKey.rsa("rsa-1")
RSA_2 = SigningKey.rsa("rsa-2")
EC = SigningKey.ec()
ED = SigningKey.ed25519("ed-1")


class Clock:
    """The JWKS cache's clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ShowConsumer:
    """A plugin after `jwt`: returns `request.consumer` in `X-Seen-Consumer`."""

    OPTIONS = ()

    def __init__(self, options: Options) -> None:
        self.name = options.name

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        response = await call_next(request)
        response.headers["X-Seen-Consumer"] = request.consumer
        return response


@asynccontextmanager
async def gateway(yaml_text: str, clock: Clock | None = None) -> AsyncIterator[Server]:
    """A gateway whose `jwt` instances use `clock` for the JWKS rate limit."""
    config = parse_config(yaml_text)
    for spec in config.middleware.values():
        if isinstance(spec.instance, JwtAuth) and spec.instance.jwks and clock is not None:
            spec.instance.jwks.now = clock
    server = Server(config)
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown(grace_period=1.0)


def config(upstream: UpstreamServer, middleware: str, routes: str) -> str:
    return f"""
listeners:
  - bind: 127.0.0.1:0
upstreams:
  app:
    endpoints: [{upstream.url}]
middleware:
{middleware}
routes:
{routes}
"""


def jwks_config(
    upstream: UpstreamServer,
    jwks: JwksServer,
    extra: str = "",
    wait: str = "200ms",
    timeout: str = "3s",
) -> str:
    return config(
        upstream,
        f"""\
  auth:
    type: jwt
    algorithms: [RS256, EdDSA]
    jwks_url: {jwks.url}
    jwks_wait: {wait}
    jwks_timeout: {timeout}
    forward_claims: {{sub: X-User-Id}}
{extra}""",
        "  - {match: {path_prefix: /}, upstream: app, middleware: [auth]}",
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def echoed(response: httpx.Response, name: str) -> list[str]:
    """The values of header `name` as the upstream received it."""
    assert response.status_code == 200, response.text
    headers: list[list[str]] = response.json()["headers"]
    return [value for key, value in headers if key.lower() == name.lower()]


def failures(middleware: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "gatehouse_auth_failures_total", {"middleware": middleware, "reason": reason}
    )
    return value or 0.0


def refreshes(middleware: str, result: str) -> float:
    value = REGISTRY.get_sample_value(
        "gatehouse_jwks_refreshes_total", {"middleware": middleware, "result": result}
    )
    return value or 0.0


@pytest.fixture
async def jwks() -> AsyncIterator[JwksServer]:
    server = await JwksServer({"keys": [RSA_1.jwk(), ED.jwk()]}).start()
    yield server
    await server.stop()


async def test_valid_tokens_of_each_family_pass_and_their_claims_reach_the_upstream(
    h1_upstream: UpstreamServer, jwks: JwksServer, tmp_path: Path
) -> None:
    pem = tmp_path / "ec.pem"
    pem.write_text(EC.public_pem())
    text = config(
        h1_upstream,
        f"""\
  hs: {{type: jwt, algorithms: [HS256], secret: "{SECRET.decode()}",
        forward_claims: {{sub: X-User-Id, email: X-User-Email}}}}
  es: {{type: jwt, algorithms: [ES256], public_key_file: "{pem}",
        forward_claims: {{sub: X-User-Id}}}}
  keys: {{type: jwt, algorithms: [RS256, EdDSA], jwks_url: "{jwks.url}",
          forward_claims: {{sub: X-User-Id}}}}
  show: {{type: "tests.e2e.test_mw_jwt:ShowConsumer"}}""",
        """\
  - {match: {path_prefix: /hs/}, upstream: app, middleware: [show, hs],
     rewrite: {strip_prefix: /hs}}
  - {match: {path_prefix: /es/}, upstream: app, middleware: [show, es],
     rewrite: {strip_prefix: /es}}
  - {match: {path_prefix: /jwks/}, upstream: app, middleware: [show, keys],
     rewrite: {strip_prefix: /jwks}}""",
    )
    cases = [
        ("/hs/echo", HS.sign({"sub": "hs-user", "email": "h@example.com"}), "hs-user"),
        ("/es/echo", EC.sign({"sub": "es-user"}), "es-user"),
        ("/jwks/echo", RSA_1.sign({"sub": "rs-user"}), "rs-user"),
        ("/jwks/echo", ED.sign({"sub": "ed-user"}), "ed-user"),
    ]
    spoofed = {"X-User-Id": "root", "X-User-Email": "root@evil"}
    async with gateway(text) as server, httpx.AsyncClient(timeout=5) as client:
        for path, token, user in cases:
            response = await client.get(base_url(server) + path, headers=bearer(token) | spoofed)
            assert response.headers["X-Seen-Consumer"] == user
            assert echoed(response, "X-User-Id") == [user]
            assert echoed(response, "Authorization") == [f"Bearer {token}"]
            # Only `hs` forwards the email claim, so only there is a client's copy replaced.
            email = ["h@example.com"] if path == "/hs/echo" else ["root@evil"]
            assert echoed(response, "X-User-Email") == email
    assert [r.header("X-User-Id") for r in h1_upstream.requests] == [
        "hs-user",
        "es-user",
        "rs-user",
        "ed-user",
    ]
    assert jwks.fetches == 1


async def test_refused_tokens_get_401_with_the_reason_and_never_reach_the_upstream(
    h1_upstream: UpstreamServer,
) -> None:
    text = config(
        h1_upstream,
        f"""\
  auth:
    type: jwt
    algorithms: [HS256]
    secret: "{SECRET.decode()}"
    issuer: https://idp.example.com/
    audience: [orders, billing]
    required_claims: [exp, sub]
    leeway: 5s
    realm: shop""",
        "  - {match: {path_prefix: /}, upstream: app, middleware: [auth]}",
    )
    good = {"iss": "https://idp.example.com/", "aud": "orders", "sub": "u"}
    now = int(time.time())
    cases: list[tuple[str, str, str]] = [
        (HS.sign(good | {"exp": now - 60}), "expired", "token expired"),
        (HS.sign(good | {"nbf": now + 60}), "not_yet_valid", "token not yet valid"),
        (HS.sign(good | {"aud": "shipping"}), "bad_audience", "invalid audience"),
        (HS.sign(good | {"iss": "https://evil/"}), "bad_issuer", "invalid issuer"),
        (SigningKey.hmac(b"x" * 32).sign(good), "bad_signature", "invalid signature"),
        (RSA_1.sign(good), "alg_not_allowed", "algorithm not allowed"),
        (
            SigningKey.hmac(b"k" * 64, "HS512").sign(good),
            "alg_not_allowed",
            "algorithm not allowed",
        ),
        (unsigned(good), "alg_not_allowed", "algorithm not allowed"),
        (
            HS.sign({"iss": good["iss"], "aud": "orders"}),
            "missing_claim",
            "missing required claim sub",
        ),
        ("eyJhbGciOiJIUzI1NiJ9.e30", "malformed", "malformed token"),
        ("a.b.c.d", "malformed", "malformed token"),
    ]
    async with gateway(text) as server, httpx.AsyncClient(timeout=5) as client:
        url = base_url(server) + "/echo"
        for token, reason, description in cases:
            before = failures("auth", reason)
            response = await client.get(url, headers=bearer(token))
            assert response.status_code == 401, (reason, response.text)
            assert response.headers["WWW-Authenticate"] == (
                f'Bearer realm="shop", error="invalid_token", error_description="{description}"'
            )
            assert response.json()["error"] == "unauthorized"
            assert response.json()["message"] == description
            assert failures("auth", reason) == before + 1, reason

        response = await client.get(url)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="shop"'

        token = HS.sign(good)  # once: signing adds an exp from the clock
        response = await client.get(url, headers=bearer(token))
        assert echoed(response, "Authorization") == [f"Bearer {token}"]
    assert len(h1_upstream.requests) == 1


def unsigned(claims: dict[str, Any]) -> str:
    return jwt.encode(claims | {"exp": int(time.time()) + 60}, "", algorithm="none")


async def test_the_token_can_come_from_a_cookie_and_be_kept_from_the_upstream(
    h1_upstream: UpstreamServer,
) -> None:
    text = config(
        h1_upstream,
        f"""\
  auth:
    type: jwt
    algorithms: [HS256]
    secret: "{SECRET.decode()}"
    cookie: session
    forward_token: false
    forward_claims: {{sub: X-User-Id}}""",
        "  - {match: {path_prefix: /}, upstream: app, middleware: [auth]}",
    )
    token = HS.sign({"sub": "cookie-user"})
    async with gateway(text) as server, httpx.AsyncClient(timeout=5) as client:
        response = await client.get(
            base_url(server) + "/echo", headers={"Cookie": f"theme=dark; session={token}"}
        )
        assert echoed(response, "X-User-Id") == ["cookie-user"]
        assert echoed(response, "Cookie") == ["theme=dark"]
        response = await client.get(base_url(server) + "/echo", headers={"Cookie": "theme=dark"})
        assert response.status_code == 401


async def test_http2_requests_are_checked_the_same_way(
    h1_upstream: UpstreamServer, jwks: JwksServer
) -> None:
    async with (
        gateway(jwks_config(h1_upstream, jwks)) as server,
        httpx.AsyncClient(http1=False, http2=True, timeout=5) as client,
    ):
        response = await client.get(
            base_url(server) + "/echo", headers=bearer(ED.sign({"sub": "h2"}))
        )
        assert response.http_version == "HTTP/2"
        assert echoed(response, "X-User-Id") == ["h2"]
        response = await client.get(base_url(server) + "/echo", headers=bearer("nope"))
        assert response.status_code == 401


async def test_key_rotation_is_picked_up_by_an_unknown_kid_and_refreshes_are_rate_limited(
    h1_upstream: UpstreamServer, jwks: JwksServer
) -> None:
    clock = Clock()
    async with (
        gateway(jwks_config(h1_upstream, jwks), clock) as server,
        httpx.AsyncClient(timeout=5) as client,
    ):
        url = base_url(server) + "/echo"
        response = await client.get(url, headers=bearer(RSA_1.sign({"sub": "old"})))
        assert echoed(response, "X-User-Id") == ["old"]
        assert jwks.fetches == 1

        # The provider rotates: rsa-2 replaces rsa-1. Within jwks_min_refresh of the last
        # fetch, the new kid cannot make us fetch again.
        jwks.jwks = {"keys": [RSA_2.jwk(), ED.jwk()]}
        new_token = RSA_2.sign({"sub": "new"})
        response = await client.get(url, headers=bearer(new_token))
        assert response.status_code == 401
        assert 'error_description="unknown key id"' in response.headers["WWW-Authenticate"]

        # A burst of made-up kids: not one fetch.
        bad = [RSA_2.sign({"sub": "x"}, kid=f"bogus-{i}") for i in range(40)]
        responses = await asyncio.gather(*(client.get(url, headers=bearer(t)) for t in bad))
        assert {r.status_code for r in responses} == {401}
        assert jwks.fetches == 1

        # Once jwks_min_refresh has passed, the unknown kid triggers one refresh.
        clock.now += 30
        response = await client.get(url, headers=bearer(new_token))
        assert echoed(response, "X-User-Id") == ["new"]
        assert jwks.fetches == 2
        # The rotated-out key is no longer trusted (and cannot trigger another fetch yet).
        response = await client.get(url, headers=bearer(RSA_1.sign({"sub": "old"})))
        assert response.status_code == 401
        assert jwks.fetches == 2

        # The next burst after the interval: all of it shares a single fetch.
        clock.now += 30
        responses = await asyncio.gather(*(client.get(url, headers=bearer(t)) for t in bad))
        assert {r.status_code for r in responses} == {401}
        assert jwks.fetches == 3


async def test_a_jwks_server_that_is_down_never_holds_up_requests(
    h1_upstream: UpstreamServer, jwks: JwksServer
) -> None:
    # The wait, the fetch timeout and a busy machine's delays far apart, so that the time
    # a request took says which of them it waited for: none (well under 3 s), the wait
    # (3 s and more), or the fetch (30 s).
    clock = Clock()
    async with (
        gateway(jwks_config(h1_upstream, jwks, wait="3s", timeout="30s"), clock) as server,
        httpx.AsyncClient(timeout=60) as client,
    ):
        url = base_url(server) + "/echo"
        known = bearer(RSA_1.sign({"sub": "known"}))
        unknown = bearer(RSA_2.sign({"sub": "unknown"}))
        assert echoed(await client.get(url, headers=known), "X-User-Id") == ["known"]

        # Down: connections refused.
        await jwks.stop()
        clock.now += 30
        unreachable = refreshes("auth", "unreachable")
        for headers, status in [(unknown, 401), (known, 200), (unknown, 401)]:
            started = time.monotonic()
            response = await client.get(url, headers=headers)
            assert response.status_code == status
            assert time.monotonic() - started < 3.0  # not held for the wait
        assert refreshes("auth", "unreachable") == unreachable + 1  # then rate limited

        # Black-holed: the fetch hangs; the unknown kid waits jwks_wait (3s), no more, and
        # a known kid sent meanwhile does not wait at all.
        jwks.hang = True
        await jwks.start()
        clock.now += 30
        started = time.monotonic()
        waiting = asyncio.ensure_future(client.get(url, headers=unknown))
        await jwks.wait_for_fetches(2)
        response = await client.get(url, headers=known)
        assert response.status_code == 200
        assert not waiting.done()  # answered while the other request still waits
        response = await waiting
        assert response.status_code == 401
        assert 'error_description="unknown key id"' in response.headers["WWW-Authenticate"]
        elapsed = time.monotonic() - started
        assert 3.0 - 0.001 <= elapsed < 30.0  # (uvloop's clock counts milliseconds)
    # Shutting the gateway down cancelled the hanging fetch (the block above returned).


async def test_a_jwks_server_down_at_startup_does_not_stop_the_gateway(
    h1_upstream: UpstreamServer, jwks: JwksServer
) -> None:
    await jwks.stop()
    clock = Clock()
    async with (
        gateway(jwks_config(h1_upstream, jwks, "    jwks_min_refresh: 10s"), clock) as server,
        httpx.AsyncClient(timeout=5) as client,
    ):
        url = base_url(server) + "/echo"
        response = await client.get(url, headers=bearer(RSA_1.sign({"sub": "early"})))
        assert response.status_code == 401
        # The provider comes back; after jwks_min_refresh the next token fetches the set.
        await jwks.start()
        clock.now += 10
        response = await client.get(url, headers=bearer(RSA_1.sign({"sub": "later"})))
        assert echoed(response, "X-User-Id") == ["later"]
