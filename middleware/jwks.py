"""The keys of the `jwt` middleware: PEM public keys, and a JSON Web Key Set (RFC 7517)
fetched over the gateway's own event loop, turned into verification keys and kept fresh.

The fetch is one GET through the gateway's own HTTP client (proxy/upstream/fetch.py: the
upstream codec, transport and TLS; TLS for https): a connection of its own with
`Connection: close`, a timeout on the whole exchange, a 200 required (redirects are not
followed), a size cap on the body. It runs on the gateway's loop, so it needs no thread
and is cancelled cleanly at shutdown.

`JwksCache` holds the last good key set. A background task refreshes it every
`refresh_s`; a token with an unknown `kid` may trigger one more refresh, but at most one
per `min_refresh_s` (a flood of made-up kids costs a dictionary lookup each, never a
fetch), and its request waits for that refresh at most `wait_s`. A failed refresh keeps
the cached keys: an identity provider that is down never blocks tokens whose key we
already have.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt import PyJWK
from jwt.exceptions import PyJWTError

from metrics.definitions import count_jwks_refresh
from proxy import (
    ConfigValueError,
    FetchUrl,
    ProxyError,
    UpstreamConnectTimeout,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from proxy import fetch as http_fetch

log = logging.getLogger(__name__)

JWKS_MAX_BYTES = 1024 * 1024  # a key set is a few KiB; anything this big is not one
JWKS_MAX_KEYS = 100  # keys past this are ignored (each kid-less token may try them all)
FAILED_RETRY_MIN_S = 1.0  # the background task never retries faster than this
RSA_MIN_BITS = 2048  # NIST SP 800-131A; PyJWT refuses smaller keys too

RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC_CURVE_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC_ALGORITHMS = RSA_ALGORITHMS | set(EC_CURVE_ALGORITHMS.values()) | {"EdDSA"}
SUPPORTED_ALGORITHMS = HMAC_ALGORITHMS | ASYMMETRIC_ALGORITHMS
_PRIVATE_KEY_TYPES = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """A public key and the algorithms it may verify (a JWK's `alg` narrows them)."""

    kid: str | None
    key: Any  # a cryptography public key object, as PyJWT's algorithms accept it
    algorithms: frozenset[str]


def key_algorithms(key: Any) -> frozenset[str]:
    """The supported algorithms a public key can verify (empty: none of ours)."""
    if isinstance(key, rsa.RSAPublicKey):
        return RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        algorithm = EC_CURVE_ALGORITHMS.get(key.curve.name)
        return frozenset({algorithm}) if algorithm else frozenset()
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return frozenset({"EdDSA"})
    return frozenset()


def key_problem(key: Any) -> str | None:
    """Why `key` must not be used (too short), or None."""
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < RSA_MIN_BITS:
        return f"the RSA key has {key.key_size} bits, fewer than {RSA_MIN_BITS}"
    return None


def describe_key(key: Any) -> str:
    """`an RSA key`, `a P-256 key`... for error messages."""
    if isinstance(key, rsa.RSAPublicKey):
        return f"an RSA key ({key.key_size} bits)"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"an EC key on {key.curve.name}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "an Ed25519 key"
    if isinstance(key, ed448.Ed448PublicKey):
        return "an Ed448 key"
    return f"a {type(key).__name__}"


def load_pem(data: bytes, where: str) -> VerifyKey:
    """A PEM public key or certificate (`where` names it in errors).

    Raises:
        ValueError: a private key, not PEM, a key type we cannot use, a short RSA key.
    """
    if b"PRIVATE KEY" in data:
        raise ValueError(f"{where} holds a private key: give the public key (or certificate)")
    try:
        public: Any = load_pem_public_key(data)
    except (ValueError, TypeError):
        try:
            public = x509.load_pem_x509_certificate(data).public_key()
        except (ValueError, TypeError):
            raise ValueError(f"{where} is not a PEM public key or certificate") from None
    algorithms = key_algorithms(public)
    if not algorithms:
        raise ValueError(f"{where} is {describe_key(public)}, which verifies none of ours")
    problem = key_problem(public)
    if problem:
        raise ValueError(f"{where}: {problem}")
    return VerifyKey(None, public, algorithms)


# -- the key set ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class KeySet:
    """A parsed JWKS: keys by kid, and all of them in document order."""

    by_kid: dict[str, tuple[VerifyKey, ...]]
    all: tuple[VerifyKey, ...]
    skipped: tuple[str, ...] = ()  # why each unusable entry was left out


EMPTY_KEY_SET = KeySet({}, ())


class JwksError(Exception):
    """A fetch or parse failed; `result` is its `gatehouse_jwks_refreshes_total` label."""

    def __init__(self, result: str, message: str) -> None:
        super().__init__(message)
        self.result = result


def parse_jwks(data: bytes) -> KeySet:
    """The usable signing keys of a JWKS document.

    Entries that are not for signing (`use` other than `sig`), of a type or algorithm we
    do not verify with, or broken, are skipped (and listed in `skipped`).

    Raises:
        JwksError: not JSON, or no `keys` list (result `invalid`).
    """
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise JwksError("invalid", f"not JSON: {exc}") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise JwksError("invalid", "not a JWKS: no 'keys' list")
    by_kid: dict[str, list[VerifyKey]] = {}
    keys: list[VerifyKey] = []
    skipped: list[str] = []
    for index, entry in enumerate(entries):
        if len(keys) >= JWKS_MAX_KEYS:
            skipped.append(f"keys[{index}:]: more than {JWKS_MAX_KEYS} keys")
            break
        try:
            key = _verify_key(entry)
        except ValueError as exc:
            skipped.append(f"keys[{index}]: {exc}")
            continue
        keys.append(key)
        if key.kid is not None:
            by_kid.setdefault(key.kid, []).append(key)
    return KeySet({kid: tuple(v) for kid, v in by_kid.items()}, tuple(keys), tuple(skipped))


def _verify_key(entry: object) -> VerifyKey:
    if not isinstance(entry, dict):
        raise ValueError("not an object")
    kid = entry.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ValueError("'kid' is not a string")
    use = entry.get("use")
    if use is not None and use != "sig":
        raise ValueError(f"'use' is {use!r}, not 'sig'")
    if entry.get("kty") not in ("RSA", "EC", "OKP"):
        raise ValueError(f"key type {entry.get('kty')!r} is not RSA, EC or OKP")
    alg = entry.get("alg")
    if alg is not None and alg not in ASYMMETRIC_ALGORITHMS:
        raise ValueError(f"algorithm {alg!r} is not supported")
    try:
        key = PyJWK(entry).key
    except (PyJWTError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"unusable key: {exc}") from None
    if isinstance(key, _PRIVATE_KEY_TYPES):  # a private JWK: only its public half is used
        key = key.public_key()
    algorithms = key_algorithms(key)
    if alg is not None:
        algorithms &= {alg}
    if not algorithms:
        raise ValueError(f"{describe_key(key)} cannot verify {alg or 'any supported algorithm'}")
    problem = key_problem(key)
    if problem:
        raise ValueError(problem)
    return VerifyKey(kid, key, algorithms)


# -- the fetch --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class JwksUrl:
    """A `jwks_url`, split once at load."""

    url: str
    tls: bool
    host: str  # to connect to (no brackets around IPv6)
    port: int
    authority: str  # the Host header
    target: str  # path and query

    def fetch_url(self) -> FetchUrl:
        """Where the HTTP client sends the GET.

        Raises:
            ValueError: the path is not ASCII (it must be percent-encoded).
        """
        scheme = "https" if self.tls else "http"
        return FetchUrl(scheme, self.host, self.port, self.target.encode("ascii"), self.authority)


def parse_jwks_url(value: str) -> JwksUrl:
    """Split an http(s) URL.

    Raises:
        ConfigValueError: another scheme, no host, credentials in the URL, a bad port.
    """
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ConfigValueError(f"expected an http or https URL, got {value!r}")
    if parts.username is not None or parts.password is not None:
        raise ConfigValueError(f"{value!r}: credentials in the URL are not supported")
    try:
        port = parts.port
    except ValueError:
        raise ConfigValueError(f"{value!r}: the port is not a number from 0 to 65535") from None
    if not parts.hostname:
        raise ConfigValueError(f"{value!r} has no host")
    tls = parts.scheme == "https"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return JwksUrl(value, tls, parts.hostname, port or (443 if tls else 80), parts.netloc, target)


_REQUEST_HEADERS = (
    ("Accept", "application/json, application/jwk-set+json"),
    ("User-Agent", "gatehouse-jwks"),
)


async def fetch(url: JwksUrl, timeout_s: float, ssl_context: ssl.SSLContext | None) -> bytes:
    """GET `url` and return the body of its 200 response (`ssl_context`: for an https
    url, the system's trust store when None).

    Raises:
        JwksError: `timeout` (the whole exchange took over `timeout_s`), `unreachable`
            (connect, TLS or a broken connection), `bad_status` (not 200, or not HTTP),
            `invalid` (a body over JWKS_MAX_BYTES).
    """
    try:
        answer = await http_fetch(
            "GET",
            url.fetch_url(),
            _REQUEST_HEADERS,
            timeout_s=timeout_s,
            max_body=JWKS_MAX_BYTES,
            tls=ssl_context,
        )
    except (UpstreamTimeout, UpstreamConnectTimeout):
        raise JwksError("timeout", f"no answer within {timeout_s:g}s") from None
    except UpstreamProtocolError as exc:
        raise JwksError("bad_status", f"not an HTTP response: {exc.message}") from None
    except ProxyError as exc:  # refused, unreachable, TLS refused, reset
        raise JwksError("unreachable", exc.message) from None
    except ValueError as exc:  # a path the request line cannot carry
        raise JwksError("bad_status", f"cannot send the request: {exc}") from None
    if answer.status != 200:
        raise JwksError("bad_status", f"HTTP {answer.status}")
    if answer.body is None:
        raise JwksError("invalid", f"larger than {JWKS_MAX_BYTES} bytes")
    return answer.body


# -- the cache --------------------------------------------------------------------------
class JwksState(enum.Enum):
    """What the cached key set is."""

    EMPTY = "empty"  # no fetch has succeeded yet
    CURRENT = "current"  # the last fetch succeeded
    STALE = "stale"  # the last fetch failed: the keys of an earlier one are kept
    CLOSED = "closed"


class JwksCache:
    """The keys of one `jwks_url`, kept fresh on the event loop (see the module doc).

    `find` and `candidates` are synchronous and never wait; `refresh_for_unknown` is the
    only place a request can wait, for at most `wait_s`.
    """

    def __init__(
        self,
        url: JwksUrl,
        *,
        name: str,
        refresh_s: float,
        min_refresh_s: float,
        timeout_s: float,
        wait_s: float,
        ssl_context: ssl.SSLContext | None = None,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.name = name  # the middleware instance: metrics label, log name
        self.refresh_s = refresh_s
        self.min_refresh_s = min_refresh_s
        self.timeout_s = timeout_s
        self.wait_s = wait_s
        self.ssl_context = ssl_context
        self.now = now
        self.state = JwksState.EMPTY
        self.fetches = 0  # attempts, for tests and repr
        self._keys = EMPTY_KEY_SET
        self._last_attempt: float | None = None
        self._fetch: asyncio.Task[bool] | None = None  # the refresh in flight
        self._refresher: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return (
            f"<JwksCache {self.url.url} {self.state.name} keys={len(self._keys.all)} "
            f"fetches={self.fetches}>"
        )

    # -- lookups (synchronous) ------------------------------------------------------------
    def find(self, kid: str) -> tuple[VerifyKey, ...]:
        """The cached keys with this kid (usually one; empty when unknown)."""
        return self._keys.by_kid.get(kid, ())

    def candidates(self, algorithm: str) -> tuple[VerifyKey, ...]:
        """Every cached key that can verify `algorithm` (for tokens without a kid)."""
        return tuple(key for key in self._keys.all if algorithm in key.algorithms)

    # -- refreshing -----------------------------------------------------------------------
    async def start(self) -> None:
        """Start the background refresher; its first fetch begins at once (the caller
        does not wait for it: requests that need a key wait for it, bounded)."""
        if self._refresher is None and self.state is not JwksState.CLOSED:
            self._refresher = asyncio.get_running_loop().create_task(
                self._refresh_forever(), name=f"jwks refresh {self.name}"
            )

    async def aclose(self) -> None:
        """Stop the refresher and any fetch in flight."""
        self.state = JwksState.CLOSED
        tasks = [task for task in (self._refresher, self._fetch) if task is not None]
        self._refresher = self._fetch = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def refresh_for_unknown(self) -> bool:
        """A token names a key we do not have: join the refresh in flight, or start one
        if none ran in the last `min_refresh_s`, and wait for it at most `wait_s`.
        True when a refresh finished successfully in that time (look the key up again).
        """
        task = self._fetch
        if task is None:
            last = self._last_attempt
            if self.state is JwksState.CLOSED or (
                last is not None and self.now() - last < self.min_refresh_s
            ):
                return False  # rate limited: answer from the cache alone
            task = self._start_fetch()
        done, _ = await asyncio.wait((task,), timeout=self.wait_s)
        return bool(done) and not task.cancelled() and task.result()

    async def refresh_now(self) -> bool:
        """Refresh at once (joining the refresh in flight), whatever the rate limit; True
        when it succeeded. The background task's step; also for tests and operators."""
        if self.state is JwksState.CLOSED:
            return False
        return await asyncio.shield(self._fetch or self._start_fetch())

    def _start_fetch(self) -> asyncio.Task[bool]:
        self._last_attempt = self.now()
        task = asyncio.get_running_loop().create_task(self._refresh_once())
        self._fetch = task
        return task

    async def _refresh_forever(self) -> None:
        while True:
            if await self.refresh_now():
                delay = self.refresh_s
            else:
                delay = min(self.refresh_s, max(self.min_refresh_s, FAILED_RETRY_MIN_S))
            await asyncio.sleep(delay)

    async def _refresh_once(self) -> bool:
        self.fetches += 1
        try:
            data = await fetch(self.url, self.timeout_s, self.ssl_context)
            keys = parse_jwks(data)
        except JwksError as exc:
            result, message = exc.result, str(exc)
        except Exception as exc:  # a bug: keep the old keys and say so
            log.exception("%s: JWKS refresh from %s failed", self.name, self.url.url)
            result, message = "error", f"{type(exc).__name__}: {exc}"
        else:
            self._keys = keys
            if self.state is not JwksState.CLOSED:
                self.state = JwksState.CURRENT
            count_jwks_refresh(self.name, "ok")
            for reason in keys.skipped:
                log.warning("%s: JWKS %s: skipped %s", self.name, self.url.url, reason)
            log.debug("%s: JWKS %s: %d keys", self.name, self.url.url, len(keys.all))
            return True
        finally:
            if self._fetch is asyncio.current_task():
                self._fetch = None
        if self.state is JwksState.CURRENT:
            self.state = JwksState.STALE
        count_jwks_refresh(self.name, result)
        log.warning(
            "%s: JWKS refresh from %s failed (%s): %s; keeping %d cached keys",
            *(self.name, self.url.url, result, message, len(self._keys.all)),
        )
        return False
