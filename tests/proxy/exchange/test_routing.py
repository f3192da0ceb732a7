"""RouteTable: each matcher, host normalisation, specificity and its tie-breaks."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import parse_qsl

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

import proxy.exchange.routing
from proxy.config.model import HeaderMatch, MatchConfig, QueryMatch, RouteConfig
from proxy.exchange.routing import RouteMatch, RouteTable, normalize_host

_counter = iter(range(1_000_000))


def route(
    name: str | None = None,
    *,
    index: int | None = None,
    host: str | None = None,
    path: str | None = None,
    path_prefix: str | None = None,
    path_regex: str | None = None,
    methods: tuple[str, ...] | None = None,
    headers: tuple[HeaderMatch, ...] = (),
    query: tuple[QueryMatch, ...] = (),
) -> RouteConfig:
    """A route with the given matchers; index defaults to creation order."""
    position = next(_counter)
    return RouteConfig(
        name=name or f"route-{position}",
        match=MatchConfig(host, path, path_prefix, path_regex, methods, headers, query),
        upstream="backend",
        index=position if index is None else index,
    )


def match(
    table: RouteTable,
    *,
    method: str = "GET",
    host: str = "example.com",
    path: str = "/",
    headers: Mapping[str, str] | None = None,
    query: str = "",
) -> RouteMatch | None:
    return table.match(method, host, path, headers or {}, query)


def matched_name(
    table: RouteTable,
    *,
    method: str = "GET",
    host: str = "example.com",
    path: str = "/",
    headers: Mapping[str, str] | None = None,
    query: str = "",
) -> str | None:
    found = match(table, method=method, host=host, path=path, headers=headers, query=query)
    return None if found is None else found.route.name


# --- no match ----------------------------------------------------------------------------


def test_empty_table_matches_nothing() -> None:
    assert match(RouteTable([])) is None


def test_no_matching_route_returns_none() -> None:
    table = RouteTable([route(host="api.example.com", path_prefix="/users")])
    assert match(table, host="other.example.com", path="/users") is None
    assert match(table, host="api.example.com", path="/orders") is None


def test_route_without_matchers_matches_everything() -> None:
    table = RouteTable([route("all")])
    assert matched_name(table, method="DELETE", host="", path="/any/thing", query="x=1") == "all"


# --- host normalisation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("api.example.com", "api.example.com"),
        ("API.Example.COM", "api.example.com"),
        ("api.example.com:8080", "api.example.com"),
        ("api.example.com:", "api.example.com"),
        ("api.example.com.", "api.example.com"),
        ("api.example.com.:443", "api.example.com"),
        ("[::1]:8080", "[::1]"),
        ("[::1]", "[::1]"),
        ("[2001:DB8::1]:443", "[2001:db8::1]"),
        ("10.0.0.1:80", "10.0.0.1"),
        ("", ""),
    ],
)
def test_normalize_host_drops_port_and_trailing_dot_and_lowercases(
    raw: str, normalized: str
) -> None:
    assert normalize_host(raw) == normalized


def test_host_match_ignores_port_and_case() -> None:
    table = RouteTable([route("api", host="api.example.com")])
    assert matched_name(table, host="API.Example.com:8443") == "api"
    assert matched_name(table, host="api.example.com.") == "api"


def test_ipv6_literal_host_matches_bracketed_route_host() -> None:
    table = RouteTable([route("v6", host="[::1]")])
    assert matched_name(table, host="[::1]:8080") == "v6"
    assert matched_name(table, host="[::1]") == "v6"
    assert match(table, host="[::2]:8080") is None


def test_empty_host_matches_only_routes_without_host() -> None:
    table = RouteTable([route("api", host="api.example.com"), route("wild", host="*.com")])
    assert match(table, host="") is None
    table = RouteTable([route("api", host="api.example.com"), route("any")])
    assert matched_name(table, host="") == "any"


def test_star_host_matches_any_host() -> None:
    table = RouteTable([route("star", host="*")])
    assert matched_name(table, host="anything.test") == "star"
    assert matched_name(table, host="") == "star"


# --- wildcard hosts ----------------------------------------------------------------------


def test_wildcard_host_matches_one_label_before_suffix() -> None:
    table = RouteTable([route("wild", host="*.example.com")])
    assert matched_name(table, host="a.example.com") == "wild"
    assert matched_name(table, host="A.EXAMPLE.com:80") == "wild"


def test_wildcard_host_matches_several_labels_before_suffix() -> None:
    table = RouteTable([route("wild", host="*.example.com")])
    assert matched_name(table, host="a.b.example.com") == "wild"


def test_wildcard_host_does_not_match_the_bare_suffix() -> None:
    table = RouteTable([route("wild", host="*.example.com")])
    assert match(table, host="example.com") is None
    assert match(table, host=".example.com") is None


def test_wildcard_host_does_not_match_a_mere_string_suffix() -> None:
    table = RouteTable([route("wild", host="*.example.com")])
    assert match(table, host="badexample.com") is None
    assert match(table, host="example.com.evil.net") is None


# --- paths -------------------------------------------------------------------------------


def test_exact_path_matches_only_that_path() -> None:
    table = RouteTable([route("exact", path="/health")])
    assert matched_name(table, path="/health") == "exact"
    assert match(table, path="/health/") is None
    assert match(table, path="/healthz") is None


def test_path_is_matched_raw_without_decoding() -> None:
    table = RouteTable([route("exact", path="/a b"), route("prefix", path_prefix="/admin")])
    assert match(table, path="/a%20b") is None
    assert match(table, path="/%61dmin") is None


def test_path_prefix_is_a_plain_string_prefix() -> None:
    table = RouteTable([route("users", path_prefix="/users")])
    assert matched_name(table, path="/users") == "users"
    assert matched_name(table, path="/users/42") == "users"
    assert matched_name(table, path="/users-admin") == "users"
    assert match(table, path="/user") is None


def test_path_prefix_with_trailing_slash_matches_the_directory_only() -> None:
    table = RouteTable([route("users", path_prefix="/users/")])
    assert matched_name(table, path="/users/42") == "users"
    assert match(table, path="/users") is None


def test_path_regex_must_match_the_whole_path() -> None:
    table = RouteTable([route("re", path_regex=r"/items/\d+")])
    assert matched_name(table, path="/items/17") == "re"
    assert match(table, path="/items/17/edit") is None
    assert match(table, path="/v1/items/17") is None


def test_path_regex_named_groups_become_params() -> None:
    table = RouteTable([route("re", path_regex=r"/users/(?P<user>[^/]+)/posts/(?P<post>\d+)")])
    found = match(table, path="/users/ann/posts/7")
    assert found is not None
    assert found.params == {"user": "ann", "post": "7"}


def test_path_regex_params_leave_out_groups_that_did_not_participate() -> None:
    table = RouteTable([route("re", path_regex=r"/files(/(?P<name>.+))?")])
    found = match(table, path="/files")
    assert found is not None
    assert found.params == {}


def test_non_regex_routes_have_empty_params() -> None:
    table = RouteTable([route("prefix", path_prefix="/")])
    found = match(table, path="/x")
    assert found is not None
    assert found.params == {}


def test_params_are_a_fresh_dict_per_match() -> None:
    table = RouteTable([route("prefix", path_prefix="/")])
    first = match(table)
    assert first is not None
    first.params["mutated"] = "yes"
    second = match(table)
    assert second is not None
    assert second.params == {}


# --- methods -----------------------------------------------------------------------------


def test_methods_restrict_the_route() -> None:
    table = RouteTable([route("rw", methods=("GET", "POST"))])
    assert matched_name(table, method="GET") == "rw"
    assert matched_name(table, method="POST") == "rw"
    assert match(table, method="DELETE") is None


def test_methods_are_case_sensitive_and_head_is_not_implied_by_get() -> None:
    table = RouteTable([route("get", methods=("GET",))])
    assert match(table, method="get") is None
    assert match(table, method="HEAD") is None


def test_method_mismatch_falls_through_to_a_less_specific_route() -> None:
    table = RouteTable(
        [route("post-only", path="/x", methods=("POST",)), route("fallback", path_prefix="/")]
    )
    assert matched_name(table, method="POST", path="/x") == "post-only"
    assert matched_name(table, method="GET", path="/x") == "fallback"


# --- headers -----------------------------------------------------------------------------


def test_header_exact_value_with_case_insensitive_name() -> None:
    table = RouteTable([route("canary", headers=(HeaderMatch("X-Env", value="canary"),))])
    assert matched_name(table, headers={"x-env": "canary"}) == "canary"
    assert matched_name(table, headers={"X-ENV": "canary"}) == "canary"
    assert match(table, headers={"X-Env": "Canary"}) is None
    assert match(table, headers={}) is None


def test_header_regex_must_match_the_whole_value() -> None:
    table = RouteTable([route("v", headers=(HeaderMatch("X-Version", regex=r"v[12]"),))])
    assert matched_name(table, headers={"X-Version": "v2"}) == "v"
    assert match(table, headers={"X-Version": "v22"}) is None


def test_header_presence_matcher_accepts_any_value_even_empty() -> None:
    table = RouteTable([route("debug", headers=(HeaderMatch("X-Debug"),))])
    assert matched_name(table, headers={"x-debug": ""}) == "debug"
    assert match(table, headers={"X-Other": "1"}) is None


def test_all_header_matchers_must_accept() -> None:
    table = RouteTable(
        [route("both", headers=(HeaderMatch("A", value="1"), HeaderMatch("B", value="2")))]
    )
    assert matched_name(table, headers={"a": "1", "b": "2"}) == "both"
    assert match(table, headers={"a": "1"}) is None


@pytest.mark.parametrize("proxy_type", [False, True])
def test_header_matchers_read_a_cimultidict_and_accept_any_repeated_value(
    proxy_type: bool,
) -> None:
    table = RouteTable([route("canary", headers=(HeaderMatch("X-Env", value="canary"),))])
    headers: CIMultiDict[str] = CIMultiDict([("X-Env", "prod"), ("x-env", "canary")])
    request_headers = CIMultiDictProxy(headers) if proxy_type else headers
    assert matched_name(table, headers=request_headers) == "canary"
    assert match(table, headers=CIMultiDict([("X-Env", "prod")])) is None


# --- query -------------------------------------------------------------------------------


def test_query_exact_value() -> None:
    table = RouteTable([route("beta", query=(QueryMatch("beta", value="1"),))])
    assert matched_name(table, query="a=2&beta=1") == "beta"
    assert match(table, query="beta=2") is None
    assert match(table, query="") is None


def test_query_names_and_values_are_case_sensitive_and_percent_decoded() -> None:
    table = RouteTable([route("q", query=(QueryMatch("name", value="a b"),))])
    assert matched_name(table, query="name=a%20b") == "q"
    assert matched_name(table, query="name=a+b") == "q"
    assert match(table, query="Name=a%20b") is None


def test_query_regex_and_repeated_parameters() -> None:
    table = RouteTable([route("q", query=(QueryMatch("id", regex=r"\d+"),))])
    assert matched_name(table, query="id=x&id=42") == "q"
    assert match(table, query="id=4x") is None


def test_query_presence_matcher_accepts_a_blank_parameter() -> None:
    table = RouteTable([route("debug", query=(QueryMatch("debug"),))])
    assert matched_name(table, query="debug") == "debug"
    assert matched_name(table, query="debug=") == "debug"
    assert match(table, query="nodebug=1") is None


def test_query_string_is_not_parsed_when_no_candidate_has_query_matchers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(*args: object, **kwargs: object) -> list[tuple[str, str]]:
        raise AssertionError("parse_qsl called on the hot path")

    monkeypatch.setattr(proxy.exchange.routing, "parse_qsl", refuse)
    table = RouteTable(
        [
            route("api", host="api.example.com", path_prefix="/"),
            route("q", query=(QueryMatch("x"),)),
        ]
    )
    assert matched_name(table, host="api.example.com", query="x=1") == "api"


def test_query_string_is_parsed_once_per_request(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def counting(query: str, keep_blank_values: bool = False) -> list[tuple[str, str]]:
        calls.append(query)
        return parse_qsl(query, keep_blank_values=keep_blank_values)

    monkeypatch.setattr(proxy.exchange.routing, "parse_qsl", counting)
    table = RouteTable(
        [
            route("a", path="/x", query=(QueryMatch("a"),)),
            route("b", path_prefix="/", query=(QueryMatch("b"),)),
            route("c", query=(QueryMatch("c"),)),
        ]
    )
    assert matched_name(table, path="/x", query="c=1") == "c"
    assert calls == ["c=1"]


# --- specificity -------------------------------------------------------------------------


def test_exact_host_beats_wildcard_beats_any_host() -> None:
    routes = [
        route("any"),
        route("wild", host="*.example.com"),
        route("exact", host="a.example.com"),
    ]
    table = RouteTable(routes)
    assert matched_name(table, host="a.example.com") == "exact"
    assert matched_name(table, host="b.example.com") == "wild"
    assert matched_name(table, host="other.test") == "any"


def test_longer_wildcard_suffix_wins() -> None:
    table = RouteTable(
        [route("short", host="*.example.com"), route("long", host="*.eu.example.com")]
    )
    assert matched_name(table, host="api.eu.example.com") == "long"
    assert matched_name(table, host="api.us.example.com") == "short"
    assert matched_name(table, host="eu.example.com") == "short"


def test_host_outranks_path() -> None:
    table = RouteTable(
        [
            route("wild-exact-path", host="*.example.com", path="/x"),
            route("host", host="a.example.com"),
        ]
    )
    assert matched_name(table, host="a.example.com", path="/x") == "host"


def test_exact_path_beats_regex_beats_prefix_beats_any_path() -> None:
    table = RouteTable(
        [
            route("any"),
            route("prefix", path_prefix="/items"),
            route("regex", path_regex=r"/items/\d+"),
            route("exact", path="/items/1"),
        ]
    )
    assert matched_name(table, path="/items/1") == "exact"
    assert matched_name(table, path="/items/2") == "regex"
    assert matched_name(table, path="/items/new") == "prefix"
    assert matched_name(table, path="/other") == "any"


def test_longer_prefix_wins_regardless_of_file_order() -> None:
    table = RouteTable(
        [
            route("root", path_prefix="/"),
            route("api", path_prefix="/api"),
            route("v1", path_prefix="/api/v1"),
        ]
    )
    assert matched_name(table, path="/api/v1/x") == "v1"
    assert matched_name(table, path="/api/v2") == "api"
    assert matched_name(table, path="/index.html") == "root"


def test_more_header_and_query_matchers_win_within_the_same_path() -> None:
    table = RouteTable(
        [
            route("plain", path_prefix="/"),
            route("one", path_prefix="/", headers=(HeaderMatch("A"),)),
            route("two", path_prefix="/", headers=(HeaderMatch("A"),), query=(QueryMatch("q"),)),
        ]
    )
    assert matched_name(table, headers={"A": "1"}, query="q=1") == "two"
    assert matched_name(table, headers={"A": "1"}) == "one"
    assert matched_name(table) == "plain"


def test_route_with_methods_beats_route_without() -> None:
    table = RouteTable([route("any-method", path="/x"), route("get", path="/x", methods=("GET",))])
    assert matched_name(table, method="GET", path="/x") == "get"
    assert matched_name(table, method="PUT", path="/x") == "any-method"


def test_equal_specificity_goes_to_the_earlier_route_in_the_file() -> None:
    table = RouteTable(
        [route("second", path_prefix="/a", index=2), route("first", path_prefix="/b", index=1)]
    )
    assert matched_name(table, path="/a") == "second"
    tied = RouteTable([route("late", path="/x", index=5), route("early", path="/x", index=3)])
    assert matched_name(tied, path="/x") == "early"


def test_equal_index_goes_to_the_earlier_route_in_the_sequence() -> None:
    table = RouteTable([route("one", path="/x", index=0), route("two", path="/x", index=0)])
    assert matched_name(table, path="/x") == "one"


def test_regex_routes_of_equal_rank_keep_file_order() -> None:
    table = RouteTable(
        [route("broad", path_regex=r"/.*", index=0), route("narrow", path_regex=r"/a", index=1)]
    )
    assert matched_name(table, path="/a") == "broad"


def test_a_more_specific_route_that_rejects_falls_back_across_host_buckets() -> None:
    table = RouteTable(
        [
            route("exact-host", host="a.example.com", path="/only"),
            route("wild", host="*.example.com", path_prefix="/"),
            route("any", path_prefix="/"),
        ]
    )
    assert matched_name(table, host="a.example.com", path="/other") == "wild"
    assert matched_name(table, host="a.example.org", path="/other") == "any"


def test_ordered_lists_routes_most_specific_first() -> None:
    routes = [
        route("any"),
        route("prefix-short", path_prefix="/a"),
        route("wild", host="*.example.com"),
        route("prefix-long", path_prefix="/a/b"),
        route("exact", host="x.example.com", path="/"),
        route("methods", path_prefix="/a", methods=("GET",)),
        route("header", path_prefix="/a", headers=(HeaderMatch("H"),)),
    ]
    table = RouteTable(routes)
    assert [r.name for r in table.ordered()] == [
        "exact",
        "wild",
        "prefix-long",
        "header",
        "methods",
        "prefix-short",
        "any",
    ]
    assert len(table) == len(routes)


# --- compile-time errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    "match_config",
    [
        MatchConfig(host="api.example.com:8080"),
        MatchConfig(host="api.*.example.com"),
        MatchConfig(host="*."),
        MatchConfig(path_regex="/(unclosed"),
        MatchConfig(headers=(HeaderMatch("A", regex="["),)),
        MatchConfig(query=(QueryMatch("a", value="1", regex="1"),)),
        MatchConfig(path="/a", path_prefix="/a"),
        MatchConfig(methods=()),
    ],
)
def test_uncompilable_route_raises_value_error_naming_the_route(match_config: MatchConfig) -> None:
    broken = RouteConfig(name="broken", match=match_config, upstream="backend")
    with pytest.raises(ValueError, match="'broken'"):
        RouteTable([broken])


def test_repr_shows_index_sizes() -> None:
    table = RouteTable([route(host="a.test"), route(host="*.test"), route()])
    assert repr(table) == "<RouteTable routes=3 exact_hosts=1 wildcard_hosts=1 any_host=True>"
