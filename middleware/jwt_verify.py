"""Verifying a JSON Web Token and turning its claims into request headers: what `jwt`
(middleware/jwt_auth.py) and `oidc` (middleware/oidc.py) share.

`TokenVerifier` holds everything decided at load (the allowed algorithms, the key for
each: an HMAC secret, a PEM public key, or the keys of a JWKS, see middleware/jwks.py;
the issuer, audience, leeway and required claims) and checks one token per call: its
header is read, the key is chosen by the token's `alg` (which must be one of ours: RFC
8725 section 3.1) and `kid`, and PyJWT verifies the signature and the claims. A refusal
is a `TokenRefused` with a reason (the `gatehouse_auth_failures_total` label) and a
description; nothing about a token raises anything else.

`forward_claims` reads the `{claim: header}` option both middleware have, and
`claim_header_value` turns a claim into a value that cannot split a header.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from typing import Any

import jwt
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

from middleware.jwks import HMAC_ALGORITHMS, JwksCache, VerifyKey
from proxy import Options

log = logging.getLogger(__name__)

# RFC 9110 section 5.6.2: a field name (and a cookie name, RFC 6265) is a token.
TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Control characters other than tab cannot go into a header value (RFC 9110 section 5.5).
CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# A compact JWS (RFC 7515 section 7.1): three base64url segments; trailing "=" as PyJWT allows.
_COMPACT_JWS_RE = re.compile(r"[A-Za-z0-9_=-]+\.[A-Za-z0-9_=-]*\.[A-Za-z0-9_=-]*")
# What a quoted-string in a challenge may not hold without escapes (RFC 6750 section 3).
_NOT_QUOTABLE_RE = re.compile(r"[^ !#-\[\]-~]")
# Headers a claim must not set: the message's framing and routing are not the token's.
_RESERVED_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "te", "upgrade", "trailer"}
)

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


class TokenRefused(Exception):
    """The token is refused for `reason` (described by `description`)."""

    def __init__(self, why: tuple[str, str]) -> None:
        super().__init__(why[1])
        self.reason, self.description = why


class TokenVerifier:
    """Checks tokens against keys and claims fixed at load (see the module doc).

    `jwks` may be set after construction (`oidc` learns its URL from the provider's
    discovery document); `issuer` and `audience` are a value or a tuple of accepted ones,
    None for any.
    """

    def __init__(
        self,
        algorithms: frozenset[str],
        *,
        secret: bytes | None = None,
        public_key: VerifyKey | None = None,
        jwks: JwksCache | None = None,
        issuer: str | tuple[str, ...] | None = None,
        audience: str | tuple[str, ...] | None = None,
        leeway: float = 0.0,
        required_claims: tuple[str, ...] = (),
    ) -> None:
        self.algorithms = algorithms
        self._algorithm_list = sorted(algorithms)
        self.secret = secret
        self.public_key = public_key
        self.jwks = jwks
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        # Without an `audience` the aud claim is not checked (as Envoy and Kong do); PyJWT
        # would otherwise refuse every token that has one. Short keys are refused, never
        # warned about per request.
        self._decoder = jwt.PyJWT(
            {
                "verify_aud": audience is not None,
                "require": list(required_claims),
                "enforce_minimum_key_length": True,
            }
        )

    async def verify(self, token: str) -> dict[str, Any]:
        """The token's claims once its signature and claims check out.

        Raises:
            TokenRefused: why not. Any other exception is a bug.
        """
        header = peek_header(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise TokenRefused(ALG_NOT_ALLOWED)  # includes "none": it is never in the set
        if alg in HMAC_ALGORITHMS:
            keys: tuple[Any, ...] = (self.secret,)
        else:
            keys = await self._public_keys(header.get("kid"), alg)
        refused = TokenRefused(BAD_SIGNATURE)
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
                refused = TokenRefused(refusal_of(exc))
                break
            except Exception:  # cryptography on a hostile token: refuse, never 500
                log.debug("token verification raised", exc_info=True)
                refused = TokenRefused(INVALID)
                break
        raise refused

    async def _public_keys(self, kid: str | None, alg: str) -> tuple[Any, ...]:
        """The keys that may have signed a token with this kid and alg."""
        jwks = self.jwks
        if jwks is None or (kid is None and self.public_key is not None):
            static = self.public_key
            if static is None or alg not in static.algorithms:
                raise TokenRefused(KEY_MISMATCH)
            return (static.key,)
        found = jwks.find(kid) if kid is not None else jwks.candidates(alg)
        # Rotated keys: the JWKS may have one we have not seen (refreshes are rate limited).
        if not found and await jwks.refresh_for_unknown():
            found = jwks.find(kid) if kid is not None else jwks.candidates(alg)
        if not found:
            raise TokenRefused(UNKNOWN_KID if kid is not None else NO_KEY)
        keys = tuple(key.key for key in found if alg in key.algorithms)
        if not keys:
            raise TokenRefused(KEY_MISMATCH)
        return keys


def peek_header(token: str) -> dict[str, Any]:
    """The token's JOSE header, read only to choose the key: PyJWT's decode reads the
    whole token again, strictly. (PyJWT's own `get_unverified_header` would be a second
    full parse: its per-character base64url checks cost ~45 us for an RS256 token.)

    Raises:
        TokenRefused: not three base64url segments, or a header that is not a JSON object
            with a string kid.
    """
    if not _COMPACT_JWS_RE.fullmatch(token):
        raise TokenRefused(MALFORMED)
    segment = token[: token.index(".")]
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, RecursionError):  # binascii.Error and UnicodeDecodeError too
        raise TokenRefused(MALFORMED) from None
    if not isinstance(header, dict) or not isinstance(header.get("kid", ""), str):
        raise TokenRefused(MALFORMED)
    return header


def refusal_of(exc: PyJWTError) -> tuple[str, str]:
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


def claim_header_value(claim: str, value: object) -> str:
    """A claim as a header value: strings as they are (UTF-8 on the wire), numbers and
    booleans as JSON, a list of those joined by commas, anything else as compact JSON.

    Raises:
        TokenRefused: a string with control characters (it could split the header).
    """
    if isinstance(value, str):
        text = value
    elif isinstance(value, list) and all(
        isinstance(item, str | int | float) and not isinstance(item, bool) for item in value
    ):
        text = ",".join(item if isinstance(item, str) else json.dumps(item) for item in value)
    else:
        text = json.dumps(value, separators=(",", ":"))
    if CONTROL_RE.search(text):
        raise TokenRefused(("bad_claim", f"claim {claim} is not a valid header value"))
    if not text.isascii():
        # Header values are held as latin-1 text of their bytes: send the UTF-8 bytes.
        text = text.encode("utf-8").decode("latin-1")
    return text


def bearer_token(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer` value ("" when there is none)."""
    if authorization is None:
        return ""
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":  # auth-scheme is case-insensitive (RFC 9110 11.1)
        return ""
    return credentials.strip()


