"""The three content codings `compress` produces, gzip (zlib, in the standard library),
Brotli (Google's `brotli`) and zstd (`zstandard`), and the body that streams a response
through one of them.

Each coding makes a whole body at once (`Coding.whole`, for a body that had arrived in
full) or a stream (`Coding.stream`), which turns every piece it is given into output
flushed to a byte boundary (zlib's Z_SYNC_FLUSH, Brotli's flush, zstd's end of block), so
the client can decode all it has been sent: an event of a server-sent stream reaches the
client when the upstream sends it, at the price of a few bytes per flush.

`CompressedBody` is the response body the client gets: a task of its own reads the
upstream's body, one read at a time (the chunks already waiting, joined up to 64 KiB),
and feeds the compressed output on. Its buffer is the bounded one of every `Body`: a
client that reads slowly pauses the task, which stops reading the upstream's body, which
stops reading the upstream's socket. A client that goes away cancels the task, and the
upstream's body is discarded (its connection is not reused). It counts the bytes it
reads and those it feeds on, piece by piece, with the counters it is given (the
middleware's gatehouse_compress_bytes_total), so a long stream shows as it goes.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import zlib
from collections.abc import Callable
from typing import Any, Protocol

from proxy import Body, InternalError, ProxyError

log = logging.getLogger(__name__)

# What each coding needs beyond the standard library, for the config error when it is
# missing: coding -> (module, the pip package).
LIBRARIES = {"br": ("brotli", "brotli"), "zstd": ("zstandard", "zstandard")}
# The levels each coding takes. zstd stops at 19: the levels above need windows larger
# than the 8 MiB an HTTP client must accept (RFC 9659 section 3).
LEVELS = {"gzip": (1, 9), "br": (0, 11), "zstd": (1, 19)}
DEFAULT_LEVELS = {"gzip": 6, "br": 4, "zstd": 3}
# Brotli's window: 1 MiB (the library's default is 4 MiB), as the memory a stream holds.
BROTLI_WINDOW_BITS = 20
# Bodies that have arrived whole are compressed at once up to this size; larger ones are
# streamed, in pieces of at most this size, so no single step holds the event loop long.
WHOLE_BYTES = 64 * 1024


class Stream(Protocol):
    """One body being compressed."""

    def piece(self, data: bytes) -> bytes:
        """`data` compressed, flushed so that everything so far can be decoded."""
        ...

    def end(self) -> bytes:
        """The end of the compressed stream."""
        ...


class Coding:
    """One content coding at one level: its name, as Content-Encoding says it."""

    __slots__ = ("_module", "_zstd_whole", "level", "name")

    def __init__(self, name: str, level: int) -> None:
        self.name = name
        self.level = level
        self._module: Any = None
        self._zstd_whole: Any = None
        if name in LIBRARIES:
            self._module = importlib.import_module(LIBRARIES[name][0])  # ImportError: the caller's
        if name == "zstd":
            # One context for every whole body (each is compressed in one call, on the
            # loop's thread): making a context per body cost more than compressing 1 KiB.
            self._zstd_whole = self._module.ZstdCompressor(level=level)

    def whole(self, data: bytes) -> bytes:
        """`data` as one compressed body."""
        if self.name == "gzip":
            return zlib.compress(data, self.level, wbits=31)
        if self.name == "br":
            return bytes(self._module.compress(data, quality=self.level, lgwin=BROTLI_WINDOW_BITS))
        return bytes(self._zstd_whole.compress(data))

    def stream(self) -> Stream:
        """A new stream of this coding."""
        if self.name == "gzip":
            return _GzipStream(self.level)
        if self.name == "br":
            return _BrotliStream(self._module, self.level)
        return _ZstdStream(self._module, self.level)


class _GzipStream:
    __slots__ = ("_compressor",)

    def __init__(self, level: int) -> None:
        self._compressor = zlib.compressobj(level, zlib.DEFLATED, 31)  # 31: gzip framing

    def piece(self, data: bytes) -> bytes:
        compressor = self._compressor
        return compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)

    def end(self) -> bytes:
        return self._compressor.flush(zlib.Z_FINISH)


class _BrotliStream:
    __slots__ = ("_compressor",)

    def __init__(self, brotli: Any, quality: int) -> None:
        self._compressor = brotli.Compressor(quality=quality, lgwin=BROTLI_WINDOW_BITS)

    def piece(self, data: bytes) -> bytes:
        compressor = self._compressor
        return bytes(compressor.process(data)) + bytes(compressor.flush())

    def end(self) -> bytes:
        return bytes(self._compressor.finish())


class _ZstdStream:
    __slots__ = ("_compressor", "_flush_block")

    def __init__(self, zstandard: Any, level: int) -> None:
        self._compressor = zstandard.ZstdCompressor(level=level).compressobj()
        self._flush_block = zstandard.COMPRESSOBJ_FLUSH_BLOCK

    def piece(self, data: bytes) -> bytes:
        compressor = self._compressor
        return bytes(compressor.compress(data)) + bytes(compressor.flush(self._flush_block))

    def end(self) -> bytes:
        return bytes(self._compressor.flush())


# Running compression tasks: the loop keeps only weak references to tasks.
_RUNNING: set[asyncio.Task[None]] = set()


def _uncounted(_size: float) -> None:
    """A byte counter that counts nowhere."""


class CompressedBody:
    """Streams `source` through `stream` into `body` (a `Body` with no declared length),
    from the client's first read on; `count_in` is given the size of each piece read,
    `count_out` of each piece fed on."""

    __slots__ = (
        "_count_in",
        "_count_out",
        "_paused",
        "_resumed",
        "_source",
        "_stream",
        "_task",
        "body",
    )

    def __init__(
        self,
        source: Body,
        stream: Stream,
        count_in: Callable[[float], None] = _uncounted,
        count_out: Callable[[float], None] = _uncounted,
    ) -> None:
        self._source = source
        self._stream = stream
        self._count_in = count_in
        self._count_out = count_out
        self._task: asyncio.Task[None] | None = None
        self._paused = False
        self._resumed: asyncio.Future[None] | None = None
        body = Body(None, on_pause=self._pause, on_resume=self._resume, on_first_read=self._start)
        body.on_abandon = self._abandon
        self.body = body

    def _start(self) -> None:
        task = asyncio.get_running_loop().create_task(self._run())
        self._task = task
        _RUNNING.add(task)
        task.add_done_callback(_RUNNING.discard)

    async def _run(self) -> None:
        source, stream, body = self._source, self._stream, self.body
        count_in, count_out = self._count_in, self._count_out
        try:
            while data := await source.read_joined(WHOLE_BYTES):
                compressed = stream.piece(data)
                count_in(len(data))
                if compressed:
                    count_out(len(compressed))
                    body.feed(compressed)
                if self._paused:
                    self._resumed = asyncio.get_running_loop().create_future()
                    try:
                        await self._resumed
                    finally:
                        self._resumed = None
            end = stream.end()
            count_out(len(end))
            body.feed(end)
            body.feed_eof(source.trailers)
        except ProxyError as exc:  # the upstream's body failed: the client's fails alike
            body.fail(exc)
        except asyncio.CancelledError:
            source.discard()
            raise
        except Exception:
            log.exception("compressing a response body failed")
            source.discard()
            body.fail(InternalError("compressing the response failed"))

    def _pause(self) -> None:
        self._paused = True

    def _resume(self) -> None:
        self._paused = False
        resumed = self._resumed
        if resumed is not None and not resumed.done():
            resumed.set_result(None)

    def _abandon(self) -> None:
        """The client will read no more: stop, and let the upstream's body go."""
        task = self._task
        if task is not None and not task.done():
            task.cancel()  # the task discards the source
        else:
            self._source.discard()
