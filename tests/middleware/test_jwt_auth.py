"""The `jwt` middleware without the gateway: what passes, every way a token is refused
(and the challenge that says why), claims forwarding. Its options are in
test_jwt_options.py, its key set in test_jwks.py."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import textwrap
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from multidict import CIMultiDict

from metrics.definitions import REGISTRY
from middleware.jwt_auth import JwtAuth
from proxy.config.document import ConfigError
from proxy.config.load import parse_config
from proxy.core.body import Body
from proxy.core.errors import Unauthorized
from proxy.core.models import Request, Response
from tests.support.jwks_server import SigningKey
from tests.support.tls import TlsFiles

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
