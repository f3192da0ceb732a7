"""The ACME schedule (proxy/acme/schedule.py): when a certificate is renewed, and the
back-off after failed orders, as pure functions of time."""

from __future__ import annotations

import pytest

from proxy.acme.schedule import RETRY_FIRST_S, RETRY_MAX_S, renewal_time, retry_delay

DAY_S = 86400.0


def test_a_90_day_certificate_is_renewed_renew_before_its_expiry() -> None:
    assert renewal_time(0.0, 90 * DAY_S, 30 * DAY_S) == 60 * DAY_S
    assert renewal_time(0.0, 90 * DAY_S, 7 * DAY_S) == 83 * DAY_S


def test_renewal_is_never_earlier_than_a_third_of_the_lifetime_before_expiry() -> None:
    # A 6-day certificate with the 30-day default: renewed 2 days before expiry, not at
    # once (which would order again for every new certificate, in a loop).
    assert renewal_time(0.0, 6 * DAY_S, 30 * DAY_S) == 4 * DAY_S
    # Even a certificate that is already expired is due only from its expiry's third.
    assert renewal_time(100.0, 100.0, 30 * DAY_S) == 100.0


def test_the_back_off_doubles_from_a_minute_to_six_hours() -> None:
    delays = [retry_delay(failures) for failures in range(1, 12)]
    assert delays == [
        60.0,
        120.0,
        240.0,
        480.0,
        960.0,
        1920.0,
        3840.0,
        7680.0,
        15360.0,
        RETRY_MAX_S,
        RETRY_MAX_S,
    ]
    assert RETRY_FIRST_S == 60.0
    assert RETRY_MAX_S == 6 * 3600.0


@pytest.mark.parametrize("failures", [33, 34, 1000, 10**9])
def test_the_back_off_stays_at_its_cap_however_many_failures(failures: int) -> None:
    assert retry_delay(failures) == RETRY_MAX_S
