"""The `jwt` middleware without the gateway: its options and their errors, every way a
token is refused (and the challenge that says why), claims forwarding, and the JWKS cache
against a real JWKS server (tests/jwks_server.py) with an injected clock."""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import json
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from multidict import CIMultiDict

from metrics.definitions import REGISTRY
from middleware.jwks import (
    JwksCache,
    JwksError,
    JwksState,
    fetch,
    parse_jwks,
    parse_jwks_url,
)
from middleware.jwt_auth import JwtAuth
from proxy.config import ConfigError, parse_config
from proxy.errors import Unauthorized
from proxy.models import Body, Request, Response
from tests.jwks_server import JwksServer, SigningKey
from tests.tls import TlsFiles

SECRET = "s" * 32
HEAD = """\
listeners: [{bind: 127.0.0.1:0}]
upstreams: {app: {endpoints: ["http://127.0.0.1:9"]}}
routes: [{match: {path: /}, upstream: app, middleware: [auth]}]
middleware:
  auth:
"""


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@functools.cache
def rsa_key() -> SigningKey:
    return SigningKey.rsa("rsa-1")


@functools.cache
def rsa_key_2() -> SigningKey:
    return SigningKey.rsa("rsa-2")


@functools.cache
def ec_key() -> SigningKey:
    return SigningKey.ec("ec-1")


@functools.cache
def ed_key() -> SigningKey:
    return SigningKey.ed25519("ed-1")


HS = SigningKey.hmac(SECRET.encode())


def config_text(options: str) -> str:
    return HEAD + textwrap.indent(textwrap.dedent(options), "    ")


def make_auth(options: str) -> JwtAuth:
    config = parse_config(config_text(options))
    auth = config.middleware["auth"].instance
    assert isinstance(auth, JwtAuth)
    return auth


def errors_of(options: str) -> list[str]:
    with pytest.raises(ConfigError) as failed:
        parse_config(config_text(options))
    return str(failed.value).splitlines()


def failures(reason: str, name: str = "auth") -> float:
    value = REGISTRY.get_sample_value(
        "gatehouse_auth_failures_total", {"middleware": name, "reason": reason}
    )
    return value or 0.0


def refreshes(result: str, name: str = "auth") -> float:
    value = REGISTRY.get_sample_value(
        "gatehouse_jwks_refreshes_total", {"middleware": name, "result": result}
    )
    return value or 0.0


def request_with(token: str | None = None, **headers: str) -> Request:
    fields: CIMultiDict[str] = CIMultiDict()
    if token is not None:
        fields["Authorization"] = f"Bearer {token}"
    for name, value in headers.items():
        fields.add(name.replace("_", "-"), value)
    return Request("GET", b"/", fields, Body.from_bytes(b""))


class Upstream:
    """The end of the chain: records what got through."""

    def __init__(self) -> None:
        self.seen: list[Request] = []

    async def __call__(self, request: Request) -> Response:
        self.seen.append(request)
        return Response(200)


async def passes(auth: JwtAuth, request: Request) -> Request:
    upstream = Upstream()
    response = await auth(request, upstream)
    assert response.status == 200
    return upstream.seen[0]


async def refused(auth: JwtAuth, request: Request) -> Unauthorized:
    upstream = Upstream()
    with pytest.raises(Unauthorized) as info:
        await auth(request, upstream)
    assert upstream.seen == []
    return info.value


def challenge(description: str, realm: str = "gatehouse") -> str:
    return f'Bearer realm="{realm}", error="invalid_token", error_description="{description}"'


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


# --- tokens: what passes ----------------------------------------------------------------


