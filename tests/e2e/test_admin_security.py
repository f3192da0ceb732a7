"""The admin listener's gates in a real gateway process (two workers, the supervising
parent serving the admin port), with `gatehouse reload` run as a real process: the bearer
token from `${GATEHOUSE_ADMIN_TOKEN}`, the Host allow-list, cross-site POSTs refused and
counted, a token changed by a reload, and /config hiding what it must.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.admin_client import Samples, admin_config, value
from tests.support.gateway_process import free_port, run_cli, run_gateway, wait_until
from tests.support.upstreams import UpstreamServer, serve_in_thread

pytestmark = pytest.mark.socket

TOKEN = "e2e-admin-token-0123456789abcdef"
NAME = "gatehouse-admin.internal"
ROUTES = """
  - name: api
    match: {path_prefix: /api/, headers: {X-Tenant: tenant-secret-1}}
    upstream: app
    middleware:
      - type: headers
        request: {set: {Authorization: "Bearer upstream-secret-2", X-Env: !public staging}}
"""


@pytest.fixture
def h1_upstream() -> Iterator[UpstreamServer]:
    with serve_in_thread(UpstreamServer()) as server:
        yield server


def secured_config(port: int, admin: int, upstream_url: str) -> str:
    """admin_config's, with the token from the environment and `NAME` allowed as Host."""
    text = admin_config(port, admin, upstream_url, ROUTES)
    secured = (
        f"admin:\n  bind: 127.0.0.1:{admin}\n"
        '  token: "${GATEHOUSE_ADMIN_TOKEN}"\n'
        f"  hosts: [{NAME}]\n"
    )
    return text.replace(f"admin:\n  bind: 127.0.0.1:{admin}\n", secured)


def wait_ready_with(url: str) -> None:
    """Until /readyz (open without the token) says both workers serve."""

    def ready() -> bool:
        try:
            answer = httpx.get(f"{url}/readyz", timeout=5)
        except httpx.TransportError:
            return False
        return answer.status_code == 200 and "2 of 2" in answer.text

    wait_until(ready, 10.0, "the workers to be ready")


