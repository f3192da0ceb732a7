"""Http2Protocol without sockets: a RecordingConnection underneath, a canned handler above,
and a real h2 client as the peer (its bytes fed in, what the protocol wrote decoded by it,
or parsed frame by frame with hyperframe). Input is fed whole and byte by byte. Also the
PrefaceSniffer, which picks HTTP/2 or HTTP/1.1 on a plaintext listener."""

from __future__ import annotations

import asyncio
import json
import logging

import h2.events
import h2.settings
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from multidict import CIMultiDict

from proxy.config_model import Http2Config, LimitsConfig, ListenerConfig
from proxy.connection import ConnectionPhase
from proxy.errors import BadRequest, ProxyError, UpstreamReset
from proxy.models import Body, Request, Response
from proxy.protocol.h2conn import PREFACE
from proxy.protocol.http1 import Http1Protocol
from proxy.protocol.http2 import Http2Protocol
from proxy.protocol.select import PrefaceSniffer, plaintext_front_end
from tests.helpers import FakeServer, Handler, decode_responses, echo_handler
from tests.helpers import settle as settle_http1
from tests.proxy.protocol.http2_helpers import (
    H2Peer,
    H2RecordingConnection,
    connected,
    feed,
    make_h2_protocol,
    parse_frames,
    settle,
)

SPLITS = [None, 1]


def blocked(release: asyncio.Event, started: list[Request] | None = None) -> Handler:
    """echo_handler once `release` is set (records each request as it starts)."""

    async def handler(request: Request) -> Response:
        if started is not None:
            started.append(request)
        await release.wait()
        return await echo_handler(request)

    return handler


def returning(body: Body, status: int = 200) -> Handler:
    """A handler answering `status` with `body` (which the test may still be feeding)."""

    async def handler(request: Request) -> Response:
        return Response(status, CIMultiDict([("content-type", "text/plain")]), body)

    return handler


async def spin(times: int = 5) -> None:
    """Let the loop run a few iterations (stream tasks start, flushes happen)."""
    for _ in range(times):
        await asyncio.sleep(0)


def stream_frames(frames: list[Frame], stream_id: int) -> list[Frame]:
    return [frame for frame in frames if frame.stream_id == stream_id]


# --------------------------------------------------------------------------- connection


@pytest.mark.parametrize("split", SPLITS)
async def test_preface_and_settings_get_our_configured_settings_and_an_ack(
    split: int | None,
) -> None:
    http2 = Http2Config(
        max_concurrent_streams=7, initial_window_size=32768, max_header_list_size=4000
    )
    protocol, conn, _server = make_h2_protocol(http2=http2)
    # Our SETTINGS go out at once (RFC 9113 section 3.4), with the advertised limit (not
    # the looser one h2 enforces), then the connection window is opened to 4 x 32768.
    settings, window = parse_frames(bytes(conn.output))
    assert isinstance(settings, SettingsFrame)
    configured = {
        h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 7,
        h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 32768,
        h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 4000,
        h2.settings.SettingCodes.ENABLE_PUSH: 0,
    }
    assert {code: settings.settings.get(code) for code in configured} == configured
    assert isinstance(window, WindowUpdateFrame)
    assert (window.stream_id, window.window_increment) == (0, 4 * 32768 - 65535)

    peer = H2Peer(protocol, conn)
    peer.send(split)
    events = peer.receive()
    [changed] = [e for e in events if isinstance(e, h2.events.RemoteSettingsChanged)]
    received = {code: s.new_value for code, s in changed.changed_settings.items()}
    assert received[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] == 7
    assert received[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE] == 32768
    assert received[h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE] == 4000
    assert received[h2.settings.SettingCodes.ENABLE_PUSH] == 0
    assert any(isinstance(e, h2.events.SettingsAcknowledged) for e in events)  # ours, acked
    assert peer.goaway is None
    assert conn.closed_by is None
    assert conn.phase is ConnectionPhase.IDLE
    assert conn.deadline == pytest.approx(
        asyncio.get_running_loop().time() + conn.limits.keepalive_timeout, abs=1.0
    )


