"""Testing a routes.yaml and a middleware plugin with Gatehouse's pytest plugin.

The README's "Testing your gateway config" walks through this file; the project's CI
runs it. `gatehouse` and `upstream` are fixtures of the plugin that ships with the
package (nothing to import, nothing in conftest.py).
"""

from __future__ import annotations

from pathlib import Path

from proxy.testing.plugin import GatewayFactory, UpstreamFactory

ROUTES = Path(__file__).parent / "routes.yaml"
KEY = {"X-API-Key": "dev-key"}


async def test_users_are_rewritten_and_carry_the_consumer_and_tenant(
    gatehouse: GatewayFactory, upstream: UpstreamFactory
) -> None:
    users = await upstream("users")  # `http://users:8000` in routes.yaml now points here
    users.on("GET", "/users/42").reply(json={"id": 42, "name": "Ada"})
    await upstream("catalog", protocol="h2c")
    gateway = await gatehouse(ROUTES)

    async with gateway.client() as client:
        response = await client.get("/api/users/42", headers={**KEY, "X-Tenant": "acme"})

    assert response.status_code == 200
    assert response.json() == {"id": 42, "name": "Ada"}
    assert gateway.route_of(response) == "users"
    assert gateway.middleware_of(response) == ("request_id", "keys", "tenants")
    sent = gateway.upstream_request(response)  # what the users service received
    assert sent.path == "/users/42"
    assert sent.headers["X-Consumer"] == "partner"
    assert sent.headers["X-Tenant-ID"] == "acme"
    assert "X-API-Key" not in sent.headers  # the key stays at the gateway


async def test_the_plugin_refuses_unknown_tenants_before_the_upstream(
    gatehouse: GatewayFactory, upstream: UpstreamFactory
) -> None:
    users = await upstream("users")
    await upstream("catalog", protocol="h2c")
    gateway = await gatehouse(ROUTES)

    async with gateway.client() as client:
        spoofed = await client.get(
            "/api/users/1", headers={**KEY, "X-Tenant": "initech", "X-Tenant-ID": "acme"}
        )
        missing = await client.get("/api/users/1", headers=KEY)

    assert [spoofed.status_code, missing.status_code] == [403, 403]
    assert spoofed.json()["error"] == "unknown_tenant"
    assert users.requests == []  # refused before anything was sent
    assert gateway.metric("gatehouse_local_replies_total", reason="unknown_tenant") == 2


async def test_catalog_is_get_only_over_h2c(
    gatehouse: GatewayFactory, upstream: UpstreamFactory
) -> None:
    await upstream("users")
    catalog = await upstream("catalog", protocol="h2c")
    catalog.on(prefix="/api/catalog/").reply(503, times=1).reply(json=["book"])
    gateway = await gatehouse(ROUTES)

    async with gateway.client() as client:
        down = await client.get("/api/catalog/items")
        items = await client.get("/api/catalog/items")
        posted = await client.post("/api/catalog/items", json={})

    assert (down.status_code, items.json()) == (503, ["book"])
    assert catalog.last.http_version == "2"
    assert (posted.status_code, gateway.route_of(posted)) == (404, "")
    assert gateway.metric("gatehouse_requests_total", route="catalog", code="200") == 1
