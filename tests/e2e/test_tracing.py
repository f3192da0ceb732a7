"""Tracing, end to end: a real OTLP/HTTP receiver (tests/support/otlp.py) that decodes
what the gateway's OpenTelemetry SDK exporter sends, and upstreams traced with the SDK,
so that each test sees the whole chain of spans: the caller's, the gateway's server
span, one client span per upstream try, and the service's server span under it.

Over HTTP/1.1 and HTTP/2 from the client, and gRPC (h2c on both hops). The waits are
for spans to arrive, never for a time; an absence is shown by a later span arriving
first (one worker exports its spans in the order they ended).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest

from proxy.process.server import Server
from tests.support.gateway import GatewayFactory, base_url
from tests.support.grpc_service import echo_client, echo_server
from tests.support.metrics_scrape import eventually, metric
from tests.support.otlp import (
    OtlpReceiver,
    ReceivedSpan,
    TracedHttpUpstream,
    TracingInterceptor,
    otlp_receiver,
)

pytestmark = pytest.mark.socket

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def caller(flags: str = "01", trace: str = CALLER_TRACE) -> str:
    return f"00-{trace}-{CALLER_SPAN}-{flags}"


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with otlp_receiver() as running:
        yield running


@pytest.fixture
def backend(receiver: OtlpReceiver) -> Iterator[TracedHttpUpstream]:
    upstream = TracedHttpUpstream(receiver)
    yield upstream
    upstream.stop()


def tracing_config(
    upstream_url: str,
    receiver: OtlpReceiver | None,
    *,
    tracing: str = "",
    endpoints: str = "",
    retries: str = "",
    protocol: str = "",
) -> str:
    section = ""
    if receiver is not None:
        section = (
            "tracing:\n"
            f"  otlp_endpoint: {receiver.url}\n"
            "  service_name: edge\n"
            "  headers: {X-Collector-Key: s3cret}\n"
            f"{tracing}"
        )
    return f"""
listeners: [{{bind: 127.0.0.1:0}}]
upstreams:
  app:
    endpoints: [{endpoints}{upstream_url}]
    timeouts: {{connect: 2s, read: 10s}}
{protocol}{retries}
routes:
  - name: api
    match: {{path_prefix: /}}
    upstream: app
{section}"""


async def spans_of(receiver: OtlpReceiver, trace_id: str, count: int) -> list[ReceivedSpan]:
    """The spans of `trace_id`, once `count` of them have come."""
    await asyncio.to_thread(
        receiver.wait_for,
        lambda spans: sum(span.trace_id == trace_id for span in spans) >= count,
        f"{count} spans of trace {trace_id}",
    )
    return receiver.of_trace(trace_id)


def one(spans: list[ReceivedSpan], service: str, kind: str) -> ReceivedSpan:
    found = [span for span in spans if span.service == service and span.kind == kind]
    assert len(found) == 1, found
    return found[0]


def assert_chain(spans: list[ReceivedSpan], parent_of_server: str, backend: str) -> None:
    """caller -> gateway server span -> gateway client span -> the service's span."""
    server = one(spans, "edge", "server")
    client = one(spans, "edge", "client")
    service = one(spans, backend, "server")
    assert server.parent_id == parent_of_server
    assert client.parent_id == server.span_id
    assert service.parent_id == client.span_id
    assert server.start_ns <= client.start_ns <= client.end_ns <= server.end_ns


