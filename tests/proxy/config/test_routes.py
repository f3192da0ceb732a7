"""The routes section of routes.yaml: references to upstreams, route names, matches (host,
methods, paths, headers, query) and rewrites."""

from __future__ import annotations

import pytest

from proxy.config.model import HeaderMatch, QueryMatch
from tests.support.config_helpers import errors_of, one_error, parse, route_error, routes

# --- routes ---


def test_an_unknown_upstream_suggests_the_closest_one() -> None:
    assert route_error("match: {path: /}\nupstream: usres\n") == (
        "routes.yaml:6: routes[0].upstream: unknown upstream 'usres' (did you mean 'users'?)"
    )


def test_an_unknown_upstream_with_no_upstreams_defined_says_so() -> None:
    text = "listeners: [{bind: ':0'}]\nupstreams: {}\nroutes: [{match: {}, upstream: x}]\n"

    assert (
        one_error(text)
        == "routes.yaml:3: routes[0].upstream: unknown upstream 'x' (no upstreams are defined)"
    )


def test_an_unreadable_upstreams_section_does_not_make_every_route_an_error() -> None:
    text = "listeners: [{bind: ':0'}]\nupstreams: [x]\nroutes: [{match: {}, upstream: x}]\n"

    assert one_error(text) == "routes.yaml:2: upstreams: expected a mapping, got a list"


def test_a_route_to_an_invalid_upstream_only_reports_the_upstream() -> None:
    text = """\
        listeners: [{bind: ':0'}]
        upstreams: {u: {endpoints: []}}
        routes: [{match: {}, upstream: u}]
    """

    assert (
        one_error(text) == "routes.yaml:2: upstreams.u.endpoints: at least one endpoint is required"
    )


@pytest.mark.parametrize(
    ("match", "name"),
    [
        ("{host: api.example.com, path_prefix: /users}", "api.example.com/users*"),
        ("{path: /exact}", "/exact"),
        ("{path_regex: '^/re$'}", "~^/re$"),
        ("{host: '*.example.com'}", "*.example.com/*"),
        ("{methods: [GET]}", "/*"),
        ("{}", "/*"),
    ],
)
def test_a_route_without_a_name_is_named_after_its_match(match: str, name: str) -> None:
    config = parse(routes(f"  - {{match: {match}, upstream: users}}\n"))

    assert config.routes[0].name == name


def test_route_index_is_the_position_in_the_file() -> None:
    text = routes(
        "  - {match: {path: /a}, upstream: users}\n  - {match: {path: /b}, upstream: users}\n"
    )

    assert [route.index for route in parse(text).routes] == [0, 1]


def test_duplicate_route_names_are_errors_on_the_duplicate() -> None:
    text = routes(
        """\
        - {name: api, match: {path: /a}, upstream: users}
        - {name: api, match: {path: /b}, upstream: users}
        """
    )

    assert (
        one_error(text)
        == "routes.yaml:6: routes[1].name: duplicate route name 'api' (also routes[0])"
    )


def test_duplicate_derived_route_names_ask_for_a_name() -> None:
    text = routes(
        """\
        - {match: {path: /a, methods: [GET]}, upstream: users}
        - {match: {path: /a, methods: [POST]}, upstream: users}
        """
    )

    assert one_error(text) == (
        "routes.yaml:6: routes[1]: duplicate route name '/a' (also routes[0]) "
        "(derived from its match: give the route a name)"
    )


def test_an_empty_route_name_is_an_error() -> None:
    assert route_error("name: ' '\nmatch: {}\nupstream: users\n") == (
        "routes.yaml:5: routes[0].name: must not be empty"
    )


def test_a_route_needs_match_and_upstream() -> None:
    assert errors_of(routes("  - {name: r}\n")) == [
        "routes.yaml:5: routes[0]: missing required key 'match'",
        "routes.yaml:5: routes[0]: missing required key 'upstream' (or give redirect or respond)",
    ]


@pytest.mark.parametrize(
    ("host", "parsed"),
    [
        ("API.Example.COM", "api.example.com"),
        ("'*.example.com'", "*.example.com"),
        ("example.com.", "example.com"),
        ("'[::1]'", "[::1]"),
        ("'*'", None),
        ("10.0.0.1", "10.0.0.1"),
    ],
)
def test_match_host_is_normalised(host: str, parsed: str | None) -> None:
    config = parse(routes(f"  - {{match: {{host: {host}}}, upstream: users}}\n"))

    assert config.routes[0].match.host == parsed


