"""What every rate-limit backend shares: the GCRA decision and its result.

GCRA (the generic cell rate algorithm) keeps one number per key, the theoretical arrival
time `tat`. With `emission_s` = period / rate (the spacing of requests at the allowed rate)
and `tolerance_s` = emission_s * burst (how far ahead of that spacing a client may run),
a request at `now` is allowed when `tat - now <= tolerance_s`, and then moves
`tat = max(tat, now) + emission_s`. It is exact, needs no timer, and a key whose `tat` is
in the past is the same as a fresh one, so idle keys can simply be forgotten.

Backends (the local shared table, Redis) store `tat` and run `gcra` atomically per key.
"""

from __future__ import annotations

import math

# Decisions are made to within a microsecond (see gcra); the Redis script does the same.
SLACK_S = 1e-6


class RateLimitBackendError(Exception):
    """The backend could not decide (Redis down or too slow); `on_redis_error` decides."""


_DECISION_FIELDS = ("allowed", "limit", "remaining", "reset_after_s", "retry_after_s")


class Decision:
    """One rate-limit decision, with what the RateLimit-* headers report. A value: compared
    field by field, never changed once made. (A plain class rather than a dataclass: the
    compiled build compiles its __init__, where a dataclass's stays interpreted, and one
    is made per request.)"""

    __slots__ = _DECISION_FIELDS

    def __init__(
        self,
        allowed: bool,
        limit: int,  # requests allowed in a burst: burst + 1
        remaining: int,  # requests that would still be allowed right now
        reset_after_s: float,  # until the bucket is full again (RateLimit-Reset)
        retry_after_s: float,  # until the next request would be allowed (0 when allowed)
    ) -> None:
        self.allowed = allowed
        self.limit = limit
        self.remaining = remaining
        self.reset_after_s = reset_after_s
        self.retry_after_s = retry_after_s

    def _fields(self) -> tuple[bool, int, int, float, float]:
        return (self.allowed, self.limit, self.remaining, self.reset_after_s, self.retry_after_s)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Decision) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        values = zip(_DECISION_FIELDS, self._fields(), strict=True)
        return "Decision({})".format(", ".join(f"{name}={value!r}" for name, value in values))


def whole_seconds(seconds: float) -> int:
    """`seconds` rounded up to whole seconds, as RateLimit-Reset and Retry-After give
    them, to within SLACK_S: a time worked out as `(now + 60) - now` lands a hair above
    60 when the sum crosses a power of two (a monotonic clock near 2048 s, 4096 s, ...),
    and a plain ceil() would tell a client 61 where its reset is 60 s away."""
    return math.ceil(seconds - SLACK_S)


def gcra(tat: float, now: float, emission_s: float, tolerance_s: float) -> tuple[Decision, float]:
    """Decide a request at `now` for a key whose theoretical arrival time is `tat` (0 for
    a new key); the decision and the new `tat` to store (unchanged when denied)."""
    limit = round(tolerance_s / emission_s) + 1
    base = max(tat, now)
    new_tat = base + emission_s
    allow_at = new_tat - tolerance_s - emission_s
    # SLACK_S absorbs float rounding: a sum of tenths lands a hair past `now`, which would
    # refuse the last request of a burst that is exactly within its budget.
    if now + SLACK_S < allow_at:
        remaining = 0
        reset_after = base - now
        return Decision(False, limit, remaining, reset_after, allow_at - now), tat
    spare = (now + SLACK_S - allow_at) / emission_s
    remaining = max(0, math.floor(spare))
    remaining = min(remaining, limit - 1)
    return Decision(True, limit, remaining, new_tat - now, 0.0), new_tat
