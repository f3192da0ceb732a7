"""Shared by the Http2Protocol tests: an `Http2Protocol` over a `RecordingConnection`, and a
real `h2` client as its peer (h11's ConnectionPair, for HTTP/2): the client's bytes are fed
to the protocol, what the protocol wrote is decoded by the same client, or parsed frame by
frame with hyperframe where the frames themselves are the point."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
from h2.errors import ErrorCodes
from hyperframe.frame import Frame, GoAwayFrame
from multidict import CIMultiDict

from proxy.config.model import Http2Config, LimitsConfig, ListenerConfig
from proxy.core.body import Body
from proxy.core.models import Request, Response
from proxy.frontend.h2.protocol import Http2Protocol
from tests.support.helpers import (
    FakeServer,
    FastResponder,
    Handler,
    RecordingConnection,
    echo_handler,
)

LISTENER = ListenerConfig(host="127.0.0.1", port=0, name="test")
FRAME_HEADER_BYTES = 9


class H2RecordingConnection(RecordingConnection):
    """A `RecordingConnection` with the attributes front-end selection reads (`listener`,
    `transport`), so `plaintext_front_end` can be given one."""

    def __init__(self, server: FakeServer, listener: ListenerConfig = LISTENER) -> None:
        super().__init__(server)
        self.listener = listener
        self.transport: asyncio.Transport | None = None


def make_h2_protocol(
    *,
    handler: Handler = echo_handler,
    http2: Http2Config | None = None,
    limits: LimitsConfig | None = None,
    fast: FastResponder | None = None,
) -> tuple[Http2Protocol, H2RecordingConnection, FakeServer]:
    """An `Http2Protocol` over an `H2RecordingConnection` of a `FakeServer`."""
    server = FakeServer(
        limits=limits or LimitsConfig(), http2=http2 or Http2Config(), handler=handler, fast=fast
    )
    conn = H2RecordingConnection(server)
    protocol = Http2Protocol(conn)
    conn.front_end = protocol  # type: ignore[assignment]
    return protocol, conn, server


def feed(protocol: Http2Protocol, data: bytes, split: int | None = None) -> None:
    """Feed `data` whole, or in pieces of `split` bytes."""
    step = split or len(data) or 1
    for start in range(0, len(data), step):
        protocol.feed(data[start : start + step])


async def settle(protocol: Http2Protocol, *, wait_s: float = 10.0) -> None:
    """Run the loop until every stream task has finished and queued frames are flushed.

    Raises:
        TimeoutError: a stream did not finish within `wait_s` (a hang).
    """
    async with asyncio.timeout(wait_s):
        for _ in range(3):  # a finished task may have scheduled a flush or one more step
            await asyncio.sleep(0)
            while tasks := {s.task for s in protocol._streams.values() if s.task is not None}:
                await asyncio.wait(tasks)
                await asyncio.sleep(0)


def parse_frames(data: bytes) -> list[Frame]:
    """Every frame in `data`, which must be whole frames and nothing else."""
    frames: list[Frame] = []
    view = memoryview(data)
    while view:
        assert len(view) >= FRAME_HEADER_BYTES, f"partial frame header: {bytes(view)!r}"
        frame, length = Frame.parse_frame_header(view[:FRAME_HEADER_BYTES])
        body = view[FRAME_HEADER_BYTES : FRAME_HEADER_BYTES + length]
        assert len(body) == length, f"partial frame: {frame!r} wants {length}, has {len(body)}"
        frame.parse_body(body)
        frames.append(frame)
        view = view[FRAME_HEADER_BYTES + length :]
    return frames


@dataclass
class H2Response:
    """One stream's answer as the client saw it."""

    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[bytes, bytes]] | None = None
    ended: bool = False
    reset: ErrorCodes | int | None = None

    @property
    def status(self) -> int:
        return int(dict(self.headers)[b":status"])

    def header(self, name: bytes) -> bytes | None:
        return dict(self.headers).get(name)


