"""WebSocket tunnels (proxy/websocket/tunnel.py): bytes both ways unchanged, half-closes
passed on, a reset side closing the other, backpressure, and the tunnel's own ends (idle,
max duration, a removed route, shutdown) with a 1001 close frame placed at a frame
boundary, then an abort for sides that do not finish.

Each side is a real loopback connection: the gateway's half is an asyncio transport taken
over by a `SocketEnd` (as after a handshake), the other half a raw socket playing the
client or the upstream. The HTTP/2 side (`StreamEnd`) is fed through real `Body`s. The
host is a real, unstarted Server; the sweeper is not running and the tests call `expire`
with the times they want. Frames are built and read with wsproto, not with the code
under test."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from wsproto.frame_protocol import CloseReason, Frame, FrameProtocol, Opcode

from metrics.definitions import TunnelClose
from proxy.config.load import parse_config
from proxy.config.model import WebSocketConfig
from proxy.core.body import Body
from proxy.core.errors import UpstreamReset
from proxy.process.server import Server
from proxy.websocket.tunnel import CLOSE_LINGER_S, SocketEnd, StreamEnd, Tunnel
from tests.support.helpers import RawClient, eventually

pytestmark = pytest.mark.socket

CONFIG = """
listeners: [{bind: 127.0.0.1:0}]
upstreams: {app: {endpoints: [http://127.0.0.1:9]}}
routes: [{name: chat, match: {path_prefix: /}, upstream: app}]
"""

Side = tuple[SocketEnd, RawClient]
Open = Callable[..., Awaitable[Side]]


@pytest.fixture
async def host() -> AsyncIterator[Server]:
    server = Server(parse_config(CONFIG))
    yield server
    await server.runtime.aclose()


@pytest.fixture
async def open_side() -> AsyncIterator[Open]:
    """`await open_side(is_client=, small_buffers=False)`: a SocketEnd on the gateway's
    half of a loopback connection, and a RawClient on the other half."""
    loop = asyncio.get_running_loop()
    made: list[Side] = []

    async def side(*, is_client: bool, small_buffers: bool = False) -> Side:
        with socket.create_server(("127.0.0.1", 0)) as listening:
            sock = socket.socket()
            sock.setblocking(False)
            if small_buffers:  # a side that does not read fills the buffers soon
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await loop.sock_connect(sock, listening.getsockname())
            accepted, _ = listening.accept()
        if small_buffers:
            accepted.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, accepted)
        end = SocketEnd(transport, is_client=is_client)
        transport.set_protocol(end)
        made.append((end, RawClient(sock)))
        return made[-1]

    yield side
    for end, peer in made:
        peer.close()
        end.abort()
    await asyncio.sleep(0.01)  # the aborted transports' connection_lost


async def tunnel_between(
    host: Server, open_side: Open, settings: WebSocketConfig | None = None, **options: bool
) -> tuple[Tunnel, RawClient, RawClient]:
    client_end, client = await open_side(is_client=True, **options)
    upstream_end, upstream = await open_side(is_client=False)
    tunnel = Tunnel(host, "chat", settings or WebSocketConfig(), client_end, upstream_end)
    return tunnel, client, upstream


def from_client(payload: bytes) -> bytes:
    """A frame as a client sends it (masked)."""
    return bytes(FrameProtocol(client=True, extensions=[]).send_data(payload, fin=True))


def from_upstream(payload: bytes) -> bytes:
    """A frame as a server sends it (unmasked)."""
    return bytes(FrameProtocol(client=False, extensions=[]).send_data(payload, fin=True))


def frames(data: bytes, *, at_client: bool) -> list[Frame]:
    """The frames in `data` as the client (server frames) or the upstream (client frames,
    masked) reads them."""
    reader = FrameProtocol(client=at_client, extensions=[])
    reader.receive_bytes(data)
    return list(reader.received_frames())


def going_away(frame: Frame) -> bool:
    return frame.opcode is Opcode.CLOSE and frame.payload == (CloseReason.GOING_AWAY, "going away")


def reason(tunnel: Tunnel) -> TunnelClose | None:
    """Why the tunnel ended, now (a function: mypy would hold it to an earlier check)."""
    return tunnel.reason


def reset(peer: RawClient) -> None:
    """Close with a reset (RST), not a FIN."""
    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()


async def test_bytes_pass_both_ways_unchanged(host: Server, open_side: Open) -> None:
    tunnel, client, upstream = await tunnel_between(host, open_side)
    assert tunnel in host.tunnels
    up, down = from_client(b"ping" * 100), from_upstream(b"pong" * 1000)
    await client.send(up)
    assert await upstream.read_exactly(len(up)) == up
    await upstream.send(down)
    assert await client.read_exactly(len(down)) == down
    assert (tunnel.client.received, tunnel.upstream.received) == (len(up), len(down))
    assert reason(tunnel) is None


async def test_a_half_close_is_passed_on_and_the_tunnel_ends_when_both_are_done(
    host: Server, open_side: Open
) -> None:
    tunnel, client, upstream = await tunnel_between(host, open_side)
    client.shutdown_write()
    assert await upstream.read_until_closed() == b""  # the upstream reads EOF
    assert reason(tunnel) is TunnelClose.CLIENT_CLOSED
    late = from_upstream(b"still here")
    await upstream.send(late)  # the other direction still carries bytes
    assert await client.read_exactly(len(late)) == late
    upstream.shutdown_write()
    assert await client.read_until_closed() == b""
    await eventually(lambda: tunnel not in host.tunnels, "the tunnel to end")
    assert reason(tunnel) is TunnelClose.CLIENT_CLOSED  # the side that ended it first


async def test_a_side_that_resets_closes_the_other(host: Server, open_side: Open) -> None:
    tunnel, client, upstream = await tunnel_between(host, open_side)
    reset(upstream)
    assert await client.read_until_closed() == b""
    await eventually(lambda: tunnel not in host.tunnels, "the tunnel to end")
    assert reason(tunnel) is TunnelClose.UPSTREAM_RESET


async def test_a_side_that_does_not_read_holds_the_other_back(
    host: Server, open_side: Open
) -> None:
    tunnel, client, upstream = await tunnel_between(host, open_side, small_buffers=True)
    flood = from_upstream(b"f" * 60000)
    sent = 0
    upstream_transport = tunnel.upstream.transport
    while upstream_transport.is_reading():  # the client reads nothing
        await upstream.send(flood)
        sent += len(flood)
        await asyncio.sleep(0.001)
        assert sent < 64 * 1024 * 1024, "the upstream was never held back"
    got = await client.read_exactly(sent, wait_s=30)
    assert len(got) == sent
    await eventually(lambda: upstream_transport.is_reading(), "the upstream to be read again")


async def test_an_idle_tunnel_gets_a_1001_close_on_each_side(host: Server, open_side: Open) -> None:
    settings = WebSocketConfig(idle_timeout=30.0)
    tunnel, client, upstream = await tunnel_between(host, open_side, settings)
    loop = asyncio.get_running_loop()
    await client.send(from_client(b"hello"))
    await upstream.read_exactly(len(from_client(b"hello")))
    seen = loop.time() + 10
    tunnel.expire(seen)  # traffic since the last tick: idle from here
    tunnel.expire(seen + 29.0)
    assert reason(tunnel) is None
    tunnel.expire(seen + 30.0)
    assert reason(tunnel) is TunnelClose.IDLE_TIMEOUT
    to_client = frames(await client.read_until_closed(), at_client=True)
    to_upstream = frames(await upstream.read_until_closed(), at_client=False)
    assert [going_away(f) for f in to_client] == [True]
    assert [going_away(f) for f in to_upstream] == [True]  # masked, as a client's


@pytest.mark.parametrize("why", [TunnelClose.MAX_DURATION, TunnelClose.ROUTE_REMOVED])
async def test_a_tunnel_past_its_max_duration_or_its_routes_grace_goes_away(
    host: Server, open_side: Open, why: TunnelClose
) -> None:
    settings = WebSocketConfig(max_duration=60.0)
    tunnel, client, upstream = await tunnel_between(host, open_side, settings)
    start = asyncio.get_running_loop().time()
    if why is TunnelClose.ROUTE_REMOVED:
        tunnel.drain_by(start + 5.0)
        tunnel.drain_by(start + 50.0)  # a later deadline does not postpone it
    tunnel.expire(start + (4.0 if why is TunnelClose.ROUTE_REMOVED else 59.0))
    assert reason(tunnel) is None
    tunnel.expire(start + (5.0 if why is TunnelClose.ROUTE_REMOVED else 60.5))
    assert reason(tunnel) is why
    assert [going_away(f) for f in frames(await client.read_until_closed(), at_client=True)] == [
        True
    ]
    assert [going_away(f) for f in frames(await upstream.read_until_closed(), at_client=False)] == [
        True
    ]


async def test_going_away_mid_frame_lets_the_frame_end_before_the_close(
    host: Server, open_side: Open
) -> None:
    tunnel, client, upstream = await tunnel_between(host, open_side)
    first, second = from_client(b"a" * 100), from_client(b"never")
    await client.send(first[:50])
    await upstream.read_exactly(50)
    tunnel.going_away(TunnelClose.SHUTDOWN)
    # The upstream's direction is at a boundary: the client gets its close at once.
    assert [going_away(f) for f in frames(await client.read_until_closed(), at_client=True)] == [
        True
    ]
    await client.send(first[50:] + second)
    rest = await upstream.read_until_closed()
    got = frames(first[:50] + rest, at_client=False)
    assert [(f.opcode, f.payload) for f in got[:1]] == [(Opcode.BINARY, b"a" * 100)]
    assert [going_away(f) for f in got[1:]] == [True]  # and `second` was dropped


async def test_sides_that_do_not_finish_closing_are_aborted(host: Server, open_side: Open) -> None:
    tunnel, client, upstream = await tunnel_between(host, open_side)
    tunnel.going_away(TunnelClose.SHUTDOWN)
    now = asyncio.get_running_loop().time()
    tunnel.expire(now + CLOSE_LINGER_S - 1.0)
    assert tunnel in host.tunnels
    tunnel.expire(now + CLOSE_LINGER_S + 0.5)  # neither side answered its close frame
    await eventually(lambda: tunnel not in host.tunnels, "the tunnel to end")
    assert tunnel.client.closed
    assert tunnel.upstream.closed
    # Each saw its close frame, then the end of its connection.
    assert [going_away(f) for f in frames(await client.read_until_closed(), at_client=True)] == [
        True
    ]
    assert [going_away(f) for f in frames(await upstream.read_until_closed(), at_client=False)] == [
        True
    ]


# -- an HTTP/2 client side (RFC 8441) ---------------------------------------------------


async def read_body(body: Body) -> bytes:
    data = bytearray()
    while chunk := await body.read():
        data += chunk
    return bytes(data)


async def test_an_http2_stream_side_passes_bytes_and_its_end_both_ways(
    host: Server, open_side: Open
) -> None:
    incoming = Body(None)
    stream = StreamEnd(incoming)
    upstream_end, upstream = await open_side(is_client=False)
    tunnel = Tunnel(host, "chat", WebSocketConfig(), stream, upstream_end)
    stream.start()
    up = from_client(b"over h2")
    incoming.feed(up)  # the client's DATA
    assert await upstream.read_exactly(len(up)) == up
    down = from_upstream(b"back")
    await upstream.send(down)
    assert await asyncio.wait_for(stream.outgoing.read(), 10) == down  # the response's DATA
    incoming.feed_eof()  # END_STREAM from the client
    assert await upstream.read_until_closed() == b""
    upstream.shutdown_write()
    assert await asyncio.wait_for(read_body(stream.outgoing), 10) == b""  # END_STREAM
    await eventually(lambda: tunnel not in host.tunnels, "the tunnel to end")
    assert reason(tunnel) is TunnelClose.CLIENT_CLOSED


async def test_a_reset_http2_stream_closes_the_upstream_side(host: Server, open_side: Open) -> None:
    incoming = Body(None)
    stream = StreamEnd(incoming)
    upstream_end, upstream = await open_side(is_client=False)
    tunnel = Tunnel(host, "chat", WebSocketConfig(), stream, upstream_end)
    stream.start()
    incoming.fail(UpstreamReset("the client reset the stream"))
    assert await upstream.read_until_closed() == b""
    await eventually(lambda: tunnel not in host.tunnels, "the tunnel to end")
    assert reason(tunnel) is TunnelClose.CLIENT_RESET