async def test_a_valid_hs256_token_passes_and_its_claims_are_forwarded() -> None:
    auth = make_auth(
        f"""\
        type: jwt
        algorithms: [HS256]
        secret: {SECRET}
        forward_claims: {{sub: X-User-Id, email: X-User-Email, roles: X-Roles, n: X-N}}
        """
    )
    token = HS.sign({"sub": "alice", "email": "a@example.com", "roles": ["admin", "ops"], "n": 7})
    request = request_with(token, X_User_Id="spoofed", X_User_Email="spoofed@evil")
    request.headers.add("x-user-id", "spoofed-again")

    seen = await passes(auth, request)

    assert seen.headers.getall("X-User-Id") == ["alice"]
    assert seen.headers.getall("X-User-Email") == ["a@example.com"]
    assert seen.headers["X-Roles"] == "admin,ops"
    assert seen.headers["X-N"] == "7"
    assert seen.consumer == "alice"
    assert seen.headers["Authorization"] == f"Bearer {token}"  # forwarded by default


async def test_spoofed_forwarded_headers_are_removed_even_when_the_claim_is_absent() -> None:
    auth = make_auth(
        f"type: jwt\nalgorithms: [HS256]\nsecret: {SECRET}\nforward_claims: {{email: X-Email}}\n"
    )
    seen = await passes(auth, request_with(HS.sign({"sub": "bob"}), X_Email="root@evil"))
    assert "X-Email" not in seen.headers


async def test_claim_values_become_safe_header_values() -> None:
    auth = make_auth(
        f"""\
        type: jwt
        algorithms: [HS256]
        secret: {SECRET}
        forward_claims: {{name: X-Name, org: X-Org, admin: X-Admin}}
        """
    )
    token = HS.sign({"name": "Zoë", "org": {"id": 1}, "admin": True})
    seen = await passes(auth, request_with(token))
    assert seen.headers["X-Name"].encode("latin-1") == "Zoë".encode()  # UTF-8 on the wire
    assert seen.headers["X-Org"] == '{"id":1}'
    assert seen.headers["X-Admin"] == "true"

    error = await refused(auth, request_with(HS.sign({"name": "x\r\nX-Admin: 1"})))
    assert error.challenge == challenge("claim name is not a valid header value")


async def test_the_consumer_is_the_configured_claim_when_it_is_a_safe_value() -> None:
    auth = make_auth(f"type: jwt\nalgorithms: [HS256]\nsecret: {SECRET}\nconsumer_claim: cid\n")
    assert (await passes(auth, request_with(HS.sign({"cid": "app-7", "sub": "u"})))).consumer == (
        "app-7"
    )
    assert (await passes(auth, request_with(HS.sign({"cid": 42})))).consumer == "42"
    for unsafe in ({"cid": "a\r\nb"}, {"cid": True}, {"cid": ["a"]}, {"sub": "u"}):
        assert (await passes(auth, request_with(HS.sign(unsafe)))).consumer == ""
    off = make_auth(f"type: jwt\nalgorithms: [HS256]\nsecret: {SECRET}\nconsumer_claim: ''\n")
    assert (await passes(off, request_with(HS.sign({"sub": "u"})))).consumer == ""


@pytest.mark.parametrize("key", [rsa_key, ec_key, ed_key])
async def test_static_public_keys_verify_rs_es_and_eddsa(key: Any, tmp_path: Path) -> None:
    signing: SigningKey = key()
    pem = tmp_path / "key.pem"
    pem.write_text(signing.public_pem())
    auth = make_auth(f"type: jwt\nalgorithms: [{signing.algorithm}]\npublic_key_file: {pem}\n")
    seen = await passes(auth, request_with(signing.sign({"sub": "k"})))
    assert seen.consumer == "k"


async def test_an_inline_pem_public_key() -> None:
    pem = textwrap.indent(ed_key().public_pem(), "  ")
    auth = make_auth(f"type: jwt\nalgorithms: [EdDSA]\npublic_key: |\n{pem}")
    assert (await passes(auth, request_with(ed_key().sign({"sub": "i"})))).consumer == "i"


