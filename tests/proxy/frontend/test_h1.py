"""Http1Protocol without sockets, serving requests: a RecordingConnection underneath, a
canned handler above, and what it writes decoded with a real h11 client. Input is fed whole
and byte by byte. Bodies, pipelining, HTTP/1.0, HEAD, 100-continue, streamed responses and
the fast path; malformed input, failures and closing are in test_http1_protocol_errors.py."""

from __future__ import annotations

import asyncio

import pytest
from multidict import CIMultiDict

from proxy.core.body import Body
from proxy.core.errors import ProxyError, UpstreamReset
from proxy.core.models import Request, Response
from proxy.frontend.connection import ConnectionPhase
from tests.support.helpers import decode_responses, echo_handler, make_protocol, settle
from tests.support.http1_helpers import GET, canned, echo_after, run, streaming

POST_CL = b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\n\r\nhello world"
POST_CHUNKED = (
    b"POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n"
)


@pytest.mark.parametrize("split", [None, 1, 2, 7])
async def test_get_is_answered_and_connection_kept_alive(codec: str, split: int | None) -> None:
    protocol, conn, server = make_protocol(codec)
    step = split or len(GET)
    for start in range(0, len(GET), step):
        protocol.feed(GET[start : start + step])
    await settle(protocol)
    [response] = decode_responses(bytes(conn.output), ["GET"])
    assert response.status == 200
    assert response.json()["target"] == "/a?b=c"
    assert response.json()["method"] == "GET"
    assert not conn.closed
    assert conn.phase is ConnectionPhase.IDLE
    [request] = server.requests
    assert request.headers["x-custom"] == "1"
    assert request.host == "example.com"
    assert request.client == conn.client


@pytest.mark.parametrize("split", [None, 1, 3])
@pytest.mark.parametrize("payload", [POST_CL, POST_CHUNKED], ids=["content-length", "chunked"])
async def test_request_body_is_delivered_whole_and_byte_by_byte(
    codec: str, payload: bytes, split: int | None
) -> None:
    [response], conn = await run(codec, payload, methods=["POST"], split=split)
    assert response.status == 200  # type: ignore[attr-defined]
    assert response.json()["body"] == "hello world"  # type: ignore[attr-defined]
    assert not conn.closed


async def test_chunked_request_trailers_reach_the_request_body(codec: str) -> None:
    protocol, _conn, server = make_protocol(codec)
    protocol.feed(POST_CHUNKED)
    await settle(protocol)
    assert server.requests[0].body.trailers == [("X-Trailer", "t")]


@pytest.mark.parametrize("split", [None, 1, 5])
async def test_pipelined_requests_are_answered_in_order(codec: str, split: int | None) -> None:
    data = (
        b"GET /1 HTTP/1.1\r\nHost: t\r\n\r\n"
        + POST_CL
        + b"DELETE /3 HTTP/1.1\r\nHost: t\r\n\r\n"
        + POST_CHUNKED
        + b"GET /5 HTTP/1.1\r\nHost: t\r\n\r\n"
    )
    methods = ["GET", "POST", "DELETE", "POST", "GET"]
    responses, conn = await run(codec, data, methods=methods, split=split)
    payloads = [r.json() for r in responses]  # type: ignore[attr-defined]
    assert [p["method"] for p in payloads] == methods
    assert [p["target"] for p in payloads] == ["/1", "/upload", "/3", "/upload", "/5"]
    assert payloads[1]["body"] == "hello world"
    assert payloads[3]["body"] == "hello world"
    assert not conn.closed


async def test_two_pipelined_requests_split_at_every_point_are_both_answered(codec: str) -> None:
    data = (
        b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"
        b"POST /y HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nok"
    )
    for cut in range(1, len(data)):
        protocol, conn, _ = make_protocol(codec)
        protocol.feed(data[:cut])
        await asyncio.sleep(0)
        protocol.feed(data[cut:])
        await settle(protocol)
        responses = decode_responses(bytes(conn.output), ["GET", "POST"])
        assert [r.json()["target"] for r in responses] == ["/x", "/y"], cut
        assert responses[1].json()["body"] == "ok"


async def test_slow_handler_keeps_pipelined_order(codec: str) -> None:
    delays = {"/slow": 0.02, "/fast": 0.0}

    async def handler(request: Request) -> Response:
        await asyncio.sleep(delays[request.path])
        return await echo_handler(request)

    data = b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\nGET /fast HTTP/1.1\r\nHost: t\r\n\r\n"
    responses, _ = await run(codec, data, methods=["GET", "GET"], handler=handler)
    assert [r.json()["target"] for r in responses] == ["/slow", "/fast"]  # type: ignore[attr-defined]


