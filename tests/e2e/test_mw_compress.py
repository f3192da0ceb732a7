"""`compress` through real sockets: a real upstream (tests/support/upstreams/content.py)
behind an in-process gateway, clients on HTTP/1.1 and h2c (httpx, curl, raw bytes), and
every body checked by the coding's own decoder (zlib, brotli, zstandard)."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import urlencode

import brotli
import httpx
import pytest
import zstandard

from proxy.process.server import Server
from tests.support.gateway import GatewayFactory, base_url
from tests.support.upstreams import ContentUpstream
from tests.support.upstreams.content import (
    FIRST_EVENT,
    SECOND_EVENT,
    text_body,
)

pytestmark = pytest.mark.socket

CODINGS = ["gzip", "br", "zstd"]


def config(upstream: ContentUpstream, routes: str = "") -> str:
    """/ compresses with the defaults (a chain of phases: proxy/exchange/phased.py), /c/
    too, in a chain of coroutines (`headers` has no phases); /gz/ offers gzip before br,
    from 100 bytes. `routes` go before the catch-all."""
    return f"""
listeners: [{{bind: 127.0.0.1:0}}]
upstreams: {{app: {{endpoints: ["{upstream.url}"]}}}}
middleware:
  squeeze: {{type: compress}}
  gz: {{type: compress, encodings: [gzip, br], min_size: 100B}}
routes:
  - name: gz
    match: {{path_prefix: /gz/}}
    upstream: app
    rewrite: {{strip_prefix: /gz}}
    middleware: [gz]
  - name: coroutines
    match: {{path_prefix: /c/}}
    upstream: app
    rewrite: {{strip_prefix: /c}}
    middleware: [squeeze, {{type: headers, response: {{set: {{X-Chain: coroutines}}}}}}]
{routes}
  - name: all
    match: {{path_prefix: /}}
    upstream: app
    middleware: [squeeze]
"""


def decode(coding: str, data: bytes) -> bytes:
    """`data` decoded by the coding's own library."""
    return Incremental(coding).feed(data)


class Incremental:
    """A decoder fed piece by piece: what it returns is all that can be decoded so far."""

    def __init__(self, coding: str) -> None:
        self.feed: Callable[[bytes], bytes]
        if coding == "gzip":
            self.feed = zlib.decompressobj(31).decompress
        elif coding == "br":
            self.feed = brotli.Decompressor().process
        else:
            self.feed = zstandard.ZstdDecompressor().decompressobj().decompress


def gen(**query: object) -> str:
    """A /gen target; `h` may be a list of fields."""
    return "/gen?" + urlencode(query, doseq=True)


@pytest.fixture
async def upstream() -> AsyncIterator[ContentUpstream]:
    server = await ContentUpstream().start()
    yield server
    await server.stop()


@pytest.fixture
async def gateway(gateway_factory: GatewayFactory, upstream: ContentUpstream) -> Server:
    return await gateway_factory(config(upstream))


@pytest.fixture(params=["1.1", "2"])
def version(request: pytest.FixtureRequest) -> str:
    """The client's HTTP version: HTTP/1.1, or HTTP/2 with prior knowledge (h2c)."""
    return str(request.param)


