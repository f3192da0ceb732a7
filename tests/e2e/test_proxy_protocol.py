"""Listeners with `proxy_protocol: true` through real sockets.

A real HAProxy relays TCP to the gateway with `send-proxy` (v1) and `send-proxy-v2` (v2,
with a TLV), as a load balancer does. Test clients bind 127.0.0.2 and 127.0.0.3 (all of
127/8 is loopback), HAProxy and the gateway talk over 127.0.0.1, and the gateway trusts
127.0.0.1: so the address each consumer sees (ip_filter, rate_limit `key: ip`, the access
log, the `headers` middleware and X-Forwarded-For upstream) shows whether the PROXY header
was read and believed. TLS listeners read the header before the handshake, HTTP/2 comes
by ALPN or with prior knowledge. Raw sockets send what no balancer would: garbage, cut
short, too long, too slow, from an untrusted peer; each is refused and counted, and the
next connection is served.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from metrics.definitions import REGISTRY
from proxy.config.load import parse_config
from proxy.process.server import Server
from tests.support.gateway import GatewayFactory, H1UpstreamFactory
from tests.support.haproxy import HAProxy
from tests.support.helpers import parse_response
from tests.support.tls import TlsFiles
from tests.support.upstreams import UpstreamServer

pytestmark = pytest.mark.socket

CLIENT_TIMEOUT_S = 10.0
ALICE, BOB = "127.0.0.2", "127.0.0.3"  # two clients, both behind the balancer
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def config(
    upstream: UpstreamServer, codec: str = "auto", *, listener: str = "", extra: str = ""
) -> str:
    """A proxy_protocol listener trusting 127.0.0.1, and routes that show the client to
    each consumer: /office/ (ip_filter allowing ALICE), /limited/ (one request per
    client), and everything else plain; every request is logged and stamped with
    `X-Client: {client_ip}`."""
    return f"""
listeners: [{{bind: 127.0.0.1:0, proxy_protocol: true{listener}}}]
http1_parser: {codec}
client_ip: {{trusted_proxies: [127.0.0.1], source: proxy_protocol}}
upstreams: {{app: {{endpoints: [{upstream.url}]}}}}
middleware:
  log: {{type: access_log, fields: [client_ip, peer_ip, path, status]}}
  stamp: {{type: headers, request: {{set: {{X-Client: "{{client_ip}}"}}}}}}
