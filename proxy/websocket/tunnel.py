"""A WebSocket tunnel: after the handshake, bytes flow both ways unchanged until one side
ends, with backpressure and a lifecycle.

Two ends are joined, each knowing its `peer`:
- `SocketEnd` is a socket taken over with `transport.set_protocol` (the upstream's, and the
  client's on HTTP/1.1). Its `data_received` writes straight into the peer: one call per
  chunk, no task, no buffer of ours.
- `StreamEnd` is an HTTP/2 stream (RFC 8441): bytes arrive through the request `Body` and
  leave through the response `Body`, so the HTTP/2 front end's flow control applies.

Backpressure: when one end's write buffer passes its high-water mark, its peer stops
reading, and resumes when the buffer drains; a side that does not read costs us one
buffer, not a growing heap.

Lifecycle: an end that half-closes is half-closed on the other side; an end that goes
away closes the other; idle and max-duration deadlines are checked by the server's
sweeper. `going_away` ends a tunnel as shutdown does, with a 1001 close frame to each side
placed at a frame boundary (`FrameScanner`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol, cast

from metrics.definitions import (
    WEBSOCKET_TUNNELS_OPEN,
    TunnelClose,
    TunnelDirection,
    count_tunnel_bytes,
    count_tunnel_close,
)
from proxy.core.body import Body
from proxy.core.errors import ProxyError, UpstreamReset
from proxy.websocket.protocol import GOING_AWAY, FrameScanner, close_frame

if TYPE_CHECKING:
    from proxy.config.model import WebSocketConfig

log = logging.getLogger(__name__)

# After a tunnel starts closing, its sockets get this long to flush what is queued for
# a peer before they are aborted (a peer that does not read must not hold them forever).
CLOSE_LINGER_S = 5.0


class TunnelHost(Protocol):
    """What a tunnel needs from the server it runs in."""

    tunnels: set[Tunnel]

    def tunnel_closed(self, tunnel: Tunnel) -> None: ...


class TunnelEnd:
    """One side of a tunnel. `received` counts the bytes this side sent us; `eof` is set
    when it has no more to send; `closed` when it is gone."""

    __slots__ = (
        "closed",
        "cut",
        "dropping",
        "eof",
        "is_client",
        "peer",
        "received",
        "scanner",
        "tunnel",
    )

    def __init__(self, *, is_client: bool) -> None:
        self.is_client = is_client
        self.tunnel: Tunnel | None = None
        self.peer: TunnelEnd = self
        self.received = 0
        self.scanner = FrameScanner()
        self.eof = False
        self.closed = False
        # Shutting down: what this side sends is passed on only to the end of the frame
        # under way; then the peer gets our close frame and the rest is dropped.
        self.cut = False
        self.dropping = False  # our close frame went to the peer: this side is not heard

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def write_eof(self) -> None:
        raise NotImplementedError

    def pause_reading(self) -> None:
        raise NotImplementedError

    def resume_reading(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Close after what is queued for this side is written."""
        raise NotImplementedError

    def abort(self) -> None:
        """Close now, dropping what is queued."""
        raise NotImplementedError

    def forward_cut(self, data: bytes) -> None:
        """Forward `data` while shutting down: up to the end of the frame under way, then
        the close frame, then nothing."""
        peer = self.peer
        if self.dropping:
            return
        scanner = self.scanner
        before, _ = scanner.split(data)
        if before:
            peer.write(before)
        if scanner.at_boundary:
            self.send_going_away_to_peer()
        elif scanner.lost:  # not WebSocket framing after all: ended without a close frame
            self.dropping = True
            peer.write_eof()

    def send_going_away_to_peer(self) -> None:
        """Write a 1001 close frame to the peer (masked toward the upstream, which expects
        a client's frames) and half-close it. What this side still sends (its answering
        close frame) is read and dropped: closing a socket with unread bytes would reset
        it, and the reset can destroy our close frame before the peer reads it. Each
        side's EOF then closes the tunnel as usual."""
        self.cut = self.dropping = True
        self.resume_reading()
        peer = self.peer
        if not peer.closed:
            peer.write(close_frame(GOING_AWAY, "going away", masked=not peer.is_client))
            peer.write_eof()


