"""Http1Protocol without sockets, when things go wrong and connections end: malformed
input (400), limits (431, 413), broken responses and handlers, draining, EOF and timeouts.
Serving requests is in test_http1_protocol.py."""

from __future__ import annotations

import asyncio
import logging

import pytest

from proxy.config.model import LimitsConfig
from proxy.core.body import Body
from proxy.core.errors import UpstreamReset
from proxy.core.models import Request, Response
from proxy.frontend.connection import ConnectionPhase
from tests.support.helpers import decode_responses, make_protocol, settle
from tests.support.http1_helpers import GET, canned, echo_after, run, streaming

MALFORMED = {
    "garbage": b"\x00\x01\x02garbage\r\n\r\n",
    "no-version": b"GET /\r\n\r\n",
    "bad-version": b"GET / HTTP/1.x\r\nHost: t\r\n\r\n",
    "space-in-name": b"GET / HTTP/1.1\r\nHost: t\r\nBad Name: v\r\n\r\n",
    "cl-and-te": b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two-cl": b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    "bad-te": b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "bare-lf": b"GET / HTTP/1.1\nHost: t\n\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: t\r\nX: a\r\n b\r\n\r\n",
    "nul-in-value": b"GET / HTTP/1.1\r\nHost: t\r\nX: a\x00b\r\n\r\n",
    "cl-plus": b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: +1\r\n\r\na",
}


@pytest.mark.parametrize("split", [None, 1])
@pytest.mark.parametrize("payload", list(MALFORMED.values()), ids=list(MALFORMED))
async def test_malformed_request_gets_400_and_close(
    codec: str, payload: bytes, split: int | None
) -> None:
    protocol, conn, server = make_protocol(codec)
    step = split or len(payload)
    for start in range(0, len(payload), step):
        protocol.feed(payload[start : start + step])
    await settle(protocol)
    [response] = decode_responses(bytes(conn.output), ["GET"])
    assert response.status == 400
    assert response.json()["error"] == "bad_request"
    assert response.header("connection") == "close"
    assert conn.closed_by == "close"
    assert server.requests == []


async def test_bad_chunk_size_fails_the_request_being_served_with_400(codec: str) -> None:
    payload = b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    [response], conn = await run(codec, payload, methods=["POST"])
    assert response.status == 400  # type: ignore[attr-defined]
    assert conn.closed


async def test_input_after_a_malformed_request_is_ignored(codec: str) -> None:
    protocol, conn, server = make_protocol(codec)
    protocol.feed(b"BROKEN\r\n\r\n")
    protocol.feed(b"GET /after HTTP/1.1\r\nHost: t\r\n\r\n")
    await settle(protocol)
    assert decode_responses(bytes(conn.output), ["GET", "GET"])[0].status == 400
    assert bytes(conn.output).count(b"HTTP/1.1 ") == 1
    assert server.requests == []


@pytest.mark.parametrize("split", [None, 100])
async def test_head_over_limit_gets_431_and_close(codec: str, split: int | None) -> None:
    payload = b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 3000 + b"\r\n\r\n"
    limits = LimitsConfig(max_head_bytes=1024)
    [response], conn = await run(codec, payload, methods=["GET"], split=split, limits=limits)
    assert response.status == 431  # type: ignore[attr-defined]
    assert response.json()["error"] == "head_too_large"  # type: ignore[attr-defined]
    assert conn.closed_by == "close"


async def test_content_length_over_server_limit_gets_413_and_close(codec: str) -> None:
    payload = b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n"
    limits = LimitsConfig(max_body_size=10)
    [response], conn = await run(codec, payload, methods=["POST"], limits=limits)
    assert response.status == 413  # type: ignore[attr-defined]
    assert conn.closed


