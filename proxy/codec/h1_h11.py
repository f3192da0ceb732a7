"""The h11 implementations of the HTTP/1.1 codec interface: the pure-Python codec.

h11 is stricter than llhttp in places and laxer in others; `check_raw_head` and
`scan_head` bring it to the same line, so both codecs accept the same messages.
"""

from __future__ import annotations

import h11

from proxy.codec.h1 import (
    H1Error,
    H1Sink,
    Headers,
    MessageHead,
    check_raw_head,
    scan_head,
)


def _h11_headers(headers: h11._headers.Headers) -> Headers:
    return list(headers.raw_items())


def _unparsed(conn: h11.Connection) -> bytearray:
    """What `conn` has received and not parsed yet, without a copy.

    h11's `trailing_data` copies its whole receive buffer. Asked once per pipelined
    request, that made each request cost time proportional to the requests read with it:
    quadratic in a read's size (a 224 KB read of 8,000 requests took ~250 ms in copies).
    The buffer is h11 0.14-0.16's ReceiveBuffer, whose bytes are its `_data`.
    """
    data: bytearray = conn._receive_buffer._data
    return data


def _head_of(data: bytes | bytearray) -> tuple[bytearray, bool]:
    """The bytes of the message head `data` starts with, for `check_raw_head`, and
    whether the head is complete in them (else what follows must be added)."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return bytearray(data), False
    return bytearray(data[: end + 4]), True


class H11RequestParser:
    """RequestParser over h11, the pure-Python codec.

    h11 insists on seeing our response before the next request; we answer its state
    machine with a stub response (its bytes are discarded: serialization is ours) so it
    parses pipelined requests, and we check the raw head for what h11 tolerates.
    """

    __slots__ = ("_conn", "_max_head_bytes", "_raw", "_raw_complete", "_sink")

    def __init__(self, sink: H1Sink, max_head_bytes: int) -> None:
        self._sink = sink
        self._max_head_bytes = max_head_bytes
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head_bytes)
        # The bytes of the head being received, until check_raw_head has seen them; once
        # `_raw_complete`, they hold the whole head and nothing more is added.
        self._raw: bytearray | None = bytearray()
        self._raw_complete = False

    @property
    def idle(self) -> bool:
        conn = self._conn
        return conn.their_state is h11.IDLE and not _unparsed(conn)

    def feed(self, data: bytes) -> bytes | None:
        if self._raw is not None and not self._raw_complete:
            self._raw += data
        self._conn.receive_data(data)
        return self._drain()

    def _drain(self) -> bytes | None:
        while True:
            conn = self._conn  # _next_cycle may replace it
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise H1Error(str(exc), too_large=exc.error_status_hint == 431) from None
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return None
            if isinstance(event, h11.Request):
                self._on_request(event)
                if event.method == b"CONNECT":
                    return bytes(conn.trailing_data[0])
            elif isinstance(event, h11.Data):
                self._sink.on_body(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self._sink.on_end(_h11_headers(event.headers) or None)
                if conn.their_state is h11._state.MIGHT_SWITCH_PROTOCOL:
                    # An Upgrade request: what follows it may be the tunnel's (as llhttp
                    # does, the rest goes back to the front end, which decides).
                    return bytes(conn.trailing_data[0])
                self._next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                return None
            else:  # pragma: no cover - h11 has no other server-side events
                raise AssertionError(f"unexpected h11 event {event!r}")

    def _on_request(self, event: h11.Request) -> None:
        if self._raw is not None:
            check_raw_head(bytes(self._raw))
            self._raw = None
            self._raw_complete = False
        headers = _h11_headers(event.headers)
        # h11 bounds only heads that arrive in pieces; one that came whole is measured here.
        size = len(event.target) + sum(len(n) + len(v) + 4 for n, v in headers)
        if size > self._max_head_bytes:
            raise H1Error("request head too large", too_large=True)
        version = event.http_version.decode()
        head = MessageHead(headers, version, False, method=event.method, target=event.target)
        scan_head(head, request=True)
        # RFC 9112 section 9.3: 1.1 persists unless "close"; 1.0 only with "keep-alive".
        tokens = head.connection.lower() if head.connection else b""
        head.keep_alive = b"close" not in tokens if version == "1.1" else b"keep-alive" in tokens
        self._sink.on_head(head)

    def _next_cycle(self) -> None:
        conn = self._conn
        if conn.our_state is h11.SEND_RESPONSE:
            conn.send(h11.Response(status_code=204, headers=[]))
            conn.send(h11.EndOfMessage())
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:
            # h11 closes after HTTP/1.0 (even with keep-alive) and after a declined
            # upgrade; the front end decides that, so a fresh h11 takes what follows
            # (the buffer itself, not a copy: see `_unparsed`).
            fresh = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_head_bytes)
            fresh._receive_buffer = conn._receive_buffer
            self._conn = conn = fresh
        # The next head, for check_raw_head: only its own bytes are copied.
        self._raw, self._raw_complete = _head_of(_unparsed(conn))


class H11ResponseParser:
    """ResponseParser over h11. A stub request tells h11 which method it answers."""

    __slots__ = ("_conn", "_done", "_raw", "_sink")

    def __init__(self, sink: H1Sink, max_head_bytes: int) -> None:
        self._sink = sink
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head_bytes)
        self._done = True
        self._raw: bytearray | None = None

    @property
    def reusable(self) -> bool:
        conn = self._conn
        return self._done and conn.our_state is h11.DONE and conn.their_state is h11.DONE

    def begin(self, method: bytes) -> None:
        conn = self._conn
        if conn.our_state is h11.DONE:
            conn.start_next_cycle()
        conn.send(h11.Request(method=method, target="/", headers=[("host", "upstream")]))
        conn.send(h11.EndOfMessage())
        self._done = False
        self._raw = bytearray()

    def feed(self, data: bytes) -> None:
        if self._raw is not None:
            self._raw += data
        self._conn.receive_data(data)
        self._drain()

    def feed_eof(self) -> None:
        if self._done:
            return
        self._conn.receive_data(b"")
        self._drain()
        if not self._done:
            raise H1Error("upstream closed the connection before the response was complete")

    def _drain(self) -> None:
        conn = self._conn
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise H1Error(str(exc), too_large=exc.error_status_hint == 431) from None
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.InformationalResponse):
                self._raw = bytearray(conn.trailing_data[0])
            elif isinstance(event, h11.Response):
                if self._raw is not None:
                    check_raw_head(bytes(self._raw))
                    self._raw = None
                headers = _h11_headers(event.headers)
                version = event.http_version.decode()
                head = MessageHead(
                    headers,
                    version,
                    h11._connection._keep_alive(event),
                    status=event.status_code,
                    reason=bytes(event.reason),
                )
                scan_head(head, request=False)
                self._sink.on_head(head)
            elif isinstance(event, h11.Data):
                self._sink.on_body(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self._done = True
                self._sink.on_end(_h11_headers(event.headers) or None)
                if _unparsed(conn):
                    # Bytes after a complete response, before any next request: h11 would
                    # read them as the next response. The connection is not usable.
                    raise H1Error("unexpected bytes after the response")
                return
            elif isinstance(event, h11.ConnectionClosed):
                return
            else:  # pragma: no cover - h11 has no other client-side events
                raise AssertionError(f"unexpected h11 event {event!r}")
