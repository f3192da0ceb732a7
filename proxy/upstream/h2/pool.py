"""Per-endpoint pool of HTTP/2 connections: streams within each peer's limit, more
connections when all are full, a bounded wait, and one retry of never-processed streams.

Exchanges go to the oldest connection with a free stream slot, so traffic packs onto as
few connections as the upstream's SETTINGS_MAX_CONCURRENT_STREAMS allows and the extra
ones fall idle and expire. One connection is opened at a time (requests arriving meanwhile
wait for it: it will usually have room for all of them), except for the retry of a
refused stream, which gets a connection of its own.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque

from metrics.traffic import failure_code, upstream_series
from proxy.config.upstream_model import EndpointConfig, PoolConfig, UpstreamTimeouts
from proxy.core.body import Body
from proxy.core.errors import PoolTimeout, ProxyError, UpstreamConnectTimeout
from proxy.core.models import RawHeaders, Response
from proxy.upstream.h2.connection import H2UpstreamConnection
from proxy.upstream.h2.stream import H2ConnState, StreamRefused
from proxy.upstream.pool import PoolOccupancy
from proxy.upstream.tls import ALPN_H2
from proxy.upstream.transport import Dialer

log = logging.getLogger(__name__)


class H2Pool:
    """HTTP/2 connections to one endpoint (h2c, or h2 when `tls` is given)."""

    def __init__(
        self,
        endpoint: EndpointConfig,
        pool: PoolConfig,
        timeouts: UpstreamTimeouts,
        *,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        upstream: str | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.label = f"{endpoint.host}:{endpoint.port}"  # Request.endpoint, logs
        # The upstream's series for this endpoint (None: a pool no upstream owns).
        self.metrics = upstream_series(upstream, self.label)
        self.limits = pool
        self.read_timeout = timeouts.read
        self._connect_timeout = timeouts.connect
        self._dialer = Dialer(
            endpoint.host,
            endpoint.port,
            timeouts.connect,
            tls=tls,
            server_hostname=server_hostname,
            require_alpn=ALPN_H2 if tls is not None else None,
        )
        self._connections: list[H2UpstreamConnection] = []  # oldest first
        self._connecting = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._loop = asyncio.get_running_loop()
        self._closed = False

    def __repr__(self) -> str:
        streams = sum(len(conn.streams) for conn in self._connections)
        return (
            f"<H2Pool {self.endpoint.host}:{self.endpoint.port} "
            f"connections={len(self._connections)} streams={streams} "
            f"connecting={self._connecting} waiting={len(self._waiters)}>"
        )

    @property
    def size(self) -> int:
        """Open and opening connections."""
        return len(self._connections) + self._connecting

    def occupancy(self) -> PoolOccupancy:
        """Open connections, those without a stream (idle), and requests waiting for a
        stream slot (the pool gauges)."""
        idle = sum(1 for conn in self._connections if not conn.streams)
        waiting = sum(1 for waiter in self._waiters if not waiter.done())
        return PoolOccupancy(len(self._connections), idle, waiting)

    @property
    def connections(self) -> list[H2UpstreamConnection]:
        """The open connections, oldest first (for tests and diagnostics)."""
        return list(self._connections)

    # -- exchanges -------------------------------------------------------------------
    async def exchange(self, headers: RawHeaders, body: Body, body_bytes: bytes | None) -> Response:
        """Send one request on a stream and return the response (body still streaming).

        `body_bytes` is the whole body when it is already in memory; otherwise `body`
        streams. A stream the upstream refused unprocessed (RFC 9113 section 8.7) is
        retried once on a fresh connection when its body can be replayed.

        Raises:
            PoolTimeout: every connection is full and no new one may be opened for
                `wait_timeout`.
            UpstreamConnectError, UpstreamConnectTimeout: opening a connection failed.
            UpstreamReset, UpstreamProtocolError, UpstreamTimeout: the exchange failed.
            ProxyError: reading the client's body failed (408, 413, 400).
        """
        prefix = body_bytes or b""
        rest: Body | None = None if body_bytes is not None else body
        conn = await self.acquire()
        try:
            return await conn.exchange(headers, prefix, rest)
        except StreamRefused as exc:
            # A body in memory is replayed whole; a streamed one from the copy the stream
            # kept of what it consumed, unless that grew too large to keep.
            replay = prefix if rest is None else exc.replay
            if replay is None:
                raise
            log.debug("%r: %s; retrying on a fresh connection", self, exc)
        # Never processed: safe to send again, even a POST. What the client had sent so
        # far goes first; the rest of its body (if any) follows from the stream.
        conn = await self.acquire(fresh=True)
        return await conn.exchange(headers, replay, rest)

    async def acquire(self, *, fresh: bool = False) -> H2UpstreamConnection:
        """A connection with a free stream slot. The caller opens its stream before
        yielding to the loop, so the slot is still free then.

        `fresh`: open a new connection when the limit allows (the retry of a refused
        stream), else take any with room.

        Raises:
            PoolTimeout, UpstreamConnectError, UpstreamConnectTimeout: see `exchange`.
        """
        deadline: float | None = None
        while True:
            if fresh and self.size < self.limits.max_connections:
                fresh = False
                conn = await self._connect()
                if conn.available:
                    return conn
            picked = self._pick()
            if picked is not None:
                return picked
            if self._connecting == 0 and self.size < self.limits.max_connections:
                conn = await self._connect()
                if conn.available:
                    return conn
                continue  # it allows no stream yet (MAX_CONCURRENT_STREAMS 0): wait
            # Full, or a connection is on its way: wait for a slot or for that one.
            if deadline is None:
                deadline = self._loop.time() + self.limits.wait_timeout
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except (TimeoutError, asyncio.CancelledError) as exc:
                if waiter.done() and not waiter.cancelled():
                    self._wake(all_waiters=False)  # woken as we gave up: pass the turn on
                elif waiter in self._waiters:
                    self._waiters.remove(waiter)
                if isinstance(exc, TimeoutError):
                    self.metrics.failure("pool_timeout")
                    raise PoolTimeout(
                        f"no HTTP/2 stream to {self.endpoint.host}:{self.endpoint.port} became free"
                    ) from None
                raise

    def _pick(self) -> H2UpstreamConnection | None:
        for conn in self._connections:
            if conn.available:
                return conn
        return None

    async def _connect(self) -> H2UpstreamConnection:
        endpoint = self.endpoint
        self._connecting += 1
        try:
            conn = await self._dialer.open(lambda: H2UpstreamConnection(self))
            # The peer's preface (its SETTINGS) says how many streams it takes.
            try:
                async with asyncio.timeout(self._connect_timeout):
                    await asyncio.shield(conn.ready)
            except TimeoutError:
                conn.close()
                raise UpstreamConnectTimeout(
                    f"{endpoint.host}:{endpoint.port} sent no HTTP/2 SETTINGS in time"
                ) from None
            except asyncio.CancelledError:
                conn.close()
                raise
        except ProxyError as exc:
            self._connecting -= 1
            self.metrics.failure(failure_code(exc))
            if not self._connections:
                # Those queued for this connection share its fate (502/504) at once,
                # rather than each trying again in turn until the wait times out.
                self._fail_waiters(exc)
            else:
                self._wake(all_waiters=False)
            raise
        except BaseException:
            self._connecting -= 1
            self._wake(all_waiters=False)  # another may try to connect
            raise
        self._connecting -= 1
        self._connections.append(conn)
        log.debug("%r: new connection %r", self, conn)
        # Its other stream slots are for whoever waits.
        self._wake(all_waiters=True)
        return conn

    # -- connection callbacks --------------------------------------------------------
    def on_stream_closed(self, conn: H2UpstreamConnection) -> None:
        """A stream ended: a waiter may take its slot; a closed pool lets the connection
        go once it is idle."""
        if self._closed and not conn.streams:
            conn.close()
            return
        if conn.available:
            self._wake(all_waiters=False)

    def on_capacity(self, conn: H2UpstreamConnection) -> None:
        """The peer changed its stream limit."""
        self._wake(all_waiters=True)

    def on_draining(self, conn: H2UpstreamConnection) -> None:
        """The connection takes no new streams (GOAWAY): waiters may open another."""
        self._wake(all_waiters=True)

    def on_closed(self, conn: H2UpstreamConnection) -> None:
        """A connection closed (either side)."""
        if conn in self._connections:
            self._connections.remove(conn)
            self._wake(all_waiters=True)

    def _wake(self, *, all_waiters: bool) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                if not all_waiters:
                    return

    def _fail_waiters(self, error: ProxyError) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.metrics.failure(failure_code(error))  # a request this connect failed
                waiter.set_exception(type(error)(error.message))

    # -- sweeper and shutdown --------------------------------------------------------
    def expire(self, now: float) -> None:
        """Sweeper tick: time out silent streams; close connections idle (no stream)
        for longer than `idle_timeout`."""
        expiry = now - self.limits.idle_timeout
        for conn in list(self._connections):
            conn.expire(now)
            if not conn.streams and conn.idle_since <= expiry and conn.state is H2ConnState.READY:
                log.debug("%r: closing idle %r", self, conn)
                conn.close()

    def close(self) -> None:
        """Close idle connections now; busy ones close when their last stream ends."""
        self._closed = True
        for conn in list(self._connections):
            if not conn.streams:
                conn.close()
