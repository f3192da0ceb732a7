"""`access_log`: one JSON line per request on stdout (or stderr), written without blocking
the event loop.

The line is made when the front end has finished with the response body (`Body.on_done`:
sent to the end, failed, or dropped because the client went away), so `bytes_out` is what
was taken for sending and `duration_s` runs from entering this middleware to that moment.
Put it first in the chain (`global_middleware: [access_log, ...]`) so that it covers the
rest of the chain and sees every error reply. A request whose exchange is cancelled before
any response (an HTTP/2 client's RST_STREAM, a lost connection) is logged with status 499,
nginx's "client closed request"; an HTTP/1.1 client that closes while its request waits
is only noticed when the answer is written, and is logged with that answer's status. A
WebSocket handshake is logged when the upgrade is answered (its tunnel is not timed here).
Requests that match no route pass through `global_middleware` only: an access_log there
logs their 404.

Writing: on the event loop a request costs a tuple of its values put in a bounded queue;
a task hands what has queued up to a thread of this instance's own, which formats the
lines and writes them, so a slow or blocked stdout holds up only that thread. When the
queue is full (`queue_size` lines), new lines are dropped and counted in
`gatehouse_access_log_dropped_total`, so memory stays bounded. Writes are cut at line
boundaries into pieces of at most PIPE_BUF bytes, which the kernel keeps whole on a pipe:
the lines of several workers sharing one stdout never interleave. `close()` flushes what
is queued (for at most `CLOSE_FLUSH_S`).

Sampling (`sample: 0.1`) keeps that fraction of lines, chosen at random per request;
responses with status >= 500 are always logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import stat
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from json.encoder import encode_basestring_ascii as _quote
from random import random
from time import perf_counter
from typing import Any, ClassVar

from metrics.definitions import ACCESS_LOG_DROPPED
from middleware.headers import error_reply
from proxy import (
    Handler,
    Option,
    Options,
    ProxyError,
    Request,
    Response,
    did_you_mean,
    request_id_of,
)

log = logging.getLogger(__name__)

# Every field a line can have, in the order they are written.
FIELDS = (
    "time",  # when the request entered the middleware: RFC 3339, UTC, milliseconds
    "request_id",
    "client_ip",
    "method",
    "host",
    "path",  # as the client sent it (no query string: it may hold secrets)
    "protocol",  # HTTP/1.0, HTTP/1.1, HTTP/2
    "route",
    "endpoint",  # host:port of the upstream endpoint ("" when none was reached)
    "status",
    "bytes_in",  # request body bytes read
    "bytes_out",  # response body bytes taken for sending
    "duration_s",  # total, from entering the middleware to the end of the response
    "upstream_s",  # forwarding: from sending the request to the response head
    "user_agent",
    "consumer",  # who an auth middleware found the caller to be
    "retries",  # tries after the first (upstreams.X.retries); endpoint is the last try's
    # The gateway's own error code when it answered instead of an upstream
    # ("upstream_timeout", "unauthorized", ... as in the reply's JSON body); "" when the
    # status is the upstream's: a 504 of ours is told from an upstream's.
    "error",
    "tls",  # the client connection's TLS version ("TLSv1.3"); "" without TLS
    # The W3C trace the request belongs to (32 hex digits) and the gateway's span in it:
    # its server span when the trace is recorded (`tracing:`), else the span id the last
    # upstream try was sent with. "" when neither exists (answered before any try,
    # without tracing).
    "trace_id",
    "span_id",
    # Written only when `fields` names it: the address the request came from before
    # `client_ip` looked behind it (the load balancer; on a proxy_protocol listener, the
    # client its PROXY header named). The same as client_ip without a client_ip section.
    "peer_ip",
)
# What a line holds when `fields` is not given.
DEFAULT_FIELDS = FIELDS[: FIELDS.index("peer_ip")]
OUTPUTS = {"stdout": 1, "stderr": 2}
DEFAULT_QUEUE_LINES = 10_000
CLOSE_FLUSH_S = 5.0
CLIENT_CLOSED_STATUS = 499
# The `error` of a request logged without a response: the client left, or a bug (the
# 500 it gets is the local reply "internal_error").
CLIENT_CLOSED_ERROR, INTERNAL_ERROR = "client_closed", "internal_error"
_WRITE_WAIT_S = 1.0  # a non-blocking fd that is full: wait this long, then try again
_PROTOCOLS = {version: f'"HTTP/{version}"' for version in ("1.0", "1.1", "2")}  # quoted


def _protocol(version: str) -> str:
    return _PROTOCOLS.get(version) or _quote(f"HTTP/{version}")


def _seconds(value: float) -> str:
    return f"{value:.6f}"  # microseconds, never an exponent


_RENDER: dict[str, Callable[[Any], str]] = {  # how a field's value is written (else: a string)
    "status": str,
    "bytes_in": str,
    "bytes_out": str,
    "duration_s": _seconds,
    "upstream_s": _seconds,
    "protocol": _protocol,
    "retries": str,
}

_encode = json.JSONEncoder(separators=(",", ":")).encode
# How long queued lines wait to be written together (a line is never later than this).
BATCH_WINDOW_S = 0.05


class LineWriter:
    """A bounded queue of records, written as lines to a file descriptor by one worker
    thread (started on first use, so never before a fork). `encode` turns a record into
    its line (without the newline) in that thread; the default writes a dict as JSON."""

    def __init__(
        self,
        fd: int,
        capacity: int,
        count_dropped: Callable[[int], None],
        encode: Callable[[Any], str] = _encode,
    ) -> None:
        self.fd = fd
        self.capacity = capacity
        self.dropped = 0
        self._count_dropped = count_dropped
        self._encode = encode
        self._queue: deque[Any] = deque()
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._warned = False
        self._in_flight = 0  # lines handed to the thread, not yet written
        self._regular_file: bool | None = None  # whether fd is one (known at the first write)

    def __repr__(self) -> str:
        state = "WRITING" if self._task is not None else "IDLE"
        return f"<LineWriter fd={self.fd} {state} queued={len(self._queue)} dropped={self.dropped}>"

    def put(self, record: Any) -> None:
        """Queue one record (dropped and counted when the queue is full). Called on the
        event loop's thread."""
        queue = self._queue
        if len(queue) >= self.capacity:
            self._drop(1)
            return
        queue.append(record)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drain())

    def _drop(self, lines: int) -> None:
        self.dropped += lines
        self._count_dropped(lines)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        try:
            while queue:
                if len(queue) < self.capacity // 2:
                    # Lines gather for a moment: one hand-over to the thread per batch,
                    # not per request (each costs a task, a future and a thread wake-up).
                    await asyncio.sleep(BATCH_WINDOW_S)
                batch = list(queue)
                queue.clear()
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(1, thread_name_prefix="access-log")
                self._in_flight = len(batch)
                failed = await loop.run_in_executor(self._executor, self._write, batch)
                self._in_flight = 0
                if failed:
                    self._drop(failed)
        except Exception:  # a bug: the lines are lost, the next put starts afresh
            log.exception("access log writer failed")
        finally:
            self._task = None

    def _write(self, batch: list[Any]) -> int:
        """Serialize and write `batch` (in the worker thread); the number of lines lost."""
        data = ("\n".join(map(self._encode, batch)) + "\n").encode()
        try:
            if self._regular_file is None:
                self._regular_file = stat.S_ISREG(os.fstat(self.fd).st_mode)
            # A regular file takes the batch in one write: the workers share one open file
            # description, whose writes the kernel serializes whole; only a pipe needs
            # pieces of PIPE_BUF (and each piece is one more GIL hand-over here).
            write_whole_lines(self.fd, data, len(data) if self._regular_file else select.PIPE_BUF)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("access log: writing to fd %d failed: %s", self.fd, exc)
            return len(batch)  # a failed piece loses the lines after it too
        return 0

    async def aclose(self, flush_s: float = CLOSE_FLUSH_S) -> None:
        """Write what is queued (for at most `flush_s` seconds), then stop the thread."""
        task = self._task
        if task is not None:
            try:
                async with asyncio.timeout(flush_s):
                    await asyncio.shield(task)
            except TimeoutError:
                task.cancel()
                # The queued lines, and those the stuck thread holds, will not be written.
                self._drop(len(self._queue) + self._in_flight)
                self._queue.clear()
                log.warning("access log: output blocked, lines dropped at close")
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None


