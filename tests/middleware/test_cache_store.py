"""The cache's entries and its memory backend (middleware/cache_store.py), and the key
(middleware/cache_key.py): LRU eviction within the total size, variants per key, purges,
the bytes form Redis stores, and what names a response."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from middleware.cache_key import KeySpec
from middleware.cache_store import (
    MAX_VARIANTS,
    CacheBackendError,
    Entry,
    MemoryStore,
    pick_variant,
)
from proxy.core.body import Body
from proxy.core.models import Request


def entry(body: bytes = b"x", *, vary: tuple[str, ...] = (), values: tuple[str, ...] = ()) -> Entry:
    return Entry(200, [("Cache-Control", "max-age=60")], body, 1.0, 2.0, vary, values)


async def test_memory_store_evicts_least_recently_used_within_max_bytes() -> None:
    evicted: list[int] = []
    one = entry(b"a" * 1000)
    store = MemoryStore(3 * one.size, lambda: evicted.append(1))
    for key in ("a", "b", "c"):
        await store.put(key, entry(b"a" * 1000), 60)
    assert len(store) == 3
    assert await store.get("a")  # "a" is now the most recently used
    await store.put("d", entry(b"a" * 1000), 60)
    assert await store.get("b") == []
    assert [bool(await store.get(key)) for key in ("a", "c", "d")] == [True, True, True]
    assert evicted == [1]
    assert store.size == 3 * one.size


async def test_memory_store_refuses_an_entry_larger_than_everything() -> None:
    store = MemoryStore(100)
    await store.put("big", entry(b"a" * 1000), 60)
    assert len(store) == 0
    assert store.size == 0


async def test_variants_are_kept_per_key_and_bounded() -> None:
    store = MemoryStore(10**7)
    await store.put("k", entry(b"en", vary=("accept-language",), values=("en",)), 60)
    await store.put("k", entry(b"fr", vary=("accept-language",), values=("fr",)), 60)
    await store.put("k", entry(b"fr2", vary=("accept-language",), values=("fr",)), 60)
    variants = await store.get("k")
    assert sorted(item.body for item in variants) == [b"en", b"fr2"]
    chosen = pick_variant(variants, [("Accept-Language", "fr")])
    assert chosen is not None
    assert chosen.body == b"fr2"
    assert pick_variant(variants, [("Accept-Language", "de")]) is None
    for index in range(MAX_VARIANTS + 5):
        await store.put("k", entry(vary=("x",), values=(str(index),)), 60)
    assert len(await store.get("k")) == MAX_VARIANTS


async def test_delete_and_purge_by_prefix() -> None:
    store = MemoryStore(10**7)
    for key in ("GET a/1", "GET a/2", "GET b/1"):
        await store.put(key, entry(), 60)
    assert await store.delete("GET a/1") == 1
    assert await store.delete("GET a/1") == 0
    assert await store.purge("GET a/") == 1
    assert await store.get("GET b/1")
    assert await store.purge("") == 1
    assert len(store) == 0
    assert store.size == 0


def test_entry_bytes_round_trip_and_refuse_garbage() -> None:
    original = Entry(
        203, [("ETag", '"v"'), ("X-Ünï", "välue")], b"\x00body", 1.5, 2.5, ("a",), ("b",)
    )
    copy = Entry.from_bytes(original.to_bytes())
    assert (copy.status, copy.fields, copy.body) == (203, original.fields, b"\x00body")
    assert (copy.request_time, copy.response_time) == (1.5, 2.5)
    assert (copy.vary_names, copy.vary_values, copy.variant) == (("a",), ("b",), original.variant)
    for garbage in (b"", b"nonsense", b"GHC1\x00\x00\x00\x05{bad}"):
        with pytest.raises(CacheBackendError):
            Entry.from_bytes(garbage)


def request(target: bytes, headers: dict[str, str] | None = None) -> Request:
    return Request(
        "GET", target, CIMultiDict(headers or {}), Body.from_bytes(b""), host="API.example.com"
    )


def test_key_defaults_sort_the_query() -> None:
    spec = KeySpec()
    assert spec.key(request(b"/u?b=2&a=1")) == "GET api.example.com/u?a=1&b=2"
    assert spec.key(request(b"/u")) == "GET api.example.com/u"
    assert spec.key(request(b"/u"), "GET") == spec.key(request(b"/u"))


def test_key_parts_are_chosen() -> None:
    spec = KeySpec(method=False, host=False, query="as_sent", headers=["Accept-Language"])
    assert spec.key(request(b"/u?b=2&a=1", {"Accept-Language": "en"})) == (
        "/u?b=2&a=1 accept-language=en"
    )
    assert KeySpec(query="none").key(request(b"/u?a=1")) == "GET api.example.com/u"
    keep = KeySpec(query_keep=["id"])
    assert keep.key(request(b"/u?utm=x&id=7")) == "GET api.example.com/u?id=7"
    drop = KeySpec(query_drop=["utm"])
    assert drop.key(request(b"/u?utm=x&z=1&id=7")) == "GET api.example.com/u?id=7&z=1"
