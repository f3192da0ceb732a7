"""Weighted splits through real sockets (`upstream: {split: [...]}`, docs/traffic.md): a
gateway in front of two real upstreams, v1 and v2, each recording what it receives.

Without `sticky`, a split is smooth weighted round robin, so the counts are exact, not
statistical. Each test runs on both loops, over HTTP/1.1 and HTTP/2 from the client,
with HTTP/1.1 and h2c sides."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from metrics.traffic import SPLIT_REQUESTS
from proxy.process.server import Server
from proxy.testing.upstream import ScriptedUpstream, start_upstream
from tests.support.gateway import GatewayFactory, base_url

pytestmark = pytest.mark.socket


def split_config(sides: list[ScriptedUpstream], route: str, sticky: str = "") -> str:
    v1, v2 = sides
    return f"""
listeners:
  - bind: 127.0.0.1:0
upstreams:
  v1: {{endpoints: [{v1.url}], protocol: {v1.protocol}}}
  v2: {{endpoints: [{v2.url}], protocol: {v2.protocol}}}
middleware:
  ids: {{type: request_id}}
routes:
  - name: {route}
    match: {{path_prefix: /{route}}}
    upstream:
      split: [{{upstream: v1, weight: 90}}, {{upstream: v2, weight: 10}}]
      {sticky}
  - name: {route}-chained
    match: {{path_prefix: /chained}}
    middleware: [ids]
    upstream:
      split: [{{upstream: v1, weight: 3}}, {{upstream: v2, weight: 1}}]