def client_for(version: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(http1=version == "1.1", http2=version == "2", timeout=10)


async def fetch_raw(
    client: httpx.AsyncClient, url: str, accept: str | None, method: str = "GET"
) -> tuple[httpx.Response, bytes]:
    """The response and its body as sent (not decoded); `accept` None sends no
    Accept-Encoding at all."""
    request = client.build_request(method, url)
    if accept is None:
        del request.headers["accept-encoding"]
    else:
        request.headers["accept-encoding"] = accept
    response = await client.send(request, stream=True)
    try:
        raw = b"".join([part async for part in response.aiter_raw()])
    finally:
        await response.aclose()
    return response, raw


# --- each coding, each HTTP version --------------------------------------------------------


@pytest.mark.parametrize("coding", CODINGS)
async def test_each_coding_compresses_whole_and_streamed_bodies(
    gateway: Server, version: str, coding: str
) -> None:
    # 20 KB arrives with its head (compressed at once); 600 KB comes in 40 chunks
    # (compressed as it streams, more than one buffer's worth). Both chains alike.
    cases = [(gen(size=20_000), 20_000), (gen(size=600_000, chunks=40), 600_000)]
    async with client_for(version) as client:
        for (target, size), chain in itertools.product(cases, ["", "/c"]):
            response, raw = await fetch_raw(client, base_url(gateway) + chain + target, coding)
            assert response.headers.get("x-chain") == ("coroutines" if chain else None)
            assert response.http_version == ("HTTP/1.1" if version == "1.1" else "HTTP/2")
            assert response.status_code == 200
            assert response.headers["content-encoding"] == coding
            assert response.headers["vary"] == "Accept-Encoding"
            assert decode(coding, raw) == text_body(size)
            assert len(raw) < size // 5, (target, len(raw))


async def test_httpx_decodes_the_coding_it_is_given(gateway: Server, version: str) -> None:
    # httpx offers every coding whose decoder is installed; the gateway prefers zstd.
    async with client_for(version) as client:
        response = await client.get(base_url(gateway) + gen(size=50_000, type="application/json"))
    assert "zstd" in response.request.headers["accept-encoding"]
    assert response.headers["content-encoding"] == "zstd"
    assert response.content == text_body(50_000)


async def curl(*args: str) -> tuple[int, str]:
    """Run curl; (exit code, stderr)."""
    assert shutil.which("curl"), "curl is a test dependency"
    process = await asyncio.create_subprocess_exec(
        "curl", "--silent", "--show-error", "--max-time", "10", *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await process.communicate()
    return process.returncode or 0, err.decode()


async def test_curl_compressed_gets_the_upstream_body(
    gateway: Server, version: str, tmp_path: Path
) -> None:
    http2 = ["--http2-prior-knowledge"] if version == "2" else []
    code, err = await curl(
        "--compressed", *http2, "--dump-header", str(tmp_path / "head"),
        "--output", str(tmp_path / "body"), base_url(gateway) + gen(size=300_000, chunks=7),
    )  # fmt: skip
    assert code == 0, err
    head = (tmp_path / "head").read_text().lower()
    assert head.startswith("http/2 200" if version == "2" else "http/1.1 200")
    assert "content-encoding: zstd" in head  # curl offers deflate, gzip, br, zstd
    assert (tmp_path / "body").read_bytes() == text_body(300_000)


# --- server-sent events stay live ----------------------------------------------------------


@pytest.mark.parametrize("coding", CODINGS)
async def test_each_event_reaches_the_client_before_the_next_is_sent(
    gateway: Server, upstream: ContentUpstream, version: str, coding: str
) -> None:
    async with client_for(version) as client:
        request = client.build_request(
            "GET", base_url(gateway) + "/events", headers={"accept-encoding": coding}
        )
        response = await client.send(request, stream=True)
        try:
            assert response.headers["content-encoding"] == coding
            assert response.headers["content-type"] == "text/event-stream"
            decoder, decoded = Incremental(coding), b""
            parts = response.aiter_raw()
            async with asyncio.timeout(10):  # a compressor that holds the event hangs here
                while len(decoded) < len(FIRST_EVENT):
                    decoded += decoder.feed(await anext(parts))
            assert decoded == FIRST_EVENT
            upstream.release()  # only now does the upstream send the second event
            async for part in parts:
                decoded += decoder.feed(part)
        finally:
            await response.aclose()
    assert decoded == FIRST_EVENT + SECOND_EVENT


async def test_a_client_leaving_mid_stream_ends_the_upstream_exchange(
    gateway: Server, upstream: ContentUpstream, version: str
) -> None:
    async with client_for(version) as client:
        request = client.build_request(
            "GET", base_url(gateway) + "/endless", headers={"accept-encoding": "br"}
        )
        response = await client.send(request, stream=True)
        decoder = Incremental("br")
        decoded = b""
        async for part in response.aiter_raw():
            decoded += decoder.feed(part)
            if len(decoded) >= len(FIRST_EVENT):
                break
        assert decoded.startswith(FIRST_EVENT)
        await response.aclose()
    # The client's socket is closed: the gateway's next write fails, the compressing task
    # stops and the upstream's connection is closed, not left paused. (The exchange's own
    # cancellation closes it too; tests/middleware/test_compress_codecs.py checks that the
    # compressed body lets its source go by itself.)
    await asyncio.wait_for(upstream.disconnected.wait(), 10)


# --- negotiation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "accept", "expected"),
    [
        ("", "gzip, br", "br"),  # equal weights: the gateway's order (zstd, br, gzip)
        ("", "gzip, deflate, br, zstd", "zstd"),
        ("", "gzip;q=1.0, br;q=0.5", "gzip"),
        ("", "BR;Q=0.9, x-gzip;q=0.8", "br"),
        ("", "br;q=0, *;q=0.1", "zstd"),  # * covers the codings not named
        ("", "identity", None),
        ("", "gzip;q=0.5, identity", None),  # identity preferred to every coding
        ("", "compress, deflate", None),  # none offered
        ("", "gzip;q=2, br;q=0.x, zstd;q=0", None),  # unreadable weights count as absent
        ("", "", None),
        ("/gz", "gzip, br", "gzip"),  # encodings: [gzip, br]
        ("/gz", "zstd", None),
    ],
)
async def test_the_coding_follows_accept_encoding(
    gateway: Server, path: str, accept: str, expected: str | None
) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        response, raw = await fetch_raw(client, base_url(gateway) + path + gen(size=5000), accept)
    assert response.headers.get("content-encoding") == expected
    assert response.headers["vary"] == "Accept-Encoding"
    assert (decode(expected, raw) if expected else raw) == text_body(5000)


async def test_a_request_without_accept_encoding_gets_the_body_as_it_is(gateway: Server) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        response, raw = await fetch_raw(client, base_url(gateway) + gen(size=5000), None)
    assert "content-encoding" not in response.headers
    assert response.headers["vary"] == "Accept-Encoding"  # a cache must still tell apart
    assert response.headers["content-length"] == "5000"
    assert raw == text_body(5000)


# --- what is never compressed --------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "method", "vary"),
    [
        (gen(size=5000, gzipped=1), "GET", None),  # already encoded: the upstream's own
        (gen(size=5000, h="Cache-Control: public, no-transform"), "GET", None),
        (gen(size=5000, status=206, h="Content-Range: bytes 0-4999/9000"), "GET", None),
        (gen(size=5000, type="image/png"), "GET", None),
        (gen(size=5000, type="none"), "GET", None),
        (gen(size=5000, type="application/grpc+json"), "GET", None),
        (gen(size=1000), "GET", None),  # below min_size (1 KiB)
        (gen(size=5000, status=204), "GET", None),
        (gen(size=5000), "HEAD", "Accept-Encoding"),  # a GET would have been compressed
    ],
)
async def test_responses_that_are_sent_as_they_are(
    gateway: Server, version: str, target: str, method: str, vary: str | None
) -> None:
    async with client_for(version) as client:
        response, raw = await fetch_raw(
            client, base_url(gateway) + target, "zstd, br, gzip", method
        )
        plain, plain_raw = await fetch_raw(client, base_url(gateway) + target, None, method)
    # As a client that accepts no coding gets it: the upstream's fields, bytes and length.
    assert response.status_code == plain.status_code
    assert response.headers.get("content-encoding") == plain.headers.get("content-encoding")
    assert response.headers.get("content-length") == plain.headers.get("content-length")
    assert response.headers.get("vary") == vary
    assert raw == plain_raw
    if method == "HEAD" or response.status_code == 204:
        assert raw == b""
    elif "gzipped" in target:
        assert response.headers["content-encoding"] == "gzip"
        assert zlib.decompress(raw, 31) == text_body(5000)
    else:
        assert raw == text_body(len(raw))
        assert len(raw) in (1000, 5000)


