"""The local rate-limit backend: GCRA in a shared-memory table. Decisions equal the
reference `gcra()`, idle keys free their records, a full window evicts the key with the
least debt, the limit is exact across forked processes, and a lock left taken by a dead
process is recovered (the table shared through a file: test_rate_limit_shared.py)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from middleware.rate_limit_core import gcra
from middleware.rate_limit_local import (
    HASH_CACHE_KEYS,
    PROBE_SLOTS,
    SLOT_BYTES,
    LocalBackend,
    _mutex_trylock,
    _mutex_unlock,
    table_slots,
)

START_S = 1000.0
CHILD_TIMEOUT_S = 10.0


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self, now: float = START_S) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def keys_with_home(backend: LocalBackend, home: int, count: int) -> list[str]:
    """`count` distinct keys whose first record is `home` (found by trying names)."""
    found = [key for key in (f"k{i}" for i in range(100_000)) if backend.home_slot(key) == home]
    assert len(found) >= count
    return found[:count]


def test_a_burst_of_burst_plus_one_is_admitted_then_one_per_emission() -> None:
    clock = FakeClock()
    backend = LocalBackend(16, now=clock)
    emission, tolerance = 6.0, 6.0 * 9  # 10/min, burst 9
    allowed = [backend.decide_now("a", emission, tolerance).allowed for _ in range(12)]
    assert allowed == [True] * 10 + [False] * 2
    refused = backend.decide_now("a", emission, tolerance)
    assert refused.retry_after_s == pytest.approx(6.0)
    assert (refused.limit, refused.remaining) == (10, 0)
    clock.advance(5.9)
    assert not backend.decide_now("a", emission, tolerance).allowed
    clock.advance(0.1)
    assert backend.decide_now("a", emission, tolerance).allowed  # one more after 6s
    assert not backend.decide_now("a", emission, tolerance).allowed
    assert backend.decide_now("b", emission, tolerance).allowed  # other keys are apart


def test_remaining_and_reset_count_down() -> None:
    clock = FakeClock()
    backend = LocalBackend(16, now=clock)
    decisions = [backend.decide_now("a", 1.0, 2.0) for _ in range(3)]
    assert [d.remaining for d in decisions] == [2, 1, 0]
    assert [d.reset_after_s for d in decisions] == [1.0, 2.0, 3.0]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from("abcd"), st.floats(0.0, 3.0, allow_nan=False)),
        min_size=1,
        max_size=60,
    ),
    st.floats(0.05, 2.0),
    st.integers(0, 5),
)
def test_decisions_equal_the_reference_gcra(
    steps: list[tuple[str, float]], emission: float, burst: int
) -> None:
    clock = FakeClock()
    backend = LocalBackend(64, now=clock)
    tolerance = emission * burst
    model: dict[str, float] = {}
    for key, wait in steps:
        clock.advance(wait)
        expected, model[key] = gcra(model.get(key, 0.0), clock.now, emission, tolerance)
        assert backend.decide_now(key, emission, tolerance) == expected


@pytest.mark.parametrize("start", [1000.0, 12345.678, 1e6])
def test_an_exact_burst_is_spent_whatever_the_clock_magnitude(start: float) -> None:
    """Regression: the critical section stored the new tat only when `now` was before
    the allow time with no slack, while `gcra()` allows within SLACK_S of it. A float sum
    landing a hair past `now` admitted a request without spending it: at 1000 s, rate
    10/s burst 9 admitted all 100 of 100."""
    backend = LocalBackend(16, now=FakeClock(start))
    allowed = [backend.decide_now("a", 0.1, 0.9).allowed for _ in range(100)]
    assert allowed == [True] * 10 + [False] * 90


async def test_decide_is_the_async_form_of_decide_now() -> None:
    clock = FakeClock()
    backend = LocalBackend(16, now=clock)
    first = await backend.decide("a", 10.0, 0.0)
    second = await backend.decide("a", 10.0, 0.0)
    assert (first.allowed, second.allowed) == (True, False)
    await backend.start()
    await backend.close()
    assert backend.decide_now("a", 10.0, 0.0) == second  # close left the table usable


def test_the_hash_cache_is_bounded_and_changes_no_decision() -> None:
    # A key's hash is remembered, then forgotten when the cache starts over: the key
    # keeps its record (and its spent budget) either way.
    clock = FakeClock()
    backend = LocalBackend(8 * HASH_CACHE_KEYS, now=clock)
    emission, tolerance = 60.0, 60.0  # two at once, then one a minute
    assert [backend.decide_now("spent", emission, tolerance).allowed for _ in range(3)] == [
        True,
        True,
        False,
    ]
    assert backend._hashes["spent"] == backend.key_hash("spent")
    for index in range(HASH_CACHE_KEYS + 10):  # a client sending ever new keys
        backend.decide_now(f"other{index}", emission, tolerance)
        assert len(backend._hashes) <= HASH_CACHE_KEYS
    assert "spent" not in backend._hashes  # forgotten by the cache...
    assert not backend.decide_now("spent", emission, tolerance).allowed  # ...not by the table


def test_table_size_is_bounded_by_max_keys() -> None:
    assert table_slots(1) == PROBE_SLOTS
    assert table_slots(65536) == 131072
    assert table_slots(1000) == 2048
    backend = LocalBackend(1000)
    assert len(backend._table) == (2048 + PROBE_SLOTS - 1) * SLOT_BYTES
    assert repr(backend) == "<LocalBackend slots=2048 probe=8 max_keys=1000>"


def test_idle_keys_expire_and_their_records_are_reused() -> None:
    clock = FakeClock()
    evictions: list[None] = []
    backend = LocalBackend(64, now=clock, on_evict=lambda: evictions.append(None))
    keys = keys_with_home(backend, 5, 2 * PROBE_SLOTS)
    old, new = keys[:PROBE_SLOTS], keys[PROBE_SLOTS:]
    for key in old:  # they fill the whole window from record 5
        assert backend.decide_now(key, 10.0, 0.0).allowed
    assert backend.live_keys() == PROBE_SLOTS
    clock.advance(10.0)  # every tat is now behind: the keys are idle, their records free
    assert backend.live_keys() == 0
    for key in new:
        assert backend.decide_now(key, 10.0, 0.0).allowed
    assert evictions == []  # reused, not evicted
    assert backend.live_keys() == PROBE_SLOTS
    # An expired key starts afresh, as GCRA says a key idle for long enough does.
    clock.advance(10.0)
    assert backend.decide_now(old[0], 10.0, 0.0).allowed
    assert not backend.decide_now(old[0], 10.0, 0.0).allowed


def test_a_full_window_evicts_the_key_with_the_least_debt() -> None:
    clock = FakeClock()
    evictions: list[None] = []
    backend = LocalBackend(64, now=clock, on_evict=lambda: evictions.append(None))
    keys = keys_with_home(backend, 9, PROBE_SLOTS + 1)
    emission = 100.0
    # Each key spends a different amount: key i has (i + 1) emissions of debt.
    for spent, key in enumerate(keys[:PROBE_SLOTS]):
        for _ in range(spent + 1):
            assert backend.decide_now(key, emission, emission * 20).allowed
    assert backend.live_keys() == PROBE_SLOTS
    newcomer = backend.decide_now(keys[PROBE_SLOTS], emission, emission * 20)
    assert newcomer.allowed
    assert newcomer.remaining == 20  # a fresh bucket
    assert len(evictions) == 1
    # keys[0] (one emission of debt) was forgotten: it starts afresh...
    assert backend.decide_now(keys[0], emission, emission * 20).remaining == 20
    # ...and in turn pushed out the newcomer, now the key with the least debt (one).
    assert len(evictions) == 2
    assert backend.decide_now(keys[PROBE_SLOTS], emission, emission * 20).remaining == 20
    # The others kept their state: keys[7] had spent 8 of its 21, now 9.
    assert backend.decide_now(keys[7], emission, emission * 20).remaining == 21 - 9


def _decide_in_children(
    backend: LocalBackend, processes: int, attempts: int, limit: int
) -> Iterator[int]:
    """Fork `processes` children that each decide `attempts` times for one key allowed
    `limit` at once (and one an hour after that); yield how many each was allowed."""
    pipes: list[tuple[int, int]] = []
    # The children start together: each waits for its byte of `go`, written once all are
    # forked (a start time could pass before a busy machine has forked them all).
    go_read, go_write = os.pipe()
    for _ in range(processes):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: decide, report, leave without pytest's teardown
            code = 1
            try:
                os.close(read_end)
                os.read(go_read, 1)
                allowed = sum(
                    backend.decide_now("shared", 3600.0, 3600.0 * (limit - 1)).allowed
                    for _ in range(attempts)
                )
                os.write(write_end, str(allowed).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        pipes.append((pid, read_end))
    os.write(go_write, b"g" * processes)
    os.close(go_read)
    os.close(go_write)
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    for pid, read_end in pipes:
        with os.fdopen(read_end, "rb") as reader:
            report = reader.read()
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            assert time.monotonic() < deadline, "a child did not exit"
            time.sleep(0.01)
        yield int(report)


def test_the_limit_is_exact_across_forked_processes() -> None:
    """4 processes race 200,000 decisions for one key allowed 100,000 at once (nothing
    refills during the test): exactly 100,000 are admitted in total. Without the lock,
    lost updates would admit more."""
    backend = LocalBackend(1024)
    limit = 100_000
    per_child = list(_decide_in_children(backend, 4, 50_000, limit))
    assert sum(per_child) == limit
    # The parent sees the state the children left: the budget is spent.
    assert not backend.decide_now("shared", 3600.0, 3600.0 * (limit - 1)).allowed


def test_a_lock_left_taken_by_a_dead_process_is_recovered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    # A long lock timeout: recovering only once it ran out would show as a long wait.
    backend = LocalBackend(16, now=clock, lock_timeout_s=10.0)
    pid = os.fork()
    if pid == 0:  # the child takes the lock and dies holding it (as under SIGKILL)
        _mutex_trylock(backend._mutex)
        os._exit(0)
    assert os.waitpid(pid, 0)[0] == pid
    with caplog.at_level(logging.ERROR, "middleware.rate_limit_local"):
        started = time.monotonic()
        assert backend.decide_now("a", 1.0, 0.0).allowed
        assert time.monotonic() - started < 5.0  # no waiting for the timeout
    assert "died holding" in caplog.text
    caplog.clear()
    # The lock works normally again (not left open, not left taken).
    assert not backend.decide_now("a", 1.0, 0.0).allowed
    assert _mutex_trylock(backend._mutex) == 0
    _mutex_unlock(backend._mutex)
    assert caplog.text == ""
