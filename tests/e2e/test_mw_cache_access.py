"""`cache` and the access checks of a chain, through real sockets: the cache comes after the
check (a cache before one is refused at load: tests/proxy/config/test_middleware.py), so
a stored response never reaches a client the check would refuse, and keyed by the identity
the check sets, one consumer's stored answer never reaches another."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from proxy.testing.upstream import ReceivedRequest, Reply, ScriptedUpstream, make_reply
from tests.support.gateway import GatewayFactory, base_url
from tests.support.gateway_process import run_cli

pytestmark = pytest.mark.socket

CLIENT_TIMEOUT_S = 10.0


def chain_config(upstream_url: str, chain: str) -> str:
    return f"""\
listeners: [{{bind: 127.0.0.1:0}}]
upstreams: {{origin: {{endpoints: ["{upstream_url}"]}}}}
middleware:
  keys: {{type: api_key, keys: [{{key: key-a, consumer: a}}, {{key: key-b, consumer: b}}]}}
  store: {{type: cache, key: {{headers: [X-Consumer]}}}}
routes:
  - name: all
    match: {{path_prefix: /}}
    upstream: origin
    middleware: {chain}
"""


def per_consumer(request: ReceivedRequest) -> Reply:
    """The origin answers each consumer its own page, fresh for a minute, and says so
    with neither Vary nor private: only the cache's key keeps consumers apart."""
    consumer = request.headers.get("x-consumer", "nobody")
    return make_reply(200, body=f"page of {consumer}", headers={"cache-control": "max-age=60"})


@pytest.fixture
async def origin() -> AsyncIterator[ScriptedUpstream]:
    upstream = await ScriptedUpstream("origin").start()
    upstream.on().call(per_consumer)
    yield upstream
    await upstream.stop()


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "h2"])
async def test_a_cache_after_the_key_check_never_serves_a_client_the_check_refuses(
    gateway_factory: GatewayFactory, origin: ScriptedUpstream, http2: bool
) -> None:
    server = await gateway_factory(chain_config(origin.url, "[keys, store]"))
    async with httpx.AsyncClient(
        base_url=base_url(server), timeout=CLIENT_TIMEOUT_S, http1=not http2, http2=http2
    ) as client:

        async def page(headers: dict[str, str]) -> tuple[int, str, str]:
            response = await client.get("/report", headers=headers)
            return response.status_code, response.text, response.headers.get("cache-status", "")

        first = await page({"X-API-Key": "key-a"})
        assert first[:2] == (200, "page of a")
        assert "fwd=uri-miss" in first[2]
        again = await page({"X-API-Key": "key-a"})
        assert again[:2] == (200, "page of a")
        assert "hit" in again[2]
        # Another consumer: its own entry, never a's.
        other = await page({"X-API-Key": "key-b"})
        assert other[:2] == (200, "page of b")
        assert "fwd=uri-miss" in other[2]
        # No key, a wrong key, or a's identity claimed by hand: refused before the cache.
        for headers, refused in (
            ({}, 401),
            ({"X-API-Key": "key-x"}, 403),
            ({"X-Consumer": "a"}, 401),
        ):
            status, body, cache_status = await page(headers)
            assert status == refused, body
            assert "page of" not in body
            assert cache_status == ""
        # A real key with a forged identity: the forged field is dropped, the key's own set.
        assert (await page({"X-API-Key": "key-b", "X-Consumer": "a"}))[:2] == (200, "page of b")
    assert [request.headers.get("x-consumer") for request in origin.requests] == ["a", "b"]


def test_check_refuses_a_cache_before_the_key_check(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(chain_config("http://127.0.0.1:9", "[store, keys]"))
    done = run_cli("check", str(path))
    assert done.returncode == 1
    assert (
        f"{path}:10: routes[0].middleware[1]: 'keys' (api_key) controls access, but 'store'"
        " (cache) comes before it" in done.stderr
    )
