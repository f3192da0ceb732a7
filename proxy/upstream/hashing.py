"""Stable hashing for the balance policies: the consistent-hash ring (`hash`), the
endpoint tokens of sticky cookies, and reading a cookie from a request.

Every hash here is BLAKE2b, never Python's `hash()`: that one is salted per process, and
all workers (and a restarted gateway) must send a key to the same endpoint and read the
same sticky cookie.
"""

from __future__ import annotations

from bisect import bisect
from collections.abc import Sequence
from hashlib import blake2b
from math import gcd
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.core.models import Request
    from proxy.upstream.balancer import EndpointState

# Points on the ring per unit of weight. With 160 the share of keys an endpoint owns
# stays within a few percent of its weight's share (Ketama uses 160 too).
RING_POINTS_PER_WEIGHT = 160
# Upper bound on the ring's size: large weights get fewer points per unit (never fewer
# than one), so building the ring at config load stays cheap.
MAX_RING_POINTS = 40_000
STICKY_TOKEN_BYTES = 8


def stable_hash(data: str) -> int:
    """A 64-bit hash of `data` that is the same in every process and on every run."""
    return int.from_bytes(blake2b(data.encode("utf-8", "surrogateescape"), digest_size=8).digest())


def endpoint_names(endpoints: Sequence[EndpointState]) -> list[str]:
    """A name per endpoint for hashing: its label (host:port), which stays the same when
    other endpoints come and go; a label seen before gets `#n` so no two names collide."""
    names: list[str] = []
    seen: dict[str, int] = {}
    for endpoint in endpoints:
        count = seen.get(endpoint.label, 0)
        seen[endpoint.label] = count + 1
        names.append(endpoint.label if count == 0 else f"{endpoint.label}#{count}")
    return names


def sticky_token(name: str) -> str:
    """The opaque cookie value naming an endpoint: a short hash of its name, so the
    cookie does not show the endpoint's address."""
    digest = blake2b(name.encode("utf-8"), digest_size=STICKY_TOKEN_BYTES, person=b"gh-sticky")
    return digest.hexdigest()


class HashRing:
    """A weighted consistent-hash ring: each endpoint owns `weight x points-per-unit`
    points placed by hashing its name, and a key belongs to the first point clockwise of
    the key's hash. Adding an endpoint moves only the keys its new points take (about
    1/N of them); removing one moves only its own keys.

    Built once at config load; a lookup is one bisect (plus, over a subset of the
    endpoints, a walk past the points of those left out)."""

    __slots__ = ("_by_index", "_count", "_hashes", "_owners")

    def __init__(self, endpoints: Sequence[EndpointState]) -> None:
        self._by_index = {endpoint.index: endpoint for endpoint in endpoints}
        self._count = len(endpoints)
        names = endpoint_names(endpoints)
        divisor = 0
        for endpoint in endpoints:
            divisor = gcd(divisor, endpoint.weight)
        units = [endpoint.weight // (divisor or 1) for endpoint in endpoints]
        per_unit = max(1, min(RING_POINTS_PER_WEIGHT, MAX_RING_POINTS // max(1, sum(units))))
        points: list[tuple[int, int]] = []
        for endpoint, name, unit in zip(endpoints, names, units, strict=True):
            points.extend(
                (stable_hash(f"{name}-{point}"), endpoint.index) for point in range(unit * per_unit)
            )
        points.sort()
        self._hashes = [point for point, _ in points]
        self._owners = [owner for _, owner in points]  # endpoint indexes

    def __repr__(self) -> str:
        return f"<HashRing endpoints={self._count} points={len(self._hashes)}>"

    def __len__(self) -> int:
        return len(self._hashes)

    def find(self, key_hash: int, candidates: Sequence[EndpointState]) -> EndpointState:
        """The endpoint owning `key_hash`: the first point clockwise whose endpoint is
        one of `candidates` (all endpoints, or a non-empty subset of them).

        Raises:
            LookupError: no candidate is an endpoint of this ring (a caller's bug).
        """
        hashes = self._hashes
        count = len(hashes)
        position = bisect(hashes, key_hash)
        if position == count:
            position = 0
        owners = self._owners
        if len(candidates) == self._count:
            return self._by_index[owners[position]]
        # A subset (some endpoints out of rotation, or tried by a retry): walk on past
        # the points of those left out, so the keys of the others stay where they were.
        allowed = {endpoint.index for endpoint in candidates}
        for _ in range(count):
            owner = owners[position]
            if owner in allowed:
                return self._by_index[owner]
            position += 1
            if position == count:
                position = 0
        raise LookupError("no candidate is an endpoint of this ring")


def cookie_value(request: Request, name: str) -> str | None:
    """The value of cookie `name` in the request's Cookie fields (RFC 6265 section 5.4:
    `a=1; b=2`; HTTP/2 may split them over several fields, RFC 9113 section 8.2.3), or
    None. The first occurrence wins, as browsers send the most specific cookie first."""
    raw = request.raw_headers
    if raw is not None:
        values = [value.decode("latin-1") for field, value in raw if field.lower() == b"cookie"]
    else:
        values = request.headers.getall("cookie", [])
    for value in values:
        if name not in value:
            continue
        for pair in value.split(";"):
            key, sep, found = pair.partition("=")
            if sep and key.strip() == name:
                found = found.strip()
                if len(found) >= 2 and found[0] == found[-1] == '"':
                    found = found[1:-1]
                return found
    return None
