"""`jwt`: requests must carry a valid JSON Web Token (RFC 7519), as a Bearer token (RFC
6750) or in a cookie; its claims can be forwarded upstream as headers.

Everything is decided at load: the allowed algorithms (`none` never is), the key for each
(an HMAC `secret`, a PEM `public_key`, or the keys of a `jwks_url`, see middleware/jwks.py),
the claim checks and the headers to set. Per request: find the token, read its header,
pick the key by the token's `alg` (which must be one of ours: RFC 8725 section 3.1) and
`kid`, verify the signature and the claims with PyJWT (middleware/jwt_verify.py, which
`oidc` shares), then replace the forwarded headers (client-sent copies are always
removed, so they cannot be spoofed) and set `request.consumer`.

A refused token is a 401 whose `WWW-Authenticate` says why (RFC 6750 section 3:
`error="invalid_token"` and an `error_description`; no error attribute when no token was
sent), counted in `gatehouse_auth_failures_total{middleware,reason}`. Nothing about a token
can make the answer a 500.
"""

from __future__ import annotations

import logging
import re
import ssl
from typing import ClassVar

from jwt.algorithms import HMACAlgorithm
from jwt.exceptions import InvalidKeyError
from multidict import CIMultiDict

from metrics.definitions import count_auth_failure
from middleware.jwks import (
    ASYMMETRIC_ALGORITHMS,
    HMAC_ALGORITHMS,
    SUPPORTED_ALGORITHMS,
    JwksCache,
    JwksUrl,
    VerifyKey,
    describe_key,
    load_pem,
    parse_jwks_url,
)
from middleware.jwt_verify import (
    TOKEN_RE,
    TokenRefused,
    TokenVerifier,
    bearer_token,
    claim_header_value,
    consumer_of,
    forward_claims,
    invalid_token_challenge,
)
from proxy import (
    Handler,
    Option,
    Options,
    Request,
    Response,
    Unauthorized,
    did_you_mean,
    tls_context,
)

log = logging.getLogger(__name__)

DEFAULT_REALM = "gatehouse"
DEFAULT_LEEWAY_S = 30.0
DEFAULT_JWKS_REFRESH_S = 300.0
DEFAULT_JWKS_MIN_REFRESH_S = 30.0
DEFAULT_JWKS_TIMEOUT_S = 5.0
DEFAULT_JWKS_WAIT_S = 1.0
HMAC_MIN_SECRET_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}  # RFC 7518 section 3.2

# What a quoted-string in a challenge may hold without escapes (RFC 6750 section 3).
_QUOTABLE_RE = re.compile(r"[ !#-\[\]-~]*")

_JWKS_OPTIONS = ("jwks_refresh", "jwks_min_refresh", "jwks_timeout", "jwks_wait", "jwks_ca_file")


