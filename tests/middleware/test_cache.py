"""The cache middleware without sockets, on a clock the tests drive: its options and
their errors, freshness and age over time, revalidation, stale-while-revalidate and
stale-if-error windows, coalescing, bodies that stream while stored, and the metrics.
The RFC behaviours with a real upstream are tests/e2e/test_mw_cache.py's."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from multidict import CIMultiDict

from metrics.definitions import REGISTRY
from middleware import cache_rules as rules
from middleware.cache import Cache
from middleware.cache_errors import NotCached
from middleware.cache_store import MemoryStore
from proxy.config.document import ConfigError
from proxy.config.load import parse_config
from proxy.core.body import Body
from proxy.core.errors import UpstreamConnectError
from proxy.core.models import Request, Response

START = 1_800_000_000.0

HEAD = """\
listeners: [{bind: 127.0.0.1:0}]
upstreams: {app: {endpoints: ["http://127.0.0.1:9"]}}
routes: [{match: {path: /}, upstream: app, middleware: [cache]}]
middleware:
"""


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


def cache(options: str = "", clock: Clock | None = None) -> Cache:
    text = HEAD + f"  cache: {{type: cache{', ' + options if options else ''}}}\n"
    instance = parse_config(text).middleware["cache"].instance
    assert isinstance(instance, Cache)
    if clock is not None:
        instance.clock = clock
    return instance


def errors_of(options: str) -> list[str]:
    with pytest.raises(ConfigError) as failed:
        parse_config(HEAD + f"  cache: {{type: cache, {options}}}\n")
    return str(failed.value).splitlines()


def request(
    headers: dict[str, str] | None = None, target: bytes = b"/x", method: str = "GET"
) -> Request:
    return Request(method, target, CIMultiDict(headers or {}), Body.from_bytes(b""), host="h")


Reply = Callable[[Request], Response]


class Origin:
    """The rest of the chain: answers with `reply(request)` and keeps what it was asked."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.seen: list[Request] = []
        self.release: asyncio.Event | None = None  # when set: hold every answer until it is
        self._counts: list[tuple[int, asyncio.Event]] = []

    async def __call__(self, request: Request) -> Response:
        self.seen.append(request)
        for count, reached in self._counts:
            if len(self.seen) >= count:
                reached.set()
        if self.release is not None:
            await self.release.wait()
        return self.reply(request)

    async def until_seen(self, count: int) -> None:
        """Until `count` requests have arrived."""
        reached = asyncio.Event()
        self._counts.append((count, reached))
        if len(self.seen) >= count:
            reached.set()
        await reached.wait()


async def until_waiting(instance: Cache, count: int) -> None:
    """Until `count` coalesced misses wait for their leader."""
    reached = asyncio.Event()

    def changed(waiting: int) -> None:
        if waiting >= count:
            reached.set()

    instance.on_waiting = changed
    if instance.waiting >= count:
        reached.set()
    await reached.wait()


def answer(
    status: int = 200, body: bytes = b"hello", **fields: str
) -> Callable[[Request], Response]:
    pairs = [(name.replace("_", "-").encode(), value.encode()) for name, value in fields.items()]
    return lambda _request: Response(status, list(pairs), Body.from_bytes(body))


async def read(response: Response) -> bytes:
    parts = []
    while chunk := await response.body.read():
        parts.append(chunk)
    return b"".join(parts)


async def settle(instance: Cache) -> None:
    """Let the stores and refreshes the middleware started finish."""
    while instance.keeper.tasks:
        await asyncio.gather(*instance.keeper.tasks)


def stored(instance: Cache) -> int:
    """How many entries the instance's memory store holds."""
    assert isinstance(instance.store, MemoryStore)
    return len(instance.store)


def lookups(name: str, result: str) -> float:
    value = REGISTRY.get_sample_value(
        "gatehouse_cache_lookups_total", {"middleware": name, "result": result}
    )
    return value or 0.0


# -- options ---------------------------------------------------------------------------


