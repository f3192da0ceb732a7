"""The etcd source's pure parts: the back-off schedule."""

from __future__ import annotations

import itertools

import pytest

from proxy.source.etcd import (
    BACKOFF_BASE_S,
    BACKOFF_CAP_S,
    CHECK_INTERVAL_ENV,
    DEFAULT_CHECK_INTERVAL_S,
    backoff_delay,
    check_interval,
)
from proxy.source.etcd_client import EtcdSettingsError


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


def test_the_check_interval_is_the_environments_or_the_default() -> None:
    assert check_interval({}) == DEFAULT_CHECK_INTERVAL_S
    assert check_interval({CHECK_INTERVAL_ENV: "0.5"}) == 0.5
    for bad in ("0", "-1", "soon", "inf", "nan"):
        with pytest.raises(EtcdSettingsError, match=CHECK_INTERVAL_ENV):
            check_interval({CHECK_INTERVAL_ENV: bad})
