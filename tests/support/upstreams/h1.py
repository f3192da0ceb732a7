"""A real HTTP/1.1 upstream server for tests (asyncio streams + h11), on 127.0.0.1:0.

Paths:
  /echo...          200, JSON of what arrived: method, target, headers, body (text), and
                    which server answered (`server`: its host:port)
  /bytes/N          N bytes with Content-Length
  /chunked/N/C      N chunks of C bytes, chunked encoding
  /download/N       N bytes streamed in 64 KiB writes with Content-Length (drains)
  /sink             reads the body without keeping it; answers its size and sha256
  /status/CODE      that status, small body
  /slow/MS          answers after MS milliseconds
  /slowbody/MS      head at once, body after MS milliseconds
  /held             answers 200 once the test has called `release_held()` (never, if not)
  /heldbody         head at once, body once the test has called `release_held()`
  /close            answers with Connection: close and no Content-Length (read to EOF)
  /drop             closes the connection without answering
  /garbage          answers bytes that are not HTTP
  /hopheaders       200 with hop-by-hop headers: Connection naming X-Up-Hop, X-Up-Hop,
                    Keep-Alive, Proxy-Connection; and an end-to-end X-Kept
  /thenclose        200 with Content-Length (no Connection: close), then closes the
                    connection: the next request must find it gone while idle
Modes (constructor options):
  tls=CONTEXT       HTTP/1.1 over TLS (an https:// endpoint), with a server context from
                    `TlsFiles.server_context`
  drop_reused=True  a request that arrives as the second (or later) on one connection is
                    not answered: the connection is closed (the keep-alive race, as an
                    upstream closing an idle connection just as the proxy reuses it). Such
                    requests are counted in `dropped`, not recorded in `requests`.
Every request is recorded in `requests` (method, target, headers, body size).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import ssl
import threading
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field

import h11

CHUNK = 64 * 1024


@dataclass
class Recorded:
    """One request as the upstream received it."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    body_size: int

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None."""
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


class Gate:
    """Where held requests wait (/held, /heldbody of both servers): `release` lets those
    waiting and any later ones through, from any thread; `close` (the server stopping)
    too, to go unanswered."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open: asyncio.Event | None = None
        self._closed = False

    def bind(self) -> None:
        """Shut the gate, on the running loop (the one that serves)."""
        self._loop = asyncio.get_running_loop()
        self._open = asyncio.Event()
        self._closed = False

    def release(self) -> None:
        """Let the held requests be answered (the serving loop does it)."""
        loop, opened = self._loop, self._open
        assert loop is not None, "not started"
        assert opened is not None, "not started"
        loop.call_soon_threadsafe(opened.set)

    async def wait(self) -> bool:
        """Wait for `release`; False when the server stops first (no answer then)."""
        assert self._open is not None, "not started"
        await self._open.wait()
        return not self._closed

    def close(self) -> None:
        """The server stops: every waiter gives up."""
        if self._open is not None:
            self._closed = True
            self._open.set()


