"""examples/grafana/gatehouse.json and examples/prometheus/alerts.yml against a real
Prometheus scraping a real gateway process.

Prometheus (Debian's package, tests/support/prometheus_server.py) scrapes the gateway's
admin listener every second and evaluates the alert rules every second, while the test
makes each thing they watch happen for real: traffic over HTTP/1.1 and HTTP/2 (TLS, ALPN)
to a real upstream with 5xx among the answers, an endpoint that refuses connections
(retried, then ejected) and one that fails its health checks, retries a budget refuses,
a worker killed three times, a reload refused, and a TLS listener whose certificate
expires in a day. Then every dashboard query (with Grafana's variables replaced by what
Grafana would send: `$__rate_interval` a duration, `$route` and `$upstream` their "All"
value) must return a series with a number, every template variable must have values, and
every alert must be pending or firing: its condition, threshold included, holds. Last,
the gateway is killed and GatehouseDown must follow.

Every wait polls Prometheus's API against one deadline; nothing sleeps a fixed time.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.admin_client import admin_reload, metric, wait_ready
from tests.support.gateway_process import (
    REPO_ROOT,
    child_pids,
    free_port,
    kill_process_group,
    run_gateway,
    wait_until,
)
from tests.support.prometheus_server import Prometheus, promtool, run_prometheus
from tests.support.tls import TlsFiles, make_tls_files
from tests.support.upstreams import UpstreamServer, serve_in_thread

pytestmark = [pytest.mark.socket, pytest.mark.timeout(240)]

DASHBOARD = REPO_ROOT / "examples" / "grafana" / "gatehouse.json"
ALERTS = REPO_ROOT / "examples" / "prometheus" / "alerts.yml"
# What Grafana puts in place of its variables. `$__rate_interval` is at least four scrape
# intervals; 5m keeps the whole test's samples in every window.
VARIABLES = {"__rate_interval": "5m", "__interval": "1m", "route": ".*", "upstream": ".*"}
WAIT_S = 90.0  # every wait of the test together, from the gateway's start
WORKER_KILLS = 3  # GatehouseWorkerRestartLoop: at least 3 restarts in 15 minutes
RESTART_TIMEOUT_S = 20.0  # a bound, not an expectation (a restart takes about a second)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title and target refId, expression) for every panel target."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queries.append((f"{panel['title']} [{target['refId']}]", target["expr"]))
    return queries


def template_queries() -> list[tuple[str, str, str]]:
    """(variable, label, metric) of every `label_values(metric, label)` variable."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variable["query"]["query"])
        assert match is not None, f"${variable['name']}: not a label_values() query"
        found.append((variable["name"], match[2], match[1]))
    return found


def alert_rules() -> dict[str, str]:
    """Alert name -> its expression."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}


def substitute(expr: str) -> str:
    """`expr` with Grafana's variables ($name, ${name}) replaced as Grafana would."""

    def value(match: re.Match[str]) -> str:
        name = match[1] or match[2]
        assert name in VARIABLES, f"no value for the dashboard variable ${name}"
        return VARIABLES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def has_number(series: list[dict[str, Any]]) -> bool:
    """Whether any series' value is a number (not NaN: a quantile of nothing)."""
    return any(math.isfinite(float(s["value"][1])) for s in series)


def config(port: int, tls_port: int, admin: int, tls: TlsFiles, up: str, down: int) -> str:
    refused = f"http://127.0.0.1:{down}"
    return f"""
listeners:
  - {{bind: 127.0.0.1:{port}, name: public}}
  - bind: 127.0.0.1:{tls_port}
    name: secure
    tls: {{cert: {tls.cert}, key: {tls.key}}}
admin: {{bind: 127.0.0.1:{admin}}}
workers: 1
reload: {{watch: false}}
shutdown: {{grace_period: 1s}}
upstreams:
  app:  # the second endpoint refuses: retried elsewhere, and ejected at once
    endpoints: [{up}, {refused}]
    outlier: {{consecutive_failures: 1, base_ejection: 10m, max_ejection: 10m}}
    retries: {{attempts: 2}}
  checked:  # out of rotation by its health checks
    endpoints: [{refused}]
    health_check: {{type: tcp, interval: 1s, timeout: 500ms, unhealthy_threshold: 1}}
  strict:  # wants to retry every 503, and its budget never lets it
    endpoints: [{up}]
    retries: {{attempts: 2, on: [503], budget: {{percent: 0, min: 0}}}}
routes:
  - {{name: api, match: {{path_prefix: /api/}}, upstream: app, rewrite: {{strip_prefix: /api}}}}
  - name: strict
    match: {{path_prefix: /strict/}}
    upstream: strict
    rewrite: {{strip_prefix: /strict}}
"""


def restarted(admin: int, times: int) -> bool:
    return metric(admin, "gatehouse_worker_restarts_total") == times


def kill_workers(gateway_pid: int, admin: int, times: int) -> None:
    """SIGKILL the (one) worker `times` times, each once its successor serves."""
    for killed in range(1, times + 1):
        (worker,) = child_pids(gateway_pid)
        os.kill(worker, signal.SIGKILL)
        wait_until(partial(restarted, admin, killed), RESTART_TIMEOUT_S, f"worker restart {killed}")
        wait_ready(admin, workers=1)