@pytest.mark.parametrize(
    ("host", "message"),
    [
        (
            "api.*.com",
            "invalid host 'api.*.com' (expected 'api.example.com', '*.example.com' or '*')",
        ),
        ("'*example.com'", "invalid host '*example.com' (expected"),
        ("api.example.com:8080", "invalid host 'api.example.com:8080': a route host has no port"),
        ("''", "invalid host '' (expected"),
        ("'a b'", "invalid host 'a b' (expected"),
        ("'[zz]'", "invalid host '[zz]' (expected an IPv6 address like '[::1]')"),
        ("'[1::2::3]'", "invalid host '[1::2::3]' (expected an IPv6 address"),
        ("'[::1]:80'", "invalid host '[::1]:80' (expected an IPv6 address"),
    ],
)
def test_a_malformed_match_host_is_an_error(host: str, message: str) -> None:
    error = route_error(f"match: {{host: {host}}}\nupstream: users\n")

    assert error.startswith(f"routes.yaml:5: routes[0].match.host: {message}")


def test_methods_are_upper_cased_and_deduplicated() -> None:
    config = parse(routes("  - {match: {methods: [get, GET, Post]}, upstream: users}\n"))

    assert config.routes[0].match.methods == ("GET", "POST")


def test_methods_must_be_a_non_empty_list_of_tokens() -> None:
    assert route_error("match: {methods: []}\nupstream: users\n") == (
        "routes.yaml:5: routes[0].match.methods: must not be empty (leave it out for any method)"
    )
    assert route_error("match: {methods: [GET, 'NO WAY']}\nupstream: users\n") == (
        "routes.yaml:5: routes[0].match.methods[1]: invalid method 'NO WAY'"
    )
    assert route_error("match: {methods: GET}\nupstream: users\n") == (
        "routes.yaml:5: routes[0].match.methods: expected a list, got a string ('GET')"
    )


def test_at_most_one_path_matcher_is_allowed() -> None:
    error = route_error("match: {path: /a, path_regex: /b}\nupstream: users\n")

    assert error == (
        "routes.yaml:5: routes[0].match.path_regex: give at most one of path, path_prefix, "
        "path_regex (path)"
    )


@pytest.mark.parametrize("key", ["path", "path_prefix"])
def test_paths_must_start_with_a_slash(key: str) -> None:
    assert route_error(f"match: {{{key}: users}}\nupstream: users\n") == (
        f"routes.yaml:5: routes[0].match.{key}: must start with '/', got 'users'"
    )


def test_path_regex_may_have_named_groups() -> None:
    config = parse(routes("  - {match: {path_regex: '/users/(?P<id>\\d+)'}, upstream: users}\n"))

    assert config.routes[0].match.path_regex == "/users/(?P<id>\\d+)"


def test_a_path_regex_that_does_not_compile_is_an_error() -> None:
    assert route_error("match: {path_regex: '/(a'}\nupstream: users\n") == (
        "routes.yaml:5: routes[0].match.path_regex: invalid regex '/(a': "
        "missing ), unterminated subpattern at position 1"
    )


def test_header_and_query_matches_take_value_regex_or_presence() -> None:
    text = routes(
        """\
        - match:
            headers: {X-A: a, X-B: {value: b}, X-C: {regex: 'c+'}, X-D: {present: true}}
            query: {n: 1, flag: true, r: {regex: '[0-9]+'}, p: {present: true}}
          upstream: users
        """
    )

    match = parse(text).routes[0].match

    assert match.headers == (
        HeaderMatch("x-a", value="a"),
        HeaderMatch("x-b", value="b"),
        HeaderMatch("x-c", regex="c+"),
        HeaderMatch("x-d"),
    )
    assert match.query == (
        QueryMatch("n", value="1"),  # numbers and booleans are taken as written
        QueryMatch("flag", value="true"),
        QueryMatch("r", regex="[0-9]+"),
        QueryMatch("p"),
    )


def test_query_names_keep_their_case() -> None:
    config = parse(routes("  - {match: {query: {Q: '1', q: '2'}}, upstream: users}\n"))

    assert [query.name for query in config.routes[0].match.query] == ["Q", "q"]


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ("{X-A: {regex: '(', }}", "headers.X-A.regex: invalid regex '('"),
        ("{X-A: {present: false}}", "headers.X-A.present: only 'present: true' is supported"),
        (
            "{X-A: {value: a, regex: b}}",
            "headers.X-A: expected exactly one of value, regex, present: true",
        ),
        ("{X-A: {}}", "headers.X-A: expected exactly one of value, regex, present: true"),
        ("{X-A: {valu: a}}", "headers.X-A.valu: unknown key 'valu' (did you mean 'value'?)"),
        ("{X-A: null}", "headers.X-A: expected a string, got null"),
        ("{X-A: [a]}", "headers.X-A: expected a mapping, got a list"),
        ("{'X A': a}", "headers['X A']: invalid header name 'X A'"),
        (
            "{X-A: a, x-a: b}",
            "headers.x-a: duplicate header 'x-a' (also routes[0].match.headers.X-A)",
        ),
        ("[X-A]", "headers: expected a mapping, got a list"),
    ],
)
def test_a_malformed_header_match_is_an_error(headers: str, error: str) -> None:
    full = route_error(f"match: {{headers: {headers}}}\nupstream: users\n")

    assert full.startswith(f"routes.yaml:5: routes[0].match.{error}")


