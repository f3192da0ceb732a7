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

The upstreams are those of `server.runtime`, read at each scrape: a reload that swaps
the Runtime is seen at once.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from metrics.definitions import REGISTRY, set_enabled, set_route_check
from proxy.frontend.h2.protocol import Http2Protocol

if TYPE_CHECKING:
    from proxy.process.server import Server

PROTOCOLS = ("http1", "h2", "websocket")


def attach_server(server: Server) -> None:
    """Point this process's scrape-time gauges at `server` (the latest attached wins;
    one per worker), register them on `REGISTRY` the first time, and apply the config's
    `metrics.enabled` switch (`set_enabled`; a reload that changes it calls that)."""
    _COLLECTOR.attach(server)
    set_enabled(server.runtime.config.metrics.enabled)


class LiveCollector(Collector):
    """The scrape-time gauges of one server (see the module docstring)."""

    def __init__(self) -> None:
        self._server: weakref.ref[Server] | None = None
        self._registered = False

    def __repr__(self) -> str:
        server = self.server
        return f"<LiveCollector {server!r}>"

    @property
    def server(self) -> Server | None:
        """The attached server, while it exists."""
        return self._server() if self._server is not None else None

    def attach(self, server: Server) -> None:
        """Read `server` from now on (and register on REGISTRY, once per process)."""
        self._server = weakref.ref(server)
        set_route_check(self._has_route)
        if not self._registered:
            REGISTRY.register(self)
            self._registered = True

    def _has_route(self, route: str) -> bool:
        server = self.server
        return server is not None and route in server.runtime.routes

    def describe(self) -> Iterator[Metric]:
        return iter(_families())

    def collect(self) -> Iterator[Metric]:
        families = _families()
        server = self.server
        if server is not None:
            _add_connections(server, families[0])
            _add_upstreams(server, *families[1:])
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


def _add_connections(server: Server, family: GaugeMetricFamily) -> None:
    counts: dict[tuple[str, str], int] = {}
    listeners = server.config.listeners
    by_port = {listener.port: listener.name for listener in listeners if listener.port}
    by_address: dict[tuple[str, int], str] = {}
    if len(server.addresses) == len(listeners):  # in listener order (port 0: as bound)
        for listener, address in zip(listeners, server.addresses, strict=True):
            by_address[(str(address[0]), int(address[1]))] = listener.name
            by_port.setdefault(int(address[1]), listener.name)
    for listener in listeners:
        for protocol in PROTOCOLS:
            if protocol != "h2" or listener.http2:
                counts[(listener.name, protocol)] = 0  # present before its first connection
    for conn in list(server.connections):
        protocol = "h2" if isinstance(conn.front_end, Http2Protocol) else "http1"
        key = (conn.listener.name, protocol)
        counts[key] = counts.get(key, 0) + 1
    for tunnel in list(server.tunnels):
        transport = getattr(tunnel.client, "transport", None)
        if transport is None:
            continue  # HTTP/2 (RFC 8441): a stream of a connection counted as h2
        # The client's socket left `connections` with the hand-over; its local address
        # tells which listener accepted it.
        sockname = transport.get_extra_info("sockname")
        if not isinstance(sockname, tuple):
            continue
        address = (str(sockname[0]), int(sockname[1]))
        name = by_address.get(address) or by_port.get(address[1], "")
        key = (name, "websocket")
        counts[key] = counts.get(key, 0) + 1
    for (listener_name, protocol), count in counts.items():
        family.add_metric([listener_name, protocol], count)


def _add_upstreams(
    server: Server,
    open_family: GaugeMetricFamily,
    idle_family: GaugeMetricFamily,
    waiting_family: GaugeMetricFamily,
    healthy_family: GaugeMetricFamily,
) -> None:
    for name, upstream in list(server.runtime.upstreams.items()):
        for pool in upstream.all_pools:
            labels = [name, pool.label]
            occupancy = pool.occupancy()
            open_family.add_metric(labels, occupancy.open)
            idle_family.add_metric(labels, occupancy.idle)
            waiting_family.add_metric(labels, occupancy.waiting)
        for endpoint, healthy in upstream.endpoint_health():
            healthy_family.add_metric([name, endpoint], 1.0 if healthy else 0.0)


_COLLECTOR = LiveCollector()