async def test_deep_pipeline_pauses_reading_until_it_drains(codec: str) -> None:
    release = asyncio.Event()
    protocol, conn, server = make_protocol(codec, handler=echo_after(release))
    protocol.feed(b"GET /p HTTP/1.1\r\nHost: t\r\n\r\n" * 20)
    await asyncio.sleep(0)
    assert conn.pauses >= 1  # 16 unanswered requests: stop reading
    release.set()
    await settle(protocol)
    assert conn.reading
    assert len(decode_responses(bytes(conn.output), ["GET"] * 20)) == 20
    assert len(server.requests) == 20


async def test_connection_close_request_closes_after_response(codec: str) -> None:
    payload = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    [response], conn = await run(codec, payload, methods=["GET"])
    assert response.status == 200  # type: ignore[attr-defined]
    assert response.header("connection") == "close"  # type: ignore[attr-defined]
    assert conn.closed_by == "close"


async def test_http10_request_closes_after_response(codec: str) -> None:
    protocol, conn, server = make_protocol(codec)
    protocol.feed(b"GET /old HTTP/1.0\r\n\r\n")
    await settle(protocol)
    assert bytes(conn.output).startswith(b"HTTP/1.1 200 ")
    assert b"\r\nConnection: close\r\n" in bytes(conn.output)
    assert conn.closed_by == "close"
    assert server.requests[0].http_version == "1.0"


async def test_http10_keep_alive_request_stays_open(codec: str) -> None:
    protocol, conn, _server = make_protocol(codec)
    request = b"GET /old HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    protocol.feed(request)
    await settle(protocol)
    assert not conn.closed
    protocol.feed(request)
    await settle(protocol)
    assert bytes(conn.output).count(b"HTTP/1.1 200 ") == 2
    assert b"\r\nConnection: keep-alive\r\n" in bytes(conn.output)
    assert not conn.closed