def test_defaults() -> None:
    instance = cache()
    assert isinstance(instance.store, MemoryStore)
    assert instance.max_object_bytes == 1024 * 1024
    assert instance.store.max_bytes == 64 * 1024 * 1024
    assert instance.coalesce
    assert instance.max_stale is None


def test_option_errors_carry_their_line() -> None:
    assert any("routes.yaml:5" in line or ":5:" in line for line in errors_of("backend: redis"))
    assert any(
        "only used with backend: redis" in line for line in errors_of("redis: {url: 'redis://x'}")
    )
    assert any("max_object_size" in line for line in errors_of("max_object_size: lots"))
    assert any("query" in line for line in errors_of("key: {query: shuffled}"))
    assert any(
        "invalid Redis URL" in line
        for line in errors_of("backend: redis, redis: {url: 'http://x'}")
    )


# -- freshness and age -----------------------------------------------------------------


async def test_fresh_until_max_age_then_revalidated() -> None:
    clock = Clock()
    instance = cache(clock=clock)
    origin = Origin(
        answer(Cache_Control="max-age=60", ETag='"v1"', Date=rules.format_http_date(START))
    )
    first = await instance(request(), origin)
    assert await read(first) == b"hello"
    assert first.header("Cache-Status") == "gatehouse; fwd=uri-miss; ttl=60; stored"
    await settle(instance)
    clock.now += 59
    hit = await instance(request(), origin)
    assert (hit.status, await read(hit), hit.header("Age")) == (200, b"hello", "59")
    assert hit.header("Cache-Status") == "gatehouse; hit; ttl=1"
    assert len(origin.seen) == 1
    clock.now += 2
    origin.reply = answer(
        304,
        b"",
        Cache_Control="max-age=60",
        ETag='"v1"',
        X_New="yes",
        Date=rules.format_http_date(clock.now),
    )
    revalidated = await instance(request(), origin)
    assert origin.seen[-1].header("If-None-Match") == '"v1"'
    assert (revalidated.status, await read(revalidated)) == (200, b"hello")
    assert revalidated.header("X-New") == "yes"
    assert revalidated.header("Cache-Status") == "gatehouse; fwd=stale; fwd-status=304; ttl=60"
    clock.now += 30
    again = await instance(request(), origin)
    assert again.header("Age") == "30"
    assert len(origin.seen) == 2


async def test_stale_while_revalidate_answers_at_once_and_refreshes_once() -> None:
    clock = Clock()
    instance = cache(clock=clock)
    cache_control, etag = "max-age=10, stale-while-revalidate=20", '"v1"'
    origin = Origin(answer(Cache_Control=cache_control, ETag=etag))
    await read(await instance(request(), origin))
    await settle(instance)
    clock.now += 15
    origin.release = asyncio.Event()  # the background revalidation waits
    stale = [await instance(request(), origin) for _ in range(3)]
    assert all(
        response.header("Cache-Status") == ("gatehouse; hit; ttl=-5; detail=stale-while-revalidate")
        for response in stale
    )
    await origin.until_seen(2)  # the refresh, started behind the stale answers
    assert len(origin.seen) == 2  # one refresh for the three
    assert origin.seen[1].header("If-None-Match") == '"v1"'
    origin.reply = answer(304, b"", Cache_Control="max-age=10", ETag='"v1"')
    origin.release.set()
    await settle(instance)
    fresh = await instance(request(), origin)
    assert fresh.header("Cache-Status") == "gatehouse; hit; ttl=10"
    clock.now += 31  # past max-age and the window: revalidated in the foreground
    origin.reply = answer(body=b"new", Cache_Control=cache_control, ETag=etag)
    assert await read(await instance(request(), origin)) == b"new"


