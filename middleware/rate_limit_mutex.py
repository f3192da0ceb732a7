"""The `local` rate-limit table's lock: a process-shared, robust pthread mutex inside the
shared mapping, called through ctypes (middleware/rate_limit_local.py says why this lock).

Apart from rate_limit_local.py, which the compiled build compiles: ctypes' structure and
array types are classes of a dependency, which a compiled module must not define
(docs/architecture.md, "Compiled build"). `trylock` and `unlock` are libc's functions
themselves, so the hot path makes no Python call of its own to take the lock.
"""

from __future__ import annotations

import ctypes
import mmap
import os

MUTEX_BYTES = 64  # room for any Linux pthread_mutex_t (40 bytes on x86-64, 48 on arm64)

# pthread_mutexattr_setpshared / setrobust values (the same in glibc and musl).
_PTHREAD_PROCESS_SHARED = 1
_PTHREAD_MUTEX_ROBUST = 1
_libc = ctypes.CDLL(None)
trylock = _libc.pthread_mutex_trylock  # 0, EBUSY or EOWNERDEAD
unlock = _libc.pthread_mutex_unlock
_MutexBuffer = ctypes.c_char * MUTEX_BYTES


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


class MutexInitError(Exception):
    """pthread refused to initialize the mutex (the message names the step)."""


def mutex_at(mapping: mmap.mmap, offset: int) -> object:
    """The mutex living at `offset` of `mapping` (what trylock and unlock take)."""
    return _MutexBuffer.from_buffer(mapping, offset)


def timedlock(mutex: object, deadline: float) -> int:
    """Wait for the mutex until `deadline` (time.time() seconds: timedlock's clock is
    CLOCK_REALTIME); 0, ETIMEDOUT or EOWNERDEAD."""
    until = _Timespec(int(deadline), int(deadline % 1 * 1e9))
    error: int = _libc.pthread_mutex_timedlock(mutex, ctypes.byref(until))
    return error


def make_consistent(mutex: object) -> None:
    """Mark a mutex whose holder died (EOWNERDEAD) usable again; we hold it."""
    _libc.pthread_mutex_consistent(mutex)


def initialize(mapping: mmap.mmap, offset: int) -> None:
    """Make a new process-shared robust mutex at `offset` of `mapping`.

    Raises:
        MutexInitError: a pthread call failed.
    """
    attributes = ctypes.create_string_buffer(64)  # pthread_mutexattr_t: 4 bytes on Linux
    mutex = _MutexBuffer.from_buffer(mapping, offset)
    try:
        _check("mutexattr_init", _libc.pthread_mutexattr_init(attributes))
        try:
            _check(
                "mutexattr_setpshared",
                _libc.pthread_mutexattr_setpshared(attributes, _PTHREAD_PROCESS_SHARED),
            )
            _check(
                "mutexattr_setrobust",
                _libc.pthread_mutexattr_setrobust(attributes, _PTHREAD_MUTEX_ROBUST),
            )
            _check("mutex_init", _libc.pthread_mutex_init(mutex, attributes))
        finally:
            _libc.pthread_mutexattr_destroy(attributes)
    finally:
        del mutex  # its export of the mapping, so that a caller may close the mapping


def _check(step: str, error: int) -> None:
    if error:
        raise MutexInitError(f"pthread_{step}: {os.strerror(error)}")
