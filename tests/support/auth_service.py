"""A real external auth service for the forward_auth tests: the suite's HTTP/1.1 upstream
(tests/support/upstreams/h1.py: h11 over asyncio streams, on 127.0.0.1:0), answering what
the test scripts.

`service.answer` is what every request gets until changed: a status, headers and a
body (`AuthAnswer(200, [("X-User", "ada")])`, `AuthAnswer(401, [("WWW-Authenticate",
...)], b"...")`, a 302 with Location). `AuthAnswer(hang=True)` never answers: the handler
waits until the service stops (the forward_auth timeout is what ends the exchange);
`AuthAnswer(drop=True)` closes the connection without an answer; `AuthAnswer(401,
body=..., stall=True)` sends the head and the body as one chunk of a chunked body that
never ends, then waits as `hang` does.
Every request is recorded in `requests` (tests/support/upstreams/h1.py `Recorded`), so a
test can see which headers reached the service. Pass `tls` (a server SSLContext) to `start` for
https. For "not running at all", use an unused port (`unused_port()`).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass, field

import h11

from tests.support.upstreams import UpstreamServer


@dataclass(frozen=True)
class AuthAnswer:
    """One scripted answer of the auth service."""

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    hang: bool = False  # never answer (until the service stops)
    drop: bool = False  # close the connection without answering
    stall: bool = False  # send the head and a first chunk of the body, then wait (as `hang`)


@dataclass
class AuthService(UpstreamServer):
    """Answers every request with `answer`; records what arrived in `requests`."""

    answer: AuthAnswer = field(default_factory=AuthAnswer)
    stalled: asyncio.Event = field(default_factory=asyncio.Event)  # a `stall` answer began

    async def start(self, port: int = 0, tls: ssl.SSLContext | None = None) -> AuthService:
        """Listen on 127.0.0.1 (`port` 0: any free one); with `tls`, https."""
        if tls is not None:
            self.tls = tls
        await super().start(port)
        return self

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
        answer = self.answer
        if answer.hang:
            await self._hold()  # until the service stops
            return False
        if answer.drop:
            return False
        if answer.stall:
            # Chunked, so the gateway gets the head at once and reads the body as it comes.
            stalled = h11.Response(
                status_code=answer.status, headers=[("Transfer-Encoding", "chunked")]
            )
            writer.write(conn.send(stalled))
            writer.write(conn.send(h11.Data(data=answer.body)))
            await writer.drain()
            self.stalled.set()
            await self._hold()
            return False
        head = [("Content-Length", str(len(answer.body))), *answer.headers]
        writer.write(conn.send(h11.Response(status_code=answer.status, headers=head)))
        if answer.body:
            writer.write(conn.send(h11.Data(data=answer.body)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()
        return True


def unused_port() -> int:
    """A port nothing listens on (bound and released: connecting to it is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
