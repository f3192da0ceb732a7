"""Hand-over from an HTTP exchange to a byte tunnel, once the upstream answered 101.

HTTP/1.1: the client gets the upstream's 101 (with our own Connection and Upgrade), and
then its socket leaves the HTTP/1.1 front end: `set_protocol` gives it to a `SocketEnd`.
HTTP/2 (RFC 8441): the client's stream gets 200 (the extended CONNECT succeeded) and
stays a stream: a `StreamEnd` carries the WebSocket bytes in its DATA frames.

Either way the upstream's socket goes to a `SocketEnd`, with the bytes it sent right after
its 101 passed on first.
"""

from __future__ import annotations

import logging

from metrics.traffic import HTTP1, count_request
from proxy.codec.h1serialize import UnsafeHeader
from proxy.core.models import Request, Response
from proxy.core.tracing import end_exchange
from proxy.frontend.connection import ClientConnection
from proxy.websocket.tunnel import SocketEnd, StreamEnd, Tunnel, TunnelHost
from proxy.websocket.upstream import UpstreamHandshake

log = logging.getLogger(__name__)

_SWITCH_FIELDS = [b"Connection: Upgrade\r\n", b"Upgrade: websocket\r\n"]


def start_h1_tunnel(
    conn: ClientConnection, request: Request, response: Response, client_rest: bytes
) -> bool:
    """Answer 101 on `conn` and join its socket to the upstream's. `client_rest` is what
    the client sent after its request head (frames sent before our answer). False when
    the client is gone (the upstream connection is closed)."""
    from proxy.frontend.h1 import response_head_bytes  # (http1 imports this module)

    handshake = _handshake(response)
    upstream_transport = handshake.transport
    assert upstream_transport is not None
    transport = conn.transport
    if conn.closed or transport is None or transport.is_closing():
        handshake.close()
        return False
    try:
        head = response_head_bytes(response, _SWITCH_FIELDS)
    except UnsafeHeader:
        log.exception("refusing to send an unsafe 101 header")
        handshake.close()
        return False
    transport.write(head)
    count_request(request, response.status, 0, HTTP1)  # a tunnel's request ends at its 101
    end_exchange(request, response.status)
    client = SocketEnd(transport, is_client=True)
    upstream = SocketEnd(upstream_transport, is_client=False)
    Tunnel(conn.server, request.exchange.route_name, handshake.settings, client, upstream)
    conn.hand_over()
    transport.set_protocol(client)
    handshake.take_over(upstream)
    if handshake.rest:
        upstream.data_received(handshake.rest)
    if client_rest:
        client.data_received(client_rest)
    transport.resume_reading()
    return True


def start_h2_tunnel(host: TunnelHost, request: Request, response: Response) -> Response:
    """Join an extended CONNECT stream to the upstream's socket; the response to send on
    the stream (200, then the upstream's bytes as DATA)."""
    handshake = _handshake(response)
    upstream_transport = handshake.transport
    assert upstream_transport is not None
    client = StreamEnd(request.body)
    upstream = SocketEnd(upstream_transport, is_client=False)
    Tunnel(host, request.exchange.route_name, handshake.settings, client, upstream)
    raw = response.raw_headers
    if raw is None:  # headers a middleware touched
        raw = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in response.headers.items()]
    # The accept value answered our own key (RFC 8441 section 5: an HTTP/2 client sends
    # none and expects none).
    headers = [(name, value) for name, value in raw if name.lower() != b"sec-websocket-accept"]
    handshake.take_over(upstream)
    if handshake.rest:
        upstream.data_received(handshake.rest)
    client.start()
    return Response(200, headers, client.outgoing)


def _handshake(response: Response) -> UpstreamHandshake:
    """The upstream connection a 101 holds (the forwarder put it there)."""
    handshake = response.upgrade
    assert isinstance(handshake, UpstreamHandshake)
    return handshake
