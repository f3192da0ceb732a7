"""Endpoint choice for an upstream: smooth weighted round robin (nginx's algorithm).

Each endpoint gets one pool for the upstream's protocol: `UpstreamPool` (HTTP/1.1, over
TLS for https:// endpoints) or `H2Pool` (h2c, or h2 over TLS). The TLS context is built
here, once per upstream at config load. Smarter policies, health checks and ejection come
with the resilience work; this module is where they plug in.
"""

from __future__ import annotations

from typing import Protocol

from proxy.config_model import EndpointConfig, UpstreamConfig
from proxy.upstream.h2pool import H2Pool
from proxy.upstream.pool import PoolOccupancy, UpstreamPool
from proxy.upstream.tls import client_context, server_hostname


class EndpointPool(Protocol):
    """What every per-endpoint pool offers the runtime (sweeper, shutdown, metrics)."""

    @property
    def endpoint(self) -> EndpointConfig: ...

    @property
    def label(self) -> str: ...

    def occupancy(self) -> PoolOccupancy: ...

    def expire(self, now: float) -> None: ...

    def close(self) -> None: ...


class Upstream:
    """An upstream's endpoints, each with its own pool."""

    def __init__(self, config: UpstreamConfig, codec: str, max_head_bytes: int) -> None:
        self.name = config.name
        self.config = config
        # h2c and h2 share one pool type; the scheme of each endpoint says whether TLS.
        self.http2 = config.protocol in ("h2c", "h2")
        tls = client_context(config)
        self.pools: list[UpstreamPool] = []
        self.h2_pools: list[H2Pool] = []
        for endpoint in config.endpoints:
            context = tls if endpoint.scheme == "https" else None
            name = server_hostname(endpoint, config)
            if self.http2:
                self.h2_pools.append(
                    H2Pool(
                        endpoint,
                        config.pool,
                        config.timeouts,
                        tls=context,
                        server_hostname=name,
                        upstream=self.name,
                    )
                )
            else:
                self.pools.append(
                    UpstreamPool(
                        endpoint,
                        config.pool,
                        config.timeouts,
                        codec,
                        max_head_bytes,
                        tls=context,
                        server_hostname=name,
                        upstream=self.name,
                    )
                )
        self.all_pools: list[EndpointPool] = [*self.pools, *self.h2_pools]
        self._weights = [endpoint.weight for endpoint in config.endpoints]
        self._total_weight = sum(self._weights)
        self._uniform = len(set(self._weights)) == 1
        self._current = [0] * len(self._weights)
        self._next = 0

    def __repr__(self) -> str:
        return f"<Upstream {self.name} endpoints={len(self.all_pools)}>"

    def _choose(self) -> int:
        if self._uniform:
            index = self._next
            self._next = (index + 1) % len(self._weights)
            return index
        # Smooth WRR: weights 5,1,1 give a a b a c a a, not a a a a a b c.
        current = self._current
        best = 0
        for i, weight in enumerate(self._weights):
            current[i] += weight
            if current[i] > current[best]:
                best = i
        current[best] -= self._total_weight
        return best

    def pick(self) -> UpstreamPool:
        """The next endpoint's pool (HTTP/1.1 upstreams)."""
        return self.pools[self._choose()]

    def pick_h2(self) -> H2Pool:
        """The next endpoint's pool (h2c and h2 upstreams)."""
        return self.h2_pools[self._choose()]

    def endpoint_health(self) -> list[tuple[str, bool]]:
        """Each endpoint's label and whether it is healthy (`gatehouse_upstream_healthy`,
        read when metrics are scraped). Every endpoint is, until the resilience work's
        health checks and ejection give this a state to report."""
        return [(pool.label, True) for pool in self.all_pools]

    def expire(self, now: float) -> None:
        """Sweeper tick for every pool."""
        for pool in self.all_pools:
            pool.expire(now)

    def close(self) -> None:
        """Close idle connections of every pool."""
        for pool in self.all_pools:
            pool.close()