class H2Peer:
    """A real h2 client talking to `protocol` through `conn`, without a socket.

    Outbound validation is off so tests can send what a hostile client would (upper-case
    names, connection-specific fields, missing pseudo-headers).
    """

    def __init__(self, protocol: Http2Protocol, conn: RecordingConnection) -> None:
        self.protocol = protocol
        self.conn = conn
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = h2.connection.H2Connection(config=config)
        self.h2.initiate_connection()
        self.read_upto = 0
        self.events: list[h2.events.Event] = []
        self.responses: dict[int, H2Response] = {}
        self.goaway: GoAwayFrame | None = None

    def send(self, split: int | None = None) -> bytes:
        """Feed what the client has queued (whole, or `split` bytes at a time)."""
        data = self.h2.data_to_send()
        feed(self.protocol, data, split)
        return data

    def request(
        self,
        stream_id: int,
        headers: list[tuple[bytes, bytes]] | None = None,
        *,
        method: bytes = b"GET",
        path: bytes = b"/",
        body: bytes | None = None,
        end: bool = True,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Queue a request (not sent until `send`): `headers` replaces the whole list."""
        if headers is None:
            headers = [
                (b":method", method),
                (b":scheme", b"http"),
                (b":authority", b"example.com"),
                (b":path", path),
                *(extra or []),
            ]
        self.h2.send_headers(stream_id, headers, end_stream=end and body is None)
        if body is not None:
            self.h2.send_data(stream_id, body, end_stream=end)

    def new_output(self) -> bytes:
        """What the protocol wrote since the last `receive` or `new_output`."""
        data = bytes(self.conn.output[self.read_upto :])
        self.read_upto = len(self.conn.output)
        return data

    def receive(self) -> list[h2.events.Event]:
        """Decode what the protocol wrote since last time; record responses and GOAWAY.

        GOAWAY frames are recorded here and not given to the h2 client: once it has seen
        one, h2 refuses every later frame, even the answers RFC 9113 section 6.8 lets the
        streams in flight still receive after a graceful GOAWAY.
        """
        data = self.new_output()
        rest = bytearray()
        for frame in parse_frames(data):
            if isinstance(frame, GoAwayFrame):
                self.goaway = frame
            else:
                rest += frame.serialize()
        events = self.h2.receive_data(bytes(rest)) if rest else []
        for event in events:
            self._record(event)
        self.events += events
        return events

    def _record(self, event: h2.events.Event) -> None:
        stream_id = getattr(event, "stream_id", 0)
        if isinstance(event, h2.events.ResponseReceived):
            self.responses.setdefault(stream_id, H2Response()).headers = list(event.headers or [])
        elif isinstance(event, h2.events.DataReceived):
            self.responses.setdefault(stream_id, H2Response()).body += event.data or b""
        elif isinstance(event, h2.events.TrailersReceived):
            self.responses.setdefault(stream_id, H2Response()).trailers = list(event.headers or [])
        elif isinstance(event, h2.events.StreamEnded):
            self.responses.setdefault(stream_id, H2Response()).ended = True
        elif isinstance(event, h2.events.StreamReset):
            self.responses.setdefault(stream_id, H2Response()).reset = event.error_code

    def window_updates(self, stream_id: int) -> list[int]:
        """The increments of the WINDOW_UPDATE frames received so far for `stream_id`."""
        return [
            event.delta or 0
            for event in self.events
            if isinstance(event, h2.events.WindowUpdated) and event.stream_id == stream_id
        ]


async def connected(
    split: int | None = None, **options: object
) -> tuple[Http2Protocol, H2RecordingConnection, FakeServer, H2Peer]:
    """A protocol and a peer that has sent its preface and SETTINGS and read ours."""
    protocol, conn, server = make_h2_protocol(**options)  # type: ignore[arg-type]
    peer = H2Peer(protocol, conn)
    peer.send(split)
    peer.receive()
    peer.send()  # our SETTINGS ACK
    await settle(protocol)
    return protocol, conn, server, peer


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
