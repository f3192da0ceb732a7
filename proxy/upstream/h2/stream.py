"""The upstream HTTP/2 client's vocabulary: its windows and limits, the states of a
connection and of a stream, the error for a stream the upstream never processed, and the
per-stream state the connection keeps (`UpstreamStream`). Request trailers are filtered
by `proxy.codec.h2fields.trailer_fields`, as the front end's response trailers are."""

from __future__ import annotations

import asyncio
import enum
from time import perf_counter

from proxy.core.body import Body, Trailers
from proxy.core.models import Response
from proxy.upstream.errors import StreamRefused as StreamRefused
from proxy.upstream.replay import BodyCopy

# Our receive windows. A stream's window bounds what a paused (slow-client) stream can hold
# beyond the Body's high watermark; the connection window is re-opened on receipt.
STREAM_WINDOW_BYTES = 1024 * 1024
CONNECTION_WINDOW_BYTES = 16 * 1024 * 1024
DEFAULT_WINDOW_BYTES = 65_535  # RFC 9113 section 6.9.2
# Window updates are batched: sent once this share of the window was consumed.
STREAM_ACK_BYTES = STREAM_WINDOW_BYTES // 4
CONNECTION_ACK_BYTES = CONNECTION_WINDOW_BYTES // 4
# Stream ids are 31 bits (RFC 9113 section 5.1.1); a connection near the end takes no more.
LAST_STREAM_ID = 2**31 - 1
# Response fields that describe the connection, not the message (RFC 9113 section 8.2.2;
# h2 refuses most of them on receipt). Content-Length becomes the Body's length: each
# front end derives its own framing.
DROPPED_RESPONSE_FIELDS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"content-length",
        b"upgrade",
        b"trailer",
    }
)


class H2ConnState(enum.Enum):
    """Lifecycle of an HTTP/2 upstream connection."""

    CONNECTING = "connecting"  # TCP/TLS up, waiting for the peer's SETTINGS
    READY = "ready"  # takes new streams while below the peer's limit
    DRAINING = "draining"  # GOAWAY (either way): no new streams, closes when idle
    CLOSED = "closed"


class H2StreamState(enum.Enum):
    """One exchange on a stream."""

    AWAITING_HEAD = "awaiting_head"  # request sent or sending; no response head yet
    STREAMING = "streaming"  # head delivered; the body is arriving
    DONE = "done"  # ended, reset or failed; the stream slot is free


class UpstreamStream:
    """Per-stream state kept by the connection."""

    __slots__ = (
        "body",
        "consumed",
        "deadline",
        "head_waiter",
        "paused",
        "request_done",
        "sender",
        "sent_at",
        "state",
        "stream_id",
        "trailers",
        "unacked",
        "waits_on_client",
        "window_waiter",
    )

    def __init__(self, stream_id: int, waiter: asyncio.Future[Response], deadline: float) -> None:
        self.stream_id = stream_id
        self.state = H2StreamState.AWAITING_HEAD
        self.head_waiter = waiter
        self.body: Body | None = None
        self.trailers: Trailers | None = None
        self.sender: asyncio.Task[None] | None = None
        self.request_done = False
        self.sent_at = perf_counter()  # for the metrics; 0.0 once the attempt is counted
        self.deadline = deadline
        self.paused = False  # the response Body is above its high watermark
        self.unacked = 0  # received bytes not yet given back to the stream window
        self.waits_on_client = False  # the sender waits for the client's body
        self.window_waiter: asyncio.Future[None] | None = None
        # What was read of the client's body, for a replay after a refusal.
        self.consumed = BodyCopy()

    def __repr__(self) -> str:
        return f"<UpstreamStream {self.stream_id} {self.state.name}>"
