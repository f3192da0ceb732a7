"""The upstream half of a WebSocket handshake: a connection of its own (never pooled, it
will become a tunnel), the Upgrade request, and the answer read with llhttp.

A 101 leaves the socket paused with any bytes that came after the head kept in `rest`,
until the front end has answered its client and `take_over` hands the socket to a tunnel.
Any other answer is a refusal, relayed with its status, headers and body (bounded: a
refusal page is small) and the connection closed.
"""

from __future__ import annotations

import asyncio
from typing import cast

import httptools

from proxy.config.model import WebSocketConfig
from proxy.core.errors import ProxyError, UpstreamProtocolError, UpstreamReset, UpstreamTimeout
from proxy.core.headers import connection_tokens
from proxy.core.models import RawHeaders
from proxy.upstream.h1 import RESPONSE_HOP_BY_HOP
from proxy.websocket.protocol import is_websocket

# A refusal's body is relayed whole; beyond this it is not a refusal page but a broken peer.
MAX_REFUSAL_BODY_BYTES = 1024 * 1024
_RAW_HOP_BY_HOP = frozenset(name.encode() for name in RESPONSE_HOP_BY_HOP)


class UpstreamHandshake(asyncio.Protocol):
    """One upstream connection, from connect to the end of the handshake's answer."""

    def __init__(self, max_head_bytes: int, settings: WebSocketConfig) -> None:
        self.settings = settings  # the route's: the tunnel's deadlines
        self.transport: asyncio.Transport | None = None
        self._max_head_bytes = max_head_bytes
        self._parser = httptools.HttpResponseParser(self)
        self._head_bytes = 0
        self._head_done = False
        self._error: ProxyError | None = None
        self._answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._body: list[bytes] = []
        self._body_size = 0
        self._close_delimited = False
        self.status = 0
        self.reason = b""
        self.headers: RawHeaders = []
        self.connection: bytes | None = None
        self.upgrade: bytes | None = None
        self.rest = b""  # tunnel bytes the upstream sent right after its 101

    def __repr__(self) -> str:
        return f"<UpstreamHandshake status={self.status}>"

    @property
    def body(self) -> bytes:
        """A refusal's body."""
        return b"".join(self._body)

    async def exchange(self, head: bytes, read_timeout: float) -> None:
        """Send the Upgrade request and wait for the whole answer (a 101's head, or a
        refusal with its body).

        Raises:
            UpstreamTimeout, UpstreamReset, UpstreamProtocolError: as their names say;
                the connection is closed.
        """
        transport = self.transport
        assert transport is not None
        transport.write(head)
        try:
            async with asyncio.timeout(read_timeout):
                await self._answered
        except TimeoutError:
            self._answered.cancel()
            transport.abort()
            raise UpstreamTimeout("upstream did not answer the WebSocket handshake") from None
        except BaseException:
            self._answered.cancel()  # (a failure settled later must not go unretrieved)
            transport.abort()
            raise

    def take_over(self, protocol: asyncio.Protocol) -> None:
        """Hand the socket (after a 101) to `protocol` and read on."""
        transport = self.transport
        assert transport is not None
        transport.set_protocol(protocol)
        transport.resume_reading()

    def close(self) -> None:
        """Drop the connection (a refusal was read, or nobody takes the tunnel)."""
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio callbacks -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._answered.done():
            return
        if not self._head_done:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if self.status == 101 and self._error is None:
                self.rest = data[exc.args[0] :]
                assert self.transport is not None
                self.transport.pause_reading()  # the tunnel reads on, once it exists
                self._settle()
                return
            self._fail(self._error or UpstreamProtocolError("malformed 101 answer"))
        except httptools.HttpParserError as exc:
            self._fail(self._error or UpstreamProtocolError(f"malformed response: {exc}"))
        else:
            if not self._head_done and self._head_bytes > self._max_head_bytes:
                self._fail(UpstreamProtocolError("response head too large"))
            elif self._error is not None:
                self._fail(self._error)

    def eof_received(self) -> bool:
        if self._head_done and self._close_delimited and not self._answered.done():
            self._settle()  # a refusal whose body ends with the connection
        else:
            self._fail(UpstreamReset("upstream closed the connection during the handshake"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(UpstreamReset("upstream closed the connection during the handshake"))

    # -- llhttp callbacks --------------------------------------------------------------
    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        if lower == b"connection":
            self.connection = value if self.connection is None else self.connection + b"," + value
        elif lower == b"upgrade":
            self.upgrade = value
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.headers, self.connection, self.upgrade, self.reason = [], None, None, b""
            return  # 100 Continue, 103 Early Hints: the real answer follows
        self._head_done = True
        self.status = status
        if status == 101:
            tokens = connection_tokens(self.connection or b"")
            if not is_websocket(self.upgrade) or b"upgrade" not in tokens:
                self._error = UpstreamProtocolError(
                    "the upstream's 101 does not switch to websocket"
                )
        headers = self.headers
        named = connection_tokens(self.connection) if self.connection else frozenset()
        self.headers = [
            (name, value)
            for name, value in headers
            if name.lower() not in _RAW_HOP_BY_HOP and name.lower() not in named
        ]
        lengths = [value for name, value in headers if name.lower() == b"content-length"]
        chunked = any(name.lower() == b"transfer-encoding" for name, _ in headers)
        self._close_delimited = status != 101 and not lengths and not chunked

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > MAX_REFUSAL_BODY_BYTES:
            self._error = UpstreamProtocolError("the upstream's refusal body is too large")
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self.status and self.status != 101 and self._error is None:
            self._settle()

    def _settle(self) -> None:
        if not self._answered.done():
            self._answered.set_result(None)

    def _fail(self, error: ProxyError) -> None:
        if not self._answered.done():
            self._answered.set_exception(error)
            if self.transport is not None:
                self.transport.abort()
