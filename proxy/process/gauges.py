"""What a worker's server has open now, as the scrape-time gauges read it
(metrics/live.py): the metrics package knows only the `LiveSource` shape, and this is
the server's side of it. `endpoint_states` is the rest of what the admin listener's
/upstreams shows (what the balancer knows of each endpoint beyond the gauges), sent to
the parent with each metrics snapshot (proxy/process/worker.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from metrics.live import PROTOCOLS, PoolOccupancy
from proxy.frontend.h2.protocol import Http2Protocol

if TYPE_CHECKING:
    from proxy.process.server import Server


class ServerGauges:
    """A `metrics.live.LiveSource` over one Server (held weakly by the collector)."""

    __slots__ = ("__weakref__", "_server")

    def __init__(self, server: Server) -> None:
        self._server = server

    def __repr__(self) -> str:
        return f"<ServerGauges {self._server!r}>"

    def has_route(self, route: str) -> bool:
        """Whether the running config has `route`."""
        return route in self._server.runtime.routes

    def connection_counts(self) -> dict[tuple[str, str], int]:
        """Open client connections by (listener name, protocol): `http1`, `h2`, and
        `websocket` for HTTP/1.1 connections that became tunnels."""
        server = self._server
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
                    counts[(listener.name, protocol)] = 0  # present before its first one
        for conn in list(server.connections):
            protocol = "h2" if isinstance(conn.front_end, Http2Protocol) else "http1"
            key = (conn.listener.name, protocol)
            counts[key] = counts.get(key, 0) + 1
        for tunnel in list(server.tunnels):
            transport = getattr(tunnel.client, "transport", None)
            if transport is None:
                continue  # HTTP/2 (RFC 8441): a stream of a connection counted as h2
            # The client's socket left `connections` with the hand-over; its local
            # address tells which listener accepted it.
            sockname = transport.get_extra_info("sockname")
            if not isinstance(sockname, tuple):
                continue
            address = (str(sockname[0]), int(sockname[1]))
            name = by_address.get(address) or by_port.get(address[1], "")
            key = (name, "websocket")
            counts[key] = counts.get(key, 0) + 1
        return counts

    def pools(self) -> Iterator[PoolOccupancy]:
        """Each upstream pool of the running config, with what it holds now."""
        for name, upstream in list(self._server.runtime.upstreams.items()):
            for pool in upstream.all_pools:
                occupancy = pool.occupancy()
                yield PoolOccupancy(
                    name, pool.label, occupancy.open, occupancy.idle, occupancy.waiting
                )

    def endpoint_health(self) -> Iterator[tuple[str, str, bool]]:
        """(upstream, endpoint, healthy) for every endpoint the balancers know."""
        for name, upstream in list(self._server.runtime.upstreams.items()):
            for endpoint, healthy in upstream.endpoint_health():
                yield name, endpoint, healthy

    def endpoint_states(self) -> list[dict[str, Any]]:
        """What the balancers know of each endpoint beyond the gauges, as JSON-able data:
        the active check's verdict (`healthy`), the outlier ejection's end as Unix time
        (`ejected_until`, None when not ejected), the requests in flight, and whether the
        upstream is in panic mode. Read when the parent asks, never kept up to date."""
        states: list[dict[str, Any]] = []
        for name, upstream in list(self._server.runtime.upstreams.items()):
            endpoints = list(upstream.endpoints)
            if not endpoints:
                continue
            now = upstream.now()  # the loop's clock, which ejections are timed on
            wall = time.time()
            for endpoint in endpoints:
                ejected = endpoint.ejected_until > now
                states.append(
                    {
                        "upstream": name,
                        "endpoint": endpoint.label,
                        "healthy": endpoint.healthy,
                        "ejected_until": (
                            wall + (endpoint.ejected_until - now) if ejected else None
                        ),
                        "in_flight": endpoint.in_flight,
                        "panic": upstream.panic,
                    }
                )
        return states
