"""Opening upstream sockets: the one place connect errors are mapped to ProxyErrors."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import TypeVar

from proxy.errors import UpstreamConnectError, UpstreamConnectTimeout

P = TypeVar("P", bound=asyncio.Protocol)


async def open_connection(
    protocol_factory: Callable[[], P], host: str, port: int, connect_timeout_s: float
) -> P:
    """Connect to host:port within `connect_timeout_s` and return the connected protocol.

    Raises:
        UpstreamConnectTimeout: the connect took longer than `connect_timeout_s`.
        UpstreamConnectError: refused, unreachable, or the name did not resolve.
    """
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(connect_timeout_s):
            transport, protocol = await loop.create_connection(protocol_factory, host, port)
    except TimeoutError:
        raise UpstreamConnectTimeout(f"connect to {host}:{port} timed out") from None
    except OSError as exc:
        raise UpstreamConnectError(
            f"connect to {host}:{port} failed: {exc.strerror or exc}"
        ) from None
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # Requests are written whole; Nagle would only hold the last segment back.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return protocol
