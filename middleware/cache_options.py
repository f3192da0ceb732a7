"""The `cache` middleware's options: the key tables `gatehouse schema` prints, the key
specification, and the store they choose (each worker's memory, or Redis)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from metrics.definitions import CACHE_EVICTIONS
from middleware.cache_key import QUERY_FORMS, KeySpec
from middleware.cache_store import MemoryStore
from proxy import Option, Options

if TYPE_CHECKING:
    from middleware.cache_redis import RedisStore  # redis-py: imported only when configured

DEFAULT_MAX_OBJECT_BYTES = 1024 * 1024
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_REDIS_TIMEOUT_S = 0.25
DEFAULT_COALESCE_TIMEOUT_S = 5.0
DEFAULT_KEEP_STALE_S = 600.0
REDIS_KEY_PREFIX = "gatehouse:cache:"


KEY_OPTIONS: dict[str, Option] = {
    "method": Option.boolean("the method is part of the key", True),
    "host": Option.boolean("the Host is part of the key", True),
    "query": Option.choice(QUERY_FORMS, "the query in the key: sorted, as sent, or none", "sorted"),
    "query_keep": Option.strings("only these query parameters are part of the key", []),
    "query_drop": Option.strings("these query parameters are not part of the key", []),
    "headers": Option.strings("request fields whose values are part of the key", []),
}
REDIS_OPTIONS: dict[str, Option] = {
    "url": Option.string("redis://host:port/db or rediss://...", required=True),
    "timeout": Option.duration(
        "a Redis call slower than this bypasses the cache", DEFAULT_REDIS_TIMEOUT_S, True
    ),
}
OPTIONS: dict[str, Option] = {
    "backend": Option.choice(
        ("memory", "redis"), "each worker's memory, or shared through Redis", "memory"
    ),
    "redis": Option.mapping(REDIS_OPTIONS, "the Redis backend (backend: redis)"),
    "max_object_size": Option.size(
        "the largest response body stored (a larger one streams, and is not stored)",
        DEFAULT_MAX_OBJECT_BYTES,
        True,
    ),
    "max_size": Option.size(
        "what the memory backend holds in all, per worker (least recently used evicted)",
        DEFAULT_MAX_BYTES,
        True,
    ),
    "key": Option.mapping(KEY_OPTIONS, "what names a cached response"),
    "heuristic": Option.number(
        "fraction of the time since Last-Modified a response without explicit "
        "freshness is fresh (0: off)",
        0,
    ),
    "max_stale": Option.duration(
        "caps stale-while-revalidate and stale-if-error (absent: as the origin says)"
    ),
    "keep_stale": Option.duration(
        "how long Redis keeps an entry that can be revalidated after it went stale",
        DEFAULT_KEEP_STALE_S,
    ),
    "coalesce": Option.boolean("concurrent misses of one key make one upstream request", True),
    "coalesce_timeout": Option.duration(
        "how long a coalesced miss waits for the first before going upstream itself",
        DEFAULT_COALESCE_TIMEOUT_S,
        True,
    ),
    "status_name": Option.string("this cache's name in Cache-Status", "gatehouse"),
}


def read_key_spec(options: Options) -> KeySpec:
    """The `key:` mapping: what names a cached response."""
    key = options.nested("key", KEY_OPTIONS)
    if key is None:
        return KeySpec()
    return KeySpec(
        method=key.boolean("method", True),
        host=key.boolean("host", True),
        query=key.choice("query", QUERY_FORMS, "sorted"),
        query_keep=key.strings("query_keep"),
        query_drop=key.strings("query_drop"),
        headers=key.strings("headers"),
    )


def open_store(options: Options) -> MemoryStore | RedisStore:
    """The store `backend` names (problems reported on `options`: a store that never
    serves stands in, since the load then fails)."""
    max_bytes = options.size("max_size", DEFAULT_MAX_BYTES, positive=True)
    if options.choice("backend", ("memory", "redis"), "memory") == "redis":
        if "max_size" in options:
            options.error("max_size", "only used with backend: memory (Redis' maxmemory bounds it)")
        return _redis_store(options, max_bytes)
    if "redis" in options:
        options.error("redis", "only used with backend: redis")
    return MemoryStore(max_bytes, CACHE_EVICTIONS.labels(options.name).inc)


def _redis_store(options: Options, max_bytes: int) -> MemoryStore | RedisStore:
    redis = options.nested("redis", REDIS_OPTIONS)
    fallback = MemoryStore(max_bytes)  # never serves: the load fails
    if redis is None:
        if "redis" not in options:
            options.error("redis", "backend: redis needs a 'redis: {url: ...}' mapping")
        return fallback
    url = redis.string("url")
    timeout_s = redis.duration("timeout", DEFAULT_REDIS_TIMEOUT_S, positive=True)
    if redis.failed or "url" not in redis:
        return fallback
    try:
        from middleware.cache_redis import RedisStore
    except ImportError as exc:
        options.error("backend", f"the redis backend cannot be loaded: {exc}")
        return fallback
    try:
        return RedisStore(url, timeout_s, f"{REDIS_KEY_PREFIX}{options.name}:")
    except ValueError as exc:
        redis.error("url", f"invalid Redis URL: {exc}")
        return fallback
