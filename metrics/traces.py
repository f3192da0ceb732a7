"""Export of the gateway's spans over OTLP/HTTP, with the OpenTelemetry Python SDK.

The data path records a finished span as a plain `SpanRecord` (proxy/core/tracing.py)
and hands it to `SpanExport.put`, which only appends it to a bounded queue: the event
loop never formats, encodes or sends anything. A thread of the exporter's own wakes
when a batch is full or 200 ms have passed, turns the records into the SDK's
`ReadableSpan`s (with the service's resource) and sends them with the SDK's
`OTLPSpanExporter` to the collector's `/v1/traces`, as the SDK's BatchSpanProcessor
would. Spans that do not fit the queue are dropped and counted, as the SDK drops them:
`gatehouse_tracing_spans_total{result="dropped"}`; an export the collector refuses or
does not answer (after the SDK's own retries) counts its spans as `failed`.

The thread starts with the first span, in the worker that records it (so never in the
supervisor before a fork); `aclose` sends what is queued and stops it.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections import deque
from typing import Any

from metrics.definitions import TRACING_SPANS
from proxy.core.tracing import SERVER, SpanRecord

log = logging.getLogger(__name__)

MAX_QUEUE = 2048  # spans waiting for the thread (the SDK's default max_queue_size)
# Spans per export request. Smaller than the SDK's 512: the SDK encodes a batch in one
# go (about 40 us a span), holding the GIL all along but at the interpreter's switch
# interval, so that a large batch stalls the event loop in 5 ms slices (bench/README.md).
MAX_BATCH = 64
SWITCH_INTERVAL_S = 0.0005  # the GIL switch interval of a worker that exports spans
SCHEDULE_DELAY_S = 0.2  # the longest a span waits for a batch to fill
EXPORT_TIMEOUT_S = 10.0  # one export request, the SDK's retries included
CLOSE_TIMEOUT_S = 5.0  # what closing waits for the last export

_EXPORTED = TRACING_SPANS.labels("exported")
_DROPPED = TRACING_SPANS.labels("dropped")
_FAILED = TRACING_SPANS.labels("failed")


class SpanExport:
    """A SpanSink (proxy/core/tracing.py) that exports through the OpenTelemetry SDK."""

    def __init__(
        self,
        collector: str,
        headers: tuple[tuple[str, str], ...],
        service_name: str,
        version: str,
    ) -> None:
        """`collector` is the collector's base URL (`tracing.otlp_endpoint`); `headers`
        go with every export request."""
        # Imported here: a gateway that does not export spans never loads the SDK.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource

        self.settings = (collector, headers, service_name)  # what a reload compares
        self.endpoint = f"{collector}/v1/traces"
        self._exporter = OTLPSpanExporter(
            endpoint=self.endpoint, headers=dict(headers), timeout=EXPORT_TIMEOUT_S
        )
        self._resource = Resource.create({"service.name": service_name, "service.version": version})
        self._queue: deque[SpanRecord] = deque()
        self._wake = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"<SpanExport to {self.endpoint} queued={len(self._queue)}>"

    def put(self, span: SpanRecord) -> None:
        """Queue a finished span (on the event loop: never blocks)."""
        queue = self._queue
        if len(queue) >= MAX_QUEUE or self._closing:
            _DROPPED.inc()
            return
        queue.append(span)
        if self._thread is None:
            # The event loop gives up the GIL at every poll and then waits for the export
            # thread to give it back, up to the switch interval: 5 ms by default, a stall
            # of every request in flight (the convoy effect). A shorter interval bounds
            # that wait while the thread encodes (bench/README.md, tracing).
            sys.setswitchinterval(SWITCH_INTERVAL_S)
            self._thread = threading.Thread(
                target=self._run, name="gatehouse-span-export", daemon=True
            )
            self._thread.start()
        elif len(queue) == MAX_BATCH:
            self._wake.set()

    async def aclose(self) -> None:
        """Export what is queued (for at most CLOSE_TIMEOUT_S) and stop the thread."""
        self._closing = True
        thread = self._thread
        if thread is None:
            return
        self._wake.set()
        await asyncio.to_thread(thread.join, CLOSE_TIMEOUT_S)
        if thread.is_alive():
            log.warning("span export to %s did not finish in %ss", self.endpoint, CLOSE_TIMEOUT_S)

    def _run(self) -> None:
        queue = self._queue
        while True:
            self._wake.wait(SCHEDULE_DELAY_S)
            self._wake.clear()
            while queue:
                batch = [queue.popleft() for _ in range(min(len(queue), MAX_BATCH))]
                self._export(batch)
            if self._closing:
                self._exporter.shutdown()  # type: ignore[no-untyped-call]
                return

    def _export(self, batch: list[SpanRecord]) -> None:
        from opentelemetry.sdk.trace.export import SpanExportResult

        try:
            result = self._exporter.export([self._readable(span) for span in batch])
        except Exception:  # the SDK should not raise; a bug there must not stop exporting
            log.exception("span export to %s failed", self.endpoint)
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            _EXPORTED.inc(len(batch))
        else:
            _FAILED.inc(len(batch))

    def _readable(self, span: SpanRecord) -> Any:
        """The SDK's ReadableSpan for a record."""
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

        trace_id = int(span.trace_id, 16)
        sampled = TraceFlags(TraceFlags.SAMPLED)
        parent = (
            SpanContext(trace_id, int(span.parent_id, 16), is_remote=span.kind == SERVER)
            if span.parent_id
            else None
        )
        return ReadableSpan(
            name=span.name,
            context=SpanContext(trace_id, int(span.span_id, 16), False, sampled),
            parent=parent,
            resource=self._resource,
            attributes=span.attributes,
            kind=SpanKind.SERVER if span.kind == SERVER else SpanKind.CLIENT,
            status=Status(StatusCode.ERROR) if span.error else Status(StatusCode.UNSET),
            start_time=span.start_ns,
            end_time=span.end_ns,
        )
