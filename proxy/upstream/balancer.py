"""An upstream's endpoints and the choice among them.

Each endpoint gets one pool for the upstream's protocol: `UpstreamPool` (HTTP/1.1, over
TLS for https:// endpoints) or `H2Pool` (h2c, or h2 over TLS), and an `EndpointState`: its
weight, requests in flight, and health as the active checks and the passive outlier
detection see it. The TLS context is built here, once per upstream at config load.

`choose` takes the eligible endpoints (healthy, not ejected; all of them when none is,
the panic mode that tries everything rather than failing every request) and lets the
balance policy (`proxy/upstream/policies.py`) pick one, skipping those a retry excludes.

Health comes from two places: the active checks (`proxy/upstream/health.py`, one task per
upstream started by `start_health`) set `EndpointState.healthy`, and the outlier
detection (`proxy/upstream/outlier.py`) fed by `report` sets `ejected_until`. Both call
`refresh_eligibility`, and the sweeper's `expire` brings ejected endpoints back when
their time is up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Protocol, cast

from metrics.children import LocalCounterChild
from metrics.traffic import panic_counter
from proxy.config.upstream_model import EndpointConfig, UpstreamConfig
from proxy.upstream.h2.pool import H2Pool
from proxy.upstream.health import HealthChecker
from proxy.upstream.outlier import OutlierDetector
from proxy.upstream.policies import Policy, make_policy
from proxy.upstream.pool import PoolOccupancy, UpstreamPool
from proxy.upstream.resolver import DnsRefresh
from proxy.upstream.tls import client_context, reload_client_certificate, server_hostname

if TYPE_CHECKING:
    from proxy.core.models import Request

log = logging.getLogger(__name__)


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


class EndpointPool(Protocol):
    """What every per-endpoint pool offers the runtime (sweeper, shutdown, metrics)."""

    @property
    def endpoint(self) -> EndpointConfig: ...

    @property
    def label(self) -> str: ...

    def occupancy(self) -> PoolOccupancy: ...

    def expire(self, now: float) -> None: ...

    def close(self) -> None: ...


class EndpointState:
    """One endpoint of an upstream: its pool and what the balancer knows of it."""

    __slots__ = (
        "ejected_until",
        "ejections",
        "failures",
        "healthy",
        "in_flight",
        "index",
        "label",
        "pool",
        "server_errors",
        "weight",
    )

    def __init__(self, index: int, pool: EndpointPool, weight: int) -> None:
        self.index = index
        self.pool = pool
        self.label = pool.label
        self.weight = weight
        self.in_flight = 0  # requests sent and not yet answered (least_request)
        self.healthy = True  # the active health check's verdict
        self.ejected_until = 0.0  # loop time; the outlier detection ejected it until then
        self.ejections = 0  # how many times it was ejected (the ejection time grows)
        self.failures = 0  # consecutive connect failures, resets, timeouts
        self.server_errors = 0  # consecutive 5xx

    def __repr__(self) -> str:
        ejected = f" ejected_until={self.ejected_until:.3f}" if self.ejected_until else ""
        return (
            f"<EndpointState {self.label} healthy={self.healthy} in_flight={self.in_flight}"
            f"{ejected}>"
        )

    def eligible(self, now: float) -> bool:
        """In rotation: healthy and not ejected."""
        return self.healthy and self.ejected_until <= now


class UpstreamLoad:
    """What one upstream has in flight, shared by every route's forwarder to it: the
    retry budget's and the circuit breaker's counts (proxy/exchange/retry.py)."""

    __slots__ = ("active", "retrying")

    def __init__(self) -> None:
        self.active = 0  # requests between entering the forwarder and their response head
        self.retrying = 0  # of those, retries granted and not yet answered (back-off too)

    def __repr__(self) -> str:
        return f"<UpstreamLoad active={self.active} retrying={self.retrying}>"


class Upstream:
    """An upstream's endpoints, each with its own pool, and their health.

    `now` is the clock ejections are timed on: the running loop's time unless a test
    injects one."""

    def __init__(
        self,
        config: UpstreamConfig,
        codec: str,
        max_head_bytes: int,
        *,
        now: Callable[[], float] = _loop_time,
    ) -> None:
        self.name = config.name
        self.now = now
        self.load = UpstreamLoad()  # in-flight counts for retry budgets and breakers
        self.config = config
        # h2c and h2 share one pool type; the scheme of each endpoint says whether TLS.
        self.http2 = config.protocol in ("h2c", "h2")
        self._codec = codec
        self._max_head_bytes = max_head_bytes
        self._tls = client_context(config)
        self.panic = False  # no endpoint in rotation (as of the last refresh_eligibility)
        self._panic_count: LocalCounterChild | None = None
        self.health: HealthChecker | None = None
        self._health_started = False
        self.resolver = DnsRefresh(self) if config.resolve_interval is not None else None
        self.pools: list[UpstreamPool] = []
        self.h2_pools: list[H2Pool] = []
        self.all_pools: list[EndpointPool] = []
        self.endpoints: list[EndpointState] = []
        self.all_eligible = True  # False while some endpoint is out of rotation
        self.use_endpoints(config.endpoints)

    def reload_client_certificate(self) -> None:
        """Read the client certificate presented to the endpoints (`tls.cert`) again.

        Raises:
            OSError, ssl.SSLError: it does not load; the one in use stays.
        """
        reload_client_certificate(self._tls, self.config)

    def use_endpoints(self, endpoints: Sequence[EndpointConfig]) -> None:
        """Serve `endpoints` (at config load, and when `resolve` finds the addresses of a
        name changed). An endpoint that stays keeps its pool, connections and health;
        one that goes has its pool closed: idle connections now, busy ones once their
        exchange ends (it drains)."""
        kept = {_key(state.pool.endpoint): state for state in self.endpoints}
        states: list[EndpointState] = []
        for index, endpoint in enumerate(endpoints):
            state = kept.pop(_key(endpoint), None)
            if state is None or state.weight != endpoint.weight:
                if state is not None:
                    kept[_key(endpoint)] = state  # its pool closes below
                state = EndpointState(index, self._pool_for(endpoint), endpoint.weight)
            state.index = index
            states.append(state)
        for gone in kept.values():
            gone.pool.close()
        self.endpoints = states
        self.all_pools = [state.pool for state in states]
        self.pools = [cast(UpstreamPool, p) for p in self.all_pools if not self.http2]
        self.h2_pools = [cast(H2Pool, p) for p in self.all_pools if self.http2]
        config = self.config
        self.policy: Policy = make_policy(config.balance, states)
        self.outlier = (
            OutlierDetector(config.outlier, self.name, states, self.now)
            if config.outlier is not None
            else None
        )
        self._use_health_checker(states)
        if kept or len(states) != len(config.endpoints) or any(not s.healthy for s in states):
            self.refresh_eligibility()

    def _pool_for(self, endpoint: EndpointConfig) -> EndpointPool:
        config = self.config
        context = self._tls if endpoint.scheme == "https" else None
        name = server_hostname(endpoint, config)
        if self.http2:
            return H2Pool(
                endpoint,
                config.pool,
                config.timeouts,
                tls=context,
                server_hostname=name,
                upstream=self.name,
            )
        return UpstreamPool(
            endpoint,
            config.pool,
            config.timeouts,
            self._codec,
            self._max_head_bytes,
            tls=context,
            server_hostname=name,
            upstream=self.name,
        )

    def _use_health_checker(self, states: list[EndpointState]) -> None:
        """A checker over `states` (replacing the one over the previous list)."""
        config = self.config
        check = config.health_check
        if check is None:
            return
        old = self.health
        if old is not None:
            old.cancel()
        self.health = HealthChecker(
            self.name,
            check,
            states,
            self.refresh_eligibility,
            tls=self._tls,  # ALPN h2 for h2 upstreams: the checks speak their protocol
            server_hostname=lambda state: server_hostname(state.pool.endpoint, config),
            http2=config.protocol in ("h2", "h2c"),
            codec=self._codec,  # the parser and head limit the forwarding uses
            max_head_bytes=self._max_head_bytes,
        )
        if self._health_started:
            self.health.start()

    def __repr__(self) -> str:
        return f"<Upstream {self.name} endpoints={len(self.all_pools)}>"

    def choose(
        self, request: Request | None = None, exclude: Collection[int] = ()
    ) -> EndpointState:
        """The endpoint for `request`: the policy's pick among the eligible endpoints,
        leaving out the indexes in `exclude` (those a retry already tried) unless no
        other is left."""
        candidates: Sequence[EndpointState] = self.endpoints
        if not self.all_eligible or exclude:
            candidates = self.candidates(exclude)
        return self.policy.choose(candidates, request)

    def candidates(self, exclude: Collection[int] = ()) -> list[EndpointState]:
        """The eligible endpoints not in `exclude`; when that leaves none, the eligible
        ones; when none is eligible, every endpoint (panic mode)."""
        now = self.now() if not self.all_eligible else 0.0
        eligible = [e for e in self.endpoints if self.all_eligible or e.eligible(now)]
        if not eligible:
            eligible = self.endpoints  # panic: trying them all beats failing everything
            counter = self._panic_count
            if counter is None:
                counter = self._panic_count = panic_counter(self.name)
            counter.value += 1.0
        untried = [e for e in eligible if e.index not in exclude]
        return untried or eligible

    def report(self, state: EndpointState, status: int | None, error: BaseException | None) -> None:
        """The outcome of one exchange with `state`'s endpoint: the response status, or
        the error that stopped it (passive health, `outlier`)."""
        outlier = self.outlier
        if outlier is None:
            return
        if status is not None and status < 500 and not state.failures and not state.server_errors:
            return  # the common case: nothing to count or reset
        if outlier.report(state, status, error):
            self.refresh_eligibility()

    def refresh_eligibility(self) -> None:
        """Recompute `all_eligible` after a health or ejection change; entering and
        leaving panic mode is logged."""
        now = self.now()
        eligible = sum(1 for e in self.endpoints if e.eligible(now))
        self.all_eligible = eligible == len(self.endpoints)
        panic = eligible == 0
        if panic != self.panic:
            self.panic = panic
            if panic:
                log.warning(
                    "upstream %s: no endpoint in rotation, panic mode: requests go to all %d",
                    self.name,
                    len(self.endpoints),
                )
            else:
                log.info(
                    "upstream %s: out of panic mode, %d endpoints in rotation", self.name, eligible
                )

    def endpoint_health(self) -> list[tuple[str, bool]]:
        """Each endpoint's label and whether it is in rotation (healthy and not ejected;
        `gatehouse_upstream_healthy`, read when metrics are scraped)."""
        if self.all_eligible:
            return [(e.label, True) for e in self.endpoints]
        now = self.now()
        return [(e.label, e.eligible(now)) for e in self.endpoints]

    def expire(self, now: float) -> None:
        """Sweeper tick for every pool; endpoints whose ejection is over are back."""
        for pool in self.all_pools:
            pool.expire(now)
        if not self.all_eligible:
            if self.outlier is not None:
                self.outlier.return_due(now)
            self.refresh_eligibility()

    def start_health(self) -> None:
        """Start the active health checks and the DNS refresh, if the upstream has them
        (running loop)."""
        self._health_started = True
        if self.health is not None:
            self.health.start()
        if self.resolver is not None:
            self.resolver.start()

    async def aclose_health(self) -> None:
        """Stop the active health checks and the DNS refresh; wait for their tasks."""
        if self.resolver is not None:
            await self.resolver.aclose()
        if self.health is not None:
            await self.health.aclose()

    def close(self) -> None:
        """Close idle connections of every pool and stop the active health checks and
        the DNS refresh (`aclose_health` waits for them)."""
        if self.resolver is not None:
            self.resolver.cancel()
        if self.health is not None:
            self.health.cancel()
        for pool in self.all_pools:
            pool.close()


def _key(endpoint: EndpointConfig) -> tuple[str, str, int]:
    return (endpoint.scheme, endpoint.host, endpoint.port)
