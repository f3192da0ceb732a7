"""The HTTP/1.1 connection pool (proxy/upstream/pool.py): limits, LIFO reuse, idle
expiry, the wait queue, failed and lost connections. Without sockets: the pool opens its
connections through `MemoryConnector` (tests/support/memory_connector.py), and the
connections themselves are the real ones. One test at the end uses a real upstream."""

from __future__ import annotations

import asyncio
import contextlib
import ssl

import pytest

from proxy.config.upstream_model import EndpointConfig, PoolConfig, UpstreamTimeouts
from proxy.core.body import Body
from proxy.core.errors import PoolTimeout, UpstreamConnectError, UpstreamReset, UpstreamTimeout
from proxy.upstream.h1 import Http1UpstreamConnection, UpstreamConnState
from proxy.upstream.pool import UpstreamPool
from tests.support.helpers import eventually
from tests.support.memory_connector import MemoryConnector, MemoryTransport
from tests.support.upstreams import UpstreamServer

ENDPOINT = EndpointConfig("http://10.0.0.1:8080", "http", "10.0.0.1", 8080)
TIMEOUTS = UpstreamTimeouts(connect=2.5, read=30.0)


def make_pool(connector: MemoryConnector, **limits: float) -> UpstreamPool:
    return UpstreamPool(
        ENDPOINT,
        PoolConfig(**limits),  # type: ignore[arg-type]
        TIMEOUTS,
        "httptools",
        32 * 1024,
        connector=connector,
    )


def transport_of(conn: Http1UpstreamConnection) -> MemoryTransport:
    assert isinstance(conn.transport, MemoryTransport)
    return conn.transport


async def turn() -> None:
    """Let the loop run what is ready (a closed transport's connection_lost)."""
    for _ in range(3):
        await asyncio.sleep(0)


async def test_a_connection_is_opened_through_the_connector_to_the_endpoint() -> None:
    connector = MemoryConnector()
    context = ssl.create_default_context()
    pool = UpstreamPool(
        ENDPOINT,
        PoolConfig(),
        TIMEOUTS,
        "httptools",
        32 * 1024,
        tls=context,
        server_hostname="api.example",
        connector=connector,
    )
    conn = await pool.acquire()
    assert [(c.host, c.port, c.timeout_s) for c in connector.connects] == [("10.0.0.1", 8080, 2.5)]
    assert connector.connects[0].tls is context
    assert connector.connects[0].server_hostname == "api.example"
    assert conn.state is UpstreamConnState.ACTIVE
    assert (pool.size, pool.occupancy()) == (1, (1, 0, 0))


async def test_released_connections_are_reused_newest_first() -> None:
    connector = MemoryConnector()
    pool = make_pool(connector)
    first, second = await pool.acquire(), await pool.acquire()
    pool.release(first)
    pool.release(second)
    assert pool.occupancy() == (2, 2, 0)
    assert await pool.acquire() is second  # LIFO: the warmest one
    assert await pool.acquire() is first
    assert len(connector.connects) == 2


