"""The `oidc` middleware's provider client (middleware/oidc_provider.py): the discovery
document's checks, and the token endpoint's answers mapped to errors, against real
servers on 127.0.0.1 (tests/support/jwks_server.py serves any JSON document, with any
status)."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs

import pytest

from middleware.oidc_provider import (
    OidcProvider,
    ProviderBadAnswer,
    ProviderUnavailable,
    TokenRequestRefused,
    discovery_url,
    parse_discovery,
)
from tests.support.jwks_server import JwksServer

ISSUER = "https://idp.example/realms/main"
DOCUMENT = {
    "issuer": ISSUER,
    "authorization_endpoint": "https://idp.example/auth",
    "token_endpoint": "https://idp.example:8443/token?x=1",
    "jwks_uri": "https://idp.example/jwks",
    "end_session_endpoint": "https://idp.example/logout",
    "id_token_signing_alg_values_supported": ["RS256", "HS256", "ES256", "none"],
}


def _document(**changes: Any) -> bytes:
    document = {key: value for key, value in (DOCUMENT | changes).items() if value is not None}
    return json.dumps(document).encode()


def test_discovery_is_at_the_issuer_s_well_known_path() -> None:
    assert discovery_url(ISSUER) == ISSUER + "/.well-known/openid-configuration"
    assert discovery_url("https://idp.example/") == (
        "https://idp.example/.well-known/openid-configuration"
    )


def test_a_discovery_document_gives_the_endpoints_and_the_algorithms_we_verify() -> None:
    metadata = parse_discovery(_document(), ISSUER)
    assert metadata.authorization_endpoint == "https://idp.example/auth"
    token = metadata.token_endpoint
    assert (token.scheme, token.host, token.port, token.target) == (
        "https",
        "idp.example",
        8443,
        b"/token?x=1",
    )
    assert metadata.jwks_uri.url == "https://idp.example/jwks"
    assert metadata.end_session_endpoint == "https://idp.example/logout"
    assert metadata.id_token_algorithms == frozenset({"RS256", "ES256"})  # never HS or none
    bare = parse_discovery(
        _document(end_session_endpoint=None, id_token_signing_alg_values_supported=None), ISSUER
    )
    assert bare.end_session_endpoint is None
    assert bare.id_token_algorithms == frozenset({"RS256"})  # OpenID Connect's default


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"<html>", "not JSON"),
        (b"[]", "not a JSON object"),
        (_document(issuer="https://evil.example"), "names issuer 'https://evil.example'"),
        (_document(issuer=ISSUER + "/"), "not 'https://idp.example/realms/main'"),
        (_document(token_endpoint=None), "token_endpoint is not an http(s) URL"),
        (_document(jwks_uri="ftp://idp/jwks"), "jwks_uri is not an http(s) URL"),
        (_document(authorization_endpoint=5), "authorization_endpoint is not"),
        (_document(end_session_endpoint="/logout"), "end_session_endpoint is not"),
    ],
)
def test_a_wrong_discovery_document_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(ProviderBadAnswer, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_discovery(data, ISSUER)


# -- against servers ---------------------------------------------------------------------


def provider_for(discovery: JwksServer, auth_method: str = "client_secret_basic") -> OidcProvider:
    return OidcProvider(
        discovery.url.removesuffix(discovery.path),
        name="sso",
        client_id="gate way",
        client_secret="s3cret:&=",
        auth_method=auth_method,
        timeout_s=2.0,
        discovery_refresh_s=3600.0,
        jwks_refresh_s=300.0,
        jwks_min_refresh_s=30.0,
        ssl_context=None,
    )


@pytest.fixture
async def servers() -> AsyncIterator[tuple[JwksServer, JwksServer]]:
    """A discovery server naming the other, the token endpoint."""
    token = await JwksServer({"access_token": "at", "token_type": "Bearer"}).start()
    token.path = "/token"
    discovery = await JwksServer().start()
    discovery.path = "/.well-known/openid-configuration"
    issuer = discovery.url.removesuffix(discovery.path)
    discovery.jwks = {
        "issuer": issuer,
        "authorization_endpoint": issuer + "/auth",
        "token_endpoint": token.url,
        "jwks_uri": issuer + "/jwks",
    }
    yield discovery, token
    await discovery.stop()
    await token.stop()


@pytest.mark.socket
async def test_token_requests_carry_the_client_s_credentials_and_return_the_answer(
    servers: tuple[JwksServer, JwksServer],
) -> None:
    discovery, token = servers
    for method in ("client_secret_basic", "client_secret_post", "none"):
        provider = provider_for(discovery, method)
        await provider.start()
        try:
            answer = await provider.token_request({"grant_type": "refresh_token", "x": "y z"})
        finally:
            await provider.close()
        assert answer == {"access_token": "at", "token_type": "Bearer"}
        sent = token.requests[-1]
        assert (sent.method, sent.target) == ("POST", "/token")
        assert sent.header("content-type") == "application/x-www-form-urlencoded"
        form = parse_qs(sent.body.decode())
        assert form["grant_type"] == ["refresh_token"]
        assert form["x"] == ["y z"]
        if method == "client_secret_basic":
            basic = base64.b64decode((sent.header("authorization") or "")[6:]).decode()
            assert basic == "gate+way:s3cret%3A%26%3D"  # RFC 6749 2.3.1: form-encoded first
            assert "client_id" not in form
        else:
            assert sent.header("authorization") is None
            assert form["client_id"] == ["gate way"]
            expected = [["s3cret:&="]] if method == "client_secret_post" else [None]
            assert [form.get("client_secret")] == expected


@pytest.mark.socket
@pytest.mark.parametrize(
    ("status", "body", "raised", "message"),
    [
        (
            400,
            b'{"error": "invalid_grant", "error_description": "gone"}',
            TokenRequestRefused,
            "invalid_grant: gone",
        ),
        (401, b'{"error": "invalid_client"}', TokenRequestRefused, "invalid_client"),
        (500, b'{"error": "server_error"}', ProviderBadAnswer, "answered 500"),
        (200, b"<html>", ProviderBadAnswer, "answered 200, not JSON"),
        (200, b"[1]", ProviderBadAnswer, "answered 200, not JSON"),
        (400, b'{"no": "error"}', ProviderBadAnswer, "answered 400"),
    ],
)
async def test_token_endpoint_answers_become_errors(
    servers: tuple[JwksServer, JwksServer],
    status: int,
    body: bytes,
    raised: type[Exception],
    message: str,
) -> None:
    discovery, token = servers
    token.status, token.body = status, body
    provider = provider_for(discovery)
    await provider.start()
    try:
        with pytest.raises(raised, match=message):
            await provider.token_request({"grant_type": "authorization_code"})
    finally:
        await provider.close()


@pytest.mark.socket
async def test_an_unreachable_token_endpoint_or_discovery_is_unavailable(
    servers: tuple[JwksServer, JwksServer],
) -> None:
    discovery, token = servers
    provider = provider_for(discovery)
    await provider.start()
    try:
        await provider.metadata()
        await token.stop()
        with pytest.raises(ProviderUnavailable, match="token endpoint"):
            await provider.token_request({"grant_type": "authorization_code"})
    finally:
        await provider.close()
    # A document for another issuer is never taken: requests find none.
    discovery.jwks = discovery.jwks | {"issuer": "https://other.example"}
    wrong = provider_for(discovery)
    wrong.timeout_s = 0.3
    await wrong.start()
    try:
        with pytest.raises(ProviderUnavailable, match="no discovery document"):
            await wrong.metadata()
        assert wrong.discoveries >= 1
    finally:
        await wrong.close()
    # Never started: nothing to wait for.
    with pytest.raises(ProviderUnavailable):
        await provider_for(discovery).metadata()
