"""`basic_auth`: the hash formats (against other tools' published hashes), users inline and
from htpasswd files with their file:line errors, the request checks, and the cache of
successful checks (bounded, expiring, never holding a failure)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import textwrap
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bcrypt
import pytest
from multidict import CIMultiDict

from metrics.definitions import REGISTRY
from middleware.basic_auth import (
    BasicAuth,
    PasswordHash,
    UnsupportedHash,
    parse_password_hash,
)
from proxy.config.document import ConfigError
from proxy.config.load import parse_config
from proxy.core.body import Body
from proxy.core.errors import Unauthorized
from proxy.core.models import Request, Response

# Published by their tools' documentation, so the formats are checked against what those
# tools write: PHP's password_hash()/crypt() ($2y$) and passlib's pbkdf2_sha256.
PHP_BCRYPT = "$2y$07$BCryptRequires22Chrcte/VlQH0piJtjXl.0t1XkA8pw9dMXTpOq"  # rasmuslerdorf
PASSLIB_PBKDF2 = [
    ("toomanysecrets", "$pbkdf2-sha256$29000$N2YMIWQsBWBMae09x1jrPQ$"
     "1t8iyB2A.WF/Z5JZv.lfCIhXXN33N23OSgQYThBYRfk"),
    ("password", "$pbkdf2-sha256$6400$0ZrzXitFSGltTQnBWOsdAw$"
     "Y11AchqV4b0sUisdZd0Xr97KWoymNE0LNNrnEgY4H9M"),
    ("password", "$pbkdf2-sha256$8000$XAuBMIYQQogxRg$"
     "tRRlz8hYn63B9LYiCd6PRo6FMiunY9ozmMMI3srxeRE"),
]  # fmt: skip
# `echo -n password | openssl dgst -sha256 -binary | base64`
SHA256_PASSWORD = "{SHA256}XohImNooBHFR0OVvjcYpJ3NgPQ1qq73WKhHvch0VQtg="
CHALLENGE = 'Basic realm="gatehouse", charset="UTF-8"'

HEAD = """\
listeners: [{bind: 127.0.0.1:0}]
upstreams: {app: {endpoints: ["http://127.0.0.1:9"]}}
routes: [{match: {path_prefix: /}, upstream: app, middleware: [auth]}]
middleware:
"""  # the `auth` instance's options start on line 6


def yaml_for(options: str) -> str:
    body = "  auth:\n    type: basic_auth\n" + textwrap.indent(textwrap.dedent(options), "    ")
    return HEAD + body


def basic_auth(options: str) -> BasicAuth:
    instance = parse_config(yaml_for(options), env={}).middleware["auth"].instance
    assert isinstance(instance, BasicAuth)
    return instance


def errors_of(options: str) -> list[str]:
    with pytest.raises(ConfigError) as failed:
        parse_config(yaml_for(options), env={})
    return failed.value.errors


def basic(user: str, password: str) -> tuple[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return ("Authorization", f"Basic {token}")


def request(headers: Sequence[tuple[str, str]] = ()) -> Request:
    return Request("GET", b"/", CIMultiDict(headers), Body.from_bytes(b""))


class Upstream:
    """The rest of the chain: records the request it was given."""

    def __init__(self) -> None:
        self.seen: list[Request] = []

    async def __call__(self, request: Request) -> Response:
        self.seen.append(request)
        return Response(200)


class Counting(PasswordHash):
    """A real hash, with its checks counted and the threads they ran on recorded."""

    def __init__(self, inner: PasswordHash) -> None:
        self.inner = inner
        self.slow = inner.slow
        self.cost = inner.cost
        self.calls = 0
        self.threads: list[str] = []

    def verify(self, password: bytes) -> bool:
        self.calls += 1
        self.threads.append(threading.current_thread().name)
        return self.inner.verify(password)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def failures(reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "gatehouse_auth_failures_total", {"middleware": "auth", "reason": reason}
    )
    return value or 0.0


def bcrypt_hash(password: str, prefix: bytes = b"$2b$") -> str:
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(4))
    return (prefix + hashed[4:]).decode()


# -- hash formats ---------------------------------------------------------------------------


def test_bcrypt_hashes_of_every_prefix() -> None:
    assert parse_password_hash(PHP_BCRYPT).verify(b"rasmuslerdorf")
    assert not parse_password_hash(PHP_BCRYPT).verify(b"rasmuslerdorF")
    for prefix in (b"$2a$", b"$2b$", b"$2y$"):
        hashed = parse_password_hash(bcrypt_hash("pw", prefix))
        assert hashed.slow
        assert hashed.verify(b"pw")
        assert not hashed.verify(b"pW")


def test_bcrypt_uses_the_first_72_bytes_as_htpasswd_does() -> None:
    hashed = parse_password_hash(bcrypt_hash("a" * 72))
    assert hashed.verify(b"a" * 80)
    assert not hashed.verify(b"a" * 71)


@pytest.mark.parametrize(("password", "hashed"), PASSLIB_PBKDF2)
def test_pbkdf2_sha256_hashes_written_by_passlib(password: str, hashed: str) -> None:
    parsed = parse_password_hash(hashed)
    assert parsed.slow
    assert parsed.verify(password.encode())
    assert not parsed.verify(password.encode() + b"x")


def test_sha256_hash() -> None:
    parsed = parse_password_hash(SHA256_PASSWORD)
    assert not parsed.slow
    assert parsed.verify(b"password")
    assert not parsed.verify(b"Password")


@pytest.mark.parametrize(
    ("hashed", "message"),
    [
        ("$2y$07$short", "malformed bcrypt hash (expected $2y$NN$ and 53 characters)"),
        ("$2y$99$" + "a" * 53, "malformed bcrypt hash (expected $2y$NN$ and 53 characters)"),
        ("$pbkdf2-sha256$0$c2FsdA$" + "A" * 43, "malformed PBKDF2 hash "
         "(expected $pbkdf2-sha256$ROUNDS$SALT$HASH)"),
        ("$pbkdf2-sha256$1000$c2FsdA$AAAA", "malformed PBKDF2 hash (HASH must be 32 bytes)"),
        ("$pbkdf2-sha256$1000$c2F!dA$" + "A" * 43, "malformed PBKDF2 hash (bad base64)"),
        ("{SHA256}abc", "malformed {SHA256} hash (expected base64 of 32 bytes)"),
        ("$apr1$x$y", "unsupported password hash format: Apache MD5 ($apr1$; re-create it "
         "with htpasswd -B) (supported: bcrypt ($2y$, $2b$, $2a$), $pbkdf2-sha256$, {SHA256})"),
        ("{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "unsupported password hash format: SHA-1 "
         "({SHA}; re-create it with htpasswd -B) (supported: bcrypt ($2y$, $2b$, $2a$), "
         "$pbkdf2-sha256$, {SHA256})"),
        ("$6$salt$hash", "unsupported password hash format: '$6$' (supported: bcrypt ($2y$, "
         "$2b$, $2a$), $pbkdf2-sha256$, {SHA256})"),
        ("secret", "unsupported password hash format: crypt() or plain text (supported: "
         "bcrypt ($2y$, $2b$, $2a$), $pbkdf2-sha256$, {SHA256})"),
    ],
)  # fmt: skip
def test_malformed_and_unsupported_hashes(hashed: str, message: str) -> None:
    with pytest.raises(UnsupportedHash) as refused:
        parse_password_hash(hashed)
    assert str(refused.value) == message


# -- users ----------------------------------------------------------------------------------


def test_users_inline_as_mapping_or_htpasswd_lines_and_from_a_file(tmp_path: Path) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"# ops\n\ncarol:{PHP_BCRYPT}\n  dave:{PASSLIB_PBKDF2[0][1]}\n")
    mapping = basic_auth(f"""\
        users: {{alice: "{SHA256_PASSWORD}"}}
        htpasswd_file: {htpasswd}
        """)
    assert mapping.users == ["alice", "carol", "dave"]
    lines = basic_auth(f"""\
        users: ["alice:{SHA256_PASSWORD}", "bob:{PHP_BCRYPT}"]
        """)
    assert lines.users == ["alice", "bob"]


def test_user_errors_name_the_user_and_the_line(tmp_path: Path) -> None:
    assert errors_of(f"""\
        users:
          alice: "$apr1$x$y"
          bob: "{SHA256_PASSWORD}"
          "b:c": "{SHA256_PASSWORD}"
          dan: {{SHA256: x}}
        """) == [
        "<string>:8: middleware.auth.users.alice: user 'alice': unsupported password hash "
        "format: Apache MD5 ($apr1$; re-create it with htpasswd -B) (supported: bcrypt ($2y$, "
        "$2b$, $2a$), $pbkdf2-sha256$, {SHA256})",
        "<string>:10: middleware.auth.users['b:c']: user 'b:c': a name is 1-128 visible ASCII "
        "characters without ':'",
        "<string>:11: middleware.auth.users.dan: expected a string, got a mapping",
    ]
    assert errors_of(f"""\
        users: ["alice:{SHA256_PASSWORD}", "alice:{SHA256_PASSWORD}", nocolon, 5]
        """) == [
        "<string>:7: middleware.auth.users[1]: user 'alice' is defined twice (first at line 7)",
        "<string>:7: middleware.auth.users[2]: expected 'name:hash'",
        "<string>:7: middleware.auth.users[3]: expected a 'name:hash' string, got an integer "
        "(5); quote it to use it as text",
    ]


def test_htpasswd_file_errors_name_the_file_line(tmp_path: Path) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"alice:{SHA256_PASSWORD}\nbob\ncarol:$apr1$a$b\nalice:{PHP_BCRYPT}\n")
    where = f"<string>:8: middleware.auth.htpasswd_file: {htpasswd}"
    assert errors_of(f"users: ['erin:{SHA256_PASSWORD}']\nhtpasswd_file: {htpasswd}\n") == [
        f"{where}:2: expected 'name:hash'",
        f"{where}:3: user 'carol': unsupported password hash format: Apache MD5 ($apr1$; "
        "re-create it with htpasswd -B) (supported: bcrypt ($2y$, $2b$, $2a$), "
        "$pbkdf2-sha256$, {SHA256})",
        f"{where}:4: user 'alice' is defined twice (first at {htpasswd}:1)",
    ]
    missing = tmp_path / "missing"
    assert errors_of(f"htpasswd_file: {missing}\n") == [
        f"<string>:7: middleware.auth.htpasswd_file: cannot read '{missing}': "
        "No such file or directory"
    ]


def test_other_option_errors() -> None:
    assert errors_of("realm: r\n") == [
        "<string>:6: middleware.auth: no users: give 'users' or 'htpasswd_file'"
    ]
    assert errors_of(f"""\
        users: ["a:{SHA256_PASSWORD}"]
        cache_ttl: soon
        cache_size: 0
        forward_authorization: "no"
        consumer_header: "X Consumer"
        """) == [
        "<string>:8: middleware.auth.cache_ttl: invalid duration 'soon' (e.g. '250ms', '5s', "
        "'1.5s', '2m', '1m30s', '1h', '1d' or a number of seconds)",
        "<string>:9: middleware.auth.cache_size: must be at least 1, got 0",
        "<string>:10: middleware.auth.forward_authorization: expected true or false, got a "
        "string ('no')",
        "<string>:11: middleware.auth.consumer_header: 'X Consumer' is not a valid header name",
    ]


# -- per request ----------------------------------------------------------------------------


async def test_right_password_sets_consumer_and_removes_authorization() -> None:
    auth = basic_auth(f'users: {{alice: "{PHP_BCRYPT}"}}\n')
    upstream = Upstream()
    headers = [basic("alice", "rasmuslerdorf"), ("X-Consumer", "root")]
    response = await auth(request(headers), upstream)
    await auth.close()
    assert response.status == 200
    seen = upstream.seen[0]
    assert seen.consumer == "alice"
    assert "Authorization" not in seen.headers
    assert seen.headers.getall("X-Consumer") == ["alice"]


async def test_raw_headers_stay_raw_bytes() -> None:
    auth = basic_auth(f'users: {{alice: "{SHA256_PASSWORD}"}}\n')
    upstream = Upstream()
    name, value = basic("alice", "password")
    raw = [(b"Host", b"h"), (name.lower().encode(), value.encode()), (b"x-consumer", b"root")]
    await auth(Request("GET", b"/", raw, Body.from_bytes(b""), host="h"), upstream)
    assert upstream.seen[0].raw_headers == [(b"Host", b"h"), (b"X-Consumer", b"alice")]


async def test_forward_authorization_keeps_the_header() -> None:
    auth = basic_auth(f'users: {{alice: "{SHA256_PASSWORD}"}}\nforward_authorization: true\n')
    upstream = Upstream()
    credentials = basic("alice", "password")
    await auth(request([credentials]), upstream)
    assert upstream.seen[0].headers["Authorization"] == credentials[1]


async def test_passwords_may_hold_colons_and_utf8() -> None:
    hashed = "{SHA256}" + base64.b64encode(hashlib.sha256("p:ä:ß".encode()).digest()).decode()
    auth = basic_auth(f'users: {{bob: "{hashed}"}}\n')
    upstream = Upstream()
    await auth(request([basic("bob", "p:ä:ß")]), upstream)
    assert upstream.seen[0].consumer == "bob"


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ([], "missing"),
        ([("Authorization", "Bearer abc")], "missing"),
        ([("Authorization", "Basic !!!")], "invalid"),
        ([("Authorization", "Basic " + base64.b64encode(b"alice").decode())], "invalid"),
        ([("Authorization", "Basic " + base64.b64encode(b"\xff:x").decode())], "invalid"),
        ([basic("alice", "wrong")], "invalid"),
        ([basic("mallory", "password")], "invalid"),
        ([basic("alice", "password"), basic("alice", "password")], "invalid"),
    ],
)
async def test_refusals_are_401_with_the_challenge_and_counted(
    headers: list[tuple[str, str]], reason: str
) -> None:
    auth = basic_auth(f'users: {{alice: "{SHA256_PASSWORD}"}}\n')
    before = failures(reason)
    with pytest.raises(Unauthorized) as refused:
        await auth(request(headers), Upstream())
    assert refused.value.status == 401
    assert refused.value.challenge == CHALLENGE
    assert failures(reason) == before + 1


async def test_the_scheme_is_case_insensitive_and_realm_configurable() -> None:
    auth = basic_auth(f'realm: "Ops tools"\nusers: {{alice: "{SHA256_PASSWORD}"}}\n')
    token = base64.b64encode(b"alice:password").decode()
    upstream = Upstream()
    await auth(request([("Authorization", f"bAsIc {token}")]), upstream)
    assert upstream.seen[0].consumer == "alice"
    with pytest.raises(Unauthorized) as refused:
        await auth(request(), upstream)
    assert refused.value.challenge == 'Basic realm="Ops tools", charset="UTF-8"'


# -- the cost of checks ---------------------------------------------------------------------


def counted(auth: BasicAuth, user: str) -> Counting:
    wrapper = Counting(auth._users[user])
    auth._users[user] = wrapper
    return wrapper


async def test_slow_checks_run_off_the_loop_and_successes_are_cached_for_the_ttl() -> None:
    auth = basic_auth(f'users: {{alice: "{bcrypt_hash("pw")}"}}\ncache_ttl: 30s\n')
    clock = auth._now = Clock()
    alice = counted(auth, "alice")
    for _ in range(3):
        await auth(request([basic("alice", "pw")]), Upstream())
    assert alice.calls == 1
    assert alice.threads[0].startswith("basic_auth-auth")
    assert alice.threads[0] != threading.current_thread().name
    assert repr(auth) == "<BasicAuth 'auth' users=1 cached=1>"
    clock.now += 29.0
    await auth(request([basic("alice", "pw")]), Upstream())
    assert alice.calls == 1
    clock.now += 2.0  # past the ttl
    await auth(request([basic("alice", "pw")]), Upstream())
    assert alice.calls == 2
    await auth.close()


async def test_a_wrong_password_is_never_cached_and_cannot_ride_on_a_cached_one() -> None:
    auth = basic_auth(f'users: {{alice: "{bcrypt_hash("pw")}"}}\n')
    alice = counted(auth, "alice")
    await auth(request([basic("alice", "pw")]), Upstream())
    for _ in range(2):
        with pytest.raises(Unauthorized):
            await auth(request([basic("alice", "pw2")]), Upstream())
    assert alice.calls == 3
    assert len(auth._cache) == 1
    # The cache holds keyed digests, not something a dump could be brute-forced from.
    assert hashlib.sha256(b"alice:pw").digest() not in auth._cache
    await auth.close()


async def test_concurrent_checks_of_the_same_credentials_share_one_hash() -> None:
    auth = basic_auth(f'users: {{alice: "{bcrypt_hash("pw")}"}}\n')
    alice = counted(auth, "alice")
    upstream = Upstream()
    async with asyncio.timeout(10):
        await asyncio.gather(*(auth(request([basic("alice", "pw")]), upstream) for _ in range(8)))
    assert len(upstream.seen) == 8
    assert alice.calls == 1
    assert auth._pending == {}
    await auth.close()


async def test_the_cache_is_bounded_oldest_out() -> None:
    users = ", ".join(f'u{i}: "{SHA256_PASSWORD}"' for i in range(3))
    auth = basic_auth(f"users: {{{users}}}\ncache_size: 2\n")
    checks = [counted(auth, f"u{i}") for i in range(3)]
    for i in range(3):
        await auth(request([basic(f"u{i}", "password")]), Upstream())
    assert len(auth._cache) == 2
    await auth(request([basic("u0", "password")]), Upstream())  # evicted: checked again
    await auth(request([basic("u2", "password")]), Upstream())  # still cached
    assert [check.calls for check in checks] == [2, 1, 1]


async def test_cache_ttl_zero_turns_the_cache_off() -> None:
    auth = basic_auth(f'users: {{alice: "{SHA256_PASSWORD}"}}\ncache_ttl: 0s\n')
    alice = counted(auth, "alice")
    for _ in range(2):
        await auth(request([basic("alice", "password")]), Upstream())
    assert alice.calls == 2
    assert auth._cache == {}


async def test_an_unknown_user_costs_a_check_of_the_costliest_hash() -> None:
    auth = basic_auth(f"""\
        users:
          fast: "{SHA256_PASSWORD}"
          slow: "{bcrypt_hash("pw")}"
        """)
    decoy = auth._decoy = Counting(auth._users["slow"])
    with pytest.raises(Unauthorized):
        await auth(request([basic("nobody", "pw")]), Upstream())
    assert decoy.calls == 1  # the result is thrown away: "pw" is slow's password
    await auth.close()


async def test_close_stops_the_thread_pool_and_a_later_check_starts_another() -> None:
    auth = basic_auth(f'users: {{alice: "{bcrypt_hash("pw")}"}}\ncache_ttl: 0s\n')
    await auth(request([basic("alice", "pw")]), Upstream())
    first = executor_of(auth)
    assert first is not None
    await auth.close()
    assert executor_of(auth) is None
    assert first._shutdown
    await auth(request([basic("alice", "pw")]), Upstream())
    second = executor_of(auth)
    assert second is not None
    assert second is not first
    await auth.close()


def executor_of(auth: BasicAuth) -> ThreadPoolExecutor | None:
    return auth._executor
