"""Request ids: 32 hex digits from the kernel's random source, as random as uuid4.

Ids are cut from a pool of random bytes read 4 KiB at a time, so that making one is a
slice and a hex conversion rather than a `getrandom` system call per request. The pool
is emptied in a child after `fork`: two workers never hand out the same bytes.
"""

from __future__ import annotations

import os

ID_BYTES = 16
POOL_BYTES = 4096  # 256 ids per read of the random source


class _Pool:
    __slots__ = ("data", "offset")

    def __init__(self) -> None:
        self.data = b""
        self.offset = 0

    def empty(self) -> None:
        self.data = b""
        self.offset = 0


_pool = _Pool()
os.register_at_fork(after_in_child=_pool.empty)


def new_request_id() -> str:
    """A new random id: 32 lowercase hex digits."""
    pool = _pool
    start = pool.offset
    if start + ID_BYTES > len(pool.data):
        pool.data = os.urandom(POOL_BYTES)
        start = 0
    pool.offset = start + ID_BYTES
    return pool.data[start : start + ID_BYTES].hex()
