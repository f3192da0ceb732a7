"""proxy/websocket/protocol.py: the handshake's key and accept values, the Upgrade field check, the
1001 close frame, and above all `FrameScanner`, which must find every frame boundary of a
byte stream however it is cut into chunks. Frames are serialized (and the close frame parsed
back) by wsproto, so the scanner is checked against an independent implementation of
RFC 6455 section 5.2."""

from __future__ import annotations

import base64
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto import frame_protocol
from wsproto.frame_protocol import CloseReason, FrameProtocol, Opcode
from wsproto.utilities import generate_accept_token

from proxy.websocket.protocol import (
    GOING_AWAY,
    FrameScanner,
    accept_value,
    close_frame,
    is_websocket,
    new_key,
)

# Hypothesis' failure explanation imports mypy_extensions, whose DeprecationWarning would turn a
# failing example into an INTERNALERROR under `filterwarnings = ["error"]`.
pytestmark = pytest.mark.filterwarnings(
    "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"
)

# RFC 6455 section 5.2: a 7-bit length up to 125, 126 for a 16-bit length, 127 for 64 bits.
EDGE_SIZES = [0, 1, 125, 126, 127, 65535, 65536, 70_001]
DATA_SIZES = st.sampled_from(EDGE_SIZES) | st.integers(0, 300)
SMALL_DATA_SIZES = st.sampled_from([0, 1, 125, 126, 127]) | st.integers(0, 300)
CONTROL_SIZES = st.sampled_from([0, 1, 124, 125]) | st.integers(0, 125)  # section 5.5
CLOSE_CODES = st.sampled_from([None, 1000, 1001, 1008, 1011, 3000, 4999])
MAX_HEADER_BYTES = 14  # 2 + 8 (64-bit length) + 4 (masking key)

PROPERTY = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- accept_value and new_key (RFC 6455 section 4) ---


