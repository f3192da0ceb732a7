"""When a name's certificate is ordered: the renewal time of a certificate, and the back-off
after a failed order. Pure functions of times (Unix seconds), so the schedule is tested
without waiting.

- **Renewal.** A certificate is renewed `renew_before` its expiry (30 days by default, as
  certbot and Caddy do for Let's Encrypt's 90-day certificates), but never earlier than
  when a third of its lifetime is left: a CA that issues shorter certificates (six days,
  say) would otherwise make every new certificate due the moment it arrived, and the
  gateway would order in a loop.
- **Back-off.** After the n-th failure in a row, the next try is `RETRY_FIRST_S * 2**(n-1)`
  later, at most `RETRY_MAX_S`: 1, 2, 4, ... 256 minutes, then every 6 hours. Let's
  Encrypt allows 5 failed validations per name and hour; this stays well below. A
  success forgets the failures; so does a restart (the first try is then at once).
"""

from __future__ import annotations

RETRY_FIRST_S = 60.0
RETRY_MAX_S = 6 * 3600.0
# A certificate is never renewed earlier than when this share of its lifetime is left.
MAX_RENEWAL_SHARE = 1 / 3


def renewal_time(not_before: float, not_after: float, renew_before: float) -> float:
    """When a certificate valid from `not_before` to `not_after` is due for renewal."""
    lifetime = max(0.0, not_after - not_before)
    return not_after - min(renew_before, lifetime * MAX_RENEWAL_SHARE)


def retry_delay(failures: int) -> float:
    """How long to wait after `failures` failed orders in a row (at least 1)."""
    exponent = max(0, failures - 1)
    if exponent > 32:  # far past the cap; keeps the float small
        return RETRY_MAX_S
    return float(min(RETRY_MAX_S, RETRY_FIRST_S * 2**exponent))
