"""examples/compose holds together: the gateway's admin port leaves loopback there, so its
routes.yaml requires the token compose passes, allows the Host Prometheus scrapes by, and
Prometheus sends the same token from the compose secret."""

from __future__ import annotations

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
