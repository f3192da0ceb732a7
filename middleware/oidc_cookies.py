"""The `oidc` middleware's cookies: sealed (encrypted and authenticated), split into
several cookies when long, bounded in total, and the session they carry.

- **Sealing.** A value is JSON, encrypted with AES-256-GCM (`cryptography`), whose tag
  authenticates it: a cookie that was changed, cut, or made by anyone without the key does
  not open. The key is derived (HKDF-SHA256) from a configured secret of at least 32
  bytes; with several secrets the first seals and every one opens, so a secret is rotated
  by putting the new one first and dropping the old one a session lifetime later. The
  additional data of each seal says what the value is for (`session:NAME`,
  `login:NAME:STATE`), so a value sealed for one purpose never opens as another.
  A sealed value is `base64url(version, 12-byte nonce, ciphertext and tag)`: cookie-safe.
- **Chunks.** Browsers keep at most 4096 bytes per cookie (RFC 6265 section 6.1). A value
  longer than CHUNK_BYTES goes in `NAME.0`, `NAME.1`, ... and is joined again in that
  order; the total is capped by the middleware's `cookie_max_size`.
- **The session** holds the subject, the claims the middleware forwards, when it started
  and ends, when its tokens expire, and the tokens kept (the ID token for logout, the
  refresh token to renew, the access token when it is forwarded).

Nothing here runs I/O; the middleware (middleware/oidc.py) reads and writes the headers.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MIN_SECRET_BYTES = 32
CHUNK_BYTES = 3800  # of one cookie's value: with its name and attributes, under 4096
MAX_CHUNKS = 16  # chunks read back at most, whatever the cap (a bound on the work)
_VERSION = 1
_NONCE_BYTES = 12
_HKDF_SALT = b"gatehouse oidc cookie"
# A sealed value: base64url without padding.
_SEALED_RE = re.compile(r"[A-Za-z0-9_-]+")


class CookieSealer:
    """Seals and opens cookie values with the keys derived from `secrets` (the first
    seals; each opens). Raises ValueError for a secret shorter than MIN_SECRET_BYTES."""

    def __init__(self, secrets: Sequence[bytes]) -> None:
        if not secrets:
            raise ValueError("at least one secret is needed")
        ciphers = []
        for secret in secrets:
            if len(secret) < MIN_SECRET_BYTES:
                raise ValueError(
                    f"a cookie secret is {len(secret)} bytes; "
                    f"at least {MIN_SECRET_BYTES} are needed"
                )
            key = HKDF(hashes.SHA256(), 32, _HKDF_SALT, b"aes-256-gcm").derive(secret)
            ciphers.append(AESGCM(key))
        self._ciphers = tuple(ciphers)

    def seal(self, purpose: str, payload: Mapping[str, Any]) -> str:
        """`payload` as a sealed cookie value for `purpose`."""
        data = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._ciphers[0].encrypt(nonce, data, purpose.encode("utf-8"))
        blob = bytes((_VERSION,)) + nonce + sealed
        return base64.urlsafe_b64encode(blob).rstrip(b"=").decode("ascii")

    def open(self, purpose: str, value: str) -> dict[str, Any] | None:
        """The payload sealed in `value` for `purpose`; None when it is not one of ours (not
        base64url, another version, changed, sealed for another purpose or with a key we
        no longer have, or not a JSON object)."""
        if not _SEALED_RE.fullmatch(value):
            return None
        try:
            blob = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        except (ValueError, binascii.Error):
            return None
        if len(blob) < 1 + _NONCE_BYTES + 16 or blob[0] != _VERSION:
            return None
        nonce, sealed = blob[1 : 1 + _NONCE_BYTES], blob[1 + _NONCE_BYTES :]
        aad = purpose.encode("utf-8")
        for cipher in self._ciphers:
            try:
                data = cipher.decrypt(nonce, sealed, aad)
            except InvalidTag:
                continue
            try:
                payload = json.loads(data)
            except (ValueError, RecursionError):
                return None
            return payload if isinstance(payload, dict) else None
        return None


# -- chunks ------------------------------------------------------------------------------
def split(name: str, value: str, chunk_bytes: int = CHUNK_BYTES) -> list[tuple[str, str]]:
    """The cookies that carry `value`: `name` alone when it fits in one, else `name.0`,
    `name.1`, ..."""
    if len(value) <= chunk_bytes:
        return [(name, value)]
    return [
        (f"{name}.{index}", value[start : start + chunk_bytes])
        for index, start in enumerate(range(0, len(value), chunk_bytes))
    ]


def join(cookies: Mapping[str, str], name: str) -> str | None:
    """The value `split` spread over the request's cookies (None when there is none).
    `name` alone wins over chunks; chunks are read from `name.0` while they follow on,
    at most MAX_CHUNKS of them."""
    whole = cookies.get(name)
    if whole is not None:
        return whole
    parts: list[str] = []
    for index in range(MAX_CHUNKS):
        part = cookies.get(f"{name}.{index}")
        if part is None:
            break
        parts.append(part)
    return "".join(parts) if parts else None


def names_of(cookies: Iterable[str], name: str) -> list[str]:
    """The cookies among `cookies` that belong to `name`: itself and its chunks."""
    prefix = f"{name}."
    return [
        cookie
        for cookie in cookies
        if cookie == name or (cookie.startswith(prefix) and cookie[len(prefix) :].isdigit())
    ]


def parse_cookies(lines: Iterable[str]) -> dict[str, str]:
    """The name=value pairs of Cookie header lines (the first of a name wins: RFC 6265
    section 5.4 sends the most specific first). Quotes around a value are removed."""
    cookies: dict[str, str] = {}
    for line in lines:
        for pair in line.split(";"):
            name, sep, value = pair.strip().partition("=")
            if not sep or not name:
                continue
            value = value.strip()
            if len(value) > 1 and value[0] == value[-1] == '"':
                value = value[1:-1]
            cookies.setdefault(name.strip(), value)
    return cookies


@dataclass(frozen=True, slots=True)
class CookieAttributes:
    """The attributes every cookie of one middleware carries (`secure` None: when the
    request came over https)."""

    path: str = "/"
    domain: str | None = None
    secure: bool | None = None
    same_site: str = "Lax"

    def set_cookie(
        self, name: str, value: str, max_age: int, *, https: bool, path: str = ""
    ) -> str:
        """A Set-Cookie value; HttpOnly always (no script reads it)."""
        parts = [f"{name}={value}", f"Path={path or self.path}", f"Max-Age={max(max_age, 0)}"]
        if self.domain:
            parts.append(f"Domain={self.domain}")
        if self.secure or (self.secure is None and https):
            parts.append("Secure")
        parts += ["HttpOnly", f"SameSite={self.same_site}"]
        return "; ".join(parts)

    def expire(self, name: str, *, https: bool, path: str = "") -> str:
        """A Set-Cookie value that removes cookie `name`."""
        return self.set_cookie(name, "", 0, https=https, path=path) + (
            "; Expires=Thu, 01 Jan 1970 00:00:00 GMT"
        )


# -- the session -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Session:
    """One logged-in browser: times are Unix seconds."""

    subject: str
    started: float
    ends: float  # the session lifetime: after this, log in again whatever the tokens say
    expires: float  # the tokens': renew with the refresh token (or log in again) after this
    claims: dict[str, Any] = field(default_factory=dict)  # the ones forwarded, by name
    id_token: str = ""
    refresh_token: str = ""
    access_token: str = ""

    def payload(self) -> dict[str, Any]:
        """The JSON object sealed into the cookie (short keys: it travels with every
        request)."""
        payload: dict[str, Any] = {
            "sub": self.subject,
            "st": round(self.started, 3),
            "end": round(self.ends, 3),
            "exp": round(self.expires, 3),
            "c": self.claims,
        }
        for key, token in (("it", self.id_token), ("rt", self.refresh_token)):
            if token:
                payload[key] = token
        if self.access_token:
            payload["at"] = self.access_token
        return payload

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> Session | None:
        """The session a payload holds; None when it is not one (another shape)."""
        subject, claims = payload.get("sub"), payload.get("c", {})
        times = [payload.get(key) for key in ("st", "end", "exp")]
        tokens = [payload.get(key, "") for key in ("it", "rt", "at")]
        if not isinstance(subject, str) or not isinstance(claims, dict):
            return None
        if not all(isinstance(t, int | float) and not isinstance(t, bool) for t in times):
            return None
        if not all(isinstance(token, str) for token in tokens):
            return None
        started, ends, expires = (float(t) for t in times if isinstance(t, int | float))
        id_token, refresh_token, access_token = (str(token) for token in tokens)
        return cls(subject, started, ends, expires, claims, id_token, refresh_token, access_token)


class SessionTooLarge(Exception):
    """The session does not fit in the cookies allowed, even without its ID token."""


def encode_session(
    sealer: CookieSealer, name: str, session: Session, max_bytes: int
) -> tuple[list[tuple[str, str]], Session]:
    """The cookies that carry `session` (at most `max_bytes` of values in all), and the
    session as stored: when it does not fit, the ID token is left out first (logout then
    goes without `id_token_hint`).

    Raises:
        SessionTooLarge: it does not fit even so.
    """
    purpose = session_purpose(name)
    sealed = sealer.seal(purpose, session.payload())
    if len(sealed) > max_bytes and session.id_token:
        session = replace(session, id_token="")
        sealed = sealer.seal(purpose, session.payload())
    if len(sealed) > max_bytes:
        raise SessionTooLarge(
            f"the session is {len(sealed)} bytes sealed, over cookie_max_size ({max_bytes})"
        )
    return split(name, sealed), session


def open_session(sealer: CookieSealer, name: str, value: str) -> Session | None:
    """The session in the sealed value of cookie `name` (`join`ed); None when it is not
    a valid one."""
    payload = sealer.open(session_purpose(name), value)
    return Session.from_payload(payload) if payload is not None else None


def session_purpose(name: str) -> str:
    """The additional data a session cookie `name` is sealed with."""
    return f"session:{name}"


def login_purpose(name: str, state: str) -> str:
    """The additional data the cookie of the login with this `state` is sealed with."""
    return f"login:{name}:{state}"
