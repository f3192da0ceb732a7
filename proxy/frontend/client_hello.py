"""A look at a TLS ClientHello before the handshake: the server name (SNI) and the ALPN
protocols the client offers, read from the socket without consuming a byte.

What it is for: answering ACME TLS-ALPN-01 challenges (RFC 8737) on a listener that
also serves real clients. The validator's handshake asks for the name and offers ALPN
`acme-tls/1` alone; it must get the challenge certificate, and a browser asking for the
same name at the same moment must get the real one. Python's `sni_callback` sees the
name but not the ALPN offer, so the choice is made here, before the socket is handed
to TLS: the listener accepts connections itself (proxy/frontend/listener.py) and gives
the connection the challenge's context only when its ClientHello offers `acme-tls/1`.

- Peeked, never read: the bytes stay queued for the TLS handshake that follows.
- Bounded: one TLS record (5 + at most 2^14 bytes, RFC 8446 section 5.1), within the
  listener's header timeout. While the record is incomplete the socket's receive low
  watermark (SO_RCVLOWAT) is set to its length, so the loop wakes once it is all there
  (or the peer closes) rather than at every segment; it is set back to 1 before the
  socket is handed over.
- What is not understood is an ordinary client: not a handshake record, a ClientHello
  split over several records (validators send theirs in one), a malformed one. The
  connection then goes on to the normal handshake, which judges it.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass

ACME_TLS_ALPN_PROTOCOL = "acme-tls/1"  # RFC 8737 section 6.2
RECORD_HEADER_BYTES = 5
MAX_RECORD_BYTES = 2**14  # a TLSPlaintext fragment (RFC 8446 section 5.1)
_HANDSHAKE = 22  # ContentType handshake
_CLIENT_HELLO = 1  # HandshakeType client_hello
_SERVER_NAME = 0  # ExtensionType server_name (RFC 6066 section 3)
_ALPN = 16  # ExtensionType application_layer_protocol_negotiation (RFC 7301)
_HOST_NAME = 0  # NameType host_name


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What the choice of a context needs from a ClientHello: the server name (lower
    case, without a trailing dot; None when not sent) and the ALPN protocols offered."""

    server_name: str | None
    alpn: tuple[str, ...]


class _Malformed(Exception):
    pass


def record_length(data: bytes) -> int | None:
    """The bytes a whole first record takes, from its header (None: not a handshake
    record, or one too long to be a ClientHello's)."""
    if len(data) < RECORD_HEADER_BYTES or data[0] != _HANDSHAKE:
        return None
    length = int.from_bytes(data[3:5], "big")
    if length > MAX_RECORD_BYTES:
        return None
    return RECORD_HEADER_BYTES + length


def parse_client_hello(record: bytes) -> ClientHello | None:
    """The ClientHello in one whole TLS record (None: not one, split over records, or
    malformed)."""
    try:
        return _parse(record)
    except (_Malformed, IndexError, struct.error, UnicodeDecodeError):
        return None


def _parse(record: bytes) -> ClientHello | None:
    end = record_length(record)
    if end is None or len(record) < end:
        return None
    body = memoryview(record)[RECORD_HEADER_BYTES:end]
    if body[0] != _CLIENT_HELLO:
        return None
    hello_length = int.from_bytes(body[1:4], "big")
    if 4 + hello_length > len(body):
        return None  # continued in the next record
    hello = body[4 : 4 + hello_length]
    position = 2 + 32  # legacy_version, random
    position = _skip(hello, position, 1)  # legacy_session_id
    position = _skip(hello, position, 2)  # cipher_suites
    position = _skip(hello, position, 1)  # legacy_compression_methods
    if position == len(hello):
        return ClientHello(None, ())  # no extensions at all
    extensions_end = position + 2 + int.from_bytes(hello[position : position + 2], "big")
    if extensions_end > len(hello):
        raise _Malformed
    position += 2
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    while position < extensions_end:
        kind, length = struct.unpack_from("!HH", hello, position)
        data = hello[position + 4 : position + 4 + length]
        if len(data) != length:
            raise _Malformed
        if kind == _SERVER_NAME:
            server_name = _server_name(data)
        elif kind == _ALPN:
            alpn = _protocols(data)
        position += 4 + length
    return ClientHello(server_name, alpn)


def _skip(data: memoryview, position: int, size_bytes: int) -> int:
    """The position after a vector whose length takes `size_bytes` bytes."""
    length = int.from_bytes(data[position : position + size_bytes], "big")
    end = position + size_bytes + length
    if end > len(data):
        raise _Malformed
    return end


def _server_name(data: memoryview) -> str | None:
    """The host_name of a server_name extension (RFC 6066 section 3)."""
    end = 2 + int.from_bytes(data[0:2], "big")
    position = 2
    while position < end:
        kind = data[position]
        length = int.from_bytes(data[position + 1 : position + 3], "big")
        name = bytes(data[position + 3 : position + 3 + length])
        if kind == _HOST_NAME:
            return name.decode("ascii").lower().removesuffix(".")
        position += 3 + length
    return None


def _protocols(data: memoryview) -> tuple[str, ...]:
    """The ProtocolNameList of an ALPN extension (RFC 7301 section 3.1)."""
    end = 2 + int.from_bytes(data[0:2], "big")
    if end > len(data):
        raise _Malformed
    protocols = []
    position = 2
    while position < end:
        length = data[position]
        protocols.append(bytes(data[position + 1 : position + 1 + length]).decode("ascii"))
        position += 1 + length
    return tuple(protocols)


async def peek_client_hello(sock: socket.socket) -> ClientHello | None:
    """The ClientHello at the start of `sock` (non-blocking), not consumed; None when
    the first record is not a whole ClientHello (see the module docstring). The caller
    bounds the wait.

    Raises:
        OSError: the connection failed.
    """
    loop = asyncio.get_running_loop()
    wanted = RECORD_HEADER_BYTES
    woken = False  # since `wanted` last changed
    try:
        while True:
            try:
                data = sock.recv(wanted, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                data = b""
            if len(data) >= RECORD_HEADER_BYTES:
                whole = record_length(data)
                if whole is None:
                    return None
                if len(data) >= whole:
                    return parse_client_hello(data[:whole])
                if wanted < whole:
                    wanted, woken = whole, False
            if woken:
                return None  # woken short of what was awaited: the peer closed
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, wanted)
            await _readable(loop, sock)
            woken = True
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
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
