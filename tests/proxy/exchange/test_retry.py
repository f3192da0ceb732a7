"""The retry policy without sockets: conditions, replayability, back-off, the budget."""

from __future__ import annotations

import pytest

from metrics import traffic
from metrics.local import LocalCounter, LocalHistogram
from metrics.traffic import (
    UPSTREAM_OVERLOADED,
    UPSTREAM_RETRIES,
    UPSTREAM_RETRY_BUDGET_EXHAUSTED,
    count_overloaded,
    count_retry,
    count_retry_budget_exhausted,
    forget_series,
)
from proxy.config.upstream_model import RetryConfig
from proxy.core.body import Body
from proxy.core.errors import (
    BodyTooLarge,
    PoolTimeout,
    ProxyError,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)
from proxy.exchange.retry import (
    CONNECT_FAILURE,
    REFUSED_STREAM,
    ReplayBody,
    RetryPolicy,
    failure_condition,
)
from proxy.upstream.balancer import UpstreamLoad
from proxy.upstream.h1 import StaleConnection
from proxy.upstream.h2.stream import StreamRefused

ALL = frozenset({"connect-failure", "refused-stream", "reset", "timeout", "502", "503", "504"})


def policy(load: UpstreamLoad | None = None, rand: float = 0.5, **options: object) -> RetryPolicy:
    config = RetryConfig(**options)  # type: ignore[arg-type]
    return RetryPolicy("unit", config, load or UpstreamLoad(), rand=lambda: rand)


@pytest.mark.parametrize(
    ("error", "condition"),
    [
        (UpstreamConnectError(), "connect-failure"),
        (UpstreamConnectTimeout(), "connect-failure"),
        (StreamRefused("refused", b""), "refused-stream"),
        (UpstreamReset(), "reset"),
        (StaleConnection(), "reset"),  # one that escaped the fresh-connection retry
        (UpstreamTimeout(), "timeout"),
        (UpstreamProtocolError(), None),
        (PoolTimeout(), None),
        (BodyTooLarge(), None),  # the client's body failed: never the upstream's fault
    ],
)
def test_failure_condition_names_each_upstream_error(error: ProxyError, condition: str) -> None:
    assert failure_condition(error) == condition


def test_error_condition_only_for_listed_conditions_while_attempts_remain() -> None:
    retry = policy(attempts=3, on=frozenset({"reset"}))
    assert retry.error_condition(UpstreamReset(), 1) == "reset"
    assert retry.error_condition(UpstreamReset(), 2) == "reset"
    assert retry.error_condition(UpstreamReset(), 3) is None  # every attempt used
    assert retry.error_condition(UpstreamConnectError(), 1) is None  # not in `on`


def test_status_condition_for_502_503_504_when_listed() -> None:
    retry = policy(on=ALL)
    assert [retry.status_condition(s, 1) for s in (500, 502, 503, 504, 200)] == [
        None,
        "502",
        "503",
        "504",
        None,
    ]
    assert retry.status_condition(503, 2) is None
    assert policy(on=frozenset({"504"})).status_condition(503, 1) is None


def test_default_retries_connect_failures_and_refused_streams_once() -> None:
    retry = policy()
    assert retry.attempts == 2
    assert retry.error_condition(UpstreamConnectError(), 1) == CONNECT_FAILURE
    assert retry.error_condition(StreamRefused("x", None), 1) == REFUSED_STREAM
    assert retry.error_condition(UpstreamReset(), 1) is None
    assert retry.status_condition(503, 1) is None


def streamed(read: int = 0) -> Body:
    body = Body(None)
    body.bytes_read = read
    return body


def test_nothing_sent_is_replayable_for_any_method_while_the_body_is_at_hand() -> None:
    retry = policy(on=ALL)
    in_memory = ReplayBody(Body.from_bytes(b"x" * 100_000), b"x" * 100_000)
    for condition in (CONNECT_FAILURE, REFUSED_STREAM):
        assert retry.replayable(condition, "POST", in_memory)  # even over body_limit
        assert retry.replayable(condition, "POST", ReplayBody(streamed(), None))
        # A streamed body a try began to read (and nobody kept) cannot be sent again.
        assert not retry.replayable(condition, "POST", ReplayBody(streamed(10), None))


def test_sent_requests_are_replayable_only_when_idempotent_with_a_kept_small_body() -> None:
    retry = policy(on=ALL, body_limit=1024)
    small = ReplayBody(Body.from_bytes(b"x" * 1024), b"x" * 1024)
    large = ReplayBody(Body.from_bytes(b"x" * 1025), b"x" * 1025)
    empty = ReplayBody(Body.from_bytes(b""), b"")
    for method in ("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"):
        assert retry.replayable("503", method, small)
        assert retry.replayable("reset", method, empty)
        assert not retry.replayable("503", method, large)
        assert not retry.replayable("reset", method, ReplayBody(streamed(), None))
    for method in ("POST", "PATCH", "CONNECT"):
        assert not retry.replayable("503", method, empty)


