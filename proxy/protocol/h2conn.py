"""The h2 connection the HTTP/2 front end drives: its configuration, the SETTINGS it
advertises, and the two places h2's behaviour is adjusted for a server facing the
internet. Also the per-stream state the front end keeps (`H2Exchange`).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable

import h2.config
import h2.connection
import h2.settings
from h2.stream import H2Stream

from proxy.config_model import Http2Config
from proxy.models import Body, Request, Trailers
from proxy.protocol.hpack_cache import memoise_hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 section 3.4
DEFAULT_WINDOW_BYTES = 65_535  # RFC 9113 section 6.9.2
MAX_WINDOW_BYTES = 2**31 - 1  # RFC 9113 section 6.9.1
# The connection-level receive window: bounds what all streams together may have in
# flight towards us (and so our buffering per connection), well above one stream's.
CONNECTION_WINDOW_FACTOR = 4
# An HPACK block may decode to this multiple of max_header_list_size before h2 gives up
# on the connection (HPACK bomb); between 1x and this, the stream gets a 431.
HEADER_LIST_HARD_CAP_FACTOR = 4
# h2 itself enforces this multiple of max_concurrent_streams as a connection error; up
# to it, streams beyond the advertised limit are refused one by one.
STREAM_HARD_CAP_FACTOR = 2


class FrontEndConfig(h2.config.H2Configuration):
    """The front end's h2 configuration. It also marks the front end's streams, whose
    content-length h2 must leave to us: h2 treats a mismatch (or a non-number) as a
    connection error, killing every stream in flight, where RFC 9113 section 8.1.1 asks
    for a stream error; the front end checks it per stream instead."""


def _unless_front_end(method: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(method)
    def checked(stream: H2Stream, *args: object) -> None:
        if isinstance(stream.config, FrontEndConfig):
            return None
        return method(stream, *args)

    return checked


if not getattr(H2Stream, "_gatehouse_content_length", False):
    # Upstream (client) connections keep h2's own check; see FrontEndConfig.
    H2Stream._initialize_content_length = _unless_front_end(  # type: ignore[method-assign]
        H2Stream._initialize_content_length
    )
    H2Stream._track_content_length = _unless_front_end(  # type: ignore[method-assign]
        H2Stream._track_content_length
    )
    H2Stream._gatehouse_content_length = True  # type: ignore[attr-defined]


def _settings(settings: Http2Config, max_streams: int) -> h2.settings.Settings:
    codes = h2.settings.SettingCodes
    return h2.settings.Settings(
        client=False,
        initial_values={
            codes.MAX_CONCURRENT_STREAMS: max_streams,
            codes.INITIAL_WINDOW_SIZE: settings.initial_window_size,
            codes.MAX_HEADER_LIST_SIZE: settings.max_header_list_size,
            codes.ENABLE_PUSH: 0,
            # RFC 8441: extended CONNECT, how WebSocket rides an HTTP/2 stream.
            codes.ENABLE_CONNECT_PROTOCOL: 1,
        },
    )


def server_connection(settings: Http2Config) -> h2.connection.H2Connection:
    """A server-side h2 connection that has queued its preface (SETTINGS advertising
    `settings`, a larger connection window).

    Field validation is left to h2fields (one pass; h2's generator chain costs more than
    the rest of a request) and outbound fields are built lower-cased, so h2's own
    validation and normalisation are off. HPACK is memoised (hpack_cache).
    """
    config = FrontEndConfig(
        client_side=False,
        header_encoding=None,
        validate_inbound_headers=False,
        normalize_inbound_headers=False,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
    )
    conn = h2.connection.H2Connection(config=config)
    memoise_hpack(conn)
    conn.local_settings = _settings(settings, settings.max_concurrent_streams)
    conn.initiate_connection()
    # The SETTINGS frame above advertises max_concurrent_streams. h2 would treat a stream
    # beyond it as a connection error, killing the streams in flight; RFC 9113 section
    # 5.1.2 asks for a stream error, so h2 gets a looser limit and the front end refuses
    # the extra stream itself (REFUSED_STREAM: safe to retry).
    conn.local_settings = _settings(
        settings, settings.max_concurrent_streams * STREAM_HARD_CAP_FACTOR
    )
    conn.decoder.max_header_list_size = hard_header_cap(settings)
    window = min(settings.initial_window_size * CONNECTION_WINDOW_FACTOR, MAX_WINDOW_BYTES)
    if window > DEFAULT_WINDOW_BYTES:
        conn.increment_flow_control_window(window - DEFAULT_WINDOW_BYTES)
    return conn


def hard_header_cap(settings: Http2Config) -> int:
    """The decoded header list size at which h2 gives up on the connection."""
    return settings.max_header_list_size * HEADER_LIST_HARD_CAP_FACTOR


class H2Exchange:
    """The front end's state for one stream: its request, the body the client is still
    sending, the task serving it, and the deadlines that bound waiting on the client."""

    __slots__ = (
        "body",
        "body_deadline",
        "id",
        "request",
        "reset_when_done",
        "response_started",
        "task",
        "trailers",
        "tunnel",
        "window_deadline",
        "window_waiter",
    )

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.body_deadline = 0.0  # while receiving: when the client's silence is a 408
        self.reset_when_done = False  # the client may still send: RST_STREAM at the end
        self.window_deadline = 0.0  # while waiting for WINDOW_UPDATE: when to give up
        self.request: Request | None = None
        self.body: Body | None = None  # the request body while the client still sends it
        self.trailers: Trailers | None = None
        self.task: asyncio.Task[None] | None = None
        self.window_waiter: asyncio.Future[None] | None = None
        self.response_started = False
        # A WebSocket tunnel (RFC 8441): the client's silence is no body timeout.
        self.tunnel = False

    def __repr__(self) -> str:
        return f"<H2Exchange {self.id} started={self.response_started}>"