def test_accept_value_matches_the_rfc_6455_example() -> None:
    # RFC 6455 section 1.3 (and section 4.2.2 step 5.4).
    assert accept_value(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_accept_value_ignores_whitespace_around_the_key() -> None:
    assert accept_value(b" dGhlIHNhbXBsZSBub25jZQ==\t") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@given(key=st.binary(min_size=16, max_size=16).map(base64.b64encode))
def test_accept_value_agrees_with_wsproto(key: bytes) -> None:
    assert accept_value(key) == generate_accept_token(key)


def test_new_key_is_16_random_bytes_in_base64() -> None:
    key = new_key()

    assert len(key) == 24
    assert len(base64.b64decode(key, validate=True)) == 16


def test_new_key_is_different_each_call() -> None:
    keys = {new_key() for _ in range(64)}

    assert len(keys) == 64


def test_the_accept_value_of_a_new_key_is_a_20_byte_sha1_in_base64() -> None:
    accept = accept_value(new_key())

    assert len(base64.b64decode(accept, validate=True)) == 20


# --- is_websocket (RFC 9110 section 7.8) ---


@pytest.mark.parametrize(
    "upgrade",
    [
        "websocket",
        "WebSocket",
        "WEBSOCKET",
        b"websocket",
        b"WebSocket",
        "websocket/13",
        b"WebSocket/13",
        " websocket ",
        "h2c, websocket",
        "h2c,websocket",
        b"TLS/1.0, WebSocket/13, h2c",
        "websocket, h2c",
        "\twebsocket\t",
    ],
)
def test_is_websocket_finds_websocket_in_an_upgrade_value(upgrade: bytes | str) -> None:
    assert is_websocket(upgrade) is True


@pytest.mark.parametrize(
    "upgrade",
    [
        None,
        "",
        b"",
        "h2c",
        b"h2c",
        "TLS/1.0, h2c",
        "websockets",
        "web socket",
        "xwebsocket",
        "websocket-ish",
        "13/websocket",
        ",",
        " ",
    ],
)
def test_is_websocket_is_false_without_a_websocket_token(upgrade: bytes | str | None) -> None:
    assert is_websocket(upgrade) is False


# --- close_frame ---


def parse_frames(data: bytes, *, masked: bool) -> list[tuple[Opcode, object, bool]]:
    """(opcode, payload, fin) of each frame in `data`, as wsproto reads them on the side
    that receives `masked` frames (a server receives a client's masked frames)."""
    receiver = FrameProtocol(client=not masked, extensions=[])
    receiver.receive_bytes(data)
    return [
        (frame.opcode, frame.payload, frame.frame_finished) for frame in receiver.received_frames()
    ]


@pytest.mark.parametrize("masked", [True, False])
def test_close_frame_parses_back_as_a_close_with_its_code_and_reason(masked: bool) -> None:
    frame = close_frame(GOING_AWAY, "going away", masked=masked)

    assert parse_frames(frame, masked=masked) == [
        (Opcode.CLOSE, (CloseReason.GOING_AWAY, "going away"), True)
    ]


@pytest.mark.parametrize("masked", [True, False])
def test_close_frame_sets_the_mask_bit_only_when_masked(masked: bool) -> None:
    frame = close_frame(GOING_AWAY, "going away", masked=masked)

    assert frame[0] == 0x88  # FIN, opcode 0x8
    assert bool(frame[1] & 0x80) is masked
    assert len(frame) == 2 + 4 * masked + 2 + len("going away")


def test_an_unmasked_close_frame_is_exactly_the_rfc_6455_bytes() -> None:
    # RFC 6455 section 5.5.1: a 2-byte big-endian code, then the UTF-8 reason.
    assert close_frame(GOING_AWAY, "going away", masked=False) == b"\x88\x0c\x03\xe9going away"


def test_masked_close_frames_use_a_fresh_masking_key() -> None:
    keys = {close_frame(GOING_AWAY, "going away", masked=True)[2:6] for _ in range(16)}

    assert len(keys) > 1


@pytest.mark.parametrize("masked", [True, False])
def test_a_close_frame_is_one_whole_frame_to_the_scanner(masked: bool) -> None:
    scanner = FrameScanner()

    scanner.feed(close_frame(GOING_AWAY, "going away", masked=masked))

    assert scanner.at_boundary
    assert scanner.close_seen
    assert not scanner.lost


# --- FrameScanner: streams of frames serialized by wsproto ---


@dataclass(frozen=True, slots=True)
class Stream:
    """Frames back to back: the bytes, where each frame starts and ends, where each
    header ends, and where the header of the first close frame ends (None without one)."""

    data: bytes
    boundaries: tuple[int, ...]  # 0, then the end of each frame
    header_ends: tuple[int, ...]  # one per frame
    close_header_end: int | None

    def next_boundary(self, position: int) -> int:
        return min(boundary for boundary in self.boundaries if boundary >= position)

    def close_seen_after(self, fed: int) -> bool:
        return self.close_header_end is not None and fed >= self.close_header_end


def header_size(payload_bytes: int, *, masked: bool) -> int:
    """RFC 6455 section 5.2, written out independently of the code under test."""
    if payload_bytes <= 125:
        extended = 0
    elif payload_bytes <= 0xFFFF:
        extended = 2
    else:
        extended = 8
    return 2 + extended + 4 * masked


def payload(draw: st.DrawFn, size: int) -> bytes:
    """`size` bytes: drawn outright when small, else a drawn pattern repeated (payloads that
    look like frame headers are the interesting ones, so a pattern may well be one)."""
    if size <= 300:
        return draw(st.binary(min_size=size, max_size=size))
    pattern = draw(st.binary(min_size=1, max_size=16) | st.sampled_from([b"\x81\x7f", b"\x88"]))
    return (pattern * (size // len(pattern) + 1))[:size]


def serialize(draw: st.DrawFn, make: Callable[[], bytearray]) -> bytes:
    """`make()` (a FrameProtocol call) with the masking key drawn rather than taken from
    os.urandom, so that an example replays to the same bytes (and shrinks, to key 0)."""
    key = draw(st.binary(min_size=4, max_size=4))
    with mock.patch.object(frame_protocol, "os", SimpleNamespace(urandom=lambda _: key)):
        return bytes(make())


@st.composite
def streams(draw: st.DrawFn, data_sizes: st.SearchStrategy[int] = DATA_SIZES) -> Stream:
    """Messages (text or binary, in 1 to 3 fragments: continuation frames, with control
    frames between fragments sometimes), pings, pongs and closes, all masked (a client's)
    or all unmasked (a server's)."""
    masked = draw(st.booleans())
    sender = FrameProtocol(client=masked, extensions=[])
    frames: list[tuple[bytes, int, bool]] = []  # (wire bytes, payload bytes, is close)

    def add(make: Callable[[], bytearray], payload_bytes: int, *, is_close: bool = False) -> None:
        wire = serialize(draw, make)
        assert len(wire) == header_size(payload_bytes, masked=masked) + payload_bytes
        frames.append((wire, payload_bytes, is_close))

    def add_control(kind: str) -> None:
        if kind == "close":
            code = draw(CLOSE_CODES)
            reason = None if code is None else draw(st.text("abc é", max_size=40))
            size = 0 if code is None else 2 + len((reason or "").encode())
            add(partial(sender.close, code, reason), size, is_close=True)
            return
        body = payload(draw, draw(CONTROL_SIZES))
        control = sender.ping if kind == "ping" else sender.pong
        add(partial(control, body), len(body))

    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["text", "binary", "ping", "pong", "close"]))
        if kind in ("ping", "pong", "close"):
            add_control(kind)
            continue
        fragments = draw(st.lists(data_sizes, min_size=1, max_size=3))
        for index, size in enumerate(fragments):
            body = payload(draw, size)
            last = index == len(fragments) - 1
            # (Text in ASCII, so that `size` characters are `size` bytes.)
            message = bytes(byte & 0x7F for byte in body).decode() if kind == "text" else body
            add(partial(sender.send_data, message, fin=last), size)
            if not last and draw(st.booleans()):
                add_control(draw(st.sampled_from(["ping", "pong"])))

    boundaries = [0]
    header_ends: list[int] = []
    for wire, payload_bytes, _ in frames:
        header_ends.append(boundaries[-1] + len(wire) - payload_bytes)
        boundaries.append(boundaries[-1] + len(wire))
    closes = [end for end, (_, _, is_close) in zip(header_ends, frames, strict=True) if is_close]
    return Stream(
        data=b"".join(wire for wire, _, _ in frames),
        boundaries=tuple(boundaries),
        header_ends=tuple(header_ends),
        close_header_end=closes[0] if closes else None,
    )


@st.composite
def positions(draw: st.DrawFn, stream: Stream, low: int = 0) -> int:
    """A position in `stream.data` (>= `low`): inside a header, near a boundary, or
    anywhere."""
    total = len(stream.data)
    starts = stream.boundaries[:-1]
    frames = st.sampled_from(list(zip(starts, stream.header_ends, strict=True)))
    in_header = frames.flatmap(lambda span: st.integers(span[0], span[1]))
    near = st.builds(
        lambda boundary, delta: boundary + delta,
        st.sampled_from(stream.boundaries),
        st.integers(-MAX_HEADER_BYTES - 1, MAX_HEADER_BYTES + 1),
    )
    return min(max(draw(in_header | near | st.integers(0, total)), low), total)


@st.composite
def chunked_streams(
    draw: st.DrawFn, data_sizes: st.SearchStrategy[int] = DATA_SIZES
) -> tuple[Stream, list[int]]:
    """A stream and the cut points (sorted; repeats give empty chunks) to feed it in."""
    stream = draw(streams(data_sizes))
    cuts = sorted(draw(st.lists(positions(stream), max_size=12)))
    return stream, cuts


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *cuts, len(data)]
    return [data[start:end] for start, end in itertools.pairwise(edges)]


