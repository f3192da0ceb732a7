"""The downstream socket: the only code that touches a client connection.

`ClientConnection` is an asyncio Protocol (not StreamReader/StreamWriter, which cost far more
per request). It hands bytes to a protocol object (`protocol/http1.py`), offers drain-aware
writes, and keeps the connection's phase and deadline; a server-wide sweeper calls `expire`
a few times a second instead of arming a timer per request (nginx's approach to timers).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Container
from typing import TYPE_CHECKING, Protocol, cast

from mypy_extensions import mypyc_attr

from proxy.config.model import Http2Config, LimitsConfig, ListenerConfig, PathNormalization
from proxy.core.client_cert import ClientCertificate, verified_client_certificate

if TYPE_CHECKING:
    from proxy.core.client_ip import ClientResolver
    from proxy.core.models import Request
    from proxy.exchange.dispatch import Reply, Run
    from proxy.websocket.tunnel import Tunnel

log = logging.getLogger(__name__)

# After an early answer (413, 400) the client may still be uploading; we read and drop
# what it sends for up to this long before closing (nginx's lingering_close), so the
# kernel does not answer the unread upload with a reset that destroys our reply.
LINGER_S = 5.0
# A body up to this size is copied after the head into one buffer; a larger one is written
# beside it (`write_head_and_body`).
COPY_BELOW_BYTES = 4096


class ConnectionPhase(enum.Enum):
    """What the connection waits for; each phase has its own timeout (docs/architecture.md)."""

    IDLE = "idle"  # keep-alive wait for the next request: keepalive_timeout, then close
    HEAD = "head"  # reading a request head: header_timeout, then 408
    BODY = "body"  # reading a request body: body_timeout between chunks, then 408
    BUSY = "busy"  # an exchange runs: no client-side deadline (upstream timeouts apply)
    WRITE = "write"  # the client does not read our response: body_timeout, then abort
    LINGER = "linger"  # answered and half-closed; draining what the client still sends
    CLOSED = "closed"


class ReadPause(enum.Enum):
    """Why the socket is not being read; it is read again when no reason is left."""

    BODY = "body"  # the request body buffer is full: the exchange is the slow side
    PIPELINE = "pipeline"  # too many parsed requests wait for their turn
    WRITE = "write"  # the client does not read our responses: stop taking requests
    BROKEN = "broken"  # the byte stream is unusable (parse error, tunnel): for good


class ServerContext(Protocol):
    """What a connection needs from the server that accepted it."""

    codec: str
    limits: LimitsConfig
    http2: Http2Config
    path_normalization: PathNormalization
    headers_with_underscores: str
    client_ip: ClientResolver | None  # None: no `client_ip` section, the peer is the client
    draining: bool
    connections: set[ClientConnection]
    tunnels: set[Tunnel]

    def start_exchange(self, request: Request, reply: Reply) -> Run | None:
        """Begin an exchange (proxy/exchange/dispatch.py, `Dispatcher.start`)."""

    def forget(self, conn: ClientConnection) -> None: ...

    def tunnel_closed(self, tunnel: Tunnel) -> None: ...


class FrontEnd(Protocol):
    """A protocol implementation driven by a connection (HTTP/1.1 or HTTP/2)."""

    def feed(self, data: bytes) -> None: ...

    def on_eof(self) -> None: ...

    def on_close(self) -> None: ...

    def on_timeout(self, phase: ConnectionPhase) -> None: ...

    def on_drain_request(self) -> None: ...

    def on_routes_removed(self, routes: Container[str]) -> None: ...


# The front ends' unit tests drive them over a recording subclass (tests/support/helpers.py).
@mypyc_attr(allow_interpreted_subclasses=True)
class ClientConnection(asyncio.Protocol):
    """One accepted client socket. `peer`, when given, is the client's address as a
    believed PROXY protocol header gave it (proxy/frontend/listener.py); otherwise the
    socket's peer is the client."""

    def __init__(
        self,
        server: ServerContext,
        listener: ListenerConfig,
        front_end_factory: Callable[[ClientConnection], FrontEnd],
        peer: tuple[str, int] | None = None,
    ) -> None:
        self.server = server
        self.listener = listener
        self.scheme = "https" if listener.tls is not None else "http"
        self.tls_version = ""  # "TLSv1.3" on a TLS listener, once connected
        # The certificate the client sent, verified (`tls.client_auth`), read once
        # for every request on the connection; None without one.
        self.client_cert: ClientCertificate | None = None
        self.limits = server.limits
        self.transport: asyncio.Transport | None = None
        self.client: tuple[str, int] = peer or ("", 0)
        self._peer_given = peer is not None
        self.phase = ConnectionPhase.HEAD
        self.deadline = 0.0
        self.write_paused = False
        self._read_pauses: set[ReadPause] = set()
        self._drain_waiter: asyncio.Future[None] | None = None
        self.loop = asyncio.get_running_loop()
        self._front_end_factory = front_end_factory
        self.front_end: FrontEnd | None = None

    def __repr__(self) -> str:
        return f"<ClientConnection {self.client[0]}:{self.client[1]} {self.phase.name}>"

    # -- asyncio callbacks -----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and not self._peer_given:
            self.client = (str(peer[0]), int(peer[1]))
        tls = self.listener.tls
        if tls is not None:
            # The protocol is connected once the handshake is done: the version is known,
            # and the client's certificate verified.
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                self.tls_version = ssl_object.version() or ""
                if tls.client_auth is not None:
                    self.client_cert = verified_client_certificate(ssl_object)
        self.server.connections.add(self)
        self.set_phase(ConnectionPhase.HEAD)
        self.front_end = self._front_end_factory(self)

    def data_received(self, data: bytes) -> None:
        phase = self.phase
        if phase is ConnectionPhase.IDLE:
            # set_phase(HEAD), inlined: this runs for every request
            self.phase = ConnectionPhase.HEAD
            self.deadline = self.loop.time() + self.limits.header_timeout
        elif phase is ConnectionPhase.BODY:
            self.deadline = self.loop.time() + self.limits.body_timeout
        elif phase is ConnectionPhase.LINGER:
            return  # the rest of an upload we have already answered: dropped
        assert self.front_end is not None
        self.front_end.feed(data)

    def eof_received(self) -> bool:
        if self.phase is ConnectionPhase.LINGER:
            return False  # the client is done: close now
        assert self.front_end is not None
        self.front_end.on_eof()
        return True  # keep the write side open: a half-closed client still gets its answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = ConnectionPhase.CLOSED
        self.server.forget(self)
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)  # the writers wake, see CLOSED and raise
        if self.front_end is not None:
            self.front_end.on_close()

    def pause_writing(self) -> None:
        self.write_paused = True
        # Like nginx: a client that does not read its responses gets no more requests
        # parsed, so pipelined responses cannot pile up in our write buffer.
        self.pause_reading(ReadPause.WRITE)

    def resume_writing(self) -> None:
        self.write_paused = False
        self.resume_reading(ReadPause.WRITE)
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- used by front ends ----------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True once the socket is gone."""
        return self.phase is ConnectionPhase.CLOSED

    def set_phase(self, phase: ConnectionPhase) -> None:
        """Enter `phase` and start its deadline."""
        if self.phase is ConnectionPhase.CLOSED or self.phase is ConnectionPhase.LINGER:
            return
        self.phase = phase
        limits = self.limits
        if phase is ConnectionPhase.IDLE:
            timeout = limits.keepalive_timeout
        elif phase is ConnectionPhase.HEAD:
            timeout = limits.header_timeout
        elif phase is ConnectionPhase.BUSY:
            return
        else:
            timeout = limits.body_timeout
        self.deadline = self.loop.time() + timeout

    def write(self, data: bytes | memoryview) -> None:
        """Queue bytes for the client (see `drain`)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def write_head_and_body(self, head: bytes, body: bytes) -> None:
        """Queue a message's head and body with one system call: a small body is joined
        to the head (one copy of a few bytes is cheaper than a second buffer), a large one
        goes beside it (writelines: one writev, no copy of the body)."""
        if self.transport is not None and not self.transport.is_closing():
            if len(body) <= COPY_BELOW_BYTES:
                self.transport.write(head + body)
            else:
                self.transport.writelines((head, body))

    def write_pieces(self, pieces: list[bytes | memoryview]) -> None:
        """Queue `pieces` with one system call (writelines: one writev, none of them
        copied; the caller must not change what they view afterwards)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(pieces)

    async def drain(self) -> None:
        """Wait while the transport's buffer is above its high-water mark. Any number of
        writers may wait at once (HTTP/2 streams share the connection).

        Raises:
            ConnectionResetError: the client went away.
        """
        if self.phase is ConnectionPhase.CLOSED:
            raise ConnectionResetError("client went away")
        if not self.write_paused:
            return
        waiter = self._drain_waiter
        if waiter is not None:
            # Shielded: one writer giving up must not cancel the wait of the others.
            await asyncio.shield(waiter)
        else:
            previous = self.phase
            self.set_phase(ConnectionPhase.WRITE)
            waiter = self._drain_waiter = self.loop.create_future()
            await asyncio.shield(waiter)  # resume_writing or connection_lost resolves it
            if self.phase is ConnectionPhase.WRITE:
                self.set_phase(previous)
        if self.closed:
            raise ConnectionResetError("client went away")

    def pause_reading(self, reason: ReadPause) -> None:
        """Stop reading the socket for `reason`."""
        transport = self.transport
        if not self._read_pauses and transport is not None and not transport.is_closing():
            transport.pause_reading()
        self._read_pauses.add(reason)

    def resume_reading(self, reason: ReadPause) -> None:
        """`reason` no longer holds; read again when no other reason does."""
        if reason not in self._read_pauses:
            return
        self._read_pauses.discard(reason)
        if self._read_pauses or self.transport is None or self.transport.is_closing():
            return
        self.transport.resume_reading()
        if self.phase is ConnectionPhase.BODY:
            # The body's idle deadline restarts: the wait was ours, not the client's.
            self.deadline = self.loop.time() + self.limits.body_timeout

    def pause_for_body(self) -> None:
        """Body backpressure (Body's on_pause)."""
        self.pause_reading(ReadPause.BODY)

    def resume_for_body(self) -> None:
        """Body drained (Body's on_resume)."""
        self.resume_reading(ReadPause.BODY)

    def close(self) -> None:
        """Close after the queued bytes are written."""
        if self.transport is not None:
            self.transport.close()

    def close_lingering(self) -> None:
        """Close after an answer the client may still be uploading to: half-close now,
        drop whatever else arrives, close when the client does or after LINGER_S."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not transport.can_write_eof():
            transport.close()
            return
        self.phase = ConnectionPhase.LINGER
        self.deadline = self.loop.time() + LINGER_S
        self._read_pauses.clear()
        transport.resume_reading()
        transport.write_eof()  # after the queued reply: the client sees it, then EOF

    def hand_over(self) -> None:
        """The socket now belongs to a tunnel (`protocol/upgrade.py`): this connection
        stops tracking it, and the server counts the tunnel instead."""
        self.phase = ConnectionPhase.CLOSED
        self._read_pauses.clear()
        self.front_end = None
        self.server.forget(self)

    def abort(self) -> None:
        """Close at once, dropping queued bytes (h1's only way to signal a broken body)."""
        if self.transport is not None:
            self.transport.abort()

    def expire(self, now: float) -> None:
        """Called by the server's sweeper: act on a passed deadline."""
        phase = self.phase
        if phase is ConnectionPhase.BUSY or phase is ConnectionPhase.CLOSED:
            return
        if now < self.deadline:
            return
        if phase is ConnectionPhase.BODY and ReadPause.BODY in self._read_pauses:
            return  # we stopped reading the body: the client is not the slow side
        log.debug("connection %r: %s timeout", self, phase.value)
        if phase is ConnectionPhase.WRITE or phase is ConnectionPhase.LINGER:
            self.abort()
            return
        assert self.front_end is not None
        self.front_end.on_timeout(phase)

    def routes_removed(self, routes: Container[str]) -> None:
        """A reload removed `routes` and their grace period is over: exchanges still
        serving them end."""
        if self.front_end is not None:
            self.front_end.on_routes_removed(routes)

    def begin_drain(self) -> None:
        """The server is shutting down: finish what runs, then close."""
        if self.front_end is not None:
            self.front_end.on_drain_request()
