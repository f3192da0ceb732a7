"""Regression tests for Http2Protocol bugs found while writing test_protocol.py:
each broke RFC 9113 or one of the module's own defences. The comments say what used to
happen."""

from __future__ import annotations

import asyncio

import h2.settings
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from proxy.config.model import Http2Config
from proxy.core.errors import BadRequest
from proxy.core.local_reply import local_reply
from proxy.core.models import Request, Response
from proxy.frontend.connection import ConnectionPhase
from proxy.frontend.h2.conn import server_connection
from proxy.frontend.h2.protocol import Http2Protocol
from tests.support.http2_helpers import H2Peer, blocked, connected, parse_frames, settle, spin


@pytest.mark.parametrize(
    ("content_length", "data"),
    [(b"5", b"x" * 10), (b"10", b"x" * 5), (b"abc", b"xx"), (b"-1", b"")],
    ids=["more-data-than-declared", "less-data-than-declared", "non-digit", "negative"],
)
async def test_content_length_error_is_a_stream_error_not_a_connection_error(
    content_length: bytes, data: bytes
) -> None:
    # RFC 9113 section 8.1.1: a request whose content-length is not a number, or does
    # not match the DATA it carries, is malformed, and "Malformed requests ... MUST be
    # treated as a stream error of type PROTOCOL_ERROR" (the module says so too, in
    # `_on_request`, and h2fields rejects a non-digit content-length for that purpose).
    # h2 raises a ProtocolError for both (InvalidBodyLengthError, "Invalid
    # content-length header") from `receive_data`, and `feed` treats every ProtocolError
    # as a connection error: GOAWAY PROTOCOL_ERROR, close, and every other stream in
    # flight on the connection is cancelled. One client request can kill the others.
    release = asyncio.Event()
    started: list[Request] = []
    protocol, conn, _server, peer = await connected(handler=blocked(release, started))
    peer.request(1, path=b"/innocent")
    peer.send()
    await spin()
    assert len(started) == 1
    peer.request(3, method=b"POST", body=data, extra=[(b"content-length", content_length)])
    peer.send()
    await spin()
    release.set()
    await settle(protocol)
    peer.receive()
    assert peer.goaway is None, f"connection error GOAWAY {peer.goaway!r}"
    assert peer.responses[3].reset == ErrorCodes.PROTOCOL_ERROR
    assert peer.responses[1].status == 200
    assert not conn.closed


TRAILERS = {
    "pseudo-header": [(b":path", b"/evil")],
    "uppercase-name": [(b"X-Upper", b"1")],
    "crlf-in-value": [(b"x-evil", b"a\r\nx-injected: 1")],
    "connection-specific": [(b"transfer-encoding", b"chunked")],
}


@pytest.mark.parametrize("trailers", TRAILERS.values(), ids=TRAILERS.keys())
async def test_malformed_request_trailers_are_a_stream_error(
    trailers: list[tuple[bytes, bytes]],
) -> None:
    # RFC 9113 section 8.1: trailers "MUST NOT include pseudo-header fields"; section
    # 8.2.1/8.2.2: upper-case names, CR/LF/NUL in values and connection-specific fields
    # make the message malformed (stream error PROTOCOL_ERROR). The header block that
    # starts a request goes through h2fields.request_fields, but `_on_trailers` decodes
    # the trailer block as is (h2's own validation is switched off in __init__), so these
    # reach `request.body.trailers` and are forwarded upstream.
    protocol, conn, server, peer = await connected()
    peer.request(1, method=b"POST", body=b"hello", end=False)
    peer.h2.send_headers(1, trailers, end_stream=True)
    peer.send()
    await settle(protocol)
    peer.receive()
    got = server.requests[0].body.trailers if server.requests else None
    assert peer.responses[1].reset == ErrorCodes.PROTOCOL_ERROR, f"accepted trailers {got!r}"
    assert not conn.closed


