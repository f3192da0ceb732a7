"""Per-endpoint connection pool: limits, LIFO reuse, idle expiry, a bounded wait queue.

LIFO reuse keeps the most recently used (warmest, least likely closed by the upstream)
connection in play and lets the rest expire. Idle connections expire below the usual
upstream keep-alive timeouts, so we close first; the remaining race is handled by the
caller retrying a `StaleConnection` on a fresh one.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Callable
from typing import NamedTuple, TypeVar

from metrics.traffic import failure_code, upstream_series
from proxy.config.upstream_model import EndpointConfig, PoolConfig, UpstreamTimeouts
from proxy.core.errors import PoolTimeout, ProxyError, UpstreamReset
from proxy.upstream.h1 import Http1UpstreamConnection, UpstreamConnState
from proxy.upstream.transport import Connector, Dialer, open_connection

log = logging.getLogger(__name__)

P = TypeVar("P", bound=asyncio.Protocol)


class PoolOccupancy(NamedTuple):
    """What a pool holds now (the pool gauges, read when metrics are scraped)."""

    open: int  # connections established (idle or busy)
    idle: int  # of those, idle: ready for a request
    waiting: int  # requests waiting for a connection to become free


class UpstreamPool:
    """Connections to one endpoint."""

    def __init__(
        self,
        endpoint: EndpointConfig,
        pool: PoolConfig,
        timeouts: UpstreamTimeouts,
        codec: str,
        max_head_bytes: int,
        *,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        upstream: str | None = None,
        connector: Connector = open_connection,
    ) -> None:
        self.endpoint = endpoint
        self.label = f"{endpoint.host}:{endpoint.port}"  # Request.endpoint, logs
        # The upstream's series for this endpoint (None: a pool no upstream owns).
        self.metrics = upstream_series(upstream, self.label)
        self.limits = pool
        self.read_timeout = timeouts.read
        # `tls` for https:// endpoints: HTTP/1.1 over TLS. `connector`: open_connection, but
        # for the pool's own tests (tests/support/memory_connector.py).
        self._dialer = Dialer(
            endpoint.host,
            endpoint.port,
            timeouts.connect,
            tls=tls,
            server_hostname=server_hostname,
            connector=connector,
        )
        self._codec = codec
        self._max_head_bytes = max_head_bytes
        self._idle: list[Http1UpstreamConnection] = []  # a stack: LIFO reuse
        self._connections: set[Http1UpstreamConnection] = set()
        self._connecting = 0
        self._waiters: deque[asyncio.Future[Http1UpstreamConnection | None]] = deque()
        self._loop = asyncio.get_running_loop()
        self._closed = False

    def __repr__(self) -> str:
        active = len(self._connections) - len(self._idle)
        return (
            f"<UpstreamPool {self.endpoint.host}:{self.endpoint.port} active={active} "
            f"idle={len(self._idle)} connecting={self._connecting} waiting={len(self._waiters)}>"
        )

    @property
    def size(self) -> int:
        """Open and opening connections."""
        return len(self._connections) + self._connecting

    def occupancy(self) -> PoolOccupancy:
        """Open and idle connections, and requests waiting for one (the pool gauges)."""
        waiting = sum(1 for waiter in self._waiters if not waiter.done())
        return PoolOccupancy(len(self._connections), len(self._idle), waiting)

    async def acquire(self, *, fresh: bool = False) -> Http1UpstreamConnection:
        """A connection ready for one exchange: idle (newest first) or new.

        Raises:
            PoolTimeout: `max_connections` are busy for longer than `wait_timeout`.
            UpstreamConnectError, UpstreamConnectTimeout: opening a new one failed.
        """
        if not fresh:
            conn = self.take_idle()
            if conn is not None:
                return conn
        while self.size >= self.limits.max_connections:
            if fresh and self._idle:
                self._idle.pop(0).close()  # make room for the retry's fresh connection
                continue
            waiter: asyncio.Future[Http1UpstreamConnection | None] = self._loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout(self.limits.wait_timeout):
                    handed = await waiter
            except BaseException as exc:
                if not waiter.done():
                    waiter.cancel()
                elif not waiter.cancelled() and (conn := waiter.result()) is not None:
                    # Handed a connection just as we gave up (timeout, or our client
                    # left): pass it on, or its slot would be lost for good.
                    self.release(conn)
                if isinstance(exc, TimeoutError):
                    self.metrics.failure("pool_timeout")
                    raise PoolTimeout(
                        f"no connection to {self.endpoint.host}:{self.endpoint.port} became free"
                    ) from None
                raise
            if handed is not None:
                return handed
        return await self._connect()

    def take_idle(self) -> Http1UpstreamConnection | None:
        """The newest idle connection that has not expired, marked active; or None."""
        idle = self._idle
        if not idle:
            return None
        expiry = self._loop.time() - self.limits.idle_timeout
        while idle:
            conn = idle.pop()
            if conn.state is UpstreamConnState.IDLE and conn.idle_since > expiry:
                conn.state = UpstreamConnState.ACTIVE
                return conn
            conn.close()
        return None

    async def _connect(self) -> Http1UpstreamConnection:
        endpoint = self.endpoint
        self._connecting += 1
        try:
            conn = await self._dialer.open(
                lambda: Http1UpstreamConnection(self, self._codec, self._max_head_bytes)
            )
        except BaseException as exc:
            self._connecting -= 1
            self._wake_one(None)
            if isinstance(exc, ProxyError):
                self.metrics.failure(failure_code(exc))
            raise
        self._connecting -= 1
        if conn.state is not UpstreamConnState.ACTIVE:
            # The upstream closed it before we resumed (connection_lost ran already).
            self._wake_one(None)
            self.metrics.failure("reset")
            raise UpstreamReset(f"{endpoint.host}:{endpoint.port} closed the new connection")
        self._connections.add(conn)
        return conn

    async def open_dedicated(self, protocol_factory: Callable[[], P]) -> P:
        """A new connection to this endpoint that the pool neither counts nor reuses
        (a WebSocket handshake's, which becomes a tunnel).

        Raises:
            UpstreamConnectError, UpstreamConnectTimeout: as `open_connection`.
        """
        return await self._dialer.open(protocol_factory)

    def release(self, conn: Http1UpstreamConnection) -> None:
        """An exchange ended cleanly on a reusable connection."""
        if conn.state is not UpstreamConnState.ACTIVE:
            return  # closed meanwhile, or released already: never pool it twice
        if self._closed:
            conn.close()
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                conn.state = UpstreamConnState.ACTIVE
                waiter.set_result(conn)
                return
        conn.state = UpstreamConnState.IDLE
        conn.idle_since = self._loop.time()
        self._idle.append(conn)
        if len(self._idle) > self.limits.max_idle:
            self._idle.pop(0).close()  # the oldest: least likely to be wanted again

    def on_closed(self, conn: Http1UpstreamConnection) -> None:
        """A connection closed (either side): forget it and let a waiter open another."""
        self._connections.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)
        self._wake_one(None)

    def _wake_one(self, conn: Http1UpstreamConnection | None) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return

    def expire(self, now: float) -> None:
        """Sweeper tick: close idle connections past their expiry, time out silent ones."""
        expiry = now - self.limits.idle_timeout
        while self._idle and self._idle[0].idle_since <= expiry:
            self._idle.pop(0).close()
        for conn in [c for c in self._connections if c.timed_out(now)]:
            conn.time_out()

    def close(self) -> None:
        """Close every idle connection now; active ones close when their exchange ends."""
        self._closed = True
        for conn in list(self._idle):
            conn.close()
        self._idle.clear()
