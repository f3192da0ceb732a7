"""Upstream connections without sockets, for the pool's own logic (proxy/upstream/pool.py),
as httpcore's mock backend does: `UpstreamPool(..., connector=MemoryConnector())` (the
pool's Dialer connects with it instead of transport.open_connection).

Each connect records its arguments, builds the protocol and hands it a `MemoryTransport`,
which keeps what the protocol writes and closes as asyncio's transports do: the protocol's
`connection_lost` follows on a later loop iteration. The test plays the upstream with
`transport.receive(bytes)` and `transport.drop()`. `hold` keeps connects waiting, `fail`
makes the next one raise, `lose_at_once` has the upstream close a connection before the
connect returns.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

P = TypeVar("P", bound=asyncio.Protocol)


@dataclass(frozen=True)
class Connect:
    """One connect as the pool asked for it."""

    host: str
    port: int
    timeout_s: float
    tls: ssl.SSLContext | None
    server_hostname: str | None
    require_alpn: str | None


class MemoryTransport(asyncio.Transport):
    """A connected transport with nothing behind it: writes are kept in `written`."""

    def __init__(self, protocol: asyncio.Protocol, peer: tuple[str, int]) -> None:
        super().__init__()
        self.protocol = protocol
        self.peer = peer
        self.written = bytearray()
        self.reading = True
        self.closing = False
        self.aborted = False
        self._loop = asyncio.get_running_loop()

    def __repr__(self) -> str:
        return f"<MemoryTransport {self.peer} closing={self.closing} aborted={self.aborted}>"

    # -- what the protocol calls -------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.closing:
            self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self._lose(None)

    def abort(self) -> None:
        self.aborted = True
        self._lose(None)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def can_write_eof(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    # -- what the test, as the upstream, does ------------------------------------------
    def receive(self, data: bytes) -> None:
        """Bytes from the upstream."""
        assert not self.closing, "the connection is closed"
        self.protocol.data_received(data)

    def drop(self) -> None:
        """The upstream goes away (a reset)."""
        self._lose(ConnectionResetError("the upstream went away"))

    def _lose(self, exc: Exception | None) -> None:
        if not self.closing:
            self.closing = True
            self._loop.call_soon(self.protocol.connection_lost, exc)


class MemoryConnector:
    """Opens `MemoryTransport` connections (see the module docstring)."""

    def __init__(self) -> None:
        self.connects: list[Connect] = []
        self.transports: list[MemoryTransport] = []
        self.hold: asyncio.Event | None = None  # connects wait until it is set
        self.fail: Exception | None = None  # the next connect raises it (after `hold`)
        self.lose_at_once = False

    async def __call__(
        self,
        protocol_factory: Callable[[], P],
        host: str,
        port: int,
        connect_timeout_s: float,
        *,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        require_alpn: str | None = None,
    ) -> P:
        self.connects.append(
            Connect(host, port, connect_timeout_s, tls, server_hostname, require_alpn)
        )
        if self.hold is not None:
            await self.hold.wait()
        failure, self.fail = self.fail, None
        if failure is not None:
            raise failure
        protocol = protocol_factory()
        transport = MemoryTransport(protocol, (host, port))
        self.transports.append(transport)
        protocol.connection_made(transport)
        if self.lose_at_once:
            transport.close()
            await asyncio.sleep(0)  # connection_lost runs before the connect returns
        return protocol
