"""Reload, end to end: a real gateway process with two workers and its admin listener, a
client sending requests all the while, and configs swapped under it by SIGHUP, the admin
API, `gatehouse reload` and a change of the file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from tests.support.admin_client import admin_config, admin_get, admin_reload, metric, wait_ready
from tests.support.client_load import ClientLoad
from tests.support.gateway_process import (
    child_pids,
    connect_refused,
    free_port,
    run_cli,
    run_gateway,
    wait_until,
)
from tests.support.upstreams import UpstreamServer, WsUpstream, serve_in_thread

pytestmark = pytest.mark.socket

CLIENT_TIMEOUT_S = 10.0
LOAD_CONNECTIONS = 8


@pytest.fixture
def h1_upstream() -> Iterator[UpstreamServer]:
    with serve_in_thread(UpstreamServer()) as server:
        yield server


STABLE_ROUTE = """
  - name: stable
    match: {path_prefix: /stable}
    upstream: app
    rewrite: {strip_prefix: /stable, add_prefix: /echo}
"""


def config_text(
    port: int, admin: int, upstream_url: str, *, routes: str = "", extra: str = ""
) -> str:
    """Two workers, an admin listener, a `stable` route to `upstream_url` (under /stable,
    rewritten to /echo) and whatever `routes` adds."""
    return admin_config(port, admin, upstream_url, STABLE_ROUTE + routes, extra)


def numbered_route(number: int) -> str:
    """A route only config number `number` has: /vN/x reaches the upstream as /echo/vN/x."""
    return f"""
  - name: v{number}
    match: {{path_prefix: /v{number}/}}
    upstream: app
    rewrite: {{add_prefix: /echo}}
