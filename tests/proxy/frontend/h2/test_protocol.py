"""Http2Protocol without sockets: a RecordingConnection underneath, a canned handler above,
and a real h2 client as the peer (its bytes fed in, what the protocol wrote decoded by it,
or parsed frame by frame with hyperframe). Input is fed whole and byte by byte. Also the
PrefaceSniffer, which picks HTTP/2 or HTTP/1.1 on a plaintext listener."""

from __future__ import annotations

import asyncio
import json

import h2.events
import h2.settings
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import (
    DataFrame,
    HeadersFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from multidict import CIMultiDict

from proxy.config.model import Http2Config, LimitsConfig
from proxy.core.body import Body
from proxy.core.errors import ProxyError, UpstreamReset
from proxy.core.models import Request, Response
from proxy.frontend.connection import ConnectionPhase
from tests.support.http2_helpers import (
    H2Peer,
    blocked,
    connected,
    make_h2_protocol,
    parse_frames,
    returning,
    settle,
    spin,
    stream_frames,
)

SPLITS = [None, 1]


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


async def test_streamed_chunks_go_out_as_views_in_one_write_each() -> None:
    # A chunk that does not end the stream is framed as headers beside views of it and
    # written with one writev (write_pieces); the end comes through h2.
    body = Body()
    protocol, conn, _server, peer = await connected(handler=returning(body))
    peer.h2.increment_flow_control_window(2**20)
    peer.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**20})
    peer.request(1)
    peer.send()
    await spin()
    peer.receive()
    chunks = [bytes([n]) * 40_000 for n in range(3)]
    for chunk in chunks:
        body.feed(chunk)
        await spin()
    body.feed_eof()
    await settle(protocol)
    peer.receive()
    assert bytes(peer.responses[1].body) == b"".join(chunks)
    assert peer.responses[1].ended
    assert conn.pieces_writes == 3
    frames = stream_frames(parse_frames(bytes(conn.output)), 1)
    sizes = [len(f.data) for f in frames if isinstance(f, DataFrame)]
    assert sizes == [16384, 16384, 7232] * 3 + [0]


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


async def test_a_repeated_field_list_is_validated_once_and_each_request_owns_its_headers() -> None:
    protocol, _conn, server, peer = await connected()
    for stream_id in (1, 3):
        peer.request(stream_id, path=b"/same", extra=[(b"x-a", b"1")])
        peer.send()
        await settle(protocol)
    peer.request(5, path=b"/bad", extra=[(b"X-Upper", b"1")])  # malformed: never memoised
    peer.request(7, path=b"/bad", extra=[(b"X-Upper", b"1")])
    peer.send()
    await settle(protocol)
    peer.receive()

    first, second = server.requests
    assert first.raw_headers == second.raw_headers
    assert first.raw_headers is not second.raw_headers
    assert len(protocol._request_fields._memo) == 1
    assert peer.responses[5].reset == peer.responses[7].reset == ErrorCodes.PROTOCOL_ERROR