async def test_settings_ack_from_client_is_accepted() -> None:
    _protocol, conn, _server, peer = await connected()
    assert peer.goaway is None
    assert conn.closed_by is None
    assert repr(_protocol) == "<Http2Protocol OPEN streams=0>"


@pytest.mark.parametrize("split", [None, 1, 5])
async def test_get_is_answered_with_status_and_body(split: int | None) -> None:
    protocol, conn, server, peer = await connected(split)
    peer.request(1, path=b"/a?b=c", extra=[(b"x-custom", b"1")])
    peer.send(split)
    await settle(protocol)
    peer.receive()
    response = peer.responses[1]
    assert response.status == 200
    assert response.ended
    assert response.reset is None
    assert response.header(b"content-type") == b"application/json"
    assert response.header(b"content-length") == str(len(response.body)).encode()
    payload = json.loads(response.body)
    assert payload == {"method": "GET", "target": "/a?b=c", "body": "", "version": "2"}
    [request] = server.requests
    assert request.headers["x-custom"] == "1"
    assert request.host == "example.com"
    assert request.client == conn.client
    assert request.scheme == "http"
    assert not conn.closed
    assert conn.phase is ConnectionPhase.IDLE
    assert not protocol._streams


async def test_the_whole_conversation_fed_byte_by_byte_is_answered() -> None:
    protocol, conn, server = make_h2_protocol()
    peer = H2Peer(protocol, conn)
    peer.request(1, path=b"/one")
    peer.request(3, method=b"POST", path=b"/two", body=b"hello")
    peer.send(split=1)
    await settle(protocol)
    peer.receive()
    assert json.loads(peer.responses[1].body)["target"] == "/one"
    assert json.loads(peer.responses[3].body)["body"] == "hello"
    assert [r.method for r in server.requests] == ["GET", "POST"]


async def test_streams_are_served_concurrently() -> None:
    release = asyncio.Event()
    started: list[Request] = []
    protocol, _conn, _server, peer = await connected(handler=blocked(release, started))
    for stream_id in (1, 3, 5):
        peer.request(stream_id, path=b"/%d" % stream_id)
    peer.send()
    await spin()
    assert [r.path for r in started] == ["/1", "/3", "/5"]  # all three run at once
    assert repr(protocol) == "<Http2Protocol OPEN streams=3>"
    release.set()
    await settle(protocol)
    peer.receive()
    assert {sid: json.loads(r.body)["target"] for sid, r in peer.responses.items()} == {
        1: "/1",
        3: "/3",
        5: "/5",
    }


async def test_head_request_gets_headers_only() -> None:
    protocol, _conn, _server, peer = await connected()
    peer.request(1, method=b"HEAD")
    peer.send()
    await settle(protocol)
    frames = stream_frames(parse_frames(peer.new_output()), 1)
    [headers] = frames
    assert isinstance(headers, HeadersFrame)
    assert "END_STREAM" in headers.flags


async def test_fast_path_answers_without_a_task() -> None:
    def fast(request: Request) -> tuple[Response | None, ProxyError | None]:
        return Response(200, CIMultiDict(), Body.from_bytes(b"fast " + request.target)), None

    protocol, _conn, server, peer = await connected(fast=fast)
    peer.request(1, path=b"/f")
    peer.send()
    await settle(protocol)
    peer.receive()
    assert bytes(peer.responses[1].body) == b"fast /f"
    assert peer.responses[1].ended
    assert len(server.fast_requests) == 1
    assert not server.requests


# ------------------------------------------------------------------ request bodies, windows


