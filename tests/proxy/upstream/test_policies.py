"""Balance policies without sockets: endpoints are EndpointState objects over fake pools
(a pool here only needs a label), requests are built in memory."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import pytest
from multidict import CIMultiDict

from proxy.config.upstream_model import BalanceConfig
from proxy.core.body import Body
from proxy.core.models import Request, Response
from proxy.upstream.balancer import EndpointPool, EndpointState
from proxy.upstream.hashing import cookie_value, stable_hash
from proxy.upstream.policies import (
    ConsistentHash,
    LeastRequest,
    RoundRobin,
    Sticky,
    WeightedRandom,
    make_policy,
)

PICKS = 10_000


@dataclass
class FakePool:
    label: str


def endpoints(*weights: int, first: int = 1) -> list[EndpointState]:
    """Endpoints 10.0.0.N:80 (N from `first`) with these weights."""
    return [
        EndpointState(index, cast(EndpointPool, FakePool(f"10.0.0.{first + index}:80")), weight)
        for index, weight in enumerate(weights)
    ]


def request(
    path: str = "/",
    headers: Sequence[tuple[str, str]] = (),
    client: str = "192.0.2.7",
    *,
    scheme: str = "http",
) -> Request:
    raw = [(name.encode(), value.encode()) for name, value in headers]
    return Request(
        "GET",
        path.encode(),
        raw,
        Body.from_bytes(b""),
        client=(client, 40000),
        host="",
        scheme=scheme,
    )


def shares(counts: Counter[str], states: Sequence[EndpointState]) -> list[float]:
    total = sum(counts.values())
    return [counts[state.label] / total for state in states]


def assert_shares_match_weights(
    counts: Counter[str], states: Sequence[EndpointState], tolerance: float
) -> None:
    total_weight = sum(state.weight for state in states)
    expected = [state.weight / total_weight for state in states]
    got = shares(counts, states)
    for want, have in zip(expected, got, strict=True):
        assert abs(have - want) <= tolerance, (expected, got)


def test_make_policy_builds_the_configured_policy() -> None:
    states = endpoints(1, 1)
    built = {
        "round_robin": make_policy(BalanceConfig(), states),
        "least_request": make_policy(BalanceConfig(policy="least_request"), states),
        "random": make_policy(BalanceConfig(policy="random"), states),
        "hash": make_policy(BalanceConfig(policy="hash", hash_on="path"), states),
        "sticky": make_policy(BalanceConfig(policy="sticky"), states),
    }
    assert isinstance(built["round_robin"], RoundRobin)
    assert isinstance(built["least_request"], LeastRequest)
    assert isinstance(built["random"], WeightedRandom)
    assert isinstance(built["hash"], ConsistentHash)
    assert isinstance(built["sticky"], Sticky)
    with pytest.raises(ValueError, match="unknown balance policy"):
        make_policy(BalanceConfig(policy="fastest"), states)
    with pytest.raises(ValueError, match="hash on"):
        make_policy(BalanceConfig(policy="hash", hash_on="header"), states)


# round_robin and random


def test_round_robin_distribution_matches_weights() -> None:
    states = endpoints(1, 2, 3)
    policy = RoundRobin(states)
    counts = Counter(policy.choose(states, None).label for _ in range(PICKS))
    assert_shares_match_weights(counts, states, tolerance=0.001)


@pytest.mark.parametrize("weights", [(1, 2, 3), (1, 1, 1, 1), (5, 1)])
def test_random_distribution_matches_weights(weights: tuple[int, ...]) -> None:
    states = endpoints(*weights)
    policy = WeightedRandom(states, random.Random(1))
    counts = Counter(policy.choose(states, None).label for _ in range(PICKS))
    assert_shares_match_weights(counts, states, tolerance=0.02)


def test_random_over_a_subset_keeps_the_proportions_of_those_left() -> None:
    states = endpoints(1, 2, 3, 4)
    policy = WeightedRandom(states, random.Random(2))
    subset = [states[0], states[2], states[3]]
    counts = Counter(policy.choose(subset, None).label for _ in range(PICKS))
    assert counts[states[1].label] == 0
    assert_shares_match_weights(counts, subset, tolerance=0.02)


# least_request


@pytest.mark.parametrize("weights", [(1, 2, 3), (1, 1, 1), (3, 1)])
def test_least_request_with_equal_load_follows_the_weights(weights: tuple[int, ...]) -> None:
    states = endpoints(*weights)
    for state in states:
        state.in_flight = 4 * state.weight  # equal load per unit of weight: every pair ties
    policy = LeastRequest(states, random.Random(3))
    counts = Counter(policy.choose(states, None).label for _ in range(PICKS))
    assert_shares_match_weights(counts, states, tolerance=0.02)


def test_least_request_over_a_subset_follows_the_weights_of_those_left() -> None:
    states = endpoints(1, 2, 3, 4)
    policy = LeastRequest(states, random.Random(4))
    subset = [states[1], states[2], states[3]]
    counts = Counter(policy.choose(subset, None).label for _ in range(PICKS))
    assert counts[states[0].label] == 0
    assert_shares_match_weights(counts, subset, tolerance=0.02)


def test_least_request_prefers_the_less_loaded() -> None:
    states = endpoints(1, 1, 1)
    states[0].in_flight, states[1].in_flight, states[2].in_flight = 0, 3, 6
    policy = LeastRequest(states, random.Random(5))
    counts = Counter(policy.choose(states, None).label for _ in range(PICKS))
    # The busiest never wins a pair; the idlest wins every pair it is in (2 of 3 pairs).
    assert counts[states[2].label] == 0
    assert abs(counts[states[0].label] / PICKS - 2 / 3) < 0.02


def test_least_request_of_two_always_takes_the_less_loaded_even_against_weight() -> None:
    states = endpoints(1, 1000)
    states[1].in_flight = 1  # 1/1000 per unit of weight, more than 0/1: the light one wins
    policy = LeastRequest(states, random.Random(6))
    assert {policy.choose(states, None).label for _ in range(1000)} == {states[0].label}
    states[0].in_flight = 1  # now 1/1 against 1/1000: the heavy one
    assert {policy.choose(states, None).label for _ in range(1000)} == {states[1].label}


def test_least_request_with_equal_weights_compares_requests_in_flight() -> None:
    states = endpoints(2, 2)
    states[0].in_flight = 2
    policy = LeastRequest(states, random.Random(7))
    assert {policy.choose(states, None).label for _ in range(200)} == {states[1].label}


def test_least_request_with_one_candidate_takes_it() -> None:
    states = endpoints(1, 2, 3)
    states[1].in_flight = 99
    policy = LeastRequest(states)
    assert policy.choose([states[1]], None) is states[1]


# hash: the ring


def hash_policy(
    states: Sequence[EndpointState], hash_on: str = "path", hash_key: str | None = None
) -> ConsistentHash:
    return ConsistentHash(BalanceConfig(policy="hash", hash_on=hash_on, hash_key=hash_key), states)


def owners(policy: ConsistentHash, keys: Sequence[str]) -> list[str]:
    return [policy.choose_key(key).label for key in keys]


KEYS = [f"user-{n}" for n in range(10_000)]


def test_hash_sends_the_same_key_to_the_same_endpoint_in_every_instance() -> None:
    states = endpoints(1, 1, 1)
    first, second = hash_policy(states, hash_on="path"), hash_policy(endpoints(1, 1, 1))
    picks = owners(first, KEYS[:1000])
    assert owners(first, KEYS[:1000]) == picks
    assert owners(second, KEYS[:1000]) == picks  # another worker: same ring
    # Pinned: the ring does not depend on the process (no salted hash()).
    assert stable_hash("alice") == 5614559425216174729
    assert owners(first, ["alice", "bob", "carol", "dave"]) == [
        "10.0.0.2:80",
        "10.0.0.3:80",
        "10.0.0.3:80",
        "10.0.0.3:80",
    ]


def test_hash_spreads_keys_by_weight() -> None:
    states = endpoints(1, 2, 3)
    counts = Counter(owners(hash_policy(states), KEYS))
    assert_shares_match_weights(counts, states, tolerance=0.04)


@pytest.mark.parametrize("count", [2, 3, 5, 8])
def test_hash_adding_an_endpoint_moves_few_keys_and_only_to_it(count: int) -> None:
    before = owners(hash_policy(endpoints(*[1] * count)), KEYS)
    grown = endpoints(*[1] * (count + 1))
    after = owners(hash_policy(grown), KEYS)
    moved = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    assert {new for _, new in moved} == {grown[-1].label}
    assert len(moved) / len(KEYS) <= 1.5 / count
    assert len(moved) / len(KEYS) == pytest.approx(1 / (count + 1), abs=0.05)


def test_hash_removing_an_endpoint_moves_only_its_keys() -> None:
    states = endpoints(1, 1, 1, 1)
    before = owners(hash_policy(states), KEYS)
    # The third leaves: the others are renumbered, and keep their keys.
    remaining = [EndpointState(i, s.pool, s.weight) for i, s in enumerate(states[:2] + states[3:])]
    after = owners(hash_policy(remaining), KEYS)
    moved = [old for old, new in zip(before, after, strict=True) if old != new]
    assert set(moved) == {states[2].label}
    assert len(moved) == before.count(states[2].label)


def test_hash_over_a_subset_walks_on_to_the_next_candidate() -> None:
    states = endpoints(1, 2, 1, 1)
    policy = hash_policy(states)
    full = owners(policy, KEYS)
    subset = [states[0], states[1], states[3]]
    walked = [policy.choose_key(key, subset).label for key in KEYS]
    # Keys of the endpoints left stay; those of the one out go where a ring without it
    # would send them.
    for old, new in zip(full, walked, strict=True):
        assert new == old or old == states[2].label
    assert states[2].label not in walked
    without = hash_policy([EndpointState(i, s.pool, s.weight) for i, s in enumerate(subset)])
    assert walked == owners(without, KEYS)


def test_hash_ring_rejects_candidates_of_another_upstream() -> None:
    policy = hash_policy(endpoints(1, 1))
    with pytest.raises(LookupError):
        policy.choose_key("k", [EndpointState(7, cast(EndpointPool, FakePool("x:1")), 1)])


def test_hash_ring_of_large_weights_stays_bounded_and_proportional() -> None:
    states = endpoints(1000, 3000, 7)
    policy = hash_policy(states)
    assert "points=" in repr(policy)
    assert len(policy.ring) <= 40_000
    assert_shares_match_weights(Counter(owners(policy, KEYS)), states, tolerance=0.03)
    # Weights with a common factor are the same ring as the reduced ones.
    assert owners(hash_policy(endpoints(10, 20)), KEYS[:500]) == owners(
        hash_policy(endpoints(1, 2)), KEYS[:500]
    )


# hash: the key


def test_hash_on_a_header_keeps_each_value_on_one_endpoint() -> None:
    states = endpoints(1, 1, 1)
    policy = hash_policy(states, hash_on="header", hash_key="x-user")
    for user in ["alice", "bob", "carol", "dave", "eve"]:
        picked = {
            policy.choose(states, request(f"/{n}", [("X-User", user)])).label for n in range(20)
        }
        assert picked == {policy.choose_key(user).label}


def test_hash_on_a_cookie_the_path_and_the_client_ip() -> None:
    states = endpoints(1, 1, 1, 1)
    by_cookie = hash_policy(states, hash_on="cookie", hash_key="session")
    by_path = hash_policy(states, hash_on="path")
    by_ip = hash_policy(states, hash_on="ip")
    for n in range(50):
        cookie = [("Cookie", f"theme=dark; session=s{n}; x=1")]
        assert by_cookie.choose(states, request("/a", cookie)) is by_cookie.choose_key(f"s{n}")
        assert by_path.choose(states, request(f"/p/{n}?q=1")) is by_path.choose_key(f"/p/{n}")
        ip = f"198.51.100.{n}"
        assert by_ip.choose(states, request(client=ip)) is by_ip.choose_key(ip)


def test_hash_without_the_key_falls_back_to_round_robin() -> None:
    states = endpoints(1, 1, 1)
    by_header = hash_policy(states, hash_on="header", hash_key="x-user")
    picks = [by_header.choose(states, request()).label for _ in range(6)]
    assert picks == [state.label for state in states] * 2
    by_cookie = hash_policy(states, hash_on="cookie", hash_key="session")
    no_session = request(headers=[("Cookie", "sessionx=1; other=2")])
    assert [by_cookie.choose(states, no_session).label for _ in range(3)] == [
        state.label for state in states
    ]
    by_ip = hash_policy(states, hash_on="ip")
    assert [by_ip.choose(states, request(client="")).label for _ in range(3)] == [
        state.label for state in states
    ]
    assert [by_ip.choose(states, None).label for _ in range(3)] == [s.label for s in states]


# sticky


def sticky(states: Sequence[EndpointState], ttl: float | None = None) -> Sticky:
    return Sticky(BalanceConfig(policy="sticky", cookie="sid", cookie_ttl=ttl), states)


def set_cookies(response: Response) -> list[str]:
    return response.headers.getall("set-cookie", [])


def test_sticky_sets_a_cookie_naming_the_endpoint_opaquely() -> None:
    states = endpoints(1, 1, 1)
    policy = sticky(states, ttl=3600)
    first = request()
    chosen = policy.choose(states, first)
    assert chosen is states[0]  # no cookie: round robin
    response = Response(200, [(b"set-cookie", b"app=1")])
    policy.on_response(first, response, chosen)
    app, ours = set_cookies(response)
    assert app == "app=1"  # the upstream's own cookie is kept
    name_value, *attributes = ours.split("; ")
    name, value = name_value.split("=")
    assert name == "sid"
    assert len(value) == 16
    assert set(value) <= set("0123456789abcdef")
    assert "10.0.0" not in ours
    assert attributes == ["Path=/", "HttpOnly", "SameSite=Lax", "Max-Age=3600"]
    # Later requests carrying it go to that endpoint, and get no new cookie.
    for _ in range(10):
        again = request(headers=[("Cookie", f"a=b; sid={value}")])
        assert policy.choose(states, again) is chosen
        response = Response(200, CIMultiDict())
        policy.on_response(again, response, chosen)
        assert set_cookies(response) == []


def test_sticky_tokens_differ_per_endpoint_and_agree_between_instances() -> None:
    states = endpoints(1, 1, 1)
    tokens = []
    for state in states:
        response = Response(200)
        sticky(states).on_response(request(), response, state)
        tokens.append(set_cookies(response)[0])
    assert len(set(tokens)) == 3
    response = Response(200)
    sticky(endpoints(1, 1, 1)).on_response(request(), response, states[1])
    assert set_cookies(response) == [tokens[1]]
    assert tokens[0].endswith("; Path=/; HttpOnly; SameSite=Lax")  # session cookie


def test_sticky_over_tls_marks_the_cookie_secure() -> None:
    states = endpoints(1, 1)
    response = Response(200)
    sticky(states).on_response(request(scheme="https"), response, states[0])
    assert set_cookies(response)[0].endswith("; Secure")


def test_sticky_endpoint_out_of_rotation_falls_back_and_resets_the_cookie() -> None:
    states = endpoints(1, 1, 1)
    policy = sticky(states)
    response = Response(200)
    policy.on_response(request(), response, states[1])
    cookie = set_cookies(response)[0].split(";")[0]
    pinned = request(headers=[("Cookie", cookie)])
    assert policy.choose(states, pinned) is states[1]
    subset = [states[0], states[2]]
    fallback = {policy.choose(subset, pinned).label for _ in range(4)}
    assert fallback == {states[0].label, states[2].label}  # round robin among the others
    response = Response(200)
    policy.on_response(pinned, response, states[2])
    new_cookie = set_cookies(response)[0].split(";")[0]
    assert new_cookie != cookie
    assert policy.choose(subset, request(headers=[("Cookie", new_cookie)])) is states[2]
    # While its endpoint is a candidate, the old cookie still wins over round robin.
    assert policy.choose([states[1], states[2]], pinned) is states[1]


def test_sticky_ignores_an_unknown_or_missing_token() -> None:
    states = endpoints(1, 1)
    policy = sticky(states)
    forged = request(headers=[("Cookie", "sid=10.0.0.2:80")])
    assert [policy.choose(states, forged).label for _ in range(4)] == [s.label for s in states * 2]
    assert policy.choose(states, None) is states[0]
    response = Response(200)
    policy.on_response(forged, response, states[1])
    assert len(set_cookies(response)) == 1


# reading cookies


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ([("Cookie", "sid=abc")], "abc"),
        ([("Cookie", "a=1;sid=abc ;b=2")], "abc"),
        ([("Cookie", 'sid="abc"')], "abc"),
        ([("Cookie", "xsid=1; sidx=2; sid=3")], "3"),
        ([("Cookie", "a=1"), ("Cookie", "sid=two")], "two"),  # HTTP/2 splits cookies
        ([("Cookie", "sid=first; sid=second")], "first"),
        ([("Cookie", "sid=")], ""),
        ([("Cookie", "sid"), ("X-Sid", "sid=no")], None),
        ([], None),
    ],
)
def test_cookie_value_is_read_from_raw_and_parsed_headers(
    fields: list[tuple[str, str]], expected: str | None
) -> None:
    raw = request(headers=fields)
    assert raw.raw_headers is not None
    assert cookie_value(raw, "sid") == expected
    parsed = request(headers=fields)
    _ = parsed.headers  # converts to a CIMultiDict
    assert parsed.raw_headers is None
    assert cookie_value(parsed, "sid") == expected


def test_only_sticky_touches_the_response() -> None:
    states = endpoints(1, 2)
    for config in [
        BalanceConfig(),
        BalanceConfig(policy="least_request"),
        BalanceConfig(policy="random"),
        BalanceConfig(policy="hash", hash_on="ip"),
    ]:
        response = Response(200, [(b"set-cookie", b"app=1")])
        make_policy(config, states).on_response(request(), response, states[1])
        assert response.raw_headers == [(b"set-cookie", b"app=1")]
    assert repr(sticky(states)) == "<Sticky cookie=sid endpoints=2>"
    assert repr(hash_policy(states)) == "<ConsistentHash <HashRing endpoints=2 points=480>>"
