"""Endpoint choice for an upstream: smooth weighted round robin (nginx's algorithm).

Smarter policies, health checks and ejection come with the resilience work; this module
is where they plug in.
"""

from __future__ import annotations

from proxy.config_model import UpstreamConfig
from proxy.upstream.pool import UpstreamPool


class Upstream:
    """An upstream's endpoints, each with its own pool."""

    def __init__(self, config: UpstreamConfig, codec: str, max_head_bytes: int) -> None:
        self.name = config.name
        self.config = config
        self.pools = [
            UpstreamPool(endpoint, config.pool, config.timeouts, codec, max_head_bytes)
            for endpoint in config.endpoints
        ]
        self._weights = [endpoint.weight for endpoint in config.endpoints]
        self._total_weight = sum(self._weights)
        self._uniform = len(set(self._weights)) == 1
        self._current = [0] * len(self.pools)
        self._next = 0

    def __repr__(self) -> str:
        return f"<Upstream {self.name} endpoints={len(self.pools)}>"

    def pick(self) -> UpstreamPool:
        """The next endpoint's pool."""
        pools = self.pools
        if self._uniform:
            index = self._next
            self._next = (index + 1) % len(pools)
            return pools[index]
        # Smooth WRR: weights 5,1,1 give a a b a c a a, not a a a a a b c.
        current = self._current
        best = 0
        for i, weight in enumerate(self._weights):
            current[i] += weight
            if current[i] > current[best]:
                best = i
        current[best] -= self._total_weight
        return pools[best]

    def expire(self, now: float) -> None:
        """Sweeper tick for every pool."""
        for pool in self.pools:
            pool.expire(now)

    def close(self) -> None:
        """Close idle connections of every pool."""
        for pool in self.pools:
            pool.close()
