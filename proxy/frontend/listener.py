"""Listeners that accept connections themselves, to read ahead of TLS and HTTP: those with
`proxy_protocol: true`, whose connections begin with a PROXY protocol header
(proxy/frontend/proxy_header.py), and TLS listeners that answer ACME TLS-ALPN-01
challenges, which look at each ClientHello first (proxy/frontend/client_hello.py).

The header comes before the TLS ClientHello, and asyncio's TLS transport reads the socket
from the start: a listener made by `create_server(ssl=...)` would hand the header to the
TLS handshake, and one made without TLS cannot give the bytes it has already read back
to a TLS layer started afterwards (`start_tls` takes no initial bytes). So these
listeners accept connections themselves: the header is read off the socket by peeking
and then consuming exactly its bytes (never one byte of what follows), and the socket
is handed to the loop with `connect_accepted_socket` (TLS included), where it becomes a
`ClientConnection` like any other. The same path serves plaintext listeners.

- Bounded: at most `V1_MAX_BYTES` or `V2_FIXED_BYTES + V2_MAX_PAYLOAD_BYTES` bytes are
  read, and the whole header must arrive within `limits.header_timeout`.
- A connection without a valid header (not a PROXY header, malformed, too long, too slow,
  closed early) is closed, logged at debug and counted in
  `gatehouse_proxy_protocol_refused_total{reason}`; nothing else notices.
- Believed only from a TCP peer inside `client_ip.trusted_proxies`: the header's source
  address then stands for the connection's peer (proxy/core/client_ip.py). From any other peer
  the header is read and ignored: the TCP peer is the client.

On a listener given `choose_context`, the ClientHello is then peeked at (never
consumed), within `limits.header_timeout` too, and the TLS context the connection
is handed over with is `choose_context(hello)` when that gives one (a TLS-ALPN-01
challenge's), the listener's own otherwise, and for a ClientHello that cannot be read.

`AcceptingServer` offers what `Server` uses of an `asyncio.Server` (sockets,
start_serving, close, wait_closed), so reload and drain treat both alike.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import Callable

from metrics.definitions import ProxyHeaderRefusal, count_proxy_header_refused
from proxy.config.model import ListenerConfig
from proxy.frontend.client_hello import ClientHello, peek_client_hello
from proxy.frontend.connection import ClientConnection, FrontEnd, ServerContext
from proxy.frontend.proxy_header import ProxyHeader, ProxyHeaderError, ProxyHeaderReader

log = logging.getLogger(__name__)

# Out of descriptors or memory while accepting: wait this long before accepting again
# (asyncio's own servers do the same), rather than spin on the error.
ACCEPT_RETRY_DELAY_S = 1.0
# Connections accepted per wake-up of a listening socket (the rest at the next one).
MAX_ACCEPTS_PER_WAKE = 64
_ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

# Which TLS context a connection gets, from its ClientHello (None: the listener's own).
ChooseContext = Callable[[ClientHello], ssl.SSLContext | None]


class ProxyHeaderClosed(Exception):
    """The peer closed the connection before the header was complete."""


async def read_proxy_header(sock: socket.socket) -> ProxyHeader:
    """Read one PROXY header from the start of `sock` (non-blocking), consuming exactly
    its bytes.

    Raises:
        ProxyHeaderError: the bytes are not a valid header.
        ProxyHeaderClosed: the peer closed before the header was complete.
        OSError: the connection failed (reset).
    """
    loop = asyncio.get_running_loop()
    reader = ProxyHeaderReader()
    while reader.header is None:
        try:
            data = sock.recv(reader.wanted(), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            await _readable(loop, sock)
            continue
        if not data:
            raise ProxyHeaderClosed("closed before the PROXY header was complete")
        taken = reader.feed(data)
        if taken:
            # The peeked bytes are queued in the socket: this takes exactly them.
            sock.recv(taken)
    return reader.header


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Wait until `sock` has something to read (or has closed)."""
    waiter: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    loop.add_reader(fd, _wake, waiter)
    try:
        await waiter
    finally:
        loop.remove_reader(fd)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def create_accepting_server(
    server: ServerContext,
    listener: ListenerConfig,
    context: ssl.SSLContext | None,
    front_end: Callable[[ClientConnection], FrontEnd],
    *,
    reuse_port: bool,
    backlog: int,
    start_serving: bool,
    choose_context: ChooseContext | None = None,
) -> AcceptingServer:
    """Bind `listener`'s address as asyncio's `create_server` would (every address the
    host resolves to; SO_REUSEADDR, SO_REUSEPORT when asked, IPV6_V6ONLY) and serve it.

    Raises:
        OSError: the host does not resolve, or an address cannot be bound (the sockets
            already made are closed).
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        listener.host, listener.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # As asyncio: an IPv6 listener does not take IPv4 connections as well.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                where = f"error while attempting to bind on address {address!r}"
                raise OSError(exc.errno, f"{where}: {exc.strerror}") from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    accepting = AcceptingServer(server, listener, sockets, context, front_end, choose_context)
    if start_serving:
        await accepting.start_serving()
    return accepting


class AcceptingServer:
    """Accepts the connections of one listener that reads ahead (see the module
    docstring), as asyncio's own servers do: a reader callback on each listening socket
    accepts what is queued, and each connection gets a task until it is handed over."""

    def __init__(
        self,
        server: ServerContext,
        listener: ListenerConfig,
        sockets: list[socket.socket],
        context: ssl.SSLContext | None,
        front_end: Callable[[ClientConnection], FrontEnd],
        choose_context: ChooseContext | None = None,
    ) -> None:
        self._server = server
        self._listener = listener
        self._sockets = sockets
        self._context = context
        self._front_end = front_end
        self._choose_context = choose_context if context is not None else None
        self._loop: asyncio.AbstractEventLoop | None = None  # set when serving
        # Connections whose header is being read: each task (the reference keeps it
        # alive) with its socket, None once handed over to the loop. A task cancelled
        # before it ran never reaches its own `finally`: `_finished` closes the socket.
        self._pending: dict[asyncio.Task[None], socket.socket | None] = {}
        self._closed = False

    def __repr__(self) -> str:
        state = "CLOSED" if self._closed else "SERVING" if self._loop else "BOUND"
        return f"<AcceptingServer {self._listener.name} {state} pending={len(self._pending)}>"

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets (empty once closed)."""
        return () if self._closed else tuple(self._sockets)

    async def start_serving(self) -> None:
        """Start accepting connections."""
        if self._closed or self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        for sock in self._sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        """Stop accepting and drop the connections still sending their header; those
        already handed over carry on (the server drains them)."""
        if self._closed:
            return
        self._closed = True
        for sock in self._sockets:
            if self._loop is not None:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        for task in list(self._pending):
            task.cancel()

    async def wait_closed(self) -> None:
        """Wait until the header reads have ended."""
        await asyncio.gather(*self._pending, return_exceptions=True)

    def _accept(self, listening: socket.socket) -> None:
        """The listening socket is readable: accept what is queued (a bounded batch)."""
        loop = self._loop
        assert loop is not None
        for _ in range(MAX_ACCEPTS_PER_WAKE):
            try:
                sock, address = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while queued
            except OSError as exc:
                # Out of descriptors or memory (or worse): stop accepting for a moment
                # rather than spin on the error, as asyncio's servers do.
                level = logging.ERROR if exc.errno in _ACCEPT_RESOURCE_ERRORS else logging.CRITICAL
                log.log(
                    level,
                    "%s: cannot accept: %s; accepting again in %.0f s",
                    *(self._listener.name, exc, ACCEPT_RETRY_DELAY_S),
                )
                loop.remove_reader(listening.fileno())
                loop.call_later(ACCEPT_RETRY_DELAY_S, self._resume, listening)
                return
            task = loop.create_task(self._serve(sock, address))
            self._pending[task] = sock
            task.add_done_callback(self._finished)

    def _resume(self, listening: socket.socket) -> None:
        if not self._closed and self._loop is not None:
            self._loop.add_reader(listening.fileno(), self._accept, listening)

    def _finished(self, task: asyncio.Task[None]) -> None:
        sock = self._pending.pop(task, None)
        if sock is not None:
            sock.close()  # not handed over: ours to close (again is harmless)

    async def _serve(self, sock: socket.socket, address: tuple[str, int]) -> None:
        """Read ahead on one connection, then hand the socket to the loop."""
        tcp_peer = (str(address[0]), int(address[1]))
        try:
            sock.setblocking(False)
            peer: tuple[str, int] | None = tcp_peer
            if self._listener.proxy_protocol:
                peer = await self._header(sock, tcp_peer)
            if peer is None:
                return
            context = self._context
            if self._choose_context is not None:
                context = await self._chosen_context(sock) or context
            server, listener, front_end = self._server, self._listener, self._front_end
            # From here the loop's transport owns the socket, and closes it on failure.
            task = asyncio.current_task()
            if task in self._pending:
                self._pending[task] = None
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: ClientConnection(server, listener, front_end, peer),
                sock,
                ssl=context,
            )
        except OSError as exc:
            # The TLS handshake failed (ssl.SSLError is an OSError) or timed out, or the
            # client reset: its own affair, as with any listener.
            log.debug("%s: connection from %s failed: %r", self._listener.name, tcp_peer, exc)
        except Exception:
            log.exception("bug while accepting a connection from %s", tcp_peer)

    async def _header(
        self, sock: socket.socket, tcp_peer: tuple[str, int]
    ) -> tuple[str, int] | None:
        """The connection's peer after its PROXY header (None: refused and counted)."""
        name = self._listener.name
        try:
            async with asyncio.timeout(self._server.limits.header_timeout):
                header = await read_proxy_header(sock)
        except ProxyHeaderError as exc:
            reason, detail = ProxyHeaderRefusal.INVALID, str(exc)
        except TimeoutError:
            reason, detail = ProxyHeaderRefusal.TIMEOUT, "no complete PROXY header in time"
        except (ProxyHeaderClosed, OSError) as exc:
            reason, detail = ProxyHeaderRefusal.CLOSED, str(exc) or type(exc).__name__
        else:
            return self._believed(header, tcp_peer)
        count_proxy_header_refused(reason)
        log.debug("%s: refused connection from %s: %s", name, tcp_peer[0], detail)
        return None

    async def _chosen_context(self, sock: socket.socket) -> ssl.SSLContext | None:
        """The context `choose_context` gives for the connection's ClientHello (None:
        the listener's own, also when the ClientHello cannot be read in time)."""
        assert self._choose_context is not None
        try:
            async with asyncio.timeout(self._server.limits.header_timeout):
                hello = await peek_client_hello(sock)
        except TimeoutError:
            return None
        return None if hello is None else self._choose_context(hello)

    def _believed(self, header: ProxyHeader, tcp_peer: tuple[str, int]) -> tuple[str, int]:
        """The peer to serve the connection as: the header's source when the TCP peer
        is a trusted proxy and the header names one, else the TCP peer."""
        source = header.source
        resolver = self._server.client_ip
        if source is not None and resolver is not None and resolver.trusts(tcp_peer[0]):
            return source
        if source is not None:
            log.debug(
                "%s: PROXY header from %s, not a trusted proxy: ignored",
                *(self._listener.name, tcp_peer[0]),
            )
        return tcp_peer