def write_whole_lines(fd: int, data: bytes, piece: int = select.PIPE_BUF) -> None:
    """Write `data` (newline-terminated lines) in pieces of at most `piece` bytes that end
    at a line boundary (a longer line goes alone). With PIPE_BUF, no piece of another
    writer on the same pipe lands inside a line (POSIX: pipe writes up to PIPE_BUF are
    atomic).

    Raises:
        OSError: the write failed (EPIPE, EBADF...).
    """
    view = memoryview(data)
    size = len(data)
    start = 0
    while start < size:
        end = start + piece
        if end >= size:
            end = size
        else:
            cut = data.rfind(b"\n", start, end)
            end = cut + 1 if cut >= start else data.index(b"\n", end) + 1
        while start < end:
            try:
                start += os.write(fd, view[start:end])
            except BlockingIOError:  # someone made the fd non-blocking: wait until writable
                select.select([], [fd], [], _WRITE_WAIT_S)


class AccessLog:
    """Log one JSON line per request."""

    OPTIONS: ClassVar[dict[str, Option]] = {
        "fields": Option.raw(
            "the fields of each line, in order",
            {
                "anyOf": [
                    {"enum": list(FIELDS)},
                    {"type": "array", "items": {"enum": list(FIELDS)}, "minItems": 1},
                ]
            },
            list(DEFAULT_FIELDS),
        ),
        "sample": Option.raw(
            "the share of requests logged, 0 to 1",
            {"type": "number", "minimum": 0, "maximum": 1},
            1.0,
        ),
        "output": Option.choice(tuple(OUTPUTS), "where lines go", "stdout"),
        "queue_size": Option.integer(
            "lines waiting to be written; more are dropped and counted", DEFAULT_QUEUE_LINES, 1
        ),
    }
    EAGER: ClassVar[bool] = True  # awaits nothing but call_next (proxy/exchange/eager.py)
    PHASES: ClassVar[bool] = True  # request_phase, response_phase (proxy/exchange/phased.py)

    def __init__(self, options: Options) -> None:
        fields = options.strings("fields", DEFAULT_FIELDS)
        unknown = [name for name in fields if name not in FIELDS]
        for name in unknown:
            hint = did_you_mean(name, FIELDS) or f" (known: {', '.join(FIELDS)})"
            options.error("fields", f"unknown field {name!r}{hint}")
        if "fields" in options and not fields:
            options.error("fields", "at least one field is required")
        chosen = list(dict.fromkeys(fields))  # in the order given, once each
        self.fields = tuple(chosen) if not unknown and chosen else DEFAULT_FIELDS
        self._all_fields = self.fields == DEFAULT_FIELDS
        self.sample = options.number("sample", 1.0)
        if self.sample > 1.0:
            options.error("sample", f"must be between 0 and 1, got {self.sample:g}")
            self.sample = 1.0
        self.output = options.choice("output", tuple(OUTPUTS), "stdout")
        queue_size = options.integer("queue_size", DEFAULT_QUEUE_LINES, minimum=1)
        self.writer = LineWriter(
            OUTPUTS[self.output], queue_size, ACCESS_LOG_DROPPED.inc, self.encode
        )
        self._second = -1  # the worker thread's cache of the formatted second
        self._second_text = ""
        self._millis = -1  # and of the whole stamp of the last millisecond
        self._millis_text = ""
        self._plan = tuple(
            (
                ("," if position else "{") + _quote(name) + ":",
                FIELDS.index(name),
                self._stamp if name == "time" else _RENDER.get(name, _quote),
            )
            for position, name in enumerate(self.fields)
        )

    def __repr__(self) -> str:
        return f"<AccessLog {self.output} sample={self.sample:g} {self.writer!r}>"

    async def close(self) -> None:
        """Flush the queued lines."""
        await self.writer.aclose()

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        state = self.request_phase(request)
        try:
            response = await call_next(request)
        except ProxyError as exc:
            return self.error_phase(request, exc, state)
        except asyncio.CancelledError:
            self.abort_phase(request, state, CLIENT_CLOSED_STATUS)
            raise
        except Exception:
            self.abort_phase(request, state, 500)  # Runtime.handle answers 500
            raise
        return self.response_phase(request, response, state)

    # Phases (proxy/plugin/base.py): the state is when the request entered, and its path.
    def request_phase(self, request: Request) -> _Entered:
        """Note when the request entered and its path as the client sent it."""
        return _Entered(perf_counter(), time.time(), request.path)

    def response_phase(self, request: Request, response: Response, state: object) -> Response:
        """Log the exchange once its response body is done with (or now: an upgrade)."""
        assert isinstance(state, _Entered)
        sample = self.sample
        if sample < 1.0 and response.status < 500 and random() >= sample:
            return response
        if response.upgrade is not None:
            self._log(request, response.status, 0, state.start, state.wall, state.path)
            return response
        body = response.body
        done = partial(self._done, request, response, state.start, state.wall, state.path)
        previous = body.on_done
        body.on_done = done if previous is None else partial(_both, previous, done)
        return response

    def error_phase(self, request: Request, error: ProxyError, state: object) -> Response:
        """An error from further in: logged as the reply it becomes."""
        return self.response_phase(request, error_reply(error, request), state)

    def abort_phase(self, request: Request, state: object, status: int) -> None:
        """No response reached us: the client went away (499), or a bug (500)."""
        assert isinstance(state, _Entered)
        if not request.exchange.error:
            gone = status == CLIENT_CLOSED_STATUS
            request.exchange.error = CLIENT_CLOSED_ERROR if gone else INTERNAL_ERROR
        self._log(request, status, 0, state.start, state.wall, state.path)

    def _done(
        self, request: Request, response: Response, start: float, wall: float, path: str
    ) -> None:
        sent = 0 if request.method == "HEAD" else response.body.bytes_read
        self._log(request, response.status, sent, start, wall, path)

    def _log(
        self, request: Request, status: int, sent: int, start: float, wall: float, path: str
    ) -> None:
        # On the event loop: only take the values (cheap); the worker thread formats them.
        self.writer.put(
            (
                wall,
                request.request_id or request_id_of(request),
                request.client[0],
                request.method,
                request.host,
                path,
                request.http_version,
                request.exchange.route_name,
                request.exchange.endpoint,
                status,
                request.body.bytes_read,
                sent,
                perf_counter() - start,
                request.exchange.upstream_s,
                request.header("user-agent") or "",
                request.consumer,
                request.exchange.retries,
                request.exchange.error,
                request.tls_version,
                *_trace_ids(request),
                request.peer[0],
            )
        )

    def encode(self, values: tuple[Any, ...]) -> str:
        """One record (values in FIELDS order) as its JSON line, in the writer's thread.

        Strings go through the json module's own escaper (what `json.dumps` uses), so the
        line is the JSON `json.dumps` would write, made without building a dict. The
        pieces are joined as strings, with no format specification in one f-string: the
        compiled build turns such an f-string into a `str.format` call that parses its
        template on every line (3.5 us a line; joined, about a third of that)."""
        if not self._all_fields:
            return self.encode_fields(values)
        v = values
        return "".join(
            (
                '{"time":',
                self._stamp(v[0]),
                ',"request_id":',
                _quote(v[1]),
                ',"client_ip":',
                _quote(v[2]),
                ',"method":',
                _quote(v[3]),
                ',"host":',
                _quote(v[4]),
                ',"path":',
                _quote(v[5]),
                ',"protocol":',
                _protocol(v[6]),
                ',"route":',
                _quote(v[7]),
                ',"endpoint":',
                _quote(v[8]),
                ',"status":',
                str(v[9]),
                ',"bytes_in":',
                str(v[10]),
                ',"bytes_out":',
                str(v[11]),
                ',"duration_s":',
                _seconds(v[12]),
                ',"upstream_s":',
                _seconds(v[13]),
                ',"user_agent":',
                _quote(v[14]),
                ',"consumer":',
                _quote(v[15]),
                ',"retries":',
                str(v[16]),
                ',"error":',
                _quote(v[17]),
                ',"tls":',
                _quote(v[18]),
                ',"trace_id":"',
                v[19],
                '","span_id":"',
                v[20],
                '"}',
            )
        )

    def encode_fields(self, values: tuple[Any, ...]) -> str:
        """`encode` for any choice of `fields`, field by field."""
        parts = []
        for prefix, index, render in self._plan:
            parts.append(prefix)
            parts.append(render(values[index]))
        parts.append("}")
        return "".join(parts)

    def _stamp(self, wall: float) -> str:
        """`wall` as a quoted RFC 3339 UTC time with milliseconds (cached per millisecond
        and the formatted second per second: lines come in time order)."""
        millis = int(wall * 1000)
        if millis == self._millis:
            return self._millis_text
        second = millis // 1000
        if second != self._second:
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        text = '"' + self._second_text + "." + str(millis % 1000).zfill(3) + 'Z"'
        self._millis = millis
        self._millis_text = text
        return text


class _Entered:
    """When a request entered the access log (perf_counter and wall clock), and its path
    as the client sent it (a later middleware may rewrite it)."""

    __slots__ = ("path", "start", "wall")

    def __init__(self, start: float, wall: float, path: str) -> None:
        self.start = start
        self.wall = wall
        self.path = path


def _trace_ids(request: Request) -> tuple[str, str]:
    """(trace id, span id) for the line: see FIELDS. Both are hex digits (no quoting)."""
    exchange = request.exchange
    trace = exchange.trace
    if trace is None:
        sent = exchange.traceparent  # b"00-<trace id>-<span id>-00", or b""
        return (sent[3:35].decode(), sent[36:52].decode()) if sent else ("", "")
    return trace.trace_id, trace.span_id or trace.hop_id


def _both(first: Callable[[], None], second: Callable[[], None]) -> None:
    """Two `on_done` callbacks, the earlier one first; one failing does not stop the other."""
    try:
        first()
    finally:
        second()
