"""Load balancing through real sockets: a gateway in front of three real upstreams, each
counting what it receives (`balance` in routes.yaml).

The bulk requests are small POSTs, so they take the general forwarding path (one choice
per try); a bodiless GET first goes to the synchronous fast path, which asks the policy
too (`test_every_endpoint_gets_gets_on_the_fast_path`)."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
import pytest

from proxy.process.server import Server
from tests.support.gateway import GatewayFactory, H1UpstreamFactory, base_url
from tests.support.upstreams import UpstreamServer

pytestmark = pytest.mark.socket

CONCURRENCY = 8


def balanced_config(upstreams: list[UpstreamServer], weights: list[int], balance: str) -> str:
    endpoints = "\n".join(
        f"      - {{url: {server.url}, weight: {weight}}}"
        for server, weight in zip(upstreams, weights, strict=True)
    )
    return f"""
listeners:
  - bind: 127.0.0.1:0
upstreams:
  app:
    endpoints:
{endpoints}
    balance: {balance}
routes:
  - name: all
    match: {{path_prefix: /}}
    upstream: app
"""


async def three_upstreams(upstream_factory: H1UpstreamFactory) -> list[UpstreamServer]:
    return [await upstream_factory() for _ in range(3)]


async def send_all(
    client: httpx.AsyncClient,
    urls: list[str],
    headers: list[dict[str, str]] | None = None,
    concurrency: int = CONCURRENCY,
) -> list[httpx.Response]:
    """POST a byte to every URL, `concurrency` at a time; all must answer 200."""
    responses: list[httpx.Response] = [None] * len(urls)  # type: ignore[list-item]
    position = 0

    async def worker() -> None:
        nonlocal position
        while position < len(urls):
            mine = position
            position += 1
            extra = headers[mine] if headers is not None else None
            # POST with a body: the general forwarding path (see the module docstring).
            responses[mine] = await client.post(urls[mine], headers=extra, content=b"x")

    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(worker())
    assert [r.status_code for r in responses] == [200] * len(urls)
    return responses


def shares(upstreams: list[UpstreamServer]) -> list[float]:
    counts = received(upstreams)
    return [round(count / sum(counts), 4) for count in counts]


def received(upstreams: list[UpstreamServer]) -> list[int]:
    return [len(server.requests) for server in upstreams]


@pytest.mark.parametrize("policy", ["round_robin", "random", "least_request"])
async def test_requests_are_spread_by_weight(
    gateway_factory: GatewayFactory, h1_upstream_factory: H1UpstreamFactory, policy: str
) -> None:
    upstreams = await three_upstreams(h1_upstream_factory)
    gateway = await gateway_factory(balanced_config(upstreams, [1, 2, 3], policy))
    total = 3000
    # least_request follows the weights only under equal load: one request at a time
    # (under concurrent load it favours whichever has fewer in flight per unit of weight).
    concurrency = 1 if policy == "least_request" else CONCURRENCY
    async with httpx.AsyncClient() as client:
        urls = [f"{base_url(gateway)}/echo/{n}" for n in range(total)]
        await send_all(client, urls, concurrency=concurrency)
    counts = received(upstreams)
    assert sum(counts) == total
    # Round robin is exact; the random draws within 3.5 points (about 4 sigma).
    tolerance = 0.0 if policy == "round_robin" else 0.035
    for count, weight in zip(counts, [1, 2, 3], strict=True):
        assert abs(count / total - weight / 6) <= tolerance + 1e-9, counts


async def test_hash_on_a_header_keeps_each_key_on_one_endpoint(
    gateway_factory: GatewayFactory, h1_upstream_factory: H1UpstreamFactory
) -> None:
    upstreams = await three_upstreams(h1_upstream_factory)
    config = balanced_config(upstreams, [1, 1, 1], "{hash: {header: X-User}}")
    gateway = await gateway_factory(config)
    users = [f"user-{n}" for n in range(60)]
    rounds = 5
    async with httpx.AsyncClient() as client:
        await send_all(
            client,
            [f"{base_url(gateway)}/echo/{n}" for n in range(len(users) * rounds)],
            [{"X-User": user} for user in users * rounds],
        )
        # No X-User: round robin, so all three get one of three.
        before = received(upstreams)
        for _ in range(3):
            assert (await client.get(f"{base_url(gateway)}/echo/anonymous")).status_code == 200
    homes: dict[str, set[int]] = {user: set() for user in users}
    for position, server in enumerate(upstreams):
        for recorded in server.requests:
            user = recorded.header("x-user")
            if user is not None:
                homes[user].add(position)
    assert all(len(home) == 1 for home in homes.values()), homes
    per_endpoint = Counter(next(iter(home)) for home in homes.values())
    assert sorted(per_endpoint) == [0, 1, 2]  # the keys are spread over all three
    # Each endpoint's share of the ring is about a third, but the ring is placed by the
    # endpoints' names (host:port, with ports that change every run), so a share can be
    # a quarter; 60 keys then leave fewer than 3 on one endpoint with a chance below
    # 1e-5 (one run in CI had 6 on one of them, which `>= 8` refused).
    assert min(per_endpoint.values()) >= 3
    assert [a - b for a, b in zip(received(upstreams), before, strict=True)] == [1, 1, 1]


def sticky_config(upstreams: list[UpstreamServer]) -> str:
    return balanced_config(upstreams, [1, 1, 1], "{sticky: {cookie: gh_aff, ttl: 1h}}")


def which(upstreams: list[UpstreamServer], before: list[int]) -> int:
    """The one upstream that received a request since `before`."""
    grown = [i for i, (a, b) in enumerate(zip(received(upstreams), before, strict=True)) if a > b]
    assert len(grown) == 1, (before, received(upstreams))
    return grown[0]


async def test_sticky_cookie_is_set_then_honoured(
    gateway_factory: GatewayFactory, h1_upstream_factory: H1UpstreamFactory
) -> None:
    upstreams = await three_upstreams(h1_upstream_factory)
    gateway = await gateway_factory(sticky_config(upstreams))
    url = f"{base_url(gateway)}/echo/session"
    async with httpx.AsyncClient() as first, httpx.AsyncClient() as second:
        response = await first.get(url)
        set_cookie = response.headers.get_list("set-cookie")
        assert len(set_cookie) == 1
        assert set_cookie[0].startswith("gh_aff=")
        assert set_cookie[0].endswith("; Path=/; HttpOnly; SameSite=Lax; Max-Age=3600")
        home = which(upstreams, [0, 0, 0])
        assert first.cookies["gh_aff"] not in upstreams[home].url
        second_response = await second.get(url)  # another client: round robin moves on
        assert second_response.headers.get_list("set-cookie") != set_cookie
        assert which(upstreams, [1 if i == home else 0 for i in range(3)]) != home
        for _ in range(12):
            before = received(upstreams)
            response = await first.get(url)
            assert response.status_code == 200
            assert "set-cookie" not in response.headers  # the right cookie: not set again
            assert which(upstreams, before) == home
            # The upstream sees the cookie too (the gateway does not strip it).
            assert "gh_aff=" in (upstreams[home].requests[-1].header("cookie") or "")


async def test_sticky_falls_back_while_its_endpoint_is_out_of_rotation(
    gateway_factory: GatewayFactory, h1_upstream_factory: H1UpstreamFactory
) -> None:
    upstreams = await three_upstreams(h1_upstream_factory)
    gateway = await gateway_factory(sticky_config(upstreams))
    balancer = gateway.runtime.upstreams["app"]
    url = f"{base_url(gateway)}/echo/session"
    async with httpx.AsyncClient() as client:
        assert (await client.get(url)).status_code == 200
        home = which(upstreams, [0, 0, 0])
        old_cookie = client.cookies["gh_aff"]
        # Its endpoint leaves rotation (as a failed health check does it).
        balancer.endpoints[home].healthy = False
        balancer.refresh_eligibility()
        before = received(upstreams)
        response = await client.get(url)
        assert response.status_code == 200
        new_home = which(upstreams, before)
        assert new_home != home
        new_cookie = client.cookies["gh_aff"]
        assert new_cookie != old_cookie
        for _ in range(5):
            before = received(upstreams)
            response = await client.get(url)
            assert "set-cookie" not in response.headers
            assert which(upstreams, before) == new_home
        # The old endpoint comes back: the client stays where its cookie now points.
        balancer.endpoints[home].healthy = True
        balancer.refresh_eligibility()
        before = received(upstreams)
        assert (await client.get(url)).status_code == 200
        assert which(upstreams, before) == new_home


async def test_sticky_falls_back_when_its_endpoint_is_gone(
    gateway_factory: GatewayFactory, h1_upstream_factory: H1UpstreamFactory
) -> None:
    upstreams = await three_upstreams(h1_upstream_factory)
    gateway = await gateway_factory(sticky_config(upstreams))
    url = f"{base_url(gateway)}/echo/session"
    async with httpx.AsyncClient() as client:
        assert (await client.get(url)).status_code == 200
        home = which(upstreams, [0, 0, 0])
        old_cookie = client.cookies["gh_aff"]
        await upstreams[home].stop()
        # The pinned endpoint refuses connections: the connect failure is retried on
        # another endpoint (retries on connect-failure are on by default), whose answer
        # moves the cookie there.
        before = received(upstreams)
        response = await client.get(url)
        assert response.status_code == 200, response.text
        new_home = which(upstreams, before)
        assert new_home != home
        new_cookie = client.cookies["gh_aff"]
        assert new_cookie != old_cookie
        for _ in range(5):
            before = received(upstreams)
            response = await client.get(url)
            assert response.status_code == 200
            assert "set-cookie" not in response.headers
            assert which(upstreams, before) == new_home


async def test_balance_decisions_do_not_disturb_plain_proxying(
    gateway_factory: GatewayFactory, h1_upstream_factory: H1UpstreamFactory
) -> None:
    upstreams = await three_upstreams(h1_upstream_factory)
    config = balanced_config(upstreams, [1, 1, 1], "{hash: {cookie: sid}}")
    gateway: Server = await gateway_factory(config)
    async with httpx.AsyncClient(cookies={"sid": "abc"}) as client:
        response = await client.post(f"{base_url(gateway)}/echo/x?y=1", content=b"body")
    assert response.status_code == 200
    assert response.json()["body"] == "body"
    assert response.json()["target"] == "/echo/x?y=1"
    assert sum(received(upstreams)) == 1


async def test_every_endpoint_gets_bodiless_requests_of_the_fast_path_by_weight(
    gateway_factory: GatewayFactory, h1_upstream_factory: H1UpstreamFactory
) -> None:
    """Regression: a GET that found no idle connection on the fast path was balanced a
    second time on the general path, so round robin skipped an endpoint that had no
    connection yet, for good (weights 1,2,3 gave 0, 24, 36 of 60)."""
    upstreams = await three_upstreams(h1_upstream_factory)
    gateway = await gateway_factory(balanced_config(upstreams, [1, 2, 3], "round_robin"))
    async with httpx.AsyncClient() as client:
        for n in range(60):
            assert (await client.get(f"{base_url(gateway)}/echo/{n}")).status_code == 200
    assert received(upstreams) == [10, 20, 30]