@pytest.mark.parametrize("split", SPLITS)
async def test_post_body_window_is_reopened_only_as_the_handler_reads(
    split: int | None,
) -> None:
    release = asyncio.Event()
    started: list[Request] = []
    http2 = Http2Config(initial_window_size=4096)
    protocol, _conn, server, peer = await connected(http2=http2, handler=blocked(release, started))
    peer.request(1, method=b"POST", path=b"/upload", body=b"x" * 4096, end=False)
    peer.send(split)
    await spin()
    peer.receive()
    [request] = started
    assert request.body.bytes_fed == 4096
    assert request.body.bytes_read == 0
    # Not read yet: no WINDOW_UPDATE, and the client may send nothing more.
    assert peer.window_updates(1) == []
    assert peer.h2.local_flow_control_window(1) == 0

    release.set()  # the echo handler reads the 4096 bytes, then waits for more
    await spin()
    peer.receive()
    assert request.body.bytes_read == 4096
    assert peer.window_updates(1) == [4096]
    assert peer.h2.local_flow_control_window(1) == 4096

    peer.h2.send_data(1, b"y" * 100, end_stream=True)
    peer.send(split)
    await settle(protocol)
    peer.receive()
    assert json.loads(peer.responses[1].body)["body"] == "x" * 4096 + "y" * 100
    assert server.requests[0].body.bytes_read == 4196


@pytest.mark.parametrize("split", SPLITS)
async def test_request_trailers_reach_the_request_body(split: int | None) -> None:
    protocol, _conn, server, peer = await connected()
    peer.request(1, method=b"POST", body=b"hello", end=False, extra=[(b"te", b"trailers")])
    peer.h2.send_headers(1, [(b"x-trailer", b"t"), (b"grpc-status", b"0")], end_stream=True)
    peer.send(split)
    await settle(protocol)
    peer.receive()
    [request] = server.requests
    assert request.body.trailers == [("x-trailer", "t"), ("grpc-status", "0")]
    assert json.loads(peer.responses[1].body)["body"] == "hello"


async def test_body_larger_than_content_length_limit_gets_413_without_the_handler() -> None:
    limits = LimitsConfig(max_body_size=10)
    protocol, _conn, server, peer = await connected(limits=limits)
    peer.request(1, method=b"POST", end=False, extra=[(b"content-length", b"11")])
    peer.send()
    await settle(protocol)
    peer.receive()
    assert peer.responses[1].status == 413
    assert peer.responses[1].reset == ErrorCodes.NO_ERROR  # stop uploading (RFC 9113 8.1)
    assert not server.requests


@pytest.mark.parametrize("split", SPLITS)
async def test_body_over_the_limit_without_content_length_fails_the_read(
    split: int | None,
) -> None:
    limits = LimitsConfig(max_body_size=10)
    protocol, _conn, _server, peer = await connected(limits=limits)
    peer.request(1, method=b"POST", body=b"x" * 11)
    peer.send(split)
    await settle(protocol)
    peer.receive()
    assert peer.responses[1].status == 413


async def test_body_timeout_fails_a_stalled_upload_with_408() -> None:
    limits = LimitsConfig(body_timeout=0.0)
    protocol, conn, _server, peer = await connected(limits=limits)
    peer.request(1, method=b"POST", body=b"part", end=False)
    peer.send()
    await spin()
    assert conn.phase is ConnectionPhase.BODY  # the handler caught up: waits on the client
    protocol.on_timeout(ConnectionPhase.BODY)
    await settle(protocol)
    peer.receive()
    assert peer.responses[1].status == 408
    assert peer.responses[1].reset == ErrorCodes.NO_ERROR
    assert not conn.closed


# ---------------------------------------------------------------------------- responses


