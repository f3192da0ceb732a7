"""`FastUpstream`: an HTTP/1.1 source and sink for multi-GiB transfers (a hand-written
asyncio protocol, no h11), and an upstream that stops reading (/stall)."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import hashlib
import json
import random
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field

PATTERN_BLOCK_BYTES = 1024 * 1024
FAST_WRITE_BYTES = 256 * 1024
FAST_MAX_HEAD_BYTES = 64 * 1024
FAST_MAX_LINE_BYTES = 4096


@functools.cache
def pattern_block() -> bytes:
    """1 MiB of fixed pseudo-random bytes; test bodies repeat it (see `pattern_chunks`)."""
    return random.Random(0x6A7E).randbytes(PATTERN_BLOCK_BYTES)


def pattern_chunks(total: int, chunk: int = FAST_WRITE_BYTES) -> Iterator[memoryview]:
    """The first `total` bytes of `pattern_block()` repeated, in `chunk`-byte slices.

    `chunk` must divide PATTERN_BLOCK_BYTES, so no slice straddles two blocks.
    """
    assert PATTERN_BLOCK_BYTES % chunk == 0
    block = memoryview(pattern_block())
    offset = 0
    while offset < total:
        start = offset % PATTERN_BLOCK_BYTES
        size = min(chunk, total - offset)
        yield block[start : start + size]
        offset += size


@functools.cache
def pattern_sha256(total: int) -> str:
    """The sha256 (hex) of the first `total` bytes of the repeated pattern."""
    digest = hashlib.sha256()
    for piece in pattern_chunks(total, PATTERN_BLOCK_BYTES):
        digest.update(piece)
    return digest.hexdigest()


@dataclass
class FastExchange:
    """One request as `FastUpstream` saw it, and what it answered."""

    method: str
    target: str
    body_size: int = 0
    body_sha256: str = ""
    chunked: bool = False
    response_bytes_sent: int = 0
    done: bool = False


class _BodyState(enum.Enum):
    NONE = "none"  # between requests, or answering one
    LENGTH = "length"  # `remaining` bytes of a Content-Length body
    CHUNK_SIZE = "chunk-size"  # a chunk-size line (extensions ignored)
    CHUNK_DATA = "chunk-data"  # `remaining` bytes of chunk data
    CHUNK_END = "chunk-end"  # the CRLF after chunk data
    TRAILERS = "trailers"  # trailer lines up to the empty one


class _FastConnection(asyncio.Protocol):
    """Parses the request head and the body framing only; counts and hashes the body."""

    def __init__(self, owner: FastUpstream) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.line = bytearray()  # a chunk-size or trailer line being assembled
        self.exchange: FastExchange | None = None
        self.body = _BodyState.NONE
        self.remaining = 0
        self.digest = hashlib.sha256()
        self.source: Iterator[bytes | memoryview] | None = None
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = typing.cast(asyncio.Transport, transport)
        self.owner.connections.add(self)
        # Big writes, few wake-ups: this side must never be the bottleneck.
        self.transport.set_write_buffer_limits(high=4 * FAST_WRITE_BYTES)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.connections.discard(self)
        self.source = None

    def data_received(self, data: bytes) -> None:
        view = memoryview(data)
        while view and self.transport is not None and not self.transport.is_closing():
            if self.body in (_BodyState.LENGTH, _BodyState.CHUNK_DATA):
                piece = view[: self.remaining]
                self.remaining -= len(piece)
                assert self.exchange is not None
                self.exchange.body_size += len(piece)
                self.digest.update(piece)
                view = view[len(piece) :]
                if not self.remaining:
                    if self.body is _BodyState.LENGTH:
                        self._body_done()
                    else:
                        self.body = _BodyState.CHUNK_END
            elif self.body is not _BodyState.NONE:
                view = self._take_framing(view)
            elif self.exchange is None or self.exchange.done:
                view = self._take_head(view)
            else:  # bytes beyond a body while answering: pipelining is not supported
                self._fail(b"400 Bad Request")

    def _take_line(self, view: memoryview) -> tuple[bytes | None, memoryview]:
        end = bytes(view[:FAST_MAX_LINE_BYTES]).find(b"\n")
        if end < 0:
            self.line += view
            if len(self.line) > FAST_MAX_LINE_BYTES:
                self._fail(b"400 Bad Request")
            return None, view[len(view) :]
        self.line += view[: end + 1]
        line = bytes(self.line).rstrip(b"\r\n")
        self.line.clear()
        return line, view[end + 1 :]

    def _take_framing(self, view: memoryview) -> memoryview:
        line, view = self._take_line(view)
        if line is None:
            return view
        if self.body is _BodyState.CHUNK_SIZE:
            self.remaining = int(line.split(b";")[0], 16)
            self.body = _BodyState.CHUNK_DATA if self.remaining else _BodyState.TRAILERS
        elif self.body is _BodyState.CHUNK_END:
            if line:
                self._fail(b"400 Bad Request")
            self.body = _BodyState.CHUNK_SIZE
        elif not line:  # TRAILERS: the empty line ends the message
            self._body_done()
        return view

    def _body_done(self) -> None:
        self.body = _BodyState.NONE
        self._respond()

    def _take_head(self, view: memoryview) -> memoryview:
        before = len(self.head)
        self.head += view
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head) > FAST_MAX_HEAD_BYTES:
                self._fail(b"431 Request Header Fields Too Large")
            return view[len(view) :]
        rest = view[end + 4 - before :]
        lines = bytes(self.head[:end]).split(b"\r\n")
        self.head.clear()
        method, target, _ = lines[0].decode("latin-1").split(" ", 2)
        exchange = FastExchange(method, target)
        self.owner.exchanges.append(exchange)
        self.exchange = exchange
        self.digest = hashlib.sha256()
        self.remaining = 0
        self.body = _BodyState.NONE
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                self.remaining = int(value.strip())
                self.body = _BodyState.LENGTH if self.remaining else _BodyState.NONE
            elif name == b"transfer-encoding":
                exchange.chunked = True
                self.body = _BodyState.CHUNK_SIZE
        if target.split("?")[0] == "/stall":
            assert self.transport is not None
            self.transport.pause_reading()  # never reads the body: the sender must wait
            self.body = _BodyState.NONE
            self.exchange = None
            return rest[len(rest) :]
        if self.body is _BodyState.NONE:
            self._respond()
        return rest

    def _fail(self, status: bytes) -> None:
        if self.transport is not None:
            self.transport.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")
            self.transport.close()

    def _respond(self) -> None:
        exchange = self.exchange
        assert exchange is not None
        assert self.transport is not None
        parts = exchange.target.split("?")[0].strip("/").split("/")
        exchange.body_sha256 = self.digest.hexdigest()
        if parts[0] == "download" and len(parts) == 2:
            total = int(parts[1])
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
            self.source = pattern_chunks(total)
            self._pump()
            return
        if parts[0] == "chunked-download" and len(parts) == 2:
            self.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            self.source = _chunk_framed(pattern_chunks(int(parts[1])))
            self._pump()
            return
        if parts[0] == "sink":
            answer = {
                "size": exchange.body_size,
                "sha256": exchange.body_sha256,
                "chunked": exchange.chunked,
            }
        else:
            answer = {"method": exchange.method, "target": exchange.target}
        body = json.dumps(answer).encode()
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        exchange.done = True

    def _pump(self) -> None:
        exchange = self.exchange
        assert exchange is not None
        assert self.transport is not None
        while self.source is not None and not self.paused:
            piece = next(self.source, None)
            if piece is None:
                self.source = None
                exchange.done = True
                return
            self.transport.write(piece)
            if isinstance(piece, memoryview):  # body data, not chunk framing
                exchange.response_bytes_sent += len(piece)
                self.owner.response_bytes_sent += len(piece)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.source is not None:
            self._pump()


def _chunk_framed(pieces: Iterator[memoryview]) -> Iterator[bytes | memoryview]:
    """Chunked transfer coding around `pieces` (framing as bytes, data as memoryviews)."""
    for piece in pieces:
        yield b"%x\r\n" % len(piece)
        yield piece
        yield b"\r\n"
    yield b"0\r\n\r\n"


@dataclass
class FastUpstream:
    """A source/sink upstream for multi-GiB transfers, far faster than `UpstreamServer`.

    An asyncio Protocol that parses only request heads and body framing (Content-Length
    or chunked), honours write flow control, and supports keep-alive (not pipelining).
    Paths:
      /download/N          N bytes of the repeated `pattern_block()`, with Content-Length
      /chunked-download/N  the same N bytes in 256 KiB chunks, chunked encoding
      /sink                counts the body and answers JSON
                           {"size": N, "sha256": hex, "chunked": bool}
      /stall        stops reading after the head and never answers (an upload stalls)
      anything else JSON {"method", "target"}
    `exchanges` records every request; `response_bytes_sent` counts body bytes handed to
    the transport (so a test can see the upstream being held back by backpressure).
    """

    port: int = 0
    exchanges: list[FastExchange] = field(default_factory=list)
    response_bytes_sent: int = 0
    connections: set[_FastConnection] = field(default_factory=set)
    _server: asyncio.Server | None = None

    async def start(self, port: int = 0) -> FastUpstream:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _FastConnection(self), "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        """Stop listening and close every open connection."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        self._server = None
