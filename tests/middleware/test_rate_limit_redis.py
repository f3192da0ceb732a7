"""The `redis` rate-limit backend against a real redis-server (tests/support/redis_server.py):
decisions equal `gcra()` step by step, state shared between backends and atomic under
concurrency, idle keys expire, every failure is a RateLimitBackendError within the timeout
(server killed, server frozen, wrong key type), NOSCRIPT and restarts recover, and an
outage is logged once when it starts and once when it ends.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from middleware.rate_limit_core import Decision, RateLimitBackendError, gcra
from middleware.rate_limit_redis import BackendState, RedisBackend
from tests.support.redis_server import RedisServer, running_redis

pytestmark = pytest.mark.socket

# The backends' timeout where Redis is meant to answer: a busy machine may keep a Redis
# call waiting for far longer than production's 50 ms, and a spurious timeout would fail
# the test.
ANSWERS_WITHIN_S = 10.0
# The timeout where only it can end a call (a frozen Redis).
TIMEOUT_S = 1.0
# How much later than its timeout a failing decision may end (a busy machine's
# scheduling), and the bound on a failure that must not wait for the timeout at all.
MARGIN_S = 2.0
PREFIX = "gatehouse:rl:test:"
LOGGER = "middleware.rate_limit_redis"
EPOCH_S = 1_700_000_000.25  # a realistic `now`: its doubles are as coarse as production's


class Clock:
    """A settable clock in seconds (Redis' TIME is replaced through the script's ARGV)."""

    def __init__(self, now: float = EPOCH_S) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path) as server:
        yield server


@pytest.fixture
async def inspector(redis_server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    """A plain client for looking at what the backend stored."""
    client = redis.asyncio.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
async def backends() -> AsyncIterator[list[RedisBackend]]:
    """Backends a test makes are appended here and closed at teardown."""
    made: list[RedisBackend] = []
    yield made
    for backend in made:
        await backend.close()


async def started(
    made: list[RedisBackend],
    url: str,
    clock: Clock | None = None,
    timeout_s: float = ANSWERS_WITHIN_S,
) -> RedisBackend:
    backend = RedisBackend(url, timeout_s, PREFIX, now=clock)
    made.append(backend)
    await backend.start()
    return backend


async def stored_tat(inspector: redis.asyncio.Redis, key: str) -> float | None:
    value = await inspector.get(PREFIX + key)
    return None if value is None else float(value)


async def assert_fails_within(backend: RedisBackend, key: str, bound_s: float) -> float:
    """decide() raises RateLimitBackendError within `bound_s`; how long it took."""
    start = time.monotonic()
    with pytest.raises(RateLimitBackendError):
        await backend.decide(key, 6.0, 54.0)
    elapsed = time.monotonic() - start
    assert elapsed < bound_s, elapsed
    return elapsed


def state(backend: RedisBackend) -> BackendState:
    """The backend's state, read fresh (a call in between may have changed it)."""
    return backend.state


def outage_logs(caplog: pytest.LogCaptureFixture) -> tuple[list[str], list[str]]:
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    return (
        [m for m in messages if "is unavailable" in m],
        [m for m in messages if "answers again" in m],
    )


# ------------------------------------------------------------------ the same GCRA as gcra()


@pytest.mark.parametrize(
    ("emission_s", "tolerance_s", "seed"),
    [
        # Real Redis expires keys in real time while this clock is fake: every key here
        # stays for at least 30s (test_idle_key_expires covers short ones on Redis' clock).
        (6.0, 54.0, 1),  # rate 10/min, burst 9
        (30.0, 0.0, 2),  # 2/min, no burst
        (100 / 3, 1000 / 3, 3),  # 9 per 5 min, burst 10: inexact doubles
        (0.7, 0.7 * 43, 4),  # 10 per 7s, burst 43: inexact doubles
        (3600.0, 3600.0 * 4, 5),  # 1/h, burst 4
    ],
)
async def test_decisions_match_gcra_step_by_step(
    redis_server: RedisServer,
    inspector: redis.asyncio.Redis,
    backends: list[RedisBackend],
    emission_s: float,
    tolerance_s: float,
    seed: int,
) -> None:
    clock = Clock()
    backend = await started(backends, redis_server.url, clock)
    rng = random.Random(seed)
    tat = 0.0
    allowed = denied = 0
    for step in range(400):
        # bursts at one instant, steps shorter and longer than the emission interval
        clock.now += rng.choice(
            [0.0, 0.0, rng.random() * emission_s, rng.random() * 3 * emission_s]
        )
        expected, tat = gcra(tat, clock.now, emission_s, tolerance_s)
        decision = await backend.decide("k", emission_s, tolerance_s)
        assert decision == expected, (step, clock.now)
        assert await stored_tat(inspector, "k") == tat, step
        allowed += decision.allowed
        denied += not decision.allowed
    assert allowed > 0
    assert denied > 0


