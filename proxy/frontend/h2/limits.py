"""The HTTP/2 front end's flood counters (see `Http2Config` for the attacks they stop)."""

from __future__ import annotations

from collections.abc import Callable


class RateWindow:
    """Counts events in the current one-second window (a fixed window: cheap, and at most
    twice the limit can pass across a boundary)."""

    __slots__ = ("_count", "_limit", "_now", "_started")

    def __init__(self, limit: int, now: Callable[[], float]) -> None:
        self._limit = limit
        self._now = now
        self._started = now()
        self._count = 0

    def __repr__(self) -> str:
        return f"<RateWindow {self._count}/{self._limit} per second>"

    def exceeded(self) -> bool:
        """Count one event; True when this second's limit is passed."""
        now = self._now()
        if now - self._started >= 1.0:
            self._started = now
            self._count = 0
        self._count += 1
        return self._count > self._limit