def invalid_token_challenge(realm: str, description: str) -> str:
    """The WWW-Authenticate value of a refused bearer token (RFC 6750 section 3)."""
    description = _NOT_QUOTABLE_RE.sub("", description)
    return f'Bearer realm="{realm}", error="invalid_token", error_description="{description}"'


def consumer_of(claims: dict[str, Any], claim: str) -> str:
    """The consumer a claim names ("" when absent, or not a string or an integer; a
    string with control characters is refused: it reaches logs and maybe headers)."""
    consumer = claims.get(claim) if claim else None
    if isinstance(consumer, int) and not isinstance(consumer, bool):
        return str(consumer)
    if isinstance(consumer, str) and not CONTROL_RE.search(consumer):
        return consumer
    return ""


def forward_claims(options: Options, key: str = "forward_claims") -> tuple[tuple[str, str], ...]:
    """The `{claim: header}` option as (claim, header) pairs, each header a valid name
    that no other claim sets and that is not a framing or routing field."""
    pairs: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    for claim, header in options.string_map(key).items():
        lowered = header.lower()
        if not TOKEN_RE.fullmatch(header):
            options.error(key, f"{claim}: {header!r} is not a valid header name")
        elif lowered in _RESERVED_HEADERS:
            options.error(key, f"{claim}: a claim cannot set {header}")
        elif lowered in seen:
            options.error(key, f"{claim}: header {header} is already set by {seen[lowered]}")
        else:
            seen[lowered] = claim
            pairs.append((claim, header))
    return tuple(pairs)
