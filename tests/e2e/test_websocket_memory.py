"""Backpressure through a WebSocket tunnel, measured on the gateway process itself: a
client that never reads, an upstream that never stops sending, and the gateway's RSS
must stay flat (the upstream is held back instead of buffered).

The gateway runs as a one-worker subprocess (tests/support/gateway_process.py) so its RSS is
its own; the upstream is the `websockets` flood server (tests/support/upstreams/websocket.py)
in this process.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import cast

import pytest

from tests.support.gateway_process import free_port, gateway_config, rss_bytes, run_gateway
from tests.support.upstreams import WsUpstream

pytestmark = pytest.mark.socket

MIB = 1024**2
RSS_GROWTH_LIMIT_BYTES = 8 * MIB
FLOOD_LIMIT_BYTES = 16 * MIB
HANDSHAKE = (
    b"GET /flood HTTP/1.1\r\nHost: example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def test_a_client_that_never_reads_does_not_grow_the_gateway(tmp_path: Path) -> None:
    upstream = await WsUpstream().start()
    port = free_port()
    try:
        with run_gateway(
            gateway_config(port, upstream.url), tmp_path, port=port, args=("--workers", "1")
        ) as gateway:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            reader, writer = await asyncio.open_connection(sock=sock)
            try:
                writer.write(HANDSHAKE)
                async with asyncio.timeout(10):
                    head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 101 ")
                cast(asyncio.Transport, writer.transport).pause_reading()  # never read again
                async with asyncio.timeout(10):  # the upstream sends (a busy machine's pace)
                    while not upstream.flood_sent:  # noqa: ASYNC110 - no event to wait on
                        await asyncio.sleep(0.01)
                await asyncio.sleep(0.5)  # the buffers on the way fill (at least this long)
                rss_before = rss_bytes(gateway.pid)
                await asyncio.sleep(3.0)  # a window to grow in: longer only tests more
                growth = rss_bytes(gateway.pid) - rss_before
                assert upstream.flood_sent < FLOOD_LIMIT_BYTES  # held back
                assert growth < RSS_GROWTH_LIMIT_BYTES, f"RSS grew {growth / MIB:.1f} MiB"
            finally:
                writer.close()
    finally:
        await upstream.stop()