async def test_stale_if_error_within_its_window_only() -> None:
    clock = Clock()
    instance = cache(clock=clock)
    origin = Origin(answer(Cache_Control="max-age=10, stale-if-error=30"))
    await read(await instance(request(), origin))
    await settle(instance)
    clock.now += 20
    origin.reply = answer(503, b"down")
    served = await instance(request(), origin)
    assert (served.status, await read(served)) == (200, b"hello")
    assert (
        served.header("Cache-Status")
        == "gatehouse; fwd=stale; fwd-status=503; ttl=-10; detail=stale-if-error"
    )

    def refuse(_request: Request) -> Response:
        raise UpstreamConnectError("refused")

    origin.reply = refuse
    assert (await instance(request(), origin)).status == 200
    clock.now += 25  # 35s stale: past the window
    with pytest.raises(UpstreamConnectError):
        await instance(request(), origin)


async def test_must_revalidate_never_serves_stale() -> None:
    clock = Clock()
    instance = cache(clock=clock)
    origin = Origin(answer(Cache_Control="max-age=10, must-revalidate, stale-if-error=30"))
    await read(await instance(request(), origin))
    await settle(instance)
    clock.now += 11
    origin.reply = answer(503, b"down")
    response = await instance(request(), origin)
    assert (response.status, await read(response)) == (503, b"down")


async def test_request_directives_and_only_if_cached() -> None:
    clock = Clock()
    instance = cache(clock=clock)
    origin = Origin(answer(Cache_Control="max-age=60"))
    with pytest.raises(NotCached):
        await instance(request({"Cache-Control": "only-if-cached"}), origin)
    await read(await instance(request(), origin))
    await settle(instance)
    clock.now += 10
    await read(await instance(request({"Cache-Control": "max-age=5"}), origin))
    assert len(origin.seen) == 2
    await settle(instance)
    await read(await instance(request({"Cache-Control": "no-cache"}), origin))
    assert len(origin.seen) == 3
    hit = await instance(request({"Cache-Control": "only-if-cached"}), origin)
    assert hit.status == 200
    assert len(origin.seen) == 3


async def test_unsafe_method_invalidates_the_target() -> None:
    instance = cache(clock=Clock())
    origin = Origin(answer(Cache_Control="max-age=60"))
    await read(await instance(request(), origin))
    await settle(instance)
    posted = await instance(request(method="POST"), origin)
    assert posted.header("Cache-Status") == "gatehouse; fwd=bypass; detail=method"
    await read(await instance(request(), origin))
    assert len(origin.seen) == 3


# -- coalescing ------------------------------------------------------------------------


async def test_concurrent_misses_make_one_upstream_request() -> None:
    instance = cache(clock=Clock())
    origin = Origin(answer(Cache_Control="max-age=60"))
    origin.release = asyncio.Event()
    tasks = [asyncio.create_task(instance(request(), origin)) for _ in range(5)]
    await until_waiting(instance, 4)
    assert len(origin.seen) == 1
    origin.release.set()
    responses = await asyncio.gather(*tasks)
    assert [await read(response) for response in responses] == [b"hello"] * 5
    statuses = sorted(str(response.header("Cache-Status")) for response in responses)
    assert statuses.count("gatehouse; fwd=uri-miss; ttl=60; stored") == 1
    assert statuses.count("gatehouse; fwd=uri-miss; ttl=60; collapsed") == 4
    assert len(origin.seen) == 1


async def test_waiters_go_on_their_own_when_the_leader_stores_nothing() -> None:
    instance = cache(clock=Clock())
    origin = Origin(answer(Cache_Control="no-store"))
    origin.release = asyncio.Event()
    tasks = [asyncio.create_task(instance(request(), origin)) for _ in range(3)]
    await until_waiting(instance, 2)
    origin.release.set()
    responses = await asyncio.gather(*tasks)
    assert [response.status for response in responses] == [200] * 3
    assert len(origin.seen) == 3