def state(scanner: FrameScanner) -> dict[str, bool]:
    """What a scanner tells its tunnel (FrameScanner has no __repr__)."""
    return {
        "at_boundary": scanner.at_boundary,
        "close_seen": scanner.close_seen,
        "lost": scanner.lost,
    }


def assert_scanner_at(scanner: FrameScanner, stream: Stream, fed: int) -> None:
    assert scanner.at_boundary is (fed in stream.boundaries), fed
    assert scanner.close_seen is stream.close_seen_after(fed), fed
    assert scanner.lost is False


@PROPERTY
@given(chunked=chunked_streams())
def test_scanner_is_at_a_boundary_exactly_where_a_frame_ends(
    chunked: tuple[Stream, list[int]],
) -> None:
    stream, cuts = chunked
    scanner = FrameScanner()
    fed = 0

    for chunk in chunks(stream.data, cuts):
        scanner.feed(chunk)
        fed += len(chunk)
        assert_scanner_at(scanner, stream, fed)

    assert fed == len(stream.data)
    assert scanner.at_boundary


@PROPERTY
@given(stream=streams(SMALL_DATA_SIZES))
def test_scanner_fed_byte_by_byte_is_at_a_boundary_exactly_where_a_frame_ends(
    stream: Stream,
) -> None:
    scanner = FrameScanner()

    for fed in range(1, len(stream.data) + 1):
        scanner.feed(stream.data[fed - 1 : fed])
        assert_scanner_at(scanner, stream, fed)


