"""`api_key` and `basic_auth` through real sockets: what the client gets when credentials
are missing, wrong or right, what reaches the upstream (the consumer, never the key or
the password), the consumer on the request as later middleware see it, and the metric."""

from __future__ import annotations

import asyncio
import base64
import sys
from pathlib import Path

import httpx
import pytest

from metrics.definitions import REGISTRY
from middleware.base import Handler
from middleware.options import Options
from proxy.core.models import Request, Response
from tests.support.gateway import GatewayFactory, base_url, simple_config
from tests.support.upstreams import Recorded, UpstreamServer

pytestmark = pytest.mark.socket

# Hashes published by the tools that write them (see tests/middleware/test_basic_auth.py).
PHP_BCRYPT = "$2y$07$BCryptRequires22Chrcte/VlQH0piJtjXl.0t1XkA8pw9dMXTpOq"  # rasmuslerdorf
# passlib's pbkdf2_sha256 of "password"
PASSLIB_PBKDF2 = (
    "$pbkdf2-sha256$6400$0ZrzXitFSGltTQnBWOsdAw$Y11AchqV4b0sUisdZd0Xr97KWoymNE0LNNrnEgY4H9M"
)
SHA256_HASH = "{SHA256}XohImNooBHFR0OVvjcYpJ3NgPQ1qq73WKhHvch0VQtg="  # password
SHOW_CONSUMER = "{type: 'tests.e2e.test_mw_auth:ShowConsumer'}"


class ShowConsumer:
    """A plugin placed after the auth middleware: returns `request.consumer` to the
    client in `X-Seen-Consumer`, so tests see what later middleware see."""

    OPTIONS = ()

    def __init__(self, options: Options) -> None:
        self.name = options.name

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        response = await call_next(request)
        response.headers["X-Seen-Consumer"] = request.consumer
        return response


def failures(middleware: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "gatehouse_auth_failures_total", {"middleware": middleware, "reason": reason}
    )
    return value or 0.0


def header_values(recorded: Recorded, name: str) -> list[str]:
    return [value for key, value in recorded.headers if key.lower() == name.lower()]


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


# -- api_key --------------------------------------------------------------------------------