async def test_response_trailers_go_out_as_a_trailing_headers_frame() -> None:
    body = Body()
    body.feed(b"payload")
    body.feed_eof([("grpc-status", "0"), ("grpc-message", "ok")])
    protocol, _conn, _server, peer = await connected(handler=returning(body))
    peer.request(1, method=b"POST", body=b"")
    peer.send()
    await settle(protocol)
    frames = stream_frames(parse_frames(bytes(peer.conn.output[peer.read_upto :])), 1)
    assert [type(f).__name__ for f in frames] == ["HeadersFrame", "DataFrame", "HeadersFrame"]
    assert "END_STREAM" not in frames[0].flags
    assert "END_STREAM" not in frames[1].flags
    assert "END_STREAM" in frames[2].flags
    peer.receive()
    response = peer.responses[1]
    assert response.header(b"content-length") is None  # trailers: no length is promised
    assert bytes(response.body) == b"payload"
    assert response.trailers == [(b"grpc-status", b"0"), (b"grpc-message", b"ok")]
    assert response.ended


async def test_streamed_response_trailers_follow_the_last_chunk() -> None:
    body = Body()
    protocol, _conn, _server, peer = await connected(handler=returning(body))
    peer.request(1)
    peer.send()
    await spin()
    peer.receive()
    assert peer.responses[1].status == 200
    assert not peer.responses[1].ended
    body.feed(b"one,")
    body.feed(b"two")
    body.feed_eof([("x-checksum", "abc")])
    await settle(protocol)
    frames = stream_frames(parse_frames(peer.new_output()), 1)
    assert isinstance(frames[-1], HeadersFrame)
    assert "END_STREAM" in frames[-1].flags
    assert b"".join(f.data for f in frames if isinstance(f, DataFrame)) == b"one,two"


async def test_streamed_response_failing_after_the_head_resets_the_stream() -> None:
    body = Body()
    protocol, conn, _server, peer = await connected(handler=returning(body))
    peer.request(1)
    peer.send()
    await spin()
    body.feed(b"partial")
    body.fail(UpstreamReset())
    await settle(protocol)
    peer.receive()
    assert peer.responses[1].status == 200
    assert peer.responses[1].reset == ErrorCodes.INTERNAL_ERROR
    assert not conn.closed


async def test_large_response_waits_for_the_clients_window() -> None:
    data = bytes(range(256)) * 400  # 102400 bytes: more than the default 65535 window
    protocol, _conn, _server, peer = await connected(handler=returning(Body.from_bytes(data)))
    peer.request(1)
    peer.send()
    await spin(10)
    peer.receive()
    assert len(peer.responses[1].body) == 65535  # the client's windows, exactly
    assert not peer.responses[1].ended
    peer.h2.acknowledge_received_data(65535, 1)
    peer.send()
    await settle(protocol)
    peer.receive()
    assert bytes(peer.responses[1].body) == data
    assert peer.responses[1].ended


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
        from proxy.local_reply import local_reply

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
    peer.request(1, path=b"/hang")
    peer.send(split)
    await started.wait()
    [stream] = protocol._streams.values()
    task = stream.task
    assert task is not None
    peer.h2.reset_stream(1, ErrorCodes.CANCEL)
    peer.send(split)
    await asyncio.wait({task}, timeout=1.0)
    assert task.done()
    assert cancelled == ["/hang"]
    assert not protocol._streams
    await spin()
    peer.receive()
    assert 1 not in peer.responses  # nothing is sent for a cancelled stream
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
    release = asyncio.Event()
    protocol, conn, _server, peer = await connected(handler=blocked(release))
    peer.request(1)
    peer.send()
    await spin()
    [stream] = protocol._streams.values()
    task = stream.task
    assert task is not None
    peer.h2.close_connection(error_code=ErrorCodes.INTERNAL_ERROR)
    peer.send()
    await asyncio.wait({task}, timeout=1.0)
    assert task.cancelled() or task.done()
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


# ----------------------------------------------------------------------- PrefaceSniffer


def sniffer_connection(*, http2: bool = True) -> tuple[H2RecordingConnection, FakeServer]:
    server = FakeServer()
    listener = ListenerConfig(host="127.0.0.1", port=0, name="test", http2=http2)
    conn = H2RecordingConnection(server, listener)
    conn.front_end = plaintext_front_end(conn)  # type: ignore[arg-type,assignment]
    return conn, server