class SocketEnd(TunnelEnd, asyncio.Protocol):
    """A tunnel end on a socket: the protocol its transport hands bytes to."""

    __slots__ = ("_eof_sent", "_read_paused", "transport")

    def __init__(self, transport: asyncio.Transport, *, is_client: bool) -> None:
        super().__init__(is_client=is_client)
        self.transport = transport
        self._read_paused = False
        self._eof_sent = False

    def __repr__(self) -> str:
        side = "client" if self.is_client else "upstream"
        return f"<SocketEnd {side} received={self.received} eof={self.eof}>"

    # -- asyncio callbacks -----------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        scanner = self.scanner
        if self.cut:
            self.forward_cut(data)
            return
        if scanner.left >= len(data):
            scanner.left -= len(data)  # FrameScanner.feed's common case, inline
        else:
            scanner.feed(data)
        self.peer.write(data)

    def eof_received(self) -> bool:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.on_eof(self)
        return True  # the other direction may still be carrying bytes

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.on_lost(self, exc)

    def pause_writing(self) -> None:
        self.peer.pause_reading()

    def resume_writing(self) -> None:
        self.peer.resume_reading()

    # -- used by the peer --------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def write_eof(self) -> None:
        transport = self.transport
        if self.closed or self._eof_sent or transport.is_closing():
            return
        self._eof_sent = True
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()  # TLS cannot half-close: the whole socket ends

    def pause_reading(self) -> None:
        if not self._read_paused and not self.closed:
            self._read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._read_paused and not self.closed:
            self._read_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        self.transport.abort()


class StreamEnd(TunnelEnd):
    """A tunnel end on an HTTP/2 stream (RFC 8441): the client's DATA arrive in
    `incoming` (the request body, acknowledged as we pass it on), and what we write goes
    to `outgoing` (the response body the front end sends as DATA, paced by the client's
    window: its buffer filling pauses the peer)."""

    __slots__ = ("_ended", "_pump", "_resumed", "incoming", "outgoing")

    def __init__(self, incoming: Body) -> None:
        super().__init__(is_client=True)
        self.incoming = incoming
        self.outgoing = Body(None, on_pause=self._pause_peer, on_resume=self._resume_peer)
        self.outgoing.on_abandon = self._abandoned
        self._ended = False  # END_STREAM (or a reset) is queued on `outgoing`
        self._resumed: asyncio.Future[None] | None = None
        self._pump: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<StreamEnd received={self.received} eof={self.eof}>"

    def start(self) -> None:
        """Begin passing the client's DATA to the peer."""
        self._pump = asyncio.get_running_loop().create_task(self._pump_incoming())

    async def _pump_incoming(self) -> None:
        tunnel = self.tunnel
        assert tunnel is not None
        try:
            while True:
                data = await self.incoming.read_joined()
                if not data:
                    break
                self.received += len(data)
                if self.cut:
                    self.forward_cut(data)
                    continue
                self.scanner.feed(data)
                self.peer.write(data)
                if self._resumed is not None:
                    await self._resumed  # the peer's write buffer is full
        except ProxyError as exc:  # the client reset the stream, or its connection died
            self.closed = True
            if not self._ended:  # nobody will take the rest: the response's sender stops
                self._ended = True
                self.outgoing.fail(exc)
            tunnel.on_lost(self, exc)
            return
        except asyncio.CancelledError:
            return
        tunnel.on_eof(self)

    def _pause_peer(self) -> None:
        self.peer.pause_reading()

    def _resume_peer(self) -> None:
        self.peer.resume_reading()

    def _abandoned(self) -> None:
        # The front end stopped sending the response: the stream was reset or the
        # connection is gone.
        if not self.closed:
            self.closed = True
            if self._pump is not None:
                self._pump.cancel()
            tunnel = self.tunnel
            if tunnel is not None:
                tunnel.on_lost(self, ConnectionResetError("stream reset"))

    def write(self, data: bytes) -> None:
        if not self._ended:
            self.outgoing.feed(data)

    def write_eof(self) -> None:
        if not self._ended:
            self._ended = True
            self.outgoing.feed_eof(None)  # END_STREAM

    def pause_reading(self) -> None:
        if self._resumed is None:
            self._resumed = asyncio.get_running_loop().create_future()

    def resume_reading(self) -> None:
        waiter, self._resumed = self._resumed, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        self.write_eof()
        self._finished()

    def abort(self) -> None:
        if not self._ended:
            self._ended = True
            self.outgoing.fail(UpstreamReset("the upstream's WebSocket connection broke"))
        self._finished()

    def _finished(self) -> None:
        # The stream's part is over once its response ended: the front end closes it.
        if self.closed:
            return
        self.closed = True
        if self._pump is not None:
            self._pump.cancel()
        self.incoming.discard()
        self.resume_reading()
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.on_lost(self, None)


