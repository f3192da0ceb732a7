"""Which front end serves a new connection: ALPN on TLS, the preface on plaintext.

A plaintext listener serves HTTP/1.1 and h2c with prior knowledge on one port (RFC 9113
section 3.3): the first 24 bytes tell them apart, since no HTTP/1.1 request starts with
the HTTP/2 connection preface. On TLS the client said which it speaks in ALPN.
"""

from __future__ import annotations

from collections.abc import Container

from proxy.frontend.client_hello import ACME_TLS_ALPN_PROTOCOL
from proxy.frontend.connection import ClientConnection, ConnectionPhase, FrontEnd
from proxy.frontend.h1 import Http1Protocol
from proxy.frontend.h2.conn import PREFACE
from proxy.frontend.h2.protocol import Http2Protocol


class PrefaceSniffer:
    """Buffers the first bytes of a plaintext connection until they show whether it
    starts with the HTTP/2 preface, then hands the connection to the right front end."""

    __slots__ = ("_buffer", "_conn")

    def __init__(self, conn: ClientConnection) -> None:
        self._conn = conn
        self._buffer = b""

    def __repr__(self) -> str:
        return f"<PrefaceSniffer buffered={len(self._buffer)}>"

    def feed(self, data: bytes) -> None:
        """Buffer until the preface is matched or ruled out, then switch."""
        buffered = self._buffer + data if self._buffer else data
        if len(buffered) < len(PREFACE) and PREFACE.startswith(buffered):
            self._buffer = buffered
            return
        self._buffer = b""
        front_end: FrontEnd
        if buffered.startswith(PREFACE):
            front_end = Http2Protocol(self._conn)
        else:
            front_end = Http1Protocol(self._conn)
        self._conn.front_end = front_end
        front_end.feed(buffered)

    def on_eof(self) -> None:
        """Closed before saying anything usable."""
        self._conn.close()

    def on_close(self) -> None:
        """Nothing to clean up."""

    def on_timeout(self, phase: ConnectionPhase) -> None:
        """No complete preface or request head in time: close (a partial preface has no
        HTTP/1.1 reply that would make sense)."""
        self._conn.close()

    def on_drain_request(self) -> None:
        """Shutdown before the first bytes: close."""
        self._conn.close()

    def on_routes_removed(self, routes: Container[str]) -> None:
        """No exchange yet: nothing to end."""


def plaintext_front_end(conn: ClientConnection) -> FrontEnd:
    """HTTP/1.1, or HTTP/2 once the preface arrives (when the listener allows h2c)."""
    if conn.listener.http2:
        return PrefaceSniffer(conn)
    return Http1Protocol(conn)


def tls_front_end(conn: ClientConnection) -> FrontEnd:
    """The protocol the client chose by ALPN (HTTP/1.1 when it chose none)."""
    transport = conn.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    chosen = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
    if chosen == "h2":
        return Http2Protocol(conn)
    if chosen == ACME_TLS_ALPN_PROTOCOL:
        # An ACME TLS-ALPN-01 validation is the handshake alone (RFC 8737 section 3):
        # closed once the handshake is over (not from inside it).
        conn.loop.call_soon(conn.close)
    return Http1Protocol(conn)
