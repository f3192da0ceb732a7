"""A real WebSocket upstream for the tunnel tests: the `websockets` library's server on
127.0.0.1, whose behaviour is chosen by the request path.

- `/refuse`: answers the handshake 403 with a body (a refusal to relay).
- `/close/CODE`: closes with CODE as soon as it is open.
- `/flood`: sends 64 KiB binary messages until the connection breaks (backpressure).
- `/die`: echoes the first message, then drops the TCP connection without a close frame.
- anything else: echoes every message (text stays text, binary stays binary).

It records what it saw: each handshake's request headers, and for each connection how it
ended (the close code it received, or None without a close frame).
"""

from __future__ import annotations

import asyncio
import contextlib
import http
from collections.abc import Sequence
from dataclasses import dataclass, field

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

REFUSAL_BODY = b"no websockets for you\n"
FLOOD_MESSAGE = b"\xab" * 65536


def _chat_if_offered(
    connection: ServerConnection, offered: Sequence[Subprotocol]
) -> Subprotocol | None:
    return Subprotocol("chat") if "chat" in offered else None


@dataclass
class WsUpstream:
    """The server and what it recorded."""

    server: Server | None = None
    port: int = 0
    handshakes: list[Headers] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    close_codes: list[int | None] = field(default_factory=list)  # one per ended connection
    open_connections: int = 0
    flood_sent: int = 0
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        """http://127.0.0.1:PORT, for a routes.yaml endpoint."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> WsUpstream:
        """Listen on `port` (a free one by default)."""
        self.server = await serve(
            self._handle,
            "127.0.0.1",
            port,
            process_request=self._process_request,
            max_size=None,
            compression=None,
            ping_interval=None,
            select_subprotocol=_chat_if_offered,
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Close the listener and every connection."""
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self.server.wait_closed()

    async def wait_ended(self, count: int, within_s: float = 10.0) -> None:
        """Wait until `count` connections have ended (`within_s` bounds a hang)."""
        async with asyncio.timeout(within_s):
            while len(self.close_codes) < count:
                self.ended.clear()
                await self.ended.wait()

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        self.handshakes.append(request.headers)
        self.paths.append(request.path)
        if request.path == "/refuse":
            headers = Headers([("Content-Type", "text/plain")])
            return Response(http.HTTPStatus.FORBIDDEN, "Forbidden", headers, REFUSAL_BODY)
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        self.open_connections += 1
        path = ws.request.path if ws.request is not None else "/"
        try:
            if path.startswith("/close/"):
                await ws.close(int(path.rsplit("/", 1)[1]), "upstream says bye")
            elif path == "/flood":
                while True:
                    await ws.send(FLOOD_MESSAGE)
                    self.flood_sent += len(FLOOD_MESSAGE)
            elif path == "/die":
                await ws.send(await ws.recv())
                ws.transport.abort()
            else:
                async for message in ws:
                    await ws.send(message)
        except ConnectionClosed:
            pass
        finally:
            self.open_connections -= 1
            received = ws.protocol.close_rcvd
            self.close_codes.append(received.code if received is not None else None)
            self.ended.set()
