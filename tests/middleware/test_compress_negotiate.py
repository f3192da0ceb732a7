"""Accept-Encoding negotiation and media type sets (middleware/compress_negotiate.py):
RFC 9110's rules case by case, properties over generated headers, and a cost linear in
the header's length."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from middleware.compress_negotiate import (
    CACHED_VALUES,
    MediaTypes,
    Negotiator,
    choose,
    media_pattern_problem,
    weights,
)
from tests.support.cost import least_cpu

OFFERED = ("zstd", "br", "gzip")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("gzip", "gzip"),
        ("gzip, deflate, br, zstd", "zstd"),  # a browser's: the gateway's order decides
        ("gzip, deflate, br", "br"),
        ("br;q=0.5, gzip", "gzip"),
        ("br;q=0.5, gzip;q=0.4", "br"),
        ("GZIP", "gzip"),  # codings are case-insensitive
        ("x-gzip", "gzip"),  # RFC 9110 8.4.1.3
        ("gzip ; Q = 0.5 , br ; q=0.25", "gzip"),  # whitespace around parameters
        ("*", "zstd"),
        ("*;q=0.5, br", "br"),
        ("br;q=0, *", "zstd"),
        ("*;q=0", ""),
        ("zstd;q=0, br;q=0, gzip;q=0", ""),
        ("identity", ""),
        ("identity;q=0", ""),  # identity refused, no coding offered: sent as it is anyway
        ("gzip;q=0.5, identity", ""),  # identity preferred
        ("gzip, identity;q=0.5", "gzip"),
        ("gzip, identity", "gzip"),  # a tie goes to compressing
        ("deflate, compress", ""),
        ("", ""),
        (",,, ,", ""),
        ("gzip;q=1.000, br;q=1.0001", "gzip"),  # four decimals: not a qvalue, left out
        ("gzip;q=0.001", "gzip"),
        ("br;q=1.5, gzip;q=0.1", "gzip"),  # above 1: left out
        ("br;q=, gzip;q=0.1", "gzip"),
        ("br;q=-1, gzip;q=0.1", "gzip"),
        ("br;level=5", "br"),  # a parameter other than q is passed over
        ("gzip;q=0, gzip", ""),  # the first mention counts
        ("g zip, br", "br"),  # not a token: left out
        ("zstd\x00, gzip", "gzip"),
    ],
)
def test_choose(value: str, expected: str) -> None:
    assert choose(value, OFFERED) == expected


def test_the_offered_order_is_the_preference() -> None:
    assert choose("zstd, br, gzip", ("gzip", "br")) == "gzip"
    assert choose("zstd, br, gzip", ("br", "gzip")) == "br"
    assert choose("zstd", ("br", "gzip")) == ""
    assert choose("gzip", ()) == ""


def test_weights_keep_names_lowercase_and_first_mentions() -> None:
    assert weights("GZip;q=0.5, br, gzip;q=1, X-GZIP;q=0.2, *;q=0") == {
        "gzip": 0.5,
        "br": 1.0,
        "*": 0.0,
    }


@given(st.text(max_size=200))
def test_any_text_gives_an_offered_coding_or_none(value: str) -> None:
    assert choose(value, OFFERED) in ("", *OFFERED)


_CODING = st.sampled_from(["gzip", "br", "zstd", "deflate", "identity", "*", "x-gzip", "BR"])
_WEIGHT = st.sampled_from(["", ";q=0", ";q=0.5", ";q=0.25", ";q=1", ";q=0.999", ";q=1.0"])


@given(st.lists(st.tuples(_CODING, _WEIGHT), max_size=8))
def test_the_choice_has_the_highest_weight_of_the_offered_codings(
    elements: list[tuple[str, str]],
) -> None:
    value = ", ".join(coding + weight for coding, weight in elements)
    named = weights(value)
    chosen = choose(value, OFFERED)

    def weight_of(coding: str) -> float:
        return named.get(coding, named.get("*", 0.0))

    best = max(weight_of(coding) for coding in OFFERED)
    if chosen:
        assert weight_of(chosen) == best > 0
        # ...and it is the first of the offered codings with that weight
        assert chosen == next(c for c in OFFERED if weight_of(c) == best)
        assert named.get("identity", 0.0) <= best
    else:
        assert best == 0 or named.get("identity", 0.0) > best


def test_reading_a_header_costs_time_linear_in_its_length() -> None:
    def cost(count: int) -> float:
        value = ", ".join(f"x-coding-{i};q=0.{i % 1000:03d}" for i in range(count)) + ", br"
        return least_cpu(lambda: [choose(value, OFFERED) for _ in range(5)])

    small, large = cost(1000), cost(10_000)
    assert large <= 20 * small, (small, large)


def test_the_negotiator_remembers_a_bounded_number_of_values() -> None:
    negotiator = Negotiator(OFFERED)
    assert negotiator.choose(["gzip", "br;q=0.5"]) == "gzip"  # field lines joined
    assert negotiator.choose([]) == ""
    for i in range(CACHED_VALUES * 2):
        assert negotiator.choose([f"gzip;q=0.{i % 1000:03d}, x{i}"]) == ("gzip" if i % 1000 else "")
    assert len(negotiator._choices) == CACHED_VALUES
    assert negotiator.choose(["gzip;q=0.5, br"]) == "br"  # still answers past the bound


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("text/html", True),
        ("Text/HTML; charset=utf-8", True),
        ("text/event-stream", True),
        ("application/json", True),
        ("application/problem+json", True),
        ("application/vnd.api+json; charset=utf-8", True),
        ("application/jsonx", False),
        ("application/json-seq", False),
        ("image/svg+xml", True),
        ("image/png", False),
        ("texts/plain", False),
        ("text", False),
        ("", False),
        (None, False),
    ],
)
def test_media_types(content_type: str | None, expected: bool) -> None:
    types = MediaTypes(["text/*", "application/json", "application/*+json", "image/svg+xml"])
    assert (content_type in types) is expected


@pytest.mark.parametrize(
    ("pattern", "good"),
    [
        ("text/html", True),
        ("text/*", True),
        ("application/*+json", True),
        ("*/*", False),
        ("text", False),
        ("text/", False),
        ("te*t/html", False),
        ("text/ht*ml", False),
        ("application/*+", False),
        ("text/html; charset=utf-8", False),
    ],
)
def test_media_pattern_problems(pattern: str, good: bool) -> None:
    assert (media_pattern_problem(pattern) is None) is good