@PROPERTY
@given(stream=streams())
def test_scanner_fed_a_whole_stream_at_once_ends_at_a_boundary(stream: Stream) -> None:
    scanner = FrameScanner()

    scanner.feed(stream.data)

    assert_scanner_at(scanner, stream, len(stream.data))


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("size", EDGE_SIZES)
def test_a_header_cut_at_every_byte_is_still_read(size: int, masked: bool) -> None:
    frame = bytes(FrameProtocol(client=masked, extensions=[]).send_data(b"\x81" * size))
    header = header_size(size, masked=masked)

    for cut in range(1, header + 1):
        scanner = FrameScanner()
        for byte in range(cut):
            scanner.feed(frame[byte : byte + 1])
            assert scanner.at_boundary is (size == 0 and byte == header - 1), (cut, byte)
        scanner.feed(frame[cut:-1] if size else frame[cut:])
        assert scanner.at_boundary is (size == 0), cut
        scanner.feed(frame[-1:] if size else b"")
        assert scanner.at_boundary, cut


@PROPERTY
@given(data=st.data())
def test_split_cuts_a_chunk_at_the_next_frame_boundary(data: st.DataObject) -> None:
    stream = data.draw(streams())
    start = data.draw(positions(stream))
    end = data.draw(positions(stream, low=start))
    scanner = FrameScanner()
    scanner.feed(stream.data[:start])
    boundary = stream.next_boundary(start)

    before, after = scanner.split(stream.data[start:end])

    if boundary <= end:
        assert (before, after) == (stream.data[start:boundary], stream.data[boundary:end])
        assert_scanner_at(scanner, stream, boundary)
    else:
        assert (before, after) == (stream.data[start:end], b"")
        assert_scanner_at(scanner, stream, end)
    # The scanner goes on from where `split` left it.
    scanner.feed(after)
    assert_scanner_at(scanner, stream, end)
    scanner.feed(stream.data[end:])
    assert_scanner_at(scanner, stream, len(stream.data))


