"""The `redis` backend of `cache`: entries in Redis, shared by every worker and every
gateway pointed at the same server.

A key is one Redis hash (`key_prefix + key`) whose fields are its variants
(`Entry.variant`, "" without Vary) and whose values are entries as bytes
(`Entry.to_bytes`). The hash expires when its newest entry is no longer worth keeping
(fresh time left, the stale windows, and `keep_stale` for an entry that can be
revalidated), so Redis forgets what the cache would not use; Redis' own `maxmemory`
policy bounds the total.

Every call is bounded by `timeout_s` (redis-py's socket timeouts and an `asyncio.timeout`
around the whole call). A failure of any kind is a `CacheBackendError`: the middleware
then goes on without the cache, and the request never fails for it. For `OUTAGE_RETRY_S`
after a failure Redis is not asked at all (a frozen Redis would otherwise cost every
request a timeout). An outage is logged once when it starts and once when Redis answers
again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

import redis.asyncio

from middleware.cache_store import MAX_VARIANTS, CacheBackendError, Entry
from middleware.redis_client import FAILURES, describe_url, make_client

log = logging.getLogger(__name__)

POOL_MAX_CONNECTIONS = 64  # per worker: a lookup or a store is one short round trip
# After a failure, requests bypass the cache without asking Redis for this long, so that a
# Redis that stopped answering costs one timeout per second, not one per request.
OUTAGE_RETRY_S = 1.0
PURGE_SCAN_COUNT = 500  # keys SCAN visits per call while purging a prefix
PURGE_TIMEOUT_FACTOR = 20  # a purge walks the keyspace: it may take this many timeouts


def glob_escaped(text: str) -> str:
    """`text` matched literally by a Redis glob pattern (SCAN MATCH)."""
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)


class RedisStore:
    """Entries stored in Redis under `key_prefix + key`. The constructor only checks the
    URL; the client is made in `start()` (or on first use), on the running loop.

    Raises:
        ValueError: from the constructor, when redis-py cannot use `url`.
    """

    def __init__(self, url: str, timeout_s: float, key_prefix: str) -> None:
        self.url = url
        self.where = describe_url(url)
        self.timeout_s = timeout_s
        self.key_prefix = key_prefix
        self.up = True  # False during an outage (logged once)
        self.closed = False
        self._client: redis.asyncio.Redis | None = None
        self._outage_started = 0.0
        self._retry_at = 0.0  # monotonic: during an outage, Redis is not asked before then

    def __repr__(self) -> str:
        return f"<RedisStore {self.where} prefix={self.key_prefix!r}>"

    def _connected(self) -> redis.asyncio.Redis:
        if self.closed:
            raise CacheBackendError(f"{self!r} is closed")
        if not self.up and time.monotonic() < self._retry_at:
            raise CacheBackendError(f"Redis {self.where} is unavailable")
        client = self._client
        if client is None:
            client = self._client = make_client(self.url, self.timeout_s, POOL_MAX_CONNECTIONS)
        return client

    async def start(self) -> None:
        """Make the client and ask Redis once (bounded): Redis being down is no error
        here, only logged, and the cache is bypassed until it answers."""
        client = self._connected()
        try:
            async with asyncio.timeout(self.timeout_s):
                await client.ping()
        except FAILURES as exc:
            self._failed(exc)

    async def close(self) -> None:
        """Close the client; later calls fail (and the cache is bypassed)."""
        self.closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def get(self, key: str) -> list[Entry]:
        """Every variant stored under `key`.

        Raises:
            CacheBackendError: Redis failed or is slower than `timeout_s`.
        """
        client = self._connected()
        try:
            async with asyncio.timeout(self.timeout_s):
                stored: dict[Any, Any] = await client.hgetall(self._full(key))
        except FAILURES as exc:
            raise self._failed(exc) from exc
        self._answered()
        return [Entry.from_bytes(bytes(value)) for value in stored.values()]

    async def put(self, key: str, entry: Entry, keep_s: float) -> None:
        """Store `entry` as its variant of `key`; the key lives `keep_s` more at least.

        Raises:
            CacheBackendError: as `get`.
        """
        client = self._connected()
        full = self._full(key)
        keep_ms = max(1000, math.ceil(keep_s * 1000))
        try:
            async with asyncio.timeout(self.timeout_s):
                pipe = client.pipeline(transaction=True)
                pipe.hset(full, entry.variant, entry.to_bytes())  # type: ignore[unused-awaitable]  # queued
                pipe.hlen(full)  # type: ignore[unused-awaitable]  # queued
                pipe.pttl(full)  # type: ignore[unused-awaitable]  # queued
                _, variants, ttl_ms = await pipe.execute()
                if int(ttl_ms) < keep_ms:
                    await client.pexpire(full, keep_ms)
                if int(variants) > MAX_VARIANTS:
                    # A Vary on a field of many values: keep this variant alone.
                    await client.delete(full)
                    await client.hset(full, entry.variant, entry.to_bytes())
                    await client.pexpire(full, keep_ms)
        except FAILURES as exc:
            raise self._failed(exc) from exc
        self._answered()

    async def delete(self, key: str) -> int:
        """Forget every variant of `key`; how many there were.

        Raises:
            CacheBackendError: as `get`.
        """
        client = self._connected()
        full = self._full(key)
        try:
            async with asyncio.timeout(self.timeout_s):
                pipe = client.pipeline(transaction=True)
                pipe.hlen(full)  # type: ignore[unused-awaitable]  # queued
                pipe.delete(full)  # type: ignore[unused-awaitable]  # queued
                variants, _ = await pipe.execute()
        except FAILURES as exc:
            raise self._failed(exc) from exc
        self._answered()
        return int(variants)

    async def purge(self, prefix: str) -> int:
        """Forget every key that starts with `prefix` (a SCAN of the keyspace, bounded by
        `PURGE_TIMEOUT_FACTOR` timeouts); how many keys there were.

        Raises:
            CacheBackendError: as `get`.
        """
        client = self._connected()
        pattern = (glob_escaped(self.key_prefix + prefix) + "*").encode("utf-8", "surrogatepass")
        removed = 0
        try:
            async with asyncio.timeout(self.timeout_s * PURGE_TIMEOUT_FACTOR):
                async for found in client.scan_iter(match=pattern, count=PURGE_SCAN_COUNT):
                    removed += int(await client.delete(found))
        except FAILURES as exc:
            raise self._failed(exc) from exc
        self._answered()
        return removed

    def _full(self, key: str) -> bytes:
        return (self.key_prefix + key).encode("utf-8", "surrogatepass")

    def _failed(self, exc: BaseException) -> CacheBackendError:
        self._retry_at = time.monotonic() + OUTAGE_RETRY_S
        if isinstance(exc, TimeoutError) and not str(exc):
            reason = f"no answer within {self.timeout_s * 1000:.0f}ms"
        else:
            reason = f"{type(exc).__name__}: {exc}"
        if self.up:
            self.up = False
            self._outage_started = time.monotonic()
            log.warning(
                "cache: Redis %s is unavailable (%s); requests bypass the cache until it answers",
                self.where,
                reason,
            )
        return CacheBackendError(f"Redis {self.where}: {reason}")

    def _answered(self) -> None:
        if not self.up:
            self.up = True
            log.warning(
                "cache: Redis %s answers again after %.1fs",
                self.where,
                time.monotonic() - self._outage_started,
            )
