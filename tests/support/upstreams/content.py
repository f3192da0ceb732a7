"""An HTTP/1.1 upstream whose answers a test describes in the query string, for the
`compress` tests: any status, media type, size, framing and extra fields.

  /gen?size=N        N bytes of `text_body` (compressible text), with Content-Length
       &chunks=C     ... sent chunked instead, in C chunks (the last takes the rest)
       &type=T       Content-Type T (default text/plain; charset=utf-8; `none`: no field)
       &status=S     that status (204 and 304 are sent without a body)
       &h=Name:Value an extra field (repeatable)
       &gzipped=1    the body gzip-compressed, with Content-Encoding: gzip
       &random=1     N bytes that do not compress (a fixed seed) instead of text
  /events            text/event-stream, chunked: the first event at once, the second once
                     the test has called `release()`, then the end
  /endless           text/event-stream, chunked: the first event, then the second over
                     and over, as fast as the gateway reads them, until it closes the
                     connection, which sets `disconnected`
HEAD gets the head GET would get. Keep-alive; no pipelining; bodiless requests only.
Every request's head is recorded in `requests` (method, target, fields by lowercase name).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import random
from urllib.parse import parse_qs, urlsplit

from tests.support.upstreams.h1 import Gate

FIRST_EVENT = b"event: tick\ndata: " + b"first " * 40 + b"\n\n"
SECOND_EVENT = b"event: tick\ndata: " + b"second " * 40 + b"\n\n"
_LINE = "line {:07d}: the quick brown fox jumps over the lazy dog, again and again\n"


def text_body(size: int) -> bytes:
    """`size` bytes of text that compresses well (what /gen sends)."""
    lines = (size // len(_LINE.format(0))) + 1
    return "".join(_LINE.format(i) for i in range(lines)).encode()[:size]


def random_body(size: int) -> bytes:
    """`size` bytes that do not compress (what /gen?random=1 sends)."""
    return random.Random(size).randbytes(size)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class ContentUpstream:
    """See the module docstring: `await ContentUpstream().start()`, then `url`."""

    def __init__(self) -> None:
        self.port = 0
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.disconnected = asyncio.Event()
        self._gate = Gate()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> ContentUpstream:
        self._gate.bind()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def release(self) -> None:
        """Let /events send its second event."""
        self._gate.release()

    async def stop(self) -> None:
        self._gate.close()
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *lines = head.decode("latin-1").split("\r\n")
                method, target, _ = request_line.split(" ", 2)
                fields = {}
                for line in lines:
                    name, colon, value = line.partition(":")
                    if colon:
                        fields[name.strip().lower()] = value.strip()
                self.requests.append((method, target, fields))
                path = urlsplit(target).path
                if path == "/events":
                    await self._events(writer, method)
                elif path == "/endless":
                    await self._endless(reader, writer)
                    return
                else:
                    writer.write(self._generated(method, target))
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    def _generated(self, method: str, target: str) -> bytes:
        query = parse_qs(urlsplit(target).query)

        def one(name: str, default: str) -> str:
            return query.get(name, [default])[0]

        status = int(one("status", "200"))
        size = int(one("size", "0"))
        body = random_body(size) if one("random", "") else text_body(size)
        fields = []
        content_type = one("type", "text/plain; charset=utf-8")
        if content_type != "none":
            fields.append(f"Content-Type: {content_type}")
        if one("gzipped", ""):
            body = gzip.compress(body, mtime=0)  # the same bytes every time
            fields.append("Content-Encoding: gzip")
        fields.extend(query.get("h", []))
        chunks = int(one("chunks", "0"))
        bodiless = status in (204, 304)
        if bodiless:
            body = b""
        elif chunks:
            fields.append("Transfer-Encoding: chunked")
        else:
            fields.append(f"Content-Length: {len(body)}")
        head = f"HTTP/1.1 {status} X\r\n" + "".join(f"{f}\r\n" for f in fields) + "\r\n"
        if method == "HEAD" or bodiless:
            return head.encode("latin-1")
        if not chunks:
            return head.encode("latin-1") + body
        step = max(1, len(body) // chunks)
        pieces = [body[i : i + step] for i in range(0, len(body), step)]
        return head.encode("latin-1") + b"".join(map(_chunk, pieces)) + b"0\r\n\r\n"

    async def _events(self, writer: asyncio.StreamWriter, method: str) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        if method == "HEAD":
            return
        writer.write(_chunk(FIRST_EVENT))
        await writer.drain()
        if not await self._gate.wait():
            return
        writer.write(_chunk(SECOND_EVENT) + b"0\r\n\r\n")
        await writer.drain()

    async def _endless(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + _chunk(FIRST_EVENT)
        )
        with contextlib.suppress(ConnectionError):
            while True:  # as fast as the gateway takes them: its backpressure paces this
                await writer.drain()
                writer.write(_chunk(SECOND_EVENT))
        self.disconnected.set()