def test_the_token_guards_everything_but_the_probes(
    tmp_path: Path, h1_upstream: UpstreamServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    port, admin = free_port(), free_port()
    url = f"http://127.0.0.1:{admin}"
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    env = {"GATEHOUSE_ADMIN_TOKEN": TOKEN}
    with run_gateway(
        secured_config(port, admin, h1_upstream.url), tmp_path, port=port, env=env
    ) as gw:
        wait_ready_with(url)
        with httpx.Client(base_url=url, timeout=10) as client:
            assert client.get("/healthz").text == "ok\n"  # probes need no token
            for path in ("/metrics", "/config", "/nope"):
                refused = client.get(path)
                assert refused.status_code == 401, path
                assert refused.headers["www-authenticate"] == 'Bearer realm="gatehouse-admin"'
            wrong = client.get("/metrics", headers={"Authorization": "Bearer not-the-token"})
            assert wrong.status_code == 401
            assert "invalid_token" in wrong.headers["www-authenticate"]
            assert client.post("/reload", headers={"X-Gatehouse-Admin": "1"}).status_code == 401

            # A page's cross-site form POST, even one that guessed the token's header name.
            form = {
                "Origin": "https://evil.example",
                "Sec-Fetch-Site": "cross-site",
                "Content-Type": "application/x-www-form-urlencoded",
            }
            assert client.post("/reload", headers=form, content=b"a=1").status_code == 401
            assert client.post("/reload", headers={**form, **bearer}).status_code == 403

            # DNS rebinding: the attacker's name in Host, on every path.
            for path in ("/healthz", "/config"):
                misdirected = client.get(path, headers={**bearer, "Host": "evil.example"})
                assert misdirected.status_code == 421, path
            named = client.get("/config", headers={**bearer, "Host": f"{NAME}:{admin}"})
            assert named.status_code == 200

            samples = scrape_with(client, bearer)
            assert value(samples, "gatehouse_admin_refusals_total", reason="unauthorized") == 6
            assert value(samples, "gatehouse_admin_refusals_total", reason="cross_site") == 1
            assert value(samples, "gatehouse_admin_refusals_total", reason="host") == 2
            assert value(samples, "gatehouse_config_reloads_total", result="success") == 0
            assert value(samples, "gatehouse_config_reloads_total", result="failure") == 0

        # `gatehouse reload` reads the token from the file, after substitution.
        monkeypatch.setenv("GATEHOUSE_ADMIN_TOKEN", TOKEN)
        done = run_cli("reload", str(gw.config_path))
        assert (done.returncode, done.stdout.strip()) == (0, f"reloaded {gw.config_path}")
        monkeypatch.setenv("GATEHOUSE_ADMIN_TOKEN", "a-different-token-0123456789")
        refused_cli = run_cli("reload", str(gw.config_path))
        assert refused_cli.returncode == 2
        assert "refused the request (401)" in refused_cli.stderr
        with httpx.Client(base_url=url, timeout=10) as client:
            samples = scrape_with(client, bearer)
        assert value(samples, "gatehouse_config_reloads_total", result="success") == 1


def scrape_with(client: httpx.Client, headers: dict[str, str]) -> Samples:
    """Every sample of /metrics, asked with `headers`."""
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_a_reload_that_changes_the_token_takes_effect_at_once(
    tmp_path: Path, h1_upstream: UpstreamServer
) -> None:
    port, admin = free_port(), free_port()
    url = f"http://127.0.0.1:{admin}"
    env = {"GATEHOUSE_ADMIN_TOKEN": TOKEN}
    text = secured_config(port, admin, h1_upstream.url)
    with run_gateway(text, tmp_path, port=port, env=env) as gw:
        wait_ready_with(url)
        new_token = "rotated-admin-token-9876543210"
        gw.config_path.write_text(text.replace('"${GATEHOUSE_ADMIN_TOKEN}"', new_token))
        with httpx.Client(base_url=url, timeout=30) as client:
            old = {"Authorization": f"Bearer {TOKEN}"}
            new = {"Authorization": f"Bearer {new_token}"}
            assert client.post("/reload", headers=old).json() == {"ok": True}
            assert client.get("/config", headers=old).status_code == 401
            view = client.get("/config", headers=new)
            assert view.status_code == 200
            assert view.json()["config"]["admin"]["token"] == "<redacted>"


def test_config_hides_header_values_and_matchers_by_position(
    tmp_path: Path, h1_upstream: UpstreamServer
) -> None:
    port, admin = free_port(), free_port()
    url = f"http://127.0.0.1:{admin}"
    env = {"GATEHOUSE_ADMIN_TOKEN": TOKEN}
    with run_gateway(secured_config(port, admin, h1_upstream.url), tmp_path, port=port, env=env):
        wait_ready_with(url)
        answer = httpx.get(f"{url}/config", headers={"Authorization": f"Bearer {TOKEN}"})
    shown = answer.json()["config"]
    route = shown["routes"][0]
    assert route["match"]["headers"] == {"X-Tenant": "<redacted>"}
    assert route["middleware"][0]["request"]["set"] == {
        "Authorization": "<redacted>",
        "X-Env": "staging",  # marked !public
    }
    assert shown["admin"]["token"] == "${GATEHOUSE_ADMIN_TOKEN}"  # the name, never the value
    text = json.dumps(answer.json())
    assert [s for s in (TOKEN, "tenant-secret-1", "upstream-secret-2") if s in text] == []


def test_an_admin_listener_beyond_loopback_without_a_token_is_warned_about(
    tmp_path: Path, h1_upstream: UpstreamServer
) -> None:
    port, admin = free_port(), free_port()
    text = admin_config(port, admin, h1_upstream.url, ROUTES).replace(
        f"bind: 127.0.0.1:{admin}", f"bind: 0.0.0.0:{admin}"
    )
    with run_gateway(text, tmp_path, port=port) as gw:
        wait_until(
            lambda: "leaves loopback without admin.token" in gw.stderr(), 10.0, "the warning"
        )
        # Served all the same (an operator may have a firewall), and still refusing a
        # browser's POST and a foreign Host.
        url = f"http://127.0.0.1:{admin}"
        assert httpx.get(f"{url}/config", timeout=10).status_code == 200
        assert httpx.post(f"{url}/reload", timeout=10).status_code == 403
        assert httpx.get(f"{url}/healthz", headers={"Host": "evil.example"}).status_code == 421
