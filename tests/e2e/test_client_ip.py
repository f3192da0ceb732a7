"""`client_ip` through real sockets: one client address, decided once per request, seen
by every consumer, and the forwarding headers the upstream gets.

The test client is 127.0.0.1. With `client_ip.trusted_proxies: [127.0.0.1]` it plays a
load balancer, naming clients in X-Forwarded-For or Forwarded; without it, it is an
ordinary client whose forwarding headers are lies, replaced on the way upstream. HTTP/1.1
runs on both codecs, HTTP/2 with prior knowledge, all on both loops.
"""

from __future__ import annotations

import json
from collections import Counter

import httpx
import pytest

from proxy.config.load import parse_config
from proxy.process.server import Server
from tests.support.gateway import GatewayFactory, H1UpstreamFactory, base_url
from tests.support.h2_client import H2Client
from tests.support.upstreams import UpstreamServer

pytestmark = pytest.mark.socket

CLIENT_TIMEOUT_S = 10.0
ALLOWED, OTHER = "198.51.100.7", "203.0.113.9"


def config(upstream: UpstreamServer, codec: str, client_ip: str, *, log: bool = False) -> str:
    """Routes that show the client to each consumer: /office/ (ip_filter allowing
    ALLOWED), /limited/ (one request per client), the rest plain; every request stamped
    with `X-Client: {client_ip}`, and logged to stdout when `log`."""
    chain = "[log, stamp]" if log else "[stamp]"
    return f"""
listeners: [{{bind: 127.0.0.1:0}}]
http1_parser: {codec}
{client_ip}
upstreams: {{app: {{endpoints: [{upstream.url}]}}}}
middleware:
  log: {{type: access_log, fields: [client_ip, peer_ip, path, status]}}
  stamp: {{type: headers, request: {{set: {{X-Client: "{{client_ip}}"}}}}}}
global_middleware: {chain}
routes:
  - name: office
    match: {{path_prefix: /office/}}
    upstream: app
    middleware: [{{type: ip_filter, allow: [{ALLOWED}]}}]
  - name: limited
    match: {{path_prefix: /limited/}}
    upstream: app
    middleware: [{{type: rate_limit, rate: 1/min, key: ip}}]
  - {{name: all, match: {{path_prefix: /}}, upstream: app}}
"""


