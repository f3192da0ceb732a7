"""The `oidc` middleware's tokens: checking them, making a session from a token answer,
and renewing a session with its refresh token.

- **ID tokens** (OpenID Connect Core section 3.1.3.7): signed by a key of the provider's
  JWKS with an allowed algorithm (`algorithms`, else those the discovery document lists
  that we verify: RS, PS, ES, EdDSA; never HS or none), our issuer, our client id in
  `aud` (and as `azp` when there are several audiences), `exp`, `iat` and `sub` present,
  and the login's `nonce`. A renewed ID token must name the same subject (section 12.2).
- **Access tokens** (API mode): JWTs (RFC 9068) with the same keys and issuer, an
  accepted `audience` and an `exp`. middleware/jwt_verify.py does the checking.
- **Renewal.** A refresh token is used once at a time per worker: concurrent requests
  with the same expired session wait for the one renewal, and its result answers the
  requests that arrive with the old cookie for REFRESH_REUSE_S more (a provider that
  rotates refresh tokens may revoke the whole grant when an old one comes back).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from metrics.definitions import count_auth_failure, count_oidc_session
from middleware.jwt_verify import TokenRefused, TokenVerifier, claim_header_value
from middleware.oidc_cookies import Session
from middleware.oidc_options import OidcSettings
from middleware.oidc_provider import (
    OidcProvider,
    ProviderBadAnswer,
    ProviderMetadata,
    TokenRequestRefused,
)

log = logging.getLogger(__name__)

RECENT_REFRESHES = 1024  # renewals remembered per middleware instance
REFRESH_REUSE_S = 30.0  # how long a renewal answers requests that carry the old cookie


class SessionKeeper:
    """Token checks and renewals for one `oidc` instance (see the module doc). `now` is
    the clock token times are compared with (Unix seconds)."""

    def __init__(
        self,
        name: str,
        settings: OidcSettings,
        provider: OidcProvider,
        now: Callable[[], float],
    ) -> None:
        self.name = name
        self.settings = settings
        self.provider = provider
        self.now = now
        self._verifiers: tuple[ProviderMetadata, TokenVerifier, TokenVerifier] | None = None
        self._renewing: dict[str, asyncio.Task[Session | None]] = {}
        self._renewed: OrderedDict[str, tuple[float, Session | None]] = OrderedDict()

    def close(self) -> None:
        """Cancel the renewals in flight."""
        for task in list(self._renewing.values()):
            task.cancel()

    # -- tokens -------------------------------------------------------------------------
    async def verifiers(self) -> tuple[TokenVerifier, TokenVerifier]:
        """The verifiers of ID tokens and of access tokens, for the provider's current
        metadata and keys.

        Raises:
            ProviderUnavailable: no discovery document yet.
        """
        metadata = await self.provider.metadata()
        held = self._verifiers
        if held is not None and held[0] is metadata and held[1].jwks is self.provider.jwks:
            return held[1], held[2]
        settings = self.settings
        algorithms = settings.algorithms or metadata.id_token_algorithms or frozenset({"RS256"})
        audience = settings.audience
        id_verifier = TokenVerifier(
            algorithms,
            jwks=self.provider.jwks,
            issuer=settings.issuer,
            audience=settings.client_id,
            leeway=settings.leeway_s,
            required_claims=("exp", "iat", "sub"),
        )
        access_verifier = TokenVerifier(
            algorithms,
            jwks=self.provider.jwks,
            issuer=settings.issuer,
            audience=audience[0] if len(audience) == 1 else audience,
            leeway=settings.leeway_s,
            required_claims=("exp",),
        )
        self._verifiers = (metadata, id_verifier, access_verifier)
        return id_verifier, access_verifier

    async def check_id_token(self, id_token: str, nonce: str) -> dict[str, Any]:
        """The ID token's claims, checked (`nonce` "": a renewal's, whose nonce is not
        checked).

        Raises:
            TokenRefused: why not.
            ProviderUnavailable: no discovery document yet.
        """
        id_verifier, _ = await self.verifiers()
        claims = await id_verifier.verify(id_token)
        audience = claims.get("aud")
        several = isinstance(audience, list) and len(audience) > 1
        if several and claims.get("azp") != self.settings.client_id:
            raise TokenRefused(("bad_audience", "azp is not our client id"))
        if nonce and not hmac.compare_digest(str(claims.get("nonce", "")), nonce):
            raise TokenRefused(("bad_claim", "the nonce is not the login's"))
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise TokenRefused(("missing_claim", "missing required claim sub"))
        return claims

    async def new_session(self, tokens: dict[str, Any], nonce: str) -> Session:
        """The session a login's token answer makes.

        Raises:
            ProviderBadAnswer: no access token or no ID token.
            TokenRefused: the ID token does not check out.
            ProviderUnavailable: no discovery document yet.
        """
        id_token = _token(tokens, "id_token")
        if not id_token:
            raise ProviderBadAnswer("the token answer has no id_token")
        access_token = _access_token(tokens)
        claims = await self.check_id_token(id_token, nonce)
        now = self.now()
        return Session(
            subject=claims["sub"],
            started=now,
            ends=now + self.settings.session_lifetime_s,
            expires=self._expiry(tokens, claims, now + self.settings.session_lifetime_s),
            claims=self._kept(claims),
            id_token=id_token,
            refresh_token=_token(tokens, "refresh_token"),
            access_token=access_token if self.settings.forward_access_token else "",
        )

    async def _renewed_session(self, tokens: dict[str, Any], session: Session) -> Session:
        """`session` with the tokens of a refresh answer (those it lacks are kept).

        Raises:
            ProviderBadAnswer, TokenRefused, ProviderUnavailable: as `new_session`; or
                the new ID token is for another subject.
        """
        access_token = _access_token(tokens)
        id_token = _token(tokens, "id_token")
        claims = None
        if id_token:
            claims = await self.check_id_token(id_token, "")
            if claims["sub"] != session.subject:
                raise TokenRefused(("bad_claim", "the renewed ID token is for another subject"))
        return Session(
            subject=session.subject,
            started=session.started,
            ends=session.ends,
            expires=self._expiry(tokens, claims, session.ends),
            claims=self._kept(claims) if claims is not None else session.claims,
            id_token=id_token or session.id_token,
            refresh_token=_token(tokens, "refresh_token") or session.refresh_token,
            access_token=access_token if self.settings.forward_access_token else "",
        )

    def _expiry(self, tokens: dict[str, Any], claims: dict[str, Any] | None, last: float) -> float:
        """When the tokens expire: `expires_in` after now, else the ID token's `exp`,
        else `last` (the session's end)."""
        expires_in = tokens.get("expires_in")
        if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
            return self.now() + float(expires_in)
        exp = claims.get("exp") if claims is not None else None
        if isinstance(exp, int | float) and not isinstance(exp, bool):
            return float(exp)
        return last

    def _kept(self, claims: dict[str, Any]) -> dict[str, Any]:
        """The claims a session keeps: those forwarded, and the consumer's.

        Raises:
            TokenRefused: a forwarded claim that cannot be a header value (checked once
                here, so that every request of the session can send it).
        """
        for claim, _ in self.settings.forward_claims:
            if claims.get(claim) is not None:
                claim_header_value(claim, claims[claim])
        wanted = {claim for claim, _ in self.settings.forward_claims}
        wanted.add(self.settings.consumer_claim)
        return {name: claims[name] for name in sorted(wanted) if name in claims}

    # -- renewal ------------------------------------------------------------------------
    async def renew(self, session: Session) -> Session | None:
        """`session` with renewed tokens; None when the provider refused the refresh
        token, or answered it wrongly (the browser logs in again).

        Raises:
            ProviderUnavailable: the provider could not be asked.
        """
        key = hashlib.sha256(session.refresh_token.encode("utf-8")).hexdigest()
        recent = self._renewed.get(key)
        if recent is not None and self.now() - recent[0] < REFRESH_REUSE_S:
            return recent[1]
        task = self._renewing.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._renew(session))
            self._renewing[key] = task
            task.add_done_callback(lambda done: self._renew_done(key, done))
        # (a request that goes away does not cancel the renewal others wait for)
        return await asyncio.shield(task)

    def _renew_done(self, key: str, task: asyncio.Task[Session | None]) -> None:
        self._renewing.pop(key, None)
        if task.cancelled() or task.exception() is not None:
            return
        self._renewed[key] = (self.now(), task.result())
        while len(self._renewed) > RECENT_REFRESHES:
            self._renewed.popitem(last=False)

    async def _renew(self, session: Session) -> Session | None:
        form = {"grant_type": "refresh_token", "refresh_token": session.refresh_token}
        try:
            tokens = await self.provider.token_request(form)
            renewed = await self._renewed_session(tokens, session)
        except TokenRequestRefused as exc:
            log.info("oidc %s: the provider refused a refresh token: %s", self.name, exc)
            return None
        except (ProviderBadAnswer, TokenRefused) as exc:
            log.warning("oidc %s: a refresh failed: %s", self.name, exc)
            count_auth_failure(self.name, "bad_token_answer")
            return None
        count_oidc_session(self.name, "refresh")
        return renewed


def _token(tokens: dict[str, Any], key: str) -> str:
    """A token of the answer ("" when absent).

    Raises:
        ProviderBadAnswer: present but not a string.
    """
    value = tokens.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ProviderBadAnswer(f"the token answer's {key} is not a string")
    return value


def _access_token(tokens: dict[str, Any]) -> str:
    token = _token(tokens, "access_token")
    if not token:
        raise ProviderBadAnswer("the token answer has no access_token")
    return token