# --- the fields of a compressed response ---------------------------------------------------


async def test_a_compressed_response_has_its_fields_rewritten(
    gateway: Server, version: str
) -> None:
    fields = [
        'ETag: "v1"',
        "Vary: Origin",
        "Accept-Ranges: bytes",
        "Content-Digest: sha-256=:AAAA:",
        "X-Kept: yes",
    ]
    async with client_for(version) as client:
        for size, chunks in ((5000, 0), (200_000, 5)):
            response, raw = await fetch_raw(
                client, base_url(gateway) + gen(size=size, chunks=chunks, h=fields), "gzip"
            )
            headers = response.headers
            assert headers["content-encoding"] == "gzip"
            assert headers["etag"] == 'W/"v1"'
            assert headers.get_list("vary") == ["Origin, Accept-Encoding"]
            assert "accept-ranges" not in headers
            assert "content-digest" not in headers
            assert headers["x-kept"] == "yes"
            # (a body that came with its head is sent with its new length; streamed, none)
            assert headers.get("content-length", str(len(raw))) == str(len(raw))
            if chunks:
                assert "content-length" not in headers
            assert decode("gzip", raw) == text_body(size)


async def test_vary_and_weak_etags_are_not_touched_twice(gateway: Server) -> None:
    fields = ['ETag: W/"v2"', "Vary: accept-encoding, Origin"]
    async with httpx.AsyncClient(timeout=10) as client:
        response, _ = await fetch_raw(client, base_url(gateway) + gen(size=5000, h=fields), "br")
        star, _ = await fetch_raw(client, base_url(gateway) + gen(size=5000, h="Vary: *"), "br")
    assert response.headers["content-encoding"] == "br"
    assert response.headers["etag"] == 'W/"v2"'
    assert response.headers.get_list("vary") == ["accept-encoding, Origin"]
    assert star.headers["content-encoding"] == "br"
    assert star.headers.get_list("vary") == ["*"]