async def test_http1_continues_the_callers_trace_through_a_traced_service(
    gateway_factory: GatewayFactory, receiver: OtlpReceiver, backend: TracedHttpUpstream
) -> None:
    gateway = await gateway_factory(tracing_config(backend.url, receiver))
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(
            f"{base_url(gateway)}/orders/7?secret=x",
            headers={"traceparent": caller(), "tracestate": "vendor=abc", "User-Agent": "t/1"},
        )
    assert response.status_code == 200
    spans = await spans_of(receiver, CALLER_TRACE, 3)
    assert_chain(spans, CALLER_SPAN, "backend")
    server, client_span = one(spans, "edge", "server"), one(spans, "edge", "client")
    # What the service was told: the client span, sampled, and the caller's tracestate.
    assert response.json() == {
        "traceparent": f"00-{CALLER_TRACE}-{client_span.span_id}-01",
        "tracestate": "vendor=abc",
    }
    assert server.name == "GET api"
    host, port = gateway.addresses[0]
    assert server.attributes == {
        "http.request.method": "GET",
        "url.path": "/orders/7",  # never the query string: it may hold secrets
        "url.scheme": "http",
        "network.protocol.version": "1.1",
        "http.response.status_code": 200,
        "client.address": "127.0.0.1",
        "server.address": host,
        "server.port": port,
        "http.route": "api",
        "user_agent.original": "t/1",
        "gatehouse.endpoint": backend.url.removeprefix("http://"),
    }
    assert server.status == 0
    upstream_port = int(backend.url.rpartition(":")[2])
    assert client_span.name == "GET"
    assert client_span.attributes == {
        "http.request.method": "GET",
        "server.address": "127.0.0.1",
        "server.port": upstream_port,
        "network.protocol.version": "1.1",
        "gatehouse.upstream": "app",
        "http.response.status_code": 200,
    }
    # The collector's credentials went with the export.
    ours = [headers for headers, services in receiver.requests if "edge" in services]
    assert ours
    assert all(headers.get("x-collector-key") == "s3cret" for headers in ours), ours


async def test_a_request_without_traceparent_starts_a_trace(
    gateway_factory: GatewayFactory, receiver: OtlpReceiver, backend: TracedHttpUpstream
) -> None:
    gateway = await gateway_factory(tracing_config(backend.url, receiver))
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"{base_url(gateway)}/", headers={"tracestate": "x=1"})
    seen = response.json()
    assert "tracestate" not in seen  # it belonged to no trace we continue
    version, trace_id, span_id, flags = seen["traceparent"].split("-")
    assert (version, flags) == ("00", "01")
    spans = await spans_of(receiver, trace_id, 3)
    assert_chain(spans, "", "backend")
    assert one(spans, "edge", "client").span_id == span_id


async def test_http2_client(
    gateway_factory: GatewayFactory, receiver: OtlpReceiver, backend: TracedHttpUpstream
) -> None:
    gateway = await gateway_factory(tracing_config(backend.url, receiver))
    async with httpx.AsyncClient(http1=False, http2=True, timeout=10) as client:
        response = await client.get(f"{base_url(gateway)}/h2", headers={"traceparent": caller()})
    assert response.http_version == "HTTP/2"
    spans = await spans_of(receiver, CALLER_TRACE, 3)
    assert_chain(spans, CALLER_SPAN, "backend")
    assert one(spans, "edge", "server").attributes["network.protocol.version"] == "2"


async def test_grpc_calls_are_traced_to_a_traced_grpc_service(
    gateway_factory: GatewayFactory, receiver: OtlpReceiver
) -> None:
    interceptor = TracingInterceptor(receiver)
    async with echo_server(interceptors=[interceptor]) as port:
        config = tracing_config(
            f"http://127.0.0.1:{port}", receiver, protocol="    protocol: h2c\n"
        )
        gateway = await gateway_factory(config)
        host, gateway_port = gateway.addresses[0]
        async with echo_client(f"{host}:{gateway_port}") as client:
            assert await client.unary(b"hi", metadata=(("traceparent", caller()),)) == b"hi"
        spans = await spans_of(receiver, CALLER_TRACE, 3)
    interceptor.provider.shutdown()
    assert_chain(spans, CALLER_SPAN, "grpc-backend")
    server = one(spans, "edge", "server")
    assert server.name == "POST api"
    assert server.attributes["url.path"] == "/test.Echo/Unary"
    assert server.attributes["network.protocol.version"] == "2"
    assert one(spans, "edge", "client").attributes["network.protocol.version"] == "2"


