"""`basic_auth`: HTTP Basic authentication (RFC 7617) against password hashes.

Users come from `users` (a `{name: hash}` mapping, or a list of htpasswd `name:hash`
lines) and `htpasswd_file` (`name:hash` lines, `#` comments), read at config load. Hash
formats: bcrypt (`$2y$`, `$2b$`, `$2a$`, as `htpasswd -B`
writes them), PBKDF2-SHA256 in passlib's format (`$pbkdf2-sha256$ROUNDS$SALT$HASH`) and
`{SHA256}` + base64 of the unsalted digest. Anything else (`$apr1$`, `{SHA}`, crypt,
plain text) is refused at load, naming the user.

Missing or refused credentials get 401 with `WWW-Authenticate: Basic realm="...",
charset="UTF-8"` and are counted in `gatehouse_auth_failures_total{middleware,reason}`
(`missing`, `invalid`). Accepted ones set `request.consumer` to the user name and send it
upstream in `consumer_header` (whatever the client sent there is removed first); the
Authorization header is removed unless `forward_authorization: true`.

bcrypt and PBKDF2 cost milliseconds of CPU by design (~100 ms for bcrypt at cost 12), so
they run on a small thread pool of this middleware's own, never on the event loop, and
not on the loop's default executor (where a flood of bad passwords would hold up DNS
lookups). A successful check is remembered for `cache_ttl` in a dict of at most
`cache_size` entries, keyed by an HMAC of the user and password under a per-process
random key (the cache holds nothing an offline attack could use), so a client sending the
same credentials on every request pays for one hash check per `cache_ttl`. Concurrent
checks of the same credentials share one hash computation. A refused password is never
cached. An unknown user costs the same hash check as a known one (against a configured
user's hash, the result thrown away), so response times do not tell which users exist.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar, NoReturn

import bcrypt
from yaml.nodes import MappingNode

from metrics.definitions import count_auth_failure
from middleware.auth_common import (
    DEFAULT_CONSUMER_HEADER,
    DEFAULT_REALM,
    challenge,
    header_name,
    header_values,
    items,
    option_node,
    read_lines,
    realm,
    set_consumer,
)
from proxy import Handler, Option, Options, Reported, Request, Response, Unauthorized, join_path

DEFAULT_CACHE_TTL_S = 60.0
DEFAULT_CACHE_SIZE = 1024
# Hash checks in flight at once per instance; more wait their turn. bcrypt and
# PBKDF2 release the GIL, so these use real cores.
HASH_THREADS = min(4, os.cpu_count() or 1)

# RFC 7617 section 2: a user-id cannot contain ':'. We also keep names to visible ASCII,
# as they are forwarded in a header and logged.
_USER_RE = re.compile(r"[!-9;-~]{1,128}")


# -- password hashes ----------------------------------------------------------------------


class UnsupportedHash(ValueError):
    """A hash in a format we do not verify, or a malformed one; the message says which."""


class PasswordHash:
    """A stored password hash: `verify` tells whether a password matches it, in time
    that does not depend on how close the password came."""

    slow = False  # True: too costly for the event loop, verified on the thread pool
    cost = 0.0  # rough seconds per check, to pick the decoy for unknown users

    def verify(self, password: bytes) -> bool:
        """Whether `password` hashes to this."""
        raise NotImplementedError


class BcryptHash(PasswordHash):
    """`$2y$`/`$2b$`/`$2a$` + 2-digit cost + 53 characters of salt and hash."""

    FORMAT = re.compile(rb"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
    slow = True

    def __init__(self, hashed: str) -> None:
        self._hash = hashed.encode("ascii", "replace")
        found = self.FORMAT.fullmatch(self._hash)
        if found is None:
            raise UnsupportedHash("malformed bcrypt hash (expected $2y$NN$ and 53 characters)")
        self.cost = 2 ** int(found.group(1)) / 2**12 * 0.25

    def verify(self, password: bytes) -> bool:
        # bcrypt uses the first 72 bytes (htpasswd -B truncates the same way); the
        # library refuses longer input rather than truncate silently.
        try:
            return bcrypt.checkpw(password[:72], self._hash)
        except ValueError:
            return False


class Pbkdf2Sha256Hash(PasswordHash):
    """passlib's `$pbkdf2-sha256$ROUNDS$SALT$HASH`: SALT and HASH in passlib's "adapted
    base64" (standard base64 with '.' for '+', no padding), HASH 32 bytes."""

    PREFIX = "$pbkdf2-sha256$"
    slow = True

    def __init__(self, hashed: str) -> None:
        rounds, _, rest = hashed.removeprefix(self.PREFIX).partition("$")
        salt, _, checksum = rest.partition("$")
        if not rounds.isdigit() or not 1 <= int(rounds) < 2**32 or not salt:
            raise UnsupportedHash(
                "malformed PBKDF2 hash (expected $pbkdf2-sha256$ROUNDS$SALT$HASH)"
            )
        self._rounds = int(rounds)
        self._salt = _ab64_decode(salt)
        self._checksum = _ab64_decode(checksum)
        if len(self._checksum) != 32:
            raise UnsupportedHash("malformed PBKDF2 hash (HASH must be 32 bytes)")
        self.cost = self._rounds * 1e-6

    def verify(self, password: bytes) -> bool:
        computed = hashlib.pbkdf2_hmac("sha256", password, self._salt, self._rounds)
        return hmac.compare_digest(computed, self._checksum)


