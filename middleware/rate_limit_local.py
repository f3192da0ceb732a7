"""The `local` backend of `rate_limit`: one GCRA table shared by every worker process.

The gateway forks its workers from a parent after the config is loaded, and middleware
factories run at config load, so what the constructor makes is inherited by every worker.
The table is an anonymous shared mapping (`mmap.mmap(-1, size)`: MAP_SHARED|MAP_ANONYMOUS,
which fork does not copy) and its guard a process-shared semaphore: every worker reads and
writes the same slots under the same lock, so a limit holds for the whole instance, not
per worker. `time.monotonic()` is CLOCK_MONOTONIC, one clock for every process on Linux.

Layout: `slots` (a power of two, twice `max_keys`, so that probing rarely meets a full
window) records of (key hash: 8 bytes of BLAKE2b keyed with a secret drawn at
construction, tat: float64 seconds), plus
`PROBE_SLOTS - 1` records past the end so that a window never wraps. A key's home is
`hash & (slots - 1)`; it lives in one of the `PROBE_SLOTS` records from there (open
addressing, linear probing, read with one `struct.unpack_from`).

- A record whose `tat` is in the past is free: GCRA treats such a key like a new one, so
  idle keys expire by themselves and memory stays bounded (32 bytes x `max_keys`, rounded
  up to a power of two; pages are only touched when a key lands on them).
- A new key takes the record with the smallest `tat` in its window. When all of them are
  live (more keys active at once than the table was sized for), that is an eviction:
  the key with the least outstanding debt is forgotten and will be admitted as if new.
  Eviction errs towards admitting, never towards refusing a client that is within its
  limit; `on_evict` is called so the middleware can count it.

The critical section is one unpack, a comparison and at most one pack. It computes the
same branch and new `tat` as `rate_limit_core.gcra()`, with the same floating-point
operations in the same order; the Decision itself is then made by `gcra()` from the old
`tat` and `now`, outside the lock (as the Redis backend does with its script's answer).

A worker killed while holding the lock (SIGKILL, OOM killer) would leave it taken: a
waiter that cannot get it within `lock_break_s` breaks it (a semaphore has no owner and
cannot be released above 1, so at worst two decisions overlap once) and logs that it did.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import multiprocessing
import os
import time
from collections.abc import Callable
from hashlib import blake2b
from struct import Struct

from middleware.rate_limit_core import SLACK_S, Decision, RateLimitBackendError, gcra

log = logging.getLogger(__name__)

PROBE_SLOTS = 8  # records a key may occupy from its home: one unpack reads them all
DEFAULT_MAX_KEYS = 65536
MAX_MAX_KEYS = 1 << 24  # 512 MiB of address space at most (touched lazily)
# Far longer than any critical section (microseconds), even on a loaded host where the
# holder is preempted; only a holder that died keeps the lock this long.
LOCK_BREAK_S = 0.25

_SLOT = Struct("<Qd")  # key hash, tat
SLOT_BYTES = _SLOT.size
_WINDOW = Struct("<" + "Qd" * PROBE_SLOTS)


def table_slots(max_keys: int) -> int:
    """Records in a table sized for `max_keys` live keys: a power of two, twice as many."""
    return max(PROBE_SLOTS, 1 << (2 * max_keys - 1).bit_length())


class LocalBackend:
    """GCRA decisions in a table that every worker forked after construction shares.

    Construct it before the fork (at config load), never on the event loop's behalf: it
    makes no task and does no I/O.
    """

    def __init__(
        self,
        max_keys: int = DEFAULT_MAX_KEYS,
        *,
        now: Callable[[], float] = time.monotonic,
        on_evict: Callable[[], None] | None = None,
        lock_break_s: float = LOCK_BREAK_S,
    ) -> None:
        self.max_keys = max_keys
        self.slots = table_slots(max_keys)
        self._mask = self.slots - 1
        self._table = mmap.mmap(-1, (self.slots + PROBE_SLOTS - 1) * SLOT_BYTES)
        # Keys are hashed with a secret (inherited by the workers with the table), so a
        # client cannot pick key values that land in another key's window to evict it.
        self._secret = os.urandom(16)
        # The fork context: a semaphore unlinked at once, no resource tracker process.
        self._lock = multiprocessing.get_context("fork").Lock()
        self._now = now
        self._on_evict = on_evict
        self._lock_break_s = lock_break_s

    def __repr__(self) -> str:
        return f"<LocalBackend slots={self.slots} probe={PROBE_SLOTS} max_keys={self.max_keys}>"

    async def start(self) -> None:
        """Nothing to start: the table exists since the constructor."""

    async def close(self) -> None:
        """Nothing to close: the mapping goes with the last process that holds it."""

    async def decide(self, key: str, emission_s: float, tolerance_s: float) -> Decision:
        """`decide_now`, with the backend interface's signature (it never waits)."""
        return self.decide_now(key, emission_s, tolerance_s)

    def decide_now(self, key: str, emission_s: float, tolerance_s: float) -> Decision:
        """Decide one request for `key` (see `rate_limit_core.gcra`), atomically across
        every process sharing the table.

        Raises:
            RateLimitBackendError: the lock stayed taken even after it was broken. Any
                other exception is a bug.
        """
        hashed = self.key_hash(key)
        offset = (hashed & self._mask) * SLOT_BYTES
        table = self._table
        lock = self._lock
        if not lock.acquire(True, self._lock_break_s):
            self._break_lock()
        evicted = False
        try:
            now = self._now()
            window = _WINDOW.unpack_from(table, offset)
            hashes = window[0::2]
            if hashed in hashes:
                index = hashes.index(hashed)
                tat = window[2 * index + 1]
            else:
                tats = window[1::2]
                tat = min(tats)
                index = tats.index(tat)
                evicted = tat > now
                tat = 0.0
            # gcra()'s branch and new tat, operation for operation.
            new_tat = max(tat, now) + emission_s
            if not now + SLACK_S < new_tat - tolerance_s - emission_s:
                _SLOT.pack_into(table, offset + index * SLOT_BYTES, hashed, new_tat)
        finally:
            lock.release()
        if evicted and self._on_evict is not None:
            self._on_evict()
        return gcra(tat, now, emission_s, tolerance_s)[0]

    def _break_lock(self) -> None:
        log.error(
            "rate_limit: the shared table's lock was held for over %.0fms (a worker died "
            "holding it?): breaking it",
            self._lock_break_s * 1000,
        )
        with contextlib.suppress(ValueError):  # released meanwhile: it is free already
            self._lock.release()
        if not self._lock.acquire(True, self._lock_break_s):
            raise RateLimitBackendError("the shared rate-limit table's lock stays taken")

    def key_hash(self, key: str) -> int:
        """The 64-bit hash `key` is stored under."""
        data = key.encode("utf-8", "surrogatepass")
        return int.from_bytes(blake2b(data, digest_size=8, key=self._secret).digest(), "little")

    # -- inspection (tests, diagnostics) -----------------------------------------------
    def home_slot(self, key: str) -> int:
        """The first record `key` may occupy."""
        return self.key_hash(key) & self._mask

    def live_keys(self) -> int:
        """Records holding a key whose `tat` is still ahead (a full scan: not for the
        request path)."""
        now = self._now()
        with self._lock:
            return sum(
                1
                for _, tat in _SLOT.iter_unpack(self._table)
                if tat > now  # free records and expired keys alike are behind `now`
            )