async def test_each_try_is_a_client_span_and_a_gateway_error_is_named(
    gateway_factory: GatewayFactory, receiver: OtlpReceiver, backend: TracedHttpUpstream
) -> None:
    # The first endpoint refuses connections (nothing listens on port 1); the retry
    # policy tries the other one.
    retries = "    retries: {attempts: 2, on: [connect-failure], backoff: {base: 1ms}}\n"
    config = tracing_config(
        backend.url,
        receiver,
        endpoints="http://127.0.0.1:1, ",
        retries=retries + "    balance: round_robin\n",
    )
    gateway = await gateway_factory(config)
    async with httpx.AsyncClient(timeout=10) as client:
        statuses = [
            (
                await client.get(f"{base_url(gateway)}/", headers={"traceparent": caller(t)})
            ).status_code
            for t in ("01",)
        ]
    assert statuses == [200]
    spans = await spans_of(receiver, CALLER_TRACE, 4)
    server = one(spans, "edge", "server")
    tries = sorted(
        (span for span in spans if span.kind == "client"), key=lambda span: span.start_ns
    )
    assert [span.parent_id for span in tries] == [server.span_id] * 2
    assert tries[0].attributes["error.type"] == "upstream_connect_failed"
    assert tries[0].attributes["server.port"] == 1
    assert tries[0].status == 2
    assert "http.request.resend_count" not in tries[0].attributes
    assert tries[1].attributes["http.request.resend_count"] == 1
    assert tries[1].attributes["http.response.status_code"] == 200
    assert server.attributes["gatehouse.retries"] == 1
    assert one(spans, "backend", "server").parent_id == tries[1].span_id


async def test_a_gateway_error_marks_the_server_span(
    gateway_factory: GatewayFactory, receiver: OtlpReceiver
) -> None:
    gateway = await gateway_factory(tracing_config("http://127.0.0.1:1", receiver))
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"{base_url(gateway)}/", headers={"traceparent": caller()})
    assert response.status_code == 502
    # The server span ends after every try (the default policy retries a connect failure).
    spans = await spans_of(receiver, CALLER_TRACE, 3)
    server = one(spans, "edge", "server")
    assert server.status == 2  # ERROR
    assert server.attributes["error.type"] == "upstream_connect_failed"
    assert server.attributes["gatehouse.error"] == "upstream_connect_failed"
    assert server.attributes["http.response.status_code"] == 502
    tries = [span for span in spans if span.kind == "client"]
    assert [span.attributes["error.type"] for span in tries] == ["upstream_connect_failed"] * 2
    assert [span.parent_id for span in tries] == [server.span_id] * 2


async def test_a_local_reply_before_routing_is_traced_too(
    gateway_factory: GatewayFactory, receiver: OtlpReceiver, backend: TracedHttpUpstream
) -> None:
    config = tracing_config(backend.url, receiver).replace(
        "match: {path_prefix: /}", "match: {path_prefix: /api}"
    )
    gateway = await gateway_factory(config)
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(
            f"{base_url(gateway)}/nowhere", headers={"traceparent": caller()}
        )
    assert response.status_code == 404
    [server] = await spans_of(receiver, CALLER_TRACE, 1)
    assert server.name == "GET"  # no route
    assert server.attributes["gatehouse.error"] == "no_route"
    assert "http.route" not in server.attributes
    assert server.status == 0  # a 4xx is not a server error


