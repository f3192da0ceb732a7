"""Message bodies as streams: `Body`, what a `Request` or `Response` carries
(proxy/core/models.py), fed by one side and read by the other.

A connection produces chunks, the other side consumes them, and a bounded buffer with
high/low watermarks pauses the producer, so backpressure crosses every hop.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from proxy.core.errors import BodyTooLarge

BODY_HIGH_WATER_BYTES = 256 * 1024
BODY_LOW_WATER_BYTES = 64 * 1024
READ_JOINED_BYTES = 64 * 1024  # what `Body.read_joined` gathers at most

Trailers = list[tuple[str, str]]


class Body:
    """An async byte stream with a bounded buffer.

    The producer calls `feed`, `feed_eof` or `fail`; the consumer calls `read` (b"" at the
    end) or, when `complete`, `take_all`. When more than `high_water` bytes wait unread,
    `on_pause` is called (the producer stops reading its socket); when the consumer has
    drained them below the low watermark, `on_resume` is called. Before reading, the
    consumer may `fill` the buffer: wait for the whole body, up to a size (request
    buffering, proxy/exchange/forward.py).
    """

    __slots__ = (
        "_buffered",
        "_chunks",
        "_done",
        "_eof",
        "_error",
        "_filling",
        "_full",
        "_high_water",
        "_on_first_read",
        "_on_pause",
        "_on_resume",
        "_paused",
        "_waiter",
        "bytes_fed",
        "bytes_read",
        "length",
        "limit",
        "on_abandon",
        "on_consumed",
        "on_done",
        "on_fill",
        "tap",
        "trailers",
    )

    def __init__(
        self,
        length: int | None = None,
        *,
        on_pause: Callable[[], None] | None = None,
        on_resume: Callable[[], None] | None = None,
        on_first_read: Callable[[], None] | None = None,
    ) -> None:
        self.length = length  # declared length, when the message had one
        self.trailers: Trailers | None = None
        self.bytes_read = 0
        self.bytes_fed = 0
        self.limit: int | None = None  # max_body_size: feeding past it fails the body (413)
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._eof = False
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._on_pause = on_pause
        self._on_resume = on_resume
        self._on_first_read = on_first_read
        self._paused = False
        self._high_water = BODY_HIGH_WATER_BYTES  # raised while the consumer fills
        self._full = False  # the producer can deliver no more until something is read
        self._filling = False
        # Called when the consumer gives up before the end (the producer can stop).
        self.on_abandon: Callable[[], None] | None = None
        # Called with the size of each chunk the consumer took (or that was dropped):
        # HTTP/2 re-opens its flow-control window only for bytes that have moved on.
        self.on_consumed: Callable[[int], None] | None = None
        # Called once when the consumer is done with the body: read to its end, taken
        # whole, failed or discarded (what an access log waits for).
        self.on_done: Callable[[], None] | None = None
        # Called when the consumer starts to `fill`: from then on the producer is the
        # slow side, though nothing was read (HTTP/2 restarts the body deadline).
        self.on_fill: Callable[[], None] | None = None
        # Given each chunk as the consumer takes it, then b"" at the end it reads: a
        # route's mirror copies a streamed body this way (proxy/exchange/mirror.py).
        self.tap: Callable[[bytes], None] | None = None

    @classmethod
    def from_bytes(cls, data: bytes) -> Body:
        """A complete body holding `data`."""
        body = cls(len(data))
        if data:
            body._chunks.append(data)
            body._buffered = len(data)
        body._eof = True
        return body

    def __repr__(self) -> str:
        state = "FAILED" if self._error else "EOF" if self._eof else "OPEN"
        return f"<Body {state} buffered={self._buffered} read={self.bytes_read}>"

    # -- producer side ---------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Append a chunk; pauses the producer above the high watermark."""
        if self._done or self._error is not None:
            # The consumer gave up, or the stream already failed: drop.
            if self.on_consumed is not None:
                self.on_consumed(len(data))
            return
        self.bytes_fed += len(data)
        if self.limit is not None and self.bytes_fed > self.limit:
            self.fail(BodyTooLarge())
            if self.on_consumed is not None:
                self.on_consumed(len(data))
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._waiter is not None:
            self._wake()
        if self._buffered > self._high_water and not self._paused and self._on_pause:
            self._paused = True
            self._on_pause()

    def feed_eof(self, trailers: Trailers | None = None) -> None:
        """Mark the end of the stream."""
        self._eof = True
        self.trailers = trailers
        if self._waiter is not None:
            self._wake()

    def window_full(self) -> None:
        """The producer can deliver nothing more before the consumer reads (an HTTP/2
        stream's or connection's flow-control window is spent): a `fill` ends now."""
        self._full = True
        if self._waiter is not None:
            self._wake()

    def fail(self, exc: BaseException) -> None:
        """End the stream with an error that the consumer's next `read` raises."""
        if self._eof or self._error is not None:
            return
        self._error = exc
        self._drop_buffered()
        if self._waiter is not None:
            self._wake()

    # -- consumer side ---------------------------------------------------------------
    @property
    def waits_on_producer(self) -> bool:
        """True when the consumer has taken every byte, or is filling: what comes next
        is the producer's to deliver (a client's body deadline runs)."""
        return self.bytes_fed == self.bytes_read or self._filling

    @property
    def complete(self) -> bool:
        """True when the whole body has arrived (the fast path can `take_all`)."""
        return self._eof and self._error is None

    async def fill(self, limit: int) -> bool:
        """Wait, reading nothing, until the whole body has arrived, more than `limit`
        bytes wait, or the producer says it can deliver no more (`window_full`); the
        producer is not paused below `limit`. True when the body is complete (then
        `take_all` has it). Like `read`, this is when a client that expects 100-continue
        is asked for the body.

        Raises:
            Whatever the producer passed to `fail` (a ProxyError: 408, 413, 400).
        """
        if self._on_first_read is not None:
            callback, self._on_first_read = self._on_first_read, None
            callback()
        self._high_water = max(limit, BODY_HIGH_WATER_BYTES)
        if self._paused and self._on_resume and self._buffered <= limit:
            self._paused = False
            self._on_resume()
        self._filling = True
        if self.on_fill is not None:
            self.on_fill()
        try:
            while not self._eof and self._error is None and self._buffered <= limit:
                if self._full:
                    break
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
        finally:
            self._high_water = BODY_HIGH_WATER_BYTES
            self._filling = False
        if self._error is not None:
            if self.on_done is not None:
                self._finished()
            raise self._error
        return self._eof

    def take_all(self) -> bytes:
        """Everything buffered, as one bytes object (for `complete` bodies)."""
        if self._on_first_read is not None:
            self._on_first_read = None
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        self.bytes_read += len(data)
        if self.on_consumed is not None:
            self.on_consumed(len(data))
        if self.tap is not None:
            self.tap(data)
            self.tap(b"")  # (a complete body: nothing comes after)
        if self.on_done is not None:
            self._finished()
        return data

    async def read(self) -> bytes:
        """The next chunk, or b"" at the end.

        Raises:
            Whatever the producer passed to `fail` (a ProxyError), once the buffer is empty.
        """
        if self._on_first_read is not None:
            callback, self._on_first_read = self._on_first_read, None
            callback()
        while not self._chunks:
            if self._error is not None:
                if self.on_done is not None:
                    self._finished()
                raise self._error
            if self._eof:
                if self.tap is not None:
                    self.tap(b"")
                if self.on_done is not None:
                    self._finished()
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._chunks.popleft()
        self._took(len(data))
        if self.tap is not None:
            self.tap(data)
        return data

    async def read_joined(self, limit: int = READ_JOINED_BYTES) -> bytes:
        """`read`, joined with the chunks already buffered behind it while the total
        stays within `limit` bytes (one larger chunk comes alone).

        A client's many small chunks (or HTTP/2 DATA frames) then cost the consumer one
        write, not one each: the per-chunk work downstream stays a small constant.

        Raises:
            What `read` raises.
        """
        data = await self.read()
        chunks = self._chunks
        if not data or not chunks or len(data) + len(chunks[0]) > limit:
            return data
        parts = [data]
        size = len(data)
        while chunks and size + len(chunks[0]) <= limit:
            part = chunks.popleft()
            parts.append(part)
            size += len(part)
            if self.tap is not None:
                self.tap(part)
        self._took(size - len(data))
        return b"".join(parts)

    def _took(self, size: int) -> None:
        """The consumer took `size` bytes off the buffer."""
        self._buffered -= size
        self.bytes_read += size
        if self.on_consumed is not None:
            self.on_consumed(size)
        if self._paused and self._buffered <= BODY_LOW_WATER_BYTES and self._on_resume:
            self._paused = False
            self._on_resume()

    def discard(self) -> None:
        """The consumer will read no more: drop what is buffered and what comes."""
        self._done = True
        if self.on_done is not None:
            self._finished()
        self._drop_buffered()
        if self._paused and self._on_resume:
            self._paused = False
            self._on_resume()
        if not self._eof and self._error is None and self.on_abandon is not None:
            callback, self.on_abandon = self.on_abandon, None
            callback()

    def _finished(self) -> None:
        callback, self.on_done = self.on_done, None
        if callback is not None:
            callback()

    def _drop_buffered(self) -> None:
        dropped = self._buffered
        self._chunks.clear()
        self._buffered = 0
        if dropped and self.on_consumed is not None:
            self.on_consumed(dropped)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
