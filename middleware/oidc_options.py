"""The `oidc` middleware's options: the key table and its reading at config load, into
one frozen `OidcSettings` (middleware/oidc.py uses it; nothing here runs per request).

Secrets come as values (`${VAR}` substituted, hidden in /config by their names) or from
files read at load: `client_secret_file` (its first line) and `cookie_secret_file` (one
secret per line, the first sealing, as `cookie_secret`'s list does).
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from typing import ClassVar
from urllib.parse import urlsplit

from middleware.jwks import ASYMMETRIC_ALGORITHMS
from middleware.jwt_verify import TOKEN_RE, forward_claims
from middleware.oidc_cookies import CHUNK_BYTES, MIN_SECRET_BYTES, CookieAttributes
from proxy import Option, Options, ca_bundle_problem, tls_context

DEFAULT_COOKIE = "gatehouse_oidc"
DEFAULT_REDIRECT = "/oidc/callback"
DEFAULT_LOGOUT = "/oidc/logout"
DEFAULT_REALM = "gatehouse"
DEFAULT_COOKIE_MAX_BYTES = 8 * 1024  # all the session's cookies: a Cookie header nginx takes
DEFAULT_SESSION_LIFETIME_S = 24 * 3600.0
DEFAULT_LOGIN_TIMEOUT_S = 600.0
DEFAULT_LEEWAY_S = 30.0
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_DISCOVERY_REFRESH_S = 3600.0
DEFAULT_JWKS_REFRESH_S = 300.0
DEFAULT_JWKS_MIN_REFRESH_S = 30.0
AUTH_METHODS = ("client_secret_basic", "client_secret_post", "none")
# Authorization request parameters the middleware writes itself.
_OWN_PARAMETERS = frozenset(
    {
        "response_type",
        "client_id",
        "redirect_uri",
        "scope",
        "state",
        "nonce",
        "code_challenge",
        "code_challenge_method",
    }
)
# A quoted-string in a challenge without escapes (RFC 6750 section 3).
_QUOTABLE_RE = re.compile(r"[ !#-\[\]-~]*")
# A path the gateway serves itself: absolute, no query, nothing to escape.
_PATH_RE = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*")


@dataclass(frozen=True, slots=True)
class OidcSettings:
    """Everything the options say, checked."""

    mode: str  # "login" or "api"
    issuer: str
    client_id: str
    client_secret: str
    auth_method: str
    scopes: tuple[str, ...]
    auth_params: tuple[tuple[str, str], ...]
    redirect_origin: str  # "" when `redirect_uri` is a path: the request's origin then
    redirect_path: str
    logout_path: str
    post_logout_redirect_uri: str  # a URL, a path (on the request's origin), or ""
    cookie: str
    cookie_secrets: tuple[bytes, ...]
    cookie_attributes: CookieAttributes
    cookie_max_bytes: int
    session_lifetime_s: float
    login_timeout_s: float
    forward_claims: tuple[tuple[str, str], ...]
    consumer_claim: str
    forward_access_token: bool
    audience: tuple[str, ...]
    algorithms: frozenset[str]  # empty: the provider's (discovery)
    leeway_s: float
    timeout_s: float
    discovery_refresh_s: float
    jwks_refresh_s: float
    jwks_min_refresh_s: float
    ssl_context: ssl.SSLContext | None
    realm: str


OPTIONS: dict[str, Option] = {
    "issuer": Option.string(
        "the OpenID Provider's issuer URL (discovery at ISSUER/.well-known/openid-configuration)",
        required=True,
    ),
    "client_id": Option.string("the client id registered at the provider", required=True),
    "client_secret": Option.string("the client secret"),
    "client_secret_file": Option.string("a file holding the client secret"),
    "token_endpoint_auth": Option.choice(
        AUTH_METHODS, "how the client authenticates at the token endpoint", AUTH_METHODS[0]
    ),
    "mode": Option.choice(
        ("login", "api"),
        "login: browsers log in by redirect, with a session cookie; api: Bearer access tokens",
        "login",
    ),
    "scopes": Option.strings("the scopes asked for", ("openid",)),
    "auth_params": Option.string_map("more authorization request parameters (prompt, resource...)"),
    "redirect_uri": Option.string(
        "the callback: a path on the request's origin, or an absolute URL", DEFAULT_REDIRECT
    ),
    "logout_path": Option.string("the path that ends the session", DEFAULT_LOGOUT),
    "post_logout_redirect_uri": Option.string(
        "where the provider sends the browser after logout (a URL, or a path)"
    ),
    "cookie": Option.string("the session cookie's name", DEFAULT_COOKIE),
    "cookie_secret": Option.strings(
        "secrets of 32 bytes or more that seal the cookies; the first seals, all open"
    ),
    "cookie_secret_file": Option.string("a file of cookie secrets, one per line"),
    "cookie_secure": Option.choice(
        ("auto", "always", "never"), "Secure cookies: auto is when the request is https", "auto"
    ),
    "cookie_domain": Option.string("the cookies' Domain (default: the request's host only)"),
    "cookie_max_size": Option.size(
        "the most the session's cookies may hold together", DEFAULT_COOKIE_MAX_BYTES, positive=True
    ),
    "session_lifetime": Option.duration(
        "after this the browser logs in again", DEFAULT_SESSION_LIFETIME_S, positive=True
    ),
    "login_timeout": Option.duration(
        "how long a login may take at the provider", DEFAULT_LOGIN_TIMEOUT_S, positive=True
    ),
    "forward_claims": Option.string_map("ID token (or access token) claims sent upstream"),
    "consumer_claim": Option.string("the claim that names the consumer", "sub"),
    "forward_access_token": Option.boolean(
        "login mode: send the access token upstream as Authorization: Bearer", False
    ),
    "audience": Option.strings("api mode: accepted aud values of access tokens (required)", ()),
    "algorithms": Option.strings(
        "accepted signing algorithms (default: the provider's, of RS, PS, ES and EdDSA)"
    ),
    "leeway": Option.duration("clock skew allowed for exp, nbf and iat", DEFAULT_LEEWAY_S),
    "timeout": Option.duration(
        "each request to the provider, connect to last byte", DEFAULT_TIMEOUT_S, positive=True
    ),
    "discovery_refresh": Option.duration(
        "how often the discovery document is fetched again",
        DEFAULT_DISCOVERY_REFRESH_S,
        positive=True,
    ),
    "jwks_refresh": Option.duration(
        "how often the key set is fetched again", DEFAULT_JWKS_REFRESH_S, positive=True
    ),
    "jwks_min_refresh": Option.duration(
        "the shortest time between fetches, when a token names an unknown key",
        DEFAULT_JWKS_MIN_REFRESH_S,
    ),
    "ca_file": Option.string("PEM bundle to verify an https provider against"),
    "realm": Option.string("the realm of the WWW-Authenticate challenge", DEFAULT_REALM),
}
REQUIRED = ("issuer", "client_id")


class OptionsTable:
    """Mixed into the middleware: its key table (a class, so mypy sees ClassVars)."""

    OPTIONS: ClassVar[dict[str, Option]] = OPTIONS
    REQUIRED: ClassVar[tuple[str, ...]] = REQUIRED


def read_settings(options: Options) -> OidcSettings:
    """The options, checked (errors recorded on `options`, defaults in their place)."""
    mode = options.choice("mode", ("login", "api"), "login")
    issuer = _issuer(options)
    client_id = options.string("client_id")
    if "client_id" in options and not client_id:
        options.error("client_id", "must not be empty")
    client_secret, auth_method = _client_secret(options)
    scopes = options.strings("scopes", ("openid",))
    if mode == "login" and "openid" not in scopes:
        options.error("scopes", "must include 'openid' (an ID token is what says who logged in)")
    redirect_origin, redirect_path = _redirect_uri(options)
    logout_path = _path(options, "logout_path", DEFAULT_LOGOUT)
    if logout_path == redirect_path:
        options.error("logout_path", "must differ from the redirect_uri's path")
    post_logout = options.string("post_logout_redirect_uri")
    if post_logout and not _is_url_or_path(post_logout):
        options.error("post_logout_redirect_uri", "expected an http(s) URL or a path")
    cookie = options.string("cookie", DEFAULT_COOKIE)
    if not TOKEN_RE.fullmatch(cookie):
        options.error("cookie", f"{cookie!r} is not a valid cookie name")
    secrets = _cookie_secrets(options, required=mode == "login")
    secure = options.choice("cookie_secure", ("auto", "always", "never"), "auto")
    domain = options.optional_string("cookie_domain")
    if domain is not None and not re.fullmatch(r"[A-Za-z0-9.-]+", domain):
        options.error("cookie_domain", f"{domain!r} is not a domain name")
    max_bytes = options.size("cookie_max_size", DEFAULT_COOKIE_MAX_BYTES, positive=True)
    if max_bytes < CHUNK_BYTES:
        options.error("cookie_max_size", f"must be at least {CHUNK_BYTES} bytes (one cookie)")
    audience = options.strings("audience", ())
    if mode == "api" and not audience:
        options.error(
            "audience",
            "api mode needs the aud its access tokens carry (so that ID tokens and tokens "
            "for other APIs are refused)",
        )
    return OidcSettings(
        mode=mode,
        issuer=issuer,
        client_id=client_id,
        client_secret=client_secret,
        auth_method=auth_method,
        scopes=scopes,
        auth_params=_auth_params(options),
        redirect_origin=redirect_origin,
        redirect_path=redirect_path,
        logout_path=logout_path,
        post_logout_redirect_uri=post_logout,
        cookie=cookie,
        cookie_secrets=secrets,
        cookie_attributes=CookieAttributes(
            domain=domain, secure={"auto": None, "always": True, "never": False}[secure]
        ),
        cookie_max_bytes=max_bytes,
        session_lifetime_s=options.duration(
            "session_lifetime", DEFAULT_SESSION_LIFETIME_S, positive=True
        ),
        login_timeout_s=options.duration("login_timeout", DEFAULT_LOGIN_TIMEOUT_S, positive=True),
        forward_claims=forward_claims(options),
        consumer_claim=options.string("consumer_claim", "sub"),
        forward_access_token=options.boolean("forward_access_token", False),
        audience=audience,
        algorithms=_algorithms(options),
        leeway_s=options.duration("leeway", DEFAULT_LEEWAY_S),
        timeout_s=options.duration("timeout", DEFAULT_TIMEOUT_S, positive=True),
        discovery_refresh_s=options.duration(
            "discovery_refresh", DEFAULT_DISCOVERY_REFRESH_S, positive=True
        ),
        jwks_refresh_s=options.duration("jwks_refresh", DEFAULT_JWKS_REFRESH_S, positive=True),
        jwks_min_refresh_s=options.duration("jwks_min_refresh", DEFAULT_JWKS_MIN_REFRESH_S),
        ssl_context=_ssl_context(options, issuer),
        realm=_realm(options),
    )


def _issuer(options: Options) -> str:
    issuer = options.string("issuer")
    parts = urlsplit(issuer)
    if "issuer" in options and (
        parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment
    ):
        options.error(
            "issuer", f"expected an http(s) URL without query or fragment, got {issuer!r}"
        )
    return issuer


def _read_file(options: Options, key: str) -> list[str] | None:
    path = options.string(key)
    try:
        with open(path, encoding="utf-8") as file:
            return [line.strip() for line in file.read().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        options.error(key, f"cannot read {path!r}: {getattr(exc, 'strerror', None) or exc}")
        return None


def _client_secret(options: Options) -> tuple[str, str]:
    method = options.choice("token_endpoint_auth", AUTH_METHODS, AUTH_METHODS[0])
    if "client_secret" in options and "client_secret_file" in options:
        options.error("client_secret_file", "give either 'client_secret' or 'client_secret_file'")
    secret = options.string("client_secret")
    if "client_secret_file" in options:
        lines = _read_file(options, "client_secret_file")
        secret = lines[0] if lines else ""
        if lines == []:
            options.error("client_secret_file", "the file is empty")
    given = "client_secret" in options or "client_secret_file" in options
    if method == "none" and given:
        options.error("token_endpoint_auth", "'none' is for public clients, without a secret")
    elif method != "none" and not secret and not given:
        options.error(
            "client_secret",
            f"{method} needs 'client_secret' or 'client_secret_file' "
            "(or token_endpoint_auth: none for a public client)",
        )
    return secret, method


def _is_url_or_path(value: str) -> bool:
    if _PATH_RE.fullmatch(value) and not value.startswith("//"):
        return True
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.hostname) and not parts.fragment


def _path(options: Options, key: str, default: str) -> str:
    value = options.string(key, default)
    if not _PATH_RE.fullmatch(value) or value.startswith("//"):
        options.error(key, f"expected a path like {default!r}, got {value!r}")
        return default
    return value


def _redirect_uri(options: Options) -> tuple[str, str]:
    """(origin, path) of `redirect_uri`; the origin "" when only a path is given."""
    value = options.string("redirect_uri", DEFAULT_REDIRECT)
    if value.startswith("/"):
        return "", _path(options, "redirect_uri", DEFAULT_REDIRECT)
    parts = urlsplit(value)
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.query
        or parts.fragment
        or not _PATH_RE.fullmatch(parts.path or "/")
    ):
        options.error("redirect_uri", f"expected a path or an http(s) URL, got {value!r}")
        return "", DEFAULT_REDIRECT
    return f"{parts.scheme}://{parts.netloc}", parts.path or "/"


def _cookie_secrets(options: Options, *, required: bool) -> tuple[bytes, ...]:
    listed = options.strings("cookie_secret")
    if "cookie_secret" in options and "cookie_secret_file" in options:
        options.error("cookie_secret_file", "give either 'cookie_secret' or 'cookie_secret_file'")
    key = "cookie_secret"
    if "cookie_secret_file" in options:
        key = "cookie_secret_file"
        listed = tuple(_read_file(options, key) or ())
    secrets = tuple(secret.encode("utf-8") for secret in listed)
    if not secrets:
        if required and key in options:
            options.error(key, "give at least one secret")
        elif required:
            options.error(
                "cookie_secret", "login mode needs 'cookie_secret' or 'cookie_secret_file'"
            )
        return ()
    for secret in secrets:
        if len(secret) < MIN_SECRET_BYTES:
            options.error(
                key,
                f"a secret is {len(secret)} bytes; at least {MIN_SECRET_BYTES} are needed "
                "(random ones: openssl rand -base64 32)",
            )
            return ()
    return secrets


def _auth_params(options: Options) -> tuple[tuple[str, str], ...]:
    params = options.string_map("auth_params")
    for name in params:
        if name in _OWN_PARAMETERS:
            options.error("auth_params", f"{name} is set by the middleware itself")
    return tuple((name, value) for name, value in params.items() if name not in _OWN_PARAMETERS)


def _algorithms(options: Options) -> frozenset[str]:
    names = options.strings("algorithms")
    for name in names:
        if name not in ASYMMETRIC_ALGORITHMS:
            options.error(
                "algorithms",
                f"{name!r} is not one of " + ", ".join(sorted(ASYMMETRIC_ALGORITHMS)),
            )
    if "algorithms" in options and not names:
        options.error("algorithms", "at least one algorithm is required")
    return frozenset(names) & ASYMMETRIC_ALGORITHMS


def _ssl_context(options: Options, issuer: str) -> ssl.SSLContext | None:
    ca_file = options.optional_string("ca_file")
    if ca_file is not None and (problem := ca_bundle_problem(ca_file)) is not None:
        options.error("ca_file", problem)
        return None
    if not issuer.startswith("https://"):
        if ca_file is not None:
            options.error("ca_file", "only used with an https issuer")
        return None
    try:
        # (the token and JWKS endpoints are on the same provider: one context for all)
        return tls_context(ca_file)
    except (OSError, ssl.SSLError) as exc:  # pragma: no cover - the bundle was checked
        options.error("ca_file", f"cannot load {ca_file!r}: {exc}")
        return None


def _realm(options: Options) -> str:
    value = options.string("realm", DEFAULT_REALM)
    if not _QUOTABLE_RE.fullmatch(value):
        options.error("realm", "must be printable ASCII without '\"' or '\\'")
        return DEFAULT_REALM
    return value