class JwtAuth:
    """Verify a JWT on every request; forward its claims (see the module doc)."""

    # It decides who gets through: no cache may come before it in a chain
    # (proxy/plugin/base.py).
    ACCESS_CONTROL: ClassVar[bool] = True

    OPTIONS: ClassVar[dict[str, Option]] = {
        "algorithms": Option.strings(
            "the algorithms accepted (RS256, ES256, HS256...)", required=True
        ),
        "secret": Option.string("the HMAC secret (HS256, HS384, HS512)"),
        "secret_file": Option.string("a file holding the HMAC secret"),
        "public_key": Option.string("a PEM public key (RS, PS, ES, EdDSA)"),
        "public_key_file": Option.string("a file holding a PEM public key"),
        "jwks_url": Option.string("an http(s) URL of a JSON Web Key Set"),
        "jwks_refresh": Option.duration(
            "how often the key set is fetched again", DEFAULT_JWKS_REFRESH_S, positive=True
        ),
        "jwks_min_refresh": Option.duration(
            "the shortest time between fetches, when a token names an unknown key",
            DEFAULT_JWKS_MIN_REFRESH_S,
        ),
        "jwks_timeout": Option.duration(
            "a fetch slower than this fails", DEFAULT_JWKS_TIMEOUT_S, positive=True
        ),
        "jwks_wait": Option.duration(
            "how long a request waits for the first key set", DEFAULT_JWKS_WAIT_S, positive=True
        ),
        "jwks_ca_file": Option.string("PEM bundle to verify an https jwks_url against"),
        "issuer": Option.strings("accepted iss values (default: any)", ()),
        "audience": Option.strings("accepted aud values (default: any)", ()),
        "leeway": Option.duration("clock skew allowed for exp and nbf", DEFAULT_LEEWAY_S),
        "required_claims": Option.strings("claims a token must carry", ()),
        "forward_claims": Option.string_map("claims sent upstream: {claim: header}"),
        "consumer_claim": Option.string("the claim that names the consumer", "sub"),
        "cookie": Option.string("read the token from this cookie when there is no Authorization"),
        "forward_token": Option.boolean("pass the Authorization header upstream", True),
        "realm": Option.string("the realm of the WWW-Authenticate challenge", DEFAULT_REALM),
    }
    REQUIRED = ("algorithms",)

    def __init__(self, options: Options) -> None:
        self.name = options.name
        self.realm = _realm(options)
        self.algorithms, algorithms_ok = _algorithms(options)
        self._algorithm_list = sorted(self.algorithms)
        # The keys are checked against the algorithms only when those read cleanly (a
        # typo in one is one error, not three).
        self.secret = _secret(options, self.algorithms if algorithms_ok else None)
        self.public_key = _public_key(options)
        self.jwks = _jwks(options)
        if algorithms_ok:
            _check_asymmetric_keys(options, self.algorithms, self.public_key, self.jwks)
        issuers = options.strings("issuer")
        self.issuer: str | tuple[str, ...] | None = (
            (issuers[0] if len(issuers) == 1 else issuers) if issuers else None
        )
        audiences = options.strings("audience")
        self.audience: str | tuple[str, ...] | None = (
            (audiences[0] if len(audiences) == 1 else audiences) if audiences else None
        )
        self.leeway = options.duration("leeway", DEFAULT_LEEWAY_S)
        self.required_claims = options.strings("required_claims")
        self.forward_claims = forward_claims(options)
        self.consumer_claim = options.string("consumer_claim", "sub")
        self.cookie = _cookie(options)
        self.forward_token = options.boolean("forward_token", True)
        self._verifier = TokenVerifier(
            self.algorithms,
            secret=self.secret,
            public_key=self.public_key,
            jwks=self.jwks,
            issuer=self.issuer,
            audience=self.audience,
            leeway=self.leeway,
            required_claims=self.required_claims,
        )
        self._missing_challenge = f'Bearer realm="{self.realm}"'

    def __repr__(self) -> str:
        return f"<JwtAuth {self.name} {','.join(self._algorithm_list)} jwks={self.jwks!r}>"

    def identity_headers(self) -> tuple[str, ...]:
        """The headers claims are forwarded in (middleware/base.py)."""
        return tuple(header for _, header in self.forward_claims)

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Start refreshing the JWKS (when there is one)."""
        if self.jwks is not None:
            await self.jwks.start()

    async def close(self) -> None:
        """Stop refreshing the JWKS."""
        if self.jwks is not None:
            await self.jwks.aclose()

    # -- per request ----------------------------------------------------------------------
    async def __call__(self, request: Request, call_next: Handler) -> Response:
        headers = request.headers
        token, from_cookie = self._token(headers)
        if not token:
            count_auth_failure(self.name, "missing")
            raise Unauthorized(self._missing_challenge, "missing bearer token")
        try:
            claims = await self._verifier.verify(token)
            for claim, header in self.forward_claims:
                headers.popall(header, None)  # a client-sent copy is never forwarded
                value = claims.get(claim)
                if value is not None:
                    headers[header] = claim_header_value(claim, value)
        except TokenRefused as refused:
            raise self._refuse(refused.reason, refused.description) from None
        consumer = consumer_of(claims, self.consumer_claim)
        if consumer:
            request.consumer = consumer
        if not self.forward_token:
            _remove_token(headers, self.cookie if from_cookie else None)
        return await call_next(request)

    def _token(self, headers: CIMultiDict[str]) -> tuple[str, bool]:
        """The token, and whether it came from the cookie ("" when there is none)."""
        token = bearer_token(headers.get("authorization"))
        if token:
            return token, False
        if self.cookie is not None:
            for line in headers.getall("cookie", ()):
                for pair in line.split(";"):
                    name, sep, value = pair.strip().partition("=")
                    if sep and name == self.cookie:
                        value = value.strip()
                        if len(value) > 1 and value[0] == value[-1] == '"':
                            value = value[1:-1]
                        if value:
                            return value, True
        return "", False

    def _refuse(self, reason: str, description: str) -> Unauthorized:
        count_auth_failure(self.name, reason)
        return Unauthorized(invalid_token_challenge(self.realm, description), description)


# -- per request helpers ----------------------------------------------------------------
def _remove_token(headers: CIMultiDict[str], cookie: str | None) -> None:
    """`forward_token: false`: drop the Authorization header, or the token's cookie."""
    if cookie is None:
        headers.popall("authorization", None)
        return
    kept = [
        pair.strip()
        for line in headers.popall("cookie", ())
        for pair in line.split(";")
        if pair.strip() and pair.strip().partition("=")[0] != cookie
    ]
    if kept:
        headers["Cookie"] = "; ".join(kept)


