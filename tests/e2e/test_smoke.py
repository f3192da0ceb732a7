from __future__ import annotations

import httpx
import pytest

from proxy.process.server import Server
from tests.support.gateway import base_url
from tests.support.upstreams import UpstreamServer

pytestmark = pytest.mark.socket


async def test_get_is_proxied(gateway: Server, h1_upstream: UpstreamServer) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.get(base_url(gateway) + "/echo?x=1")
    assert response.status_code == 200
    assert response.json()["target"] == "/echo?x=1"
