"""Which side of a weighted split a request goes to (proxy/exchange/split.py): smooth
weighted round robin, and sticky choices by a hash that every process computes alike."""

from __future__ import annotations

from typing import Any, cast

import pytest

from proxy.config.model import SplitConfig, SplitSide
from proxy.core.body import Body
from proxy.core.models import Request
from proxy.exchange.split import Split


def split(weights: list[int], cookie: str | None = None, header: str | None = None) -> Split:
    sides = tuple(SplitSide(f"u{n}", weight) for n, weight in enumerate(weights))
    names: list[Any] = [side.upstream for side in sides]  # (stand-ins for RouteRuntimes)
    return Split("unit", SplitConfig(sides, cookie, header), cast(Any, names))


def pick(chooser: Split, request_: Request) -> str:
    """The side chosen: here, the stand-in's upstream name."""
    return cast(str, chooser.choose(request_))


def request(headers: list[tuple[bytes, bytes]] | None = None) -> Request:
    return Request("GET", b"/", headers or [], Body.from_bytes(b""))


@pytest.mark.parametrize("weights", [[90, 10], [1, 2, 3], [5, 5], [0, 3, 1], [7]])
def test_every_run_of_the_total_gives_each_side_its_weight(weights: list[int]) -> None:
    chooser = split(weights)
    total = sum(weights)
    picks = [pick(chooser, request()) for _ in range(total * 3)]
    for start in range(0, total * 2 + 1, max(1, total // 3)):  # any window, not only cycles
        window = picks[start : start + total]
        assert [window.count(f"u{n}") for n in range(len(weights))] == weights


def test_a_side_of_weight_zero_is_never_chosen_even_when_sticky() -> None:
    chooser = split([0, 1, 0, 1], header="x-user")
    users = [request([(b"X-User", f"user-{n}".encode())]) for n in range(200)]
    assert {pick(chooser, user) for user in users} == {"u1", "u3"}


def test_sticky_keys_land_where_they_always_did() -> None:
    # Pinned: BLAKE2b of the key, the same in every worker, gateway and run (a salted
    # hash() would move users between sides on each restart).
    chooser = split([50, 30, 20])
    assert [chooser.side_of(f"user-{n}") for n in range(12)] == [0, 1, 0, 2, 1, 1, 0, 0, 0, 1, 0, 1]


def test_a_sticky_cookie_keeps_its_side_and_others_take_turns() -> None:
    chooser = split([50, 50], cookie="session")
    with_cookie = request([(b"cookie", b"theme=dark; session=abc")])
    sides = {pick(chooser, with_cookie) for _ in range(20)}
    assert sides == {["u0", "u1"][chooser.side_of("abc")]}
    # Without it (or with it empty): turns, which the sticky requests did not advance.
    assert [pick(chooser, request([(b"cookie", b"session=")])) for _ in range(4)] == [
        "u0",
        "u1",
        "u0",
        "u1",
    ]


def test_the_share_of_sticky_keys_follows_the_weights() -> None:
    chooser = split([3, 1])
    sides = [chooser.side_of(f"key-{n}") for n in range(4000)]
    assert abs(sides.count(1) / 4000 - 0.25) < 0.03