@pytest.mark.parametrize(
    ("rand", "expected_ms"),
    [(1.0, [25, 50, 100, 200, 250, 250]), (0.5, [12.5, 25, 50, 100, 125, 125]), (0.0, [0] * 6)],
)
def test_backoff_is_full_jitter_under_an_exponential_ceiling(
    rand: float, expected_ms: list[float]
) -> None:
    retry = policy(rand=rand)
    assert [round(retry.backoff(n) * 1000, 6) for n in range(6)] == expected_ms


def test_budget_allows_the_minimum_then_a_share_of_requests_in_flight() -> None:
    load = UpstreamLoad()
    retry = policy(load, budget_percent=20.0, budget_min=3)
    exhausted = UPSTREAM_RETRY_BUDGET_EXHAUSTED.labels("unit")
    counted = UPSTREAM_RETRIES.labels("unit", "reset")
    before, before_retries = exhausted.value, counted.value
    load.active = 10  # 20% is 2: the minimum of 3 rules
    assert [retry.take_budget("reset") for _ in range(4)] == [True, True, True, False]
    assert load.retrying == 3
    assert exhausted.value == before + 1
    assert counted.value == before_retries + 3
    retry.release()
    assert retry.take_budget("reset")
    load.active = 50  # 20% is 10
    assert sum(retry.take_budget("reset") for _ in range(20)) == 7
    assert load.retrying == 10
    assert repr(load) == "<UpstreamLoad active=50 retrying=10>"
    # At the limit, a try that never reached the upstream is still retried (and counted
    # in the budget); one that did is not.
    assert not retry.take_budget("reset")
    assert retry.take_budget("connect-failure")
    assert retry.take_budget("refused-stream")
    assert load.retrying == 12


@pytest.mark.parametrize(
    ("options", "fast"),
    [
        ({}, True),
        ({"on": frozenset({"connect-failure"})}, True),
        ({"on": frozenset({"reset"})}, False),
        ({"on": frozenset({"503"})}, False),
        ({"attempts": 1, "on": frozenset({"503"})}, True),
        ({"per_try_timeout": 1.0}, False),
    ],
)
def test_fast_path_only_when_the_policy_needs_nothing_it_lacks(
    options: dict[str, object], fast: bool
) -> None:
    config = RetryConfig(**options)  # type: ignore[arg-type]
    assert RetryPolicy("unit", config, UpstreamLoad()).fast_path_ok is fast


def test_replay_body_is_untouched_until_a_try_reads_the_stream() -> None:
    body = Body(None)
    replay = ReplayBody(body, None)
    before = replay.untouched
    body.feed(b"abc")
    body.feed_eof()
    assert body.take_all() == b"abc"
    assert (before, replay.untouched) == (True, False)
    assert ReplayBody(body, b"abc").untouched  # a copy kept by the connection
    assert "attempts=2" in repr(policy())


def test_keep_takes_a_try_copy_only_when_it_is_the_whole_finished_body() -> None:
    body = Body(None)
    body.feed(b"abc")
    body.bytes_read = 3  # a try read it all, but the client has not finished
    replay = ReplayBody(body, None)
    replay.keep(b"abc")
    assert replay.data is None
    body.feed_eof()
    replay.keep(None)  # the copy grew too large
    assert replay.data is None
    replay.keep(b"ab")  # not all of it
    assert replay.data is None
    replay.keep(b"abc")
    assert replay.data == b"abc"


def test_forget_series_drops_the_retry_and_overload_series_of_removed_upstreams() -> None:
    count_retry("unit-gone", "reset")
    count_retry_budget_exhausted("unit-gone")
    count_overloaded("unit-gone", "max_requests")
    count_retry("unit-kept", "reset")
    families = [
        family
        for family in vars(traffic).values()
        if isinstance(family, LocalCounter | LocalHistogram) and "upstream" in family.labelnames
    ]
    # Every upstream other tests of this process counted for stays.
    live = {values[family.labelnames.index("upstream")] for family in families
            for values, _ in family.children()} - {"unit-gone"}  # fmt: skip
    forget_series({values[0] for values, _ in traffic.REQUESTS.children()}, live)
    ours = (UPSTREAM_RETRIES, UPSTREAM_RETRY_BUDGET_EXHAUSTED, UPSTREAM_OVERLOADED)
    assert [v for family in ours for v, _ in family.children() if v[0] == "unit-gone"] == []
    assert ("unit-kept", "reset") in dict(UPSTREAM_RETRIES.children())