async def test_response_body_failing_midway_aborts_the_connection(codec: str) -> None:
    body = Body(None)
    protocol, conn, _ = make_protocol(codec, handler=streaming(body))
    protocol.feed(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    await asyncio.sleep(0)
    body.feed(b"partial")
    await asyncio.sleep(0)
    body.fail(UpstreamReset())
    await settle(protocol)
    assert conn.closed_by == "abort"  # h1's only way to say the body is broken
    assert not bytes(conn.output).endswith(b"0\r\n\r\n")


async def test_unsafe_response_header_is_never_written(
    codec: str, caplog: pytest.LogCaptureFixture
) -> None:
    handler = canned(200, b"x", [("X-Evil", "a\r\nSet-Cookie: stolen=1")])
    protocol, conn, _ = make_protocol(codec, handler=handler)
    with caplog.at_level(logging.CRITICAL, logger="proxy"):
        protocol.feed(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        await settle(protocol)
    assert b"stolen" not in bytes(conn.output)
    assert conn.closed


async def test_handler_bug_does_not_escape_and_aborts(
    codec: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def handler(request: Request) -> Response:
        raise RuntimeError("boom")

    protocol, conn, _ = make_protocol(codec, handler=handler)
    with caplog.at_level(logging.CRITICAL, logger="proxy"):
        protocol.feed(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        await settle(protocol)
    assert conn.closed


async def test_draining_server_answers_with_connection_close(codec: str) -> None:
    protocol, conn, server = make_protocol(codec)
    server.draining = True
    protocol.feed(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    await settle(protocol)
    [response] = decode_responses(bytes(conn.output), ["GET"])
    assert response.header("connection") == "close"
    assert conn.closed


async def test_drain_request_closes_idle_connection_at_once(codec: str) -> None:
    protocol, conn, _ = make_protocol(codec)
    protocol.feed(GET)
    await settle(protocol)
    protocol.on_drain_request()
    assert conn.closed_by == "close"


async def test_drain_request_during_exchange_closes_after_response(codec: str) -> None:
    release = asyncio.Event()
    protocol, conn, _ = make_protocol(codec, handler=echo_after(release))
    protocol.feed(GET)
    await asyncio.sleep(0)
    protocol.on_drain_request()
    assert not conn.closed
    release.set()
    await settle(protocol)
    [response] = decode_responses(bytes(conn.output), ["GET"])
    assert response.status == 200
    assert response.header("connection") == "close"
    assert conn.closed


async def test_eof_while_idle_closes(codec: str) -> None:
    protocol, conn, _ = make_protocol(codec)
    protocol.feed(GET)
    await settle(protocol)
    protocol.on_eof()
    assert conn.closed_by == "close"


async def test_eof_in_the_middle_of_a_head_closes_without_reply(codec: str) -> None:
    protocol, conn, server = make_protocol(codec)
    protocol.feed(b"GET / HTTP/1.1\r\nHo")
    protocol.on_eof()
    await settle(protocol)
    assert conn.output == b""
    assert conn.closed
    assert server.requests == []


async def test_eof_in_the_middle_of_a_body_fails_the_request_and_closes(codec: str) -> None:
    protocol, conn, _ = make_protocol(codec)
    protocol.feed(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
    await asyncio.sleep(0)
    protocol.on_eof()
    await settle(protocol)
    [response] = decode_responses(bytes(conn.output), ["POST"])
    assert response.status == 400
    assert conn.closed


async def test_eof_after_pipelined_requests_answers_all_then_closes(codec: str) -> None:
    protocol, conn, _ = make_protocol(codec)
    protocol.feed(b"GET /1 HTTP/1.1\r\nHost: t\r\n\r\nGET /2 HTTP/1.1\r\nHost: t\r\n\r\n")
    protocol.on_eof()
    await settle(protocol)
    responses = decode_responses(bytes(conn.output), ["GET", "GET"])
    assert [r.json()["target"] for r in responses] == ["/1", "/2"]
    assert conn.closed


async def test_header_timeout_with_partial_head_gets_408(codec: str) -> None:
    protocol, conn, _ = make_protocol(codec)
    protocol.feed(b"GET / HTTP/1.1\r\nHost: t\r\n")
    protocol.on_timeout(ConnectionPhase.HEAD)
    await settle(protocol)
    [response] = decode_responses(bytes(conn.output), ["GET"])
    assert response.status == 408
    assert response.json()["error"] == "request_timeout"
    assert conn.closed


async def test_body_timeout_gets_408(codec: str) -> None:
    protocol, conn, _ = make_protocol(codec)
    protocol.feed(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
    await asyncio.sleep(0)
    assert conn.phase is ConnectionPhase.BODY
    protocol.on_timeout(ConnectionPhase.BODY)
    await settle(protocol)
    [response] = decode_responses(bytes(conn.output), ["POST"])
    assert response.status == 408
    assert conn.closed


async def test_idle_timeout_closes_without_reply(codec: str) -> None:
    protocol, conn, _ = make_protocol(codec)
    protocol.feed(GET)
    await settle(protocol)
    written = bytes(conn.output)
    protocol.on_timeout(ConnectionPhase.IDLE)
    assert conn.closed
    assert bytes(conn.output) == written


async def test_client_going_away_mid_exchange_cancels_quietly(codec: str) -> None:
    started = asyncio.Event()

    async def handler(request: Request) -> Response:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    protocol, conn, _ = make_protocol(codec, handler=handler)
    protocol.feed(GET)
    await started.wait()
    conn.abort()  # connection_lost follows: on_close cancels the exchange
    await settle(protocol)
    assert conn.output == b""
