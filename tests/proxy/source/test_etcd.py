"""The etcd source's pure parts: the back-off schedule."""

from __future__ import annotations

import itertools

from proxy.source.etcd import BACKOFF_BASE_S, BACKOFF_CAP_S, backoff_delay


def test_backoff_doubles_from_the_base_up_to_the_cap_with_half_of_it_jittered() -> None:
    least = [backoff_delay(attempt, lambda: 0.0) for attempt in range(8)]
    most = [backoff_delay(attempt, lambda: 1.0) for attempt in range(8)]
    assert least[:3] == [BACKOFF_BASE_S / 2, BACKOFF_BASE_S, BACKOFF_BASE_S * 2]
    assert most[:3] == [BACKOFF_BASE_S, BACKOFF_BASE_S * 2, BACKOFF_BASE_S * 4]
    assert least[-1] == BACKOFF_CAP_S / 2
    assert most[-1] == BACKOFF_CAP_S
    assert all(a <= b for a, b in itertools.pairwise(most))


def test_backoff_stays_capped_however_long_the_outage() -> None:
    assert backoff_delay(10_000, lambda: 0.5) == BACKOFF_CAP_S * 0.75
