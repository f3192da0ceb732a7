"""`hash` and `sticky` across a fleet: three real gateway processes (two workers each) in
front of the same four endpoints send a key to the same endpoint, whichever gateway and
worker a request reaches. The choice is computed, never remembered: BLAKE2b of the key
on a ring built from the endpoints' host:port, a cookie naming an endpoint by a hash of
its host:port (proxy/upstream/hashing.py). So it holds with no state shared between the
gateways, and even when their configs list the endpoints in another order (as two DNS
answers may). The upstreams say who answered (`server` in the echo's JSON).

Every request opens a fresh connection, so the kernel spreads them over both workers of
each gateway (SO_REUSEPORT)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.gateway_process import Gateway, free_port, run_gateway
from tests.support.upstreams import UpstreamServer, serve_in_thread

pytestmark = pytest.mark.socket

GATEWAYS = 3
ENDPOINTS = 4
KEYS = 40
CLIENT_TIMEOUT_S = 10.0


def fleet_config(port: int, endpoints: list[UpstreamServer], rotation: int) -> str:
    """A gateway on `port` whose hashed and sticky upstreams list `endpoints` rotated by
    `rotation` (each gateway its own order); the split's sides are the first two."""
    ordered = endpoints[rotation:] + endpoints[:rotation]
    listed = "[" + ", ".join(server.url for server in ordered) + "]"
    return f"""
listeners:
  - bind: 127.0.0.1:{port}
workers: 2
reload: {{watch: false}}
shutdown: {{grace_period: 1s}}
upstreams:
  by_user:
    endpoints: {listed}
    balance: {{hash: {{header: X-User}}}}
  pinned:
    endpoints: {listed}
    balance: {{sticky: {{cookie: gh_aff}}}}
  blue:
    endpoints: [{endpoints[0].url}]
  green:
    endpoints: [{endpoints[1].url}]
routes:
  - name: hashed
    match: {{path_prefix: /hash/}}
    upstream: by_user
    rewrite: {{strip_prefix: /hash, add_prefix: /echo}}
  - name: sticky
    match: {{path_prefix: /sticky/}}
    upstream: pinned
    rewrite: {{strip_prefix: /sticky, add_prefix: /echo}}
  - name: canary
    match: {{path_prefix: /split/}}
    upstream:
      split: [{{upstream: blue, weight: 50}}, {{upstream: green, weight: 50}}]
      sticky: {{header: X-User}}
    rewrite: {{strip_prefix: /split, add_prefix: /echo}}
"""


@pytest.fixture
def endpoints() -> Iterator[list[UpstreamServer]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(serve_in_thread(UpstreamServer())) for _ in range(ENDPOINTS)]


@pytest.fixture
def gateways(tmp_path: Path, endpoints: list[UpstreamServer]) -> Iterator[list[Gateway]]:
    with contextlib.ExitStack() as stack:
        started = []
        for number in range(GATEWAYS):
            port = free_port()
            config = fleet_config(port, endpoints, rotation=number)
            started.append(stack.enter_context(run_gateway(config, tmp_path, port=port)))
        yield started


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    """A client that keeps no connection open: each request opens its own."""
    limits = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(timeout=CLIENT_TIMEOUT_S, limits=limits) as fresh:
        yield fresh


def answered_by(
    client: httpx.Client, gateway: Gateway, path: str, **headers: str
) -> httpx.Response:
    """GET `path` from `gateway` with only the cookies in `headers`; it must answer 200."""
    client.cookies.clear()  # what the jar kept from another answer is not this request's
    response = client.get(gateway.url + path, headers=headers)
    assert response.status_code == 200, response.text
    return response


def server(response: httpx.Response) -> str:
    return str(response.json()["server"])


def test_hash_sends_each_key_to_the_same_endpoint_on_every_gateway(
    gateways: list[Gateway], client: httpx.Client
) -> None:
    chosen: dict[str, set[str]] = {}
    for key in (f"user-{n}" for n in range(KEYS)):
        for gateway in gateways:
            for attempt in range(2):  # fresh connections: likely both workers
                response = answered_by(client, gateway, f"/hash/{key}/{attempt}", **{"X-User": key})
                chosen.setdefault(key, set()).add(server(response))
    disagreements = {key: found for key, found in chosen.items() if len(found) != 1}
    assert not disagreements
    # The keys spread: a ring that sent everything to one endpoint would agree trivially.
    assert len(set().union(*chosen.values())) >= ENDPOINTS - 1


def test_a_sticky_cookie_set_by_one_gateway_is_honoured_by_every_gateway(
    gateways: list[Gateway], client: httpx.Client
) -> None:
    tokens: dict[str, set[str]] = {}  # endpoint -> the cookie values naming it
    for round_number in range(2 * ENDPOINTS):
        first = gateways[round_number % GATEWAYS]
        response = answered_by(client, first, f"/sticky/first/{round_number}")
        token = response.cookies["gh_aff"]
        pinned = server(response)
        tokens.setdefault(pinned, set()).add(token)
        for gateway in gateways:
            again = answered_by(
                client, gateway, f"/sticky/again/{round_number}", Cookie=f"gh_aff={token}"
            )
            assert server(again) == pinned
            assert "set-cookie" not in again.headers  # the cookie already names it
    # Whichever gateway (and worker) set it, an endpoint's cookie value is the same one.
    assert all(len(values) == 1 for values in tokens.values()), tokens
    assert len(tokens) > 1  # round robin placed the first requests on several endpoints


def test_a_sticky_split_keeps_each_user_on_one_side_on_every_gateway(
    gateways: list[Gateway], endpoints: list[UpstreamServer], client: httpx.Client
) -> None:
    sides: dict[str, set[str]] = {}
    for key in (f"user-{n}" for n in range(KEYS)):
        for gateway in gateways:
            response = answered_by(client, gateway, f"/split/{key}", **{"X-User": key})
            sides.setdefault(key, set()).add(server(response))
    assert all(len(found) == 1 for found in sides.values()), sides
    blue, green = (f"{upstream.host}:{upstream.port}" for upstream in endpoints[:2])
    assert set().union(*sides.values()) == {blue, green}
