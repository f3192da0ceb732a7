"""The request HEADERS frames the HTTP/2 front end reads without h2's generic receive path
(`Http2Protocol._read_directly`, `h2compat.open_stream_directly`).

Each scenario is fed whole, where the direct path reads what it may, and byte by byte,
where every frame is partial when it arrives and so goes through h2: the client must see
the same frames either way (per stream, and the connection's own), and the counter
`streams_read_directly` shows which path read the requests. The scenarios put frames h2
must see first around the direct ones (an HPACK table they depend on, a header block in
CONTINUATION frames, PINGs), and the stream ids and header blocks h2 refuses.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytest
from h2.errors import ErrorCodes
from hpack import Decoder, Encoder
from hyperframe.frame import (
    ContinuationFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from proxy.config.model import Http2Config
from proxy.frontend.h2.protocol import Http2Protocol
from tests.support.http2_helpers import (
    H2Peer,
    H2RecordingConnection,
    feed,
    make_h2_protocol,
    parse_frames,
    settle,
)


def fields(path: bytes) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", b"example.com"),
        (b":path", path),
    ]


def headers(
    encoder: Encoder,
    stream_id: int,
    path: bytes = b"/",
    *,
    flags: tuple[str, ...] = ("END_HEADERS", "END_STREAM"),
    block: bytes | None = None,
) -> HeadersFrame:
    frame = HeadersFrame(stream_id, flags=flags)
    frame.data = encoder.encode(fields(path)) if block is None else block
    return frame


def client_preface() -> bytes:
    return b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize()


class Seen:
    """What the client received: each stream's frames (HEADERS decoded to their fields,
    DATA joined), the connection's frames, and the GOAWAY."""

    def __init__(self, output: bytes) -> None:
        decoder = Decoder()
        self.streams: dict[int, list[tuple[Any, ...]]] = defaultdict(list)
        self.connection: list[tuple[str, object]] = []
        self.goaway: tuple[int, int] | None = None
        for frame in parse_frames(output):
            self._add(frame, decoder)

    def _add(self, frame: Frame, decoder: Decoder) -> None:
        if isinstance(frame, GoAwayFrame):
            self.goaway = (frame.error_code, frame.last_stream_id)
        elif isinstance(frame, HeadersFrame):
            decoded = [(n, v) for n, v in decoder.decode(frame.data, raw=True) if n != b"date"]
            self.streams[frame.stream_id].append(("headers", decoded))
        elif isinstance(frame, RstStreamFrame):
            self.streams[frame.stream_id].append(("reset", frame.error_code))
        elif frame.stream_id:
            self.streams[frame.stream_id].append(
                (frame.type, sorted(frame.flags), frame.serialize_body())
            )
        elif isinstance(frame, PingFrame):
            self.connection.append(("ping", bytes(frame.opaque_data)))
        elif isinstance(frame, (SettingsFrame, WindowUpdateFrame)):
            pass  # ours, the same every time: the preface, our window, and SETTINGS acks
        else:
            self.connection.append((type(frame).__name__, frame.serialize_body()))

    def statuses(self) -> dict[int, bytes]:
        return {
            stream_id: dict(frames[0][1])[b":status"]
            for stream_id, frames in self.streams.items()
            if frames and frames[0][0] == "headers"
        }


async def exchange(
    feeds: list[bytes], split: int | None, http2: Http2Config | None = None
) -> tuple[Http2Protocol, H2RecordingConnection, Seen]:
    """Feed the client preface, then each of `feeds` (whole, or in pieces of `split`),
    serving each before the next."""
    protocol, conn, _server = make_h2_protocol(http2=http2)
    feed(protocol, client_preface())
    for frames in feeds:
        feed(protocol, frames, split)
        await settle(protocol)
    return protocol, conn, Seen(bytes(conn.output))


async def both_ways(
    frames: bytes, *later: bytes, http2: Http2Config | None = None
) -> tuple[Seen, int]:
    """`frames` (then each of `later`, once the connection is done with what came
    before) fed whole and byte by byte: what the client saw (the same both ways), and
    how many requests the whole feeds read directly (none are, byte by byte)."""
    whole, _conn, seen = await exchange([frames, *later], None, http2)
    by_byte, _conn, seen_by_byte = await exchange([frames, *later], 1, http2)
    assert seen.streams == seen_by_byte.streams
    assert seen.connection == seen_by_byte.connection
    assert seen.goaway == seen_by_byte.goaway
    assert by_byte.streams_read_directly == 0
    return seen, whole.streams_read_directly


async def test_requests_fed_whole_are_read_directly_and_answered_as_h2_answers_them() -> None:
    encoder = Encoder()
    frames = b"".join(
        headers(encoder, stream_id, b"/%d" % stream_id).serialize() for stream_id in (1, 3, 5)
    )
    seen, direct = await both_ways(frames)
    assert direct == 3
    assert seen.statuses() == {1: b"200", 3: b"200", 5: b"200"}
    assert b'"target": "/3"' in seen.streams[3][1][2]
    assert seen.goaway is None


