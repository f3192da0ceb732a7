"""W3C Trace Context (https://www.w3.org/TR/trace-context/) and the spans of one exchange.

Propagation happens on every request, traced or not: the upstream hop always gets a
`traceparent` of the gateway's making.

- A request with one valid `traceparent` continues that trace: each upstream try gets a
  new span id under it, and `tracestate` passes on unchanged.
- A request without one, or with an invalid one (bad syntax, an all-zero id, version
  `ff`, or two of them), starts a new trace; a `tracestate` that came with it is dropped,
  as the specification asks, since it belonged to a trace we did not continue.

What the client sent as `traceparent` never reaches the upstream as it was
(proxy/core/headers.py drops it with the hop-by-hop fields), so a client cannot make an
upstream's span a child of a span it did not make through us.

When `tracing:` is configured (`Tracer`), the exchange also gets a `TraceContext` from
its arrival (`Tracer.begin`). A sampled one records a server span for the exchange and a
client span for each upstream try (`SpanRecord`), and hands each finished span to the
tracer's sink: metrics/traces.py, which exports them with the OpenTelemetry SDK from a
thread of its own. A sampled-out request costs the propagation and nothing more.

Sampling follows the OpenTelemetry SDK's `ParentBased(TraceIdRatioBased(ratio))`: with
`parent_based`, a request whose `traceparent` says sampled (flag 01) is sampled and one
that says not is not; a new trace (or every trace, without `parent_based`) is sampled
when the low 64 bits of its trace id fall below `ratio * 2**64`, so every gateway and
service deciding by ratio decides alike for one trace id.
"""

from __future__ import annotations

import re
from time import time_ns
from typing import Protocol

from proxy.core.ids import new_span_id, new_trace_id, new_traceparent
from proxy.core.models import Request

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

# Version 00 exactly; a later version may append fields after a "-" (the specification's
# forward compatibility), and version ff is invalid.
_TRACEPARENT = re.compile(
    r"[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[^\t ]*)?[ \t]*"
)
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
SAMPLED = 0x01

SERVER = "server"
CLIENT = "client"

# The flags field as sent upstream: only the sampled bit is the gateway's to set.
_FLAGS = (b"-00", b"-01")


def parse_traceparent(values: list[str]) -> tuple[str, str, int] | None:
    """(trace id, parent span id, flags) from the request's `traceparent` field lines;
    None when there is not exactly one, or it is invalid (see the module docstring)."""
    if len(values) != 1:
        return None
    match = _TRACEPARENT.fullmatch(values[0])
    if match is None:
        return None
    version, trace_id, parent_id, flags, rest = match.groups()
    if version == "ff" or trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    if version == "00" and rest is not None:
        return None  # version 00 has exactly four fields
    return trace_id, parent_id, int(flags, 16)


class SpanSink(Protocol):
    """Where finished spans go (metrics/traces.py's exporter). `put` runs on the event
    loop and must never block."""

    def put(self, span: SpanRecord) -> None: ...