"""


def stable_load(url: str, connections: int) -> ClientLoad:
    """Clients on the stable route, each request to a path of its own."""
    return ClientLoad(lambda index, n: [f"{url}/stable/{index}/{n}"], connections)


def test_twenty_reloads_valid_and_invalid_under_load_lose_no_request(
    tmp_path: Path, h1_upstream: UpstreamServer
) -> None:
    port, admin = free_port(), free_port()
    base = config_text(port, admin, h1_upstream.url)
    with run_gateway(base, tmp_path, port=port) as gw:
        wait_ready(admin)
        fresh = httpx.Client(
            timeout=CLIENT_TIMEOUT_S, limits=httpx.Limits(max_keepalive_connections=0)
        )
        with fresh, stable_load(gw.url, LOAD_CONNECTIONS) as load:
            for number in range(20):
                mark = load.sent
                if number % 2 == 0:
                    gw.config_path.write_text(
                        config_text(port, admin, h1_upstream.url, routes=numbered_route(number))
                    )
                    assert admin_reload(admin).status_code == 200
                    # New requests see the new route at once, on every worker.
                    for attempt in range(4):
                        answer = fresh.get(f"{gw.url}/v{number}/{attempt}")
                        assert answer.status_code == 200, answer.text
                        assert answer.json()["target"] == f"/echo/v{number}/{attempt}"
                    if number:  # the previous config's own route is gone
                        assert fresh.get(f"{gw.url}/v{number - 2}/x").status_code == 404
                else:
                    gw.config_path.write_text(base + "\n  - name: [broken\n")
                    refused = admin_reload(admin)
                    assert refused.status_code == 422
                    errors = refused.json()["errors"]
                    assert errors
                    assert errors[0].startswith(f"{gw.config_path}:"), errors
                    # The old config keeps serving, its last route included.
                    assert fresh.get(f"{gw.url}/v{number - 1}/x").status_code == 200

                # The load runs between reloads: counted in requests, not in a pause a
                # busy machine may spend on none.
                def went_on(target: int = mark + 10) -> bool:
                    return load.sent >= target

                wait_until(went_on, 10.0, "the load to go on between reloads")
        assert load.failures == [], load.failures[:5]
        assert metric(admin, "gatehouse_config_reloads_total", result="success") == 10
        assert metric(admin, "gatehouse_config_reloads_total", result="failure") == 10
        assert "reload refused, the running config stays" in gw.stderr()
        assert len(child_pids(gw.pid)) == 2  # reloads happen inside the same workers


def test_sighup_reloads_and_an_invalid_file_is_logged_with_its_line(
    tmp_path: Path, h1_upstream: UpstreamServer
) -> None:
    port, admin = free_port(), free_port()
    with run_gateway(config_text(port, admin, h1_upstream.url), tmp_path, port=port) as gw:
        wait_ready(admin)
        gw.config_path.write_text(
            config_text(port, admin, h1_upstream.url, routes=numbered_route(1))
        )
        gw.signal(signal.SIGHUP)
        wait_until(
            lambda: httpx.get(f"{gw.url}/v1/x", timeout=CLIENT_TIMEOUT_S).status_code == 200,
            10.0,
            "the SIGHUP reload",
        )
        broken = config_text(port, admin, h1_upstream.url).replace(
            "upstream: app", "upstream: nope"
        )
        gw.config_path.write_text(broken)
        gw.signal(signal.SIGHUP)
        wait_until(
            lambda: metric(admin, "gatehouse_config_reloads_total", result="failure") == 1,
            10.0,
            "the refused reload to be counted",
        )
        assert f"{gw.config_path}:" in gw.stderr()
        assert "unknown upstream 'nope'" in gw.stderr()
        assert httpx.get(f"{gw.url}/v1/x", timeout=CLIENT_TIMEOUT_S).status_code == 200


def test_a_changed_file_is_reloaded_once_it_holds_still(
    tmp_path: Path, h1_upstream: UpstreamServer
) -> None:
    port, admin = free_port(), free_port()
    watched = "reload: {watch: true, interval: 100ms}"
    text = config_text(port, admin, h1_upstream.url).replace("reload: {watch: false}", watched)
    with run_gateway(text, tmp_path, port=port) as gw:
        wait_ready(admin)
        before = metric(admin, "gatehouse_config_reloads_total", result="success")
        changed = text.replace(
            "  - name: stable", numbered_route(7).strip("\n") + "\n  - name: stable"
        )
        gw.config_path.write_text(changed)
        wait_until(
            lambda: httpx.get(f"{gw.url}/v7/x", timeout=CLIENT_TIMEOUT_S).status_code == 200,
            10.0,
            "the watched file's reload",
        )
        time.sleep(0.5)  # several polls: an unchanged file is not reloaded again
        assert metric(admin, "gatehouse_config_reloads_total", result="success") == before + 1
        # A broken edit is refused once, not on every poll.
        gw.config_path.write_text(changed + "\nbogus_key: 1\n")
        wait_until(
            lambda: metric(admin, "gatehouse_config_reloads_total", result="failure") == 1,
            10.0,
            "the refused reload",
        )
        time.sleep(0.5)
        assert metric(admin, "gatehouse_config_reloads_total", result="failure") == 1
        assert "unknown key 'bogus_key'" in gw.stderr()


class ConfigMapVolume:
    """A directory laid out and updated as the kubelet does a ConfigMap volume: each
    version's files in a hidden directory named for the time, `..data` a symlink to the
    current version, and each key a symlink `KEY -> ..data/KEY`. An update writes the new
    version's directory, points a staging symlink `..data_tmp` at it and renames that over
    `..data` (the one atomic step), then removes the old version."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.versions = 0
        root.mkdir()

    def path(self, key: str) -> Path:
        """Where a pod reads `key`: the top-level symlink."""
        return self.root / key

    def update(self, files: dict[str, str]) -> None:
        self.versions += 1
        stamp = time.strftime("%Y_%m_%d_%H_%M_%S", time.gmtime())
        version = self.root / f"..{stamp}.{self.versions:09d}"
        version.mkdir()
        for key, text in files.items():
            (version / key).write_text(text)
            (version / key).chmod(0o444)
        data = self.root / "..data"
        previous = os.readlink(data) if data.is_symlink() else None
        staging = self.root / "..data_tmp"
        staging.symlink_to(version.name)
        os.rename(staging, data)
        for key in files:
            if not self.path(key).is_symlink():
                self.path(key).symlink_to(f"..data/{key}")
        if previous is not None:
            shutil.rmtree(self.root / previous)


def test_a_configmap_volume_updated_by_its_symlink_swap_is_reloaded(
    tmp_path: Path, h1_upstream: UpstreamServer
) -> None:
    port, admin = free_port(), free_port()
    watched = "reload: {watch: true, interval: 100ms}"
    text = config_text(port, admin, h1_upstream.url).replace("reload: {watch: false}", watched)
    volume = ConfigMapVolume(tmp_path / "routes")
    volume.update({"routes.yaml": text})
    path = volume.path("routes.yaml")
    with run_gateway(text, tmp_path, port=port, config_path=path) as gw:
        wait_ready(admin)
        before = metric(admin, "gatehouse_config_reloads_total", result="success")
        # Two swaps: after the first, the watch must follow the version it reloaded.
        for number in (7, 8):
            text = text.replace(
                "  - name: stable", numbered_route(number).strip("\n") + "\n  - name: stable"
            )
            volume.update({"routes.yaml": text})
            route = f"{gw.url}/v{number}/x"

            def serves(url: str = route) -> bool:
                return httpx.get(url, timeout=CLIENT_TIMEOUT_S).status_code == 200

            wait_until(serves, 10.0, f"the reload of ConfigMap version {volume.versions}")
        assert metric(admin, "gatehouse_config_reloads_total", result="success") == before + 2
        # An invalid version, swapped in the same way, is refused; the last good one serves.
        volume.update({"routes.yaml": text.replace("upstream: app", "upstream: nope", 1)})
        wait_until(
            lambda: metric(admin, "gatehouse_config_reloads_total", result="failure") == 1,
            10.0,
            "the refused version to be counted",
        )
        assert f"{path}:" in gw.stderr()
        assert "unknown upstream 'nope'" in gw.stderr()
        assert httpx.get(f"{gw.url}/v8/x", timeout=CLIENT_TIMEOUT_S).status_code == 200
        assert path.is_symlink()  # read through the link throughout, never replaced


