"""An HTTP/1.1 upstream that answers with bytes written by hand: `RawUpstream(answer,
default)` writes `answer[target]` (or `default`) in one write for each request head, so a
test can send what no HTTP library would (two responses to one request). For bodiless
requests; keep-alive, no pipelining. `targets` records each request's target."""

from __future__ import annotations

import asyncio
import contextlib


class RawUpstream:
    """See the module docstring; `await RawUpstream(...).start()`, then `url`."""

    def __init__(self, answer: dict[str, bytes], default: bytes) -> None:
        self.answer = answer
        self.default = default
        self.targets: list[str] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                target = head.split(b" ", 2)[1].decode()
                self.targets.append(target)
                writer.write(self.answer.get(target, self.default))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1)
