"""Balance policies: which of the candidate endpoints a request goes to.

A policy is built once per upstream at config load (`make_policy`) and asked
`choose(candidates, request)` for every request: `candidates` are the endpoints in
rotation (or, in panic mode, all of them) minus those a retry already tried, in the
upstream's order; `request` is None for callers with no request (health-independent
picks). Policies keep their own state between calls (round robin's counters).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from proxy.config_model import BalanceConfig

if TYPE_CHECKING:
    from proxy.models import Request, Response
    from proxy.upstream.balancer import EndpointState


class Policy(Protocol):
    def choose(self, candidates: Sequence[EndpointState], request: Request | None) -> EndpointState:
        """One of `candidates` (never empty)."""
        ...

    def on_response(self, request: Request, response: Response, chosen: EndpointState) -> None:
        """The upstream answered `request` from `chosen` (sticky sets its cookie here)."""
        ...


class RoundRobin:
    """Smooth weighted round robin (nginx's): weights 5,1,1 give a a b a c a a, not
    a a a a a b c. Over a subset of the endpoints (some out of rotation) the same
    algorithm runs on the subset, so the weights of those left keep their proportions."""

    __slots__ = ("_current", "_next", "_total", "_uniform")

    def __init__(self, endpoints: Sequence[EndpointState]) -> None:
        weights = [endpoint.weight for endpoint in endpoints]
        self._uniform = len(set(weights)) == 1
        self._total = sum(weights)
        self._current = [0] * len(weights)
        self._next = 0

    def choose(self, candidates: Sequence[EndpointState], request: Request | None) -> EndpointState:
        count = len(self._current)
        if len(candidates) == count:
            if self._uniform:
                index = self._next
                self._next = (index + 1) % count
                return candidates[index]
            return candidates[self._smooth(candidates, self._total)]
        total = sum(endpoint.weight for endpoint in candidates)
        return candidates[self._smooth(candidates, total)]

    def on_response(self, request: Request, response: Response, chosen: EndpointState) -> None:
        pass

    def _smooth(self, candidates: Sequence[EndpointState], total: int) -> int:
        current = self._current
        best = 0
        best_weight = None
        for position, endpoint in enumerate(candidates):
            current[endpoint.index] += endpoint.weight
            if best_weight is None or current[endpoint.index] > best_weight:
                best, best_weight = position, current[endpoint.index]
        current[candidates[best].index] -= total
        return best


def make_policy(config: BalanceConfig, endpoints: Sequence[EndpointState]) -> Policy:
    """The policy `config` names, for these endpoints."""
    return RoundRobin(endpoints)
