"""Opening upstream sockets: the one place connect and TLS errors are mapped to
ProxyErrors."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from proxy.core.errors import UpstreamConnectError, UpstreamConnectTimeout

P = TypeVar("P", bound=asyncio.Protocol)


async def open_connection(
    protocol_factory: Callable[[], P],
    host: str,
    port: int,
    connect_timeout_s: float,
    *,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    require_alpn: str | None = None,
) -> P:
    """Connect to host:port within `connect_timeout_s` and return the connected protocol.

    With `tls`, the TLS handshake is part of the connect (and of its timeout);
    `server_hostname` is sent as SNI and checked against the certificate. With
    `require_alpn`, a server that does not select that ALPN protocol is refused.

    Raises:
        UpstreamConnectTimeout: the connect (and handshake) took longer than
            `connect_timeout_s`.
        UpstreamConnectError: refused, unreachable, the name did not resolve, the TLS
            handshake failed (certificate not trusted, wrong name) or ALPN disagreed.
    """
    loop = asyncio.get_running_loop()
    where = f"{host}:{port}"
    try:
        async with asyncio.timeout(connect_timeout_s):
            if tls is None:
                transport, protocol = await loop.create_connection(protocol_factory, host, port)
            else:
                transport, protocol = await loop.create_connection(
                    protocol_factory,
                    host,
                    port,
                    ssl=tls,
                    server_hostname=server_hostname,
                    ssl_handshake_timeout=connect_timeout_s,
                )
    except TimeoutError:
        raise UpstreamConnectTimeout(f"connect to {where} timed out") from None
    except ssl.SSLCertVerificationError as exc:
        # Checked before OSError: SSLError is one. The verify message names the cause
        # ("unable to get local issuer certificate", "Hostname mismatch, ...").
        reason = exc.verify_message or exc.reason or str(exc)
        raise UpstreamConnectError(
            f"TLS handshake with {where} failed: certificate verify failed: {reason}"
            f" (checked name: {server_hostname})"
        ) from None
    except ssl.SSLError as exc:
        raise UpstreamConnectError(
            f"TLS handshake with {where} failed: {exc.reason or exc}"
        ) from None
    except OSError as exc:
        raise UpstreamConnectError(f"connect to {where} failed: {exc.strerror or exc}") from None
    if require_alpn is not None:
        ssl_object = transport.get_extra_info("ssl_object")
        chosen = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        if chosen != require_alpn:
            transport.abort()
            raise UpstreamConnectError(
                f"{where} did not select {require_alpn} by ALPN (selected: {chosen})"
            )
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # Requests are written whole; Nagle would only hold the last segment back.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return protocol


class Connector(Protocol):
    """`open_connection`'s signature: what a Dialer connects with (the pools' tests pass
    one without sockets, as httpcore's mock backend does)."""

    def __call__(
        self,
        protocol_factory: Callable[[], P],
        host: str,
        port: int,
        connect_timeout_s: float,
        *,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        require_alpn: str | None = None,
    ) -> Awaitable[P]: ...


@dataclass(frozen=True, slots=True)
class Dialer:
    """How a pool opens connections to its endpoint: `open_connection` with the endpoint's
    host and port, the connect timeout, the TLS context and the name sent as SNI (None:
    plaintext), and the ALPN protocol the handshake must select (HTTP/2 over TLS)."""

    host: str
    port: int
    connect_timeout: float
    tls: ssl.SSLContext | None = field(default=None, repr=False)
    server_hostname: str | None = None
    require_alpn: str | None = None
    connector: Connector = field(default=open_connection, repr=False, compare=False)

    async def open(self, protocol_factory: Callable[[], P]) -> P:
        """A new connection, its protocol made by `protocol_factory`.

        Raises:
            UpstreamConnectError, UpstreamConnectTimeout: as `open_connection`.
        """
        return await self.connector(
            protocol_factory,
            self.host,
            self.port,
            self.connect_timeout,
            tls=self.tls,
            server_hostname=self.server_hostname,
            require_alpn=self.require_alpn,
        )