def send_traffic(port: int, tls_port: int, tls: TlsFiles, times: int) -> int:
    """HTTP/1.1 and HTTP/2 requests, with bodies both ways, some 5xx and a 404 of the
    gateway's own, each kind `times` times; how many requests that was."""
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        answers = [client.get("/api/bytes/100") for _ in range(4 * times)]
        answers += [client.get("/api/status/503") for _ in range(2 * times)]
        answers += [client.post("/api/sink", content=b"p" * 4096) for _ in range(times)]
        answers += [client.get("/strict/status/503") for _ in range(times)]
        answers += [client.get("/nowhere") for _ in range(times)]
    statuses = [a.status_code for a in answers]
    assert statuses.count(503) == 3 * times
    assert statuses.count(404) == times
    context = tls.client_context(["h2"])
    with httpx.Client(
        base_url=f"https://127.0.0.1:{tls_port}", verify=context, http2=True, timeout=10
    ) as h2:
        answers = [h2.get("/api/bytes/1000") for _ in range(2 * times)]
        answers += [h2.get("/api/status/503") for _ in range(times)]
    assert {a.http_version for a in answers} == {"HTTP/2"}
    assert [a.status_code for a in answers] == [200] * 2 * times + [503] * times
    return len(statuses) + len(answers)


def refuse_a_reload(config_path: Path, admin: int) -> None:
    """Make the running gateway reload a broken file (refused: 422), then put it back."""
    good = config_path.read_text()
    config_path.write_text(good + "\nroutes: [\n")
    try:
        assert admin_reload(admin).status_code == 422
    finally:
        config_path.write_text(good)


def missing(prometheus: Prometheus, queries: dict[str, str]) -> dict[str, str]:
    """Of `queries` (name -> PromQL), those with no series holding a number now, with
    what they returned."""
    empty = {}
    for name, expr in queries.items():
        series = prometheus.query(expr)
        if not has_number(series):
            empty[name] = f"{expr}\n  -> {series}"
    return empty


def test_the_alert_rules_pass_promtool() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_the_dashboard_uses_only_variables_it_defines_or_grafana_has() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    defined = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert defined == {"datasource", "route", "upstream"}
    for _, expr in dashboard_queries():
        for name in re.findall(r"\$\{?(\w+)", expr):
            assert name in defined or name.startswith("__"), f"${name} in {expr}"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])


def test_every_dashboard_query_and_alert_holds_on_a_real_gateway(tmp_path: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    tls = make_tls_files(tmp_path / "tls", ("gateway.example",))  # expires in a day
    port, tls_port, admin, down = free_port(), free_port(), free_port(), free_port()
    panels = {name: substitute(expr) for name, expr in dashboard_queries()}
    alerts = alert_rules()
    with (
        serve_in_thread(UpstreamServer()) as upstream,
        run_gateway(
            config(port, tls_port, admin, tls, upstream.url, down), tmp_path, port=port
        ) as gateway,
    ):
        wait_ready(admin, workers=1)
        with run_prometheus(tmp_path / "prometheus", [f"127.0.0.1:{admin}"], [ALERTS]) as prom:
            # A first scrape, so that every counter is seen before it moves.
            prom.wait_for(
                "the first scrape",
                lambda: prom.query('gatehouse_worker_restarts_total{job="gatehouse"} == 0') != [],
                deadline,
            )
            assert prom.query('up{job="gatehouse"}')[0]["value"][1] == "1"

            kill_workers(gateway.pid, admin, WORKER_KILLS)
            # Traffic in two rounds: Prometheus takes a counter's first sample as its
            # start, so a series that a first round made must be scraped before the
            # second round moves it (else every rate would be 0, and each ratio NaN).
            first = send_traffic(port, tls_port, tls, 1)
            prom.wait_for(
                "the first round's series",
                lambda: prom.query(f"sum(gatehouse_requests_total) >= {first}") != [],
                deadline,
            )
            send_traffic(port, tls_port, tls, 5)
            refuse_a_reload(gateway.config_path, admin)

            # What the traffic must have counted, by the new labels.
            checks = {
                "http1 requests": 'gatehouse_requests_total{route="api",protocol="http1"}',
                "h2 requests": 'gatehouse_requests_total{route="api",protocol="h2"}',
                "5xx timed apart": 'gatehouse_request_duration_seconds_count{code_class="5xx"}',
                "bytes in": 'gatehouse_request_body_bytes_total{route="api"} >= 4096',
                "bytes out": 'gatehouse_response_body_bytes_total{route="api",protocol="h2"}'
                " >= 5000",
            }
            # GatehouseDown's condition holds only once the gateway is gone: last.
            up_alerts = {name: expr for name, expr in alerts.items() if name != "GatehouseDown"}
            queries = {**checks, **panels, **{f"alert {n}": e for n, e in up_alerts.items()}}
            last: dict[str, str] = {}

            def all_there() -> bool:
                last.clear()
                last.update(missing(prom, queries))
                return not last

            try:
                prom.wait_for("every query to return a series", all_there, deadline)
            except AssertionError:
                pytest.fail("no series with a number:\n" + "\n".join(last.values()))

            for variable, label, source in template_queries():
                assert prom.label_values(label, source), f"${variable} would have no values"

            # The rules themselves, as Prometheus evaluates them: each alert but
            # GatehouseDown is pending (its `for` not over yet) or firing.
            prom.wait_for(
                "the alerts to be active", lambda: set(up_alerts) <= set(prom.alerts()), deadline
            )
            assert all(health == "ok" for health in prom.rule_health().values())

            kill_process_group(gateway.process)
            prom.wait_for(
                "GatehouseDown", lambda: "GatehouseDown" in prom.alerts(), deadline + 30.0
            )
            assert prom.query(alerts["GatehouseDown"]) != []