def test_an_empty_query_name_is_an_error() -> None:
    assert route_error("match: {query: {'': a}}\nupstream: users\n") == (
        "routes.yaml:5: routes[0].match.query['']: the parameter name must not be empty"
    )


def test_rewrite_regex_needs_replacement_and_vice_versa() -> None:
    text = routes(
        """\
        - {match: {path: /a}, upstream: users, rewrite: {regex: '^/a$'}}
        - {match: {path: /b}, upstream: users, rewrite: {replacement: /x}}
        """
    )

    assert errors_of(text) == [
        "routes.yaml:5: routes[0].rewrite.regex: regex needs replacement (give both or neither)",
        "routes.yaml:6: routes[1].rewrite.replacement: replacement needs regex "
        "(give both or neither)",
    ]


def test_rewrite_replacement_may_use_numbered_and_named_groups() -> None:
    text = routes(
        "  - match: {path_prefix: /}\n    upstream: users\n"
        "    rewrite: {regex: '^/(?P<v>v\\d)/(.*)$', replacement: '/\\2?v=\\g<v>'}\n"
    )

    assert parse(text).routes[0].rewrite.replacement == "/\\2?v=\\g<v>"


@pytest.mark.parametrize(
    ("replacement", "problem"),
    [("'/\\2'", "invalid group reference 2 at position 2"), ("'\\g<x>'", "unknown group name 'x'")],
)
def test_rewrite_replacement_must_fit_the_regex(replacement: str, problem: str) -> None:
    error = route_error(
        "match: {path: /}\nupstream: users\n"
        f"rewrite: {{regex: '/(a)', replacement: {replacement}}}\n"
    )

    assert error == f"routes.yaml:7: routes[0].rewrite.replacement: invalid replacement: {problem}"


def test_rewrite_with_global_regex_flags_is_accepted() -> None:
    text = routes(
        "  - {match: {}, upstream: users, rewrite: {regex: '(?i)^/A(.*)', replacement: '/b\\1'}}\n"
    )

    assert parse(text).routes[0].rewrite.regex == "(?i)^/A(.*)"


@pytest.mark.parametrize(
    ("rewrite", "error"),
    [
        ("{strip_prefix: users}", "rewrite.strip_prefix: must start with '/', got 'users'"),
        ("{add_prefix: v1}", "rewrite.add_prefix: must start with '/', got 'v1'"),
        ("{host: 'a b'}", "rewrite.host: invalid host 'a b'"),
        ("{regex: '(', replacement: x}", "rewrite.regex: invalid regex '('"),
        ("{hots: x}", "rewrite.hots: unknown key 'hots' (did you mean 'host'?)"),
    ],
)
def test_a_malformed_rewrite_is_an_error(rewrite: str, error: str) -> None:
    full = route_error(f"match: {{}}\nupstream: users\nrewrite: {rewrite}\n")

    assert full.startswith(f"routes.yaml:7: routes[0].{error}")


# --- request buffering ---


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("", 1024 * 1024),
        ("request_buffering: true", 1024 * 1024),
        ("request_buffering: false", None),
        ("request_buffering: {max_size: 64KiB}", 64 * 1024),
    ],
)
def test_request_buffering_is_on_by_default_and_takes_a_size(
    line: str, expected: int | None
) -> None:
    route = "  - match: {path: /}\n    upstream: users\n" + (f"    {line}\n" if line else "")
    assert parse(routes(route)).routes[0].request_buffering == expected


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("request_buffering: 5", "routes[0].request_buffering: expected true, false or a mapping"),
        ("request_buffering: {}", "routes[0].request_buffering: missing required key 'max_size'"),
        ("request_buffering: {max_size: 0}", "routes[0].request_buffering.max_size: must be"),
    ],
)
def test_request_buffering_errors(line: str, error: str) -> None:
    assert error in route_error(f"match: {{path: /}}\nupstream: users\n{line}")
