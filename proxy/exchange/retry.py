"""Retries (`upstreams.X.retries`): which failures are retried, whether a request can be
sent again, the back-off before a retry, and the per-upstream retry budget.

The forwarder (`proxy/exchange/forward.py`) runs the loop; this module decides. A try fails with
a *condition*: `connect-failure` (no connection: nothing was sent), `refused-stream` (an
HTTP/2 stream the upstream refused or left unprocessed, RFC 9113 section 8.7: nothing was
processed), `reset`, `timeout`, or a 502/503/504 response. A failure whose condition the
upstream's `on` lists is retried while tries < `attempts`, if

- the request can be sent again: nothing of it was sent (connect-failure and
  refused-stream, any method, when its body is still at hand), or its method is
  idempotent (RFC 9110 section 9.2.2) and its body is empty or was kept whole within
  `body_limit`;
- the budget allows: retries in flight on the upstream stay under
  max(`budget_min`, `budget_percent` of its requests in flight), so when every endpoint
  fails, retries add at most about that share to the load (Envoy's retry budget). Retries
  of tries that never reached an upstream (connect-failure, refused-stream) cost it
  nothing and are not held to the budget (they count in it): when an endpoint dies, every
  request caught on it goes elsewhere.

A retry waits a full-jitter back-off first (uniform in [0, min(max, base * 2**n)] for the
n-th retry, n from 0) and goes to an endpoint not yet tried when one is eligible.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING

from metrics.traffic import count_retry, count_retry_budget_exhausted
from proxy.config.upstream_model import RetryConfig
from proxy.core.body import Body
from proxy.core.errors import (
    ProxyError,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamReset,
    UpstreamTimeout,
)
from proxy.upstream.balancer import UpstreamLoad
from proxy.upstream.h2.stream import StreamRefused

if TYPE_CHECKING:
    from proxy.upstream.balancer import Upstream

CONNECT_FAILURE = "connect-failure"
REFUSED_STREAM = "refused-stream"
RESET = "reset"
TIMEOUT = "timeout"
# Conditions under which the upstream never saw (or never processed) the request.
NOTHING_SENT = frozenset({CONNECT_FAILURE, REFUSED_STREAM})
# RFC 9110 section 9.2.2; PATCH, POST and CONNECT are not.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_STATUS_CONDITIONS = {502: "502", 503: "503", 504: "504"}


def failure_condition(error: ProxyError) -> str | None:
    """The retry condition a failed try's `error` is, or None (never retried: a
    malformed response, a pool wait timeout, the client's own body failing...)."""
    if isinstance(error, UpstreamConnectError | UpstreamConnectTimeout):
        return CONNECT_FAILURE
    if isinstance(error, StreamRefused):  # before UpstreamReset: it is one
        return REFUSED_STREAM
    if isinstance(error, UpstreamTimeout):
        return TIMEOUT
    if isinstance(error, UpstreamReset):
        return RESET
    return None


def load_of(upstream: Upstream) -> UpstreamLoad:
    """The in-flight counts of `upstream` (one per Upstream object: a reload that builds
    a new one starts from zero while the old one's requests finish on the old counts)."""
    return upstream.load


class ReplayBody:
    """The request body as the retry loop sees it: `data` is the whole body when it is
    in memory (complete on arrival, or the copy an HTTP/1.1 connection kept of a small
    streamed one); otherwise the client's stream, which can be sent again only while no
    try has read from it."""

    __slots__ = ("body", "data")

    def __init__(self, body: Body, data: bytes | None) -> None:
        self.body = body
        self.data = data

    def keep(self, consumed: bytes | None) -> None:
        """A try's copy of the streamed body it consumed (an HTTP/1.1 connection's
        `sent_body`, a refused HTTP/2 stream's `replay`): kept for the next try when it
        is the whole body, which the client has finished sending."""
        body = self.body
        if (
            self.data is None
            and consumed is not None
            and body.complete
            and len(consumed) == body.bytes_read == body.bytes_fed
        ):
            self.data = consumed

    @property
    def untouched(self) -> bool:
        """No try consumed any of the client's stream (a refused connection never
        reads it)."""
        return self.data is not None or self.body.bytes_read == 0


class RetryPolicy:
    """One upstream's `retries` settings, decided on (shared by its routes' forwarders).

    `rand` is injected so tests can pin the jitter."""

    __slots__ = ("_config", "_load", "_rand", "attempts", "fast_path_ok", "name", "per_try_timeout")

    def __init__(
        self,
        name: str,
        config: RetryConfig,
        load: UpstreamLoad,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.name = name
        self._config = config
        self._load = load
        self._rand = rand
        self.attempts = config.attempts
        self.per_try_timeout = config.per_try_timeout
        # The synchronous fast path sends on an idle HTTP/1.1 connection and hands only
        # the keep-alive race back to this general path: fine while the only conditions
        # retried cannot happen there (no connect on an idle connection; refused streams
        # are HTTP/2's) and no per-try timeout must be armed.
        self.fast_path_ok = config.per_try_timeout is None and (
            config.attempts <= 1 or config.on <= NOTHING_SENT
        )

    def __repr__(self) -> str:
        on = ",".join(sorted(self._config.on))
        return f"<RetryPolicy {self.name} attempts={self.attempts} on={on}>"

    def error_condition(self, error: ProxyError, tries: int) -> str | None:
        """The condition to retry a try that failed with `error` on, or None when it is
        not retried (not listed in `on`, or `tries` used every attempt)."""
        if tries >= self.attempts:
            return None
        condition = failure_condition(error)
        return condition if condition in self._config.on else None

    def status_condition(self, status: int, tries: int) -> str | None:
        """The condition to retry a try answered with `status` on, or None."""
        if tries >= self.attempts:
            return None
        condition = _STATUS_CONDITIONS.get(status)
        return condition if condition in self._config.on else None

    def replayable(self, condition: str, method: str, replay: ReplayBody) -> bool:
        """Whether the request can be sent again after a try failed with `condition`."""
        if condition in NOTHING_SENT:
            return replay.untouched
        data = replay.data
        return (
            method in IDEMPOTENT_METHODS
            and data is not None
            and len(data) <= self._config.body_limit
        )

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (0 for the first): full jitter."""
        config = self._config
        ceiling = min(config.backoff_max, config.backoff_base * (1 << retry))
        return self._rand() * ceiling

    def take_budget(self, condition: str) -> bool:
        """Reserve a retry from the budget (the caller calls `release` when its try has
        ended); False, and counted, when retries in flight are at their share."""
        load = self._load
        config = self._config
        allowed = max(config.budget_min, config.budget_percent * load.active / 100.0)
        # A try that never reached an upstream (refused connection, refused stream) cost
        # it nothing, so its retry is not held to the budget (it still counts in it):
        # when an endpoint dies, the burst of requests caught on it all go elsewhere.
        if load.retrying >= allowed and condition not in NOTHING_SENT:
            count_retry_budget_exhausted(self.name)
            return False
        load.retrying += 1
        count_retry(self.name, condition)
        return True

    def release(self) -> None:
        """A retry `take_budget` granted has ended."""
        self._load.retrying -= 1