async def test_frame_declared_larger_than_max_frame_size_is_refused_before_buffering() -> None:
    # RFC 9113 section 4.2: a frame larger than SETTINGS_MAX_FRAME_SIZE (16384 here) is a
    # FRAME_SIZE_ERROR. h2's FrameBuffer only checks the length once the whole declared
    # frame has arrived, and `feed` passes everything to it: a client that declares a
    # 16 MiB frame and sends 16 MiB - 1 bytes makes us hold all of it per connection
    # (flow control bounds everything else to 4 x initial_window_size). The error is
    # known from the 9-byte frame header alone.
    protocol, conn, _server, peer = await connected()
    header = b"\xff\xff\xff\x00\x00\x00\x00\x00\x01"  # DATA, length 2**24 - 1, stream 1
    protocol.feed(header + b"\x00" * 65536)
    await settle(protocol)
    peer.receive()
    assert peer.goaway is not None, "the oversized frame is still being buffered"
    assert peer.goaway.error_code == ErrorCodes.FRAME_SIZE_ERROR
    assert conn.closed_by == "close"


async def test_response_stalled_on_a_zero_window_has_a_client_deadline() -> None:
    # A client that never opens its window (SETTINGS_INITIAL_WINDOW_SIZE 0 and no
    # WINDOW_UPDATE) holds the stream, its task and the response body forever:
    # `_send_data` waits on `window_waiter` with no deadline, and `_update_phase` keeps
    # the connection BUSY ("no client-side deadline"), so the sweeper never calls
    # on_timeout. HTTP/1.1's equivalent, a client that does not read, is bounded by
    # ClientConnection.drain (WRITE phase, body_timeout, then abort); docs/architecture.md: "no
    # total deadline ... idle timeouts instead". While every stream waits on the client,
    # the connection should carry a deadline (WRITE, body_timeout) like HTTP/1.1.
    protocol, conn, _server, peer = await connected()
    peer.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    peer.request(1)
    peer.send()
    await spin(10)
    peer.receive()
    assert peer.responses[1].status == 200
    assert not peer.responses[1].ended  # the body waits on the client's window
    [stream] = protocol._streams.values()
    assert stream.window_waiter is not None
    assert conn.phase is not ConnectionPhase.BUSY, "no deadline: the stall lasts forever"
    now = asyncio.get_running_loop().time()
    assert conn.deadline <= now + conn.limits.body_timeout


async def test_connection_error_sends_one_goaway() -> None:
    # Low severity. When h2's `receive_data` raises a ProtocolError it has already queued
    # its own GOAWAY (h2 `_terminate_connection`, last_stream_id = the highest stream it
    # parsed); `_terminate` then calls `close_connection` again, which h2 allows in its
    # CLOSED state (the suppress there does not fire), so every connection error writes
    # two GOAWAY frames. RFC 9113 section 6.8 tolerates several (the second never has a
    # higher last_stream_id), but the first can name a stream whose events h2 dropped
    # with the exception, i.e. that we never processed: its last_stream_id is h2's, not
    # `_last_stream_id`. One GOAWAY, with our last_stream_id, is what `_terminate` means.
    protocol, conn, _server, peer = await connected()
    # Parsed by h2 in the same batch as the error, so never processed: its priority keeps
    # it from being read before h2 (`_read_directly`), which would take the stream.
    fields = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")]
    peer.h2.send_headers(1, fields, end_stream=True, priority_weight=16)
    assert await goaways_after_a_bad_frame(protocol, peer) == [(ErrorCodes.PROTOCOL_ERROR, 0)]
    assert conn.closed_by == "close"


async def goaways_after_a_bad_frame(protocol: Http2Protocol, peer: H2Peer) -> list[tuple[int, int]]:
    """Feed what the client queued and, in the same read, DATA on stream 0 (a connection
    error): (error code, last stream id) of each GOAWAY written."""
    data = peer.h2.data_to_send() + b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x"  # DATA, stream 0
    protocol.feed(data)
    await settle(protocol)
    frames = parse_frames(peer.new_output())
    return [(f.error_code, f.last_stream_id) for f in frames if isinstance(f, GoAwayFrame)]


