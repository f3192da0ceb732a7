"""Request ids (32 hex digits) and trace and span ids (32 and 16, proxy/core/tracing.py)
from the kernel's random source, as random as uuid4.

Ids are cut from a pool of random bytes read 4 KiB at a time, so that making one is a
slice and a hex conversion rather than a `getrandom` system call per request. The pool
is emptied in a child after `fork`: two workers never hand out the same bytes.
"""

from __future__ import annotations

import os
from binascii import hexlify

ID_BYTES = 16
SPAN_ID_BYTES = 8
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


def _random_bytes(size: int) -> bytes:
    """The next `size` bytes of the pool (refilled from the kernel when it runs out)."""
    pool = _pool
    start = pool.offset
    if start + size > len(pool.data):
        pool.data = os.urandom(POOL_BYTES)
        start = 0
    pool.offset = start + size
    return pool.data[start : start + size]


def new_request_id() -> str:
    """A new random id: 32 lowercase hex digits."""
    return _random_bytes(ID_BYTES).hex()


def new_traceparent(trace: bytes = b"") -> bytes:
    """A W3C `traceparent` value, unsampled, with a new random span id: in the trace
    `trace` (32 hex digits) when given, else in a new random one. (The chance that a new
    id is all zeros, which the specification forbids, is 2**-64 for a span id and less
    for a trace id: they are not checked.)"""
    if trace:
        return b"00-" + trace + b"-" + hexlify(_random_bytes(SPAN_ID_BYTES)) + b"-00"
    digits = hexlify(_random_bytes(ID_BYTES + SPAN_ID_BYTES))
    return b"00-" + digits[:32] + b"-" + digits[32:] + b"-00"


def new_span_id() -> str:
    """A new random W3C span id: 16 lowercase hex digits, never all zeros."""
    while True:
        span = _random_bytes(SPAN_ID_BYTES).hex()
        if span != "0000000000000000":
            return span


def new_trace_id() -> str:
    """A new random W3C trace id: 32 lowercase hex digits, never all zeros."""
    while True:
        trace = new_request_id()
        if trace != "00000000000000000000000000000000":
            return trace