async def test_a_certificate_can_be_the_public_key(tls_files: TlsFiles) -> None:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    private = load_pem_private_key(tls_files.key.read_bytes(), None)
    signing = SigningKey("ES256", private)
    auth = make_auth(f"type: jwt\nalgorithms: [ES256]\npublic_key_file: {tls_files.cert}\n")
    assert (await passes(auth, request_with(signing.sign({"sub": "c"})))).consumer == "c"


async def test_secret_file_drops_its_final_line_break(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    auth = make_auth(f"type: jwt\nalgorithms: [HS256]\nsecret_file: {path}\n")
    await passes(auth, request_with(HS.sign({"sub": "f"})))


async def test_audience_list_issuer_list_and_leeway() -> None:
    auth = make_auth(
        f"""\
        type: jwt
        algorithms: [HS256]
        secret: {SECRET}
        audience: [api, admin]
        issuer: [https://a/, https://b/]
        leeway: 60s
        """
    )
    now = int(time.time())
    token = HS.sign({"aud": ["other", "admin"], "iss": "https://b/", "exp": now - 30})
    await passes(auth, request_with(token))


async def test_an_aud_claim_is_not_checked_without_an_audience_option() -> None:
    auth = make_auth(f"type: jwt\nalgorithms: [HS256]\nsecret: {SECRET}\n")
    await passes(auth, request_with(HS.sign({"aud": "someone-else"})))


async def test_the_token_can_come_from_a_cookie_and_bearer_is_case_insensitive() -> None:
    auth = make_auth(f"type: jwt\nalgorithms: [HS256]\nsecret: {SECRET}\ncookie: session\n")
    token = HS.sign({"sub": "c"})
    seen = await passes(auth, request_with(cookie=f'theme=dark; session="{token}"; x=1'))
    assert seen.consumer == "c"
    fields: CIMultiDict[str] = CIMultiDict({"Authorization": f"bEaReR   {token}  "})
    await passes(auth, Request("GET", b"/", fields, Body.from_bytes(b"")))


async def test_forward_token_false_removes_the_header_or_the_cookie() -> None:
    auth = make_auth(
        f"""\
        type: jwt
        algorithms: [HS256]
        secret: {SECRET}
        cookie: session
        forward_token: false
        """
    )
    token = HS.sign({"sub": "c"})
    seen = await passes(auth, request_with(token))
    assert "Authorization" not in seen.headers
    seen = await passes(auth, request_with(cookie=f"a=1; session={token}", Authorization="Basic x"))
    assert seen.headers["Cookie"] == "a=1"
    assert seen.headers["Authorization"] == "Basic x"
    seen = await passes(auth, request_with(cookie=f"session={token}"))
    assert "Cookie" not in seen.headers


# --- tokens: what is refused, and why ---------------------------------------------------


async def test_no_token_is_a_challenge_without_an_error() -> None:
    auth = make_auth(f"type: jwt\nalgorithms: [HS256]\nsecret: {SECRET}\nrealm: api\n")
    before = failures("missing")
    for request in (request_with(), request_with(Authorization="Basic dTpw"), request_with("")):
        error = await refused(auth, request)
        assert (error.status, error.challenge) == (401, 'Bearer realm="api"')
    assert failures("missing") == before + 3


def _segment(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


@pytest.mark.parametrize(
    ("make_token", "reason", "description"),
    [
        (lambda: "not-a-jwt", "malformed", "malformed token"),
        (lambda: "a.b.c", "malformed", "malformed token"),
        (lambda: _segment({"alg": "HS256"}) + ".!!.x", "malformed", "malformed token"),
        (lambda: HS.sign({}, expires_in=-120), "expired", "token expired"),
        (lambda: HS.sign({"nbf": int(time.time()) + 300}), "not_yet_valid", "token not yet valid"),
        (
            lambda: HS.sign({"aud": "other", "iss": "https://idp/"}),
            "bad_audience",
            "invalid audience",
        ),
        (lambda: HS.sign({"aud": "api", "iss": "https://evil/"}), "bad_issuer", "invalid issuer"),
        (lambda: HS.sign({"iss": "https://idp/"}), "missing_claim", "missing required claim aud"),
        (lambda: HS.sign({"aud": "api"}), "missing_claim", "missing required claim iss"),
        (
            lambda: HS.sign({"aud": "api", "iss": "https://idp/"}, expires_in=None),
            "missing_claim",
            "missing required claim exp",
        ),
        (
            lambda: SigningKey.hmac(b"w" * 32).sign({"aud": "api", "iss": "https://idp/"}),
            "bad_signature",
            "invalid signature",
        ),
        (
            lambda: SigningKey.hmac(b"s" * 48, "HS384").sign({"aud": "api", "iss": "https://idp/"}),
            "alg_not_allowed",
            "algorithm not allowed",
        ),
        (
            lambda: jwt.encode({"aud": "api", "iss": "https://idp/"}, "", algorithm="none"),
            "alg_not_allowed",
            "algorithm not allowed",
        ),
        (
            lambda: _segment({"alg": "none", "typ": "JWT"}) + "." + _segment({"sub": "x"}) + ".",
            "alg_not_allowed",
            "algorithm not allowed",
        ),
        (
            lambda: HS.sign({"aud": "api", "iss": "https://idp/", "iat": "yesterday"}),
            "bad_claim",
            "invalid claim iat",
        ),
        (
            lambda: HS.sign({"aud": "api", "iss": "https://idp/", "sub": 12}),
            "invalid",
            "invalid token",
        ),
    ],
)
async def test_refusals_say_why(make_token: Any, reason: str, description: str) -> None:
    auth = make_auth(
        f"""\
        type: jwt
        algorithms: [HS256]
        secret: {SECRET}
        audience: api
        issuer: https://idp/
        required_claims: [exp]
        realm: shop
        """
    )
    before = failures(reason)
    error = await refused(auth, request_with(make_token()))
    assert (error.status, error.challenge, error.message) == (
        401,
        challenge(description, "shop"),
        description,
    )
    assert failures(reason) == before + 1


async def test_the_public_key_signed_as_an_hmac_secret_is_refused(tmp_path: Path) -> None:
    # The classic algorithm confusion: an HS256 token "signed" with the RSA public key.
    pem = rsa_key().public_pem()
    path = tmp_path / "rsa.pem"
    path.write_text(pem)
    signing_input = _segment({"alg": "HS256", "typ": "JWT"}) + "." + _segment({"sub": "admin"})
    mac = hmac.new(pem.encode(), signing_input.encode(), hashlib.sha256).digest()
    forged = signing_input + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    only_rsa = make_auth(f"type: jwt\nalgorithms: [RS256]\npublic_key_file: {path}\n")
    assert (await refused(only_rsa, request_with(forged))).challenge == challenge(
        "algorithm not allowed"
    )
    both = make_auth(
        f"type: jwt\nalgorithms: [RS256, HS256]\npublic_key_file: {path}\nsecret: {SECRET}\n"
    )
    assert (await refused(both, request_with(forged))).challenge == challenge("invalid signature")


async def test_hostile_input_in_the_header_is_refused_never_raised() -> None:
    auth = make_auth(f"type: jwt\nalgorithms: [HS256]\nsecret: {SECRET}\n")
    for header in ({"alg": ["HS256"]}, {"alg": "HS256", "kid": 5}, {"alg": "HS256", "crit": ["x"]}):
        token = _segment(header) + "." + _segment({"sub": "x"}) + ".c2ln"
        error = await refused(auth, request_with(token))
        assert error.challenge.startswith('Bearer realm="gatehouse", error="invalid_token"')


# --- the key set --------------------------------------------------------------------------


def test_parse_jwks_keeps_signing_keys_and_says_why_it_skips_others() -> None:
    document = {
        "keys": [
            rsa_key().jwk(),
            ec_key().jwk(alg=False),
            ed_key().jwk(),
            {**rsa_key_2().jwk(), "use": "enc"},
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {**ec_key().jwk("mismatch"), "alg": "RS256"},
            SigningKey.rsa("short", bits=1024).jwk(),
            {"kty": "RSA", "kid": "broken", "n": "AQAB"},
            "nonsense",
        ]
    }
    keys = parse_jwks(json.dumps(document).encode())
    assert [(key.kid, sorted(key.algorithms)) for key in keys.all] == [
        ("rsa-1", ["RS256"]),
        ("ec-1", ["ES256"]),
        ("ed-1", ["EdDSA"]),
    ]
    assert keys.by_kid["ec-1"] == (keys.all[1],)
    assert [reason.split(":")[0] for reason in keys.skipped] == [
        "keys[3]",
        "keys[4]",
        "keys[5]",
        "keys[6]",
        "keys[7]",
        "keys[8]",
    ]
    assert "'use' is 'enc'" in keys.skipped[0]
    assert "fewer than 2048" in keys.skipped[3]


@pytest.mark.parametrize("data", [b"<html>", b"[]", b'{"keys": {}}'])
def test_parse_jwks_refuses_what_is_not_a_key_set(data: bytes) -> None:
    with pytest.raises(JwksError) as info:
        parse_jwks(data)
    assert info.value.result == "invalid"


@pytest.fixture
async def jwks_server() -> AsyncIterator[JwksServer]:
    server = await JwksServer({"keys": [rsa_key().jwk()]}).start()
    yield server
    await server.stop()


def cache_for(server: JwksServer, clock: Clock, **options: float) -> JwksCache:
    settings: dict[str, float] = {
        "refresh_s": 300.0,
        "min_refresh_s": 30.0,
        "timeout_s": 2.0,
        "wait_s": 1.0,
    }
    settings.update(options)
    return JwksCache(
        parse_jwks_url(server.url),
        name="unit",
        now=clock,
        refresh_s=settings["refresh_s"],
        min_refresh_s=settings["min_refresh_s"],
        timeout_s=settings["timeout_s"],
        wait_s=settings["wait_s"],
    )


@pytest.mark.socket
async def test_unknown_kids_refresh_at_most_once_per_min_refresh(jwks_server: JwksServer) -> None:
    clock = Clock()
    cache = cache_for(jwks_server, clock)
    try:
        assert await cache.refresh_for_unknown()  # the first fetch: nothing cached yet
        assert cache.find("rsa-1")[0].algorithms == {"RS256"}  # the JWK's alg narrows it
        results = await asyncio.gather(*(cache.refresh_for_unknown() for _ in range(50)))
        assert results == [False] * 50
        assert jwks_server.fetches == 1

        jwks_server.jwks = {"keys": [rsa_key_2().jwk()]}
        clock.now += 30
        results = await asyncio.gather(*(cache.refresh_for_unknown() for _ in range(50)))
        assert results == [True] * 50  # all joined the one refresh
        assert jwks_server.fetches == 2
        assert cache.find("rsa-1") == ()  # removed from the set: no longer trusted
        assert cache.find("rsa-2")
        assert repr(cache).endswith("CURRENT keys=1 fetches=2>")
    finally:
        await cache.aclose()
    assert cache.state is JwksState.CLOSED
    assert not await cache.refresh_for_unknown()


@pytest.mark.socket
async def test_a_failed_refresh_keeps_the_cached_keys(jwks_server: JwksServer) -> None:
    clock = Clock()
    cache = cache_for(jwks_server, clock, min_refresh_s=0.0)
    try:
        assert await cache.refresh_for_unknown()
        for status, result in [(503, "bad_status"), (200, "invalid")]:
            jwks_server.status = status
            jwks_server.body = b"{}" if status == 200 else None
            before = refreshes(result, "unit")
            assert not await cache.refresh_for_unknown()
            assert refreshes(result, "unit") == before + 1
            assert cache.state is JwksState.STALE
            assert cache.find("rsa-1")
        await jwks_server.stop()
        before = refreshes("unreachable", "unit")
        assert not await cache.refresh_for_unknown()
        assert refreshes("unreachable", "unit") == before + 1
        assert cache.find("rsa-1")
        assert repr(cache).endswith("STALE keys=1 fetches=4>")
    finally:
        await cache.aclose()


@pytest.mark.socket
async def test_a_hanging_jwks_server_bounds_the_wait_and_the_fetch(
    jwks_server: JwksServer,
) -> None:
    clock = Clock()
    cache = cache_for(jwks_server, clock, wait_s=0.05, timeout_s=0.3)
    jwks_server.hang = True
    try:
        started = time.monotonic()
        assert not await cache.refresh_for_unknown()  # gives up waiting after wait_s
        assert time.monotonic() - started < 0.25
        before = refreshes("timeout", "unit")
        assert not await cache.refresh_now()  # the same fetch, which times out
        assert time.monotonic() - started < 1.0
        assert refreshes("timeout", "unit") == before + 1
        assert jwks_server.fetches == 1
        assert cache.state is JwksState.EMPTY
    finally:
        await cache.aclose()


@pytest.mark.socket
async def test_close_cancels_a_fetch_in_flight(jwks_server: JwksServer) -> None:
    cache = cache_for(jwks_server, Clock(), wait_s=0.01, timeout_s=30)
    jwks_server.hang = True
    await cache.start()
    await jwks_server.wait_for_fetches(1)
    async with asyncio.timeout(1):
        await cache.aclose()
    assert repr(cache).startswith("<JwksCache http://127.0.0.1:")


@pytest.mark.socket
async def test_the_background_task_refreshes_on_schedule(jwks_server: JwksServer) -> None:
    cache = cache_for(jwks_server, Clock(), refresh_s=0.02)
    await cache.start()
    try:
        await jwks_server.wait_for_fetches(1)
        jwks_server.jwks = {"keys": [rsa_key_2().jwk()]}
        await jwks_server.wait_for_fetches(3)  # so the second one, with the new set, is done
        assert cache.find("rsa-2")
    finally:
        await cache.aclose()


@pytest.mark.socket
async def test_https_jwks_with_a_private_ca(tls_files: TlsFiles) -> None:
    context = tls_files.server_context([])
    server = await JwksServer({"keys": [ec_key().jwk()]}).start(ssl=context)
    try:
        auth = make_auth(
            f"""\
            type: jwt
            algorithms: [ES256]
            jwks_url: {server.url}
            jwks_ca_file: {tls_files.ca}
            """
        )
        assert auth.jwks is not None
        await passes(auth, request_with(ec_key().sign({"sub": "tls"})))
        assert server.fetches == 1
        untrusting = parse_jwks_url(server.url)
        with pytest.raises(JwksError) as info:
            await fetch(untrusting, 2.0, None)  # the system CAs do not know ours
        assert info.value.result == "unreachable"
        await auth.close()
    finally:
        await server.stop()


@pytest.mark.socket
async def test_tokens_without_a_kid_try_the_keys_that_fit(jwks_server: JwksServer) -> None:
    jwks_server.jwks = {"keys": [rsa_key().jwk(alg=False), rsa_key_2().jwk(), ec_key().jwk()]}
    auth = make_auth(f"type: jwt\nalgorithms: [RS256, ES256]\njwks_url: {jwks_server.url}\n")
    try:
        no_kid = SigningKey("RS256", rsa_key_2().private)
        assert (await passes(auth, request_with(no_kid.sign({"sub": "2"})))).consumer == "2"
        wrong = SigningKey("RS256", SigningKey.rsa().private)
        error = await refused(auth, request_with(wrong.sign({})))
        assert error.challenge == challenge("invalid signature")
        # A kid whose key is of another type: refused, not tried with the wrong algorithm.
        error = await refused(auth, request_with(rsa_key().sign({}, kid="ec-1")))
        assert error.challenge == challenge("the key does not fit the algorithm")
        assert jwks_server.fetches == 1
    finally:
        await auth.close()