# -- options (config load) --------------------------------------------------------------
def _realm(options: Options) -> str:
    value = options.string("realm", DEFAULT_REALM)
    if not _QUOTABLE_RE.fullmatch(value):
        options.error("realm", "must be printable ASCII without '\"' or '\\'")
        return DEFAULT_REALM
    return value


def _algorithms(options: Options) -> tuple[frozenset[str], bool]:
    """The allowed algorithms, and whether they read without an error."""
    failed = options.failed
    names = options.strings("algorithms")
    ok = options.failed == failed  # (`failed` only ever turns true)
    if "algorithms" in options and not names and ok:
        options.error("algorithms", "at least one algorithm is required")
        ok = False
    allowed: set[str] = set()
    for name in names:
        if name.lower() == "none":
            options.error("algorithms", "'none' (unsigned tokens) is never accepted")
            ok = False
        elif name in SUPPORTED_ALGORITHMS:
            allowed.add(name)
        else:
            exact = [known for known in SUPPORTED_ALGORITHMS if known.lower() == name.lower()]
            hint = f" (did you mean {exact[0]!r}?)" if exact else ""
            hint = hint or did_you_mean(name, sorted(SUPPORTED_ALGORITHMS))
            options.error(
                "algorithms",
                f"unsupported algorithm {name!r}{hint}; supported: "
                + ", ".join(sorted(SUPPORTED_ALGORITHMS)),
            )
            ok = False
    return frozenset(allowed), ok


def _read_file(options: Options, key: str, path: str) -> bytes | None:
    """The file's bytes (read at load, relative to the working directory), or None with
    the error recorded."""
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        options.error(key, f"cannot read {path!r}: {exc.strerror or exc}")
        return None


def _listed(names: list[str]) -> str:
    """`HS256 needs` / `HS256, HS512 need`."""
    return f"{', '.join(names)} {'needs' if len(names) == 1 else 'need'}"


def _exclusive(options: Options, first: str, second: str) -> None:
    if first in options and second in options:
        options.error(second, f"give either {first!r} or {second!r}, not both")


