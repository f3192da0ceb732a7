"""`compress`'s metrics through real sockets: a real upstream (tests/support/upstreams/
content.py) behind the testing kit's gateway, one request at a time, and the counters
read back from the admin listener's /metrics as Prometheus would scrape them. Each
decision moves its own series by one and no other; the byte counters move by the body's
size before and after compression, and only for a response that was compressed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import urlencode

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.testing import RunningGateway
from proxy.testing.plugin import GatewayFactory
from tests.e2e.test_mw_compress import decode, fetch_raw
from tests.support.upstreams import ContentUpstream
from tests.support.upstreams.content import random_body, text_body

pytestmark = pytest.mark.socket

INSTANCE = "metered"
RESPONSES = "gatehouse_compress_responses_total"
BYTES = "gatehouse_compress_bytes_total"
SENT_AS_IS = (
    "status",
    "already_encoded",
    "range",
    "no_transform",
    "content_type",
    "too_small",
    "head",
    "not_accepted",
    "incompressible",
)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def gen(**query: object) -> str:
    """A /gen target of the content upstream."""
    return "/gen?" + urlencode(query)


@pytest.fixture
async def content() -> AsyncIterator[ContentUpstream]:
    server = await ContentUpstream().start()
    yield server
    await server.stop()


@pytest.fixture
async def gateway(gatehouse: GatewayFactory, content: ContentUpstream) -> RunningGateway:
    return await gatehouse(f"""
listeners: [{{bind: 127.0.0.1:0}}]
upstreams: {{app: {{endpoints: ["{content.url}"]}}}}
middleware:
  {INSTANCE}: {{type: compress}}
routes:
  - {{name: all, match: {{path_prefix: /}}, upstream: app, middleware: [{INSTANCE}]}}
""")


async def scrape(gateway: RunningGateway) -> Samples:
    """The samples of the instance's compress metrics, from GET /metrics."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(await gateway.scrape())
        for sample in family.samples
        if sample.name in (RESPONSES, BYTES) and sample.labels.get("middleware") == INSTANCE
    }


def moved(before: Samples, after: Samples) -> dict[tuple[str, ...], float]:
    """The series that changed, by name and label values other than the instance's."""
    changes = {}
    for key, value in after.items():
        delta = value - before.get(key, 0.0)
        if delta:
            name, labels = key
            rest = tuple(value for label, value in sorted(labels) if label != "middleware")
            changes[(name, *rest)] = delta
    return changes


async def fetch(
    gateway: RunningGateway, target: str, accept: str | None, method: str = "GET"
) -> tuple[httpx.Response, bytes]:
    """The response and its body as sent (not decoded)."""
    async with gateway.client() as client:
        return await fetch_raw(client, target, accept, method)


async def test_every_series_is_there_from_the_start_and_bounded(gateway: RunningGateway) -> None:
    samples = await scrape(gateway)
    responses = {
        (labels["encoding"], labels["reason"])
        for (name, pairs), _ in samples.items()
        if name == RESPONSES
        for labels in [dict(pairs)]
    }
    compressed = {(coding, "compressed") for coding in ("zstd", "br", "gzip")}
    assert responses == compressed | {("identity", reason) for reason in SENT_AS_IS}
    directions = {dict(pairs)["direction"] for (name, pairs), _ in samples.items() if name == BYTES}
    assert directions == {"in", "out"}


@pytest.mark.parametrize(
    ("accept", "target", "size", "coding"),
    [
        ("gzip", gen(size=5000), 5000, "gzip"),  # arrived with its head: compressed whole
        ("zstd", gen(size=5000, type="application/json"), 5000, "zstd"),
        ("br", gen(size=200_000, chunks=5), 200_000, "br"),  # chunked: streamed
        ("gzip, br", gen(size=70_000), 70_000, "br"),  # over 64 KiB: streamed too
    ],
)
async def test_a_compressed_response_counts_its_coding_and_its_bytes(
    gateway: RunningGateway, accept: str, target: str, size: int, coding: str
) -> None:
    before = await scrape(gateway)
    response, raw = await fetch(gateway, target, accept)
    after = await scrape(gateway)

    assert response.headers["content-encoding"] == coding
    assert decode(coding, raw) == text_body(size)
    assert moved(before, after) == {
        (RESPONSES, coding, "compressed"): 1,
        (BYTES, "in"): size,
        (BYTES, "out"): len(raw),
    }


@pytest.mark.parametrize(
    ("accept", "target", "method", "reason"),
    [
        (None, gen(size=5000), "GET", "not_accepted"),
        ("compress, deflate", gen(size=5000), "GET", "not_accepted"),  # none offered
        ("identity", gen(size=5000), "GET", "not_accepted"),
        ("gzip", gen(size=1000), "GET", "too_small"),  # min_size: 1 KiB
        ("gzip", gen(size=5000, gzipped=1), "GET", "already_encoded"),
        ("gzip", gen(size=5000, h="Cache-Control: no-transform"), "GET", "no_transform"),
        ("gzip", gen(size=5000, status=206, h="Content-Range: bytes 0-4999/9000"), "GET", "range"),
        ("gzip", gen(size=5000, type="image/png"), "GET", "content_type"),
        ("gzip", gen(size=5000, type="application/grpc"), "GET", "content_type"),
        ("gzip", gen(size=5000, status=204), "GET", "status"),
        ("gzip", gen(status=304, type="none"), "GET", "status"),
        ("gzip", gen(size=5000), "HEAD", "head"),
        ("gzip", gen(size=5000, random=1), "GET", "incompressible"),
    ],
)
async def test_a_response_sent_as_it_is_counts_why_and_no_bytes(
    gateway: RunningGateway, accept: str | None, target: str, method: str, reason: str
) -> None:
    before = await scrape(gateway)
    response, raw = await fetch(gateway, target, accept, method)
    after = await scrape(gateway)

    assert response.headers.get("content-encoding") in (None, "gzip")  # gzip: the upstream's
    if reason == "incompressible":
        assert raw == random_body(5000)
    assert moved(before, after) == {(RESPONSES, "identity", reason): 1}