@pytest.mark.parametrize("masked", [True, False])
def test_split_walks_a_stream_frame_by_frame(masked: bool) -> None:
    sender = FrameProtocol(client=masked, extensions=[])
    frames = [
        bytes(sender.send_data(b"a" * size, fin=True)) for size in (0, 125, 126, 65535, 65536)
    ] + [bytes(sender.ping(b"p")), bytes(sender.close(1000, "bye"))]
    rest = b"".join(frames)
    scanner = FrameScanner()
    walked: list[bytes] = []

    while rest:
        first = rest[:1]  # fed first, so that the scanner is inside a frame
        scanner.feed(first)
        before, rest = scanner.split(rest[1:])
        assert scanner.at_boundary
        walked.append(first + before)

    assert walked == frames
    assert scanner.close_seen


def test_split_at_a_boundary_leaves_everything_for_after() -> None:
    scanner = FrameScanner()
    frame = bytes(FrameProtocol(client=False, extensions=[]).send_data(b"hi"))

    assert scanner.split(frame) == (b"", frame)
    assert scanner.at_boundary


def test_split_with_a_header_still_incomplete_takes_the_whole_chunk() -> None:
    frame = bytes(FrameProtocol(client=True, extensions=[]).send_data(b"x" * 70_000))
    scanner = FrameScanner()
    scanner.feed(frame[:1])

    assert scanner.split(frame[1:5]) == (frame[1:5], b"")  # 14 header bytes: 5 are here
    assert not scanner.at_boundary
    assert scanner.split(frame[5:] + b"next") == (frame[5:], b"next")
    assert scanner.at_boundary


def test_close_seen_waits_for_the_whole_close_header() -> None:
    frame = close_frame(GOING_AWAY, "going away", masked=True)  # header: 2 + 4 mask bytes
    scanner = FrameScanner()

    scanner.feed(frame[:5])
    assert state(scanner) == {"at_boundary": False, "close_seen": False, "lost": False}
    scanner.feed(frame[5:6])
    assert state(scanner) == {"at_boundary": False, "close_seen": True, "lost": False}


# --- FrameScanner: not WebSocket any more ---

RESERVED_OPCODES = [0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF]


@pytest.mark.parametrize("opcode", RESERVED_OPCODES)
def test_a_reserved_opcode_marks_the_scanner_lost(opcode: int) -> None:
    scanner = FrameScanner()

    scanner.feed(bytes([0x80 | opcode, 0x00]))

    assert scanner.lost
    assert not scanner.at_boundary


@pytest.mark.parametrize("opcode", [0x0, 0x1, 0x2, 0x8, 0x9, 0xA])
def test_a_defined_opcode_does_not_mark_the_scanner_lost(opcode: int) -> None:
    scanner = FrameScanner()

    scanner.feed(bytes([0x80 | opcode, 0x00]))

    assert not scanner.lost
    assert scanner.at_boundary


def test_a_reserved_opcode_after_valid_frames_and_split_across_chunks_is_found() -> None:
    valid = bytes(FrameProtocol(client=True, extensions=[]).send_data(b"hello"))
    scanner = FrameScanner()

    scanner.feed(valid + b"\x83")  # FIN + opcode 0x3; the length byte is yet to come
    assert state(scanner) == {"at_boundary": False, "close_seen": False, "lost": False}
    scanner.feed(b"\x80abcd")  # masked, empty
    assert state(scanner) == {"at_boundary": False, "close_seen": False, "lost": True}


def test_a_lost_scanner_stays_lost() -> None:
    scanner = FrameScanner()
    scanner.feed(b"\x83\x00")

    scanner.feed(bytes(FrameProtocol(client=False, extensions=[]).send_data(b"fine")))

    assert scanner.lost
    assert not scanner.at_boundary


@pytest.mark.parametrize("data", [b"", b"x", b"\x81\x00\x81\x00"])
def test_split_on_a_lost_scanner_gives_all_of_the_data_first(data: bytes) -> None:
    scanner = FrameScanner()
    scanner.feed(b"\x83\x00")

    assert scanner.split(data) == (data, b"")
    assert scanner.lost
