"""A real OTLP/HTTP trace receiver, and services traced with the OpenTelemetry SDK.

`OtlpReceiver` is what a collector is to the gateway: an HTTP server on 127.0.0.1 that
takes `POST /v1/traces`, decodes the protobuf body with `opentelemetry-proto` (gzip
too), and keeps every span it was sent. Tests wait on it for the spans they expect
(`wait_for`), never for a time.

`TracedHttpUpstream` and `TracingInterceptor` are upstreams that trace as services
instrumented with the SDK do: they take the caller's context from `traceparent` with the
SDK's W3C propagator, record a server span under it, and export it to the same
receiver, so a test sees the whole chain: client, gateway, service.
"""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import grpc.aio
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

WAIT_S = 30.0
POLL_S = 0.05  # how often a server thread looks for its shutdown (stop waits for it)

_KINDS = {1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as the receiver decoded it (ids as lowercase hex, "" for no parent)."""

    service: str
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]
    status: int  # 0 unset, 1 ok, 2 error
    start_ns: int
    end_ns: int


def _answer(
    handler: BaseHTTPRequestHandler, status: int, content_type: str, payload: bytes
) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    handler.wfile.write(payload)


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind is not None else None


@dataclass
class OtlpReceiver:
    """An OTLP/HTTP receiver (see the module docstring); `url` is its base URL."""

    spans: list[ReceivedSpan] = field(default_factory=list)
    # Each export request's headers (names lower-cased), and the services whose spans it carried.
    requests: list[tuple[dict[str, str], set[str]]] = field(default_factory=list)
    answer_status: int = 200  # what it answers exports with (a failing collector)
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> OtlpReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver._received(body, {k.lower(): v for k, v in self.headers.items()})
                payload = ExportTraceServiceResponse().SerializeToString()
                _answer(self, receiver.answer_status, "application/x-protobuf", payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, args=(POLL_S,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _received(self, body: bytes, headers: dict[str, str]) -> None:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        found: list[ReceivedSpan] = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found.append(
                        ReceivedSpan(
                            service=str(resource.get("service.name", "")),
                            name=span.name,
                            kind=_KINDS.get(span.kind, str(span.kind)),
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            status=span.status.code,
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                        )
                    )
        with self._changed:
            self.requests.append((headers, {span.service for span in found}))
            self.spans.extend(found)
            self._changed.notify_all()

    def wait_for(
        self, predicate: Callable[[list[ReceivedSpan]], bool], what: str, timeout_s: float = WAIT_S
    ) -> list[ReceivedSpan]:
        """The spans received, once `predicate` holds for them (AssertionError after
        `timeout_s`, naming `what` and what did come)."""
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(list(self.spans)), timeout_s):
                got = [(s.service, s.kind, s.name) for s in self.spans]
                raise AssertionError(f"no {what} within {timeout_s}s; received {got}")
            return list(self.spans)

    def of_trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._changed:
            return [span for span in self.spans if span.trace_id == trace_id]


@contextmanager
def otlp_receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver().start()
    try:
        yield receiver
    finally:
        receiver.stop()


def sdk_tracer(receiver: OtlpReceiver, service: str) -> tuple[Any, TracerProvider]:
    """A tracer of the official SDK exporting each span at its end to `receiver`."""
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    exporter = OTLPSpanExporter(endpoint=f"{receiver.url}/v1/traces", timeout=10)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("tests.support.otlp"), provider


_PROPAGATOR = TraceContextTextMapPropagator()


def record_server_span(tracer: Any, name: str, carrier: dict[str, str]) -> None:
    """A server span under the caller's context that `carrier` (request fields) holds."""
    context = _PROPAGATOR.extract(carrier)
    with tracer.start_as_current_span(name, context=context, kind=SpanKind.SERVER):
        pass


class TracedHttpUpstream:
    """An HTTP/1.1 service traced with the SDK: every request records a server span under
    its `traceparent` and is answered with the trace fields it saw, as JSON."""

    def __init__(self, receiver: OtlpReceiver, service: str = "backend", status: int = 200) -> None:
        self._tracer, self._provider = sdk_tracer(receiver, service)
        self.seen: list[dict[str, str]] = []  # each request's trace fields
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                fields = {
                    name: value
                    for name, value in self.headers.items()
                    if name.lower() in ("traceparent", "tracestate")
                }
                lowered = {name.lower(): value for name, value in fields.items()}
                upstream.seen.append(lowered)
                record_server_span(upstream._tracer, f"GET {self.path}", lowered)
                _answer(self, status, "application/json", json.dumps(lowered).encode())

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(POLL_S,), daemon=True).start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._provider.shutdown()


class TracingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """A grpc.aio server interceptor that traces each call as an SDK-instrumented
    service would: a server span under the call's `traceparent` metadata."""

    def __init__(self, receiver: OtlpReceiver, service: str = "grpc-backend") -> None:
        self._tracer, self.provider = sdk_tracer(receiver, service)

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        carrier = {key: value for key, value in details.invocation_metadata or ()}
        record_server_span(self._tracer, details.method, carrier)
        return await continuation(details)