async def test_first_burst_is_admitted_then_refused_with_retry_after(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    clock = Clock()
    backend = await started(backends, redis_server.url, clock)
    decisions = [await backend.decide("tenant", 6.0, 54.0) for _ in range(11)]
    assert [d.remaining for d in decisions[:10]] == list(range(9, -1, -1))
    assert all(d.allowed and d.limit == 10 for d in decisions[:10])
    assert decisions[10] == Decision(False, 10, 0, 60.0, 6.0)
    clock.now += 6.0
    assert (await backend.decide("tenant", 6.0, 54.0)).allowed


async def test_now_is_redis_time_when_no_clock_is_given(
    redis_server: RedisServer, inspector: redis.asyncio.Redis, backends: list[RedisBackend]
) -> None:
    backend = await started(backends, redis_server.url)
    before_s, before_us = await inspector.time()
    decision = await backend.decide("k", 6.0, 54.0)
    after_s, after_us = await inspector.time()
    assert decision == Decision(True, 10, 9, decision.reset_after_s, 0.0)
    assert decision.reset_after_s == pytest.approx(6.0, abs=1e-6)
    tat = await stored_tat(inspector, "k")
    assert tat is not None
    assert before_s + before_us / 1e6 + 6.0 <= tat <= after_s + after_us / 1e6 + 6.0


async def test_keys_carry_the_prefix(
    redis_server: RedisServer, inspector: redis.asyncio.Redis, backends: list[RedisBackend]
) -> None:
    backend = await started(backends, redis_server.url)
    await backend.decide("203.0.113.7", 6.0, 54.0)
    await backend.decide("t\u00e9nant", 6.0, 54.0)
    keys = sorted(await inspector.keys("*"))
    assert keys == [b"gatehouse:rl:test:203.0.113.7", "gatehouse:rl:test:t\u00e9nant".encode()]


# ------------------------------------------------------------------------ shared, atomic


async def test_two_backends_share_one_limit(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    """Two gateways' backends on one Redis: 30 requests alternating, 10 admitted."""
    first = await started(backends, redis_server.url)
    second = await started(backends, redis_server.url)
    results = [await (first, second)[i % 2].decide("shared", 6.0, 54.0) for i in range(30)]
    assert sum(d.allowed for d in results) == 10
    assert [d.allowed for d in results] == [True] * 10 + [False] * 20


async def test_concurrent_decisions_are_atomic(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    """60 decisions at once over several pooled connections and two backends: each is
    one script, so exactly burst + 1 are admitted."""
    first = await started(backends, redis_server.url)
    second = await started(backends, redis_server.url)
    results = await asyncio.gather(
        *((first, second)[i % 2].decide("hot", 6.0, 54.0) for i in range(60))
    )
    assert sum(d.allowed for d in results) == 10


# ------------------------------------------------------------------------- pipelining


async def test_decisions_of_one_turn_go_out_as_one_batch_on_one_connection(
    redis_server: RedisServer, inspector: redis.asyncio.Redis, backends: list[RedisBackend]
) -> None:
    """16 decisions asked for in one turn of the loop are one pipeline: one connection
    (one call each would have taken up to 16), and each gets its own script's answer."""
    clock = Clock()
    backend = await started(backends, redis_server.url, clock)
    results = await asyncio.gather(*(backend.decide(f"k{i % 4}", 6.0, 54.0) for i in range(16)))
    assert [d.remaining for d in results] == [9] * 4 + [8] * 4 + [7] * 4 + [6] * 4
    clients = await inspector.client_list()
    assert len(clients) == 2  # the inspector and the backend's one connection


async def test_a_batch_meeting_an_empty_script_cache_repeats_its_calls_once(
    redis_server: RedisServer, inspector: redis.asyncio.Redis, backends: list[RedisBackend]
) -> None:
    clock = Clock()
    backend = await started(backends, redis_server.url, clock)
    await backend.decide("k", 6.0, 54.0)
    await inspector.script_flush()
    results = await asyncio.gather(*(backend.decide("k", 6.0, 54.0) for _ in range(5)))
    assert [d.remaining for d in results] == [8, 7, 6, 5, 4]  # each ran exactly once
    assert state(backend) is BackendState.UP


async def test_a_cancelled_decision_leaves_its_batch_answered(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    """The request of one decision goes away while its batch is out: the others still
    get their answers, and the cancelled one's script still ran (it was sent)."""
    clock = Clock()
    backend = await started(backends, redis_server.url, clock)
    tasks = [asyncio.create_task(backend.decide("k", 6.0, 54.0)) for _ in range(4)]
    await asyncio.sleep(0)  # every task is waiting for its answer: the batch is queued
    tasks[1].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[1], asyncio.CancelledError)
    assert [d.remaining for d in done if isinstance(d, Decision)] == [9, 7, 6]
    assert (await backend.decide("k", 6.0, 54.0)).remaining == 5


async def test_a_bug_in_a_batch_fails_its_decisions_instead_of_leaving_them_waiting(
    redis_server: RedisServer,
    backends: list[RedisBackend],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = await started(backends, redis_server.url)

    async def broken(*args: object) -> list[Any]:
        raise RuntimeError("a bug in the batch")

    monkeypatch.setattr(backend, "_pipeline", broken)
    outcomes = await asyncio.gather(
        *(backend.decide(f"k{i}", 6.0, 54.0) for i in range(3)), return_exceptions=True
    )
    assert len(outcomes) == 3
    assert all(isinstance(o, RateLimitBackendError) for o in outcomes), outcomes
    assert "a batch of decisions failed" in caplog.text


@pytest.mark.parametrize("turns", [0, 1, 2, 3, 10])
async def test_close_fails_the_decisions_still_on_their_way(
    turns: int, redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    """Closed after `turns` turns of the loop: the decisions not yet batched, a batch
    whose task has not run yet, and a batch waiting for Redis all fail as closed.
    (TIMEOUT_S: redis-py's clean-up of a cancelled call on a frozen Redis waits for up
    to the timeout; the close comes within a few turns of the loop, long before it.)"""
    backend = await started(backends, redis_server.url, timeout_s=TIMEOUT_S)
    redis_server.freeze()  # no answer can come first
    try:
        pending = asyncio.gather(
            *(backend.decide(f"k{i}", 6.0, 54.0) for i in range(3)), return_exceptions=True
        )
        for _ in range(turns):
            await asyncio.sleep(0)
        await backend.close()
        outcomes = await pending
    finally:
        redis_server.thaw()
    assert len(outcomes) == 3
    assert all(isinstance(o, RateLimitBackendError) for o in outcomes), outcomes
    assert all("closed" in str(o) for o in outcomes), outcomes


# ---------------------------------------------------------------------------- expiry


async def test_allowed_decision_sets_expiry_when_key_is_full_again(
    redis_server: RedisServer, inspector: redis.asyncio.Redis, backends: list[RedisBackend]
) -> None:
    clock = Clock()
    backend = await started(backends, redis_server.url, clock)
    await backend.decide("k", 6.0, 54.0)  # tat = now + 6: full again in 6 + 54 s
    # Redis counts the TTL down in real time: what it reads is its expiry less the time
    # since (seconds, on a busy machine), and never more.
    ttl_ms = await inspector.pttl(PREFIX + "k")
    assert 60_000 - 5_000 < ttl_ms <= 60_000
    for _ in range(9):
        await backend.decide("k", 6.0, 54.0)
    ttl_ms = await inspector.pttl(PREFIX + "k")  # tat = now + 60: full in 114 s
    assert 114_000 - 5_000 < ttl_ms <= 114_000


async def test_denied_decision_leaves_key_and_expiry_alone(
    redis_server: RedisServer, inspector: redis.asyncio.Redis, backends: list[RedisBackend]
) -> None:
    clock = Clock()
    backend = await started(backends, redis_server.url, clock)
    for _ in range(10):
        assert (await backend.decide("k", 6.0, 54.0)).allowed
    tat = await stored_tat(inspector, "k")
    await inspector.pexpire(PREFIX + "k", 500_000)  # a marker the script must not reset
    assert not (await backend.decide("k", 6.0, 54.0)).allowed
    assert await stored_tat(inspector, "k") == tat
    assert await inspector.pttl(PREFIX + "k") > 400_000


async def test_idle_key_expires(
    redis_server: RedisServer, inspector: redis.asyncio.Redis, backends: list[RedisBackend]
) -> None:
    backend = await started(backends, redis_server.url)  # Redis' clock, real expiry
    await backend.decide("idle", 0.05, 0.05)  # 20/s, burst 1: full again after 100 ms
    # At most 100 ms left, or gone already (a busy machine may read it that late; -1,
    # a key without expiry, fails both).
    ttl_ms = await inspector.pttl(PREFIX + "idle")
    assert ttl_ms == -2 or 0 < ttl_ms <= 100, ttl_ms
    await asyncio.sleep(0.15)
    assert not await inspector.exists(PREFIX + "idle")
    decision = await backend.decide("idle", 0.05, 0.05)
    assert decision.allowed
    assert decision.reset_after_s == pytest.approx(0.05, abs=1e-6)  # a fresh key again


# -------------------------------------------------------------------------- failures


async def test_killed_redis_fails_fast_and_recovers_after_restart(
    redis_server: RedisServer,
    backends: list[RedisBackend],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    backend = await started(backends, redis_server.url)
    # several pooled connections, all of which the kill breaks
    await asyncio.gather(*(backend.decide(f"k{i}", 6.0, 54.0) for i in range(8)))
    redis_server.kill()
    for _ in range(5):  # refused: at once, not after the backend's timeout
        await assert_fails_within(backend, "k0", MARGIN_S)
    assert state(backend) is BackendState.DOWN
    redis_server.start()  # same port, empty: no keys, no scripts (NOSCRIPT path)
    results = await asyncio.gather(*(backend.decide(f"k{i}", 6.0, 54.0) for i in range(8)))
    assert all(d.allowed and d.remaining == 9 for d in results)  # state was lost with it
    assert state(backend) is BackendState.UP
    down, up = outage_logs(caplog)
    assert len(down) == 1, down
    assert f"127.0.0.1:{redis_server.port}/0" in down[0]
    assert len(up) == 1, up
    assert "5 decisions failed" in up[0]


async def test_frozen_redis_times_out_within_timeout_then_recovers(
    redis_server: RedisServer,
    inspector: redis.asyncio.Redis,
    backends: list[RedisBackend],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Redis that accepts but never answers: only the timeout ends the call. The
    connection that timed out must not be reused (its late reply would be read as the
    answer to the next decision)."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    clock = Clock()
    backend = await started(backends, redis_server.url, clock, timeout_s=TIMEOUT_S)
    await backend.decide("k", 6.0, 54.0)
    redis_server.freeze()
    try:
        for _ in range(3):
            elapsed = await assert_fails_within(backend, "k", TIMEOUT_S + MARGIN_S)
            assert elapsed >= TIMEOUT_S * 0.9
    finally:
        redis_server.thaw()
    # The three timed-out scripts may still run once Redis thaws (they were sent): each
    # then moved the tat by one emission. Whatever they did, the next answer must be the
    # GCRA of what Redis holds, not a stale reply read from a connection that timed out.
    tat = await stored_tat(inspector, "other")
    decision = await backend.decide("other", 6.0, 54.0)
    assert tat is None
    assert decision == gcra(0.0, clock.now, 6.0, 54.0)[0]
    stored = await stored_tat(inspector, "k")
    assert stored is not None
    runs = round((stored - clock.now) / 6.0)
    assert 1 <= runs <= 4
    assert await backend.decide("k", 6.0, 54.0) == gcra(stored, clock.now, 6.0, 54.0)[0]
    down, up = outage_logs(caplog)
    assert (len(down), len(up)) == (1, 1), (down, up)
    assert "no answer within 1000ms" in down[0]


async def test_redis_down_at_start_is_an_outage_not_an_error(
    tmp_path: Path, backends: list[RedisBackend], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    server = RedisServer(tmp_path)  # not started: connections refused
    try:
        backend = await started(backends, server.url)
        assert state(backend) is BackendState.DOWN
        await assert_fails_within(backend, "k", MARGIN_S)  # refused: at once
        server.start()
        assert (await backend.decide("k", 6.0, 54.0)).allowed
    finally:
        server.kill()
    down, up = outage_logs(caplog)
    assert (len(down), len(up)) == (1, 1), (down, up)
    assert "1 decisions failed" in up[0]


async def test_script_flush_is_recovered_by_loading_again(
    redis_server: RedisServer, inspector: redis.asyncio.Redis, backends: list[RedisBackend]
) -> None:
    clock = Clock()
    backend = await started(backends, redis_server.url, clock)
    first = await backend.decide("k", 6.0, 54.0)
    await inspector.script_flush()
    assert await inspector.script_exists(backend._sha) == [False]
    second = await backend.decide("k", 6.0, 54.0)
    assert (first.remaining, second.remaining) == (9, 8)
    assert await inspector.script_exists(backend._sha) == [True]
    assert state(backend) is BackendState.UP


async def test_key_of_another_type_is_a_backend_error(
    redis_server: RedisServer, inspector: redis.asyncio.Redis, backends: list[RedisBackend]
) -> None:
    backend = await started(backends, redis_server.url)
    await inspector.hset(PREFIX + "wrong", "a", "b")
    with pytest.raises(RateLimitBackendError, match="WRONGTYPE"):
        await backend.decide("wrong", 6.0, 54.0)


async def test_decide_without_start_makes_the_client(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    backend = RedisBackend(redis_server.url, ANSWERS_WITHIN_S, PREFIX)
    backends.append(backend)
    assert (await backend.decide("k", 6.0, 54.0)).allowed
    assert state(backend) is BackendState.UP


async def test_closed_backend_refuses_and_leaves_no_connection(
    redis_server: RedisServer, inspector: redis.asyncio.Redis
) -> None:
    backend = RedisBackend(redis_server.url, ANSWERS_WITHIN_S, PREFIX)
    await backend.start()
    await asyncio.gather(*(backend.decide(f"k{i}", 6.0, 54.0) for i in range(4)))
    await backend.close()
    assert state(backend) is BackendState.CLOSED
    with pytest.raises(RateLimitBackendError, match="closed"):
        await backend.decide("k", 6.0, 54.0)
    clients = await inspector.client_list()
    assert len(clients) == 1  # the inspector itself


# ----------------------------------------------------------------------- construction


def test_constructor_needs_no_event_loop() -> None:
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()
    backend = RedisBackend("redis://user:secret@cache.internal:6380/2", 0.2, "rl:")
    assert repr(backend) == "<RedisBackend cache.internal:6380/2 NEW prefix='rl:'>"
    assert "secret" not in repr(backend)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:6379", "redis://127.0.0.1:notaport/0", "127.0.0.1:6379"]
)
def test_unusable_url_is_a_value_error(url: str) -> None:
    with pytest.raises(ValueError, match=r"scheme|port"):
        RedisBackend(url, 0.2, "rl:")


async def test_decide_begun_outside_a_task_moves_into_one(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    """A chain may be driven by hand from a loop callback until it first waits
    (proxy/exchange/eager.py): asyncio.timeout would raise there, so decide first yields a bare
    turn, which hands it to a task, and decides from there."""
    backend = await started(backends, redis_server.url)
    loop = asyncio.get_running_loop()
    coroutine = backend.decide("k", 6.0, 54.0)
    first_yield: asyncio.Future[object] = loop.create_future()

    def drive_outside_a_task() -> None:
        assert asyncio.current_task() is None
        try:
            first_yield.set_result(coroutine.send(None))
        except BaseException as exc:  # the test reports it
            first_yield.set_exception(exc)

    loop.call_soon(drive_outside_a_task)
    assert await first_yield is None  # a bare yield: nothing was sent to Redis yet
    decision = await carry_on(coroutine)
    assert (decision.allowed, decision.remaining) == (True, 9)


async def carry_on(coroutine: Coroutine[Any, Any, Decision]) -> Decision:
    """Resume a coroutine that yielded a bare turn outside a task, inside this task (as
    proxy/exchange/eager.py's `_continue` does): wait for what it waits for, send, repeat."""
    awaited: Any = None
    while True:
        if awaited is None:
            await asyncio.sleep(0)
        else:
            awaited._asyncio_future_blocking = False  # a task clears the coroutine's mark
            await awaited
        try:
            awaited = coroutine.send(None)
        except StopIteration as done:
            result: Decision = done.value
            return result