def logged(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


SOURCES = {
    # source: (header name, value naming `client` behind a spoofed entry and a proxy)
    "x-forwarded-for": ("X-Forwarded-For", "10.6.6.6, {client}, 10.0.0.7"),
    "forwarded": ("Forwarded", 'for=10.6.6.6, for="{client}:4711";proto=https, for=10.0.0.7'),
}


@pytest.mark.parametrize("source", list(SOURCES))
async def test_the_client_a_trusted_proxy_names_reaches_every_consumer(
    gateway_factory: GatewayFactory,
    h1_upstream: UpstreamServer,
    codec: str,
    source: str,
    capfd: pytest.CaptureFixture[str],
) -> None:
    section = f"client_ip: {{trusted_proxies: [127.0.0.1, 10.0.0.0/8], source: {source}}}"
    server = await gateway_factory(config(h1_upstream, codec, section, log=True))
    name, template = SOURCES[source]
    base = base_url(server)

    def naming(client: str) -> dict[str, str]:
        return {name: template.format(client=client)}

    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as client:
        assert (await client.get(base + "/office/x", headers=naming(ALLOWED))).status_code == 200
        assert (await client.get(base + "/office/x", headers=naming(OTHER))).status_code == 403
        assert (await client.get(base + "/limited/x", headers=naming(ALLOWED))).status_code == 200
        assert (await client.get(base + "/limited/x", headers=naming(ALLOWED))).status_code == 429
        assert (await client.get(base + "/limited/x", headers=naming(OTHER))).status_code == 200
        # An entry a trusted hop could not vouch for: the client is unknown, and refused.
        unknown = {name: "for=unknown" if source == "forwarded" else "unknown"}
        assert (await client.get(base + "/office/x", headers=unknown)).status_code == 403
    seen = h1_upstream.requests[-1]  # OTHER on /limited/
    assert seen.header("x-client") == OTHER
    # A trusted proxy's chain is kept, this hop appended.
    if source == "x-forwarded-for":
        assert seen.header("x-forwarded-for") == f"10.6.6.6, {OTHER}, 10.0.0.7, 127.0.0.1"
    else:
        authority = base.removeprefix("http://")
        assert seen.header("forwarded") == (
            f'for=10.6.6.6, for="{OTHER}:4711";proto=https, for=10.0.0.7, '
            f'for=127.0.0.1;host="{authority}";proto=http'
        )
        assert seen.header("x-forwarded-for") == "127.0.0.1"
    await server.shutdown(grace_period=1.0)
    lines = logged(capfd.readouterr().out)
    assert [(line["client_ip"], line["peer_ip"], line["status"]) for line in lines] == [
        (ALLOWED, "127.0.0.1", 200),
        (OTHER, "127.0.0.1", 403),
        (ALLOWED, "127.0.0.1", 200),
        (ALLOWED, "127.0.0.1", 429),
        (OTHER, "127.0.0.1", 200),
        ("", "127.0.0.1", 403),
    ]


async def test_over_http2_the_client_is_found_the_same_way(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    section = "client_ip: {trusted_proxies: [127.0.0.1]}"
    server = await gateway_factory(config(h1_upstream, "auto", section))
    host, port = server.addresses[0]
    async with await H2Client.connect(host, port) as client:
        allowed = await client.request("/office/x", headers=[("x-forwarded-for", ALLOWED)])
        other = await client.request("/office/x", headers=[("x-forwarded-for", OTHER)])
        first = await client.request("/limited/x", headers=[("x-forwarded-for", OTHER)])
        second = await client.request("/limited/x", headers=[("x-forwarded-for", OTHER)])
    assert [allowed.status, other.status, first.status, second.status] == [200, 403, 200, 429]
    seen = h1_upstream.requests[-1]
    assert seen.header("x-client") == OTHER
    assert seen.header("x-forwarded-for") == f"{OTHER}, 127.0.0.1"


async def test_without_client_ip_a_client_cannot_name_itself(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, codec: str
) -> None:
    server = await gateway_factory(config(h1_upstream, codec, ""))
    lies = {
        "X-Forwarded-For": ALLOWED,
        "Forwarded": f"for={ALLOWED};proto=https",
        "X-Real-IP": ALLOWED,
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "bank.example",
    }
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as client:
        base = base_url(server)
        assert (await client.get(base + "/office/x", headers=lies)).status_code == 403
        assert (await client.get(base + "/limited/x", headers=lies)).status_code == 200
        other = {**lies, "X-Forwarded-For": OTHER}
        # One budget: the peer's, whatever each request claims.
        assert (await client.get(base + "/limited/x", headers=other)).status_code == 429
    seen = h1_upstream.requests[-1]
    assert seen.header("x-client") == "127.0.0.1"
    assert seen.header("x-forwarded-for") == "127.0.0.1"
    assert seen.header("x-forwarded-proto") == "http"
    assert seen.header("x-forwarded-host") == base.removeprefix("http://")
    assert seen.header("forwarded") is None
    assert seen.header("x-real-ip") is None


async def test_over_http2_an_untrusted_client_s_forwarding_headers_are_replaced(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    section = "client_ip: {trusted_proxies: [10.0.0.0/8]}"  # not the test client
    server = await gateway_factory(config(h1_upstream, "auto", section))
    host, port = server.addresses[0]
    lies = [
        ("x-forwarded-for", ALLOWED),
        ("forwarded", f"for={ALLOWED}"),
        ("x-real-ip", ALLOWED),
        ("x-forwarded-proto", "https"),
    ]
    async with await H2Client.connect(host, port) as client:
        assert (await client.request("/office/x", headers=lies)).status == 403
        assert (await client.request("/echo/x", headers=lies)).status == 200
    seen = h1_upstream.requests[-1]
    assert seen.header("x-forwarded-for") == "127.0.0.1"
    assert seen.header("x-forwarded-proto") == "http"
    assert seen.header("forwarded") is None
    assert seen.header("x-real-ip") is None


async def test_hash_balancing_by_ip_uses_the_client_behind_the_proxy(
    gateway_factory: GatewayFactory, h1_upstream_factory: H1UpstreamFactory
) -> None:
    upstreams = [await h1_upstream_factory() for _ in range(2)]
    endpoints = ", ".join(server.url for server in upstreams)
    server = await gateway_factory(f"""
listeners: [{{bind: 127.0.0.1:0}}]
client_ip: {{trusted_proxies: [127.0.0.1]}}
upstreams: {{app: {{endpoints: [{endpoints}], balance: {{hash: ip}}}}}}
routes: [{{match: {{path_prefix: /}}, upstream: app}}]
""")
    clients = [f"198.51.100.{n}" for n in range(1, 41)]
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as client:
        for _ in range(3):
            for address in clients:
                response = await client.get(
                    base_url(server) + "/echo/x", headers={"X-Forwarded-For": address}
                )
                assert response.status_code == 200
    homes: dict[str, set[int]] = {address: set() for address in clients}
    for position, upstream in enumerate(upstreams):
        for recorded in upstream.requests:
            forwarded_for = recorded.header("x-forwarded-for") or ""
            homes[forwarded_for.split(",")[0]].add(position)
    assert all(len(home) == 1 for home in homes.values()), homes  # each client stays
    per_endpoint = Counter(next(iter(home)) for home in homes.values())
    assert sorted(per_endpoint) == [0, 1]  # and the clients are spread, not one peer's


async def test_a_reload_changes_who_is_trusted(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    server = await gateway_factory(config(h1_upstream, "auto", ""))
    trusting = config(h1_upstream, "auto", "client_ip: {trusted_proxies: [127.0.0.1]}")

    async def office(server: Server) -> int:
        async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as client:
            headers = {"X-Forwarded-For": ALLOWED}
            return (await client.get(base_url(server) + "/office/x", headers=headers)).status_code

    assert await office(server) == 403
    await server.prepare_reload(parse_config(trusting))
    await server.commit_reload()
    assert await office(server) == 200
    await server.prepare_reload(parse_config(config(h1_upstream, "auto", "")))
    await server.commit_reload()
    assert await office(server) == 403
