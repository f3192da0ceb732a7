"""examples/compose holds together: the gateway's admin port leaves loopback there, so its
routes.yaml requires the token compose passes, allows the Host Prometheus scrapes by, and
Prometheus sends the same token from the compose secret."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from proxy.config.document import ConfigError
from proxy.config.load import load_config

COMPOSE = Path(__file__).resolve().parent.parent / "examples" / "compose"
ENV = {"GATEHOUSE_ADMIN_TOKEN": "f" * 64, "GATEHOUSE_WORKERS": "2"}


def test_the_gateway_requires_the_token_and_answers_prometheus_by_name() -> None:
    config = load_config(str(COMPOSE / "routes.yaml"), env=ENV)
    assert config.admin is not None
    assert (config.admin.host, config.admin.token) == ("0.0.0.0", ENV["GATEHOUSE_ADMIN_TOKEN"])
    prometheus = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    (target,) = job["static_configs"][0]["targets"]
    assert target == f"gateway:{config.admin.port}"
    assert "gateway" in config.admin.hosts


def test_without_the_token_the_gateway_does_not_start() -> None:
    env = {"GATEHOUSE_WORKERS": "2"}
    with pytest.raises(ConfigError, match=r"admin\.token: environment variable"):
        load_config(str(COMPOSE / "routes.yaml"), env=env)


def test_prometheus_reads_the_token_compose_gives_the_gateway() -> None:
    compose = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    prometheus = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    authorization = prometheus["scrape_configs"][0]["authorization"]
    assert authorization["type"] == "Bearer"
    secret = Path(authorization["credentials_file"])
    assert secret.parent == Path("/run/secrets")
    assert secret.name in compose["services"]["prometheus"]["secrets"]
    assert compose["secrets"][secret.name] == {"environment": "GATEHOUSE_ADMIN_TOKEN"}
    assert "GATEHOUSE_ADMIN_TOKEN" in compose["services"]["gateway"]["environment"]


def mounts(service: str) -> dict[str, Path]:
    """A compose service's bind mounts: the path inside the container -> the file or
    directory on the host (relative paths are the compose file's)."""
    compose = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    found = {}
    for volume in compose["services"][service].get("volumes", []):
        source, target = volume.split(":")[:2]
        found[target] = (COMPOSE / source).resolve()
    return found


@pytest.mark.parametrize("service", ["gateway", "prometheus", "grafana"])
def test_every_file_compose_mounts_exists(service: str) -> None:
    for target, source in mounts(service).items():
        assert source.is_file(), f"{service}: {target} is mounted from {source}, missing"


def test_prometheus_loads_the_alert_rules_compose_mounts() -> None:
    prometheus = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    mounted = mounts("prometheus")
    assert prometheus["rule_files"] == ["/etc/prometheus/alerts.yml"]
    for rule_file in prometheus["rule_files"]:
        assert mounted[rule_file] == COMPOSE.parent / "prometheus" / "alerts.yml"


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard() -> None:
    mounted = mounts("grafana")
    compose = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    provisioning = Path("/etc/grafana/provisioning")
    (datasources,) = [mounted[t] for t in mounted if Path(t).parent == provisioning / "datasources"]
    (providers,) = [mounted[t] for t in mounted if Path(t).parent == provisioning / "dashboards"]

    (source,) = yaml.safe_load(datasources.read_text())["datasources"]
    assert source["type"] == "prometheus"
    published = compose["services"]["prometheus"]["ports"][0].rsplit(":", 1)[1]
    assert source["url"] == f"http://prometheus:{published}"  # the compose service

    (provider,) = yaml.safe_load(providers.read_text())["providers"]
    folder = Path(provider["options"]["path"])
    dashboards = {Path(t).name: mounted[t] for t in mounted if Path(t).parent == folder}
    assert dashboards == {"gatehouse.json": COMPOSE.parent / "grafana" / "gatehouse.json"}
    home = compose["services"]["grafana"]["environment"][
        "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"
    ]
    assert Path(home).parent == folder
    assert Path(home).name in dashboards

    dashboard = json.loads(dashboards["gatehouse.json"].read_text())
    (choice,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert choice["query"] == source["type"]  # the data source variable offers this one
