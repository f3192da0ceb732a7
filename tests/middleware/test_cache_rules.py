"""The shared-cache rules of RFC 9111 (and RFC 5861, RFC 9211) as the pure functions of
middleware/cache_rules.py: storability, freshness, age, validation, Vary, the requests'
own directives and the Cache-Status member."""

from __future__ import annotations

import pytest

from middleware import cache_rules as rules

NOW = 1_800_000_000.0  # an arbitrary wall-clock second


def date(seconds: float) -> str:
    return rules.format_http_date(seconds)


def test_cache_control_reads_directives_case_and_quotes() -> None:
    cc = rules.CacheControl(
        [("Cache-Control", 'Max-Age="60", private="x, y"'), ("cache-control", "no-cache")]
    )
    assert cc.seconds("max-age") == 60
    assert cc.directives["private"] == "x, y"
    assert "no-cache" in cc
    assert rules.CacheControl([("Cache-Control", "max-age=1, max-age=9")]).seconds("max-age") == 1
    assert rules.CacheControl([("Cache-Control", "max-age=soon")]).seconds("max-age") is None


@pytest.mark.parametrize(
    ("status", "request_fields", "response_fields", "why"),
    [
        (200, [], [("Cache-Control", "max-age=60")], ""),
        (200, [], [("Cache-Control", "max-age=60, no-store")], "no-store"),
        (200, [("Cache-Control", "no-store")], [("Cache-Control", "max-age=60")], "no-store"),
        (200, [], [("Cache-Control", "private, max-age=60")], "private"),
        (200, [], [("Cache-Control", "max-age=60"), ("Vary", "*")], "vary-star"),
        (200, [], [("Cache-Control", "max-age=60"), ("Set-Cookie", "a=1")], "set-cookie"),
        (200, [("Authorization", "Bearer x")], [("Cache-Control", "max-age=60")], "authorization"),
        (200, [("Authorization", "Bearer x")], [("Cache-Control", "public, max-age=60")], ""),
        (200, [("Authorization", "Bearer x")], [("Cache-Control", "s-maxage=60")], ""),
        (
            200,
            [("Authorization", "Bearer x")],
            [("Cache-Control", "must-revalidate, max-age=9")],
            "",
        ),
        (200, [], [("ETag", '"v1"')], ""),  # stored stale, revalidated
        (200, [], [("Content-Type", "text/plain")], "no-freshness"),
        (206, [], [("Cache-Control", "max-age=60")], "status"),
        (500, [], [("Cache-Control", "max-age=60")], "status"),
        (404, [], [("Expires", date(NOW + 60)), ("Date", date(NOW))], ""),
    ],
)
def test_storable_follows_section_3_and_3_5(
    status: int,
    request_fields: list[tuple[str, str]],
    response_fields: list[tuple[str, str]],
    why: str,
) -> None:
    assert rules.storable(status, request_fields, response_fields, heuristic=False) == why


def test_heuristic_makes_a_response_without_validators_storable() -> None:
    fields = [("Content-Type", "text/plain")]
    assert rules.storable(200, [], fields, heuristic=True) == ""
    assert rules.storable(302, [], fields, heuristic=True) == "no-freshness"


def test_freshness_lifetime_order() -> None:
    assert rules.freshness_lifetime([("Cache-Control", "max-age=10, s-maxage=99")]) == 99
    assert rules.freshness_lifetime([("Cache-Control", "max-age=10")]) == 10
    assert rules.freshness_lifetime([("Cache-Control", "max-age=x")]) == 0
    expires = [("Date", date(NOW)), ("Expires", date(NOW + 30))]
    assert rules.freshness_lifetime(expires) == 30
    assert rules.freshness_lifetime([*expires, ("Cache-Control", "max-age=5")]) == 5
    assert rules.freshness_lifetime([("Date", date(NOW)), ("Expires", "0")]) == 0
    modified = [("Date", date(NOW)), ("Last-Modified", date(NOW - 1000))]
    assert rules.freshness_lifetime(modified) == 0  # heuristics are off by default
    assert rules.freshness_lifetime(modified, heuristic_fraction=0.1) == pytest.approx(100)


def test_age_takes_the_larger_of_apparent_and_corrected() -> None:
    fields = [("Date", date(NOW - 100))]
    assert rules.initial_age(fields, NOW - 1, NOW) == pytest.approx(100)
    fields = [("Date", date(NOW)), ("Age", "40")]
    assert rules.initial_age(fields, NOW - 2, NOW) == pytest.approx(42)
    assert rules.current_age(42, NOW, NOW + 8) == pytest.approx(50)


def test_stale_serving_is_refused_by_revalidation_directives() -> None:
    swr = [("Cache-Control", "max-age=1, stale-while-revalidate=30, stale-if-error=60")]
    assert rules.stale_window(swr, "stale-while-revalidate") == 30
    assert rules.stale_window(swr, "stale-if-error") == 60
    assert rules.stale_window(swr, "stale-if-error", 10) == 10
    for directive in ("must-revalidate", "proxy-revalidate", "s-maxage=1", "no-cache"):
        fields = [("Cache-Control", f"{directive}, stale-if-error=60")]
        assert rules.stale_window(fields, "stale-if-error") == 0
        assert not rules.may_serve_stale(fields)


