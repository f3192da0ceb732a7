"""The channel between the supervising parent and one worker: JSON messages over a
socketpair made before the fork.

Each message is a 4-byte big-endian length and a JSON object. The parent sends requests
(`{"id": 7, "op": "metrics"}`) and the worker answers each with the same `id`; a worker
also sends events of its own (`{"event": "ready"}`). The socket is the worker's lifeline:
when the parent goes away the worker reads EOF and drains, so a worker is never left
serving without a supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any, cast

log = logging.getLogger(__name__)

_LENGTH = struct.Struct("!I")
# A metrics snapshot is the largest message: bounded labels keep it far below this.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

Message = dict[str, Any]


class ChannelClosed(Exception):
    """The other side went away (or sent something that is not a message)."""


async def read_message(reader: asyncio.StreamReader) -> Message:
    """The next message.

    Raises:
        ChannelClosed: EOF, or a frame that is too long or not a JSON object.
    """
    try:
        (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
        if length > MAX_MESSAGE_BYTES:
            raise ChannelClosed(f"message of {length} bytes is over the limit")
        message = json.loads(await reader.readexactly(length))
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise ChannelClosed("the other side closed the channel") from exc
    except ValueError as exc:
        raise ChannelClosed(f"not a message: {exc}") from exc
    if not isinstance(message, dict):
        raise ChannelClosed("not a message: expected a JSON object")
    return message


def write_message(writer: asyncio.StreamWriter, message: Message) -> None:
    """Queue `message` on `writer` (the caller drains when it cares).

    Raises:
        TypeError, ValueError: `message` is not JSON-able.
    """
    writer.write(_frame(message))


def _frame(message: Message) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return _LENGTH.pack(len(body)) + body


async def open_channel(sock: socket.socket) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Streams over one end of the socketpair, on the running loop."""
    return await asyncio.open_connection(sock=sock, limit=MAX_MESSAGE_BYTES)


class WorkerChannel:
    """The parent's end of one worker's channel: requests with replies, and events."""

    def __init__(self, sock: socket.socket, on_event: Callable[[Message], None]) -> None:
        self._sock = sock
        self.fileno = sock.fileno()  # for a forked child to close
        self._on_event = on_event
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Message]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self.closed = False

    async def start(self) -> None:
        reader, self._writer = await open_channel(self._sock)
        self._reader_task = asyncio.get_running_loop().create_task(self._read_forever(reader))

    async def _read_forever(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                message = await read_message(reader)
                waiter = self._waiting.pop(message.get("id", -1), None)
                if waiter is not None:
                    if not waiter.done():
                        waiter.set_result(message)
                elif "event" in message:
                    self._on_event(message)
        except ChannelClosed:
            pass
        finally:
            self._close()

    async def request(self, op: str, timeout: float, **fields: Any) -> Message:  # noqa: ASYNC109
        """Send `op` and wait for the worker's reply.

        Raises:
            ChannelClosed: the worker is gone, or did not answer within `timeout`.
        """
        if self.closed or self._writer is None:
            raise ChannelClosed("the worker's channel is closed")
        request_id = next(self._ids)
        waiter = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = waiter
        try:
            write_message(self._writer, {"id": request_id, "op": op, **fields})
            async with asyncio.timeout(timeout):
                return cast(Message, await waiter)
        except TimeoutError:
            raise ChannelClosed(f"no answer to {op!r} within {timeout:g}s") from None
        finally:
            self._waiting.pop(request_id, None)

    def _close(self) -> None:
        self.closed = True
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(ChannelClosed("the worker's channel closed"))
        self._waiting.clear()
        if self._writer is not None:
            self._writer.close()

    async def aclose(self) -> None:
        self._close()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task


Handler = Callable[[Message], Awaitable[Message]]


async def serve_requests(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handle: Handler
) -> None:
    """The worker's end: answer each request in turn until the parent goes away.

    One at a time on purpose: a reload's prepare and commit, and a metrics collection,
    never interleave. A handler's bug is answered as an error, never a silent drop.
    """
    with contextlib.suppress(ChannelClosed):
        while True:
            request = await read_message(reader)
            try:
                # Encoded here: a reply that is not JSON is the handler's bug too.
                reply = _frame({"id": request.get("id"), **await handle(request)})
            except Exception as exc:
                log.exception("bug while answering the parent's %r", request.get("op"))
                error = {"ok": False, "errors": [f"internal error: {exc!r}"]}
                reply = _frame({"id": request.get("id"), **error})
            writer.write(reply)
            await writer.drain()
