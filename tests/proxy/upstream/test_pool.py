"""The HTTP/1.1 connection pool (proxy/upstream/pool.py)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from proxy.config.model import EndpointConfig, PoolConfig, UpstreamTimeouts
from proxy.core.errors import PoolTimeout
from proxy.upstream.pool import UpstreamPool
from tests.support.helpers import eventually
from tests.support.upstreams import UpstreamServer


# A pool waiter cancelled just after being handed a connection must pass it on (it leaked).
@pytest.mark.socket
async def test_pool_waiter_cancelled_after_handoff_does_not_leak_the_connection(
    h1_upstream: UpstreamServer,
) -> None:
    pool = UpstreamPool(
        EndpointConfig(h1_upstream.url, "http", "127.0.0.1", h1_upstream.port),
        PoolConfig(max_connections=1, max_idle=1, wait_timeout=0.3),
        UpstreamTimeouts(),
        "httptools",
        32 * 1024,
    )
    try:
        first = await pool.acquire()
        waiting = asyncio.create_task(pool.acquire())
        await eventually(lambda: "waiting=1" in repr(pool), "the second acquire to wait")
        # The exchange on `first` ends just as the waiting request's client goes away
        # (Http1Protocol.on_close cancels its task): both in one loop iteration.
        pool.release(first)
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        try:
            again = await pool.acquire()
        except PoolTimeout:
            pytest.fail(f"the handed-over connection leaked: {pool!r}")
        again.close()
    finally:
        pool.close()
        for conn in list(pool._connections):
            conn.close()