global_middleware: [log, stamp]
routes:
  - name: office
    match: {{path_prefix: /office/}}
    upstream: app
    middleware: [{{type: ip_filter, allow: [{ALICE}]}}]
  - name: limited
    match: {{path_prefix: /limited/}}
    upstream: app
    middleware: [{{type: rate_limit, rate: 1/min, key: ip}}]
  - {{name: all, match: {{path_prefix: /}}, upstream: app}}
{extra}
"""


@pytest.fixture
def in_front() -> Iterator[list[HAProxy]]:
    """HAProxy processes a test starts (`start_haproxy`); all stopped at teardown."""
    started: list[HAProxy] = []
    yield started
    for haproxy in started:
        haproxy.stop()


def start_haproxy(started: list[HAProxy], directory: Path, server: Server, version: int) -> HAProxy:
    haproxy = HAProxy(directory, server.addresses[0], version)
    started.append(haproxy)
    haproxy.start()
    return haproxy


def client_from(
    address: str, *, verify: object = False, http2: bool = False, http1: bool = True
) -> httpx.AsyncClient:
    """An httpx client whose connections come from `address`."""
    transport = httpx.AsyncHTTPTransport(
        local_address=address,
        verify=verify,  # type: ignore[arg-type]
        http1=http1,
        http2=http2,
    )
    return httpx.AsyncClient(transport=transport, timeout=CLIENT_TIMEOUT_S)


def refused(reason: str) -> float:
    value = REGISTRY.get_sample_value("gatehouse_proxy_protocol_refused_total", {"reason": reason})
    return value or 0.0


def logged(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


# -- HAProxy in front ---------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
async def test_the_client_behind_haproxy_reaches_every_consumer(
    gateway_factory: GatewayFactory,
    h1_upstream: UpstreamServer,
    codec: str,
    version: int,
    in_front: list[HAProxy],
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    server = await gateway_factory(config(h1_upstream, codec))
    haproxy = start_haproxy(in_front, tmp_path, server, version)
    host, port = haproxy.address
    base = f"http://{host}:{port}"
    async with client_from(ALICE) as alice, client_from(BOB) as bob:
        # ip_filter: ALICE is allowed, BOB is not (behind the same balancer).
        assert (await alice.get(base + "/office/echo")).status_code == 200
        assert (await bob.get(base + "/office/echo")).status_code == 403
        # rate_limit key ip: one budget each, not one for the balancer.
        assert (await alice.get(base + "/limited/echo")).status_code == 200
        assert (await alice.get(base + "/limited/echo")).status_code == 429
        assert (await bob.get(base + "/limited/echo")).status_code == 200
        # The upstream's X-Forwarded-For and the headers middleware's {client_ip}; a
        # forged X-Forwarded-For from the client is replaced (it is not a trusted proxy).
        response = await alice.get(base + "/echo/a", headers={"X-Forwarded-For": "10.9.9.9"})
    assert response.status_code == 200
    seen = h1_upstream.requests[-1]
    assert seen.header("x-forwarded-for") == ALICE
    assert seen.header("x-client") == ALICE
    await server.shutdown(grace_period=1.0)
    lines = logged(capfd.readouterr().out)
    assert [(line["client_ip"], line["path"], line["status"]) for line in lines] == [
        (ALICE, "/office/echo", 200),
        (BOB, "/office/echo", 403),
        (ALICE, "/limited/echo", 200),
        (ALICE, "/limited/echo", 429),
        (BOB, "/limited/echo", 200),
        (ALICE, "/echo/a", 200),
    ]
    assert {line["peer_ip"] for line in lines} == {ALICE, BOB}  # the PROXY header's


@pytest.mark.parametrize("version", [1, 2])
async def test_a_tls_listener_reads_the_header_before_the_handshake(
    gateway_factory: GatewayFactory,
    h1_upstream: UpstreamServer,
    tls_files: TlsFiles,
    version: int,
    in_front: list[HAProxy],
    tmp_path: Path,
) -> None:
    tls = f", tls: {{cert: {tls_files.cert}, key: {tls_files.key}}}"
    server = await gateway_factory(config(h1_upstream, listener=tls))
    haproxy = start_haproxy(in_front, tmp_path, server, version)
    host, port = haproxy.address
    base = f"https://{host}:{port}"
    verify = tls_files.client_context(["h2", "http/1.1"])
    async with client_from(ALICE, verify=verify) as http1:
        response = await http1.get(base + "/echo/tls")
        denied = await http1.get(base + "/limited/x"), await http1.get(base + "/limited/x")
    assert (response.status_code, response.http_version) == (200, "HTTP/1.1")
    assert [r.status_code for r in denied] == [200, 429]
    async with client_from(BOB, verify=verify, http2=True, http1=False) as http2:
        response = await http2.get(base + "/echo/h2")
        office = await http2.get(base + "/office/x")
        limited = await http2.get(base + "/limited/x")
    assert (response.status_code, response.http_version) == (200, "HTTP/2")
    assert office.status_code == 403
    assert limited.status_code == 200  # BOB's own budget
    assert [r.header("x-forwarded-for") for r in h1_upstream.requests[:2]] == [ALICE, ALICE]
    assert h1_upstream.requests[-1].header("x-forwarded-for") == BOB
    assert h1_upstream.requests[-1].header("x-forwarded-proto") == "https"


async def test_h2c_with_prior_knowledge_behind_haproxy(
    gateway_factory: GatewayFactory,
    h1_upstream: UpstreamServer,
    in_front: list[HAProxy],
    tmp_path: Path,
) -> None:
    server = await gateway_factory(config(h1_upstream))
    haproxy = start_haproxy(in_front, tmp_path, server, 2)
    host, port = haproxy.address
    async with client_from(BOB, http2=True, http1=False) as client:
        response = await client.get(f"http://{host}:{port}/echo/h2c")
        office = await client.get(f"http://{host}:{port}/office/x")
    assert (response.status_code, response.http_version) == (200, "HTTP/2")
    assert office.status_code == 403
    assert h1_upstream.requests[-1].header("x-forwarded-for") == BOB
    assert h1_upstream.requests[-1].header("x-client") == BOB


# -- raw sockets: what no balancer sends ---------------------------------------------------


def v2_header(source: str, port: int = 4711, *, command: int = 0x21, tlvs: bytes = b"") -> bytes:
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    destination = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    addresses = (
        socket.inet_pton(family, source)
        + socket.inet_pton(family, destination)
        + struct.pack("!HH", port, 80)
    )
    payload = addresses + tlvs
    kind = 0x21 if family == socket.AF_INET6 else 0x11
    return V2_SIGNATURE + bytes([command, kind]) + struct.pack("!H", len(payload)) + payload


async def exchange(
    server: Server, data: bytes, *, source: str = "127.0.0.1", pieces: int = 1
) -> bytes:
    """Connect from `source`, send `data` (in `pieces` writes), read until the gateway
    closes; what it sent (b"" when it closed or reset without a word)."""
    host, port = server.addresses[0]
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    size = -(-len(data) // pieces)
    for start in range(0, len(data), size):
        writer.write(data[start : start + size])
        await writer.drain()
    received = b""
    try:
        async with asyncio.timeout(CLIENT_TIMEOUT_S):
            while chunk := await reader.read(65536):
                received += chunk
    except ConnectionResetError:
        pass
    finally:
        writer.close()
    return received


async def assert_closed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The gateway closes the connection without a word: EOF, or a reset when it closed
    with some of our bytes unread (or before accepting it)."""
    try:
        async with asyncio.timeout(CLIENT_TIMEOUT_S):
            assert await reader.read() == b""
    except ConnectionResetError:
        pass
    finally:
        writer.close()


