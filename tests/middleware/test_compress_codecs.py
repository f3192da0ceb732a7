"""The codings and the compressing body (middleware/compress_codecs.py): what each coding
makes decodes with that coding's own library, piece by piece as it is flushed, and the
body keeps the bounds of a `Body` (backpressure both ways, a client leaving, a failing
upstream)."""

from __future__ import annotations

import asyncio
import random
import zlib
from collections.abc import Callable

import brotli
import pytest
import zstandard

from middleware.compress_codecs import BROTLI_WINDOW_BITS, Coding, CompressedBody
from proxy.core.body import BODY_HIGH_WATER_BYTES, Body
from proxy.core.errors import InternalError, UpstreamReset

CODINGS = ["gzip", "br", "zstd"]
TEXT = b"".join(b"event %06d: something happened somewhere\n" % i for i in range(5000))


def decoder(coding: str) -> Callable[[bytes], bytes]:
    if coding == "gzip":
        return zlib.decompressobj(31).decompress
    if coding == "br":
        return brotli.Decompressor().process  # type: ignore[no-any-return]
    return zstandard.ZstdDecompressor().decompressobj().decompress


async def read_all(body: Body) -> bytes:
    parts = []
    while part := await body.read():
        parts.append(part)
    return b"".join(parts)


@pytest.mark.parametrize("coding", CODINGS)
def test_whole_bodies_decode(coding: str) -> None:
    compressed = Coding(coding, 5).whole(TEXT)
    assert len(compressed) < len(TEXT) // 10
    assert decoder(coding)(compressed) == TEXT


@pytest.mark.parametrize("coding", CODINGS)
def test_every_piece_of_a_stream_decodes_as_soon_as_it_is_made(coding: str) -> None:
    stream = Coding(coding, 5).stream()
    decode = decoder(coding)
    pieces = [TEXT[i : i + 1000] for i in range(0, 20_000, 1000)] + [b"x", b"\n"]
    for piece in pieces:
        assert decode(stream.piece(piece)) == piece
    assert decode(stream.end()) == b""


def test_the_windows_are_bounded() -> None:
    """A Brotli stream's window is 1 MiB (WBITS, in its first bits: RFC 7932 section
    9.1); zstd's, at the highest level allowed, the 8 MiB every HTTP client must accept
    (RFC 9659 section 3)."""
    stream = Coding("br", 11).stream()
    first = (stream.piece(TEXT) + stream.end())[0]
    assert first & 1
    assert 17 + ((first >> 1) & 7) == BROTLI_WINDOW_BITS == 20
    stream = Coding("zstd", 19).stream()
    frame = stream.piece(TEXT * 40) + stream.end()
    assert zstandard.get_frame_parameters(frame).window_size <= 8 * 1024 * 1024


@pytest.mark.parametrize("coding", CODINGS)
async def test_a_compressed_body_streams_the_source_and_counts_as_it_goes(coding: str) -> None:
    counted_in: list[float] = []
    counted_out: list[float] = []
    source = Body(None)
    compressed = CompressedBody(
        source, Coding(coding, 3).stream(), counted_in.append, counted_out.append
    )
    decode = decoder(coding)
    sent = 0
    for i in range(0, 40_000, 10_000):
        source.feed(TEXT[i : i + 10_000])
        # the client's read gets all that was fed, decodable, before any more is fed
        piece = await compressed.body.read_joined(10**6)
        assert decode(piece) == TEXT[i : i + 10_000]
        sent += len(piece)
        assert (sum(counted_in), sum(counted_out)) == (i + 10_000, sent)
    source.feed_eof([("grpc-status", "0")])
    end = await read_all(compressed.body)
    assert decode(end) == b""
    assert compressed.body.trailers == [("grpc-status", "0")]
    assert (sum(counted_in), sum(counted_out)) == (40_000, sent + len(end))


async def test_a_failing_source_fails_the_compressed_body_alike() -> None:
    source = Body(None)
    compressed = CompressedBody(source, Coding("gzip", 1).stream())
    source.feed(TEXT[:1000])
    assert await compressed.body.read()
    error = UpstreamReset()
    source.fail(error)
    with pytest.raises(UpstreamReset) as raised:
        await compressed.body.read()
    assert raised.value is error


async def test_a_client_leaving_before_reading_lets_the_source_go() -> None:
    abandoned: list[bool] = []
    source = Body(None)
    source.on_abandon = lambda: abandoned.append(True)
    compressed = CompressedBody(source, Coding("gzip", 1).stream())
    compressed.body.discard()
    assert abandoned == [True]


async def test_a_client_leaving_mid_stream_stops_the_task_and_lets_the_source_go() -> None:
    abandoned: list[bool] = []
    source = Body(None)
    source.on_abandon = lambda: abandoned.append(True)
    compressed = CompressedBody(source, Coding("br", 4).stream())
    source.feed(TEXT[:1000])
    assert await compressed.body.read()  # the task is waiting for the source now
    task = compressed._task
    assert task is not None
    compressed.body.discard()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert abandoned == [True]


async def test_a_client_that_does_not_read_pauses_the_source() -> None:
    """Incompressible bytes: the compressed body fills up to its high watermark, the task
    stops reading, the source fills up and pauses its producer (the upstream's socket);
    reading again resumes both."""
    paused: list[str] = []
    source = Body(
        None, on_pause=lambda: paused.append("pause"), on_resume=lambda: paused.append("resume")
    )
    compressed = CompressedBody(source, Coding("gzip", 1).stream())
    noise = random.Random(7).randbytes(4 * BODY_HIGH_WATER_BYTES)
    first = asyncio.ensure_future(compressed.body.read())
    fed = 0
    while fed < len(noise) and not paused:
        source.feed(noise[fed : fed + 32 * 1024])
        fed += 32 * 1024
        for _ in range(3):  # let the task take what was fed (event order, not time)
            await asyncio.sleep(0)
    assert paused == ["pause"]
    assert fed < len(noise)  # the source paused before everything was fed
    # What the client has not read is bounded: the compressed body's buffer, one piece.
    waiting = compressed.body.bytes_fed - compressed.body.bytes_read
    assert waiting <= BODY_HIGH_WATER_BYTES + 64 * 1024 + 1024
    source.feed(noise[fed:])
    source.feed_eof()
    received = await first + await read_all(compressed.body)
    assert paused == ["pause", "resume"]
    assert zlib.decompress(received, 31) == noise


class _FailingStream:
    """A compressor that fails (none of the real ones can be made to, from outside)."""

    def piece(self, data: bytes) -> bytes:
        raise ValueError("compressor state corrupted")

    def end(self) -> bytes:
        return b""


async def test_a_compressor_that_fails_fails_the_body_as_a_500_and_lets_the_source_go(
    caplog: pytest.LogCaptureFixture,
) -> None:
    abandoned: list[bool] = []
    source = Body(None)
    source.on_abandon = lambda: abandoned.append(True)
    compressed = CompressedBody(source, _FailingStream())
    source.feed(TEXT[:100])
    with pytest.raises(InternalError):
        await compressed.body.read()
    assert abandoned == [True]
    assert "compressing a response body failed" in caplog.text
