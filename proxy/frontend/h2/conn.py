"""The h2 connection the HTTP/2 front end drives: its configuration, the SETTINGS it
advertises, and the two places h2's behaviour is adjusted for a server facing the
internet (through proxy/codec/h2compat.py, like every use of h2's internals). Also the
per-stream state the front end keeps (`H2Exchange`).
"""

from __future__ import annotations

import asyncio

import h2.connection
import h2.settings

from metrics.traffic import HTTP2, count_request
from proxy.codec.h2compat import (
    PerStreamContentLength,
    half_closed_local,
    initiate_with_settings,
    linear_literals,
    memoise_hpack,
    set_header_list_cap,
)
from proxy.config.model import Http2Config
from proxy.core.body import Body, Trailers
from proxy.core.models import Request
from proxy.core.tracing import end_exchange

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

    Field validation is left to proxy/frontend/h2/fields.py (one pass; h2's generator
    chain costs more than the rest of a request) and outbound fields are built
    lower-cased, so h2's own validation and normalisation are off; so is its
    content-length check, which the front end makes per stream (RFC 9113 section 8.1.1:
    a stream error, where h2 kills the connection). HPACK is memoised, and literal fields
    decode in linear time (all three: proxy/codec/h2compat.py).
    """
    config = PerStreamContentLength(
        client_side=False,
        header_encoding=None,
        validate_inbound_headers=False,
        normalize_inbound_headers=False,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
    )
    conn = h2.connection.H2Connection(config=config)
    memoise_hpack(conn)
    linear_literals(conn)
    # The SETTINGS frame advertises max_concurrent_streams. h2 would treat a stream beyond
    # it as a connection error, killing the streams in flight; RFC 9113 section 5.1.2 asks
    # for a stream error, so h2 gets a looser limit and the front end refuses the extra
    # stream itself (REFUSED_STREAM: safe to retry).
    initiate_with_settings(
        conn,
        _settings(settings, settings.max_concurrent_streams),
        _settings(settings, settings.max_concurrent_streams * STREAM_HARD_CAP_FACTOR),
    )
    set_header_list_cap(conn, hard_header_cap(settings))
    window = connection_window(settings)
    if window > DEFAULT_WINDOW_BYTES:
        conn.increment_flow_control_window(window - DEFAULT_WINDOW_BYTES)
    return conn


def connection_window(settings: Http2Config) -> int:
    """The connection-level receive window the front end opens (RFC 9113 section 6.9)."""
    wanted = min(settings.initial_window_size * CONNECTION_WINDOW_FACTOR, MAX_WINDOW_BYTES)
    return max(wanted, DEFAULT_WINDOW_BYTES)


def hard_header_cap(settings: Http2Config) -> int:
    """The decoded header list size at which h2 gives up on the connection."""
    return settings.max_header_list_size * HEADER_LIST_HARD_CAP_FACTOR


class H2Exchange:
    """The front end's state for one stream: its request, the body the client is still
    sending, the task serving it, and the deadlines that bound waiting on the client."""

    __slots__ = (
        "body",
        "body_deadline",
        "client_done",
        "head_request",
        "id",
        "request",
        "reset_when_done",
        "response_body",
        "response_started",
        "status",
        "task",
        "trailers",
        "tunnel",
        "tunnel_reading",
        "window_deadline",
        "window_waiter",
    )

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        # A HEAD: its answer has no content, a local reply's included (known before the
        # Request is, which a refused request never gets).
        self.head_request = False
        self.body_deadline = 0.0  # while receiving: when the client's silence is a 408
        self.reset_when_done = False  # the client may still send: RST_STREAM at the end
        self.window_deadline = 0.0  # while waiting for WINDOW_UPDATE: when to give up
        self.request: Request | None = None
        self.body: Body | None = None  # the request body while the client still sends it
        self.trailers: Trailers | None = None
        self.task: asyncio.Task[None] | None = None
        self.window_waiter: asyncio.Future[None] | None = None
        self.response_started = False
        self.status = 0  # of the response begun, until counted (`record_response`)
        # The body of the response begun, whose bytes taken for sending are counted with
        # it (none for an answer without content: a HEAD's, a 204, a tunnel's 200).
        self.response_body: Body | None = None
        # A WebSocket tunnel (RFC 8441): the client's silence is no body timeout.
        self.tunnel = False
        # The tunnel started and still reads the client's DATA (it owns the request body).
        self.tunnel_reading = False
        # Set while our END_STREAM has gone but the client may still send (a half-closed
        # tunnel): done at its END_STREAM, or when the tunnel stops reading.
        self.client_done: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<H2Exchange {self.id} started={self.response_started}>"

    def record_response(self) -> None:
        """Count the request in the metrics, once: when the stream is done, or for a
        tunnel when its 200 goes out (a tunnel's life is not a request's duration)."""
        status = self.status
        if status:
            self.status = 0
            body = self.response_body
            count_request(self.request, status, 0 if body is None else body.bytes_read, HTTP2)
            end_exchange(self.request, status)

    def tunnel_started(self, body: Body) -> None:
        """A tunnel now reads the client's DATA from `body` until it drops it."""
        self.tunnel_reading = True
        body.on_abandon = self.tunnel_stopped_reading

    def tunnel_stopped_reading(self) -> None:
        """The tunnel dropped the client's DATA (it ended): the stream may end now."""
        self.tunnel_reading = False
        self.wake_client_done()

    async def wait_half_closed(
        self, conn: h2.connection.H2Connection, loop: asyncio.AbstractEventLoop
    ) -> None:
        """After the tunnel's response ended: while the client may still send, wait for
        its END_STREAM (or a reset), or for the tunnel to stop reading.

        RFC 8441 section 5: our END_STREAM (the upstream's FIN) is a half-close; the
        client may still send (the answer to the upstream's close frame). Ending the
        stream at once reset it, and left the tunnel waiting for DATA that never came
        and the upstream's socket open after every closing handshake it began.
        """
        if self.body is None or not half_closed_local(conn, self.id):
            return  # reset, or the response has not ended
        self.client_done = loop.create_future()
        try:
            await self.client_done
        finally:
            self.client_done = None

    def wake_client_done(self) -> None:
        """The client ended its side (END_STREAM, or its connection's end)."""
        waiter = self.client_done
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def cancel(self) -> None:
        """The client reset the stream or is gone: stop whatever serves it (its task, or
        a middleware chain running without one, proxy/exchange/eager.py)."""
        if self.task is not None:
            self.task.cancel()
        request = self.request
        if request is not None:
            request.exchange.cancel()

    def client_gone(self) -> None:
        """The client's connection ended (its request body has just been failed)."""
        self.wake_client_done()
        if self.tunnel and self.task is not None:
            # A tunnel takes its failed request body as the client gone and closes the
            # upstream, but never ends the response it feeds: the stream's sender would
            # wait for ever, and the connection (a client that closed its socket) with it.
            self.task.cancel()
