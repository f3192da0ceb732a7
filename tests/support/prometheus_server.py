"""A real Prometheus (Debian's `prometheus` package, installed by .ci/system-deps) for the
tests of examples/prometheus and examples/grafana: its own config, data directory and
loopback port, scraping a gateway's admin listener every second and evaluating rule
files every second; queried through its HTTP API.

The package's own service (if the machine runs one) plays no part: this is a process of
the test's, started with explicit paths and killed at the end.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support.gateway_process import free_port
from tests.support.system_process import spawn_logged, stop, system_executable, wait_until_ready

START_TIMEOUT_S = 30.0
CLIENT_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.25
# The scrape and rule evaluation interval: short, so that a test waits seconds, not minutes.
INTERVAL = "1s"


class PrometheusError(AssertionError):
    """Prometheus refused a query (a PromQL error), with its message."""


class Prometheus:
    """A running Prometheus, asked through its HTTP API (`/api/v1/...`)."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process = process
        self.port = port
        self.log = log
        self.url = f"http://127.0.0.1:{port}"

    def __repr__(self) -> str:
        state = "RUNNING" if self.process.poll() is None else "EXITED"
        return f"<Prometheus 127.0.0.1:{self.port} {state}>"

    def _get(self, path: str, params: dict[str, str] | None = None) -> Any:
        answer = httpx.get(self.url + path, params=params, timeout=CLIENT_TIMEOUT_S)
        body = answer.json()
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The series an instant query returns now (`metric` labels, `value` [time, text]).

        Raises:
            PrometheusError: the expression does not parse or cannot be evaluated.
        """
        data = self._get("/api/v1/query", {"query": expr})
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def label_values(self, label: str, match: str) -> list[str]:
        """The values `label` takes on the series `match` selects."""
        values: list[str] = self._get(f"/api/v1/label/{label}/values", {"match[]": match})
        return values

    def alerts(self) -> dict[str, set[str]]:
        """The alerts active now (pending or firing): alert name -> their states."""
        states: dict[str, set[str]] = {}
        for alert in self._get("/api/v1/alerts")["alerts"]:
            states.setdefault(alert["labels"]["alertname"], set()).add(alert["state"])
        return states

    def rule_health(self) -> dict[str, str]:
        """Each loaded rule's name -> its health (`ok`, `err`, `unknown`) and last error."""
        found = {}
        for group in self._get("/api/v1/rules")["groups"]:
            for rule in group["rules"]:
                found[rule["name"]] = f"{rule['health']} {rule.get('lastError', '')}".strip()
        return found

    def wait_for(self, what: str, done: Callable[[], bool], deadline: float) -> None:
        """Poll `done` until true, or fail at `deadline` (time.monotonic()) naming `what`.

        Raises:
            AssertionError: still false at the deadline, or Prometheus exited.
        """
        while not done():
            if self.process.poll() is not None:
                raise AssertionError(f"prometheus exited:\n{self.log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(POLL_INTERVAL_S)


@contextlib.contextmanager
def run_prometheus(
    directory: Path, targets: Sequence[str], rule_files: Sequence[Path] = ()
) -> Iterator[Prometheus]:
    """Start Prometheus scraping `targets` (host:port of admin listeners, job `gatehouse`,
    /metrics) every second with `rule_files` loaded, and wait until it is ready. It is
    killed on exit."""
    config = {
        "global": {
            "scrape_interval": INTERVAL,
            "scrape_timeout": INTERVAL,
            "evaluation_interval": INTERVAL,
        },
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [
            {
                "job_name": "gatehouse",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": list(targets)}],
            }
        ],
    }
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = directory / "prometheus.log"
    process = spawn_logged(
        [
            system_executable("prometheus"),
            f"--config.file={config_path}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        log,
        own_session=True,
    )
    prometheus = Prometheus(process, port, log)

    def ready() -> bool:
        try:
            return httpx.get(prometheus.url + "/-/ready", timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until_ready(process, ready, what="prometheus", log=log, timeout_s=START_TIMEOUT_S)
        yield prometheus
    finally:
        stop(process, graceful=False)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `promtool ARGS` to completion."""
    return subprocess.run(
        [system_executable("promtool"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
