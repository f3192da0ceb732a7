"""The data path's metrics: what every request counts (the requests answered and the
local replies, each upstream attempt, retries and what the circuit breaker refused, the
sides of splits and the copies of mirrors), the upstreams' health (ejections, active
checks, panic mode), and `forget_series`, which drops the series of what a reload
removed (docs/operations.md).

They are declared on the worker's registry (metrics/definitions.py) and add up across
workers like the rest. What is counted on every request uses the lock-free families of
metrics/local.py, and `set_enabled(False)` (config `metrics: {enabled: false}`) turns
that counting off.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from time import perf_counter
from typing import TYPE_CHECKING

from metrics.children import LocalCounterChild, LocalHistogramChild
from metrics.definitions import REGISTRY
from metrics.local import LocalCounter, LocalHistogram
from proxy.core.errors import (
    PoolTimeout,
    ProxyError,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)
from proxy.core.local_reply import count_with

if TYPE_CHECKING:
    from proxy.core.models import Request

# -- traffic: counted on every request (the data path) ---------------------------------

_enabled = True


def set_enabled(enabled: bool) -> None:
    """Turn the per-request counting on or off (`Config.metrics.enabled`): requests,
    their duration, upstream attempts and local replies. `metrics.live.attach_server`
    applies the config at start-up; a reload that changes it calls this again."""
    global _enabled
    _enabled = enabled


def metrics_enabled() -> bool:
    """Whether the per-request counting is on."""
    return _enabled


# Seconds; from half a millisecond (a proxied request on loopback) to a minute (a slow
# upstream within the usual read timeouts).
DURATION_BUCKETS = (
    *(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
NO_ROUTE = ""  # the route label of requests no route matched (404) or never parsed
OTHER_METHOD = "other"
# The method label: RFC 9110's methods and PATCH; anything else is `other` (bounded).
_METHODS = {
    method: method
    for method in ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
}

# The protocol label of client-side traffic: as `gatehouse_open_connections` has it.
HTTP1 = "http1"
HTTP2 = "h2"

REQUESTS = LocalCounter(
    "gatehouse_requests",
    'Requests answered to clients (proxied and local replies), by route name ("" when '
    "no route matched), method (other for non-standard ones), status code and protocol "
    "(http1, h2); counted when the response ends or breaks off",
    ["route", "method", "code", "protocol"],
    registry=REGISTRY,
)
REQUEST_SECONDS = LocalHistogram(
    "gatehouse_request_duration_seconds",
    "From the request head received to the response's last byte handed to the socket "
    "(a WebSocket: to its 101/200), by route and code_class (2xx, 4xx, 5xx...: a latency "
    "objective can leave errors out)",
    ["route", "code_class"],
    buckets=DURATION_BUCKETS,
    registry=REGISTRY,
)
REQUEST_BYTES = LocalCounter(
    "gatehouse_request_body_bytes",
    "Request body bytes read from clients (what the exchange took: forwarded upstream or "
    "read by a middleware), by route and protocol; counted when the response ends",
    ["route", "protocol"],
    registry=REGISTRY,
)
RESPONSE_BYTES = LocalCounter(
    "gatehouse_response_body_bytes",
    "Response body bytes taken for sending to clients (none for HEAD), by route and "
    "protocol; counted when the response ends or breaks off",
    ["route", "protocol"],
    registry=REGISTRY,
)
UPSTREAM_REQUESTS = LocalCounter(
    "gatehouse_upstream_requests",
    "Requests sent to upstream endpoints (each attempt, retries included), by upstream, "
    "endpoint and code: the response status, or why no response came (connect_error, "
    "connect_timeout, pool_timeout, reset, stale, refused, timeout, bad_response, "
    "client_abort)",
    ["upstream", "endpoint", "code"],
    registry=REGISTRY,
)
UPSTREAM_SECONDS = LocalHistogram(
    "gatehouse_upstream_request_duration_seconds",
    "From a request sent upstream to its response head, by upstream and endpoint "
    "(responses only: failed attempts are counted, not timed)",
    ["upstream", "endpoint"],
    buckets=DURATION_BUCKETS,
    registry=REGISTRY,
)
LOCAL_REPLIES = LocalCounter(
    "gatehouse_local_replies",
    "Answers the gateway gave itself (docs/errors.md), by reason code "
    "(no_route, upstream_connect_failed, upstream_timeout, rate_limited, ...)",
    ["reason"],
    registry=REGISTRY,
)

# A request's children: its count, its duration, its body bytes in and out.
_RequestSeries = tuple[LocalCounterChild, LocalHistogramChild, LocalCounterChild, LocalCounterChild]
# (route, method label, status, protocol) -> its children: one dict lookup per request.
_REQUEST_SERIES: dict[tuple[str, str, int, str], _RequestSeries] = {}
_LOCAL_REPLY_SERIES: dict[str, LocalCounterChild] = {}
_gone_routes: set[str] = set()  # routes whose series forget_series dropped
_route_check: Callable[[str], bool] | None = None


def set_route_check(check: Callable[[str], bool] | None) -> None:
    """How to tell whether the running config has a route (metrics.live installs one
    that reads the attached server's Runtime): a route `forget_series` dropped counts
    again as soon as a reload brings it back, before the next `forget_series`."""
    global _route_check
    _route_check = check


def count_request(request: Request | None, status: int, sent: int, protocol: str) -> None:
    """One more request answered with `status` (its response ended or broke off), on a
    client connection speaking `protocol` (HTTP1 or HTTP2), after `sent` response body
    bytes were taken for sending. `request` is None for an answer to bytes that never
    made a request (a malformed or oversized head): counted with route "" and method
    other, and not timed."""
    if not _enabled:
        return
    if request is None:
        key = (NO_ROUTE, OTHER_METHOD, status, protocol)
        started = 0.0
        received = 0
    else:
        exchange = request.exchange
        key = (exchange.route_name, _METHODS.get(request.method, OTHER_METHOD), status, protocol)
        started = exchange.received_at
        received = request.body.bytes_read
    series = _REQUEST_SERIES.get(key)
    if series is None:
        series = _request_series(key)
    series[0].value += 1.0
    if started:
        series[1].observe(perf_counter() - started)
    if received:
        series[2].value += received
    if sent:
        series[3].value += sent


def code_class(status: int) -> str:
    """The code_class label of `status`: "2xx", "5xx"..."""
    return f"{status // 100}xx"


def _request_series(key: tuple[str, str, int, str]) -> _RequestSeries:
    route, method, status, protocol = key
    if route in _gone_routes and (_route_check is None or not _route_check(route)):
        # A request of a route a reload removed, ending after its series were dropped:
        # counted into children nobody exports, so the series does not come back.
        return (
            LocalCounterChild(),
            LocalHistogramChild(REQUEST_SECONDS.buckets),
            LocalCounterChild(),
            LocalCounterChild(),
        )
    series = (
        REQUESTS.labels(route, method, str(status), protocol),
        REQUEST_SECONDS.labels(route, code_class(status)),
        REQUEST_BYTES.labels(route, protocol),
        RESPONSE_BYTES.labels(route, protocol),
    )
    _REQUEST_SERIES[key] = series
    return series


def count_local_reply(reason: str) -> None:
    """One more local reply (a ProxyError answered by the gateway) for `reason`."""
    if not _enabled:
        return
    child = _LOCAL_REPLY_SERIES.get(reason)
    if child is None:
        child = _LOCAL_REPLY_SERIES[reason] = LOCAL_REPLIES.labels(reason)
    child.value += 1.0


count_with(count_local_reply)  # proxy/core/local_reply.py counts with it


# -- upstream resilience: retries and the circuit breaker (proxy/exchange/retry.py) -------------

UPSTREAM_RETRIES = LocalCounter(
    "gatehouse_upstream_retries",
    "Retries sent to an upstream, by upstream and reason: the condition that failed the "
    "try before (connect-failure, refused-stream, reset, timeout, 502, 503, 504)",
    ["upstream", "reason"],
    registry=REGISTRY,
)
UPSTREAM_RETRY_BUDGET_EXHAUSTED = LocalCounter(
    "gatehouse_upstream_retry_budget_exhausted",
    "Retries not sent because the upstream's retry budget was spent (retries in flight "
    "at their share of the requests in flight), by upstream",
    ["upstream"],
    registry=REGISTRY,
)
UPSTREAM_OVERLOADED = LocalCounter(
    "gatehouse_upstream_overloaded",
    "Requests (or retries) the upstream's circuit breaker refused with 503, by upstream "
    "and limit (max_requests, max_pending, max_connections)",
    ["upstream", "limit"],
    registry=REGISTRY,
)


# -- traffic shaping: weighted splits and mirrors (proxy/exchange/split.py, mirror.py) ----

SPLIT_REQUESTS = LocalCounter(
    "gatehouse_split_requests",
    "Requests a split route sent to each of its sides, by route and upstream",
    ["route", "upstream"],
    registry=REGISTRY,
)
MIRROR_REQUESTS = LocalCounter(
    "gatehouse_mirror_requests",
    "Requests a route chose to copy to its mirror, by route and result: sent (the shadow "
    "answered, any status), failed (no whole answer in time), dropped (max_in_flight "
    "copies were out), too_large (the body was over max_body)",
    ["route", "result"],
    registry=REGISTRY,
)


def split_series(route: str, upstream: str) -> LocalCounterChild:
    """The counter of one side of a split route, made once per Runtime."""
    return SPLIT_REQUESTS.labels(route, upstream)


def count_split(series: LocalCounterChild) -> None:
    """One more request sent to the side `series` counts."""
    if _enabled:
        series.value += 1.0


def count_mirror(route: str, result: str) -> None:
    """One more request `route` chose to mirror, with its `result`."""
    if _enabled:
        MIRROR_REQUESTS.labels(route, result).value += 1.0


def count_retry(upstream: str, reason: str) -> None:
    """One more retry to `upstream` after a try failed for `reason` (a retry condition)."""
    if _enabled:
        UPSTREAM_RETRIES.labels(upstream, reason).value += 1.0


def count_retry_budget_exhausted(upstream: str) -> None:
    """One more retry `upstream`'s retry budget refused."""
    if _enabled:
        UPSTREAM_RETRY_BUDGET_EXHAUSTED.labels(upstream).value += 1.0


def count_overloaded(upstream: str, limit: str) -> None:
    """One more request `upstream`'s circuit breaker refused at `limit`."""
    if _enabled:
        UPSTREAM_OVERLOADED.labels(upstream, limit).value += 1.0


# Why an upstream attempt ended without a response head, by the error's class.
_FAILURE_CODES: tuple[tuple[type[ProxyError], str], ...] = (
    (UpstreamConnectTimeout, "connect_timeout"),
    (UpstreamConnectError, "connect_error"),
    (PoolTimeout, "pool_timeout"),
    (UpstreamTimeout, "timeout"),
    (UpstreamProtocolError, "bad_response"),
    (UpstreamReset, "reset"),  # StaleConnection and StreamRefused name themselves
)
CLIENT_ABORT = "client_abort"  # the client left, or its body failed, before the head
# The message of the cancellation that ends a try at `retries.per_try_timeout`
# (proxy/exchange/forward.py), which tells it from the client's going away.
PER_TRY_TIMEOUT = "gatehouse: per_try_timeout"


def failure_code(error: BaseException) -> str:
    """The code label of an upstream attempt that failed with `error`: `stale` (the
    keep-alive race) and `refused` (a stream the upstream never processed) are retried
    once; an error that is not the upstream's (the client's body failed) is
    client_abort."""
    code = getattr(error, "metrics_code", None)
    if isinstance(code, str):
        return code
    for cls, name in _FAILURE_CODES:
        if isinstance(error, cls):
            return name
    return CLIENT_ABORT


def cancelled_code(cancelled: BaseException) -> str:
    """The code label of an attempt cancelled before its response head: `timeout` when
    `retries.per_try_timeout` cut it, client_abort otherwise."""
    return "timeout" if PER_TRY_TIMEOUT in cancelled.args else CLIENT_ABORT


class UpstreamSeries:
    """The series of one upstream endpoint, held by its pool: `response` and `failure`
    are one dict lookup and an addition. A series `forget_series` dropped is `dead`."""

    __slots__ = ("_codes", "_seconds", "dead", "endpoint", "upstream")

    def __init__(self, upstream: str, endpoint: str, *, dead: bool = False) -> None:
        self.upstream = upstream
        self.endpoint = endpoint
        self.dead = dead
        self._codes: dict[int | str, LocalCounterChild] = {}
        self._seconds = (
            LocalHistogramChild(UPSTREAM_SECONDS.buckets)
            if dead
            else UPSTREAM_SECONDS.labels(upstream, endpoint)
        )

    def __repr__(self) -> str:
        state = " DEAD" if self.dead else ""
        return f"<UpstreamSeries {self.upstream} {self.endpoint}{state}>"

    def response(self, status: int, sent_at: float) -> None:
        """A response head with `status` arrived for a request sent at `sent_at`
        (perf_counter)."""
        if not _enabled or self.dead:
            return
        child = self._codes.get(status)
        if child is None:
            child = self._child(status)
        child.value += 1.0
        self._seconds.observe(perf_counter() - sent_at)

    def failure(self, code: str) -> None:
        """An attempt ended without a response head, for `code` (see `failure_code`)."""
        if not _enabled or self.dead:
            return
        child = self._codes.get(code)
        if child is None:
            child = self._child(code)
        child.value += 1.0

    def _child(self, code: int | str) -> LocalCounterChild:
        child = UPSTREAM_REQUESTS.labels(self.upstream, self.endpoint, str(code))
        self._codes[code] = child
        return child


# A pool that is no upstream's (forward_auth's client, tests): counts nothing.
NO_UPSTREAM_SERIES = UpstreamSeries("", "", dead=True)
_UPSTREAM_SERIES: dict[tuple[str, str], UpstreamSeries] = {}


def upstream_series(upstream: str | None, endpoint: str) -> UpstreamSeries:
    """The series of `upstream`'s `endpoint`, shared by every pool for it (a reload that
    rebuilds an upstream keeps counting into the same series)."""
    if upstream is None:
        return NO_UPSTREAM_SERIES
    series = _UPSTREAM_SERIES.get((upstream, endpoint))
    if series is None:
        series = _UPSTREAM_SERIES[(upstream, endpoint)] = UpstreamSeries(upstream, endpoint)
    return series


# -- upstream health: counted on health checks and ejections, not per request ---------

UPSTREAM_EJECTIONS = LocalCounter(
    "gatehouse_upstream_ejections",
    "Endpoints ejected by outlier detection (consecutive failures or 5xx), by upstream "
    "and endpoint",
    ["upstream", "endpoint"],
    registry=REGISTRY,
)
UPSTREAM_HEALTH_CHECKS = LocalCounter(
    "gatehouse_upstream_health_checks",
    "Active health checks, by upstream, endpoint and result (ok, failed)",
    ["upstream", "endpoint", "result"],
    registry=REGISTRY,
)
UPSTREAM_PANIC = LocalCounter(
    "gatehouse_upstream_panic",
    "Endpoint choices made in panic mode (no endpoint in rotation: all are tried), by upstream",
    ["upstream"],
    registry=REGISTRY,
)


def count_ejection(upstream: str, endpoint: str) -> None:
    """One more ejection of `upstream`'s `endpoint`."""
    UPSTREAM_EJECTIONS.labels(upstream, endpoint).value += 1.0


def count_health_check(upstream: str, endpoint: str, ok: bool) -> None:
    """One more active health check of `upstream`'s `endpoint`, passed or not."""
    UPSTREAM_HEALTH_CHECKS.labels(upstream, endpoint, "ok" if ok else "failed").value += 1.0


def panic_counter(upstream: str) -> LocalCounterChild:
    """The panic-mode counter of `upstream` (held by it: one addition per choice)."""
    return UPSTREAM_PANIC.labels(upstream)


def forget_series(
    routes: Collection[str],
    upstreams: Collection[str],
    endpoints: Collection[tuple[str, str]] | None = None,
) -> None:
    """After a reload: drop every series whose `route` label is not in `routes` (the
    no-route series "" stays) or whose `upstream` label is not in `upstreams`; with
    `endpoints` ((upstream, endpoint label) pairs), also those of endpoints an upstream
    that stays no longer has. Requests of removed routes still running count into
    nothing (unless the route came back); pools of removed upstreams and endpoints stop
    counting."""
    live_routes = set(routes)
    live_upstreams = set(upstreams)
    live_endpoints = set(endpoints) if endpoints is not None else None
    for resilience in (UPSTREAM_RETRIES, UPSTREAM_RETRY_BUDGET_EXHAUSTED, UPSTREAM_OVERLOADED):
        resilience.forget("upstream", live_upstreams.__contains__)

    def keep_route(route: str) -> bool:
        return route == NO_ROUTE or route in live_routes

    def keep_endpoint(upstream: str, endpoint: str) -> bool:
        if upstream not in live_upstreams:
            return False
        return live_endpoints is None or (upstream, endpoint) in live_endpoints

    route_families: tuple[LocalCounter | LocalHistogram, ...] = (
        REQUESTS,
        REQUEST_SECONDS,
        REQUEST_BYTES,
        RESPONSE_BYTES,
        SPLIT_REQUESTS,
        MIRROR_REQUESTS,
    )
    for family in route_families:
        for values, _ in family.children():
            if not keep_route(values[0]):
                _gone_routes.add(values[0])
        family.forget("route", keep_route)
    _gone_routes.difference_update(live_routes)
    for request_key in [key for key in _REQUEST_SERIES if not keep_route(key[0])]:
        del _REQUEST_SERIES[request_key]
    for upstream_family in (UPSTREAM_REQUESTS, UPSTREAM_SECONDS):  # (upstream, endpoint, ...)
        upstream_family.forget_where(lambda values: keep_endpoint(values[0], values[1]))
    for health_family in (UPSTREAM_EJECTIONS, UPSTREAM_HEALTH_CHECKS):
        health_family.forget_where(lambda values: keep_endpoint(values[0], values[1]))
    UPSTREAM_PANIC.forget("upstream", live_upstreams.__contains__)
    for key, series in list(_UPSTREAM_SERIES.items()):
        if not keep_endpoint(*key):
            series.dead = True
            del _UPSTREAM_SERIES[key]