def test_gatehouse_reload_command_reports_success_and_refusal(
    tmp_path: Path, h1_upstream: UpstreamServer
) -> None:
    port, admin = free_port(), free_port()
    with run_gateway(config_text(port, admin, h1_upstream.url), tmp_path, port=port) as gw:
        wait_ready(admin)
        gw.config_path.write_text(
            config_text(port, admin, h1_upstream.url, routes=numbered_route(2))
        )

        def reload_command(*args: str) -> subprocess.CompletedProcess[str]:
            return run_cli("reload", str(gw.config_path), *args)

        done = reload_command()
        assert done.returncode == 0, done.stderr
        assert httpx.get(f"{gw.url}/v2/x", timeout=CLIENT_TIMEOUT_S).status_code == 200
        # Valid for `check` but not startable: a listener on an address that is taken.
        taken = free_port()
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", taken))
            squatter.listen()
            text = config_text(port, admin, h1_upstream.url).replace(
                "    name: public\n", f"    name: public\n  - bind: 127.0.0.1:{taken}\n"
            )
            gw.config_path.write_text(text)
            refused = reload_command("--admin", f"127.0.0.1:{admin}")
        assert refused.returncode == 1
        assert "cannot start the new config" in refused.stderr
        assert f"cannot listen on 127.0.0.1:{taken}" in refused.stderr
        assert "address already in use" in refused.stderr
        # Refused on every worker: the route of the running config is still there.
        assert httpx.get(f"{gw.url}/v2/x", timeout=CLIENT_TIMEOUT_S).status_code == 200


def test_a_listener_moved_by_a_reload_is_rebound_and_the_other_keeps_serving(
    tmp_path: Path, h1_upstream: UpstreamServer
) -> None:
    port, admin, first, second = free_port(), free_port(), free_port(), free_port()

    def with_extra_listener(extra_port: int) -> str:
        return config_text(port, admin, h1_upstream.url).replace(
            "    name: public\n",
            f"    name: public\n  - bind: 127.0.0.1:{extra_port}\n    name: extra\n",
        )

    with run_gateway(with_extra_listener(first), tmp_path, port=port) as gw:
        wait_ready(admin)
        with httpx.Client(timeout=CLIENT_TIMEOUT_S) as kept:
            assert kept.get(f"{gw.url}/stable/a").status_code == 200  # a keep-alive connection
            assert httpx.get(f"http://127.0.0.1:{first}/stable/b").status_code == 200
            gw.config_path.write_text(with_extra_listener(second))
            assert admin_reload(admin).status_code == 200
            assert httpx.get(f"http://127.0.0.1:{second}/stable/c").status_code == 200
            wait_until(lambda: connect_refused(first), 10.0, "the old listener to close")
            # The unchanged listener's open connection was not touched.
            assert kept.get(f"{gw.url}/stable/d").status_code == 200
            assert kept.get(f"{gw.url}/stable/e").extensions["http_version"] == b"HTTP/1.1"


def read_until_closed(ws: ClientConnection) -> ConnectionClosed:
    """Receive (and drop) messages until the connection closes; how it closed."""
    while True:
        try:
            ws.recv(timeout=10)
        except ConnectionClosed as closed:
            return closed


