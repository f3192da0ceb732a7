"""The jwt middleware's key set: JWKS parsing, and the cache against a real JWKS server
(tests/support/jwks_server.py) with an injected clock: refresh limits, failures, hangs, https."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest

from middleware.jwks import (
    JwksCache,
    JwksError,
    JwksState,
    fetch,
    parse_jwks,
    parse_jwks_url,
)
from tests.middleware.test_jwt_auth import (
    Clock,
    challenge,
    ec_key,
    ed_key,
    make_auth,
    passes,
    refreshes,
    refused,
    request_with,
    rsa_key,
    rsa_key_2,
)
from tests.support.jwks_server import JwksServer, SigningKey
from tests.support.tls import TlsFiles

# --- the key set --------------------------------------------------------------------------


def test_parse_jwks_keeps_signing_keys_and_says_why_it_skips_others() -> None:
    document = {
        "keys": [
            rsa_key().jwk(),
            ec_key().jwk(alg=False),
            ed_key().jwk(),
            {**rsa_key_2().jwk(), "use": "enc"},
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {**ec_key().jwk("mismatch"), "alg": "RS256"},
            SigningKey.rsa("short", bits=1024).jwk(),
            {"kty": "RSA", "kid": "broken", "n": "AQAB"},
            "nonsense",
        ]
    }
    keys = parse_jwks(json.dumps(document).encode())
    assert [(key.kid, sorted(key.algorithms)) for key in keys.all] == [
        ("rsa-1", ["RS256"]),
        ("ec-1", ["ES256"]),
        ("ed-1", ["EdDSA"]),
    ]
    assert keys.by_kid["ec-1"] == (keys.all[1],)
    assert [reason.split(":")[0] for reason in keys.skipped] == [
        "keys[3]",
        "keys[4]",
        "keys[5]",
        "keys[6]",
        "keys[7]",
        "keys[8]",
    ]
    assert "'use' is 'enc'" in keys.skipped[0]
    assert "fewer than 2048" in keys.skipped[3]


@pytest.mark.parametrize("data", [b"<html>", b"[]", b'{"keys": {}}'])
def test_parse_jwks_refuses_what_is_not_a_key_set(data: bytes) -> None:
    with pytest.raises(JwksError) as info:
        parse_jwks(data)
    assert info.value.result == "invalid"


@pytest.fixture
async def jwks_server() -> AsyncIterator[JwksServer]:
    server = await JwksServer({"keys": [rsa_key().jwk()]}).start()
    yield server
    await server.stop()


def cache_for(server: JwksServer, clock: Clock, **options: float) -> JwksCache:
    settings: dict[str, float] = {
        "refresh_s": 300.0,
        "min_refresh_s": 30.0,
        "timeout_s": 2.0,
        "wait_s": 1.0,
    }
    settings.update(options)
    return JwksCache(
        parse_jwks_url(server.url),
        name="unit",
        now=clock,
        refresh_s=settings["refresh_s"],
        min_refresh_s=settings["min_refresh_s"],
        timeout_s=settings["timeout_s"],
        wait_s=settings["wait_s"],
    )


@pytest.mark.socket
async def test_unknown_kids_refresh_at_most_once_per_min_refresh(jwks_server: JwksServer) -> None:
    clock = Clock()
    cache = cache_for(jwks_server, clock)
    try:
        assert await cache.refresh_for_unknown()  # the first fetch: nothing cached yet
        assert cache.find("rsa-1")[0].algorithms == {"RS256"}  # the JWK's alg narrows it
        results = await asyncio.gather(*(cache.refresh_for_unknown() for _ in range(50)))
        assert results == [False] * 50
        assert jwks_server.fetches == 1

        jwks_server.jwks = {"keys": [rsa_key_2().jwk()]}
        clock.now += 30
        results = await asyncio.gather(*(cache.refresh_for_unknown() for _ in range(50)))
        assert results == [True] * 50  # all joined the one refresh
        assert jwks_server.fetches == 2
        assert cache.find("rsa-1") == ()  # removed from the set: no longer trusted
        assert cache.find("rsa-2")
        assert repr(cache).endswith("CURRENT keys=1 fetches=2>")
    finally:
        await cache.aclose()
    assert cache.state is JwksState.CLOSED
    assert not await cache.refresh_for_unknown()


@pytest.mark.socket
async def test_a_failed_refresh_keeps_the_cached_keys(jwks_server: JwksServer) -> None:
    clock = Clock()
    cache = cache_for(jwks_server, clock, min_refresh_s=0.0)
    try:
        assert await cache.refresh_for_unknown()
        for status, result in [(503, "bad_status"), (200, "invalid")]:
            jwks_server.status = status
            jwks_server.body = b"{}" if status == 200 else None
            before = refreshes(result, "unit")
            assert not await cache.refresh_for_unknown()
            assert refreshes(result, "unit") == before + 1
            assert cache.state is JwksState.STALE
            assert cache.find("rsa-1")
        await jwks_server.stop()
        before = refreshes("unreachable", "unit")
        assert not await cache.refresh_for_unknown()
        assert refreshes("unreachable", "unit") == before + 1
        assert cache.find("rsa-1")
        assert repr(cache).endswith("STALE keys=1 fetches=4>")
    finally:
        await cache.aclose()


@pytest.mark.socket
async def test_a_hanging_jwks_server_bounds_the_wait_and_the_fetch(
    jwks_server: JwksServer,
) -> None:
    clock = Clock()
    # The wait and the fetch timeout far apart; which of the two ended a call is read
    # from the fetch's state, not from the clock.
    cache = cache_for(jwks_server, clock, wait_s=0.05, timeout_s=1.5)
    jwks_server.hang = True
    before = refreshes("timeout", "unit")
    try:
        started = time.monotonic()
        assert not await cache.refresh_for_unknown()  # gives up waiting after wait_s,
        assert refreshes("timeout", "unit") == before  # while the fetch goes on
        assert not await cache.refresh_now()  # the same fetch, which times out
        assert refreshes("timeout", "unit") == before + 1
        # Its timeout ends it: after its 1.5 s (the fetch began after `started`), and
        # with room for a busy machine before the bound on a hang.
        assert 1.5 - 0.01 <= time.monotonic() - started < 1.5 + 5
        assert jwks_server.fetches == 1
        assert cache.state is JwksState.EMPTY
    finally:
        await cache.aclose()


@pytest.mark.socket
async def test_close_cancels_a_fetch_in_flight(jwks_server: JwksServer) -> None:
    cache = cache_for(jwks_server, Clock(), wait_s=0.01, timeout_s=30)
    jwks_server.hang = True
    await cache.start()
    await jwks_server.wait_for_fetches(1)
    async with asyncio.timeout(10):  # a fetch not cancelled would take its 30 s
        await cache.aclose()
    assert repr(cache).startswith("<JwksCache http://127.0.0.1:")


@pytest.mark.socket
async def test_the_background_task_refreshes_on_schedule(jwks_server: JwksServer) -> None:
    cache = cache_for(jwks_server, Clock(), refresh_s=0.02)
    await cache.start()
    try:
        await jwks_server.wait_for_fetches(1)
        jwks_server.jwks = {"keys": [rsa_key_2().jwk()]}
        await jwks_server.wait_for_fetches(3)  # so the second one, with the new set, is done
        assert cache.find("rsa-2")
    finally:
        await cache.aclose()


@pytest.mark.socket
async def test_https_jwks_with_a_private_ca(tls_files: TlsFiles) -> None:
    context = tls_files.server_context([])
    server = await JwksServer({"keys": [ec_key().jwk()]}).start(ssl=context)
    try:
        auth = make_auth(
            f"""\
            type: jwt
            algorithms: [ES256]
            jwks_url: {server.url}
            jwks_ca_file: {tls_files.ca}
            """
        )
        assert auth.jwks is not None
        await passes(auth, request_with(ec_key().sign({"sub": "tls"})))
        assert server.fetches == 1
        untrusting = parse_jwks_url(server.url)
        with pytest.raises(JwksError) as info:
            await fetch(untrusting, 2.0, None)  # the system CAs do not know ours
        assert info.value.result == "unreachable"
        await auth.close()
    finally:
        await server.stop()


@pytest.mark.socket
async def test_tokens_without_a_kid_try_the_keys_that_fit(jwks_server: JwksServer) -> None:
    jwks_server.jwks = {"keys": [rsa_key().jwk(alg=False), rsa_key_2().jwk(), ec_key().jwk()]}
    auth = make_auth(f"type: jwt\nalgorithms: [RS256, ES256]\njwks_url: {jwks_server.url}\n")
    try:
        no_kid = SigningKey("RS256", rsa_key_2().private)
        assert (await passes(auth, request_with(no_kid.sign({"sub": "2"})))).consumer == "2"
        wrong = SigningKey("RS256", SigningKey.rsa().private)
        error = await refused(auth, request_with(wrong.sign({})))
        assert error.challenge == challenge("invalid signature")
        # A kid whose key is of another type: refused, not tried with the wrong algorithm.
        error = await refused(auth, request_with(rsa_key().sign({}, kid="ec-1")))
        assert error.challenge == challenge("the key does not fit the algorithm")
        assert jwks_server.fetches == 1
    finally:
        await auth.close()