@dataclass
class UpstreamServer:
    """Start with `await server.start()`; `server.port` is then bound."""

    requests: list[Recorded] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    host: str = "127.0.0.1"  # any loopback address (127.0.0.2 for a second "host")
    keep_alive: bool = True
    drop_reused: bool = False
    tls: ssl.SSLContext | None = None
    dropped: int = 0
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _gate: Gate = field(default_factory=Gate)  # see /held
    _stopping: bool = False  # `stop` has begun: a connection accepted now is closed at once

    async def start(self, port: int = 0) -> UpstreamServer:
        self._stopping = False  # (started again after a stop: the tests that restart one)
        self._gate.bind()
        self._server = await asyncio.start_server(self._serve, self.host, port, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def release_held(self) -> None:
        """Let /held and /heldbody requests be answered, those waiting and any later ones
        (from any thread: the server's loop does it)."""
        self._gate.release()

    async def _hold(self) -> bool:
        """Wait for `release_held`; False when the server stops first (no answer then)."""
        return await self._gate.wait()

    async def stop(self) -> None:
        """Stop listening and close every open connection (held requests unanswered)."""
        self._stopping = True
        self._gate.close()
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._stopping:
            # Accepted as the server stopped (handed over a loop turn after `stop` closed
            # the open ones): closed here, not leaked.
            writer.close()
            return
        self.connections += 1
        self._writers.add(writer)
        conn = h11.Connection(h11.SERVER)
        served = 0
        try:
            while True:
                request, body, size = await self._read_request(conn, reader)
                if request is None:
                    return
                if self.drop_reused and served:
                    self.dropped += 1
                    return
                served += 1
                target = request.target.decode()
                headers = [(k.decode(), v.decode()) for k, v in request.headers.raw_items()]
                self.requests.append(Recorded(request.method.decode(), target, headers, body, size))
                keep = await self._respond(conn, writer, request, target, headers, body, size)
                if not keep or conn.our_state is not h11.DONE or not self.keep_alive:
                    return
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError, asyncio.IncompleteReadError, ssl.SSLError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader
    ) -> tuple[h11.Request | None, bytes, int]:
        request = None
        sink = False
        parts: list[bytes] = []
        size = 0
        sha = hashlib.sha256()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(CHUNK)
                conn.receive_data(data)
                if not data and request is None:
                    return None, b"", 0
                continue
            if isinstance(event, h11.Request):
                request = event
                sink = event.target == b"/sink"
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if sink:
                    sha.update(event.data)
                elif size <= 1024 * 1024:
                    parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                body = sha.hexdigest().encode() if sink else b"".join(parts)
                return request, body, size
            else:
                return None, b"", 0

    async def _respond(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        request: h11.Request,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes,
        size: int,
    ) -> bool:
        async def send(
            status: int, data: bytes, extra: list[tuple[str, str]] | None = None
        ) -> None:
            hdrs = [("Content-Length", str(len(data)))] + (extra or [])
            writer.write(conn.send(h11.Response(status_code=status, headers=hdrs)))
            writer.write(conn.send(h11.Data(data=data)) if data else b"")
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()

        path = target.split("?")[0]
        parts = path.strip("/").split("/")
        if parts[0] == "bytes":
            await send(200, b"x" * int(parts[1]))
        elif parts[0] == "chunked":
            count, size_each = int(parts[1]), int(parts[2])
            writer.write(
                conn.send(h11.Response(status_code=200, headers=[("Transfer-Encoding", "chunked")]))
            )
            for _ in range(count):
                writer.write(conn.send(h11.Data(data=b"y" * size_each)))
                await writer.drain()
            writer.write(conn.send(h11.EndOfMessage(headers=[("X-Trailer", "done")])))
            await writer.drain()
        elif parts[0] == "download":
            total = int(parts[1])
            writer.write(
                conn.send(h11.Response(status_code=200, headers=[("Content-Length", str(total))]))
            )
            block = b"z" * CHUNK
            sent = 0
            while sent < total:
                piece = block[: min(CHUNK, total - sent)]
                writer.write(conn.send(h11.Data(data=piece)))
                sent += len(piece)
                await writer.drain()
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
        elif parts[0] == "sink":
            await send(200, json.dumps({"size": size, "sha256": body.decode()}).encode())
        elif parts[0] == "status":
            await send(int(parts[1]), f"status {parts[1]}".encode())
        elif parts[0] == "slow":
            await asyncio.sleep(int(parts[1]) / 1000)
            await send(200, b"slow")
        elif parts[0] == "held":
            if not await self._hold():
                return False
            await send(200, b"held")
        elif parts[0] == "heldbody":
            writer.write(
                conn.send(h11.Response(status_code=200, headers=[("Content-Length", "4")]))
            )
            await writer.drain()
            if not await self._hold():
                return False
            writer.write(conn.send(h11.Data(data=b"late")))
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
        elif parts[0] == "slowbody":
            writer.write(
                conn.send(h11.Response(status_code=200, headers=[("Content-Length", "4")]))
            )
            await writer.drain()
            await asyncio.sleep(int(parts[1]) / 1000)
            writer.write(conn.send(h11.Data(data=b"late")))
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
        elif parts[0] == "close":
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil-close")
            await writer.drain()
            return False
        elif parts[0] == "drop":
            return False
        elif parts[0] == "thenclose":
            await send(200, b"closing")
            return False
        elif parts[0] == "hopheaders":
            hop = [("Connection", "X-Up-Hop"), ("X-Up-Hop", "secret"), ("Keep-Alive", "timeout=5")]
            await send(200, b"hop", [*hop, ("Proxy-Connection", "keep-alive"), ("X-Kept", "yes")])
        elif parts[0] == "garbage":
            writer.write(b"this is not http\r\n\r\n")
            await writer.drain()
            return False
        else:
            payload = {
                "method": request.method.decode(),
                "target": target,
                "headers": headers,
                "body": body.decode("latin-1"),
                "body_size": size,
                "server": f"{self.host}:{self.port}",
            }
            await send(200, json.dumps(payload).encode(), [("Content-Type", "application/json")])
        return True


# ------------------------------------------------------------------- servers in a thread


class _Startable(typing.Protocol):
    async def start(self, port: int = 0) -> typing.Any: ...

    async def stop(self) -> None: ...


ServerT = typing.TypeVar("ServerT", bound=_Startable)


@contextlib.contextmanager
def serve_in_thread(server: ServerT, *, timeout_s: float = 5.0) -> Iterator[ServerT]:
    """Run `server` (an `UpstreamServer` or `FastUpstream`) on its own event loop in a
    background thread, for synchronous tests (a gateway in a subprocess, blocking
    clients). Read its recorded state only once the traffic of interest is over."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="upstream", daemon=True)
    thread.start()

    def call(coro: typing.Coroutine[typing.Any, typing.Any, typing.Any]) -> typing.Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout_s)

    async def cancel_the_rest() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0.05)  # let closing transports run connection_lost

    try:
        call(server.start())
        yield server
    finally:
        try:
            call(server.stop())
            call(cancel_the_rest())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout_s)
            if not thread.is_alive():
                loop.close()