def test_a_websocket_opened_before_a_reload_still_echoes_after_it(
    tmp_path: Path, h1_upstream: UpstreamServer
) -> None:
    port, admin = free_port(), free_port()
    with serve_in_thread(WsUpstream()) as ws_upstream:
        routes = """
  - name: chat
    match: {path_prefix: /chat}
    upstream: ws
  - name: doomed
    match: {path_prefix: /doomed}
    upstream: ws
"""
        text = config_text(port, admin, h1_upstream.url, routes=routes).replace(
            "upstreams:\n", f"upstreams:\n  ws:\n    endpoints: [{ws_upstream.url}]\n"
        )
        with run_gateway(text, tmp_path, port=port) as gw:
            wait_ready(admin)
            with (
                ws_connect(f"ws://127.0.0.1:{port}/chat", open_timeout=5) as kept,
                ws_connect(f"ws://127.0.0.1:{port}/doomed", open_timeout=5) as doomed,
            ):
                kept.send("before")
                assert kept.recv(timeout=5) == "before"
                # The reload adds a route and removes `doomed`; `chat` stays as it was.
                gw.config_path.write_text(
                    text.replace(
                        "  - name: doomed\n    match: {path_prefix: /doomed}\n    upstream: ws\n",
                        "",
                    )
                    + numbered_route(3)
                )
                started = time.monotonic()  # before the reload starts the grace period
                assert admin_reload(admin).status_code == 200
                kept.send("after")
                assert kept.recv(timeout=5) == "after"
                # The tunnel of the removed route gets the grace period (2 s), then 1001
                # (which read_until_closed waits for, 10 s at most between messages).
                doomed.send("still here")
                assert doomed.recv(timeout=5) == "still here"
                closed = read_until_closed(doomed)
                waited = time.monotonic() - started
                assert waited >= 2.0 - 0.001  # the grace period ran first (uvloop counts ms)
                assert closed.rcvd is not None
                assert closed.rcvd.code == 1001
                kept.send("later")
                assert kept.recv(timeout=5) == "later"
            metrics = admin_get(admin, "/metrics").text
            assert 'gatehouse_websocket_closes_total{reason="route_removed"} 1.0' in metrics


def test_sigterm_flips_readyz_lets_slow_requests_finish_and_exits_0(
    tmp_path: Path, h1_upstream: UpstreamServer
) -> None:
    port, admin = free_port(), free_port()
    held_route = "  - name: held\n    match: {path_prefix: /held}\n    upstream: app\n"
    text = config_text(port, admin, h1_upstream.url, routes=held_route)
    # A grace period no test waits out: exiting within the bound below is exiting when
    # the requests ended.
    text = text.replace("grace_period: 2s", "grace_period: 60s")
    with run_gateway(text, tmp_path, port=port) as gw:
        wait_ready(admin)
        results: list[int] = []

        def held_request() -> None:
            # Held by the upstream until the test lets it go, started before SIGTERM.
            response = httpx.get(f"{gw.url}/held", timeout=CLIENT_TIMEOUT_S)
            results.append(response.status_code)

        clients = [threading.Thread(target=held_request) for _ in range(4)]
        for client in clients:
            client.start()
        wait_until(lambda: len(h1_upstream.requests) == 4, 10.0, "the four requests in flight")
        gw.signal(signal.SIGTERM)
        wait_until(
            lambda: admin_get(admin, "/readyz").status_code == 503, 10.0, "/readyz to turn 503"
        )
        h1_upstream.release_held()
        assert gw.wait(10) == 0  # well inside the grace period: it ended when they did
        for client in clients:
            client.join(10)
        assert results == [200] * 4
        assert connect_refused(port)


def test_config_endpoint_shows_the_running_file_with_secrets_redacted(
    tmp_path: Path, h1_upstream: UpstreamServer
) -> None:
    port, admin = free_port(), free_port()
    text = config_text(port, admin, h1_upstream.url).replace(
        "routes:\n",
        "middleware:\n  keys: {type: api_key, keys: [s3cret-key]}\nroutes:\n",
    )
    with run_gateway(text, tmp_path, port=port) as gw:
        wait_ready(admin)
        view = admin_get(admin, "/config").json()
        assert view["source"] == str(gw.config_path)
        assert view["config"]["middleware"]["keys"]["keys"] == ["<redacted>"]
        assert "s3cret-key" not in json.dumps(view)
        assert view["config"]["routes"][0]["name"] == "stable"
        assert len(view["workers"]) == 2


def test_a_reload_while_a_worker_restarts_reaches_the_new_worker_too(
    tmp_path: Path, h1_upstream: UpstreamServer
) -> None:
    port, admin = free_port(), free_port()
    with run_gateway(config_text(port, admin, h1_upstream.url), tmp_path, port=port) as gw:
        wait_ready(admin)
        gw.config_path.write_text(
            config_text(port, admin, h1_upstream.url, routes=numbered_route(5))
        )
        victim = min(child_pids(gw.pid))
        os.kill(victim, signal.SIGKILL)
        # The replacement is still starting (forked with the old config, or not yet):
        # the reload goes ahead with the ready worker and the new one catches up.
        assert admin_reload(admin).status_code == 200
        wait_until(lambda: len(child_pids(gw.pid) - {victim}) == 2, 10.0, "a new worker")
        wait_ready(admin)
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(timeout=CLIENT_TIMEOUT_S, limits=limits) as fresh:
            statuses = {fresh.get(f"{gw.url}/v5/{i}").status_code for i in range(30)}
        assert statuses == {200}  # every worker, the new one too, has the new route