def _secret(options: Options, algorithms: frozenset[str] | None) -> bytes | None:
    """The HMAC secret (`algorithms` None: they had errors, skip the checks against them)."""
    _exclusive(options, "secret", "secret_file")
    key = "secret"
    secret: bytes | None = None
    if "secret" in options:
        secret = options.string("secret").encode("utf-8")
    elif "secret_file" in options:
        key = "secret_file"
        path = options.string("secret_file")
        secret = _read_file(options, key, path) if path else None
        if secret is not None:
            secret = secret.rstrip(b"\r\n")  # the file's final line break is not the key's
    if algorithms is None:
        return secret
    hmac_algorithms = sorted(algorithms & HMAC_ALGORITHMS)
    if secret is None:
        if hmac_algorithms and key not in options:
            options.error("algorithms", f"{_listed(hmac_algorithms)} 'secret' or 'secret_file'")
        return None
    if not hmac_algorithms:
        options.error(key, "no HS256, HS384 or HS512 in 'algorithms' uses this secret")
        return None
    for name in hmac_algorithms:
        minimum = HMAC_MIN_SECRET_BYTES[name]
        if len(secret) < minimum:
            options.error(
                key,
                f"the secret is {len(secret)} bytes; {name} needs at least {minimum} "
                "(RFC 7518 section 3.2)",
            )
            return None
    try:
        HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(secret)
    except InvalidKeyError:
        options.error(key, "this is a public key, not a secret: use 'public_key' for it")
        return None
    return secret


def _public_key(options: Options) -> VerifyKey | None:
    _exclusive(options, "public_key", "public_key_file")
    if "public_key" in options:
        key = "public_key"
        data: bytes | None = options.string("public_key").encode("utf-8")
        where = "'public_key'"
    elif "public_key_file" in options:
        key = "public_key_file"
        path = options.string("public_key_file")
        data = _read_file(options, key, path) if path else None
        where = repr(path)
    else:
        return None
    if data is None:
        return None
    try:
        return load_pem(data, where)
    except ValueError as exc:
        options.error(key, str(exc))
        return None


def _jwks(options: Options) -> JwksCache | None:
    url: JwksUrl | None = options.converted("jwks_url", parse_jwks_url, "an http(s) URL", None)
    if "jwks_url" not in options:
        for key in _JWKS_OPTIONS:
            if key in options:
                options.error(key, "only used with 'jwks_url'")
    refresh_s = options.duration("jwks_refresh", DEFAULT_JWKS_REFRESH_S, positive=True)
    min_refresh_s = options.duration("jwks_min_refresh", DEFAULT_JWKS_MIN_REFRESH_S)
    timeout_s = options.duration("jwks_timeout", DEFAULT_JWKS_TIMEOUT_S, positive=True)
    wait_s = options.duration("jwks_wait", DEFAULT_JWKS_WAIT_S, positive=True)
    ca_file = options.optional_string("jwks_ca_file")
    context: ssl.SSLContext | None = None
    if url is not None and url.tls:
        try:
            context = tls_context(ca_file or None)
        except (OSError, ssl.SSLError) as exc:
            options.error("jwks_ca_file", f"cannot load {ca_file!r}: {exc}")
    elif url is not None and ca_file is not None:
        options.error("jwks_ca_file", "only used with an https 'jwks_url'")
    if url is None:
        return None
    return JwksCache(
        url,
        name=options.name,
        refresh_s=refresh_s,
        min_refresh_s=min_refresh_s,
        timeout_s=timeout_s,
        wait_s=wait_s,
        ssl_context=context,
    )


def _check_asymmetric_keys(
    options: Options,
    algorithms: frozenset[str],
    public_key: VerifyKey | None,
    jwks: JwksCache | None,
) -> None:
    asymmetric = sorted(algorithms & ASYMMETRIC_ALGORITHMS)
    key = "public_key" if "public_key" in options else "public_key_file"
    if public_key is not None:
        if not set(asymmetric) & public_key.algorithms:
            options.error(
                key,
                f"no algorithm in 'algorithms' can use it: it is {describe_key(public_key.key)}",
            )
        elif jwks is None:
            for name in asymmetric:
                if name not in public_key.algorithms:
                    options.error(
                        "algorithms",
                        f"{name}: the public key is {describe_key(public_key.key)} and "
                        "cannot verify it (remove it, or add 'jwks_url')",
                    )
    elif asymmetric and jwks is None and key not in options and "jwks_url" not in options:
        options.error(
            "algorithms",
            f"{_listed(asymmetric)} 'public_key', 'public_key_file' or 'jwks_url'",
        )


def _cookie(options: Options) -> str | None:
    name = options.optional_string("cookie")
    if name is not None and not TOKEN_RE.fullmatch(name):
        options.error("cookie", f"{name!r} is not a valid cookie name")
        return None
    return name
