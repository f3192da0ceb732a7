"""The metrics of the gateway as a whole, kept by the supervising parent: what it is
(build info), its reloads and its workers. The admin listener serves them with the sum
of the workers' own (metrics/aggregate.py)."""

from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, Counter, Gauge

from proxy.buildinfo import build_kind, version

GATEWAY_REGISTRY = CollectorRegistry(auto_describe=True)


BUILD_INFO = Gauge(
    "gatehouse_build_info",
    "Always 1; the labels say which Gatehouse and Python run, and the build: compiled "
    "(mypyc), pure (GATEHOUSE_PURE_PYTHON=1, or installed without a C compiler) or partial",
    ["version", "python", "build"],
    registry=GATEWAY_REGISTRY,
)
BUILD_INFO.labels(version(), platform.python_version(), build_kind()).set(1)

CONFIG_RELOADS = Counter(
    "gatehouse_config_reloads",
    "Config reloads by result: success (every worker switched) or failure (the old config "
    "kept serving: invalid file, a listener that cannot bind, a middleware that cannot start)",
    ["result"],
    registry=GATEWAY_REGISTRY,
)
for _result in ("success", "failure"):
    CONFIG_RELOADS.labels(_result)
CONFIG_LAST_RELOAD_SUCCESS = Gauge(
    "gatehouse_config_last_reload_success_timestamp_seconds",
    "When the running config was loaded (start-up or the last successful reload), Unix time",
    registry=GATEWAY_REGISTRY,
)
WORKER_RESTARTS = Counter(
    "gatehouse_worker_restarts",
    "Workers that ended unexpectedly and were started again",
    registry=GATEWAY_REGISTRY,
)
WORKERS = Gauge(
    "gatehouse_workers",
    "Worker processes running now",
    registry=GATEWAY_REGISTRY,
)
ADMIN_REFUSALS = Counter(
    "gatehouse_admin_refusals",
    "Requests the admin listener refused, by reason: host (a Host that is not an IP "
    "literal, localhost or in admin.hosts), unauthorized (admin.token missing or wrong), "
    "cross_site (a state-changing request that a browser page could have sent)",
    ["reason"],
    registry=GATEWAY_REGISTRY,
)
for _reason in ("host", "unauthorized", "cross_site"):
    ADMIN_REFUSALS.labels(_reason)
