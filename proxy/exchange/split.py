"""A weighted split (`upstream: {split: [...]}`, docs/traffic.md): which side of a split
route a request goes to.

Each side is a compiled route of its own (proxy/exchange/runtime.py: `RouteRuntime`,
with its own forwarder, so each side's upstream keeps its pools, retries and breaker,
and the same middleware instances), and the dispatcher hands the request to the side
`Split.choose` names before choosing the mode of the exchange; a route without a split
pays one None check.

- Without `sticky`, the sides take turns by smooth weighted round robin (as nginx
  balances): over any run of `sum(weights)` requests each side gets exactly its weight,
  spread out rather than in bursts. Each worker keeps its own turn.
- With `sticky: {cookie: NAME}` or `{header: NAME}`, a request that carries the value
  goes to the side its hash (BLAKE2b, the same in every worker, gateway and restart:
  proxy/upstream/hashing.py) falls on when the hash space is cut in proportion to the
  weights, so a user stays on one side. Changing the weights moves only the users whose
  hash lies between an old cut and its new place. A request without the value takes its
  turn as above; no cookie is set (the value is the application's, e.g. its session
  cookie, or a header a service in front sets).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate
from typing import TYPE_CHECKING

from metrics.traffic import count_split, split_series
from proxy.config.model import SplitConfig
from proxy.core.models import Request
from proxy.upstream.hashing import cookie_value, stable_hash

if TYPE_CHECKING:
    from proxy.exchange.runtime import RouteRuntime

_HASH_SPACE = 1 << 64  # stable_hash's


class Split:
    """Chooses the side of one split route for each request."""

    __slots__ = (
        "_bounds",
        "_cookie",
        "_current",
        "_header",
        "_series",
        "_total",
        "_weights",
        "sides",
    )

    def __init__(self, route: str, config: SplitConfig, sides: Sequence[RouteRuntime]) -> None:
        self.sides = tuple(sides)  # in the order of config.sides
        self._weights = [side.weight for side in config.sides]
        self._total = sum(self._weights)
        self._current = [0] * len(self._weights)  # smooth weighted round robin's state
        # Where each side's share of the hash space ends (sticky choices).
        self._bounds = [_HASH_SPACE * end // self._total for end in accumulate(self._weights)][:-1]
        self._cookie = config.sticky_cookie
        self._header = config.sticky_header
        self._series = [split_series(route, side.upstream) for side in config.sides]

    def __repr__(self) -> str:
        shares = ", ".join(
            f"{side.forwarder.upstream.name if side.forwarder else '?'}={weight}"
            for side, weight in zip(self.sides, self._weights, strict=True)
        )
        return f"<Split {shares}>"

    def choose(self, request: Request) -> RouteRuntime:
        """The side `request` goes to (counted in gatehouse_split_requests_total)."""
        index = -1
        key = self._sticky_key(request)
        if key is not None:
            index = self.side_of(key)
        if index < 0:
            index = self._next_turn()
        count_split(self._series[index])
        return self.sides[index]

    def side_of(self, key: str) -> int:
        """The side a sticky `key` belongs to, the same wherever it is computed."""
        return bisect_right(self._bounds, stable_hash(key))

    def _sticky_key(self, request: Request) -> str | None:
        if self._cookie is not None:
            return cookie_value(request, self._cookie) or None
        if self._header is not None:
            return request.header(self._header) or None
        return None

    def _next_turn(self) -> int:
        """Smooth weighted round robin: every side gains its weight, the one ahead is
        chosen and gives back the total. A side of weight 0 is never chosen."""
        current = self._current
        best = 0
        for index, weight in enumerate(self._weights):
            current[index] += weight
            if current[index] > current[best]:
                best = index
        current[best] -= self._total
        return best
