"""The `local` backend of `rate_limit`: one GCRA table shared by every worker process.

Sharing. Every process of a gateway that constructs the same instance uses the same table,
whenever and wherever it constructs it:

- The supervising parent exports `GATEHOUSE_SHARED_DIR` (`SHARED_DIR_ENV`: a private
  directory it creates at start and removes at exit) before it forks the workers. With it
  set, the table is a file there, named from the key `rate_limit.py` passes (where the
  instance is defined, `middleware.NAME` or `routes[i].middleware[j]`, plus a digest of
  the options that give the records their meaning: rate, burst, key, max_keys) and the
  table's size. The first process to construct the
  instance creates the file, sizes it with `ftruncate` (sparse: pages are touched only when
  a key lands on them) and writes its header; every other one opens and maps the same file
  (MAP_SHARED). Construction is serialized by an `flock` on the file, held only while the
  header is checked or written; it does no event-loop work.
- So the table survives what happens to processes: workers forked after the parent loaded
  the config inherit the mapping; a config reload that adds or changes an instance makes
  each worker construct it on its own, after the fork, and they all open the one file; a
  worker restarted later is forked from a parent that constructed it too, and inherits
  that. A reload that changes `rate`, `burst`, `key` or `max_keys` gives the instance a new
  file (a fresh table: every key starts with a full budget), and one that changes only
  `headers` keeps the table. Files live until the parent removes the directory: a worker
  that has not reloaded yet may still use the old one, and a table left behind costs only
  its touched pages. An instance built while the variable was unset keeps its anonymous
  mapping (below), which the workers forked after it share all the same.
- Without the variable (in-process tests, library use, `gatehouse check`), or without a
  key, the table is an anonymous shared mapping (`mmap.mmap(-1, size)`), shared by the
  processes forked after construction, as before. Everything past the mapping (header,
  lock, records) is the same in both, so there is one code path to get right; a temporary
  file would add a directory to clean up for nothing the anonymous mapping lacks.

Keys are hashed with 8 bytes of BLAKE2b keyed with a secret, so a client cannot pick key
values that land in another key's window to evict it. The secret is drawn once, by the
process that creates the table, and kept in the header, so every process hashes alike.
Each process remembers the hashes of the keys it saw last (up to `HASH_CACHE_KEYS`, then
it starts over), so the requests of one client cost a dict lookup, not a BLAKE2b; a
client sending ever new keys costs what every key cost before.
`time.monotonic()` is CLOCK_MONOTONIC, one clock for every process on Linux.

Layout: a `HEADER_BYTES` header (magic, slots, secret; the lock at `MUTEX_OFFSET`), then
`slots` (a power of two, twice `max_keys`, so that probing rarely meets a full window)
records of (key hash, tat: float64 seconds), plus `PROBE_SLOTS - 1` records past the end so
that a window never wraps. A key's home is `hash & (slots - 1)`; it lives in one of the
`PROBE_SLOTS` records from there (open addressing, linear probing, read with one
`struct.unpack_from`).

- A record whose `tat` is in the past is free: GCRA treats such a key like a new one, so
  idle keys expire by themselves and memory stays bounded (16 bytes x `slots`, 32 x
  `max_keys` rounded up to a power of two; pages are only touched when a key lands on
  them). On a tmpfs the touched pages count against its size, and a page that cannot be
  had is a SIGBUS: the creator warns when the directory has less room than the table.
- A new key takes the record with the smallest `tat` in its window. When all of them are
  live (more keys active at once than the table was sized for), that is an eviction:
  the key with the least outstanding debt is forgotten and will be admitted as if new.
  Eviction errs towards admitting, never towards refusing a client that is within its
  limit; `on_evict` is called so the middleware can count it.

The lock is a process-shared robust pthread mutex in the header, called through ctypes.
Measured with timeit on the 2-core dev host, lock and unlock alone: a multiprocessing
semaphore 0.08 us, this mutex 0.23 us, `fcntl.flock` 0.7 us, `fcntl.lockf` 1.0 us, OFD
locks 1.1 us; a whole decision (1000 keys, 64K-key table): 2.4 us with the semaphore,
2.7 us with the mutex, 3.9 us with `lockf`. The semaphore cannot be opened by a process
that did not inherit it, and the fcntl locks are two syscalls per decision; the mutex is
a futex, taken without a syscall when free. Robustness replaces the old lock-breaking
(which let two decisions overlap): when a holder dies (SIGKILL, OOM killer) the kernel
marks the mutex, and the next process to take it, or the one waiting for it, gets
EOWNERDEAD, marks it consistent and logs it (the dead holder's critical section wrote at
most one record). The kernel finds the mutexes a dead process held through its mapping,
which the backend never lets go of while holding the lock. A holder that is alive but
stopped for over `lock_timeout_s` makes the waiter give up with `RateLimitBackendError`
(`on_redis_error` then decides) rather than hang its event loop. Within one process the
critical section is synchronous, so no two coroutines are ever inside it.

The critical section is one unpack, a comparison and at most one pack. It computes the
same branch and new `tat` as `rate_limit_core.gcra()`, with the same floating-point
operations in the same order; the Decision itself is then made by `gcra()` from the old
`tat` and `now`, outside the lock (as the Redis backend does with its script's answer).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import re
import time
from collections.abc import Callable
from hashlib import blake2b
from struct import Struct

from middleware import rate_limit_mutex
from middleware.rate_limit_core import SLACK_S, Decision, RateLimitBackendError, gcra

log = logging.getLogger(__name__)

SHARED_DIR_ENV = "GATEHOUSE_SHARED_DIR"  # the parent's private directory for shared tables
HASH_CACHE_KEYS = 4096  # key -> hash entries a process keeps (then it starts over)
PROBE_SLOTS = 8  # records a key may occupy from its home: one unpack reads them all
DEFAULT_MAX_KEYS = 65536
MAX_MAX_KEYS = 1 << 24  # 512 MiB of address space at most (touched lazily)
# Far longer than any critical section (microseconds), even on a loaded host where the
# holder is preempted; only a holder that is stopped keeps the lock this long.
LOCK_TIMEOUT_S = 0.25

TABLE_MAGIC = b"GHRLT001"  # this layout; written last by the creator
HEADER_BYTES = 128
MUTEX_OFFSET = 64
SECRET_BYTES = 16
_HEADER = Struct(f"<8sQ{SECRET_BYTES}s")  # magic, slots, secret
_SLOT = Struct("<Qd")  # key hash, tat
SLOT_BYTES = _SLOT.size
_WINDOW = Struct("<" + "Qd" * PROBE_SLOTS)
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")

# The lock's own calls (ctypes: middleware/rate_limit_mutex.py). Tests take the lock by hand.
_mutex_trylock = rate_limit_mutex.trylock
_mutex_unlock = rate_limit_mutex.unlock


class SharedTableError(Exception):
    """The table cannot be made: its file in the shared directory cannot be created,
    opened or mapped, or is not a table of this layout, or the robust process-shared
    mutex cannot be initialized."""


def table_slots(max_keys: int) -> int:
    """Records in a table sized for `max_keys` live keys: a power of two, twice as many."""
    return max(PROBE_SLOTS, 1 << (2 * max_keys - 1).bit_length())


def table_bytes(slots: int) -> int:
    """The size of a table of `slots` records, header included."""
    return HEADER_BYTES + (slots + PROBE_SLOTS - 1) * SLOT_BYTES


def table_file_name(shared_key: str, slots: int) -> str:
    """The file a table is kept in: readable (the key's safe characters) and unique (a
    digest of the key, the size and the layout), whatever characters the key holds."""
    named = f"{TABLE_MAGIC.decode()}:{slots}:{shared_key}".encode("utf-8", "surrogatepass")
    readable = _UNSAFE_NAME.sub("_", shared_key)[:64].lstrip(".")
    return f"rate_limit.{readable}.{blake2b(named, digest_size=8).hexdigest()}"


class LocalBackend:
    """GCRA decisions in a table shared by every process that constructs the same instance
    (`shared_key`, with `SHARED_DIR_ENV` set) or that is forked after construction.

    Construct it at config load, never on the event loop's behalf: it makes no task.

    Raises:
        SharedTableError: the table cannot be made (see there).
    """

    def __init__(
        self,
        max_keys: int = DEFAULT_MAX_KEYS,
        *,
        shared_key: str | None = None,
        now: Callable[[], float] = time.monotonic,
        on_evict: Callable[[], None] | None = None,
        lock_timeout_s: float = LOCK_TIMEOUT_S,
    ) -> None:
        self.max_keys = max_keys
        self.slots = table_slots(max_keys)
        self._mask = self.slots - 1
        shared_dir = os.environ.get(SHARED_DIR_ENV) if shared_key is not None else None
        self.path: str | None = None
        if shared_key is not None and shared_dir:
            self.path = os.path.join(shared_dir, table_file_name(shared_key, self.slots))
            mapping = _open_shared(self.path, self.slots)
        else:
            mapping = mmap.mmap(-1, table_bytes(self.slots))
            _initialize(mapping, self.slots)
        self._mapping = mapping
        self._secret: bytes = _HEADER.unpack_from(mapping)[2]
        self._hashes: dict[str, int] = {}  # recent keys' hashes (HASH_CACHE_KEYS)
        self._mutex = rate_limit_mutex.mutex_at(mapping, MUTEX_OFFSET)
        self._table = memoryview(mapping)[HEADER_BYTES:]
        self._now = now
        self._on_evict = on_evict
        self._lock_timeout_s = lock_timeout_s

    def __repr__(self) -> str:
        shared = f" file={os.path.basename(self.path)}" if self.path is not None else ""
        return (
            f"<LocalBackend slots={self.slots} probe={PROBE_SLOTS} "
            f"max_keys={self.max_keys}{shared}>"
        )

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
            RateLimitBackendError: the lock stayed taken for `lock_timeout_s`. Any other
                exception is a bug.
        """
        known = self._hashes
        hashed = known.get(key)
        if hashed is None:
            hashed = self.key_hash(key)
            if len(known) >= HASH_CACHE_KEYS:
                known.clear()
            known[key] = hashed
        offset = (hashed & self._mask) * SLOT_BYTES
        table = self._table
        mutex = self._mutex
        error: int = _mutex_trylock(mutex)
        if error:
            self._acquire_slowly(error)
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
            _mutex_unlock(mutex)
        if evicted and self._on_evict is not None:
            self._on_evict()
        return gcra(tat, now, emission_s, tolerance_s)[0]

    def _acquire_slowly(self, error: int) -> None:
        """Take the lock that trylock found busy (or recover it: `error` EOWNERDEAD)."""
        if error == errno.EBUSY:
            deadline = time.time() + self._lock_timeout_s  # timedlock's clock is REALTIME
            error = rate_limit_mutex.timedlock(self._mutex, deadline)
        if error == errno.EOWNERDEAD:  # we hold it now; its holder died inside
            rate_limit_mutex.make_consistent(self._mutex)
            log.error("rate_limit: a process died holding the shared table's lock: recovered")
        elif error == errno.ETIMEDOUT:
            raise RateLimitBackendError(
                f"the shared rate-limit table's lock stayed taken for over "
                f"{self._lock_timeout_s * 1000:.0f}ms"
            )
        elif error:
            raise RateLimitBackendError(
                f"the shared rate-limit table's lock failed: {os.strerror(error)}"
            )

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
        error: int = _mutex_trylock(self._mutex)
        if error:
            self._acquire_slowly(error)
        try:
            return sum(
                1
                for _, tat in _SLOT.iter_unpack(self._table)
                if tat > now  # free records and expired keys alike are behind `now`
            )
        finally:
            _mutex_unlock(self._mutex)