async def test_a_request_taken_before_a_connection_error_is_named_in_the_goaway() -> None:
    # Read directly (`_read_directly`), the request is taken before h2 sees the bad frame
    # after it: the GOAWAY names it, and its exchange is cancelled with the connection.
    protocol, conn, _server, peer = await connected()
    peer.request(1)
    assert await goaways_after_a_bad_frame(protocol, peer) == [(ErrorCodes.PROTOCOL_ERROR, 1)]
    assert conn.closed_by == "close"
    assert protocol.streams_read_directly == 1
    assert not protocol._streams


async def test_a_response_stalled_on_a_shut_window_is_reset_at_its_deadline() -> None:
    # The other half of the zero-window fix: when the deadline passes, the sweeper's
    # on_timeout resets the stalled stream (and the connection lives on).
    protocol, conn, _server, peer = await connected()
    peer.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    peer.request(1)
    peer.send()
    await spin(10)
    [stream] = protocol._streams.values()
    stream.window_deadline = asyncio.get_running_loop().time() - 1  # the deadline passed

    protocol.on_timeout(ConnectionPhase.BODY)
    await settle(protocol)
    peer.receive()

    assert peer.responses[1].reset is not None
    assert not protocol._streams
    assert not conn.closed


# --- found by review ---------------------------------------------------------------------


async def test_a_graceful_client_goaway_lets_the_stream_in_flight_finish() -> None:
    # h2 closes its state machine on any GOAWAY; sending the answer to a stream opened
    # before it then raised, and the client never got it.
    release = asyncio.Event()
    protocol, conn, _server, peer = await connected(handler=blocked(release))
    peer.request(1)
    peer.send()
    await spin()
    goaway = GoAwayFrame(0)
    goaway.last_stream_id = 0
    goaway.error_code = ErrorCodes.NO_ERROR
    protocol.feed(goaway.serialize())
    release.set()
    await settle(protocol)
    peer.receive()

    assert peer.responses[1].status == 200
    assert peer.responses[1].ended
    assert conn.closed_by == "close"  # then, with nothing in flight, the connection closes


async def test_a_request_body_the_exchange_never_reads_gives_its_window_back() -> None:
    # A handler that answers without reading (401, 404, an early upstream answer) left
    # the body's bytes charged to the connection window for good: after 4 x the window
    # of such uploads, every later upload stalled.
    async def refuse(request: Request) -> Response:
        return local_reply(BadRequest("no"), request)

    protocol, _conn, _server, peer = await connected(handler=refuse)
    manager = protocol._h2._inbound_flow_control_window_manager
    available = manager.current_window_size + manager._bytes_processed
    for stream_id in (1, 3, 5):
        peer.request(stream_id, method=b"POST", body=b"x" * 16000)
        peer.send()
        await settle(protocol)
        peer.receive()
        assert peer.responses[stream_id].status == 400

    assert manager.current_window_size + manager._bytes_processed == available


def test_a_connection_window_of_four_times_a_large_stream_window_is_capped() -> None:
    # initial_window_size up to 2^31-1 is valid, but 4x it is not a valid window
    # increment: every HTTP/2 connection failed to start.
    connection = server_connection(Http2Config(initial_window_size=2**30))

    assert connection.inbound_flow_control_window == 2**31 - 1


async def test_a_cached_header_block_is_not_reused_after_the_client_shrinks_the_table() -> None:
    # The HPACK memo replayed an all-indexed block after the client set
    # SETTINGS_HEADER_TABLE_SIZE 0: no size update, entries gone, COMPRESSION_ERROR.
    protocol, _conn, _server, peer = await connected()
    for stream_id in (1, 3, 5):
        peer.request(stream_id, path=b"/same")
        peer.send()
        await settle(protocol)
        peer.receive()
    peer.h2.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0})
    peer.send()
    await settle(protocol)
    peer.receive()
    peer.request(7, path=b"/same")
    peer.send()
    await settle(protocol)
    peer.receive()

    assert peer.responses[7].status == 200
    assert peer.goaway is None
