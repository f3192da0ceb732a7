"""The circuit breaker (`upstreams.X.circuit_breaker`): limits for a whole upstream,
past which a request is refused at once with 503 `upstream_overloaded` instead of
queueing without bound (docs/errors.md).

- `max_requests`: requests in flight on the upstream (entered the forwarder, response
  head not yet come; the response body streaming afterwards is not counted).
- `max_pending`: requests waiting in the upstream's pools for a connection (HTTP/1.1) or
  a stream slot (HTTP/2). A request that would wait is refused when that many wait.
- `max_connections`: connections open or opening across the upstream's pools. A request
  that would need a new connection (its endpoint has nothing free but may open more) is
  refused when the upstream has that many.

Only `max_requests` costs the data path anything (one comparison); the other two are
computed from the pools when configured, and only for a request that cannot be served
by a free connection at once.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from metrics.traffic import count_overloaded
from proxy.config.upstream_model import CircuitBreakerConfig
from proxy.core.errors import UpstreamOverloaded
from proxy.upstream.balancer import UpstreamLoad
from proxy.upstream.h2.pool import H2Pool
from proxy.upstream.pool import UpstreamPool

if TYPE_CHECKING:
    from proxy.upstream.balancer import EndpointPool, Upstream

MAX_REQUESTS = "max_requests"
MAX_PENDING = "max_pending"
MAX_CONNECTIONS = "max_connections"


class CircuitBreaker:
    """One upstream's limits, checked by its forwarders."""

    __slots__ = ("_load", "_upstream", "max_connections", "max_pending", "max_requests", "name")

    def __init__(
        self, upstream: Upstream, config: CircuitBreakerConfig, load: UpstreamLoad
    ) -> None:
        self._upstream = upstream
        self._load = load
        self.name = upstream.name
        # No limit: a bound no count reaches, so the check stays one comparison.
        self.max_requests = config.max_requests or sys.maxsize
        self.max_pending = config.max_pending
        self.max_connections = config.max_connections

    def __repr__(self) -> str:
        return (
            f"<CircuitBreaker {self.name} requests={self._load.active}/{self.max_requests} "
            f"pending<{self.max_pending} connections<{self.max_connections}>"
        )

    def admit(self) -> None:
        """A new request may enter (call before counting it in `load.active`).

        Raises:
            UpstreamOverloaded: `max_requests` requests are in flight.
        """
        if self._load.active >= self.max_requests:
            self._refuse(MAX_REQUESTS)

    def admit_try(self, pool: EndpointPool) -> None:
        """A try may go to `pool`: it has a free connection, or may open one within
        `max_connections`, or may wait within `max_pending`.

        Raises:
            UpstreamOverloaded: it would need a connection past `max_connections`, or wait
                past `max_pending`.
        """
        if self.max_pending is None and self.max_connections is None:
            return
        upstream = self._upstream
        if isinstance(pool, UpstreamPool):
            occupancy = pool.occupancy()
            if occupancy.idle:
                return
            can_open = pool.size < pool.limits.max_connections
        else:
            assert isinstance(pool, H2Pool)
            if any(conn.available for conn in pool.connections):
                return
            can_open = pool.size < pool.limits.max_connections and not pool.occupancy().waiting
        if can_open:
            if self.max_connections is not None:
                opened = sum(p.size for p in upstream.pools) + sum(
                    p.size for p in upstream.h2_pools
                )
                if opened >= self.max_connections:
                    self._refuse(MAX_CONNECTIONS)
            return
        if self.max_pending is not None:
            waiting = sum(p.occupancy().waiting for p in upstream.all_pools)
            if waiting >= self.max_pending:
                self._refuse(MAX_PENDING)

    def _refuse(self, limit: str) -> None:
        count_overloaded(self.name, limit)
        raise UpstreamOverloaded(limit, f"upstream {self.name}: {limit} reached")
