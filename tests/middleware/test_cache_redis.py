"""The cache's Redis backend (middleware/cache_redis.py) against a real redis-server:
entries and their variants round-trip, a purge by prefix matches the prefix literally
(glob characters included), and a Redis that is gone is a CacheBackendError, logged once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from middleware.cache_redis import RedisStore, glob_escaped
from middleware.cache_store import CacheBackendError, Entry
from tests.support.redis_server import RedisServer, running_redis

pytestmark = pytest.mark.socket


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path) as server:
        yield server


def entry(body: bytes, vary: tuple[str, ...] = (), values: tuple[str, ...] = ()) -> Entry:
    return Entry(200, [("ETag", '"e"')], body, 1.0, 2.0, vary, values)


def test_glob_escaped_matches_literally() -> None:
    assert glob_escaped("GET a/*?[x]\\") == "GET a/\\*\\?\\[x\\]\\\\"


async def test_entries_round_trip_and_purge_literally(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, 1.0, "t:")
    await store.start()
    try:
        await store.put("GET a/1", entry(b"en", ("accept-language",), ("en",)), 60)
        await store.put("GET a/1", entry(b"fr", ("accept-language",), ("fr",)), 60)
        await store.put("GET a/*", entry(b"star"), 60)
        await store.put("GET b/1", entry(b"b"), 60)
        assert sorted(item.body for item in await store.get("GET a/1")) == [b"en", b"fr"]
        assert await store.get("GET nothing") == []
        assert await store.purge("GET a/*") == 1  # the key "GET a/*", not every "GET a/"
        assert [item.body for item in await store.get("GET a/1")] != []
        assert await store.delete("GET a/1") == 2
        assert await store.purge("") == 1
        assert await store.get("GET b/1") == []
    finally:
        await store.close()


async def test_a_redis_that_is_gone_is_an_error_logged_once(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    store = RedisStore(redis_server.url, 1.0, "t:")
    await store.start()
    try:
        redis_server.kill()
        with pytest.raises(CacheBackendError):
            await store.get("k")
        for _ in range(3):
            with pytest.raises(CacheBackendError):
                await store.put("k", entry(b"x"), 60)
        assert sum("is unavailable" in r.getMessage() for r in caplog.records) == 1
    finally:
        await store.close()