def front(conn: H2RecordingConnection) -> object:
    return conn.front_end


@pytest.mark.parametrize("pieces", [[6, 10, 8], [1] * 24, [23, 1], [24]])
async def test_preface_split_over_several_feeds_selects_http2(pieces: list[int]) -> None:
    conn, server = sniffer_connection()
    sniffer = front(conn)
    assert isinstance(sniffer, PrefaceSniffer)
    peer = H2Peer(sniffer, conn)  # type: ignore[arg-type]
    data = peer.h2.data_to_send()
    assert data.startswith(PREFACE)
    position = 0
    for size in pieces:
        assert front(conn) is sniffer
        sniffer.feed(data[position : position + size])
        position += size
    protocol = front(conn)
    assert isinstance(protocol, Http2Protocol)
    peer.protocol = protocol
    protocol.feed(data[position:])  # the client's SETTINGS
    peer.request(1, path=b"/h2")
    peer.send()
    await settle(protocol)
    peer.receive()
    assert peer.responses[1].status == 200
    assert peer.goaway is None
    assert server.requests[0].http_version == "2"


async def test_preface_and_frames_in_one_feed_select_http2() -> None:
    conn, server = sniffer_connection()
    sniffer = front(conn)
    assert isinstance(sniffer, PrefaceSniffer)
    peer = H2Peer(sniffer, conn)  # type: ignore[arg-type]
    peer.request(1)
    peer.send()  # preface, SETTINGS and the request: handed over whole
    protocol = front(conn)
    assert isinstance(protocol, Http2Protocol)
    await settle(protocol)
    peer.receive()
    assert peer.responses[1].status == 200
    assert server.requests[0].http_version == "2"


@pytest.mark.parametrize("split", [None, 1])
async def test_http11_request_selects_http1(split: int | None) -> None:
    conn, server = sniffer_connection()
    data = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    step = split or len(data)
    for start in range(0, len(data), step):
        front_end = front(conn)
        front_end.feed(data[start : start + step])  # type: ignore[attr-defined]
    protocol = front(conn)
    assert isinstance(protocol, Http1Protocol)
    await settle_http1(protocol)
    [response] = decode_responses(bytes(conn.output), ["GET"])
    assert response.status == 200
    assert server.requests[0].http_version == "1.1"


async def test_p_then_ost_selects_http1() -> None:
    conn, server = sniffer_connection()
    sniffer = front(conn)
    assert isinstance(sniffer, PrefaceSniffer)
    sniffer.feed(b"P")
    assert front(conn) is sniffer  # "P" could still be the preface
    assert repr(sniffer) == "<PrefaceSniffer buffered=1>"
    sniffer.feed(b"OST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nok")
    protocol = front(conn)
    assert isinstance(protocol, Http1Protocol)
    await settle_http1(protocol)
    [response] = decode_responses(bytes(conn.output), ["POST"])
    assert response.status == 200
    assert response.json()["body"] == "ok"
    assert server.requests[0].method == "POST"


async def test_listener_without_http2_gets_http1_directly() -> None:
    conn, _server = sniffer_connection(http2=False)
    assert isinstance(front(conn), Http1Protocol)


async def test_sniffer_closes_on_eof_timeout_and_drain() -> None:
    for act in ("eof", "timeout", "drain"):
        conn, _server = sniffer_connection()
        sniffer = front(conn)
        assert isinstance(sniffer, PrefaceSniffer)
        sniffer.feed(b"PRI * HTTP")
        if act == "eof":
            sniffer.on_eof()
        elif act == "timeout":
            sniffer.on_timeout(ConnectionPhase.HEAD)
        else:
            sniffer.on_drain_request()
        assert conn.closed_by == "close", act
        assert not conn.output
