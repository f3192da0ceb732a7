"""A gateway process with an admin listener, seen from synchronous tests: its config,
its readiness, and its /metrics read back as samples."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.gateway_process import wait_until

CLIENT_TIMEOUT_S = 10.0

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def admin_config(port: int, admin: int, upstream_url: str, routes: str, extra: str = "") -> str:
    """Two workers on 127.0.0.1:`port`, the admin listener on `admin`, one upstream `app`
    at `upstream_url`, the `routes` given (YAML list items), no file watch, and a 2 s
    grace period; `extra` adds top-level sections."""
    return f"""
listeners:
  - bind: 127.0.0.1:{port}
    name: public
admin:
  bind: 127.0.0.1:{admin}
workers: 2
reload: {{watch: false}}
shutdown: {{grace_period: 2s}}
upstreams:
  app:
    endpoints: [{upstream_url}]
routes:
{routes}
{extra}
"""


def admin_get(admin: int, path: str, **kwargs: object) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{admin}{path}", timeout=CLIENT_TIMEOUT_S, **kwargs)  # type: ignore[arg-type]


# What a client that is not a browser sends with a POST (metrics/admin_access.py).
WRITE_HEADERS = {"X-Gatehouse-Admin": "1"}


def admin_reload(admin: int, token: str | None = None) -> httpx.Response:
    """POST /reload as `gatehouse reload` does (with a bearer token when given)."""
    headers = dict(WRITE_HEADERS)
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.post(f"http://127.0.0.1:{admin}/reload", headers=headers, timeout=60.0)


def wait_ready(admin: int, workers: int = 2) -> None:
    """Until /readyz says every worker serves."""

    def ready() -> bool:
        try:
            answer = admin_get(admin, "/readyz")
        except httpx.TransportError:
            return False
        return answer.status_code == 200 and f"{workers} of {workers}" in answer.text

    wait_until(ready, 10.0, "the workers to be ready")


def scrape(admin: int) -> Samples:
    """Every sample of /metrics, by name and labels."""
    response = admin_get(admin, "/metrics")
    assert response.status_code == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels` (0 when there
    is none)."""
    wanted = frozenset(labels.items())
    return sum(
        sample
        for (sample_name, sample_labels), sample in samples.items()
        if sample_name == name and wanted <= sample_labels
    )


def metric(admin: int, name: str, **labels: str) -> float:
    """`value` of a fresh scrape."""
    return value(scrape(admin), name, **labels)
