"""The shared GCRA decision: a fresh key has its whole burst, and `remaining` counts
down to 0 exactly as requests are admitted, whatever the clock's magnitude."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from middleware.rate_limit_core import gcra


def test_remaining_is_not_lost_to_rounding() -> None:
    # Found by the redis backend's tests: float sums around 1e4 s rounded these down by one.
    assert gcra(0.0, 12345.678, 0.05, 0.05)[0].remaining == 1
    assert gcra(0.0, 12345.678, 0.1, 0.9)[0].remaining == 9


@given(
    now=st.floats(min_value=1.0, max_value=1e7),
    rate=st.sampled_from([1, 3, 10, 20, 100, 1000]),
    burst=st.integers(min_value=0, max_value=50),
)
def test_a_burst_counts_down_to_zero_then_refuses(now: float, rate: int, burst: int) -> None:
    emission = 1.0 / rate
    tat = 0.0
    for expected in range(burst, -1, -1):  # burst + 1 requests at once are admitted
        decision, tat = gcra(tat, now, emission, emission * burst)
        assert decision.allowed
        assert decision.remaining == expected
        assert decision.limit == burst + 1
    decision, _ = gcra(tat, now, emission, emission * burst)
    assert not decision.allowed
    assert decision.retry_after_s > 0