class Tunnel:
    """Two joined ends and the tunnel's lifecycle (see the module docstring)."""

    __slots__ = (
        "_counted",
        "_deadline",
        "_drain_at",
        "_host",
        "_idle_since",
        "_last_received",
        "_loop",
        "_max_until",
        "client",
        "reason",
        "route",
        "settings",
        "upstream",
    )

    def __init__(
        self,
        host: TunnelHost,
        route: str,
        settings: WebSocketConfig,
        client: TunnelEnd,
        upstream: SocketEnd,
    ) -> None:
        self._host = host
        self.route = route
        self.settings = settings
        self.client = client
        self.upstream = upstream
        client.peer, upstream.peer = upstream, client
        client.tunnel = upstream.tunnel = self
        self._loop = asyncio.get_running_loop()
        now = self._loop.time()
        self._idle_since = now
        self._last_received = 0
        self._max_until = now + settings.max_duration if settings.max_duration else 0.0
        self._deadline = 0.0  # while closing: when what is left is aborted
        self._drain_at = 0.0  # its route was removed by a reload: when it goes away
        self._counted = [0, 0]  # bytes already added to the metrics, each direction
        self.reason: TunnelClose | None = None
        host.tunnels.add(self)
        WEBSOCKET_TUNNELS_OPEN.inc()

    def __repr__(self) -> str:
        state = self.reason.value if self.reason is not None else "open"
        return f"<Tunnel {self.route} {state} {self.client!r} {self.upstream!r}>"

    # -- events from the ends ----------------------------------------------------------
    def on_eof(self, end: TunnelEnd) -> None:
        """`end` has no more to send: so the peer is told, and when both directions are
        done the tunnel is."""
        end.eof = True
        self._ending(TunnelClose.CLIENT_CLOSED if end.is_client else TunnelClose.UPSTREAM_CLOSED)
        peer = end.peer
        if peer.eof:
            end.close()
            peer.close()
        else:
            peer.write_eof()

    def on_lost(self, end: TunnelEnd, exc: BaseException | None) -> None:
        """`end` is gone: its peer is closed promptly (after what it was sent is written);
        when both are gone the tunnel is done."""
        if exc is None:
            reason = TunnelClose.CLIENT_CLOSED if end.is_client else TunnelClose.UPSTREAM_CLOSED
        else:
            reason = TunnelClose.CLIENT_RESET if end.is_client else TunnelClose.UPSTREAM_RESET
        self._ending(reason)
        peer = end.peer
        if not peer.closed:
            peer.close()
            return
        self._done()

    # -- decisions of ours ---------------------------------------------------------------
    def going_away(self, reason: TunnelClose) -> None:
        """End the tunnel ourselves: each side gets a 1001 close frame at its next frame
        boundary, then its socket is closed."""
        if self.reason is None:
            self.reason = reason
        self._deadline = self._loop.time() + CLOSE_LINGER_S
        for source in (self.client, self.upstream):
            scanner = source.scanner
            if source.eof or source.peer.closed:
                continue
            if scanner.lost:  # no boundary to place a frame at: ended without one
                source.cut = source.dropping = True
                source.resume_reading()
                source.peer.write_eof()
            elif scanner.at_boundary:
                source.send_going_away_to_peer()
            else:
                # The frame under way ends first; its rest is read even if the peer's
                # buffer is full (at most one frame more).
                source.cut = True
                source.resume_reading()

    def expire(self, now: float) -> None:
        """The sweeper's tick: idle and max-duration deadlines, and a closing tunnel whose
        sockets did not flush in time."""
        received = self.client.received + self.upstream.received
        if received != self._last_received:
            self._last_received = received
            self._idle_since = now
            self._count_bytes()
        if self._deadline:
            if now >= self._deadline:
                self.client.abort()
                self.upstream.abort()
            return
        if self.reason is not None:
            return
        idle_timeout = self.settings.idle_timeout
        if self._drain_at and now >= self._drain_at:
            self.going_away(TunnelClose.ROUTE_REMOVED)
        elif idle_timeout and now - self._idle_since >= idle_timeout:
            self.going_away(TunnelClose.IDLE_TIMEOUT)
        elif self._max_until and now >= self._max_until:
            self.going_away(TunnelClose.MAX_DURATION)

    def drain_by(self, deadline: float) -> None:
        """A reload removed the tunnel's route: it may run until `deadline` (loop time),
        then both sides get a 1001 close."""
        if not self._drain_at or deadline < self._drain_at:
            self._drain_at = deadline

    def abort(self) -> None:
        """Drop both sides at once (the last step of shutdown)."""
        self.client.abort()
        self.upstream.abort()

    def _ending(self, reason: TunnelClose) -> None:
        if self.reason is None:
            self.reason = reason
        if not self._deadline:
            self._deadline = self._loop.time() + CLOSE_LINGER_S

    def _count_bytes(self) -> None:
        counted = self._counted
        up, down = self.client.received, self.upstream.received
        count_tunnel_bytes(TunnelDirection.UPSTREAM, up - counted[0])
        count_tunnel_bytes(TunnelDirection.DOWNSTREAM, down - counted[1])
        counted[0], counted[1] = up, down

    def _done(self) -> None:
        host = self._host
        if self not in host.tunnels:
            return
        self._count_bytes()
        count_tunnel_close(cast(TunnelClose, self.reason))
        WEBSOCKET_TUNNELS_OPEN.dec()
        host.tunnel_closed(self)
        log.debug("%r done", self)