def _open_shared(path: str, slots: int) -> mmap.mmap:
    """Map the table file at `path`, creating it (sized and with its header) if it is new.

    Raises:
        SharedTableError: it cannot be created, opened or mapped, or is not such a table.
    """
    size = table_bytes(slots)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise SharedTableError(f"cannot open the shared table {path}: {exc.strerror}") from exc
    try:
        # flock, not lockf: it belongs to this open file, so no other descriptor of the
        # file closed in this process (mmap keeps a dup of each) can release it early.
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            length = os.fstat(fd).st_size
            if length == 0:
                os.ftruncate(fd, size)
                _warn_if_short_of_room(path, size)
            elif length != size:
                raise SharedTableError(f"{path} is not a rate-limit table of {slots} slots")
            mapping = mmap.mmap(fd, size)  # MAP_SHARED, read and write
            magic, stored_slots, _ = _HEADER.unpack_from(mapping)
            if magic == bytes(len(TABLE_MAGIC)):  # new, or its creator died before the end
                _initialize(mapping, slots)
            elif (magic, stored_slots) != (TABLE_MAGIC, slots):
                mapping.close()
                raise SharedTableError(f"{path} is not a rate-limit table of this layout")
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError as exc:
        raise SharedTableError(f"cannot map the shared table {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    return mapping


def _warn_if_short_of_room(path: str, size: int) -> None:
    stat = os.statvfs(os.path.dirname(path))
    if stat.f_bavail * stat.f_frsize < size:
        log.warning(
            "rate_limit: %s has %d bytes free, less than its table's %d: a full table "
            "there would kill the workers (SIGBUS)",
            os.path.dirname(path),
            stat.f_bavail * stat.f_frsize,
            size,
        )


def _initialize(mapping: mmap.mmap, slots: int) -> None:
    """Write a new table's header: secret and size, the lock, then the magic that says
    the header is whole. The caller is its only user (it holds the file's flock).

    Raises:
        SharedTableError: the mutex cannot be initialized.
    """
    _HEADER.pack_into(mapping, 0, bytes(len(TABLE_MAGIC)), slots, os.urandom(SECRET_BYTES))
    try:
        rate_limit_mutex.initialize(mapping, MUTEX_OFFSET)
    except rate_limit_mutex.MutexInitError as failed:
        raise SharedTableError(str(failed)) from failed
    mapping[: len(TABLE_MAGIC)] = TABLE_MAGIC
