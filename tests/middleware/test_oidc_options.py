"""The `oidc` middleware's options at load (middleware/oidc_options.py): what a config
gets, and each mistake as a file:line error."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from middleware.oidc import Oidc
from proxy.config.document import ConfigError
from proxy.config.load import parse_config
from proxy.config.view import config_view

HEAD = """
listeners: [{bind: "127.0.0.1:0"}]
upstreams: {app: {endpoints: ["http://127.0.0.1:9"]}}
routes: [{match: {path_prefix: /}, upstream: app, middleware: [sso]}]
middleware:
  sso:
    type: oidc
"""
BASE = """\
issuer: https://idp.example
client_id: gateway
client_secret: the-client-secret
cookie_secret: a-cookie-secret-of-32-bytes-or-more-0123
"""


def config_text(options: str) -> str:
    return HEAD + textwrap.indent(textwrap.dedent(options), "    ")


def make(options: str = BASE) -> Oidc:
    sso = parse_config(config_text(options)).middleware["sso"].instance
    assert isinstance(sso, Oidc)
    return sso


def errors_of(options: str) -> list[str]:
    with pytest.raises(ConfigError) as failed:
        parse_config(config_text(options))
    return [line.split(": ", 1)[1] for line in str(failed.value).splitlines()]


def test_the_defaults() -> None:
    settings = make().settings
    assert settings.mode == "login"
    assert settings.scopes == ("openid",)
    assert (settings.redirect_origin, settings.redirect_path) == ("", "/oidc/callback")
    assert settings.logout_path == "/oidc/logout"
    assert settings.cookie == "gatehouse_oidc"
    assert settings.cookie_attributes.secure is None
    assert settings.cookie_max_bytes == 8192
    assert settings.session_lifetime_s == 86400
    assert settings.auth_method == "client_secret_basic"
    assert settings.algorithms == frozenset()
    assert settings.ssl_context is not None  # an https issuer
    assert make().identity_headers() == ()


def test_every_option(tmp_path: Path) -> None:
    secret_file = tmp_path / "client"
    secret_file.write_text("from-a-file\n")
    cookies_file = tmp_path / "cookies"
    cookies_file.write_text("n" * 32 + "\n")
    settings = make(
        f"""\
        issuer: http://idp.internal:8080/realms/main
        client_id: gateway
        client_secret_file: {secret_file}
        token_endpoint_auth: client_secret_post
        scopes: [openid, email, offline_access]
        auth_params: {{prompt: consent, resource: "urn:api"}}
        redirect_uri: https://app.example/auth/back
        logout_path: /auth/out
        post_logout_redirect_uri: https://app.example/bye
        cookie: sid
        cookie_secret_file: {cookies_file}
        cookie_secure: always
        cookie_domain: app.example
        cookie_max_size: 16KiB
        session_lifetime: 8h
        login_timeout: 5m
        forward_claims: {{email: X-Email, groups: X-Groups}}
        consumer_claim: email
        forward_access_token: true
        algorithms: [ES256, RS256]
        leeway: 5s
        timeout: 2s
        discovery_refresh: 10m
        jwks_refresh: 1m
        jwks_min_refresh: 10s
        realm: apps
        """
    ).settings
    assert settings.client_secret == "from-a-file"
    assert settings.auth_method == "client_secret_post"
    assert settings.auth_params == (("prompt", "consent"), ("resource", "urn:api"))
    assert (settings.redirect_origin, settings.redirect_path) == (
        "https://app.example",
        "/auth/back",
    )
    assert settings.cookie_secrets == (b"n" * 32,)
    assert settings.cookie_attributes.secure is True
    assert settings.cookie_attributes.domain == "app.example"
    assert settings.forward_claims == (("email", "X-Email"), ("groups", "X-Groups"))
    assert settings.algorithms == frozenset({"ES256", "RS256"})
    assert (settings.session_lifetime_s, settings.login_timeout_s) == (28800, 300)
    assert settings.ssl_context is None  # an http issuer


def test_cookie_secret_files_hold_one_secret_per_line(tmp_path: Path) -> None:
    cookies_file = tmp_path / "cookies"
    cookies_file.write_text("n" * 32 + "\n\n" + "o" * 40 + "\n")
    sso = make(BASE.replace("cookie_secret: ", "#") + f"cookie_secret_file: {cookies_file}\n")
    assert sso.settings.cookie_secrets == (b"n" * 32, b"o" * 40)


@pytest.mark.parametrize(
    ("options", "error"),
    [
        (
            BASE.replace("cookie_secret:", "#"),
            "middleware.sso: login mode needs 'cookie_secret' or 'cookie_secret_file'",
        ),
        (
            BASE.replace(
                "cookie_secret: a-cookie-secret-of-32-bytes-or-more-0123", "cookie_secret: short"
            ),
            "middleware.sso.cookie_secret: a secret is 5 bytes; at least 32 are needed "
            "(random ones: openssl rand -base64 32)",
        ),
        (
            BASE + "mode: api\n",
            "middleware.sso: api mode needs the aud its access tokens carry (so "
            "that ID tokens and tokens for other APIs are refused)",
        ),
        (
            BASE + "scopes: [email]\n",
            "middleware.sso.scopes: must include 'openid' (an ID token is what says who logged in)",
        ),
        (
            BASE + "auth_params: {state: x}\n",
            "middleware.sso.auth_params: state is set by the middleware itself",
        ),
        (
            BASE + "redirect_uri: ftp://x/cb\n",
            "middleware.sso.redirect_uri: expected a path or an http(s) URL, got 'ftp://x/cb'",
        ),
        (
            BASE + "logout_path: /oidc/callback\n",
            "middleware.sso.logout_path: must differ from the redirect_uri's path",
        ),
        (
            BASE.replace("https://idp.example", "idp.example"),
            "middleware.sso.issuer: expected an http(s) URL without query or fragment, got "
            "'idp.example'",
        ),
        (
            BASE.replace("client_secret: the-client-secret\n", ""),
            "middleware.sso: client_secret_basic needs 'client_secret' or "
            "'client_secret_file' (or token_endpoint_auth: none for a public client)",
        ),
        (
            BASE + "token_endpoint_auth: none\n",
            "middleware.sso.token_endpoint_auth: 'none' is for public clients, without a secret",
        ),
        (
            BASE + "cookie: bad name\n",
            "middleware.sso.cookie: 'bad name' is not a valid cookie name",
        ),
        (
            BASE + "cookie_max_size: 1KiB\n",
            "middleware.sso.cookie_max_size: must be at least 3800 bytes (one cookie)",
        ),
        (
            BASE + "algorithms: [HS256]\n",
            "middleware.sso.algorithms: 'HS256' is not one of ES256, ES384, ES512, EdDSA, "
            "PS256, PS384, PS512, RS256, RS384, RS512",
        ),
        (
            BASE + "ca_file: /nonexistent.pem\n",
            "middleware.sso.ca_file: '/nonexistent.pem' holds no PEM certificate",
        ),
        (
            BASE + "forward_claims: {sub: Host}\n",
            "middleware.sso.forward_claims: sub: a claim cannot set Host",
        ),
        (
            BASE + "post_logout_redirect_uri: javascript:alert(1)\n",
            "middleware.sso.post_logout_redirect_uri: expected an http(s) URL or a path",
        ),
    ],
)
def test_mistakes_are_config_errors(options: str, error: str) -> None:
    assert error in errors_of(options)


def test_the_secrets_are_hidden_in_the_config_view() -> None:
    text = config_text(BASE)
    shown = str(config_view(text, "routes.yaml"))
    assert "the-client-secret" not in shown
    assert "a-cookie-secret-of-32-bytes-or-more-0123" not in shown
