"""DNS endpoints (`resolve: {interval}`, proxy/upstream/resolver.py) through an in-process
gateway: a name becomes one endpoint per address, a changed answer adds and drains
endpoints, a failed lookup changes nothing."""

from __future__ import annotations

import httpx
import pytest

from proxy.config.load import parse_config
from proxy.process.server import Server
from proxy.upstream.resolver import resolve_endpoints
from tests.support.gateway import base_url
from tests.support.helpers import eventually
from tests.support.upstreams import UpstreamServer

pytestmark = pytest.mark.socket


class Dns:
    """The answers a test gives for names (the gateway's lookup, swapped in)."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked = 0

    async def lookup(self, host: str, port: int) -> list[str]:
        self.asked += 1
        if host not in self.answers:
            raise OSError(f"no such name {host!r}")
        return self.answers[host]


def config(port: int) -> str:
    return f"""
listeners: [{{bind: 127.0.0.1:0}}]
upstreams:
  app:
    endpoints: [http://svc.test:{port}]
    resolve: {{interval: 1h}}
routes:
  - name: all
    match: {{path_prefix: /}}
    upstream: app
"""


async def test_a_name_is_resolved_on_start_to_every_address_of_it() -> None:
    """The system resolver, for real: localhost's addresses become the endpoints."""
    server = UpstreamServer()
    await server.start()
    gateway = Server(parse_config(config(server.port).replace("svc.test", "localhost")))
    await gateway.start()
    try:
        upstream = gateway.runtime.upstreams["app"]
        await eventually(
            lambda: upstream.endpoints[0].pool.endpoint.name == "localhost", "the first lookup"
        )
        hosts = {state.pool.endpoint.host for state in upstream.endpoints}
        assert "127.0.0.1" in hosts
        assert hosts <= {"127.0.0.1", "::1"}
        async with httpx.AsyncClient(base_url=base_url(gateway)) as client:
            response = await client.get("/echo/x")
        assert response.status_code == 200  # (::1, where nothing listens, is retried)
    finally:
        await gateway.shutdown(grace_period=1.0)
        await server.stop()


async def test_a_changed_answer_adds_an_endpoint_and_drains_the_one_that_left() -> None:
    first = await UpstreamServer().start()
    second = await UpstreamServer(host="127.0.0.2").start(first.port)
    dns = Dns({"svc.test": ["127.0.0.1"]})
    gateway = Server(parse_config(config(first.port)))
    upstream = gateway.runtime.upstreams["app"]
    assert upstream.resolver is not None
    upstream.resolver.lookup = dns.lookup
    await gateway.start()
    try:
        await eventually(
            lambda: upstream.endpoints[0].pool.endpoint.name == "svc.test", "the first lookup"
        )
        async with httpx.AsyncClient(base_url=base_url(gateway)) as client:
            for i in range(4):
                assert (await client.get(f"/echo/one/{i}")).status_code == 200
            assert (len(first.requests), len(second.requests)) == (4, 0)
            kept_pool = upstream.endpoints[0].pool

            dns.answers["svc.test"] = ["127.0.0.1", "127.0.0.2"]
            assert await upstream.resolver.refresh()
            assert upstream.endpoints[0].pool is kept_pool  # same address, same pool
            for i in range(4):
                assert (await client.get(f"/echo/two/{i}")).status_code == 200
            assert (len(first.requests), len(second.requests)) == (6, 2)

            dns.answers["svc.test"] = ["127.0.0.2"]
            assert await upstream.resolver.refresh()
            assert kept_pool.occupancy().open == 0  # it drained: its idle connection closed
            for i in range(3):
                assert (await client.get(f"/echo/three/{i}")).status_code == 200
            assert (len(first.requests), len(second.requests)) == (6, 5)

            del dns.answers["svc.test"]  # the name stops resolving: nothing changes
            assert not await upstream.resolver.refresh()
            assert [s.pool.endpoint.host for s in upstream.endpoints] == ["127.0.0.2"]
            assert (await client.get("/echo/four")).status_code == 200
    finally:
        await gateway.shutdown(grace_period=1.0)
        await first.stop()
        await second.stop()


async def test_addresses_written_as_such_are_kept_and_a_name_keeps_its_tls_name() -> None:
    parsed = parse_config(
        config(443).replace("http://svc.test:443", "https://api.test:8443, http://10.0.0.9:80")
    )
    dns = Dns({"api.test": ["10.1.0.2", "10.1.0.1"]})
    resolved = await resolve_endpoints(parsed.upstreams["app"].endpoints, dns.lookup)
    assert [(e.host, e.port, e.name, e.url) for e in resolved] == [
        ("10.1.0.2", 8443, "api.test", "https://10.1.0.2:8443"),
        ("10.1.0.1", 8443, "api.test", "https://10.1.0.1:8443"),
        ("10.0.0.9", 80, "", "http://10.0.0.9:80"),
    ]
