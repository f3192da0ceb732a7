"""Http2Protocol without sockets, continued: local replies, malformed requests, resets and
refusals, GOAWAY and closing (see test_protocol.py for the set-up)."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    GoAwayFrame,
    PingFrame,
    RstStreamFrame,
)

from proxy.config.model import Http2Config
from proxy.core.errors import BadRequest, ProxyError, UpstreamReset
from proxy.core.models import Request, Response
from proxy.frontend.connection import ConnectionPhase
from tests.support.helpers import echo_handler
from tests.support.http2_helpers import (
    H2Peer,
    blocked,
    connected,
    feed,
    make_h2_protocol,
    parse_frames,
    settle,
    spin,
)

SPLITS = [None, 1]


# ------------------------------------------------------------------------- local replies


async def test_fast_path_error_becomes_a_local_reply() -> None:
    def fast(request: Request) -> tuple[Response | None, ProxyError | None]:
        return None, UpstreamReset()

    protocol, _conn, _server, peer = await connected(fast=fast)
    peer.request(1)
    peer.send()
    await settle(protocol)
    peer.receive()
    assert peer.responses[1].status == 502
    assert json.loads(peer.responses[1].body)["error"] == "upstream_reset"


async def test_handler_returning_a_local_reply_gets_its_status() -> None:
    async def handler(request: Request) -> Response:
        from proxy.core.local_reply import local_reply

        return local_reply(BadRequest("nope"), request)

    protocol, _conn, _server, peer = await connected(handler=handler)
    peer.request(1)
    peer.send()
    await settle(protocol)
    peer.receive()
    assert peer.responses[1].status == 400
    assert json.loads(peer.responses[1].body)["error"] == "bad_request"


async def test_handler_raising_resets_the_stream_and_the_connection_keeps_working(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # `ServerContext.handle` never raises (Runtime.handle turns ProxyErrors into local
    # replies); one that does is a bug, and only its stream is lost.
    async def handler(request: Request) -> Response:
        if request.path == "/raise":
            raise UpstreamReset()
        return await echo_handler(request)

    protocol, conn, _server, peer = await connected(handler=handler)
    peer.request(1, path=b"/raise")
    peer.send()
    with caplog.at_level(logging.ERROR, logger="proxy"):
        await settle(protocol)
    peer.receive()
    assert peer.responses[1].reset == ErrorCodes.INTERNAL_ERROR
    assert "bug in the HTTP/2 front end" in caplog.text
    peer.request(3)
    peer.send()
    await settle(protocol)
    peer.receive()
    assert peer.responses[3].status == 200
    assert not conn.closed


async def test_connect_gets_400() -> None:
    protocol, _conn, server, peer = await connected()
    peer.request(1, [(b":method", b"CONNECT"), (b":authority", b"example.com:443")])
    peer.send()
    await settle(protocol)
    peer.receive()
    assert peer.responses[1].status == 400
    assert not server.requests


@pytest.mark.parametrize(
    ("path", "extra", "status"),
    [(b"/..", [], 400), (b"/", [(b"x-big", b"a" * 2000)], 431)],
    ids=["invalid-target", "header-list-too-large"],
)
async def test_a_refused_head_request_gets_its_status_without_content(
    path: bytes, extra: list[tuple[bytes, bytes]], status: int
) -> None:
    """A HEAD's answer has no content (RFC 9110 section 9.3.2), a local reply's too: the
    gateway once sent the JSON of a refusal as DATA, which clients reject (the
    differential test of the two builds found it)."""
    protocol, _conn, server, peer = await connected(http2=Http2Config(max_header_list_size=1024))
    peer.request(1, method=b"HEAD", path=path, extra=extra)
    peer.send()
    await settle(protocol)
    peer.receive()
    answer = peer.responses[1]
    assert (answer.status, answer.ended, bytes(answer.body)) == (status, True, b"")
    assert not server.requests


@pytest.mark.parametrize("split", SPLITS)
async def test_oversized_header_list_gets_431_and_the_connection_keeps_working(
    split: int | None,
) -> None:
    http2 = Http2Config(max_header_list_size=1024)
    protocol, conn, server, peer = await connected(http2=http2)
    peer.request(1, extra=[(b"x-big", b"a" * 2000)])
    peer.send(split)
    await settle(protocol)
    peer.receive()
    assert peer.responses[1].status == 431
    assert not server.requests
    peer.request(3)
    peer.send(split)
    await settle(protocol)
    peer.receive()
    assert peer.responses[3].status == 200
    assert not conn.closed


async def test_header_list_far_beyond_the_limit_is_a_connection_error() -> None:
    # An HPACK bomb: beyond 4 x max_header_list_size h2 gives up on the connection.
    http2 = Http2Config(max_header_list_size=1024)
    protocol, conn, _server, peer = await connected(http2=http2)
    peer.request(1, extra=[(b"x-big", b"a" * 5000)])
    peer.send()
    await settle(protocol)
    peer.receive()
    assert peer.goaway is not None
    assert peer.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert conn.closed_by == "close"


# ------------------------------------------------------------------- malformed requests

BASE = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"a")]
MALFORMED = {
    "uppercase-name": [*BASE, (b"X-Upper", b"1")],
    "connection-header": [*BASE, (b"connection", b"keep-alive")],
    "transfer-encoding": [*BASE, (b"transfer-encoding", b"chunked")],
    "missing-path": [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a")],
    "missing-method": [(b":scheme", b"http"), (b":path", b"/"), (b":authority", b"a")],
    "te-gzip": [*BASE, (b"te", b"gzip")],
    "pseudo-after-regular": [(b":method", b"GET"), (b"x", b"1"), (b":path", b"/")],
    "unknown-pseudo": [*BASE, (b":foo", b"1")],
    "repeated-pseudo": [*BASE, (b":path", b"/again")],
    "crlf-in-value": [*BASE, (b"x-evil", b"a\r\nb")],
    "relative-path": [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"no-slash")],
}


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("fields", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_request_is_reset_and_the_connection_keeps_working(
    fields: list[tuple[bytes, bytes]], split: int | None
) -> None:
    protocol, conn, server, peer = await connected()
    peer.request(1, fields)
    peer.send(split)
    await settle(protocol)
    peer.receive()
    assert peer.responses[1].reset == ErrorCodes.PROTOCOL_ERROR
    assert not peer.responses[1].headers  # no response, just the reset
    assert not server.requests
    peer.request(3)
    peer.send(split)
    await settle(protocol)
    peer.receive()
    assert peer.responses[3].status == 200
    assert peer.goaway is None
    assert not conn.closed


# -------------------------------------------------------------------- resets and refusal


@pytest.mark.parametrize("split", SPLITS)
async def test_client_reset_cancels_the_handler_task(split: int | None) -> None:
    cancelled: list[str] = []
    started = asyncio.Event()

    async def handler(request: Request) -> Response:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(request.path)
            raise
        raise AssertionError("unreachable")

    protocol, conn, _server, peer = await connected(handler=handler)
    hung = 1
    peer.request(hung, path=b"/hang")
    peer.send(split)
    await started.wait()
    [stream] = protocol._streams.values()
    task = stream.task
    assert task is not None
    peer.h2.reset_stream(hung, ErrorCodes.CANCEL)
    peer.send(split)
    await asyncio.wait({task}, timeout=1.0)
    assert task.done()
    assert cancelled == ["/hang"]
    assert not protocol._streams
    await spin()
    peer.receive()
    assert hung not in peer.responses  # nothing is sent for a cancelled stream
    assert not conn.closed
    assert conn.phase is ConnectionPhase.IDLE


@pytest.mark.parametrize("split", SPLITS)
async def test_streams_beyond_max_concurrent_streams_are_refused(split: int | None) -> None:
    release = asyncio.Event()
    http2 = Http2Config(max_concurrent_streams=2)
    protocol, _conn, server = make_h2_protocol(http2=http2, handler=blocked(release))
    peer = H2Peer(protocol, conn=_conn)
    # The client sends before it has read our SETTINGS (h2 would stop it otherwise).
    for stream_id in (1, 3, 5):
        peer.request(stream_id, path=b"/%d" % stream_id)
    peer.send(split)
    await spin()
    peer.receive()
    assert peer.responses[5].reset == ErrorCodes.REFUSED_STREAM
    assert len(protocol._streams) == 2
    release.set()
    await settle(protocol)
    peer.receive()
    assert peer.responses[1].status == 200
    assert peer.responses[3].status == 200
    assert [r.path for r in server.requests] == ["/1", "/3"]
    peer.request(7, path=b"/7")  # room again
    peer.send(split)
    await settle(protocol)
    peer.receive()
    assert peer.responses[7].status == 200


# ------------------------------------------------------------------- GOAWAY and closing


async def test_drain_request_sends_goaway_and_closes_once_streams_finish() -> None:
    release = asyncio.Event()
    protocol, conn, _server, peer = await connected(handler=blocked(release))
    peer.request(1)
    peer.send()
    await spin()
    protocol.on_drain_request()
    peer.receive()
    assert peer.goaway is not None
    assert peer.goaway.error_code == ErrorCodes.NO_ERROR
    assert peer.goaway.last_stream_id == 1
    assert not conn.closed  # stream 1 may finish
    assert repr(protocol) == "<Http2Protocol CLOSING streams=1>"
    peer.request(3)  # sent before the client saw our GOAWAY: refused, safe to retry
    peer.send()
    await spin()
    peer.receive()
    assert peer.responses[3].reset == ErrorCodes.REFUSED_STREAM
    release.set()
    await settle(protocol)
    peer.receive()
    assert peer.responses[1].status == 200
    assert peer.responses[1].ended
    assert conn.closed_by == "close"
    protocol.on_drain_request()  # a second request changes nothing


async def test_drain_request_without_streams_closes_at_once() -> None:
    protocol, conn, _server, peer = await connected()
    peer.request(1)
    peer.send()
    await settle(protocol)
    protocol.on_drain_request()
    peer.receive()
    assert peer.goaway is not None
    assert peer.goaway.error_code == ErrorCodes.NO_ERROR
    assert peer.goaway.last_stream_id == 1
    assert conn.closed_by == "close"


async def test_idle_timeout_sends_goaway_and_closes() -> None:
    protocol, conn, _server, peer = await connected()
    assert conn.phase is ConnectionPhase.IDLE
    protocol.on_timeout(ConnectionPhase.IDLE)
    peer.receive()
    assert peer.goaway is not None
    assert peer.goaway.error_code == ErrorCodes.NO_ERROR
    assert peer.goaway.last_stream_id == 0
    assert conn.closed_by == "close"


async def test_client_eof_finishes_streams_then_closes() -> None:
    release = asyncio.Event()
    protocol, conn, _server, peer = await connected(handler=blocked(release))
    peer.request(1)
    peer.send()
    await spin()
    protocol.on_eof()
    assert not conn.closed
    release.set()
    await settle(protocol)
    peer.receive()
    assert peer.responses[1].status == 200
    assert conn.closed_by == "close"


async def test_client_goaway_with_an_error_closes_and_cancels_streams() -> None:
    cancelled = asyncio.Event()

    async def waits_forever(request: Request) -> Response:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    protocol, conn, _server, peer = await connected(handler=waits_forever)
    peer.request(1)
    peer.send()
    await spin()
    [stream] = protocol._streams.values()
    task = stream.task
    assert task is not None
    peer.h2.close_connection(error_code=ErrorCodes.INTERNAL_ERROR)
    peer.send()
    await asyncio.wait({task}, timeout=1.0)
    assert task.done()
    assert cancelled.is_set()
    assert conn.closed_by == "close"


DATA_ON_STREAM_0 = b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x"  # hyperframe refuses to build it
GARBAGE = {
    # CONTINUATION with no HEADERS before it (RFC 9113 section 6.10).
    "orphan-continuation": (
        ContinuationFrame(1, data=b"\x82").serialize(),
        ErrorCodes.PROTOCOL_ERROR,
    ),
    # DATA on stream 0 (section 6.1).
    "data-on-stream-0": (DATA_ON_STREAM_0, ErrorCodes.PROTOCOL_ERROR),
    # A frame larger than SETTINGS_MAX_FRAME_SIZE (section 4.2), all of it sent.
    "oversized-frame": (
        b"\x00\x40\x01\x06\x00\x00\x00\x00\x00" + b"\x00" * 16385,
        ErrorCodes.FRAME_SIZE_ERROR,
    ),
    # DATA on a stream that was never opened (section 5.1, idle).
    "data-on-idle-stream": (DataFrame(7, data=b"x").serialize(), ErrorCodes.PROTOCOL_ERROR),
    # A zero WINDOW_UPDATE on the connection (section 6.9).
    "zero-window-update": (
        b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00",
        ErrorCodes.PROTOCOL_ERROR,
    ),
    # A PING of the wrong length (section 6.7).
    "short-ping": (
        b"\x00\x00\x04\x06\x00\x00\x00\x00\x00" + b"\x00" * 4,
        ErrorCodes.FRAME_SIZE_ERROR,
    ),
}


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize(("garbage", "code"), GARBAGE.values(), ids=GARBAGE.keys())
async def test_garbage_frame_after_the_preface_is_goaway_and_close(
    garbage: bytes, code: ErrorCodes, split: int | None
) -> None:
    protocol, conn, server, peer = await connected()
    feed(protocol, garbage, split)
    await settle(protocol)
    frames = parse_frames(peer.new_output())
    goaway = frames[-1]
    assert isinstance(goaway, GoAwayFrame)
    assert goaway.error_code == code
    assert goaway.last_stream_id == 0
    assert conn.closed_by == "close"
    # Nothing more is read or answered.
    protocol.feed(PingFrame(0, opaque_data=b"12345678").serialize())
    assert not peer.new_output()
    assert not server.seen


async def test_connection_error_keeps_the_last_stream_id_of_the_streams_taken() -> None:
    release = asyncio.Event()
    protocol, conn, _server, peer = await connected(handler=blocked(release))
    peer.request(1)
    peer.send()
    await spin()
    protocol.feed(DATA_ON_STREAM_0)
    await spin()
    frames = parse_frames(peer.new_output())
    assert isinstance(frames[-1], GoAwayFrame)
    assert frames[-1].last_stream_id == 1
    assert conn.closed_by == "close"
    assert not protocol._streams  # the handler's task was cancelled


async def test_rst_stream_for_an_unknown_stream_is_harmless() -> None:
    protocol, conn, _server, peer = await connected()
    peer.request(1)
    peer.send()
    await settle(protocol)
    protocol.feed(RstStreamFrame(1).serialize())  # already closed
    await settle(protocol)
    assert not conn.closed