async def test_api_key_missing_wrong_and_right(
    gateway_factory: GatewayFactory,
    h1_upstream: UpstreamServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("E2E_USERS_API_KEY", "env-key-0123")
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# partners\nfile-key-4567 partner-a\n")
    extra = f"""
middleware:
  e2e-keys:
    type: api_key
    keys: [{{key: "${{E2E_USERS_API_KEY}}", consumer: users-app}}]
    keys_file: {keys_file}
"""
    server = await gateway_factory(
        simple_config(
            h1_upstream.url,
            "auto",
            extra=extra,
            route=f"    middleware: [e2e-keys, {SHOW_CONSUMER}]",
        )
    )
    url = base_url(server) + "/echo/k"
    missing, invalid = failures("e2e-keys", "missing"), failures("e2e-keys", "invalid")
    async with httpx.AsyncClient(timeout=10) as client:
        refused = await client.get(url)
        assert refused.status_code == 401
        assert refused.headers["WWW-Authenticate"] == 'ApiKey realm="gatehouse"'
        assert refused.json()["error"] == "unauthorized"

        wrong = await client.get(url, headers={"X-API-Key": "env-key-012"})
        assert wrong.status_code == 403
        assert "WWW-Authenticate" not in wrong.headers
        assert wrong.json()["error"] == "forbidden"
        assert h1_upstream.requests == []  # nothing refused went upstream

        for key, consumer in [("env-key-0123", "users-app"), ("file-key-4567", "partner-a")]:
            headers = [("X-API-Key", key), ("X-Consumer", "admin"), ("X-Consumer", "root")]
            right = await client.get(url, headers=headers)
            assert right.status_code == 200, right.text
            assert right.headers["X-Seen-Consumer"] == consumer
            seen = h1_upstream.requests[-1]
            assert header_values(seen, "X-Consumer") == [consumer]
            assert header_values(seen, "X-API-Key") == []
    assert failures("e2e-keys", "missing") == missing + 1
    assert failures("e2e-keys", "invalid") == invalid + 1


@pytest.mark.parametrize("rewrite", [False, True])
async def test_api_key_in_the_query_is_cut_from_the_target_the_upstream_sees(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, rewrite: bool
) -> None:
    route = "    middleware: [{type: api_key, query: api_key, keys: [{key: q1, consumer: q}]}]"
    prefix = ""
    if rewrite:  # the forwarder then rebuilds the target from path and query
        route += "\n    rewrite: {strip_prefix: /api}"
        prefix = "/api"
    server = await gateway_factory(simple_config(h1_upstream.url, "auto", route=route))
    async with httpx.AsyncClient(timeout=10) as client:
        base = base_url(server) + prefix
        response = await client.get(base + "/echo/q?a=1&api_key=q1&b=%20two")
        assert response.status_code == 200, response.text
        assert response.json()["target"] == "/echo/q?a=1&b=%20two"
        only = await client.get(base + "/echo/only?api_key=q1")
        assert only.json()["target"] == "/echo/only"
        assert header_values(h1_upstream.requests[-1], "X-Consumer") == ["q"]
        refused = await client.get(base + "/echo/q?api_key=nope")
        assert refused.status_code == 403


async def test_api_key_over_http2(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    route = "    middleware: [{type: api_key, keys: [{key: h2-key, consumer: mobile}]}]"
    server = await gateway_factory(simple_config(h1_upstream.url, "auto", route=route))
    async with httpx.AsyncClient(http1=False, http2=True, timeout=10) as client:
        refused = await client.get(base_url(server) + "/echo/h2")
        assert (refused.http_version, refused.status_code) == ("HTTP/2", 401)
        assert refused.headers["www-authenticate"] == 'ApiKey realm="gatehouse"'
        right = await client.get(
            base_url(server) + "/echo/h2", headers={"x-api-key": "h2-key", "x-consumer": "x"}
        )
        assert right.status_code == 200
    seen = h1_upstream.requests[-1]
    assert header_values(seen, "X-Consumer") == ["mobile"]
    assert header_values(seen, "X-API-Key") == []


# -- basic_auth -----------------------------------------------------------------------------


async def test_basic_auth_accepts_a_hash_from_gatehouse_hash_password(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    command = [sys.executable, "-m", "proxy", "hash-password", "--user", "ops", "--cost", "4"]
    process = await asyncio.create_subprocess_exec(
        *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(60):
        out, _ = await process.communicate(b"made by the cli\n")
    assert process.returncode == 0
    line = out.decode().strip()
    extra = f"""
middleware:
  e2e-basic: {{type: basic_auth, users: ['{line}']}}
"""
    route = "    middleware: [e2e-basic]"
    server = await gateway_factory(simple_config(h1_upstream.url, "auto", extra=extra, route=route))
    url = base_url(server) + "/echo/cli"
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.get(url, headers=basic("ops", "made by the cli"))).status_code == 200
        assert (await client.get(url, headers=basic("ops", "made by the CLI"))).status_code == 401


async def test_basic_auth_with_an_htpasswd_file_of_every_hash_format(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer, tmp_path: Path
) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(
        f"# written by htpasswd -B, passlib and openssl\n"
        f"rasmus:{PHP_BCRYPT}\n"
        f"pat:{PASSLIB_PBKDF2}\n"
        f"sam:{SHA256_HASH}\n"
    )
    extra = f"""
middleware:
  e2e-basic: {{type: basic_auth, realm: staff, htpasswd_file: {htpasswd}}}
"""
    route = f"    middleware: [e2e-basic, {SHOW_CONSUMER}]"
    server = await gateway_factory(simple_config(h1_upstream.url, "auto", extra=extra, route=route))
    url = base_url(server) + "/echo/b"
    challenge = 'Basic realm="staff", charset="UTF-8"'
    missing, invalid = failures("e2e-basic", "missing"), failures("e2e-basic", "invalid")
    async with httpx.AsyncClient(timeout=10) as client:
        refused = await client.get(url)
        assert refused.status_code == 401
        assert refused.headers["WWW-Authenticate"] == challenge
        for user, password in [
            ("rasmus", "rasmuslerdorf"),
            ("pat", "password"),
            ("sam", "password"),
        ]:
            wrong = await client.get(url, headers=basic(user, password + "!"))
            assert wrong.status_code == 401
            assert wrong.headers["WWW-Authenticate"] == challenge
            for _ in range(2):  # the second is answered from the cache
                right = await client.get(
                    url, headers={**basic(user, password), "X-Consumer": "root"}
                )
                assert right.status_code == 200, right.text
                assert right.headers["X-Seen-Consumer"] == user
                seen = h1_upstream.requests[-1]
                assert header_values(seen, "X-Consumer") == [user]
                assert header_values(seen, "Authorization") == []
        unknown = await client.get(url, headers=basic("nobody", "password"))
        assert unknown.status_code == 401
    assert len(h1_upstream.requests) == 6
    assert failures("e2e-basic", "missing") == missing + 1
    assert failures("e2e-basic", "invalid") == invalid + 4


async def test_basic_auth_can_forward_authorization(
    gateway_factory: GatewayFactory, h1_upstream: UpstreamServer
) -> None:
    route = (
        "    middleware:\n"
        "      - type: basic_auth\n"
        f'        users: ["alice:{SHA256_HASH}"]\n'
        "        forward_authorization: true\n"
        "        consumer_header: X-User"
    )
    server = await gateway_factory(simple_config(h1_upstream.url, "auto", route=route))
    credentials = basic("alice", "password")
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(base_url(server) + "/echo/fwd", headers=credentials)
    assert response.status_code == 200
    seen = h1_upstream.requests[-1]
    assert header_values(seen, "Authorization") == [credentials["Authorization"]]
    assert header_values(seen, "X-User") == ["alice"]
