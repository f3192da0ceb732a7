"""`gatehouse explain` agrees with the running gateway: generated requests are sent to a
real gateway (the testing kit, in test mode), and what it did with each one (the route
and middleware chain, read from the answer; the target the upstream received) is what
`explain` says for it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config.load import parse_config
from proxy.testing import ReceivedRequest, ScriptedUpstream, running_gateway
from proxy.testing.trace import EXCHANGE_HEADER, MIDDLEWARE_HEADER, ROUTE_HEADER
from proxy.tools.explain import explain
from tests.proxy.tools.test_explain import CONFIG, HEADERS, METHODS, PATHS, QUERIES

config = parse_config(CONFIG)
# Every host of the explain tests but "": an HTTP/1.1 request always names one.
HOSTS = st.sampled_from(
    ["api.example.com", "API.example.com:443", "shop.example.com", "example.com", "other.test."]
)


@dataclass
class Served:
    url: str
    upstreams: list[ScriptedUpstream]

    def received(self, exchange: str) -> list[ReceivedRequest]:
        return [r for up in self.upstreams for r in list(up.requests) if r.exchange == exchange]


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    """The explain tests' config served by a gateway in a thread of its own, so that the
    (synchronous) hypothesis test can send it requests."""
    ready = threading.Event()
    url: list[str] = []
    stop = threading.Event()
    users = ScriptedUpstream("users")
    admin = ScriptedUpstream("admin")

    async def serve() -> None:
        await users.start()
        await admin.start()
        try:
            upstreams = {"users": users, "admin": admin}
            async with running_gateway(CONFIG, upstreams=upstreams) as gateway:
                url.append(gateway.url)
                ready.set()
                await asyncio.to_thread(stop.wait)
        finally:
            await users.stop()
            await admin.stop()
            ready.set()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10), "the gateway did not start"
    assert url, "the gateway did not start"
    yield Served(url[0], [users, admin])
    stop.set()
    thread.join(10)
    assert not thread.is_alive()


@settings(max_examples=200, deadline=None)
@given(method=METHODS, host=HOSTS, path=PATHS, headers=HEADERS, query=QUERIES)
def test_the_gateway_does_with_each_request_what_explain_says(
    served: Served,
    method: str,
    host: str,
    path: str,
    headers: list[tuple[str, str]],
    query: str,
) -> None:
    target = path + (f"?{query}" if query else "")
    sent = [("Host", host), ("X-API-Key", "k1"), *headers]  # past the api_key route's check
    with httpx.Client(base_url=served.url, timeout=10) as client:
        response = client.request(method, target, headers=sent)
    expected = explain(config, method, f"http://{host}{target}", headers)
    route = expected.route.name if expected.route else ""
    assert response.headers[ROUTE_HEADER] == route
    # A request no route takes still passes through global_middleware before its 404.
    chain = expected.middleware if expected.route else config.global_middleware
    assert response.headers[MIDDLEWARE_HEADER] == ", ".join(spec.name for spec in chain)
    received = served.received(response.headers[EXCHANGE_HEADER])
    if expected.route is None:
        assert (response.status_code, received) == (404, [])
    else:
        assert response.status_code == 200
        forwarded = expected.forwarded_path + (f"?{query}" if query else "")
        assert [request.target for request in received] == [forwarded]
