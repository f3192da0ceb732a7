"""`gatehouse explain` agrees with the running gateway: generated requests are sent to a
real gateway (the testing kit, in test mode) and the route that handled each one, read
from the answer, is the route `explain` names for it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import parse_config
from proxy.explain import explain
from proxy.testing import running_gateway, start_upstream
from proxy.testing.trace import ROUTE_HEADER
from tests.proxy.test_explain import CONFIG, HEADERS, METHODS, PATHS, QUERIES

config = parse_config(CONFIG)
# Every host of the explain tests but "": an HTTP/1.1 request always names one.
HOSTS = st.sampled_from(
    ["api.example.com", "API.example.com:443", "shop.example.com", "example.com", "other.test."]
)


@pytest.fixture(scope="module")
def gateway_url() -> Iterator[str]:
    """The explain tests' config served by a gateway in a thread of its own, so that the
    (synchronous) hypothesis test can send it requests."""
    ready = threading.Event()
    url: list[str] = []
    stop = threading.Event()

    async def serve() -> None:
        users = await start_upstream("users")
        admin = await start_upstream("admin")
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
    yield url[0]
    stop.set()
    thread.join(10)
    assert not thread.is_alive()


@settings(max_examples=200, deadline=None)
@given(method=METHODS, host=HOSTS, path=PATHS, headers=HEADERS, query=QUERIES)
def test_the_gateway_routes_each_request_where_explain_says(
    gateway_url: str,
    method: str,
    host: str,
    path: str,
    headers: list[tuple[str, str]],
    query: str,
) -> None:
    target = path + (f"?{query}" if query else "")
    with httpx.Client(base_url=gateway_url, timeout=10) as client:
        response = client.request(method, target, headers=[("Host", host), *headers])
    expected = explain(config, method, f"http://{host}{target}", headers)
    assert response.headers[ROUTE_HEADER] == (expected.route.name if expected.route else "")
