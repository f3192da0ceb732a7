"""`oidc`: OpenID Connect login at the gateway (the relying party), or, in API mode,
OAuth 2.0 access tokens from the same provider.

Login mode (`mode: login`), for browsers:

1. A request without a valid session starts a login: a navigation (`Sec-Fetch-Mode:
   navigate`, or a GET or HEAD that accepts text/html) is redirected (302) to the
   provider's authorization endpoint with the authorization-code flow's parameters, a
   fresh `state`, `nonce` and PKCE challenge (RFC 7636, S256). Those three and the
   original path are sealed in a login cookie of its own, named after the state (so that
   logins in several tabs do not undo each other), scoped to the callback's path, living
   `login_timeout`. Any other request is answered 401 `oidc_login_required`.
2. The provider sends the browser back to `redirect_uri` with a code. The callback's
   state must be the login cookie's (else 403 `oidc_state_mismatch`); the code is
   exchanged at the token endpoint with the PKCE verifier; the ID token must be signed by
   a key of the provider's JWKS with an allowed algorithm, and carry our issuer, our
   client id in `aud` (and in `azp` when there are several), a future `exp`, an `iat`, a
   `sub` and the login's nonce. Then the session cookie is set and the browser goes back
   to the path it first asked for (only a path on this origin: never an open redirect).
3. With a session, the claims named in `forward_claims` are set as request headers
   (copies the client sent are removed first, as `jwt` does), the consumer is set, and the
   middleware's own cookies are removed from what the upstream gets. When the session's
   tokens have expired they are renewed with the refresh token (one renewal per token
   at a time in a worker, its result reused for the requests that arrive with the old
   cookie meanwhile); without a refresh token, or when the provider refuses it, the
   browser logs in again. After `session_lifetime` it always does.
4. `logout_path` clears the session's cookies and redirects to the provider's
   `end_session_endpoint` (RP-Initiated Logout 1.0) with `id_token_hint`, `client_id` and
   `post_logout_redirect_uri`; without one, straight to `post_logout_redirect_uri`.

API mode (`mode: api`): the request must carry `Authorization: Bearer` with a JWT access
token (RFC 9068) signed by a key of the provider's JWKS, with our issuer and an accepted
`audience`; claims are forwarded as in login mode; refusals are 401 with an RFC 6750
challenge, as `jwt`'s. Opaque access tokens are not accepted (no introspection).

The cookies are middleware/oidc_cookies.py's; the provider (discovery, keys, token
endpoint, all through the gateway's own HTTP client) is middleware/oidc_provider.py's;
the options are middleware/oidc_options.py's.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import re
import secrets
import time
from collections.abc import Callable
from typing import ClassVar
from urllib.parse import parse_qsl, urlencode

from multidict import CIMultiDict

from metrics.definitions import count_auth_failure, count_oidc_session
from middleware.jwt_verify import (
    CONTROL_RE,
    TokenRefused,
    bearer_token,
    claim_header_value,
    consumer_of,
    invalid_token_challenge,
)
from middleware.oidc_cookies import (
    CookieSealer,
    Session,
    SessionTooLarge,
    encode_session,
    join,
    login_purpose,
    names_of,
    open_session,
    parse_cookies,
)
from middleware.oidc_options import OptionsTable, read_settings
from middleware.oidc_provider import (
    OidcProvider,
    ProviderBadAnswer,
    ProviderUnavailable,
    TokenRequestRefused,
)
from middleware.oidc_session import SessionKeeper
from proxy import (
    BadRequest,
    Body,
    Handler,
    Options,
    ProxyError,
    Request,
    Response,
    Unauthorized,
)

log = logging.getLogger(__name__)

MAX_PENDING_LOGINS = 4  # login cookies a browser may hold at once; more are cleared
_STATE_RE = re.compile(r"[A-Za-z0-9_-]{16,128}")
_STATE_NAME_CHARS = 16  # of the state, in the login cookie's name
_MAX_CALLBACK_FIELDS = 20
_MAX_ERROR_CHARS = 200


# -- refusals (docs/errors.md) -----------------------------------------------------------
class OidcLoginRequired(ProxyError):
    """Login mode: a request that is not a page navigation came without a valid session
    (a script's fetch cannot follow a login): it should send the browser to log in."""

    status, reason = 401, "oidc_login_required"

    def __init__(self, realm: str, message: str = "") -> None:
        super().__init__(message)
        self.challenge = f'OIDC realm="{realm}"'


class OidcStateMismatch(ProxyError):
    """A callback whose state no login in progress in this browser has (forged, replayed,
    or the login took longer than `login_timeout`)."""

    status, reason = 403, "oidc_state_mismatch"


class OidcLoginDenied(ProxyError):
    """The provider answered the callback with an error (the user declined, or may not
    log in to this client)."""

    status, reason = 403, "oidc_login_denied"


class OidcBadResponse(ProxyError):
    """The provider refused the code, or answered the token request with something that
    is not valid (a bad ID token, the wrong issuer, no ID token)."""

    status, reason = 502, "oidc_bad_response"


class OidcSessionTooLarge(ProxyError):
    """The provider's tokens do not fit in `cookie_max_size`, even without the ID token."""

    status, reason = 502, "oidc_session_too_large"


class OidcProviderUnavailable(ProxyError):
    """The provider could not be reached, or did not answer within `timeout`."""

    status, reason = 503, "oidc_provider_unavailable"


class Oidc(OptionsTable):
    """OpenID Connect login, or access tokens in API mode (see the module doc)."""

    # It decides who gets through: no cache may come before it in a chain
    # (proxy/plugin/base.py).
    ACCESS_CONTROL: ClassVar[bool] = True

    def __init__(self, options: Options) -> None:
        self.name = options.name
        settings = read_settings(options)
        self.settings = settings
        self.provider = OidcProvider(
            settings.issuer,
            name=options.name,
            client_id=settings.client_id,
            client_secret=settings.client_secret,
            auth_method=settings.auth_method,
            timeout_s=settings.timeout_s,
            discovery_refresh_s=settings.discovery_refresh_s,
            jwks_refresh_s=settings.jwks_refresh_s,
            jwks_min_refresh_s=settings.jwks_min_refresh_s,
            ssl_context=settings.ssl_context,
        )
        self.now: Callable[[], float] = time.time  # token times are Unix times
        self.sessions = SessionKeeper(options.name, settings, self.provider, self._clock)
        # Login mode has secrets (a config without is refused); api mode uses none, and
        # gets a random key it never uses.
        self._sealer = CookieSealer(settings.cookie_secrets or (secrets.token_bytes(32),))
        self._login_prefix = f"{settings.cookie}_login_"
        self._missing_challenge = f'Bearer realm="{settings.realm}"'

    def __repr__(self) -> str:
        return f"<Oidc {self.name} {self.settings.mode} {self.provider!r}>"

    def _clock(self) -> float:
        return self.now()

    def identity_headers(self) -> tuple[str, ...]:
        """The headers claims are forwarded in (middleware/base.py)."""
        return tuple(header for _, header in self.settings.forward_claims)

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Start fetching the provider's discovery document (and then its keys)."""
        await self.provider.start()

    async def close(self) -> None:
        """Stop the refreshes and the renewals in flight."""
        self.sessions.close()
        await self.provider.close()

    # -- per request --------------------------------------------------------------------
    async def __call__(self, request: Request, call_next: Handler) -> Response:
        if self.settings.mode == "api":
            return await self._api(request, call_next)
        path = request.path
        if path == self.settings.redirect_path:
            return await self._callback(request)
        if path == self.settings.logout_path:
            return await self._logout(request)
        cookies = parse_cookies(request.headers.getall("cookie", ()))
        stored = join(cookies, self.settings.cookie)
        found = await self._session(stored) if stored is not None else None
        if found is None:
            return await self._login(request, cookies)
        session, renewed = found
        self._forward(request, session, cookies)
        set_cookies = self._session_cookies(session, cookies, request) if renewed else []
        response = await call_next(request)
        for cookie in set_cookies:
            response.headers.add("Set-Cookie", cookie)
        if set_cookies:  # (a renewal is this browser's alone: no shared cache keeps it)
            response.headers["Cache-Control"] = "private, no-store"
        return response

    async def _session(self, stored: str) -> tuple[Session, bool] | None:
        """The session the cookie holds, and whether it was renewed just now (its
        tokens had expired); None when the browser must log in.

        Raises:
            OidcProviderUnavailable: a renewal could not reach the provider.
        """
        session = open_session(self._sealer, self.settings.cookie, stored)
        if session is None:
            count_auth_failure(self.name, "invalid_session")  # changed, or an old key's
            return None
        now = self.now()
        if now >= session.ends:
            count_auth_failure(self.name, "session_expired")
            return None
        if now < session.expires:
            return session, False
        if not session.refresh_token:
            count_auth_failure(self.name, "token_expired")
            return None
        try:
            renewed = await self.sessions.renew(session)
        except ProviderUnavailable as exc:
            count_auth_failure(self.name, "unavailable")
            raise OidcProviderUnavailable(str(exc)) from None
        if renewed is None:
            count_auth_failure(self.name, "refresh_failed")
            return None
        return renewed, True

    def _forward(self, request: Request, session: Session, cookies: dict[str, str]) -> None:
        """Set the forwarded claims, the consumer and the access token; remove the
        middleware's own cookies from what the upstream gets."""
        headers = request.headers
        try:
            _set_claims(headers, self.settings.forward_claims, session.claims)
        except TokenRefused:  # pragma: no cover - checked when the session was made
            log.warning("oidc %s: a sealed claim is no header value", self.name)
        consumer = consumer_of(session.claims, self.settings.consumer_claim)
        if consumer:
            request.consumer = consumer
        if self.settings.forward_access_token and session.access_token:
            headers["Authorization"] = f"Bearer {session.access_token}"
        ours = set(names_of(cookies, self.settings.cookie))
        ours.update(name for name in cookies if name.startswith(self._login_prefix))
        if ours:
            kept = [
                pair.strip()
                for line in headers.popall("cookie", ())
                for pair in line.split(";")
                if pair.strip() and pair.partition("=")[0].strip() not in ours
            ]
            if kept:
                headers["Cookie"] = "; ".join(kept)

    # -- logging in ---------------------------------------------------------------------
    async def _login(self, request: Request, cookies: dict[str, str]) -> Response:
        """Send a navigation to the provider (a 302 with a login cookie); refuse the rest.

        Raises:
            OidcLoginRequired: not a navigation.
            OidcProviderUnavailable: no discovery document yet.
        """
        if not _is_navigation(request):
            raise OidcLoginRequired(self.settings.realm, "log in first (no valid session)")
        try:
            metadata = await self.provider.metadata()
        except ProviderUnavailable as exc:
            count_auth_failure(self.name, "unavailable")
            raise OidcProviderUnavailable(str(exc)) from None
        settings = self.settings
        state = secrets.token_urlsafe(32)
        nonce = secrets.token_urlsafe(32)
        verifier = secrets.token_urlsafe(48)  # 64 characters (RFC 7636 section 4.1: 43-128)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        params = [
            ("response_type", "code"),
            ("client_id", settings.client_id),
            ("redirect_uri", self._redirect_uri(request)),
            ("scope", " ".join(settings.scopes)),
            ("state", state),
            ("nonce", nonce),
            ("code_challenge", challenge.rstrip(b"=").decode("ascii")),
            ("code_challenge_method", "S256"),
            *settings.auth_params,
        ]
        endpoint = metadata.authorization_endpoint
        location = endpoint + ("&" if "?" in endpoint else "?") + urlencode(params)
        headers = self._redirect(location)
        https = request.scheme == "https"
        attributes = settings.cookie_attributes
        pending = [name for name in cookies if name.startswith(self._login_prefix)]
        if len(pending) >= MAX_PENDING_LOGINS:  # a bound on the cookies a browser collects
            for name in pending:
                expired = attributes.expire(name, https=https, path=settings.redirect_path)
                headers.add("Set-Cookie", expired)
        stored = names_of(cookies, settings.cookie)
        for name in stored:  # a session that is no longer good
            headers.add("Set-Cookie", attributes.expire(name, https=https))
        login = {
            "s": state,
            "n": nonce,
            "v": verifier,
            "r": _return_path(request),
            "e": int(self.now() + settings.login_timeout_s),
        }
        value = self._sealer.seal(login_purpose(settings.cookie, state), login)
        headers.add(
            "Set-Cookie",
            attributes.set_cookie(
                self._login_cookie(state),
                value,
                int(settings.login_timeout_s),
                https=https,
                path=settings.redirect_path,
            ),
        )
        return Response(302, headers, Body.from_bytes(b""))

    async def _callback(self, request: Request) -> Response:
        """The provider's redirect back: check the state, exchange the code, make the
        session (see the module doc)."""
        settings = self.settings
        params = _query(request.query)
        state = params.get("state", "")
        cookies = parse_cookies(request.headers.getall("cookie", ()))
        login = None
        if _STATE_RE.fullmatch(state):
            sealed = cookies.get(self._login_cookie(state))
            if sealed is not None:
                login = self._sealer.open(login_purpose(settings.cookie, state), sealed)
        if (
            login is None
            or not isinstance(login.get("s"), str)
            or not secrets.compare_digest(login["s"], state)
            or not isinstance(login.get("e"), int)
            or self.now() >= login["e"]
        ):
            count_auth_failure(self.name, "state_mismatch")
            raise OidcStateMismatch("no login in progress in this browser has this state")
        if "error" in params:
            count_auth_failure(self.name, "login_denied")
            description = params.get("error_description", "")
            raise OidcLoginDenied(
                _printable(f"the provider answered {params['error']}: {description}")
            )
        issuer = params.get("iss")
        if issuer is not None and issuer != settings.issuer:  # RFC 9207 (mix-up attacks)
            count_auth_failure(self.name, "bad_token_answer")
            raise OidcBadResponse(_printable(f"the callback names issuer {issuer!r}"))
        code = params.get("code", "")
        if not code:
            raise BadRequest("the callback has no code")
        verifier, nonce, back = login.get("v"), login.get("n"), login.get("r")
        if not isinstance(verifier, str) or not isinstance(nonce, str) or not isinstance(back, str):
            raise OidcStateMismatch("the login cookie is not one of ours")
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self._redirect_uri(request),
            "code_verifier": verifier,
        }
        try:
            tokens = await self.provider.token_request(form)
            session = await self.sessions.new_session(tokens, nonce)
        except ProviderUnavailable as exc:
            count_auth_failure(self.name, "unavailable")
            raise OidcProviderUnavailable(str(exc)) from None
        except TokenRequestRefused as exc:
            count_auth_failure(self.name, "code_refused")
            raise OidcBadResponse(_printable(f"the provider refused the code: {exc}")) from None
        except (ProviderBadAnswer, TokenRefused) as exc:
            count_auth_failure(self.name, "bad_token_answer")
            raise OidcBadResponse(_printable(f"the token answer: {exc}")) from None
        headers = self._redirect(_safe_path(back))
        for cookie in self._session_cookies(session, cookies, request):
            headers.add("Set-Cookie", cookie)
        https = request.scheme == "https"
        headers.add(
            "Set-Cookie",
            settings.cookie_attributes.expire(
                self._login_cookie(state), https=https, path=settings.redirect_path
            ),
        )
        count_oidc_session(self.name, "login")
        return Response(302, headers, Body.from_bytes(b""))

    async def _logout(self, request: Request) -> Response:
        """Clear the session's cookies; on to the provider's end_session_endpoint."""
        settings = self.settings
        cookies = parse_cookies(request.headers.getall("cookie", ()))
        stored = join(cookies, settings.cookie)
        session = open_session(self._sealer, settings.cookie, stored) if stored else None
        after = settings.post_logout_redirect_uri
        if after.startswith("/"):
            after = f"{_origin(request)}{after}"
        try:
            end_session = (await self.provider.metadata()).end_session_endpoint
        except ProviderUnavailable:
            end_session = None  # (the cookies go all the same)
        if end_session:
            params = [("client_id", settings.client_id)]
            if session is not None and session.id_token:
                params.append(("id_token_hint", session.id_token))
            if after:
                params.append(("post_logout_redirect_uri", after))
            location = end_session + ("&" if "?" in end_session else "?") + urlencode(params)
        else:
            location = after or "/"
        headers = self._redirect(location)
        https = request.scheme == "https"
        for name in names_of(cookies, settings.cookie):
            headers.add("Set-Cookie", settings.cookie_attributes.expire(name, https=https))
        if session is not None:
            count_oidc_session(self.name, "logout")
        return Response(302, headers, Body.from_bytes(b""))

    def _session_cookies(
        self, session: Session, cookies: dict[str, str], request: Request
    ) -> list[str]:
        """Set-Cookie values that store `session`, and remove the chunks of the stored
        one that it does not use.

        Raises:
            OidcSessionTooLarge: it does not fit in `cookie_max_size`.
        """
        settings = self.settings
        try:
            chunks, _ = encode_session(
                self._sealer, settings.cookie, session, settings.cookie_max_bytes
            )
        except SessionTooLarge as exc:
            count_auth_failure(self.name, "session_too_large")
            raise OidcSessionTooLarge(str(exc)) from None
        max_age = math.ceil(session.ends - self.now())  # (the session's end decides)
        attributes = settings.cookie_attributes
        https = request.scheme == "https"
        values = [
            attributes.set_cookie(name, value, max_age, https=https) for name, value in chunks
        ]
        written = {name for name, _ in chunks}
        for name in names_of(cookies, settings.cookie):
            if name not in written:
                values.append(attributes.expire(name, https=https))
        return values

    def _login_cookie(self, state: str) -> str:
        return self._login_prefix + state[:_STATE_NAME_CHARS]

    def _redirect_uri(self, request: Request) -> str:
        settings = self.settings
        return (settings.redirect_origin or _origin(request)) + settings.redirect_path

    @staticmethod
    def _redirect(location: str) -> CIMultiDict[str]:
        return CIMultiDict([("Location", location), ("Cache-Control", "no-store")])

    # -- api mode -----------------------------------------------------------------------
    async def _api(self, request: Request, call_next: Handler) -> Response:
        headers = request.headers
        token = bearer_token(headers.get("authorization"))
        if not token:
            count_auth_failure(self.name, "missing")
            raise Unauthorized(self._missing_challenge, "missing bearer token")
        try:
            _, access_verifier = await self.sessions.verifiers()
            claims = await access_verifier.verify(token)
            _set_claims(headers, self.settings.forward_claims, claims)
        except ProviderUnavailable as exc:
            count_auth_failure(self.name, "unavailable")
            raise OidcProviderUnavailable(str(exc)) from None
        except TokenRefused as refused:
            count_auth_failure(self.name, refused.reason)
            challenge = invalid_token_challenge(self.settings.realm, refused.description)
            raise Unauthorized(challenge, refused.description) from None
        consumer = consumer_of(claims, self.settings.consumer_claim)
        if consumer:
            request.consumer = consumer
        return await call_next(request)