"""


@pytest.fixture(params=["http1", "h2c"])
async def sides(request: pytest.FixtureRequest) -> AsyncIterator[list[ScriptedUpstream]]:
    """v1 and v2, answering with their names (HTTP/1.1, or both h2c)."""
    upstreams = [await start_upstream(name, protocol=request.param) for name in ("v1", "v2")]
    for upstream in upstreams:
        upstream.reply(200, body=upstream.name)
    yield upstreams
    for upstream in upstreams:
        await upstream.stop()


@pytest.fixture(params=["1.1", "2"])
def client_http2(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "2")


def client(http2: bool) -> httpx.AsyncClient:
    return httpx.AsyncClient(http1=not http2, http2=http2, timeout=10)


def split_counts(route: str) -> tuple[float, float]:
    return (
        SPLIT_REQUESTS.labels(route, "v1").value,
        SPLIT_REQUESTS.labels(route, "v2").value,
    )


async def test_a_split_sends_exactly_its_weights(
    gateway_factory: GatewayFactory, sides: list[ScriptedUpstream], client_http2: bool
) -> None:
    gateway = await gateway_factory(split_config(sides, "even"))
    before = split_counts("even")
    async with client(client_http2) as http:
        responses = []
        for n in range(100):
            url = f"{base_url(gateway)}/even/{n}"
            # Bodiless GETs (the fast path, on HTTP/1.1 sides) and POSTs (the task path).
            sent = http.post(url, content=b"x") if n % 3 == 0 else http.get(url)
            responses.append(await sent)
    bodies = [response.text for response in responses]
    assert [response.status_code for response in responses] == [200] * 100
    assert (bodies.count("v1"), bodies.count("v2")) == (90, 10)
    # Spread out, not in a burst: each run of ten has one v2.
    assert [bodies[start : start + 10].count("v2") for start in range(0, 100, 10)] == [1] * 10
    v1, v2 = sides
    assert (len(v1.requests), len(v2.requests)) == (90, 10)
    assert {r.method for r in v2.requests} == {"GET", "POST"}
    after = split_counts("even")
    assert (after[0] - before[0], after[1] - before[1]) == (90.0, 10.0)


async def test_a_split_route_with_middleware_splits_too(
    gateway_factory: GatewayFactory, sides: list[ScriptedUpstream], client_http2: bool
) -> None:
    gateway = await gateway_factory(split_config(sides, "mw"))
    async with client(client_http2) as http:
        responses = [await http.get(f"{base_url(gateway)}/chained/{n}") for n in range(40)]
    assert [response.text for response in responses].count("v2") == 10
    # The chain ran on either side: each request carries its request id.
    assert all(r.headers.get("x-request-id") for r in sides[0].requests + sides[1].requests)


@pytest.mark.parametrize(
    ("sticky", "field"),
    [("sticky: {cookie: session}", "cookie"), ("sticky: {header: X-User}", "header")],
)
async def test_a_sticky_split_keeps_each_user_on_one_side(
    gateway_factory: GatewayFactory,
    sides: list[ScriptedUpstream],
    client_http2: bool,
    sticky: str,
    field: str,
) -> None:
    config = split_config(sides, "sticky", sticky)
    # Two gateways of the same config: a user lands on the same side on either.
    gateways = [await gateway_factory(config), await gateway_factory(config)]
    users = [f"user-{n}" for n in range(30)]
    seen: dict[str, set[str]] = {user: set() for user in users}
    async with client(client_http2) as http:
        for round_ in range(3):
            for user in users:
                gateway = gateways[round_ % 2]  # (round 3: the first again)
                headers = (
                    {"Cookie": f"a=1; session={user}"} if field == "cookie" else {"X-User": user}
                )
                response = await http.get(f"{base_url(gateway)}/sticky/x", headers=headers)
                assert response.status_code == 200
                seen[user].add(response.text)
                # No cookie is set: the value is the application's.
                assert "set-cookie" not in response.headers
        anonymous = [(await http.get(f"{base_url(gateways[0])}/sticky/x")).text for _ in range(10)]
    assert all(len(sides_seen) == 1 for sides_seen in seen.values()), seen
    on_v2 = [user for user in users if seen[user] == {"v2"}]
    assert 0 < len(on_v2) < len(users) // 2  # a tenth of them, give or take
    # Without the value, requests take their turn by weight.
    assert anonymous.count("v2") == 1


async def test_routes_and_explain_show_the_sides(
    gateway_factory: GatewayFactory, sides: list[ScriptedUpstream]
) -> None:
    from proxy.process.admin_views import routes_view
    from proxy.tools.explain import explain, render_explanation, render_routes

    gateway: Server = await gateway_factory(split_config(sides, "shown", "sticky: {cookie: sid}"))
    config = gateway.runtime.config
    table = render_routes(config)
    assert "shown: any host, path_prefix /shown, any method -> v1 (90) | v2 (10)" in table
    text = render_explanation(config, explain(config, "GET", "http://x/shown/1"))
    assert "split: v1 90% (weight 90), v2 10% (weight 10), sticky by cookie sid" in text
    assert "upstream: v1 (" in text
    assert "upstream: v2 (" in text
    (shown,) = [route for route in routes_view(config, {}) if route["name"] == "shown"]
    assert shown["split"] == {
        "sides": [
            {"upstream": "v1", "weight": 90, "percent": 90.0},
            {"upstream": "v2", "weight": 10, "percent": 10.0},
        ],
        "sticky": {"cookie": "sid"},
    }


async def test_a_split_route_mirrors_whichever_side_a_request_went_to(
    gateway_factory: GatewayFactory, sides: list[ScriptedUpstream]
) -> None:
    shadow = await start_upstream("shadow")
    try:
        config = (
            split_config(sides, "both") + "  - name: mirrored\n"
            "    match: {path_prefix: /mirrored}\n"
            "    upstream: {split: [{upstream: v1, weight: 9}, {upstream: v2, weight: 1}]}\n"
            "    mirror: {upstream: shadow}\n"
        ).replace("upstreams:\n", f"upstreams:\n  shadow: {{endpoints: [{shadow.url}]}}\n")
        gateway = await gateway_factory(config)
        async with httpx.AsyncClient(timeout=10) as http:
            answers = [
                (await http.get(f"{base_url(gateway)}/mirrored/{n}")).text for n in range(10)
            ]
        assert answers.count("v2") == 1
        split = gateway.runtime.routes["mirrored"].split
        assert split is not None
        mirrors = {id(side.forwarder.mirror) for side in split.sides if side.forwarder}
        assert len(mirrors) == 1  # one mirror, one bound, whichever side
        mirror = split.sides[0].forwarder.mirror if split.sides[0].forwarder else None
        assert mirror is not None
        await asyncio.gather(*list(mirror.tasks))
        assert sorted(request.path for request in shadow.requests) == sorted(
            f"/mirrored/{n}" for n in range(10)
        )
    finally:
        await shadow.stop()