class SpanRecord:
    """One finished span, as plain data: what the exporter's thread turns into the
    OpenTelemetry SDK's span objects. `attributes` follow OpenTelemetry's HTTP semantic
    conventions (metrics/traces.py adds the service's resource)."""

    __slots__ = (
        "attributes",
        "end_ns",
        "error",
        "kind",
        "name",
        "parent_id",
        "span_id",
        "start_ns",
        "trace_id",
    )

    def __init__(
        self,
        trace_id: str,
        span_id: str,
        parent_id: str,
        name: str,
        kind: str,
        start_ns: int,
        end_ns: int,
        attributes: dict[str, str | int],
        error: bool,
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id  # "" for a trace's root span
        self.name = name
        self.kind = kind  # SERVER or CLIENT
        self.start_ns = start_ns  # Unix time, nanoseconds
        self.end_ns = end_ns
        self.attributes = attributes
        self.error = error  # the span's status is ERROR (else unset)

    def __repr__(self) -> str:
        return f"<SpanRecord {self.kind} {self.name!r} {self.trace_id}/{self.span_id}>"


class TraceContext:
    """The trace an exchange belongs to (`request.exchange.trace`), and, when it is
    recorded, its server span and the client span of the upstream try under way."""

    __slots__ = (
        "flags",
        "hop_id",
        "hop_start_ns",
        "parent_id",
        "request",
        "sink",
        "span_id",
        "start_ns",
        "trace_id",
        "tracestate",
    )

    def __init__(
        self,
        trace_id: str,
        parent_id: str,
        flags: int,
        tracestate: str | None,
        sink: SpanSink | None = None,
        request: Request | None = None,
    ) -> None:
        self.trace_id = trace_id
        self.parent_id = parent_id  # the caller's span ("" when the trace starts here)
        self.flags = flags  # what the upstream hop is told (its sampled bit)
        self.tracestate = tracestate  # passed on as it came; None: none, or dropped
        # Recorded spans go here; None: not recorded (sampled out, or no tracing at all).
        self.sink = sink
        self.request = request  # while a recorded server span is open (its attributes)
        # The gateway's own span: its server span when recorded, else "" (the hops are
        # then children of the caller's span directly, as with any non-recording hop).
        self.span_id = new_span_id() if sink is not None else ""
        self.start_ns = time_ns() if sink is not None else 0
        self.hop_id = ""  # the span id the current upstream try was sent with
        self.hop_start_ns = 0

    @property
    def recording(self) -> bool:
        return self.sink is not None

    def new_hop(self) -> bytes:
        """A `traceparent` for a new upstream try: a new span id under this exchange's
        span (a recorded client span starts now)."""
        self.hop_id = hop = new_span_id()
        if self.sink is not None:
            self.hop_start_ns = time_ns()
        flags = _FLAGS[self.flags & SAMPLED]
        return b"".join((b"00-", self.trace_id.encode(), b"-", hop.encode(), flags))

    def end_hop(
        self,
        request: Request,
        upstream: str,
        endpoint: str,
        status: int | None,
        error_type: str,
        resend_count: int,
        protocol: str,
    ) -> None:
        """The upstream try sent with `hop_id` ended: at its response head (`status`) or
        with a failure (`error_type`, a gateway error code). Records its client span."""
        sink = self.sink
        hop = self.hop_id
        if sink is None or not hop:
            return
        self.hop_id = ""
        method = request.method
        host, _, port = endpoint.rpartition(":")
        attributes: dict[str, str | int] = {
            "http.request.method": method,
            "server.address": host.strip("[]"),
            "network.protocol.version": protocol,
            "gatehouse.upstream": upstream,
        }
        if port.isdigit():
            attributes["server.port"] = int(port)
        if status is not None:
            attributes["http.response.status_code"] = status
        if resend_count:
            attributes["http.request.resend_count"] = resend_count
        failed = bool(error_type) or (status is not None and status >= 400)
        if error_type:
            attributes["error.type"] = error_type
        elif status is not None and status >= 400:
            attributes["error.type"] = str(status)
        sink.put(
            SpanRecord(
                self.trace_id,
                hop,
                self.span_id,
                method,
                CLIENT,
                self.hop_start_ns,
                time_ns(),
                attributes,
                failed,
            )
        )

    def finish(self, status: int, error: str = "") -> None:
        """The exchange ended with `status` (499: the client went away): records the
        server span, once (a later end, of a body broken off after its head, is a no-op)."""
        sink = self.sink
        request = self.request
        if sink is None or request is None:
            return
        self.sink = None
        self.request = None
        exchange = request.exchange
        route = exchange.route_name
        method = request.method
        attributes: dict[str, str | int] = {
            "http.request.method": method,
            "url.path": request.path,
            "url.scheme": request.scheme,
            "network.protocol.version": request.http_version,
            "http.response.status_code": status,
            "client.address": request.client[0],
        }
        host = request.host
        if host:
            name, _, port = host.rpartition(":") if host[-1:].isdigit() else (host, "", "")
            if not name:
                name, port = host, ""
            attributes["server.address"] = name.strip("[]")
            if port.isdigit():
                attributes["server.port"] = int(port)
        if route:
            attributes["http.route"] = route
        user_agent = request.header("user-agent")
        if user_agent:
            attributes["user_agent.original"] = user_agent
        if exchange.endpoint:
            attributes["gatehouse.endpoint"] = exchange.endpoint
        if exchange.retries:
            attributes["gatehouse.retries"] = exchange.retries
        error = error or exchange.error
        if error:
            attributes["gatehouse.error"] = error
            attributes["error.type"] = error
        elif status >= 500:
            attributes["error.type"] = str(status)
        sink.put(
            SpanRecord(
                self.trace_id,
                self.span_id,
                self.parent_id,
                f"{method} {route}" if route else method,
                SERVER,
                self.start_ns,
                time_ns(),
                attributes,
                status >= 500,
            )
        )


def end_exchange(request: Request | None, status: int) -> None:
    """The exchange of `request` ended with `status` (the front ends call this where
    they count it): its server span, if it records one, is finished."""
    if request is not None:
        trace = request.exchange.trace
        if trace is not None and trace.sink is not None:
            trace.finish(status)


def _header_lines(request: Request, name: str) -> list[str]:
    """Every value of field `name` (lower-case), without turning raw headers into a dict."""
    raw = request.raw_headers
    if raw is None:
        return request.headers.getall(name, [])
    wanted = name.encode()
    size = len(wanted)
    return [v.decode("latin-1") for n, v in raw if len(n) == size and n.lower() == wanted]


def continue_or_start(
    traceparents: list[str], tracestates: list[str]
) -> tuple[str, str, int, str | None]:
    """(trace id, parent span id, flags, tracestate) for a request that carried these
    `traceparent` and `tracestate` lines: the caller's trace when it is valid, else a
    new one with no parent (flags 00, tracestate dropped)."""
    parsed = parse_traceparent(traceparents)
    if parsed is None:
        return new_trace_id(), "", 0, None
    trace_id, parent_id, flags = parsed
    return trace_id, parent_id, flags, ", ".join(tracestates) if tracestates else None


def propagation_only(traceparents: list[str], tracestates: list[str]) -> TraceContext:
    """The context of a request on a gateway that does not trace: the hop continues the
    caller's trace (its sampled flag included) or starts an unsampled one."""
    trace_id, parent_id, flags, state = continue_or_start(traceparents, tracestates)
    return TraceContext(trace_id, parent_id, flags, state)


class Tracer:
    """The `tracing:` section at work: starts each exchange's TraceContext, sampled or
    not (see the module docstring)."""

    __slots__ = ("_bound", "parent_based", "sink")

    def __init__(self, sample_ratio: float, parent_based: bool, sink: SpanSink | None) -> None:
        # TraceIdRatioBased: sampled when the trace id's low 64 bits are below the bound.
        self._bound = round(max(0.0, min(1.0, sample_ratio)) * (1 << 64))
        self.parent_based = parent_based
        self.sink = sink  # None: propagate only (no collector configured)

    def sampled(self, trace_id: str, parent_flags: int | None) -> bool:
        """The sampling decision for a trace (`parent_flags`: the caller's flags, None
        when the trace starts here)."""
        if parent_flags is not None and self.parent_based:
            return bool(parent_flags & SAMPLED)
        return int(trace_id[16:], 16) < self._bound

    def begin(self, request: Request) -> TraceContext | None:
        """The context of an exchange that has just arrived; None for the common case of
        a trace that starts here and is not sampled: the exchange then carries only the
        `traceparent` its upstream tries continue (`Exchange.traceparent`), as on a
        gateway that does not trace, and costs nothing more."""
        parents = _header_lines(request, TRACEPARENT)
        sink = self.sink
        if not parents:
            if sink is None:
                return None  # the first upstream try starts the trace (headers.py)
            header = new_traceparent()  # b"00-<trace id>-<span id>-00"
            if int(header[19:35], 16) >= self._bound:
                request.exchange.traceparent = header
                return None
            return TraceContext(header[3:35].decode(), "", SAMPLED, None, sink, request)
        states = _header_lines(request, TRACESTATE)
        trace_id, parent_id, flags, state = continue_or_start(parents, states)
        if sink is None:  # no collector: propagate the caller's decision as it came
            return TraceContext(trace_id, parent_id, flags, state)
        if self.sampled(trace_id, flags if parent_id else None):
            return TraceContext(trace_id, parent_id, flags | SAMPLED, state, sink, request)
        return TraceContext(trace_id, parent_id, flags & ~SAMPLED, state)