async def test_sampling_follows_the_parent_and_the_ratio(
    gateway_factory: GatewayFactory, receiver: OtlpReceiver, backend: TracedHttpUpstream
) -> None:
    gateway = await gateway_factory(
        tracing_config(backend.url, receiver, tracing="  sample_ratio: 0\n")
    )
    unsampled_trace = "a" * 32
    async with httpx.AsyncClient(timeout=10) as client:
        url = f"{base_url(gateway)}/"
        # The caller said not sampled: propagated as not sampled, under a new span id.
        seen = (
            await client.get(url, headers={"traceparent": caller("00", unsampled_trace)})
        ).json()
        _, trace_id, span_id, flags = seen["traceparent"].split("-")
        assert (trace_id, flags) == (unsampled_trace, "00")
        assert span_id != CALLER_SPAN
        # No caller and a ratio of 0: a new trace, not sampled.
        fresh = (await client.get(url)).json()["traceparent"].split("-")
        assert fresh[3] == "00"
        assert fresh[1] != unsampled_trace
        # The caller said sampled: parent_based follows it whatever the ratio.
        await client.get(url, headers={"traceparent": caller("01")})
    spans = await spans_of(receiver, CALLER_TRACE, 3)
    assert_chain(spans, CALLER_SPAN, "backend")
    # The sampled request ended last; the unsampled ones were before it in the queue, so
    # the gateway recorded nothing of theirs (only the service did, under its own rules).
    gateway_traces = {span.trace_id for span in receiver.spans if span.service == "edge"}
    assert gateway_traces == {CALLER_TRACE}


async def test_without_parent_based_the_ratio_decides_alone(
    gateway_factory: GatewayFactory, receiver: OtlpReceiver, backend: TracedHttpUpstream
) -> None:
    gateway = await gateway_factory(
        tracing_config(backend.url, receiver, tracing="  sample_ratio: 0\n  parent_based: false\n")
    )
    async with httpx.AsyncClient(timeout=10) as client:
        seen = (
            await client.get(f"{base_url(gateway)}/", headers={"traceparent": caller("01")})
        ).json()
    # Sampled out by the ratio: the service is told so.
    assert seen["traceparent"].endswith("-00")


async def test_a_failing_collector_is_counted_and_the_gateway_serves_on(
    gateway_factory: GatewayFactory, receiver: OtlpReceiver, backend: TracedHttpUpstream
) -> None:
    receiver.answer_status = 400  # refused: the SDK does not retry a 400
    gateway = await gateway_factory(tracing_config(backend.url, receiver))
    before = metric("gatehouse_tracing_spans_total", result="failed")
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"{base_url(gateway)}/", headers={"traceparent": caller()})
    assert response.status_code == 200
    await spans_of(receiver, CALLER_TRACE, 2)  # received, then refused
    # The thread counts after the receiver has answered: no event to wait on here.
    await eventually(
        "the failed export counted",
        lambda: metric("gatehouse_tracing_spans_total", result="failed") >= before + 2,
        within_s=30,
    )


@pytest.fixture
async def plain_gateway(gateway_factory: GatewayFactory, backend: TracedHttpUpstream) -> Server:
    """A gateway without `tracing:`: propagation only."""
    return await gateway_factory(tracing_config(backend.url, None))


@pytest.mark.parametrize(
    "sent",
    [
        [f"00-{CALLER_TRACE.upper()}-{CALLER_SPAN}-01"],  # hex must be lower case
        [f"00-{'0' * 32}-{CALLER_SPAN}-01"],  # all-zero trace id
        [f"00-{CALLER_TRACE}-{'0' * 16}-01"],  # all-zero parent
        [f"ff-{CALLER_TRACE}-{CALLER_SPAN}-01"],  # version ff
        [f"00-{CALLER_TRACE}-{CALLER_SPAN}-01-extra"],  # version 00 has four fields
        [caller(), caller()],  # two of them
        [f"00-{CALLER_TRACE}-{CALLER_SPAN}"],
        ["garbage"],
    ],
    ids=["upper", "zero-trace", "zero-parent", "ff", "extra", "two", "short", "garbage"],
)
async def test_an_invalid_traceparent_starts_a_new_trace(
    plain_gateway: Server, sent: list[str]
) -> None:
    headers = [("traceparent", value) for value in sent] + [("tracestate", "vendor=1")]
    async with httpx.AsyncClient(timeout=10) as client:
        seen = (await client.get(f"{base_url(plain_gateway)}/", headers=headers)).json()
    version, trace_id, _, flags = seen["traceparent"].split("-")
    assert version == "00"
    assert trace_id not in (CALLER_TRACE, "0" * 32)
    assert flags == "00"  # a trace started by a gateway that does not trace: unsampled
    assert "tracestate" not in seen