async def test_a_304_says_what_its_200_would_have(gateway: Server) -> None:
    target = gen(status=304, h='ETag: "v3"', type="none")
    async with httpx.AsyncClient(timeout=10) as client:
        accepted, _ = await fetch_raw(client, base_url(gateway) + target, "gzip")
        plain, _ = await fetch_raw(client, base_url(gateway) + target, None)
    assert accepted.status_code == plain.status_code == 304
    assert accepted.headers["etag"] == 'W/"v3"'  # the 200 it revalidates was compressed
    assert plain.headers["etag"] == '"v3"'
    assert accepted.headers["vary"] == plain.headers["vary"] == "Accept-Encoding"
    assert "content-encoding" not in accepted.headers


# --- with cache ----------------------------------------------------------------------------


async def test_with_cache_the_order_decides_what_is_stored(
    gateway_factory: GatewayFactory, upstream: ContentUpstream
) -> None:
    """[cache, compress] stores the compressed answers, a variant per Accept-Encoding;
    [compress, cache] stores the upstream's bytes and compresses every answer."""
    routes = """
  - name: cached-compressed
    match: {path_prefix: /cc/}
    upstream: app
    rewrite: {strip_prefix: /cc}
    middleware: [{type: cache}, squeeze]
  - name: compressed-cached
    match: {path_prefix: /pc/}
    upstream: app
    rewrite: {strip_prefix: /pc}
    middleware: [squeeze, {type: cache}]
"""
    server = await gateway_factory(config(upstream, routes))
    target = gen(size=30_000, h="Cache-Control: max-age=600")
    async with httpx.AsyncClient(timeout=10) as client:
        for prefix, upstream_requests in (("/cc", [1, 1, 2]), ("/pc", [1, 1, 1])):
            before = len(upstream.requests)
            statuses = []
            for accept, seen in zip(["br", "br", "gzip"], upstream_requests, strict=True):
                response, raw = await fetch_raw(client, base_url(server) + prefix + target, accept)
                assert response.headers["content-encoding"] == accept, prefix
                assert decode(accept, raw) == text_body(30_000)
                assert len(upstream.requests) - before == seen, (prefix, accept)
                statuses.append(response.headers["cache-status"])
            assert statuses[1].startswith("gatehouse; hit"), statuses
            third = "gatehouse; fwd=vary-miss" if prefix == "/cc" else "gatehouse; hit"
            assert statuses[2].startswith(third), statuses
