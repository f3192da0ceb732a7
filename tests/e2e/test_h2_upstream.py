"""HTTP/1.1 clients (httpx, raw sockets) through an in-process gateway to HTTP/2 upstreams:
h2c (prior knowledge) and h2 over TLS, plus HTTP/1.1 over TLS and upstream certificate
verification."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator

import httpx
import pytest

from proxy.process.server import Server
from tests.support.gateway import GatewayFactory, base_url, raw_request
from tests.support.helpers import parse_response
from tests.support.tls import TlsFiles
from tests.support.upstreams import H2UpstreamServer, UpstreamServer, pattern_chunks

pytestmark = [pytest.mark.socket, pytest.mark.timeout(60)]

MIB = 1024 * 1024


def gateway_yaml(server: H2UpstreamServer | UpstreamServer, upstream: str) -> str:
    """A catch-all route to `server`; `upstream` adds keys to the upstream (indented)."""
    return f"""
listeners:
  - bind: 127.0.0.1:0
upstreams:
  app:
    endpoints: [{server.url}]
{upstream}
routes:
  - name: all
    match: {{path_prefix: /}}
    upstream: app
"""


def upstream_keys(mode: str, tls_files: TlsFiles, *, extra: str = "") -> str:
    if mode == "h2c":
        keys = "    protocol: h2c\n"
    else:
        keys = f"    protocol: h2\n    tls: {{ca: {tls_files.ca}}}\n"
    return keys + "    timeouts: {connect: 2s, read: 5s}\n" + extra


@pytest.fixture(params=["h2c", "h2"])
def mode(request: pytest.FixtureRequest) -> str:
    """Each test runs against an h2c and an h2-over-TLS upstream."""
    return str(request.param)


@pytest.fixture
async def h2_upstream(mode: str, tls_files: TlsFiles) -> AsyncIterator[H2UpstreamServer]:
    tls = tls_files.server_context(["h2"]) if mode == "h2" else None
    server = await H2UpstreamServer(tls=tls).start()
    yield server
    await server.stop()


@pytest.fixture
async def gateway(
    gateway_factory: GatewayFactory, h2_upstream: H2UpstreamServer, mode: str, tls_files: TlsFiles
) -> Server:
    return await gateway_factory(gateway_yaml(h2_upstream, upstream_keys(mode, tls_files)))


def pattern_sha256(total: int) -> str:
    digest = hashlib.sha256()
    for piece in pattern_chunks(total):
        digest.update(piece)
    return digest.hexdigest()


async def test_get_is_forwarded_with_pseudo_headers_and_forwarding_fields(
    gateway: Server, h2_upstream: H2UpstreamServer, mode: str
) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(
            base_url(gateway) + "/echo/x?q=1",
            headers={"Connection": "keep-alive, X-Hop", "X-Hop": "drop", "X-Kept": "yes"},
        )
    assert response.status_code == 200
    echo = response.json()
    host, port = gateway.addresses[0]
    assert echo["method"] == "GET"
    assert echo["path"] == "/echo/x?q=1"
    assert echo["authority"] == f"{host}:{port}"
    assert echo["scheme"] == ("https" if mode == "h2" else "http")
    headers = dict(echo["headers"])
    assert headers["x-kept"] == "yes"
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["via"] == "1.1 gatehouse"
    for hop in ("connection", "x-hop", "host", "keep-alive", "transfer-encoding"):
        assert hop not in headers


async def test_post_body_is_echoed(gateway: Server) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(base_url(gateway) + "/echo", content=b"hello h2")
    assert response.json()["body"] == "hello h2"
    assert dict(response.json()["headers"])["content-length"] == "8"


async def test_chunked_upload_of_10_mib_arrives_intact(gateway: Server) -> None:
    total = 10 * MIB

    async def chunks() -> AsyncIterator[bytes]:
        for piece in pattern_chunks(total):
            yield bytes(piece)

    async with httpx.AsyncClient(timeout=20) as client:
        response = await client.post(base_url(gateway) + "/sink", content=chunks())
    assert response.status_code == 200
    assert response.json() == {"size": total, "sha256": pattern_sha256(total)}


async def test_download_of_10_mib_arrives_intact(gateway: Server) -> None:
    total = 10 * MIB
    digest = hashlib.sha256()
    async with (
        httpx.AsyncClient(timeout=20) as client,
        client.stream("GET", base_url(gateway) + f"/download/{total}") as response,
    ):
        assert response.headers["content-length"] == str(total)
        async for piece in response.aiter_raw():
            digest.update(piece)
    assert digest.hexdigest() == pattern_sha256(total)


async def test_trailers_reach_a_chunked_http1_client(gateway: Server) -> None:
    data = await raw_request(
        gateway,
        b"POST /trailers HTTP/1.1\r\nHost: grpc.test\r\nTE: trailers\r\n"
        b"Content-Length: 5\r\nConnection: close\r\n\r\n\x00\x00\x00\x00\x00",
    )
    response, _ = parse_response(data, eof=True)
    assert response.status == 200
    assert response.chunked
    assert response.body == b"hello"
    assert ("grpc-status", "0") in response.trailers
    assert ("grpc-message", "ok") in response.trailers


async def test_trailers_only_response_becomes_headers(gateway: Server) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(base_url(gateway) + "/trailers-only", content=b"")
    assert response.status_code == 200
    assert response.headers["grpc-status"] == "5"
    assert response.headers["grpc-message"] == "not found"
    assert response.content == b""


async def test_upstream_status_is_passed_on(gateway: Server) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(base_url(gateway) + "/status/418")
    assert response.status_code == 418
    assert response.text == "status 418"


async def test_upstream_reset_is_a_502(gateway: Server) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(base_url(gateway) + "/reset")
        assert response.status_code == 502
        assert response.json()["error"] == "upstream_reset"
        assert (await client.get(base_url(gateway) + "/echo")).status_code == 200


async def test_silent_upstream_is_a_504(
    gateway_factory: GatewayFactory, h2_upstream: H2UpstreamServer, mode: str, tls_files: TlsFiles
) -> None:
    keys = upstream_keys(mode, tls_files).replace("read: 5s", "read: 200ms")
    gateway = await gateway_factory(gateway_yaml(h2_upstream, keys))
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(base_url(gateway) + "/held")  # never answered
    assert response.status_code == 504
    assert response.json()["error"] == "upstream_timeout"


# ---------------------------------------------------------------------- upstream TLS


@pytest.fixture
async def tls_h2_upstream(tls_files: TlsFiles) -> AsyncIterator[H2UpstreamServer]:
    server = await H2UpstreamServer(tls=tls_files.server_context(["h2"])).start()
    yield server
    await server.stop()


@pytest.mark.parametrize(
    ("tls_keys", "cause"),
    [
        ("{{}}", "certificate verify failed"),  # the system store does not know our CA
        ("{{ca: {ca}, sni: wrong.example}}", "Hostname mismatch"),
    ],
    ids=["unknown-ca", "wrong-sni"],
)
async def test_failed_verification_is_a_502_with_a_clear_log(
    gateway_factory: GatewayFactory,
    tls_h2_upstream: H2UpstreamServer,
    tls_files: TlsFiles,
    caplog: pytest.LogCaptureFixture,
    tls_keys: str,
    cause: str,
) -> None:
    caplog.set_level(logging.INFO)
    keys = f"    protocol: h2\n    tls: {tls_keys.format(ca=tls_files.ca)}\n"
    gateway = await gateway_factory(gateway_yaml(tls_h2_upstream, keys))
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(base_url(gateway) + "/echo")
    assert response.status_code == 502
    assert response.json()["error"] == "upstream_connect_failed"
    messages = [record.getMessage() for record in caplog.records]
    assert any(cause in message and "TLS handshake" in message for message in messages), messages
    assert not tls_h2_upstream.requests


async def test_verify_false_accepts_any_certificate(
    gateway_factory: GatewayFactory, tls_h2_upstream: H2UpstreamServer
) -> None:
    keys = "    protocol: h2\n    tls: {verify: false, sni: wrong.example}\n"
    gateway = await gateway_factory(gateway_yaml(tls_h2_upstream, keys))
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(base_url(gateway) + "/echo/unverified")
    assert response.status_code == 200
    assert response.json()["path"] == "/echo/unverified"


async def test_http1_over_tls_upstream(
    gateway_factory: GatewayFactory, tls_files: TlsFiles
) -> None:
    upstream = await UpstreamServer(tls=tls_files.server_context(["http/1.1"])).start()
    try:
        keys = f"    tls: {{ca: {tls_files.ca}}}\n"
        gateway = await gateway_factory(gateway_yaml(upstream, keys))
        async with httpx.AsyncClient(timeout=10) as client:
            for _ in range(3):  # the TLS connection is pooled and reused
                response = await client.post(base_url(gateway) + "/echo/tls", content=b"over tls")
                assert response.status_code == 200
                assert response.json()["body"] == "over tls"
        assert upstream.connections == 1
    finally:
        await upstream.stop()


async def test_head_request_keeps_the_content_length(gateway: Server) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.head(base_url(gateway) + "/bytes/1234")
    assert response.status_code == 200
    assert response.headers["content-length"] == "1234"
    assert response.content == b""


async def test_http2_client_through_to_an_http2_upstream(gateway: Server) -> None:
    # The HTTP/2 front end's requests (no Connection, :authority as host) on an h2 hop.
    async with httpx.AsyncClient(http1=False, http2=True, timeout=10) as client:
        response = await client.post(base_url(gateway) + "/echo/h2", content=b"both hops")
        assert response.http_version == "HTTP/2"
        echo = response.json()
        assert echo["body"] == "both hops"
        assert dict(echo["headers"])["via"] == "2 gatehouse"
        trailers = await client.post(base_url(gateway) + "/trailers-only", content=b"")
        assert trailers.headers["grpc-status"] == "5"