async def test_a_connection_goes_back_to_the_pool_when_its_response_ends() -> None:
    pool = make_pool(MemoryConnector())
    conn = await pool.acquire()
    head = b"GET /x HTTP/1.1\r\nHost: app\r\n\r\n"
    exchange = asyncio.create_task(conn.exchange("GET", head, Body.from_bytes(b""), b""))
    await turn()
    assert bytes(transport_of(conn).written) == head
    assert pool.occupancy() == (1, 0, 0)  # busy until the response has ended
    transport_of(conn).receive(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    response = await exchange
    assert (response.status, response.body.take_all()) == (200, b"ok")
    assert pool.occupancy() == (1, 1, 0)
    assert await pool.acquire() is conn


async def test_a_connection_idle_past_idle_timeout_is_closed_not_reused() -> None:
    connector = MemoryConnector()
    pool = make_pool(connector, idle_timeout=0.01)
    old = await pool.acquire()
    pool.release(old)
    await asyncio.sleep(0.05)
    new = await pool.acquire()
    assert new is not old
    assert transport_of(old).aborted
    assert len(connector.connects) == 2


async def test_the_sweeper_closes_idle_connections_past_idle_timeout() -> None:
    pool = make_pool(MemoryConnector(), idle_timeout=60.0)
    conn = await pool.acquire()
    pool.release(conn)
    now = asyncio.get_running_loop().time()
    pool.expire(now + 59.0)
    assert not transport_of(conn).aborted
    pool.expire(now + 61.0)
    assert transport_of(conn).aborted
    await turn()
    assert pool.occupancy() == (0, 0, 0)


async def test_the_sweeper_times_out_an_exchange_past_its_read_deadline() -> None:
    pool = make_pool(MemoryConnector())
    conn = await pool.acquire()
    head = b"GET /slow HTTP/1.1\r\nHost: app\r\n\r\n"
    exchange = asyncio.create_task(conn.exchange("GET", head, Body.from_bytes(b""), b""))
    await turn()
    now = asyncio.get_running_loop().time()
    pool.expire(now + TIMEOUTS.read - 1.0)
    assert not exchange.done()
    pool.expire(now + TIMEOUTS.read + 1.0)
    with pytest.raises(UpstreamTimeout):
        await exchange
    assert transport_of(conn).aborted
    await turn()
    assert pool.occupancy() == (0, 0, 0)


async def test_past_max_idle_the_oldest_idle_connection_is_closed() -> None:
    pool = make_pool(MemoryConnector(), max_connections=3, max_idle=1)
    older, newer = await pool.acquire(), await pool.acquire()
    pool.release(older)
    pool.release(newer)
    assert transport_of(older).aborted
    assert not transport_of(newer).aborted
    await turn()
    assert pool.occupancy() == (1, 1, 0)


async def test_a_full_pool_hands_a_released_connection_to_its_waiters_in_order() -> None:
    connector = MemoryConnector()
    pool = make_pool(connector, max_connections=1)
    conn = await pool.acquire()
    first = asyncio.create_task(pool.acquire())
    await turn()
    second = asyncio.create_task(pool.acquire())
    await turn()
    assert pool.occupancy() == (1, 0, 2)
    pool.release(conn)
    assert await first is conn
    assert not second.done()
    pool.release(conn)
    assert await second is conn
    assert len(connector.connects) == 1


async def test_a_wait_past_wait_timeout_is_a_pool_timeout() -> None:
    pool = make_pool(MemoryConnector(), max_connections=1, wait_timeout=0.05)
    await pool.acquire()
    with pytest.raises(PoolTimeout, match=r"no connection to 10\.0\.0\.1:8080 became free"):
        await pool.acquire()
    assert pool.occupancy() == (1, 0, 0)


async def test_a_failed_connect_is_raised_and_its_slot_goes_to_a_waiter() -> None:
    connector = MemoryConnector()
    connector.hold = asyncio.Event()
    pool = make_pool(connector, max_connections=1, wait_timeout=5.0)
    failing = asyncio.create_task(pool.acquire())
    await turn()
    waiting = asyncio.create_task(pool.acquire())
    await turn()
    assert (pool.size, pool.occupancy().waiting) == (1, 1)  # one connecting, one waiting
    connector.fail = UpstreamConnectError("connect to 10.0.0.1:8080 failed: refused")
    connector.hold.set()
    with pytest.raises(UpstreamConnectError):
        await failing
    conn = await waiting  # woken by the failure, it connects in its turn

    assert conn.state is UpstreamConnState.ACTIVE
    assert len(connector.connects) == 2
    assert pool.size == 1


async def test_a_connection_closed_before_the_connect_returned_is_a_reset() -> None:
    connector = MemoryConnector()
    connector.lose_at_once = True
    pool = make_pool(connector)
    with pytest.raises(UpstreamReset, match="closed the new connection"):
        await pool.acquire()
    assert pool.size == 0


async def test_a_connection_the_upstream_drops_while_idle_is_forgotten() -> None:
    connector = MemoryConnector()
    pool = make_pool(connector)
    conn = await pool.acquire()
    pool.release(conn)
    transport_of(conn).drop()
    await turn()
    assert conn.state is UpstreamConnState.CLOSED
    assert pool.occupancy() == (0, 0, 0)
    assert await pool.acquire() is not conn
    assert len(connector.connects) == 2


async def test_a_fresh_connection_makes_room_by_closing_the_oldest_idle_one() -> None:
    connector = MemoryConnector()
    pool = make_pool(connector, max_connections=2)
    older, newer = await pool.acquire(), await pool.acquire()
    pool.release(older)
    pool.release(newer)
    fresh = await pool.acquire(fresh=True)
    assert fresh not in (older, newer)
    assert transport_of(older).aborted
    assert not transport_of(newer).aborted
    assert len(connector.connects) == 3


async def test_a_closed_pool_closes_idle_connections_and_those_released_later() -> None:
    pool = make_pool(MemoryConnector())
    idle, busy = await pool.acquire(), await pool.acquire()
    pool.release(idle)
    pool.close()
    assert transport_of(idle).aborted
    assert not transport_of(busy).aborted
    pool.release(busy)
    assert transport_of(busy).closing
    await turn()
    assert pool.occupancy() == (0, 0, 0)


async def test_a_dedicated_connection_is_opened_alike_but_never_counted() -> None:
    connector = MemoryConnector()
    pool = make_pool(connector)
    dedicated = await pool.open_dedicated(asyncio.Protocol)
    assert isinstance(dedicated, asyncio.Protocol)
    assert [(c.host, c.port) for c in connector.connects] == [("10.0.0.1", 8080)]
    assert pool.size == 0


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
