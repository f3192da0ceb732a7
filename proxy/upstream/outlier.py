"""Passive health: outlier ejection from the outcomes of real requests (`outlier`).

`Upstream.report` hands every exchange's outcome here. An endpoint that fails
`consecutive_failures` exchanges in a row (could not connect, connect timed out, reset,
read timed out, malformed response), or answers `consecutive_5xx` 5xx in a row when that
is set, is ejected: out of rotation until `ejected_until` (loop time).

- A response of any status resets the failure streak (the endpoint is reachable); a
  response below 500 also resets the 5xx streak. Errors that are not the endpoint's
  fault (pool wait timeout, the client's body failing, the keep-alive race `stale`, an
  HTTP/2 stream the upstream `refused`, a circuit breaker's local 503) neither count nor
  reset. Outcomes reported while the endpoint is ejected (panic mode still sends it
  requests) are ignored.
- The ejection time is `base_ejection * n` for the endpoint's n-th ejection (Envoy's
  rule), at most `max_ejection`. The multiplier decays by one for every `base_ejection`
  the endpoint then spends in rotation, so an endpoint that fails once a day is not
  ejected for `max_ejection` each time.
- At most `floor(endpoints * max_ejection_percent / 100)` endpoints are ejected at once
  (Envoy checks the same: ejecting one more must not go over the percentage). An
  upstream of one endpoint never ejects it at 50%; at 100% every endpoint can be
  ejected, and then the balancer's panic mode tries them all. An endpoint that reaches
  its threshold while the limit is reached keeps its streak and is ejected on its next
  failure once room is free. Endpoints out of rotation by the active health check do not
  count toward the limit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from metrics.traffic import count_ejection
from proxy.config.upstream_model import OutlierConfig
from proxy.core.errors import (
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)

if TYPE_CHECKING:
    from proxy.upstream.balancer import EndpointState

log = logging.getLogger(__name__)

# What counts as the endpoint failing an exchange (`consecutive_failures`).
ENDPOINT_FAILURES = (
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamReset,
    UpstreamTimeout,
    UpstreamProtocolError,
)
# Resets that say nothing about the endpoint's health (their `metrics_code`): the
# keep-alive race, and an HTTP/2 stream the upstream declined to process.
NOT_THE_ENDPOINTS_FAULT = frozenset({"stale", "refused"})


def is_endpoint_failure(error: BaseException) -> bool:
    """Whether `error` counts toward `consecutive_failures`."""
    if not isinstance(error, ENDPOINT_FAILURES):
        return False
    return getattr(error, "metrics_code", None) not in NOT_THE_ENDPOINTS_FAULT


class OutlierDetector:
    """One upstream's outlier ejection over its `endpoints` (see the module docstring).

    `now` is the clock ejection times are read on (the event loop's time in the
    gateway, a fake one in tests)."""

    __slots__ = ("config", "endpoints", "max_ejected", "now", "out", "upstream")

    def __init__(
        self,
        config: OutlierConfig,
        upstream: str,
        endpoints: Sequence[EndpointState],
        now: Callable[[], float],
    ) -> None:
        self.config = config
        self.upstream = upstream
        self.endpoints = endpoints
        self.now = now
        self.max_ejected = len(endpoints) * config.max_ejection_percent // 100
        self.out: set[EndpointState] = set()  # ejected, and their return not yet logged

    def __repr__(self) -> str:
        ejected = self.ejected(self.now())
        return f"<OutlierDetector {self.upstream} ejected={ejected}/{self.max_ejected}>"

    def ejected(self, now: float) -> int:
        """How many endpoints are ejected at `now`."""
        return sum(1 for e in self.endpoints if e.ejected_until > now)

    def return_due(self, now: float) -> list[EndpointState]:
        """The endpoints whose ejection ended by `now` since the last call (logged)."""
        back = [e for e in self.out if e.ejected_until <= now]
        for state in back:
            self.out.discard(state)
            log.info("upstream %s endpoint %s back from ejection", self.upstream, state.label)
        return back

    def report(self, state: EndpointState, status: int | None, error: BaseException | None) -> bool:
        """Count one outcome of `state`'s endpoint; True when it was ejected by it."""
        now = self.now()
        if state.ejected_until > now:
            return False
        config = self.config
        if status is not None:
            state.failures = 0
            if status < 500:
                state.server_errors = 0
                return False
            state.server_errors += 1
            limit = config.consecutive_5xx
            if limit is None or state.server_errors < limit:
                return False
            why = f"{state.server_errors} responses 5xx in a row (last {status})"
        elif error is not None and is_endpoint_failure(error):
            state.failures += 1
            if state.failures < config.consecutive_failures:
                return False
            why = f"{state.failures} failures in a row (last: {error})"
        else:
            return False
        return self._eject(state, now, why)

    def _eject(self, state: EndpointState, now: float, why: str) -> bool:
        config = self.config
        ejected = self.ejected(now)
        if ejected >= self.max_ejected:
            log.debug(
                "upstream %s endpoint %s not ejected (%s): %d of %d ejected already, the "
                "max_ejection_percent %d%% limit",
                self.upstream,
                state.label,
                why,
                ejected,
                len(self.endpoints),
                config.max_ejection_percent,
            )
            return False
        if state.ejections and state.ejected_until:
            # Back in rotation since `ejected_until`: one step less per base_ejection.
            served = max(0.0, now - state.ejected_until)
            state.ejections = max(0, state.ejections - int(served // config.base_ejection))
        state.ejections += 1
        duration = min(config.base_ejection * state.ejections, config.max_ejection)
        state.ejected_until = now + duration
        self.out.add(state)
        state.failures = 0
        state.server_errors = 0
        count_ejection(self.upstream, state.label)
        log.info(
            "upstream %s endpoint %s ejected for %.3gs (ejection %d): %s",
            self.upstream,
            state.label,
            duration,
            state.ejections,
            why,
        )
        return True
