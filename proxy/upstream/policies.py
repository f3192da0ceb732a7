"""Balance policies: which of the candidate endpoints a request goes to.

A policy is built once per upstream at config load (`make_policy`) and asked
`choose(candidates, request)` for every request: `candidates` are the endpoints in
rotation (or, in panic mode, all of them) minus those a retry already tried, in the
upstream's order; `request` is None for callers with no request (health-independent
picks). Policies keep their own state between calls (round robin's counters).

Each policy precomputes what it can for the full set of endpoints (the common case:
all in rotation, no retry) and works the rest out only for a subset.
"""

from __future__ import annotations

import random
from bisect import bisect
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import TYPE_CHECKING, Protocol

from proxy.config.upstream_model import BalanceConfig
from proxy.upstream.hashing import (
    HashRing,
    cookie_value,
    endpoint_names,
    stable_hash,
    sticky_token,
)

if TYPE_CHECKING:
    from proxy.core.models import Request, Response
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


class _ByWeight:
    """What the random policies share: the weights of the full set, summed once."""

    __slots__ = ("_count", "_cumulative", "_random", "_total", "_uniform")

    def __init__(
        self, endpoints: Sequence[EndpointState], rng: random.Random | None = None
    ) -> None:
        weights = [endpoint.weight for endpoint in endpoints]
        self._count = len(weights)
        self._uniform = len(set(weights)) == 1
        self._cumulative = list(accumulate(weights))
        self._total = sum(weights)
        self._random = (rng or random.Random()).random


class LeastRequest(_ByWeight):
    """Power of two choices: two distinct candidates drawn at random (each with
    probability by weight), and the less loaded of the two wins: fewer requests in flight
    per unit of weight (plain fewer requests in flight when the weights are equal). On a
    tie the first drawn wins, so with equal load the picks follow the weights exactly.
    One candidate is simply chosen."""

    __slots__ = ()

    def choose(self, candidates: Sequence[EndpointState], request: Request | None) -> EndpointState:
        count = len(candidates)
        if count == 1:
            return candidates[0]
        rand = self._random
        if self._uniform:
            first = int(rand() * count)
            second = int(rand() * (count - 1))
            if second >= first:
                second += 1
            a, b = candidates[first], candidates[second]
            return b if b.in_flight < a.in_flight else a
        if count == self._count:
            cumulative, total = self._cumulative, self._total
        else:
            cumulative = list(accumulate(endpoint.weight for endpoint in candidates))
            total = cumulative[-1]
        first = bisect(cumulative, rand() * total)
        a = candidates[first]
        # The second from the weight line without the first's stretch: uniform over the
        # others' weights, and never the first again.
        point = rand() * (total - a.weight)
        if point >= cumulative[first] - a.weight:
            point += a.weight
        second = min(bisect(cumulative, point), count - 1)
        if second == first:  # only by float rounding at the stretch's edge
            second = first + 1 if first + 1 < count else first - 1
        b = candidates[second]
        # b.in_flight / b.weight < a.in_flight / a.weight, without division.
        return b if b.in_flight * a.weight < a.in_flight * b.weight else a

    def on_response(self, request: Request, response: Response, chosen: EndpointState) -> None:
        pass


class WeightedRandom(_ByWeight):
    """Each request to a candidate drawn at random with probability by weight: a bisect
    over the cumulative weights (precomputed for the full set, summed for a subset)."""

    __slots__ = ()

    def choose(self, candidates: Sequence[EndpointState], request: Request | None) -> EndpointState:
        count = len(candidates)
        if self._uniform:
            return candidates[int(self._random() * count)]
        if count == self._count:
            return candidates[bisect(self._cumulative, self._random() * self._total)]
        cumulative = list(accumulate(endpoint.weight for endpoint in candidates))
        return candidates[bisect(cumulative, self._random() * cumulative[-1])]

    def on_response(self, request: Request, response: Response, chosen: EndpointState) -> None:
        pass


def _client_ip(request: Request) -> str | None:
    return request.client[0] or None


def _path(request: Request) -> str | None:
    return request.path


def _key_reader(config: BalanceConfig) -> Callable[[Request], str | None]:
    """What `hash` hashes, read from a request (None: the request lacks it)."""
    on, name = config.hash_on, config.hash_key
    if on == "ip":
        return _client_ip
    if on == "path":
        return _path
    if on == "header" and name:
        header = name
        return lambda request: request.header(header)
    if on == "cookie" and name:
        cookie = name
        return lambda request: cookie_value(request, cookie)
    raise ValueError(f"hash on {on!r} with key {name!r}")  # the config loader prevents it


