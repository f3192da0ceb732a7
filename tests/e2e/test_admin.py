"""The admin listener of a real gateway process with two workers: metrics summed over the
workers, what survives a worker's death, probes, and the parent's lifeline to workers.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.admin_client import (
    Samples,
    admin_config,
    admin_reload,
    scrape,
    value,
    wait_ready,
)
from tests.support.gateway_process import child_pids, free_port, run_gateway, wait_until
from tests.support.upstreams import UpstreamServer, serve_in_thread

pytestmark = pytest.mark.socket

CLIENT_TIMEOUT_S = 10.0


@pytest.fixture
def h1_upstream() -> Iterator[UpstreamServer]:
    with serve_in_thread(UpstreamServer()) as server:
        yield server


API_ROUTE = """
  - name: api
    match: {path_prefix: /api/}
    upstream: app
    rewrite: {strip_prefix: /api, add_prefix: /echo}
"""


def config_text(port: int, admin: int, upstream_url: str) -> str:
    return admin_config(port, admin, upstream_url, API_ROUTE)


def requests_total(samples: Samples, route: str) -> float:
    return sum(
        count
        for (name, labels), count in samples.items()
        if name == "gatehouse_requests_total" and ("route", route) in labels
    )


def send_fresh(url: str, count: int) -> None:
    """`count` requests, each on a new connection: the kernel spreads them over workers."""
    limits = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(timeout=CLIENT_TIMEOUT_S, limits=limits) as client:
        for i in range(count):
            assert client.get(f"{url}/api/{i}").status_code == 200


def test_a_scrape_after_n_requests_over_two_workers_reports_n(
    tmp_path: Path, h1_upstream: UpstreamServer
) -> None:
    port, admin = free_port(), free_port()
    with run_gateway(config_text(port, admin, h1_upstream.url), tmp_path, port=port) as gw:
        wait_ready(admin)
        send_fresh(gw.url, 60)
        samples = scrape(admin)
        assert requests_total(samples, "api") == 60
        assert (
            value(samples, "gatehouse_requests_total", route="api", method="GET", code="200") == 60
        )
        assert value(samples, "gatehouse_request_duration_seconds_count", route="api") == 60
        assert value(samples, "gatehouse_workers") == 2
        assert value(samples, "gatehouse_config_reloads_total", result="success") == 0
        assert value(samples, "gatehouse_config_last_reload_success_timestamp_seconds") > 1e9
        build = [key for key in samples if key[0] == "gatehouse_build_info"]
        assert len(build) == 1  # the parent's alone, not one per process
        send_fresh(gw.url, 7)
        assert requests_total(scrape(admin), "api") == 67


def test_openmetrics_is_served_when_the_scraper_asks_for_it(
    tmp_path: Path, h1_upstream: UpstreamServer
) -> None:
    port, admin = free_port(), free_port()
    with run_gateway(config_text(port, admin, h1_upstream.url), tmp_path, port=port) as gw:
        wait_ready(admin)
        send_fresh(gw.url, 3)
        accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        response = httpx.get(
            f"http://127.0.0.1:{admin}/metrics", headers={"accept": accept}, timeout=5
        )
        assert response.headers["content-type"].startswith("application/openmetrics-text")
        assert response.text.endswith("# EOF\n")
        assert "gatehouse_requests_total{" in response.text
        plain = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=5)
        assert plain.headers["content-type"].startswith("text/plain")
        assert "# EOF" not in plain.text


def test_a_killed_worker_is_restarted_counted_and_its_counts_are_kept(
    tmp_path: Path, h1_upstream: UpstreamServer
) -> None:
    port, admin = free_port(), free_port()
    with run_gateway(config_text(port, admin, h1_upstream.url), tmp_path, port=port) as gw:
        wait_ready(admin)
        send_fresh(gw.url, 40)
        assert requests_total(scrape(admin), "api") == 40  # every worker's count is seen
        victim = min(child_pids(gw.pid))
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(child_pids(gw.pid) - {victim}) == 2, 10.0, "a replacement worker")
        wait_ready(admin)
        samples = scrape(admin)
        assert value(samples, "gatehouse_worker_restarts_total") == 1
        # What the dead worker had counted (as of the last scrape) is not lost: the total
        # does not go backwards, which Prometheus would read as a counter reset.
        assert requests_total(samples, "api") == 40
        send_fresh(gw.url, 10)
        assert requests_total(scrape(admin), "api") == 50
        assert f"worker {victim} died" in gw.stderr()


def test_probes_and_unknown_paths(tmp_path: Path, h1_upstream: UpstreamServer) -> None:
    port, admin = free_port(), free_port()
    with run_gateway(config_text(port, admin, h1_upstream.url), tmp_path, port=port):
        wait_ready(admin)
        with httpx.Client(base_url=f"http://127.0.0.1:{admin}", timeout=5) as client:
            assert client.get("/healthz").text == "ok\n"
            assert client.get("/readyz").status_code == 200
            missing = client.get("/nope")
            assert missing.status_code == 404
            assert "/metrics" in missing.json()["paths"]
            wrong = client.post("/metrics")
            assert wrong.status_code == 405
            assert wrong.headers["allow"] == "GET"
            assert client.get("/reload").status_code == 405


def test_workers_drain_and_exit_when_the_parent_is_killed(
    tmp_path: Path, h1_upstream: UpstreamServer
) -> None:
    port, admin = free_port(), free_port()
    with run_gateway(config_text(port, admin, h1_upstream.url), tmp_path, port=port) as gw:
        wait_ready(admin)
        workers = child_pids(gw.pid)
        os.kill(gw.pid, signal.SIGKILL)

        def all_gone() -> bool:
            return not any(_alive(pid) for pid in workers)

        wait_until(all_gone, 10.0, "the orphaned workers to exit")
        assert "the supervising parent went away: draining" in gw.stderr()


def test_an_admin_address_in_use_stops_the_start_with_exit_3(
    tmp_path: Path, h1_upstream: UpstreamServer
) -> None:
    port = free_port()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        admin = squatter.getsockname()[1]
        with run_gateway(
            config_text(port, admin, h1_upstream.url), tmp_path, port=port, wait=False
        ) as gw:
            assert gw.wait(10) == 3
            assert "admin listener" in gw.stderr()
            assert "in use" in gw.stderr()


def _alive(pid: int) -> bool:
    """Not a zombie (an orphan's zombie is reaped by init, soon)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_series_of_a_route_removed_by_a_reload_disappear(
    tmp_path: Path, h1_upstream: UpstreamServer
) -> None:
    port, admin = free_port(), free_port()
    text = config_text(port, admin, h1_upstream.url)
    with run_gateway(text, tmp_path, port=port) as gw:
        wait_ready(admin)
        send_fresh(gw.url, 10)
        before = scrape(admin)
        assert requests_total(before, "api") == 10
        assert value(before, "gatehouse_request_duration_seconds_count", route="api") == 10
        gw.config_path.write_text(text.replace("name: api", "name: renamed"))
        reloaded = admin_reload(admin)
        assert reloaded.status_code == 200
        send_fresh(gw.url, 4)
        after = scrape(admin)
        assert requests_total(after, "renamed") == 4
        assert not [key for key in after if ("route", "api") in key[1]]
        assert value(after, "gatehouse_config_reloads_total", result="success") == 1
