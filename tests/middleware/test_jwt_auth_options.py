"""The `jwt` middleware's options and the config errors each mistake gets (split from
test_jwt_auth.py)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from middleware.jwks import (
    parse_jwks_url,
)
from proxy.config.document import ConfigError
from proxy.config.load import parse_config
from tests.middleware.test_jwt_auth import HEAD, SECRET, errors_of, make_auth, rsa_key
from tests.support.jwks_server import SigningKey

# --- options and their errors ---------------------------------------------------------


def test_missing_algorithms_is_an_error_with_its_line() -> None:
    assert errors_of(f"type: jwt\nsecret: {SECRET}\n") == [
        "<string>:6: middleware.auth: missing required key 'algorithms'"
    ]


def test_none_unknown_and_empty_algorithms_are_errors() -> None:
    supported = (
        "ES256, ES384, ES512, EdDSA, HS256, HS384, HS512, PS256, PS384, PS512, RS256, RS384, RS512"
    )
    assert errors_of(f"type: jwt\nsecret: {SECRET}\nalgorithms: [none, rs256, SHA1]\n") == [
        "<string>:8: middleware.auth.algorithms: 'none' (unsigned tokens) is never accepted",
        "<string>:8: middleware.auth.algorithms: unsupported algorithm 'rs256' (did you mean "
        f"'RS256'?); supported: {supported}",
        "<string>:8: middleware.auth.algorithms: unsupported algorithm 'SHA1'; "
        f"supported: {supported}",
    ]
    assert errors_of("type: jwt\nalgorithms: []\n") == [
        "<string>:7: middleware.auth.algorithms: at least one algorithm is required"
    ]


def test_hmac_without_a_secret_and_asymmetric_without_a_key_are_errors() -> None:
    assert errors_of("type: jwt\nalgorithms: [HS256, RS256, EdDSA]\n") == [
        "<string>:7: middleware.auth.algorithms: HS256 needs 'secret' or 'secret_file'",
        "<string>:7: middleware.auth.algorithms: EdDSA, RS256 need 'public_key', "
        "'public_key_file' or 'jwks_url'",
    ]


def test_short_secrets_unused_secrets_and_both_sources_are_errors(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("k" * 48 + "\n")
    assert errors_of(
        f"""\
        type: jwt
        algorithms: [HS256, HS512]
        secret: {SECRET}
        """
    ) == [
        "<string>:8: middleware.auth.secret: the secret is 32 bytes; HS512 needs at least 64 "
        "(RFC 7518 section 3.2)"
    ]
    assert errors_of(
        f"""\
        type: jwt
        algorithms: [RS256]
        public_key_file: {secret_file}
        secret: {SECRET}
        """
    )[-1] == (
        "<string>:9: middleware.auth.secret: no HS256, HS384 or HS512 in 'algorithms' uses "
        "this secret"
    )
    assert errors_of(
        f"""\
        type: jwt
        algorithms: [HS256]
        secret: {SECRET}
        secret_file: {secret_file}
        """
    ) == [
        "<string>:9: middleware.auth.secret_file: give either 'secret' or 'secret_file', not both"
    ]


def test_a_public_key_as_the_secret_is_an_error() -> None:
    pem = rsa_key().public_pem().replace("\n", "\\n")
    assert errors_of(f'type: jwt\nalgorithms: [HS256]\nsecret: "{pem}"\n') == [
        "<string>:8: middleware.auth.secret: this is a public key, not a secret: use "
        "'public_key' for it"
    ]


def test_bad_pem_files_are_errors_with_their_line(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n")
    private = tmp_path / "private.pem"
    private.write_text("-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n")
    missing = tmp_path / "missing.pem"
    text = f"""\
        middleware:
          bad: {{type: jwt, algorithms: [RS256], public_key_file: {garbage}}}
          private:
            type: jwt
            algorithms: [RS256]
            public_key_file: {private}
          gone: {{type: jwt, algorithms: [RS256], public_key_file: {missing}}}
          inline: {{type: jwt, algorithms: [RS256], public_key: "nope"}}
        routes: [{{match: {{path: /}}, upstream: app, middleware: [bad, private, gone, inline]}}]
        """
    with pytest.raises(ConfigError) as failed:
        parse_config(HEAD.split("routes:")[0] + textwrap.dedent(text))
    assert str(failed.value).splitlines() == [
        f"<string>:4: middleware.bad.public_key_file: '{garbage}' is not a PEM public key or "
        "certificate",
        f"<string>:8: middleware.private.public_key_file: '{private}' holds a private key: give "
        "the public key (or certificate)",
        f"<string>:9: middleware.gone.public_key_file: cannot read '{missing}': No such file or "
        "directory",
        "<string>:10: middleware.inline.public_key: 'public_key' is not a PEM public key or "
        "certificate",
    ]


def test_a_public_key_that_cannot_verify_a_listed_algorithm_is_an_error(tmp_path: Path) -> None:
    pem = tmp_path / "rsa.pem"
    pem.write_text(rsa_key().public_pem())
    assert errors_of(f"type: jwt\nalgorithms: [ES256]\npublic_key_file: {pem}\n") == [
        "<string>:8: middleware.auth.public_key_file: no algorithm in 'algorithms' can use it: "
        "it is an RSA key (2048 bits)"
    ]
    assert errors_of(f"type: jwt\nalgorithms: [RS256, ES256]\npublic_key_file: {pem}\n") == [
        "<string>:7: middleware.auth.algorithms: ES256: the public key is an RSA key (2048 bits) "
        "and cannot verify it (remove it, or add 'jwks_url')"
    ]


def test_short_rsa_keys_are_refused(tmp_path: Path) -> None:
    pem = tmp_path / "short.pem"
    pem.write_text(SigningKey.rsa(bits=1024).public_pem())
    assert errors_of(f"type: jwt\nalgorithms: [RS256]\npublic_key_file: {pem}\n") == [
        f"<string>:8: middleware.auth.public_key_file: '{pem}': the RSA key has 1024 bits, "
        "fewer than 2048"
    ]


def test_jwks_and_header_option_errors() -> None:
    assert errors_of(
        """\
        type: jwt
        algorithms: [RS256]
        jwks_url: ftp://idp/keys
        realm: 'a"b'
        cookie: "bad cookie"
        forward_claims: {sub: "X User", email: Host, name: X-User, nick: x-user}
        """
    ) == [
        "<string>:8: middleware.auth.jwks_url: expected an http or https URL, got 'ftp://idp/keys'",
        "<string>:9: middleware.auth.realm: must be printable ASCII without '\"' or '\\'",
        "<string>:10: middleware.auth.cookie: 'bad cookie' is not a valid cookie name",
        "<string>:11: middleware.auth.forward_claims: sub: 'X User' is not a valid header name",
        "<string>:11: middleware.auth.forward_claims: email: a claim cannot set Host",
        "<string>:11: middleware.auth.forward_claims: nick: header x-user is already set by name",
    ]
    assert errors_of(
        f"""\
        type: jwt
        algorithms: [HS256]
        secret: {SECRET}
        jwks_refresh: 1m
        """
    ) == ["<string>:9: middleware.auth.jwks_refresh: only used with 'jwks_url'"]
    assert errors_of(
        """\
        type: jwt
        algorithms: [RS256]
        jwks_url: http://127.0.0.1:1/keys
        jwks_ca_file: /nonexistent/ca.pem
        """
    ) == ["<string>:9: middleware.auth.jwks_ca_file: only used with an https 'jwks_url'"]


def test_options_are_read_once_at_load() -> None:
    auth = make_auth(
        """\
        type: jwt
        algorithms: [RS256, ES256]
        jwks_url: https://idp.example.com:8443/keys?v=2
        jwks_refresh: 10m
        jwks_min_refresh: 1m
        jwks_timeout: 2s
        jwks_wait: 250ms
        issuer: https://idp.example.com/
        audience: [api, admin]
        leeway: 5s
        required_claims: [exp, sub]
        forward_claims: {sub: X-User-Id}
        consumer_claim: email
        cookie: session
        forward_token: false
        realm: api
        """
    )
    assert auth.algorithms == {"RS256", "ES256"}
    assert auth.issuer == "https://idp.example.com/"
    assert auth.audience == ("api", "admin")
    assert auth.leeway == 5.0
    assert auth.required_claims == ("exp", "sub")
    assert auth.forward_claims == (("sub", "X-User-Id"),)
    assert (auth.consumer_claim, auth.cookie, auth.forward_token, auth.realm) == (
        "email",
        "session",
        False,
        "api",
    )
    jwks = auth.jwks
    assert jwks is not None
    assert (jwks.refresh_s, jwks.min_refresh_s, jwks.timeout_s, jwks.wait_s) == (600, 60, 2, 0.25)
    assert (jwks.url.host, jwks.url.port, jwks.url.target) == ("idp.example.com", 8443, "/keys?v=2")
    assert repr(jwks) == "<JwksCache https://idp.example.com:8443/keys?v=2 EMPTY keys=0 fetches=0>"


def test_jwks_url_parsing() -> None:
    url = parse_jwks_url("http://[::1]/jwks")
    assert (url.host, url.port, url.authority, url.target, url.tls) == (
        "::1",
        80,
        "[::1]",
        "/jwks",
        False,
    )
    assert parse_jwks_url("https://idp").target == "/"
    for bad, reason in [
        ("https://user:pw@idp/keys", "credentials in the URL are not supported"),
        ("http:///keys", "'http:///keys' has no host"),
        ("http://idp:99999/", "the port is not a number"),
        ("idp.example.com/keys", "expected an http or https URL"),
    ]:
        with pytest.raises(ValueError, match=reason):
            parse_jwks_url(bad)
