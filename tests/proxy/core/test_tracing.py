"""proxy/core/tracing.py: the W3C traceparent rules and the sampling decision, on their
own (tests/e2e/test_tracing.py has them end to end, with a real collector)."""

from __future__ import annotations

import pytest

from proxy.core.body import Body
from proxy.core.models import Request
from proxy.core.tracing import SAMPLED, SpanRecord, Tracer, parse_traceparent

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


class Collected:
    """A SpanSink that keeps what it is given."""

    def __init__(self) -> None:
        self.spans: list[SpanRecord] = []

    def put(self, span: SpanRecord) -> None:
        self.spans.append(span)


def request(*traceparents: str) -> Request:
    raw = [(b"Host", b"api.test")] + [(b"traceparent", value.encode()) for value in traceparents]
    return Request("GET", b"/x", raw, Body.from_bytes(b""), host="api.test")


def test_a_valid_traceparent_is_read() -> None:
    assert parse_traceparent([f"00-{TRACE}-{SPAN}-01"]) == (TRACE, SPAN, 1)
    assert parse_traceparent([f" 00-{TRACE}-{SPAN}-00 "]) == (TRACE, SPAN, 0)
    # A later version: its first four fields, whatever follows.
    assert parse_traceparent([f"cc-{TRACE}-{SPAN}-01-what-ever"]) == (TRACE, SPAN, 1)


@pytest.mark.parametrize(
    "values",
    [
        [],
        [f"00-{TRACE}-{SPAN}-01", f"00-{TRACE}-{SPAN}-01"],
        [f"00-{TRACE.upper()}-{SPAN}-01"],
        [f"00-{'0' * 32}-{SPAN}-01"],
        [f"00-{TRACE}-{'0' * 16}-01"],
        [f"ff-{TRACE}-{SPAN}-01"],
        [f"00-{TRACE}-{SPAN}-01-x"],
        [f"00-{TRACE}-{SPAN}-1"],
        [f"00_{TRACE}-{SPAN}-01"],
        [f"00-{TRACE[:-1]}g-{SPAN}-01"],
    ],
)
def test_an_invalid_traceparent_is_refused(values: list[str]) -> None:
    assert parse_traceparent(values) is None


def low_bits(value: int) -> str:
    """A trace id whose low 64 bits are `value`."""
    return "1" * 16 + f"{value:016x}"


def test_the_ratio_decides_by_the_trace_ids_low_bits() -> None:
    half = Tracer(0.5, parent_based=False, sink=Collected())
    assert half.sampled(low_bits(2**63 - 1), None)
    assert not half.sampled(low_bits(2**63), None)
    assert Tracer(1.0, False, Collected()).sampled(low_bits(2**64 - 1), None)
    assert not Tracer(0.0, False, Collected()).sampled(low_bits(0), None)


def test_parent_based_follows_the_callers_flag() -> None:
    tracer = Tracer(0.0, parent_based=True, sink=Collected())
    assert tracer.sampled(low_bits(2**64 - 1), SAMPLED)
    assert not tracer.sampled(low_bits(0), 0)
    assert not tracer.sampled(low_bits(0), None)  # a new trace: the ratio


def test_a_new_unsampled_trace_costs_no_context() -> None:
    incoming = request()
    assert Tracer(0.0, True, Collected()).begin(incoming) is None
    sent = incoming.exchange.traceparent.decode()
    version, trace_id, _, flags = sent.split("-")
    assert (version, flags, len(trace_id)) == ("00", "00", 32)


def test_a_sampled_exchange_records_its_server_span() -> None:
    sink = Collected()
    incoming = request(f"00-{TRACE}-{SPAN}-01")
    trace = Tracer(0.0, True, sink).begin(incoming)
    assert trace is not None
    assert trace.recording
    hop = trace.new_hop().decode()
    assert hop.startswith(f"00-{TRACE}-")
    assert hop.endswith("-01")
    trace.end_hop(incoming, "app", "10.0.0.1:8080", 200, "", 0, "1.1")
    trace.finish(200)
    trace.finish(500)  # once
    client, server = sink.spans
    assert (client.kind, client.parent_id, client.span_id) == ("client", trace.span_id, hop[36:52])
    assert client.attributes["server.port"] == 8080
    assert (server.kind, server.parent_id, server.trace_id) == ("server", SPAN, TRACE)
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["server.address"] == "api.test"
