"""The gateway as a process: `python -m proxy run` with one worker and with a supervising
parent, graceful drain on SIGTERM, worker restarts, and the README's quick start.

Each test runs the gateway as a real subprocess on a port picked here (a multi-worker
gateway cannot report an ephemeral one) and kills its process group at the end.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.gateway_process import (
    REPO_ROOT,
    child_pids,
    connect_refused,
    free_port,
    gateway_config,
    kill_process_group,
    listening,
    pids_connected_to,
    run_gateway,
    wait_until,
)
from tests.support.upstreams import UpstreamServer, serve_in_thread

CLIENT_TIMEOUT_S = 10.0


pytestmark = pytest.mark.socket


@pytest.fixture
def h1_upstream() -> Iterator[UpstreamServer]:
    """The h11 test upstream (tests/support/upstreams/h1.py), on its own loop in a thread:
    these tests are synchronous (this fixture overrides the async one in tests/conftest.py)."""
    with serve_in_thread(UpstreamServer()) as server:
        yield server


def fresh_connection_client() -> httpx.Client:
    """A client that opens a new TCP connection for every request."""
    return httpx.Client(timeout=CLIENT_TIMEOUT_S, limits=httpx.Limits(max_keepalive_connections=0))


def request_in_background(
    pool: concurrent.futures.ThreadPoolExecutor, url: str
) -> concurrent.futures.Future[httpx.Response]:
    def get() -> httpx.Response:
        with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
            return client.get(url)

    return pool.submit(get)


def wait_for_upstream_request(upstream: UpstreamServer, target: str) -> None:
    wait_until(
        lambda: any(r.target == target for r in upstream.requests),
        10.0,
        f"{target} to reach the upstream",
    )


# A grace period no test waits out: a gateway that exits within a test's bound on a hang
# left as soon as it could, not when the grace period ended.
LONG_GRACE = "shutdown: {grace_period: 60s}"


# ----------------------------------------------------------------------- one worker


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_single_worker_proxies_requests(
    tmp_path: Path, h1_upstream: UpstreamServer, loop: str
) -> None:
    port = free_port()
    config = gateway_config(port, h1_upstream.url)
    with (
        run_gateway(config, tmp_path, port=port, args=("--workers", "1", "--loop", loop)) as gw,
        httpx.Client(timeout=CLIENT_TIMEOUT_S) as client,
    ):
        for i in range(5):
            response = client.get(f"{gw.url}/echo/{i}?q=1")
            assert response.status_code == 200
            assert response.json()["target"] == f"/echo/{i}?q=1"
        # One worker is supervised too: restarted if it dies, reloaded by the parent.
        assert len(child_pids(gw.pid)) == 1


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_sigterm_lets_the_in_flight_request_finish_refuses_new_ones_and_exits_0(
    tmp_path: Path, h1_upstream: UpstreamServer, loop: str
) -> None:
    port = free_port()
    config = gateway_config(port, h1_upstream.url, extra=LONG_GRACE)
    with (
        run_gateway(config, tmp_path, port=port, args=("--workers", "1", "--loop", loop)) as gw,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        # The upstream answers when the test says, so the request is in flight for as
        # long as the test needs, however slowly the gateway stops listening.
        in_flight = request_in_background(pool, f"{gw.url}/held")
        wait_for_upstream_request(h1_upstream, "/held")
        gw.signal(signal.SIGTERM)
        wait_until(lambda: connect_refused(port), 10.0, "the listener to close after SIGTERM")
        assert not in_flight.done(), "the in-flight request should not have been cut"
        h1_upstream.release_held()

        response = in_flight.result(CLIENT_TIMEOUT_S)
        assert response.status_code == 200
        assert response.text == "held"
        assert response.headers.get("connection", "").lower() == "close"
        # It left as soon as the last exchange ended, not at the end of the grace period.
        assert gw.wait(10.0) == 0, gw.stderr()


def test_sigterm_closes_idle_keep_alive_connections_and_exits_at_once(
    tmp_path: Path, h1_upstream: UpstreamServer
) -> None:
    port = free_port()
    config = gateway_config(port, h1_upstream.url, extra=LONG_GRACE)
    with (
        run_gateway(config, tmp_path, port=port, args=("--workers", "1")) as gw,
        socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT_S) as idle,
    ):
        idle.sendall(b"GET /bytes/0 HTTP/1.1\r\nHost: t\r\n\r\n")
        response = b""
        while b"\r\n\r\n" not in response:  # Content-Length: 0, so the head is all
            response += idle.recv(65536)
        assert response.startswith(b"HTTP/1.1 200 ")
        gw.signal(signal.SIGTERM)
        assert gw.wait(10.0) == 0, gw.stderr()  # at once: no exchange to wait for
        idle.settimeout(CLIENT_TIMEOUT_S)
        try:
            after = idle.recv(65536)
        except ConnectionResetError:
            after = b""
        assert after == b"", "the idle connection should have been closed"


def test_request_still_running_when_a_short_grace_period_ends_is_cut_and_exit_is_0(
    tmp_path: Path, h1_upstream: UpstreamServer
) -> None:
    port = free_port()
    config = gateway_config(port, h1_upstream.url, extra="shutdown: {grace_period: 300ms}")
    with (
        run_gateway(config, tmp_path, port=port, args=("--workers", "1")) as gw,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        in_flight = request_in_background(pool, f"{gw.url}/held")  # never answered
        wait_for_upstream_request(h1_upstream, "/held")
        gw.signal(signal.SIGTERM)
        assert gw.wait(10.0) == 0, gw.stderr()  # the grace period's end let it go

        with pytest.raises(httpx.TransportError):
            in_flight.result(CLIENT_TIMEOUT_S)


# ------------------------------------------------------------------- several workers


def two_worker_config(upstream: UpstreamServer) -> tuple[int, str]:
    port = free_port()
    return port, gateway_config(port, upstream.url, extra=LONG_GRACE)


def wait_for_workers(parent: int, count: int) -> set[int]:
    wait_until(lambda: len(child_pids(parent)) == count, 10.0, f"{count} workers")
    return child_pids(parent)


def test_two_workers_share_fresh_connections_and_all_succeed(
    tmp_path: Path, h1_upstream: UpstreamServer
) -> None:
    port, config = two_worker_config(h1_upstream)
    with (
        run_gateway(config, tmp_path, port=port, args=("--workers", "2")) as gw,
        fresh_connection_client() as client,
    ):
        workers = wait_for_workers(gw.pid, 2)
        for worker in workers:  # each worker listens before we count on it
            wait_until(functools.partial(listening, worker, port), 10.0, f"{worker} to bind")
        statuses = [client.get(f"{gw.url}/echo/{i}").status_code for i in range(200)]
        assert statuses == [200] * 200
        # Both workers proxied: each holds a pooled keep-alive connection to the upstream.
        assert pids_connected_to(h1_upstream.port, workers) == workers
        assert h1_upstream.connections >= 2


def test_a_killed_worker_is_restarted_and_traffic_keeps_flowing(
    tmp_path: Path, h1_upstream: UpstreamServer
) -> None:
    port, config = two_worker_config(h1_upstream)
    with (
        run_gateway(config, tmp_path, port=port, args=("--workers", "2")) as gw,
        fresh_connection_client() as client,
    ):
        before = wait_for_workers(gw.pid, 2)
        victim = min(before)
        os.kill(victim, signal.SIGKILL)  # a worker this test's gateway forked
        statuses = []
        lost = 0
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            try:
                statuses.append(client.get(f"{gw.url}/echo/during").status_code)
            except httpx.TransportError:
                # Connections the kernel queued on the dying worker's SO_REUSEPORT
                # socket are reset with it (unless net.ipv4.tcp_migrate_req is on);
                # only those few may be lost.
                lost += 1
            now = child_pids(gw.pid)
            if len(now) == 2 and victim not in now:
                break
        after = child_pids(gw.pid)
        assert victim not in after
        assert len(after) == 2, f"no replacement worker:\n{gw.stderr()}"
        (replacement,) = after - before
        wait_until(lambda: listening(replacement, port), 10.0, "the new worker to bind")
        statuses += [client.get(f"{gw.url}/echo/after").status_code for _ in range(50)]
        assert set(statuses) == {200}
        assert lost <= 3
        assert gw.process.poll() is None


def test_sigterm_to_the_parent_stops_every_worker_and_exits_0(
    tmp_path: Path, h1_upstream: UpstreamServer
) -> None:
    port, config = two_worker_config(h1_upstream)
    with run_gateway(config, tmp_path, port=port, args=("--workers", "2")) as gw:
        workers = wait_for_workers(gw.pid, 2)
        with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
            assert client.get(f"{gw.url}/echo").status_code == 200
        gw.signal(signal.SIGTERM)
        assert gw.wait(10.0) == 0, gw.stderr()
        assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]
        assert connect_refused(port)


def test_ctrl_c_drains_every_worker_and_exits_0(
    tmp_path: Path, h1_upstream: UpstreamServer
) -> None:
    """A terminal's Ctrl-C sends SIGINT to the whole foreground process group: the parent
    and each worker get it at once. The in-flight request still completes."""
    port, config = two_worker_config(h1_upstream)
    with (
        run_gateway(config, tmp_path, port=port, args=("--workers", "2")) as gw,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        workers = wait_for_workers(gw.pid, 2)
        in_flight = request_in_background(pool, f"{gw.url}/held")
        wait_for_upstream_request(h1_upstream, "/held")
        os.killpg(gw.pid, signal.SIGINT)  # the group this test's gateway leads
        wait_until(lambda: connect_refused(port), 10.0, "the listeners to close after SIGINT")
        h1_upstream.release_held()  # answered only once every worker is draining
        response = in_flight.result(CLIENT_TIMEOUT_S)
        assert response.status_code == 200
        assert response.text == "held"
        assert gw.wait(10.0) == 0, gw.stderr()
        assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]


# ----------------------------------------------------------------------- quick start


def test_readme_quick_start_proxies_to_the_demo_echo_service(tmp_path: Path) -> None:
    echo_port, gateway_port = free_port(), free_port()
    bundled = (REPO_ROOT / "routes.yaml").read_text()
    config, replaced = re.subn(r"bind: 0\.0\.0\.0:8080", f"bind: 127.0.0.1:{gateway_port}", bundled)
    assert replaced == 1, "routes.yaml no longer listens on 0.0.0.0:8080"
    echo = subprocess.Popen(
        [sys.executable, "-m", "proxy.tools.echo", "--port", str(echo_port)],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(lambda: not connect_refused(echo_port), 10.0, "the echo service")
        with (
            run_gateway(config, tmp_path, port=gateway_port, env={"ECHO_PORT": str(echo_port)}),
            httpx.Client(timeout=CLIENT_TIMEOUT_S) as client,
        ):
            response = client.get(f"http://127.0.0.1:{gateway_port}/api/hello?x=1")
            assert response.status_code == 200
            seen = response.json()
            assert seen["service"] == "echo"
            assert seen["target"] == "/hello?x=1"
            headers = {name.lower(): value for name, value in seen["headers"].items()}
            assert headers["x-forwarded-for"] == "127.0.0.1"
            assert headers["x-forwarded-proto"] == "http"
            assert headers["x-forwarded-host"] == f"127.0.0.1:{gateway_port}"
            assert "via" in headers
            other = client.get(f"http://127.0.0.1:{gateway_port}/other").json()
            assert other["target"] == "/other"  # the default route: no rewrite
    finally:
        kill_process_group(echo)


def test_sighup_while_workers_start_does_not_kill_them(
    tmp_path: Path, h1_upstream: UpstreamServer
) -> None:
    """Regression: a worker unblocked signals right after fork but installed its SIGHUP
    handler only once its loop ran, so a SIGHUP in between killed it (the default
    action). Here SIGHUP arrives the moment the workers exist, before they listen."""
    port, config = two_worker_config(h1_upstream)
    with run_gateway(config, tmp_path, port=port, args=("--workers", "2"), wait=False) as gw:
        workers = wait_for_workers(gw.pid, 2)
        gw.signal(signal.SIGHUP)
        gw.wait_listening()
        time.sleep(0.3)  # a killed worker would be reaped and replaced by now
        assert gw.process.poll() is None
        assert child_pids(gw.pid) == workers


def test_sighup_reloads_in_place_without_replacing_a_worker(
    tmp_path: Path, h1_upstream: UpstreamServer
) -> None:
    """SIGHUP is a reload inside the running workers (unlike nginx, which starts new
    ones): the same processes keep serving, and no signal reaches them by default."""
    port, config = two_worker_config(h1_upstream)
    with (
        run_gateway(config, tmp_path, port=port, args=("--workers", "2")) as gw,
        fresh_connection_client() as client,
    ):
        workers = wait_for_workers(gw.pid, 2)
        gw.signal(signal.SIGHUP)
        time.sleep(0.3)  # give a (wrongly) dying worker time to be reaped and replaced
        assert gw.process.poll() is None
        assert child_pids(gw.pid) == workers
        assert client.get(f"{gw.url}/echo/after-hup").status_code == 200
