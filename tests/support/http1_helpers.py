"""Shared by the Http1Protocol tests: feed bytes and decode what comes out, and the canned
handlers the tests serve with."""

from __future__ import annotations

import asyncio

from multidict import CIMultiDict

from proxy.core.body import Body
from proxy.core.models import Request, Response
from tests.support.helpers import (
    Handler,
    RecordingConnection,
    decode_responses,
    echo_handler,
    make_protocol,
    settle,
)

GET = b"GET /a?b=c HTTP/1.1\r\nHost: example.com\r\nX-Custom: 1\r\n\r\n"


async def run(
    codec: str,
    data: bytes,
    *,
    methods: list[str],
    split: int | None = None,
    **options: object,
) -> tuple[list[object], RecordingConnection]:
    """Feed `data` (whole, or in pieces of `split` bytes), serve, decode the output."""
    protocol, conn, _ = make_protocol(codec, **options)  # type: ignore[arg-type]
    step = split or len(data) or 1
    for start in range(0, len(data), step):
        protocol.feed(data[start : start + step])
        await asyncio.sleep(0)
    await settle(protocol)
    return decode_responses(bytes(conn.output), methods), conn  # type: ignore[return-value]


def canned(status: int, body: bytes = b"", headers: list[tuple[str, str]] | None = None) -> Handler:
    """A handler answering every request with this status, body and headers."""

    async def handler(request: Request) -> Response:
        return Response(status, CIMultiDict(headers or []), Body.from_bytes(body))

    return handler


def streaming(body: Body, headers: list[tuple[str, str]] | None = None) -> Handler:
    """A handler answering 200 with `body`, which the test then feeds (or fails)."""

    async def handler(request: Request) -> Response:
        return Response(200, CIMultiDict(headers or []), body)

    return handler


def echo_after(release: asyncio.Event) -> Handler:
    """echo_handler, once `release` is set."""

    async def handler(request: Request) -> Response:
        await release.wait()
        return await echo_handler(request)

    return handler