def status_of(data: bytes) -> int:
    """The status of the response in `data` (the gateway closed after it)."""
    response, _ = parse_response(data, eof=True)
    return response.status


def request(path: str = "/echo/raw", extra: bytes = b"") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: t\r\n%sConnection: close\r\n\r\n" % (path.encode(), extra)


async def test_headers_of_both_versions_name_the_client(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    server = await gateway_factory(config(h1_upstream, codec))
    cases = [
        (b"PROXY TCP4 198.51.100.7 127.0.0.1 4711 80\r\n", "198.51.100.7"),
        (b"PROXY TCP6 2001:db8::7 ::1 4711 80\r\n", "2001:db8::7"),
        (v2_header("198.51.100.8"), "198.51.100.8"),
        (v2_header("2001:db8::8", tlvs=b"\x04\x00\x05noop!"), "2001:db8::8"),
        # LOCAL (the balancer's health check) and UNKNOWN: the TCP peer is the client.
        (v2_header("198.51.100.9", command=0x20), "127.0.0.1"),
        (b"PROXY UNKNOWN\r\n", "127.0.0.1"),
    ]
    for header, client in cases:
        for pieces in (1, len(header) + 3):  # whole, or a segment per byte
            answer = status_of(await exchange(server, header + request(), pieces=pieces))
            assert answer == 200, header
            assert h1_upstream.requests[-1].header("x-forwarded-for") == client, header


async def test_a_header_from_an_untrusted_peer_is_read_and_ignored(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    # Only ALICE's address is a trusted balancer; the connection from 127.0.0.1 is not.
    text = config(h1_upstream).replace("[127.0.0.1]", f"[{ALICE}]")
    server = await gateway_factory(text)
    header = b"PROXY TCP4 198.51.100.7 127.0.0.1 4711 80\r\n"
    assert status_of(await exchange(server, header + request())) == 200
    assert h1_upstream.requests[-1].header("x-forwarded-for") == "127.0.0.1"
    assert status_of(await exchange(server, header + request(), source=ALICE)) == 200
    assert h1_upstream.requests[-1].header("x-forwarded-for") == "198.51.100.7"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (request(), "invalid"),  # plain HTTP on a proxy_protocol listener
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64, "invalid"),  # TLS
        (b"PROXY TCP4 198.51.100.777 127.0.0.1 1 80\r\n" + request(), "invalid"),
        (b"PROXY TCP4 198.51.100.7 127.0.0.1 1 80\n" + request(), "invalid"),
        (b"PROXY " + b"9" * 200 + b"\r\n", "invalid"),
        (v2_header("198.51.100.7", command=0x22) + request(), "invalid"),
        (V2_SIGNATURE + b"\x21\x11\xff\xff" + b"\x00" * 64, "invalid"),  # 64 KiB announced
        (b"PROXY TCP4 198.51.100.7 127.0", "closed"),  # cut short, then EOF
        (v2_header("198.51.100.7")[:20], "closed"),
    ],
)
async def test_a_bad_header_closes_that_connection_and_is_counted(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, data: bytes, reason: str
) -> None:
    server = await gateway_factory(config(h1_upstream))
    before = refused(reason)
    host, port = server.addresses[0]
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(data)
    await writer.drain()
    if reason == "closed":
        writer.write_eof()
    await assert_closed(reader, writer)
    assert refused(reason) == before + 1
    assert h1_upstream.requests == []
    # The worker is fine: the next connection is served.
    header = b"PROXY TCP4 198.51.100.7 127.0.0.1 4711 80\r\n"
    assert status_of(await exchange(server, header + request())) == 200