class Sha256Hash(PasswordHash):
    """`{SHA256}` + standard base64 of the password's SHA-256 digest (the LDAP/Dovecot
    scheme). Unsalted and fast to brute-force: prefer bcrypt or PBKDF2."""

    PREFIX = "{SHA256}"

    def __init__(self, hashed: str) -> None:
        try:
            self._digest = base64.b64decode(hashed.removeprefix(self.PREFIX), validate=True)
        except (binascii.Error, ValueError):
            self._digest = b""
        if len(self._digest) != 32:
            raise UnsupportedHash("malformed {SHA256} hash (expected base64 of 32 bytes)")

    def verify(self, password: bytes) -> bool:
        return hmac.compare_digest(hashlib.sha256(password).digest(), self._digest)


def _ab64_decode(text: str) -> bytes:
    try:
        return base64.b64decode(text.replace(".", "+") + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise UnsupportedHash("malformed PBKDF2 hash (bad base64)") from None


SUPPORTED_FORMATS = "bcrypt ($2y$, $2b$, $2a$), $pbkdf2-sha256$, {SHA256}"


def parse_password_hash(hashed: str) -> PasswordHash:
    """The verifier for one stored hash.

    Raises:
        UnsupportedHash: not one of SUPPORTED_FORMATS, or malformed.
    """
    if hashed.startswith(("$2y$", "$2b$", "$2a$")):
        return BcryptHash(hashed)
    if hashed.startswith(Pbkdf2Sha256Hash.PREFIX):
        return Pbkdf2Sha256Hash(hashed)
    if hashed.startswith(Sha256Hash.PREFIX):
        return Sha256Hash(hashed)
    if hashed.startswith("$apr1$"):
        found = "Apache MD5 ($apr1$; re-create it with htpasswd -B)"
    elif hashed.startswith("{SHA}"):
        found = "SHA-1 ({SHA}; re-create it with htpasswd -B)"
    elif hashed.startswith("$"):
        found = repr(hashed[: hashed.find("$", 1) + 1] or "$")
    else:
        found = "crypt() or plain text"
    raise UnsupportedHash(
        f"unsupported password hash format: {found} (supported: {SUPPORTED_FORMATS})"
    )


class BasicAuth:
    """Refuse requests without valid Basic credentials; name the user upstream."""

    # It decides who gets through: no cache may come before it in a chain
    # (proxy/plugin/base.py).
    ACCESS_CONTROL: ClassVar[bool] = True

    OPTIONS: ClassVar[dict[str, Option]] = {
        "users": Option.raw(
            "the users: {name: hash}, or a list of 'name:hash' (bcrypt, as htpasswd -B"
            " writes; gatehouse hash-password makes one)",
            {
                "anyOf": [
                    {"type": "object", "additionalProperties": {"type": "string"}},
                    {"type": "string"},
                    {"type": "array", "items": {"type": "string"}},
                ]
            },
        ),
        "htpasswd_file": Option.string("an htpasswd file of 'name:hash' lines"),
        "realm": Option.string("the realm of the WWW-Authenticate challenge", DEFAULT_REALM),
        "forward_authorization": Option.boolean(
            "pass the client's Authorization header upstream", False
        ),
        "consumer_header": Option.string(
            "the header that names the user upstream (empty: none)", DEFAULT_CONSUMER_HEADER
        ),
        "cache_ttl": Option.duration(
            "how long a verified password is remembered", DEFAULT_CACHE_TTL_S
        ),
        "cache_size": Option.integer("verified passwords remembered", DEFAULT_CACHE_SIZE, 1),
    }

    def __init__(self, options: Options, now: Callable[[], float] = time.monotonic) -> None:
        self.name = options.name
        self.realm = realm(options)
        self._challenge = challenge("Basic", self.realm, ', charset="UTF-8"')
        self.forward_authorization = options.boolean("forward_authorization", False)
        self.consumer_header = header_name(
            options, "consumer_header", DEFAULT_CONSUMER_HEADER, empty_ok=True
        )
        self.cache_ttl = options.duration("cache_ttl", DEFAULT_CACHE_TTL_S)
        self.cache_size = options.integer("cache_size", DEFAULT_CACHE_SIZE, minimum=1)
        self._users: dict[str, PasswordHash] = {}
        where: dict[str, str] = {}  # user -> where defined (for duplicates)
        self._read_inline(options, where)
        self._read_file(options, where)
        if not self._users and not options.failed:
            options.error(None, "no users: give 'users' or 'htpasswd_file'")
        # What an unknown user is checked against: the costliest hash configured.
        self._decoy = max(self._users.values(), key=lambda h: h.cost, default=None)
        self._now = now
        self._cache_key = secrets.token_bytes(32)
        self._cache: dict[bytes, float] = {}  # HMAC of "user:password" -> expiry
        self._pending: dict[bytes, asyncio.Future[bool]] = {}
        self._executor: ThreadPoolExecutor | None = None

    def identity_headers(self) -> tuple[str, ...]:
        """The consumer header (middleware/base.py)."""
        return (self.consumer_header,) if self.consumer_header else ()

    def __repr__(self) -> str:
        return f"<BasicAuth {self.name!r} users={len(self._users)} cached={len(self._cache)}>"

    @property
    def users(self) -> list[str]:
        """The configured user names."""
        return list(self._users)

    # -- config load ----------------------------------------------------------------------
    def _add(self, user: str, hashed: str, at: str, where: dict[str, str]) -> str | None:
        """Store one user; the problem with it, if any."""
        if not _USER_RE.fullmatch(user):
            return f"user {user!r}: a name is 1-128 visible ASCII characters without ':'"
        first = where.get(user)
        if first is not None:
            return f"user {user!r} is defined twice (first at {first})"
        try:
            self._users[user] = parse_password_hash(hashed)
        except UnsupportedHash as exc:
            return f"user {user!r}: {exc}"
        where[user] = at
        return None

    def _read_inline(self, options: Options, where: dict[str, str]) -> None:
        found = option_node(options, "users")
        if found is None:
            return
        reader, node, path = found
        if isinstance(node, MappingNode):  # {name: hash}
            try:
                entries = reader.entries(node, path)
            except Reported:
                options.failed = True
                return
            for _, user, value in entries:
                value_path = join_path(path, user)
                try:
                    hashed = reader.string(value, value_path)
                except Reported:
                    options.failed = True
                    continue
                problem = self._add(user, hashed, f"line {value.start_mark.line + 1}", where)
                if problem is not None:
                    options.failed = True
                    reader.error(value, value_path, problem)
            return
        for reader, item, item_path in items(options, "users"):  # ["name:hash", ...]
            try:
                line = reader.string(item, item_path, "a 'name:hash' string")
            except Reported:
                options.failed = True
                continue
            user, colon, hashed = line.partition(":")
            problem = (
                self._add(user, hashed, f"line {item.start_mark.line + 1}", where)
                if colon
                else "expected 'name:hash'"
            )
            if problem is not None:
                options.failed = True
                reader.error(item, item_path, problem)

    def _read_file(self, options: Options, where: dict[str, str]) -> None:
        path = options.optional_string("htpasswd_file")
        if path is None:
            return
        for number, line in read_lines(options, "htpasswd_file", path) or ():
            user, colon, hashed = line.partition(":")
            problem = self._add(user, hashed, f"{path}:{number}", where) if colon else None
            if not colon:
                problem = "expected 'name:hash'"
            if problem is not None:
                options.error("htpasswd_file", f"{path}:{number}: {problem}")

    # -- lifecycle ------------------------------------------------------------------------
    async def close(self) -> None:
        """Stop the hash-check threads (checks still queued are dropped)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # -- per request ----------------------------------------------------------------------
    async def __call__(self, request: Request, call_next: Handler) -> Response:
        values = header_values(request, "Authorization")
        if not values:
            self._refuse("missing")
        scheme, _, token = values[0].strip().partition(" ")
        if len(values) != 1:
            # Two Authorization fields: which one would the upstream believe?
            self._refuse("invalid")
        if scheme.lower() != "basic":
            self._refuse("missing")  # another scheme: no Basic credentials were given
        try:
            decoded = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            self._refuse("invalid")
        user_bytes, colon, password = decoded.partition(b":")
        if not colon or not user_bytes.isascii():  # no configured user looks like that
            self._refuse("invalid")
        user = user_bytes.decode("ascii")
        if not await self._check(user, password, decoded):
            self._refuse("invalid")
        request.consumer = user
        if not self.forward_authorization:
            request.remove_header("Authorization")
        set_consumer(request, self.consumer_header, user)
        return await call_next(request)

    def _refuse(self, reason: str) -> NoReturn:
        count_auth_failure(self.name, reason)
        message = "credentials missing" if reason == "missing" else "credentials not valid"
        raise Unauthorized(self._challenge, message)

    async def _check(self, user: str, password: bytes, credentials: bytes) -> bool:
        """Whether `password` is `user`'s (False for an unknown user, after as long)."""
        key = hmac.digest(self._cache_key, credentials, "sha256")
        expiry = self._cache.get(key)
        if expiry is not None:
            if expiry > self._now():
                return True
            del self._cache[key]
        hashed = self._users.get(user)
        if hashed is None:
            if self._decoy is not None:
                await self._verify(self._decoy, password, key)
            return False
        if not await self._verify(hashed, password, key):
            return False
        if self.cache_ttl > 0:
            self._cache[key] = self._now() + self.cache_ttl
            if len(self._cache) > self.cache_size:
                del self._cache[next(iter(self._cache))]  # the oldest entry
        return True

    async def _verify(self, hashed: PasswordHash, password: bytes, key: bytes) -> bool:
        if not hashed.slow:
            return hashed.verify(password)
        pending = self._pending.get(key)
        if pending is None:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(HASH_THREADS, f"basic_auth-{self.name}")
            loop = asyncio.get_running_loop()
            pending = loop.run_in_executor(self._executor, hashed.verify, password)
            self._pending[key] = pending
            pending.add_done_callback(lambda done: self._forget(key, done))
        # Shielded: a client that goes away does not cancel the check others wait for.
        return await asyncio.shield(pending)

    def _forget(self, key: bytes, done: asyncio.Future[bool]) -> None:
        if self._pending.get(key) is done:
            del self._pending[key]