class ConsistentHash:
    """Consistent hashing of a key from the request (a header, a cookie, the client's
    IP or the path) on a weighted ring (`hashing.HashRing`): the same key goes to the
    same endpoint while that endpoint is a candidate; when it is not, the key goes to the
    next endpoint clockwise, and the other keys stay put. Adding an endpoint moves about
    1/N of the keys. A request without the key (or with no request) is round-robined."""

    __slots__ = ("_endpoints", "_fallback", "_key", "_ring")

    def __init__(self, config: BalanceConfig, endpoints: Sequence[EndpointState]) -> None:
        self._endpoints = list(endpoints)
        self._key = _key_reader(config)
        self._ring = HashRing(endpoints)
        self._fallback = RoundRobin(endpoints)

    def __repr__(self) -> str:
        return f"<ConsistentHash {self._ring!r}>"

    def choose(self, candidates: Sequence[EndpointState], request: Request | None) -> EndpointState:
        key = self._key(request) if request is not None else None
        if key is None:
            return self._fallback.choose(candidates, request)
        return self._ring.find(stable_hash(key), candidates)

    def on_response(self, request: Request, response: Response, chosen: EndpointState) -> None:
        pass

    @property
    def ring(self) -> HashRing:
        """The ring (built at construction)."""
        return self._ring

    def choose_key(
        self, key: str, candidates: Sequence[EndpointState] | None = None
    ) -> EndpointState:
        """The endpoint `key` maps to among `candidates` (default: every endpoint)."""
        return self._ring.find(
            stable_hash(key), self._endpoints if candidates is None else candidates
        )


class Sticky:
    """Cookie affinity: a request whose cookie names a candidate endpoint goes there;
    any other is round-robined, and its response sets the cookie to the endpoint that
    answered (only when the request did not already carry that value). The value is an
    opaque token (a short hash of the endpoint's host:port), the same in every worker.
    The cookie is `Path=/; HttpOnly; SameSite=Lax`, with `Max-Age` when a ttl is
    configured, and `Secure` when the client came over TLS."""

    __slots__ = ("_by_token", "_cookie", "_count", "_fallback", "_set_cookie", "_tokens")

    def __init__(self, config: BalanceConfig, endpoints: Sequence[EndpointState]) -> None:
        self._cookie = config.cookie
        self._count = len(endpoints)
        self._fallback = RoundRobin(endpoints)
        tokens = [sticky_token(name) for name in endpoint_names(endpoints)]
        self._tokens = {
            endpoint.index: token for endpoint, token in zip(endpoints, tokens, strict=True)
        }
        self._by_token = {
            token: endpoint for endpoint, token in zip(endpoints, tokens, strict=True)
        }
        attributes = "; Path=/; HttpOnly; SameSite=Lax"
        if config.cookie_ttl is not None:
            attributes += f"; Max-Age={max(0, round(config.cookie_ttl))}"
        # Set-Cookie values per endpoint index: (plain, over TLS).
        self._set_cookie = {
            index: (
                f"{config.cookie}={token}{attributes}",
                f"{config.cookie}={token}{attributes}; Secure",
            )
            for index, token in self._tokens.items()
        }

    def __repr__(self) -> str:
        return f"<Sticky cookie={self._cookie} endpoints={self._count}>"

    def choose(self, candidates: Sequence[EndpointState], request: Request | None) -> EndpointState:
        if request is not None:
            token = cookie_value(request, self._cookie)
            if token is not None:
                endpoint = self._by_token.get(token)
                if endpoint is not None and (
                    len(candidates) == self._count or endpoint in candidates
                ):
                    return endpoint
        return self._fallback.choose(candidates, request)

    def on_response(self, request: Request, response: Response, chosen: EndpointState) -> None:
        if cookie_value(request, self._cookie) == self._tokens[chosen.index]:
            return
        plain, secure = self._set_cookie[chosen.index]
        response.add_header("Set-Cookie", secure if request.scheme == "https" else plain)


def make_policy(config: BalanceConfig, endpoints: Sequence[EndpointState]) -> Policy:
    """The policy `config` names, for these endpoints.

    Raises:
        ValueError: an unknown policy (the config loader accepts only known ones).
    """
    policy = config.policy
    if policy == "round_robin":
        return RoundRobin(endpoints)
    if policy == "least_request":
        return LeastRequest(endpoints)
    if policy == "random":
        return WeightedRandom(endpoints)
    if policy == "hash":
        return ConsistentHash(config, endpoints)
    if policy == "sticky":
        return Sticky(config, endpoints)
    raise ValueError(f"unknown balance policy {policy!r}")