async def test_a_header_that_does_not_come_in_time_is_refused(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    server = await gateway_factory(config(h1_upstream, extra="limits: {header_timeout: 200ms}"))
    before = refused("timeout")
    host, port = server.addresses[0]
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"PROXY TCP4 198.51.100.7 ")
    await writer.drain()
    await assert_closed(reader, writer)  # the gateway gave up on it
    assert refused("timeout") == before + 1
    header = b"PROXY TCP4 198.51.100.7 127.0.0.1 4711 80\r\n"
    assert status_of(await exchange(server, header + request())) == 200


async def test_shutdown_drops_connections_still_sending_their_header(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    server = await gateway_factory(config(h1_upstream))
    host, port = server.addresses[0]
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"PROXY TCP4 ")
    await writer.drain()
    await server.shutdown(grace_period=1.0)
    await assert_closed(reader, writer)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(host, port)


async def test_a_reload_brings_a_proxy_protocol_listener(
    gateway_factory: GatewayFactory, h1_upstream_factory: H1UpstreamFactory
) -> None:
    upstream = await h1_upstream_factory()
    plain = config(upstream).replace(", proxy_protocol: true", "")
    plain = plain.replace("source: proxy_protocol", "source: x-forwarded-for")
    server = await gateway_factory(plain)
    await server.prepare_reload(parse_config(config(upstream)))
    await server.commit_reload()
    header = b"PROXY TCP4 198.51.100.7 127.0.0.1 4711 80\r\n"
    assert status_of(await exchange(server, header + request())) == 200
    assert upstream.requests[-1].header("x-forwarded-for") == "198.51.100.7"


async def test_a_failed_tls_handshake_after_the_header_is_that_connection_s_affair(
    gateway_factory: GatewayFactory,
    h1_upstream: UpstreamServer,
    tls_files: TlsFiles,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tls = f", tls: {{cert: {tls_files.cert}, key: {tls_files.key}}}"
    server = await gateway_factory(config(h1_upstream, listener=tls))
    header = b"PROXY TCP4 198.51.100.7 127.0.0.1 4711 443\r\n"
    with caplog.at_level("DEBUG", logger="proxy.frontend.listener"):
        # Plain HTTP where the ClientHello should be: the handshake fails.
        assert await exchange(server, header + request()) == b""
    assert any("failed" in record.getMessage() for record in caplog.records)
    host, port = server.addresses[0]
    context = tls_files.client_context(["http/1.1"])
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(header)
    await writer.drain()
    await writer.start_tls(context, server_hostname="localhost")
    writer.write(request())
    received = await reader.read()
    writer.close()
    assert status_of(received) == 200
    assert h1_upstream.requests[-1].header("x-forwarded-for") == "198.51.100.7"


async def test_an_ipv6_listener_with_reuse_port(h1_upstream: UpstreamServer) -> None:
    text = config(h1_upstream).replace("bind: 127.0.0.1:0", "bind: '[::1]:0'")
    text = text.replace("trusted_proxies: [127.0.0.1]", "trusted_proxies: ['::1']")
    server = Server(parse_config(text))
    await server.start(reuse_port=True)
    try:
        host, port = server.addresses[0]
        assert host == "::1"
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(v2_header("2001:db8::9") + request())
        received = await reader.read()
        writer.close()
        assert status_of(received) == 200
        assert h1_upstream.requests[-1].header("x-forwarded-for") == "2001:db8::9"
    finally:
        await server.shutdown(grace_period=1.0)


async def test_an_address_in_use_is_reported_with_the_address(h1_upstream: UpstreamServer) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        server = Server(
            parse_config(config(h1_upstream).replace("127.0.0.1:0", f"127.0.0.1:{port}"))
        )
        with pytest.raises(
            OSError, match=rf"error while attempting to bind on address \('127.0.0.1', {port}\)"
        ):
            await server.start()
        await server.shutdown(grace_period=1.0)


async def test_a_reload_that_is_abandoned_closes_its_new_listener(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    plain = config(h1_upstream).replace(", proxy_protocol: true", "")
    server = await gateway_factory(plain.replace("source: proxy_protocol", "source: forwarded"))
    with_second = config(h1_upstream).replace(
        "listeners: [{bind: 127.0.0.1:0, proxy_protocol: true}]",
        "listeners: [{bind: 127.0.0.1:0}, {bind: 127.0.0.1:0, proxy_protocol: true}]",
    )
    await server.prepare_reload(parse_config(with_second))
    pending = server._pending
    assert pending is not None
    (bound,) = pending.bound.values()
    (listening,) = bound.sockets
    address = listening.getsockname()
    assert "BOUND" in repr(bound)  # bound, not yet accepting
    await server.abort_reload()
    assert "CLOSED" in repr(bound)
    assert bound.sockets == ()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(*address)