def test_request_directives() -> None:
    plain = rules.RequestDemands([])
    assert plain.satisfied(60, 10, True)
    assert not plain.satisfied(60, 61, True)
    assert not rules.RequestDemands([("Cache-Control", "no-cache")]).satisfied(60, 1, True)
    assert not rules.RequestDemands([("Pragma", "no-cache")]).satisfied(60, 1, True)
    assert not rules.RequestDemands([("Cache-Control", "max-age=5")]).satisfied(60, 6, True)
    assert not rules.RequestDemands([("Cache-Control", "min-fresh=55")]).satisfied(60, 6, True)
    stale = rules.RequestDemands([("Cache-Control", "max-stale=10")])
    assert stale.satisfied(60, 65, True)
    assert not stale.satisfied(60, 71, True)
    assert not stale.satisfied(60, 65, False)  # must-revalidate wins
    assert rules.RequestDemands([("Cache-Control", "only-if-cached")]).only_if_cached


def test_client_conditions_against_the_stored_response() -> None:
    stored = [("ETag", 'W/"v1"'), ("Last-Modified", date(NOW - 60)), ("Date", date(NOW))]
    assert rules.not_modified([("If-None-Match", '"v0", "v1"')], stored)
    assert rules.not_modified([("If-None-Match", "*")], stored)
    assert not rules.not_modified([("If-None-Match", '"v2"')], stored)
    # If-None-Match wins over If-Modified-Since when both are sent
    both = [("If-None-Match", '"v2"'), ("If-Modified-Since", date(NOW))]
    assert not rules.not_modified(both, stored)
    assert rules.not_modified([("If-Modified-Since", date(NOW - 60))], stored)
    assert not rules.not_modified([("If-Modified-Since", date(NOW - 61))], stored)
    assert rules.not_modified_fields([*stored, ("Content-Type", "text/plain")]) == stored


def test_revalidation_fields_and_304_updates() -> None:
    stored = [
        ("ETag", '"v1"'),
        ("Last-Modified", date(NOW - 60)),
        ("Content-Length", "5"),
        ("X-Version", "1"),
        ("Cache-Control", "max-age=0"),
    ]
    assert rules.validators(stored) == [
        ("If-None-Match", '"v1"'),
        ("If-Modified-Since", date(NOW - 60)),
    ]
    fresh = [("Cache-Control", "max-age=60"), ("X-Version", "2"), ("Content-Length", "0")]
    updated = rules.updated_fields(stored, fresh)
    assert ("X-Version", "2") in updated
    assert ("X-Version", "1") not in updated
    assert ("Cache-Control", "max-age=60") in updated
    assert ("Content-Length", "5") in updated
    assert ("Content-Length", "0") not in updated
    assert rules.validator_matches(stored, [("ETag", 'W/"v1"')])
    assert not rules.validator_matches(stored, [("ETag", '"v2"')])
    assert rules.validator_matches(stored, [])


def test_vary_names_and_values_are_normalised() -> None:
    names = rules.vary_names([("Vary", "Accept-Language, accept-encoding"), ("Vary", "Accept")])
    assert names == ("accept", "accept-encoding", "accept-language")
    one = rules.vary_values(("accept-language",), [("Accept-Language", "en,fr")])
    two = rules.vary_values(
        ("accept-language",), [("accept-language", "en"), ("Accept-Language", "fr")]
    )
    assert one == two == ("en, fr",)
    assert rules.vary_values(("accept-language",), []) == ("",)


def test_request_bypasses() -> None:
    assert rules.request_bypasses("GET", []) == ""
    assert rules.request_bypasses("POST", []) == "method"
    assert rules.request_bypasses("HEAD", []) == "method"
    assert rules.request_bypasses("GET", [("Range", "bytes=0-1")]) == "range"
    assert rules.request_bypasses("GET", [("If-Match", '"x"')]) == "if-match"


def test_cache_status_members() -> None:
    assert rules.cache_status("gh", hit=True, ttl=59.5) == "gh; hit; ttl=59"
    assert rules.cache_status("gh", hit=True, ttl=-0.2, detail="x") == "gh; hit; ttl=-1; detail=x"
    assert (
        rules.cache_status("gh", fwd="uri-miss", stored=True, ttl=60)
        == "gh; fwd=uri-miss; ttl=60; stored"
    )
    assert rules.cache_status("gh", fwd="stale", fwd_status=304) == "gh; fwd=stale; fwd-status=304"
    assert rules.cache_status("gh", fwd="uri-miss", collapsed=True) == "gh; fwd=uri-miss; collapsed"


def test_requests_without_cache_directives_share_one_set_of_demands() -> None:
    plain = [("Accept", "*/*")]
    assert rules.request_demands(plain, rules.lowered_names(plain)) is rules.NO_DEMANDS
    pragma = [("PRAGMA", "no-cache")]
    assert rules.request_demands(pragma, rules.lowered_names(pragma)).no_cache
    directive = [("cache-control", "max-age=5")]
    assert rules.request_demands(directive, rules.lowered_names(directive)).max_age == 5
    assert rules.hit_status("gatehouse", 59.7) == rules.cache_status(
        "gatehouse", hit=True, ttl=59.7
    )
    assert rules.hit_status("g", -0.2) == "g; hit; ttl=-1"