async def test_without_tracing_the_callers_trace_is_continued(plain_gateway: Server) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        first = (
            await client.get(
                f"{base_url(plain_gateway)}/",
                headers={"traceparent": caller("01"), "tracestate": "a=1,b=2"},
            )
        ).json()
        second = (
            await client.get(f"{base_url(plain_gateway)}/", headers={"traceparent": caller("01")})
        ).json()
    version, trace_id, span_id, flags = first["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", CALLER_TRACE, "01")
    assert span_id not in (CALLER_SPAN, "0" * 16)
    assert first["tracestate"] == "a=1,b=2"
    assert second["traceparent"].split("-")[2] != span_id  # a new span id per hop
    # A version from the future is read for its first four fields.
    async with httpx.AsyncClient(timeout=10) as client:
        future = f"01-{CALLER_TRACE}-{CALLER_SPAN}-01-more"
        seen = (
            await client.get(f"{base_url(plain_gateway)}/", headers={"traceparent": future})
        ).json()
    assert seen["traceparent"].startswith(f"00-{CALLER_TRACE}-")


def with_access_log(config: str) -> str:
    return config + "middleware:\n  log: {type: access_log}\nglobal_middleware: [log]\n"


async def logged_lines(
    server: Server, capfd: pytest.CaptureFixture[str]
) -> list[dict[str, object]]:
    await server.shutdown(grace_period=1.0)  # flushes the access log's writer
    out, _ = capfd.readouterr()
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


async def test_the_access_log_names_the_trace_and_the_gateways_span(
    gateway_factory: GatewayFactory,
    receiver: OtlpReceiver,
    backend: TracedHttpUpstream,
    capfd: pytest.CaptureFixture[str],
) -> None:
    gateway = await gateway_factory(with_access_log(tracing_config(backend.url, receiver)))
    async with httpx.AsyncClient(timeout=10) as client:
        await client.get(f"{base_url(gateway)}/", headers={"traceparent": caller()})
    spans = await spans_of(receiver, CALLER_TRACE, 3)
    (line,) = await logged_lines(gateway, capfd)
    assert line["trace_id"] == CALLER_TRACE
    assert line["span_id"] == one(spans, "edge", "server").span_id


async def test_without_tracing_the_access_log_names_the_hop_the_upstream_saw(
    gateway_factory: GatewayFactory, backend: TracedHttpUpstream, capfd: pytest.CaptureFixture[str]
) -> None:
    gateway = await gateway_factory(with_access_log(tracing_config(backend.url, None)))
    async with httpx.AsyncClient(timeout=10) as client:
        seen = (await client.get(f"{base_url(gateway)}/")).json()
    (line,) = await logged_lines(gateway, capfd)
    _, trace_id, span_id, _ = seen["traceparent"].split("-")
    assert (line["trace_id"], line["span_id"]) == (trace_id, span_id)


async def test_without_tracing_the_tries_of_a_request_stay_in_one_trace(
    gateway_factory: GatewayFactory, receiver: OtlpReceiver
) -> None:
    failing = TracedHttpUpstream(receiver, status=503)
    working = TracedHttpUpstream(receiver)
    try:
        retries = "    retries: {attempts: 2, on: [503], backoff: {base: 1ms}}\n"
        config = tracing_config(working.url, None, endpoints=f"{failing.url}, ", retries=retries)
        gateway = await gateway_factory(config)
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(f"{base_url(gateway)}/")
        assert response.status_code == 200
        (first,), (second,) = failing.seen, working.seen
        _, first_trace, first_span, flags = first["traceparent"].split("-")
        _, second_trace, second_span, _ = second["traceparent"].split("-")
        assert first_trace == second_trace
        assert first_span != second_span
        assert flags == "00"
    finally:
        failing.stop()
        working.stop()