async def test_a_waiter_whose_client_goes_away_stops_waiting() -> None:
    instance = cache(clock=Clock())
    origin = Origin(answer(Cache_Control="max-age=60"))
    origin.release = asyncio.Event()
    leader = asyncio.create_task(instance(request(), origin))
    waiter = asyncio.create_task(instance(request(), origin))
    await until_waiting(instance, 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert instance.waiting == 0
    origin.release.set()
    assert await read(await leader) == b"hello"


async def test_a_waiter_goes_on_alone_after_coalesce_timeout() -> None:
    instance = cache("coalesce_timeout: 10ms", clock=Clock())
    origin = Origin(answer(Cache_Control="max-age=60"))
    origin.release = asyncio.Event()
    leader = asyncio.create_task(instance(request(), origin))
    await origin.until_seen(1)
    waiter = asyncio.create_task(instance(request(), origin))
    await origin.until_seen(2)  # the waiter's own request, once its wait timed out
    origin.release.set()
    assert [r.status for r in await asyncio.gather(leader, waiter)] == [200, 200]


# -- bodies ----------------------------------------------------------------------------


def streamed(chunks: list[bytes], **fields: str) -> tuple[Callable[[Request], Response], Body]:
    body = Body(sum(map(len, chunks)))
    pairs = [(name.replace("_", "-").encode(), value.encode()) for name, value in fields.items()]
    return (lambda _request: Response(200, pairs, body)), body


async def test_a_body_streams_to_the_client_while_it_is_stored() -> None:
    instance = cache(clock=Clock())
    reply, upstream_body = streamed([b"a" * 10, b"b" * 10], Cache_Control="max-age=60")
    response = await instance(request(), Origin(reply))
    upstream_body.feed(b"a" * 10)
    assert await response.body.read() == b"a" * 10  # before the upstream's body ended
    assert stored(instance) == 0
    upstream_body.feed(b"b" * 10)
    upstream_body.feed_eof()
    assert await read(response) == b"b" * 10
    await settle(instance)
    hit = await instance(request(), Origin(answer()))
    assert await read(hit) == b"a" * 10 + b"b" * 10


async def test_a_body_past_max_object_size_streams_whole_and_is_dropped() -> None:
    instance = cache("max_object_size: 16", clock=Clock())
    body = Body(None)
    pairs = [(b"Cache-Control", b"max-age=60")]
    response = await instance(request(), Origin(lambda _r: Response(200, pairs, body)))
    body.feed(b"a" * 10)
    body.feed(b"b" * 10)
    body.feed_eof()
    assert await read(response) == b"a" * 10 + b"b" * 10
    await settle(instance)
    assert stored(instance) == 0


async def test_a_declared_length_past_max_object_size_is_not_copied() -> None:
    instance = cache("max_object_size: 4", clock=Clock())
    response = await instance(request(), Origin(answer(Cache_Control="max-age=60")))
    assert response.header("Cache-Status") == "gatehouse; fwd=uri-miss; detail=not-stored-too-big"
    assert await read(response) == b"hello"


async def test_metrics_count_each_result() -> None:
    clock = Clock()
    instance = cache(clock=clock)
    before = {r: lookups("cache", r) for r in ("hit", "miss", "stale", "revalidated", "bypass")}
    origin = Origin(answer(Cache_Control="max-age=10, stale-if-error=60", ETag='"e"'))
    await read(await instance(request(), origin))
    await settle(instance)
    await read(await instance(request(), origin))
    await read(await instance(request(method="HEAD"), origin))
    clock.now += 11
    origin.reply = answer(304, b"", ETag='"e"', Cache_Control="max-age=10, stale-if-error=60")
    await read(await instance(request(), origin))
    clock.now += 11
    origin.reply = answer(502, b"")
    await read(await instance(request(), origin))
    after = {r: lookups("cache", r) - before[r] for r in before}
    assert after == {"hit": 1, "miss": 1, "stale": 1, "revalidated": 1, "bypass": 1}


async def test_client_conditionals_are_answered_from_the_cache() -> None:
    instance = cache(clock=Clock())
    origin = Origin(answer(Cache_Control="max-age=60", ETag='"v1"'))
    await read(await instance(request(), origin))
    await settle(instance)
    response = await instance(request({"If-None-Match": '"v1"'}), origin)
    assert response.status == 304
    assert response.header("ETag") == '"v1"'
    assert len(origin.seen) == 1
    other = await instance(request({"If-None-Match": '"v0"'}), origin)
    assert other.status == 200
