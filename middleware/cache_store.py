"""What the `cache` middleware stores, and the memory backend that stores it.

An `Entry` is one stored response: its status, its fields, its whole body, when it was
asked for and when it arrived (for its age, RFC 9111 section 4.2.3), and the request
values of the fields it varies on. Entries are kept per key, one per variant (`Vary`),
at most `MAX_VARIANTS` per key.

`MemoryStore` keeps them in this worker's memory, bounded by a total size with the least
recently used entries evicted first. The Redis backend (middleware/cache_redis.py) has
the same methods; `to_bytes`/`from_bytes` are the form it stores entries in.
"""

from __future__ import annotations

import json
import struct
from collections import OrderedDict
from collections.abc import Callable
from hashlib import blake2b

from middleware.cache_rules import Fields, vary_values

MAX_VARIANTS = 16  # variants kept per key: a Vary on a field of many values cannot grow a key
_ENTRY_OVERHEAD = 256  # what an entry costs besides its fields and body (objects, the index)
_MAGIC = b"GHC1"
_HEAD = struct.Struct(">4sI")


class CacheBackendError(Exception):
    """The store failed (Redis unreachable, too slow, an answer that is not an entry):
    the request goes on without the cache."""


class Entry:
    """One stored response."""

    __slots__ = (
        "body",
        "facts",
        "fields",
        "request_time",
        "response_time",
        "status",
        "vary_names",
        "vary_values",
    )

    def __init__(
        self,
        status: int,
        fields: list[tuple[str, str]],
        body: bytes,
        request_time: float,
        response_time: float,
        vary_names: tuple[str, ...] = (),
        vary_values: tuple[str, ...] = (),
    ) -> None:
        self.status = status
        self.fields = fields
        self.body = body
        self.request_time = request_time
        self.response_time = response_time
        self.vary_names = vary_names
        self.vary_values = vary_values
        # What the middleware works out of the entry once (cache.py's Facts).
        self.facts: object = None

    def __repr__(self) -> str:
        return f"<Entry {self.status} {len(self.body)}B vary={self.vary_names}>"

    @property
    def size(self) -> int:
        """The bytes the entry costs, roughly: its body, its fields and a constant."""
        return (
            len(self.body)
            + sum(len(name) + len(value) for name, value in self.fields)
            + _ENTRY_OVERHEAD
        )

    @property
    def variant(self) -> str:
        """Which variant of its key the entry is: a digest of what it varies on."""
        if not self.vary_names:
            return ""
        text = "\n".join((*self.vary_names, "", *self.vary_values))
        return blake2b(text.encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()

    def with_fields(
        self, fields: list[tuple[str, str]], request_time: float, response_time: float
    ) -> Entry:
        """This entry freshened by a 304: new fields and times, the same body."""
        return Entry(
            self.status,
            fields,
            self.body,
            request_time,
            response_time,
            self.vary_names,
            self.vary_values,
        )

    def with_body(self, body: bytes) -> Entry:
        """This entry with `body` (a response stored once its body has arrived)."""
        return Entry(
            self.status,
            self.fields,
            body,
            self.request_time,
            self.response_time,
            self.vary_names,
            self.vary_values,
        )

    def to_bytes(self) -> bytes:
        """The entry as bytes (what Redis stores)."""
        meta = json.dumps(
            {
                "s": self.status,
                "f": self.fields,
                "q": self.request_time,
                "r": self.response_time,
                "vn": self.vary_names,
                "vv": self.vary_values,
            },
            separators=(",", ":"),
        ).encode()
        return _HEAD.pack(_MAGIC, len(meta)) + meta + self.body

    @classmethod
    def from_bytes(cls, data: bytes) -> Entry:
        """An entry from `to_bytes`.

        Raises:
            CacheBackendError: the bytes are not an entry.
        """
        try:
            magic, size = _HEAD.unpack_from(data)
            if magic != _MAGIC:
                raise ValueError("not a cache entry")
            meta = json.loads(data[_HEAD.size : _HEAD.size + size])
            return cls(
                int(meta["s"]),
                [(str(name), str(value)) for name, value in meta["f"]],
                data[_HEAD.size + size :],
                float(meta["q"]),
                float(meta["r"]),
                tuple(str(name) for name in meta["vn"]),
                tuple(str(value) for value in meta["vv"]),
            )
        except (ValueError, TypeError, KeyError, struct.error) as exc:
            raise CacheBackendError(f"a stored entry cannot be read: {exc}") from exc


def pick_variant(entries: list[Entry], request_fields: Fields) -> Entry | None:
    """The entry whose varied-on values are the request's, if any."""
    for entry in entries:
        names = entry.vary_names
        if not names or entry.vary_values == vary_values(names, request_fields):
            return entry
    return None


class MemoryStore:
    """Entries in this worker's memory: at most `max_bytes` in all, the least recently
    used evicted first (`on_evict` counts each eviction)."""

    def __init__(self, max_bytes: int, on_evict: Callable[[], None] | None = None) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._on_evict = on_evict
        # (key, variant) -> entry, least recently used first
        self._entries: OrderedDict[tuple[str, str], Entry] = OrderedDict()
        self._variants: dict[str, dict[str, Entry]] = {}  # key -> variant -> entry

    def __repr__(self) -> str:
        return f"<MemoryStore {len(self._entries)} entries {self.size}/{self.max_bytes}B>"

    def __len__(self) -> int:
        return len(self._entries)

    async def start(self) -> None:
        """Nothing to start."""

    async def close(self) -> None:
        """Forget everything."""
        self._entries.clear()
        self._variants.clear()
        self.size = 0

    async def get(self, key: str) -> list[Entry]:
        """Every variant stored under `key` (each marked as just used)."""
        return self.get_now(key)

    def get_now(self, key: str) -> list[Entry]:
        """`get` without a coroutine (the memory store never waits)."""
        variants = self._variants.get(key)
        if not variants:
            return []
        for variant in variants:
            self._entries.move_to_end((key, variant))
        return list(variants.values())

    async def put(self, key: str, entry: Entry, keep_s: float) -> None:
        """Store `entry` under `key`, replacing the variant it is; evict to fit. (`keep_s`,
        how long the entry is worth keeping, is for Redis: here the LRU order decides.)"""
        self.put_now(key, entry)

    def put_now(self, key: str, entry: Entry) -> None:
        """`put` without a coroutine (a whole body is stored before the response goes)."""
        size = entry.size
        if size > self.max_bytes:
            return
        variant = entry.variant
        variants = self._variants.setdefault(key, {})
        if variant not in variants and len(variants) >= MAX_VARIANTS:
            self._remove(key, next(iter(variants)))  # the key's oldest variant
        self._remove(key, variant)
        variants = self._variants.setdefault(key, {})
        variants[variant] = entry
        self._entries[(key, variant)] = entry
        self.size += size
        while self.size > self.max_bytes:
            (old_key, old_variant), _ = next(iter(self._entries.items()))
            self._remove(old_key, old_variant)
            if self._on_evict is not None:
                self._on_evict()

    async def delete(self, key: str) -> int:
        """Forget every variant of `key`; how many there were."""
        return self.delete_now(key)

    def delete_now(self, key: str) -> int:
        """`delete` without a coroutine."""
        variants = self._variants.get(key)
        if not variants:
            return 0
        names = list(variants)
        for variant in names:
            self._remove(key, variant)
        return len(names)

    async def purge(self, prefix: str) -> int:
        """Forget every entry whose key starts with `prefix`; how many there were."""
        removed = 0
        for key in [key for key in self._variants if key.startswith(prefix)]:
            removed += self.delete_now(key)
        return removed

    def _remove(self, key: str, variant: str) -> None:
        entry = self._entries.pop((key, variant), None)
        if entry is None:
            return
        self.size -= entry.size
        variants = self._variants[key]
        del variants[variant]
        if not variants:
            del self._variants[key]
