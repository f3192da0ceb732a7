"""`cache` through real sockets: each row of docs/middleware/cache.md's RFC 9111 table
with a real upstream whose answers (fields, status, body, validators) the test scripts
and whose requests it counts, on both loops, and over HTTP/1.1 and HTTP/2 where the
client's protocol could matter. Time-dependent rows never sleep: a response is stale by
construction (its Date an hour ago) or fresh for a minute.

The Redis backend and the admin API's purge are tests/e2e/test_mw_cache_redis.py's."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from middleware.cache import Cache
from middleware.cache_rules import format_http_date
from proxy.process.server import Server
from proxy.testing.upstream import ReceivedRequest, Reply, ScriptedUpstream, make_reply
from tests.middleware.test_cache import until_waiting
from tests.support.gateway import GatewayFactory, base_url, simple_config
from tests.support.h2_client import H2Client

pytestmark = pytest.mark.socket

CLIENT_TIMEOUT_S = 10.0
PROTOCOLS = ["http1", "h2"]
HOUR_AGO = 3600.0


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names, repeated fields joined with ", "
    body: bytes

    @property
    def cache_status(self) -> str:
        return self.headers.get("cache-status", "")


@pytest.fixture
async def origin() -> AsyncIterator[ScriptedUpstream]:
    upstream = await ScriptedUpstream("origin").start()
    yield upstream
    await upstream.stop()


# How the route's chain runs the cache: alone, as phases (proxy/exchange/phased.py: a hit
# answered in the request phase, the rest Deferred to its coroutine), or behind a
# middleware that offers no phases, as coroutines. Every test runs both ways.
CHAINS = {"phased": "", "coroutine": "{type: headers, request: {set: {X-Chain: c}}}, "}


@pytest.fixture(params=list(CHAINS), autouse=True)
def chain(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(sys.modules[__name__], "CHAIN", request.param)
    return str(request.param)


CHAIN = "phased"  # the running test's chain (the `chain` fixture sets it)


def cache_config(upstream_url: str, options: str = "") -> str:
    inline = CHAINS[CHAIN] + "{type: cache" + (", " + options if options else "") + "}"
    return simple_config(upstream_url, "httptools", route=f"    middleware: [{inline}]")


async def start(
    gateway_factory: GatewayFactory, origin: ScriptedUpstream, options: str = ""
) -> Server:
    server = await gateway_factory(cache_config(origin.url, options))
    phased = server.runtime.routes["all"].phased is not None
    assert phased == (CHAIN == "phased" and "redis" not in options)
    return server


def cache_of(server: Server) -> Cache:
    for spec in server.runtime.middleware():
        if isinstance(spec.instance, Cache):
            return spec.instance
    raise AssertionError("no cache middleware")


async def get(
    server: Server,
    path: str,
    headers: dict[str, str] | None = None,
    protocol: str = "http1",
    method: str = "GET",
) -> Answer:
    if protocol == "http1":
        async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as client:
            response = await client.request(method, base_url(server) + path, headers=headers)
        joined: dict[str, str] = {}
        for name, value in response.headers.multi_items():
            joined[name.lower()] = (
                f"{joined[name.lower()]}, {value}" if name.lower() in joined else value
            )
        return Answer(response.status_code, joined, response.content)
    host, port = server.addresses[0]
    async with await H2Client.connect(host, port) as h2:
        pairs = [(name.lower(), value) for name, value in (headers or {}).items()]
        result = await h2.request(path, method=method, headers=pairs, timeout_s=CLIENT_TIMEOUT_S)
    fields: dict[str, str] = {}
    for raw_name, raw_value in result.headers:
        name, value = raw_name.decode(), raw_value.decode()
        fields[name] = f"{fields[name]}, {value}" if name in fields else value
    return Answer(result.status, fields, bytes(result.body))


def seen(origin: ScriptedUpstream, path: str) -> list[ReceivedRequest]:
    return [request for request in origin.requests if request.path == path]


def dated(offset_s: float = 0.0, **fields: str) -> dict[str, str]:
    """`fields` (`_` for `-` in their names) with a Date `offset_s` from now (negative: in
    the past)."""
    named = {name.replace("_", "-"): value for name, value in fields.items()}
    return {"Date": format_http_date(time.time() + offset_s), **named}


# -- storing and freshness ---------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_max_age_is_served_from_the_cache_with_age_and_cache_status(
    gateway_factory: GatewayFactory, origin: ScriptedUpstream, protocol: str
) -> None:
    origin.on("GET", "/fresh").reply(body="fresh body", headers=dated(Cache_Control="max-age=600"))
    server = await start(gateway_factory, origin)
    first = await get(server, "/fresh", protocol=protocol)
    assert (first.status, first.body) == (200, b"fresh body")
    assert first.cache_status.startswith("gatehouse; fwd=uri-miss; ttl=")
    assert first.cache_status.endswith("; stored")
    await _stored(server, 1)
    second = await get(server, "/fresh", protocol=protocol)
    assert (second.status, second.body) == (200, b"fresh body")
    assert second.cache_status.startswith("gatehouse; hit; ttl=")
    assert second.headers["age"].isdigit()
    assert len(seen(origin, "/fresh")) == 1


async def _stored(server: Server, entries: int) -> None:
    """Until the cache holds `entries` (a response is stored once its body has ended,
    just after the client got it)."""
    cache = cache_of(server)
    while cache.keeper.tasks:
        await asyncio.gather(*cache.keeper.tasks, return_exceptions=True)
    store = cache.store
    assert len(store) == entries  # type: ignore[arg-type]


async def test_s_maxage_wins_over_max_age(
    gateway_factory: GatewayFactory, origin: ScriptedUpstream
) -> None:
    origin.on("GET", "/shared").reply(headers=dated(Cache_Control="max-age=0, s-maxage=600"))
    server = await start(gateway_factory, origin)
    await get(server, "/shared")
    await _stored(server, 1)
    assert (await get(server, "/shared")).cache_status.startswith("gatehouse; hit")
    assert len(seen(origin, "/shared")) == 1


@pytest.mark.parametrize(
    ("cache_control", "detail"),
    [("no-store, max-age=600", "no-store"), ("private, max-age=600", "private")],
)
async def test_no_store_and_private_are_never_stored(
    gateway_factory: GatewayFactory, origin: ScriptedUpstream, cache_control: str, detail: str
) -> None:
    origin.on("GET", "/secret").reply(headers=dated(Cache_Control=cache_control))
    server = await start(gateway_factory, origin)
    for _ in range(2):
        answer = await get(server, "/secret")
        assert answer.cache_status == f"gatehouse; fwd=uri-miss; detail=not-stored-{detail}"
    assert len(seen(origin, "/secret")) == 2


async def test_authorization_needs_public_s_maxage_or_must_revalidate(
    gateway_factory: GatewayFactory, origin: ScriptedUpstream
) -> None:
    origin.on("GET", "/mine").reply(headers=dated(Cache_Control="max-age=600"))
    origin.on("GET", "/ours").reply(headers=dated(Cache_Control="public, max-age=600"))
    server = await start(gateway_factory, origin)
    auth = {"Authorization": "Bearer t"}
    for _ in range(2):
        assert "not-stored-authorization" in (await get(server, "/mine", auth)).cache_status
    await get(server, "/ours", auth)
    await _stored(server, 1)
    assert (await get(server, "/ours", auth)).cache_status.startswith("gatehouse; hit")
    assert (len(seen(origin, "/mine")), len(seen(origin, "/ours"))) == (2, 1)


async def test_expires_against_date(
    gateway_factory: GatewayFactory, origin: ScriptedUpstream
) -> None:
    now = time.time()
    origin.on("GET", "/expires").reply(
        headers={"Date": format_http_date(now), "Expires": format_http_date(now + 600)}
    )
    origin.on("GET", "/expired").reply(
        headers={"Date": format_http_date(now - HOUR_AGO), "Expires": format_http_date(now - 60)}
    )
    server = await start(gateway_factory, origin)
    for path in ("/expires", "/expired", "/expires", "/expired"):
        await get(server, path)
    assert (len(seen(origin, "/expires")), len(seen(origin, "/expired"))) == (1, 2)


async def test_vary_keeps_one_variant_per_request_value(
    gateway_factory: GatewayFactory, origin: ScriptedUpstream
) -> None:
    def by_language(request: ReceivedRequest) -> Reply:
        language = request.headers.get("Accept-Language", "none")
        return make_reply(
            body=f"in {language}",
            headers=dated(Cache_Control="max-age=600", Vary="Accept-Language"),
        )

    origin.on("GET", "/page").call(by_language)
    server = await start(gateway_factory, origin)
    en, fr = {"Accept-Language": "en"}, {"Accept-Language": "fr"}
    assert (await get(server, "/page", en)).body == b"in en"
    await _stored(server, 1)
    missed = await get(server, "/page", fr)
    assert missed.body == b"in fr"
    assert "fwd=vary-miss" in missed.cache_status
    await _stored(server, 2)
    assert (await get(server, "/page", en)).body == b"in en"
    assert (await get(server, "/page", fr)).body == b"in fr"
    assert len(seen(origin, "/page")) == 2


async def test_the_query_is_sorted_in_the_key(
    gateway_factory: GatewayFactory, origin: ScriptedUpstream
) -> None:
    origin.on("GET", "/q").reply(headers=dated(Cache_Control="max-age=600"))
    server = await start(gateway_factory, origin, "key: {query_drop: [utm]}")
    await get(server, "/q?b=2&a=1")
    await _stored(server, 1)
    assert (await get(server, "/q?a=1&utm=x&b=2")).cache_status.startswith("gatehouse; hit")
    assert len(seen(origin, "/q")) == 1


# -- validation --------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_stale_etag_is_revalidated_and_a_304_freshens_it(
    gateway_factory: GatewayFactory, origin: ScriptedUpstream, protocol: str
) -> None:
    origin.on("GET", "/etag").reply(
        body="v1 body", headers=dated(-HOUR_AGO, Cache_Control="max-age=60", ETag='"v1"'), times=1
    ).reply(304, headers=dated(Cache_Control="max-age=600", ETag='"v1"', X_Checked="yes"))
    server = await start(gateway_factory, origin)
    await get(server, "/etag", protocol=protocol)
    await _stored(server, 1)
    revalidated = await get(server, "/etag", protocol=protocol)
    assert (revalidated.status, revalidated.body) == (200, b"v1 body")
    assert revalidated.headers["x-checked"] == "yes"
    assert revalidated.cache_status.startswith("gatehouse; fwd=stale; fwd-status=304; ttl=")
    assert seen(origin, "/etag")[1].headers["If-None-Match"] == '"v1"'
    hit = await get(server, "/etag", protocol=protocol)
    assert hit.cache_status.startswith("gatehouse; hit")
    assert hit.body == b"v1 body"
    assert len(seen(origin, "/etag")) == 2


async def test_last_modified_is_revalidated_with_if_modified_since(
    gateway_factory: GatewayFactory, origin: ScriptedUpstream
) -> None:
    modified = format_http_date(time.time() - 2 * HOUR_AGO)
    origin.on("GET", "/lm").reply(body="lm", headers=dated(Last_Modified=modified), times=1).reply(
        304, headers=dated()
    )
    server = await start(gateway_factory, origin)
    await get(server, "/lm")
    await _stored(server, 1)
    again = await get(server, "/lm")
    assert (again.status, again.body) == (200, b"lm")
    assert seen(origin, "/lm")[1].headers["If-Modified-Since"] == modified


async def test_no_cache_responses_are_revalidated_every_time(
    gateway_factory: GatewayFactory, origin: ScriptedUpstream
) -> None:
    origin.on("GET", "/nc").reply(
        body="nc", headers=dated(Cache_Control="no-cache", ETag='"n"'), times=1
    ).reply(304, headers=dated(Cache_Control="no-cache", ETag='"n"'))
    server = await start(gateway_factory, origin)
    await get(server, "/nc")
    await _stored(server, 1)
    for _ in range(2):
        answer = await get(server, "/nc")
        assert (answer.body, answer.cache_status[:40]) == (
            b"nc",
            "gatehouse; fwd=stale; fwd-status=304; tt",
        )
    assert len(seen(origin, "/nc")) == 3


async def test_client_conditionals_are_answered_from_the_cache(
    gateway_factory: GatewayFactory, origin: ScriptedUpstream
) -> None:
    origin.on("GET", "/c").reply(body="c", headers=dated(Cache_Control="max-age=600", ETag='"c1"'))
    server = await start(gateway_factory, origin)
    await get(server, "/c")
    await _stored(server, 1)
    not_modified = await get(server, "/c", {"If-None-Match": '"c1"'})
    assert (not_modified.status, not_modified.body, not_modified.headers["etag"]) == (
        304,
        b"",
        '"c1"',
    )
    assert (await get(server, "/c", {"If-None-Match": '"c0"'})).status == 200
    assert len(seen(origin, "/c")) == 1


# -- stale serving -----------------------------------------------------------------------


async def test_stale_if_error_serves_the_stale_response_when_the_origin_fails(
    gateway_factory: GatewayFactory, origin: ScriptedUpstream
) -> None:
    origin.on("GET", "/sie").reply(
        body="kept", headers=dated(-60, Cache_Control="max-age=1, stale-if-error=3600"), times=1
    ).reply(503, body="down")
    server = await start(gateway_factory, origin)
    await get(server, "/sie")
    await _stored(server, 1)
    answer = await get(server, "/sie")
    assert (answer.status, answer.body) == (200, b"kept")
    assert answer.cache_status.endswith("detail=stale-if-error")


async def test_must_revalidate_passes_the_origins_failure_on(
    gateway_factory: GatewayFactory, origin: ScriptedUpstream
) -> None:
    origin.on("GET", "/mr").reply(
        body="kept",
        headers=dated(-60, Cache_Control="max-age=1, must-revalidate, stale-if-error=3600"),
        times=1,
    ).reply(503, body="down")
    server = await start(gateway_factory, origin)
    await get(server, "/mr")
    await _stored(server, 1)
    answer = await get(server, "/mr")
    assert (answer.status, answer.body) == (503, b"down")


async def test_stale_while_revalidate_answers_stale_and_revalidates_behind(
    gateway_factory: GatewayFactory, origin: ScriptedUpstream
) -> None:
    revalidating = asyncio.Event()

    async def revalidate(request: ReceivedRequest) -> Reply:
        revalidating.set()
        return make_reply(304, headers=dated(Cache_Control="max-age=600", ETag='"s"'))

    origin.on("GET", "/swr").reply(
        body="swr",
        headers=dated(-60, Cache_Control="max-age=1, stale-while-revalidate=3600", ETag='"s"'),
        times=1,
    ).call(revalidate)
    server = await start(gateway_factory, origin)
    await get(server, "/swr")
    await _stored(server, 1)
    stale = await get(server, "/swr")
    assert (stale.status, stale.body) == (200, b"swr")
    assert stale.cache_status.startswith("gatehouse; hit; ttl=-")
    assert stale.cache_status.endswith("detail=stale-while-revalidate")
    await revalidating.wait()
    await _stored(server, 1)
    assert seen(origin, "/swr")[1].headers["If-None-Match"] == '"s"'
    fresh = await get(server, "/swr")
    assert fresh.cache_status.startswith("gatehouse; hit; ttl=")
    assert "-" not in fresh.cache_status
    assert len(seen(origin, "/swr")) == 2


# -- coalescing, bodies, invalidation ----------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_concurrent_misses_make_one_upstream_request(
    gateway_factory: GatewayFactory, origin: ScriptedUpstream, protocol: str
) -> None:
    release, arrived = asyncio.Event(), asyncio.Event()

    async def held(request: ReceivedRequest) -> Reply:
        arrived.set()
        await release.wait()
        return make_reply(body="herd", headers=dated(Cache_Control="max-age=600"))

    origin.on("GET", "/herd").call(held)
    server = await start(gateway_factory, origin)
    cache = cache_of(server)
    clients = [asyncio.create_task(get(server, "/herd", protocol=protocol)) for _ in range(5)]
    await arrived.wait()
    await until_waiting(cache, 4)  # four wait behind the one the upstream holds
    release.set()
    answers = await asyncio.gather(*clients)
    assert [answer.body for answer in answers] == [b"herd"] * 5
    assert sum("collapsed" in answer.cache_status for answer in answers) == 4
    assert len(seen(origin, "/herd")) == 1


async def test_a_body_past_max_object_size_streams_whole_and_is_not_stored(
    gateway_factory: GatewayFactory, origin: ScriptedUpstream
) -> None:
    body = bytes(range(256)) * 16  # 4 KiB
    origin.on("GET", "/big").reply(body=body, headers=dated(Cache_Control="max-age=600"))
    server = await start(gateway_factory, origin, "max_object_size: 1KiB")
    for _ in range(2):
        assert (await get(server, "/big")).body == body
    assert len(seen(origin, "/big")) == 2


async def test_a_body_streams_to_the_client_while_it_is_stored(
    gateway_factory: GatewayFactory,
) -> None:
    # An upstream that sends its head and a first chunk, then the rest when released.
    release = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n"
        )
        await release.wait()
        writer.write(b"4\r\nlast\r\n0\r\n\r\n")
        await writer.drain()

    upstream = await asyncio.start_server(answer, "127.0.0.1", 0)
    host, port = upstream.sockets[0].getsockname()[:2]
    try:
        server = await gateway_factory(cache_config(f"http://{host}:{port}"))
        async with (
            httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as client,
            client.stream("GET", base_url(server) + "/streamed") as response,
        ):
            assert response.headers["cache-status"].endswith("; stored")
            chunks = response.aiter_raw()
            assert await anext(chunks) == b"first"  # before the upstream sent the rest
            assert cache_of(server).store.size == 0  # type: ignore[union-attr]
            release.set()
            rest = b"".join([chunk async for chunk in chunks])
        assert rest == b"last"
        await _stored(server, 1)
        hit = await get(server, "/streamed")
        assert (hit.body, hit.cache_status[:15]) == (b"firstlast", "gatehouse; hit;")
    finally:
        release.set()
        upstream.close()
        for writer in writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await upstream.wait_closed()


async def test_an_unsafe_request_invalidates_the_stored_response(
    gateway_factory: GatewayFactory, origin: ScriptedUpstream
) -> None:
    origin.on("GET", "/doc").reply(headers=dated(Cache_Control="max-age=600"))
    origin.on("POST", "/doc").reply(204)
    server = await start(gateway_factory, origin)
    await get(server, "/doc")
    await _stored(server, 1)
    posted = await get(server, "/doc", method="POST")
    assert posted.cache_status == "gatehouse; fwd=bypass; detail=method"
    await _stored(server, 0)
    await get(server, "/doc")
    assert len(seen(origin, "/doc")) == 3


async def test_a_worker_purges_its_memory_by_key_and_by_prefix(
    gateway_factory: GatewayFactory, origin: ScriptedUpstream
) -> None:
    """What each worker does for POST /cache/purge (the supervisor's fan-out over the
    control channel is tests/e2e/test_mw_cache_redis.py's)."""
    origin.on("GET", prefix="/p/").reply(headers=dated(Cache_Control="max-age=600"))
    server = await start(gateway_factory, origin)
    for path in ("/p/1", "/p/2", "/p/3"):
        await get(server, path)
    await _stored(server, 3)
    host, port = server.addresses[0]
    assert await server.purge_caches("", f"GET {host}:{port}/p/1", None) == {"cache": 1}
    await _stored(server, 2)
    assert await server.purge_caches("nope", "", "") == {}
    assert await server.purge_caches("", "", f"GET {host}:{port}/p/") == {"cache": 2}
    await _stored(server, 0)
    assert (await get(server, "/p/2")).cache_status.startswith("gatehouse; fwd=uri-miss")


async def test_the_requests_own_directives(
    gateway_factory: GatewayFactory, origin: ScriptedUpstream
) -> None:
    origin.on("GET", "/rd").reply(body="rd", headers=dated(Cache_Control="max-age=600"))
    server = await start(gateway_factory, origin)
    refused = await get(server, "/rd", {"Cache-Control": "only-if-cached"})
    assert refused.status == 504
    assert b'"not_cached"' in refused.body
    await get(server, "/rd")
    await _stored(server, 1)
    assert (await get(server, "/rd", {"Cache-Control": "only-if-cached"})).body == b"rd"
    forwarded = await get(server, "/rd", {"Cache-Control": "no-cache"})
    assert forwarded.cache_status.startswith("gatehouse; fwd=request; fwd-status=200")
    assert len(seen(origin, "/rd")) == 2
    await _stored(server, 1)
    old = await get(server, "/rd", {"Cache-Control": "max-age=0"})
    assert old.cache_status.startswith("gatehouse; fwd=request")
    assert len(seen(origin, "/rd")) == 3


async def test_heuristic_freshness_is_off_unless_configured(
    gateway_factory: GatewayFactory, origin: ScriptedUpstream
) -> None:
    modified = format_http_date(time.time() - 10 * HOUR_AGO)
    origin.on("GET", "/h").reply(body="h", headers=dated(Last_Modified=modified))
    plain = await start(gateway_factory, origin)
    await get(plain, "/h")
    await _stored(plain, 1)
    assert (await get(plain, "/h")).cache_status.startswith("gatehouse; fwd=stale")
    assert seen(origin, "/h")[-1].headers["If-Modified-Since"] == modified
    heuristic = await start(gateway_factory, origin, "heuristic: 0.1")  # fresh for an hour
    await get(heuristic, "/h")
    await _stored(heuristic, 1)
    assert (await get(heuristic, "/h")).cache_status.startswith("gatehouse; hit; ttl=")
    assert len(seen(origin, "/h")) == 3


async def test_age_counts_the_age_the_upstream_gave(
    gateway_factory: GatewayFactory, origin: ScriptedUpstream
) -> None:
    origin.on("GET", "/aged").reply(headers=dated(Cache_Control="max-age=600", Age="100"))
    server = await start(gateway_factory, origin)
    await get(server, "/aged")
    await _stored(server, 1)
    hit = await get(server, "/aged")
    assert int(hit.headers["age"]) >= 100
    ttl = int(hit.cache_status.rpartition("ttl=")[2])
    assert 0 < ttl <= 500
