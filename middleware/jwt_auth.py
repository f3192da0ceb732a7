"""`jwt`: requests must carry a valid JSON Web Token (RFC 7519), as a Bearer token (RFC
6750) or in a cookie; its claims can be forwarded upstream as headers.

Everything is decided at load: the allowed algorithms (`none` never is), the key for each
(an HMAC `secret`, a PEM `public_key`, or the keys of a `jwks_url`, see middleware/jwks.py),
the claim checks and the headers to set. Per request: find the token, read its header,
pick the key by the token's `alg` (which must be one of ours: RFC 8725 section 3.1) and
`kid`, verify the signature and the claims with PyJWT, then replace the forwarded headers
(client-sent copies are always removed, so they cannot be spoofed) and set
`request.consumer`.

A refused token is a 401 whose `WWW-Authenticate` says why (RFC 6750 section 3:
`error="invalid_token"` and an `error_description`; no error attribute when no token was
sent), counted in `gatehouse_auth_failures_total{middleware,reason}`. Nothing about a token
can make the answer a 500.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import ssl
from typing import Any, ClassVar

import jwt
from jwt.algorithms import HMACAlgorithm
from jwt.exceptions import (
    DecodeError,
    ExpiredSignatureError,
    ImmatureSignatureError,
    InvalidAlgorithmError,
    InvalidAudienceError,
    InvalidIssuedAtError,
    InvalidIssuerError,
    InvalidKeyError,
    InvalidSignatureError,
    InvalidTokenError,
    MissingRequiredClaimError,
    PyJWTError,
)
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

# RFC 9110 section 5.6.2: a field name (and a cookie name, RFC 6265) is a token.
_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# A compact JWS (RFC 7515 section 7.1): three base64url segments; trailing "=" as PyJWT allows.
_COMPACT_JWS_RE = re.compile(r"[A-Za-z0-9_=-]+\.[A-Za-z0-9_=-]*\.[A-Za-z0-9_=-]*")
# What a quoted-string in a challenge may hold without escapes (RFC 6750 section 3).
_QUOTABLE_RE = re.compile(r"[ !#-\[\]-~]*")
_NOT_QUOTABLE_RE = re.compile(r"[^ !#-\[\]-~]")
# Control characters other than tab cannot go into a header value (RFC 9110 section 5.5).
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Headers a claim must not set: the message's framing and routing are not the token's.
_RESERVED_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "te", "upgrade", "trailer"}
)

_JWKS_OPTIONS = ("jwks_refresh", "jwks_min_refresh", "jwks_timeout", "jwks_wait", "jwks_ca_file")

# Why a token was refused: its reason (the metric label) and the error_description.
MALFORMED = ("malformed", "malformed token")
ALG_NOT_ALLOWED = ("alg_not_allowed", "algorithm not allowed")
UNKNOWN_KID = ("unknown_kid", "unknown key id")
NO_KEY = ("unknown_kid", "no key for this token")
KEY_MISMATCH = ("bad_signature", "the key does not fit the algorithm")
BAD_SIGNATURE = ("bad_signature", "invalid signature")
EXPIRED = ("expired", "token expired")
NOT_YET_VALID = ("not_yet_valid", "token not yet valid")
BAD_AUDIENCE = ("bad_audience", "invalid audience")
BAD_ISSUER = ("bad_issuer", "invalid issuer")
INVALID = ("invalid", "invalid token")


class _Refused(Exception):
    """Internal: the token is refused for `reason` (described by `description`)."""

    def __init__(self, why: tuple[str, str]) -> None:
        super().__init__(why[1])
        self.reason, self.description = why


class JwtAuth:
    """Verify a JWT on every request; forward its claims (see the module doc)."""

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
        self.forward_claims = _forward_claims(options)
        self.consumer_claim = options.string("consumer_claim", "sub")
        self.cookie = _cookie(options)
        self.forward_token = options.boolean("forward_token", True)
        # Without an `audience` the aud claim is not checked (as Envoy and Kong do); PyJWT
        # would otherwise refuse every token that has one. Short keys are refused, never
        # warned about per request.
        self._decoder = jwt.PyJWT(
            {
                "verify_aud": self.audience is not None,
                "require": list(self.required_claims),
                "enforce_minimum_key_length": True,
            }
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
            claims = await self._verify(token)
            for claim, header in self.forward_claims:
                headers.popall(header, None)  # a client-sent copy is never forwarded
                value = claims.get(claim)
                if value is not None:
                    headers[header] = _header_value(claim, value)
        except _Refused as refused:
            raise self._refuse(refused.reason, refused.description) from None
        if self.consumer_claim:
            consumer = claims.get(self.consumer_claim)
            if isinstance(consumer, int) and not isinstance(consumer, bool):
                request.consumer = str(consumer)
            elif isinstance(consumer, str) and not _CONTROL_RE.search(consumer):
                request.consumer = consumer  # (it reaches logs and maybe headers: no CR/LF)
        if not self.forward_token:
            _remove_token(headers, self.cookie if from_cookie else None)
        return await call_next(request)

    def _token(self, headers: CIMultiDict[str]) -> tuple[str, bool]:
        """The token, and whether it came from the cookie ("" when there is none)."""
        authorization = headers.get("authorization")
        if authorization is not None:
            scheme, _, credentials = authorization.strip().partition(" ")
            if scheme.lower() == "bearer":  # auth-scheme is case-insensitive (RFC 9110 11.1)
                token = credentials.strip()
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

    async def _verify(self, token: str) -> dict[str, Any]:
        """The token's claims once its signature and claims check out.

        Raises:
            _Refused: why not. Any other exception is a bug.
        """
        header = _peek_header(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise _Refused(ALG_NOT_ALLOWED)  # includes "none": it is never in the set
        if alg in HMAC_ALGORITHMS:
            keys: tuple[Any, ...] = (self.secret,)
        else:
            keys = await self._public_keys(header.get("kid"), alg)
        refused = _Refused(BAD_SIGNATURE)
        for key in keys:  # more than one only for a kid-less token checked against a JWKS
            try:
                claims: dict[str, Any] = self._decoder.decode(
                    token,
                    key,
                    algorithms=self._algorithm_list,
                    audience=self.audience,
                    issuer=self.issuer,
                    leeway=self.leeway,
                )
                return claims
            except InvalidSignatureError:
                continue
            except PyJWTError as exc:
                refused = _Refused(_why(exc))
                break
            except Exception:  # cryptography on a hostile token: refuse, never 500
                log.debug("jwt %s: token verification raised", self.name, exc_info=True)
                refused = _Refused(INVALID)
                break
        raise refused

    async def _public_keys(self, kid: str | None, alg: str) -> tuple[Any, ...]:
        """The keys that may have signed a token with this kid and alg."""
        jwks = self.jwks
        if jwks is None or (kid is None and self.public_key is not None):
            static = self.public_key
            if static is None or alg not in static.algorithms:
                raise _Refused(KEY_MISMATCH)
            return (static.key,)
        found = jwks.find(kid) if kid is not None else jwks.candidates(alg)
        # Rotated keys: the JWKS may have one we have not seen (refreshes are rate limited).
        if not found and await jwks.refresh_for_unknown():
            found = jwks.find(kid) if kid is not None else jwks.candidates(alg)
        if not found:
            raise _Refused(UNKNOWN_KID if kid is not None else NO_KEY)
        keys = tuple(key.key for key in found if alg in key.algorithms)
        if not keys:
            raise _Refused(KEY_MISMATCH)
        return keys

    def _refuse(self, reason: str, description: str) -> Unauthorized:
        count_auth_failure(self.name, reason)
        description = _NOT_QUOTABLE_RE.sub("", description)
        challenge = (
            f'Bearer realm="{self.realm}", error="invalid_token", error_description="{description}"'
        )
        return Unauthorized(challenge, description)


# -- per request helpers ----------------------------------------------------------------
def _peek_header(token: str) -> dict[str, Any]:
    """The token's JOSE header, read only to choose the key: PyJWT's decode reads the
    whole token again, strictly. (PyJWT's own `get_unverified_header` would be a second
    full parse: its per-character base64url checks cost ~45 us for an RS256 token.)

    Raises:
        _Refused: not three base64url segments, or a header that is not a JSON object
            with a string kid.
    """
    if not _COMPACT_JWS_RE.fullmatch(token):
        raise _Refused(MALFORMED)
    segment = token[: token.index(".")]
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, RecursionError):  # binascii.Error and UnicodeDecodeError too
        raise _Refused(MALFORMED) from None
    if not isinstance(header, dict) or not isinstance(header.get("kid", ""), str):
        raise _Refused(MALFORMED)
    return header


def _why(exc: PyJWTError) -> tuple[str, str]:
    """The reason and description of a PyJWT refusal."""
    if isinstance(exc, ExpiredSignatureError):
        return EXPIRED
    if isinstance(exc, ImmatureSignatureError):
        return NOT_YET_VALID
    if isinstance(exc, InvalidAudienceError):
        return BAD_AUDIENCE
    if isinstance(exc, InvalidIssuerError):
        return BAD_ISSUER
    if isinstance(exc, MissingRequiredClaimError):
        return ("missing_claim", f"missing required claim {exc.claim}")
    if isinstance(exc, InvalidIssuedAtError):
        return ("bad_claim", "invalid claim iat")
    if isinstance(exc, InvalidAlgorithmError):
        return ALG_NOT_ALLOWED
    if isinstance(exc, InvalidKeyError):
        return KEY_MISMATCH
    if isinstance(exc, DecodeError):
        return MALFORMED
    if isinstance(exc, InvalidTokenError):  # sub or jti not a string, bad crit header...
        return INVALID
    return INVALID


def _header_value(claim: str, value: object) -> str:
    """A claim as a header value: strings as they are (UTF-8 on the wire), numbers and
    booleans as JSON, a list of those joined by commas, anything else as compact JSON.

    Raises:
        _Refused: a string with control characters (it could split the header).
    """
    if isinstance(value, str):
        text = value
    elif isinstance(value, list) and all(
        isinstance(item, str | int | float) and not isinstance(item, bool) for item in value
    ):
        text = ",".join(item if isinstance(item, str) else json.dumps(item) for item in value)
    else:
        text = json.dumps(value, separators=(",", ":"))
    if _CONTROL_RE.search(text):
        raise _Refused(("bad_claim", f"claim {claim} is not a valid header value"))
    if not text.isascii():
        # Header values are held as latin-1 text of their bytes: send the UTF-8 bytes.
        text = text.encode("utf-8").decode("latin-1")
    return text


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


def _forward_claims(options: Options) -> tuple[tuple[str, str], ...]:
    pairs: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    for claim, header in options.string_map("forward_claims").items():
        lowered = header.lower()
        if not _TOKEN_RE.fullmatch(header):
            options.error("forward_claims", f"{claim}: {header!r} is not a valid header name")
        elif lowered in _RESERVED_HEADERS:
            options.error("forward_claims", f"{claim}: a claim cannot set {header}")
        elif lowered in seen:
            options.error(
                "forward_claims", f"{claim}: header {header} is already set by {seen[lowered]}"
            )
        else:
            seen[lowered] = claim
            pairs.append((claim, header))
    return tuple(pairs)


def _cookie(options: Options) -> str | None:
    name = options.optional_string("cookie")
    if name is not None and not _TOKEN_RE.fullmatch(name):
        options.error("cookie", f"{name!r} is not a valid cookie name")
        return None
    return name