def _set_claims(
    headers: CIMultiDict[str], forwarded: tuple[tuple[str, str], ...], claims: dict[str, object]
) -> None:
    """Replace the forwarded headers by the claims' values.

    Raises:
        TokenRefused: a claim that cannot be a header value.
    """
    for claim, header in forwarded:
        headers.popall(header, None)  # a client-sent copy is never forwarded
        value = claims.get(claim)
        if value is not None:
            headers[header] = claim_header_value(claim, value)


def _is_navigation(request: Request) -> bool:
    """A browser loading a page (Fetch metadata, or a GET or HEAD that takes HTML)."""
    mode = request.header("sec-fetch-mode")
    if mode is not None:
        return mode == "navigate"
    if request.method not in ("GET", "HEAD"):
        return False
    return "text/html" in (request.header("accept") or "")


def _origin(request: Request) -> str:
    return f"{request.scheme}://{request.host}"


def _return_path(request: Request) -> str:
    """Where the browser goes back to after logging in: the request's own path and query."""
    target = request.target.decode("latin-1")
    return _safe_path(target)


def _safe_path(path: str) -> str:
    """`path` if it stays on this origin (an absolute path, not `//host` or `/\\host`,
    which browsers read as another origin), else `/`."""
    if not path.startswith("/") or path[1:2] in ("/", "\\") or CONTROL_RE.search(path):
        return "/"
    return path


def _query(query: str) -> dict[str, str]:
    """A callback's query parameters (the first of a repeated name; a bounded number)."""
    params: dict[str, str] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, max_num_fields=_MAX_CALLBACK_FIELDS)
    except ValueError:
        raise BadRequest("too many parameters in the callback") from None
    for name, value in pairs:
        params.setdefault(name, value)
    return params


def _printable(text: str) -> str:
    """Text from the provider, safe for a message: control characters removed, bounded."""
    return CONTROL_RE.sub("", text)[:_MAX_ERROR_CHARS]
