"""Gauges of what a worker has open now, read from the live objects when scraped.

Nothing on the data path maintains them: a collector on `REGISTRY` walks the attached
server's client connections, WebSocket tunnels and upstream pools at scrape time, so they
cost a request nothing and can never drift from the truth. Each is a count of things
this worker holds, so the parent's sum over workers is the gateway's total, except
`gatehouse_upstream_healthy` (1 or 0 per endpoint), which is merged by `min`.

- `gatehouse_open_connections{listener,protocol}`: client connections by listener name
  and protocol: `http1`, `h2`, and `websocket` for HTTP/1.1 connections that became
  WebSocket tunnels (they left the server's `connections`). WebSocket over HTTP/2 is a
  stream of an `h2` connection, not a connection of its own. A plaintext connection that
  has not sent its first bytes yet (HTTP/1.1 or the h2c preface) counts as `http1`.
- `gatehouse_upstream_open_connections{upstream,endpoint}`: pooled connections
  established (idle or busy; not those being opened, nor WebSocket ones, which leave the
  pool).
- `gatehouse_upstream_idle_connections{upstream,endpoint}`: of those, idle (HTTP/2: with
  no stream).
- `gatehouse_upstream_waiting_requests{upstream,endpoint}`: requests waiting for a
  connection (HTTP/2: a stream slot) to become free.
- `gatehouse_upstream_healthy{upstream,endpoint}`: 1 when the balancer considers the
  endpoint healthy (`Upstream.endpoint_health`), else 0.

The collector reads a `LiveSource`, a shape this module declares and the worker's server
provides (proxy/process/gauges.py), so metrics import nothing of the gateway but its
core. The upstreams are those of the running config, read at each scrape: a reload that
swaps the Runtime is seen at once.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import NamedTuple, Protocol

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from metrics.definitions import REGISTRY
from metrics.traffic import set_enabled, set_route_check

PROTOCOLS = ("http1", "h2", "websocket")


class PoolOccupancy(NamedTuple):
    """One upstream pool as a scrape sees it."""

    upstream: str
    endpoint: str
    open: int
    idle: int
    waiting: int


class LiveSource(Protocol):
    """What the gauges read from a worker's server at scrape time."""

    def has_route(self, route: str) -> bool: ...

    def connection_counts(self) -> dict[tuple[str, str], int]: ...

    def pools(self) -> Iterator[PoolOccupancy]: ...

    def endpoint_health(self) -> Iterator[tuple[str, str, bool]]: ...


def attach_source(source: LiveSource, enabled: bool) -> None:
    """Point this process's scrape-time gauges at `source` (the latest attached wins;
    one per worker; held weakly), register them on `REGISTRY` the first time, and apply
    the config's `metrics.enabled` switch (`set_enabled`; a reload that changes it calls
    that)."""
    _COLLECTOR.attach(source)
    set_enabled(enabled)


class LiveCollector(Collector):
    """The scrape-time gauges of one worker (see the module docstring)."""

    def __init__(self) -> None:
        self._source: weakref.ref[LiveSource] | None = None
        self._registered = False

    def __repr__(self) -> str:
        return f"<LiveCollector {self.source!r}>"

    @property
    def source(self) -> LiveSource | None:
        """The attached source, while it exists."""
        return self._source() if self._source is not None else None

    def attach(self, source: LiveSource) -> None:
        """Read `source` from now on (and register on REGISTRY, once per process)."""
        self._source = weakref.ref(source)
        set_route_check(self._has_route)
        if not self._registered:
            REGISTRY.register(self)
            self._registered = True

    def _has_route(self, route: str) -> bool:
        source = self.source
        return source is not None and source.has_route(route)

    def describe(self) -> Iterator[Metric]:
        return iter(_families())

    def collect(self) -> Iterator[Metric]:
        families = _families()
        source = self.source
        if source is not None:
            for (listener, protocol), count in source.connection_counts().items():
                families[0].add_metric([listener, protocol], count)
            _add_upstreams(source, *families[1:])
        return iter(families)


def _families() -> list[GaugeMetricFamily]:
    endpoint = ["upstream", "endpoint"]
    return [
        GaugeMetricFamily(
            "gatehouse_open_connections",
            "Client connections open now, by listener and protocol (http1, h2, websocket: "
            "an HTTP/1.1 connection that became a WebSocket tunnel)",
            labels=["listener", "protocol"],
        ),
        GaugeMetricFamily(
            "gatehouse_upstream_open_connections",
            "Pooled upstream connections established now (idle or busy), by endpoint",
            labels=endpoint,
        ),
        GaugeMetricFamily(
            "gatehouse_upstream_idle_connections",
            "Pooled upstream connections idle now (HTTP/2: without a stream), by endpoint",
            labels=endpoint,
        ),
        GaugeMetricFamily(
            "gatehouse_upstream_waiting_requests",
            "Requests waiting now for a pooled connection (HTTP/2: a stream slot) to "
            "become free, by endpoint",
            labels=endpoint,
        ),
        GaugeMetricFamily(
            "gatehouse_upstream_healthy",
            "1 when the endpoint is considered healthy, else 0 (merged across workers by "
            "min: healthy only if every worker sees it so)",
            labels=endpoint,
        ),
    ]


def _add_upstreams(
    source: LiveSource,
    open_family: GaugeMetricFamily,
    idle_family: GaugeMetricFamily,
    waiting_family: GaugeMetricFamily,
    healthy_family: GaugeMetricFamily,
) -> None:
    for pool in source.pools():
        labels = [pool.upstream, pool.endpoint]
        open_family.add_metric(labels, pool.open)
        idle_family.add_metric(labels, pool.idle)
        waiting_family.add_metric(labels, pool.waiting)
    for upstream, endpoint, healthy in source.endpoint_health():
        healthy_family.add_metric([upstream, endpoint], 1.0 if healthy else 0.0)


_COLLECTOR = LiveCollector()