async def test_frames_before_a_direct_request_reach_h2_first() -> None:
    # The first request goes through h2 (it carries a priority) and adds its fields to the
    # HPACK table; the second is read directly and refers to them; PINGs around both.
    encoder = Encoder()
    with_priority = headers(encoder, 1, b"/same", flags=("END_HEADERS", "END_STREAM", "PRIORITY"))
    with_priority.depends_on, with_priority.stream_weight = 0, 15
    refers_back = headers(encoder, 3, b"/same")
    assert len(refers_back.data) < len(with_priority.data)  # indexed: needs the table
    frames = b"".join(
        [
            PingFrame(0, opaque_data=b"first..."),
            with_priority,
            PingFrame(0, opaque_data=b"second.."),
            refers_back,
            PingFrame(0, opaque_data=b"third..."),
        ][i].serialize()
        for i in range(5)
    )
    seen, direct = await both_ways(frames)
    assert direct == 1
    assert seen.statuses() == {1: b"200", 3: b"200"}
    assert seen.streams[1][1:] == seen.streams[3][1:]  # the same request, answered alike
    assert [data for kind, data in seen.connection if kind == "ping"] == [
        b"first...",
        b"second..",
        b"third...",
    ]


async def test_a_header_block_in_continuation_frames_goes_to_h2_and_the_next_is_direct() -> None:
    encoder = Encoder()
    block = encoder.encode(fields(b"/split"))
    frames = b"".join(
        [
            HeadersFrame(1, data=block[:3], flags=("END_STREAM",)).serialize(),
            ContinuationFrame(1, data=block[3:], flags=("END_HEADERS",)).serialize(),
            headers(encoder, 3, b"/after").serialize(),
        ]
    )
    seen, direct = await both_ways(frames)
    assert direct == 1
    assert seen.statuses() == {1: b"200", 3: b"200"}


async def test_a_frame_interrupting_a_header_block_is_h2s_connection_error() -> None:
    encoder = Encoder()
    block = encoder.encode(fields(b"/split"))
    frames = (
        HeadersFrame(1, data=block, flags=("END_STREAM",)).serialize()
        + headers(encoder, 3).serialize()  # not the CONTINUATION h2 waits for
    )
    seen, direct = await both_ways(frames)
    assert direct == 0
    assert seen.goaway == (ErrorCodes.PROTOCOL_ERROR, 0)
    assert not seen.streams


@pytest.mark.parametrize(
    "later_id",
    [
        1,  # reused: its stream has ended
        3,  # below the highest stream id taken (5)
        6,  # even: a server's stream id
    ],
)
async def test_a_stream_id_not_new_is_left_to_h2(later_id: int) -> None:
    encoder = Encoder()
    frames = headers(encoder, 1).serialize() + headers(encoder, 5).serialize()
    seen, direct = await both_ways(frames, headers(encoder, later_id).serialize())
    assert direct == 2
    assert seen.statuses() == {1: b"200", 5: b"200"}
    assert seen.goaway is not None
    assert seen.goaway[1] == 5


@pytest.mark.parametrize(
    ("block", "code"),
    [
        (b"\xff\xff\xff\xff\xff\xff", ErrorCodes.PROTOCOL_ERROR),  # an integer without end
        (b"\xbf\x7f", ErrorCodes.PROTOCOL_ERROR),  # a table index nothing is at
    ],
)
async def test_a_header_block_that_does_not_decode_is_a_connection_error(
    block: bytes, code: ErrorCodes
) -> None:
    encoder = Encoder()
    seen, direct = await both_ways(
        headers(encoder, 1).serialize(), headers(encoder, 3, block=block).serialize()
    )
    assert direct == 1
    assert seen.statuses() == {1: b"200"}
    assert seen.goaway == (code, 1)


async def test_a_header_block_past_the_hard_cap_is_a_connection_error() -> None:
    http2 = Http2Config(max_header_list_size=1000)  # h2 gives up at 4x
    encoder = Encoder()
    big = [*fields(b"/"), (b"x-big", b"v" * 5000)]
    frames = HeadersFrame(1, data=encoder.encode(big), flags=("END_HEADERS", "END_STREAM"))
    seen, _direct = await both_ways(frames.serialize(), http2=http2)
    assert seen.goaway == (ErrorCodes.ENHANCE_YOUR_CALM, 0)
    assert not seen.streams


async def test_streams_past_max_concurrent_in_one_feed_are_refused_as_through_h2() -> None:
    http2 = Http2Config(max_concurrent_streams=2)
    encoder = Encoder()
    # The echo handler answers in a task: all three are in flight when the third opens.
    frames = b"".join(headers(encoder, stream_id).serialize() for stream_id in (1, 3, 5))
    seen, direct = await both_ways(frames, http2=http2)
    assert direct == 3
    assert seen.statuses() == {1: b"200", 3: b"200"}
    assert seen.streams[5] == [("reset", ErrorCodes.REFUSED_STREAM)]


async def test_many_streams_over_time_are_answered_and_h2_forgets_the_ended_ones() -> None:
    http2 = Http2Config(max_concurrent_streams=3)  # h2 counts up to 6 open streams
    protocol, conn, _server = make_h2_protocol(http2=http2)
    peer = H2Peer(protocol, conn)
    peer.send()
    for stream_id in range(1, 80, 2):
        peer.request(stream_id, path=b"/%d" % stream_id)
        peer.send()
        await settle(protocol)
        peer.receive()
        assert peer.responses[stream_id].status == 200
        # The direct path leaves closed streams in h2's table until h2 next counts them
        # (when the table reaches its limit, the next HEADERS goes through h2).
        assert len(protocol._h2.streams) <= 6
    # Most were read directly; every sixth or so went through h2, which pruned.
    assert 30 <= protocol.streams_read_directly < 40
    assert peer.goaway is None