async def test_head_response_has_content_length_and_no_body(codec: str) -> None:
    protocol, conn, _ = make_protocol(codec, handler=canned(200, b"x" * 50))
    protocol.feed(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n")
    await settle(protocol)
    head, get = decode_responses(bytes(conn.output), ["HEAD", "GET"])
    assert head.header("content-length") == "50"
    assert head.body == b""
    assert get.body == b"x" * 50


@pytest.mark.parametrize("status", [204, 304])
async def test_bodiless_status_has_no_body_or_length(codec: str, status: int) -> None:
    protocol, conn, _ = make_protocol(codec, handler=canned(status))
    protocol.feed(b"GET / HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n")
    await settle(protocol)
    responses = decode_responses(bytes(conn.output), ["GET", "GET"])
    assert [r.status for r in responses] == [status, status]
    if status == 204:
        assert responses[0].header("content-length") is None


async def test_expect_100_continue_is_sent_when_the_body_is_first_read(codec: str) -> None:
    protocol, conn, _ = make_protocol(codec)
    protocol.feed(
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
    )
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert bytes(conn.output) == b"HTTP/1.1 100 Continue\r\n\r\n"
    protocol.feed(b"data")
    await settle(protocol)
    [response] = decode_responses(bytes(conn.output), ["POST"])
    assert response.json()["body"] == "data"
    assert not conn.closed


async def test_expect_100_continue_refused_without_reading_gets_no_interim_and_closes(
    codec: str,
) -> None:
    protocol, conn, _ = make_protocol(codec, handler=canned(404, b"nope"))
    protocol.feed(
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
    )
    await settle(protocol)
    assert b"100 Continue" not in bytes(conn.output)
    [response] = decode_responses(bytes(conn.output), ["POST"])
    assert response.status == 404
    assert conn.closed  # the unread body would otherwise be parsed as a request


async def test_streamed_response_without_length_is_chunked_with_trailers(codec: str) -> None:
    body = Body(None)
    protocol, conn, _ = make_protocol(codec, handler=streaming(body, [("X-A", "b")]))
    protocol.feed(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    await asyncio.sleep(0)
    for piece in (b"one", b"two", b"three"):
        body.feed(piece)
        await asyncio.sleep(0)
    body.feed_eof([("X-Checksum", "9")])
    await settle(protocol)
    assert b"Transfer-Encoding: chunked" in bytes(conn.output)
    assert bytes(conn.output).endswith(b"0\r\nX-Checksum: 9\r\n\r\n")
    [response] = decode_responses(bytes(conn.output), ["GET"])
    assert response.body == b"onetwothree"
    assert not conn.closed


async def test_streamed_response_with_length_uses_content_length(codec: str) -> None:
    body = Body(6)
    protocol, conn, _ = make_protocol(codec, handler=streaming(body))
    protocol.feed(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    await asyncio.sleep(0)
    body.feed(b"abc")
    await asyncio.sleep(0)
    body.feed(b"def")
    body.feed_eof()
    await settle(protocol)
    [response] = decode_responses(bytes(conn.output), ["GET"])
    assert response.header("content-length") == "6"
    assert response.body == b"abcdef"


async def test_streamed_response_to_http10_is_close_delimited(codec: str) -> None:
    body = Body(None)
    protocol, conn, _ = make_protocol(codec, handler=streaming(body))
    protocol.feed(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    await asyncio.sleep(0)
    body.feed(b"abc")
    body.feed_eof()
    await settle(protocol)
    output = bytes(conn.output)
    assert b"chunked" not in output.lower()
    assert output.endswith(b"\r\n\r\nabc")
    assert conn.closed_by == "close"


async def test_output_of_many_requests_decodes_cleanly_with_h11(codec: str) -> None:
    # One more end-to-end check of framing: h11 accepts every byte we wrote.
    data = b"".join(
        b"POST /%d HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (i, i, b"b" * i)
        for i in range(10)
    )
    protocol, conn, _ = make_protocol(codec)
    protocol.feed(data)
    await settle(protocol)
    responses = decode_responses(bytes(conn.output), ["POST"] * 10)
    assert [r.json()["body"] for r in responses] == ["b" * i for i in range(10)]


# -- exchanges started without a task (Dispatcher.start): a callback, no task ----------------------


def fast_ok(request: Request) -> tuple[Response | None, ProxyError | None]:
    body = Body.from_bytes(b"fast " + request.target)
    return Response(200, CIMultiDict([("X-Path", "fast")]), body), None


async def test_fast_path_response_is_written_and_connection_kept_alive(codec: str) -> None:
    protocol, conn, server = make_protocol(codec, fast=fast_ok)
    protocol.feed(GET)
    await settle(protocol)
    [response] = decode_responses(bytes(conn.output), ["GET"], strict=True)
    assert response.body == b"fast /a?b=c"
    assert response.header("x-path") == "fast"
    assert server.requests == []
    assert conn.phase is ConnectionPhase.IDLE


async def test_requests_pipelined_behind_a_fast_exchange_are_answered_in_order(
    codec: str,
) -> None:
    protocol, conn, _ = make_protocol(codec, fast=fast_ok)
    protocol.feed(
        b"GET /1 HTTP/1.1\r\nHost: t\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\nx"
        b"GET /3 HTTP/1.1\r\nHost: t\r\n\r\n"
    )
    await settle(protocol)
    responses = decode_responses(bytes(conn.output), ["GET", "POST", "GET"], strict=True)
    bodies = [r.body if r.header("x-path") else r.json()["target"].encode() for r in responses]
    # /3 waited in the queue, and is still started without a task of its own (Dispatcher.start)
    assert bodies == [b"fast /1", b"/2", b"fast /3"]


async def test_fast_path_upstream_error_becomes_a_local_reply(codec: str) -> None:
    def reset(request: Request) -> tuple[Response | None, ProxyError | None]:
        return None, UpstreamReset()

    protocol, conn, _ = make_protocol(codec, fast=reset)
    protocol.feed(GET)
    await settle(protocol)
    [response] = decode_responses(bytes(conn.output), ["GET"], strict=True)
    assert response.status == 502
    assert response.json()["error"] == "upstream_reset"
    assert not conn.closed


async def test_fast_path_streamed_response_is_chunked(codec: str) -> None:
    body = Body(None)

    def streamed(request: Request) -> tuple[Response | None, ProxyError | None]:
        return Response(200, CIMultiDict(), body), None

    protocol, conn, _ = make_protocol(codec, fast=streamed)
    protocol.feed(GET)
    for _ in range(3):
        await asyncio.sleep(0)
    body.feed(b"part1")
    await asyncio.sleep(0)
    body.feed(b"part2")
    body.feed_eof()
    await settle(protocol)
    [response] = decode_responses(bytes(conn.output), ["GET"], strict=True)
    assert response.body == b"part1part2"
    assert not conn.closed


async def test_client_going_away_during_fast_exchange_writes_nothing(codec: str) -> None:
    protocol, conn, _ = make_protocol(codec, fast=fast_ok)
    protocol.feed(GET)
    conn.abort()
    await settle(protocol)
    assert conn.output == b""
