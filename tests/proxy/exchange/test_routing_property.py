"""RouteTable.match agrees with a brute-force reference on random route sets and requests.

The reference knows nothing of the table's indexes: it sorts every route by the
specificity rule of proxy/exchange/routing.py's docstring, written out again here, and returns the
first route whose matchers all accept the request.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import parse_qsl

from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy.config.model import HeaderMatch, MatchConfig, QueryMatch, RouteConfig
from proxy.exchange.routing import RouteTable

# Small alphabets, so that random routes and requests collide often.
LABELS = ["a", "b", "api", "example", "com"]
ROUTE_HOSTS = ["a.example.com", "api.example.com", "example.com", "b.a.example.com", "[::1]"]
WILDCARD_SUFFIXES = ["example.com", "a.example.com", "com", "b.com"]
PATHS = ["/", "/a", "/a/", "/a/b", "/ab", "/b", "/a/b/c", "", "/A"]
REGEXES = [r"/(?P<x>[a-z]+)", r"/a/.*", r"/[ab]+", r"/a(/(?P<rest>.*))?", r".*"]
METHODS = ["GET", "POST", "PUT"]
HEADER_NAMES = ["X-A", "x-b"]
QUERY_NAMES = ["q", "Q", "r"]
VALUES = ["1", "2", "", "a b"]
VALUE_REGEXES = [r"\d", r"[12]?", r".+"]


def value_matchers(names: list[str]) -> st.SearchStrategy[tuple[str, str | None, str | None]]:
    return st.tuples(
        st.sampled_from(names),
        st.none() | st.sampled_from(VALUES),
        st.none() | st.sampled_from(VALUE_REGEXES),
    ).map(lambda t: (t[0], t[1], None) if t[1] is not None else t)


@st.composite
def match_configs(draw: st.DrawFn) -> MatchConfig:
    host_kind = draw(st.sampled_from(["none", "star", "exact", "wildcard"]))
    host = {
        "none": None,
        "star": "*",
        "exact": draw(st.sampled_from(ROUTE_HOSTS)),
        "wildcard": "*." + draw(st.sampled_from(WILDCARD_SUFFIXES)),
    }[host_kind]
    path_kind = draw(st.sampled_from(["none", "path", "path_prefix", "path_regex"]))
    path_fields: dict[str, str] = {}
    if path_kind == "path_regex":
        path_fields["path_regex"] = draw(st.sampled_from(REGEXES))
    elif path_kind != "none":
        path_fields[path_kind] = draw(st.sampled_from(PATHS))
    methods = draw(st.none() | st.lists(st.sampled_from(METHODS), min_size=1, max_size=2))
    headers = draw(st.lists(value_matchers(HEADER_NAMES), max_size=2))
    query = draw(st.lists(value_matchers(QUERY_NAMES), max_size=2))
    return MatchConfig(
        host=host,
        methods=tuple(methods) if methods is not None else None,
        headers=tuple(HeaderMatch(n, value=v, regex=r) for n, v, r in headers),
        query=tuple(QueryMatch(n, value=v, regex=r) for n, v, r in query),
        **path_fields,
    )


@st.composite
def route_sets(draw: st.DrawFn) -> list[RouteConfig]:
    matches = draw(st.lists(match_configs(), max_size=12))
    # Few distinct indexes, so ties on index (left to sequence order) happen too.
    return [
        RouteConfig(
            name=f"r{i}", match=m, upstream="u", index=draw(st.integers(min_value=0, max_value=4))
        )
        for i, m in enumerate(matches)
    ]


@st.composite
def request_hosts(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["labels", "ipv6", "empty"]))
    if kind == "empty":
        return ""
    if kind == "ipv6":
        host = "[::1]"
    else:
        host = ".".join(draw(st.lists(st.sampled_from(LABELS), min_size=1, max_size=4)))
        host = "".join(c.upper() if draw(st.booleans()) else c for c in host)
        if draw(st.booleans()):
            host += "."
    if draw(st.booleans()):
        host += f":{draw(st.integers(min_value=0, max_value=65535))}"
    return host


@st.composite
def request_paths(draw: st.DrawFn) -> str:
    segments = draw(st.lists(st.sampled_from(["a", "b", "ab", "A", "c", ""]), max_size=4))
    return "/" + "/".join(segments) if draw(st.booleans()) else draw(st.sampled_from(PATHS))


@st.composite
def request_headers(draw: st.DrawFn) -> Mapping[str, str]:
    names = [*HEADER_NAMES, "X-C"]
    pairs = draw(st.lists(st.tuples(st.sampled_from(names), st.sampled_from(VALUES)), max_size=4))
    pairs = [(n.upper() if draw(st.booleans()) else n.lower(), v) for n, v in pairs]
    if draw(st.booleans()):
        return CIMultiDict(pairs)
    return dict(pairs)


def request_queries() -> st.SearchStrategy[str]:
    part = st.sampled_from(["q=1", "q=2", "Q=1", "r", "r=", "r=a+b", "q=a%20b", "s=1"])
    return st.lists(part, max_size=4).map("&".join)


# --- the reference -----------------------------------------------------------------------


def reference_host(raw: str) -> str:
    if raw.startswith("["):
        host = raw[: raw.index("]") + 1]
    else:
        host = raw.split(":")[0] if raw.count(":") == 1 else raw
    return host.removesuffix(".").lower()


def reference_key(route: RouteConfig) -> tuple[int, ...]:
    m = route.match
    if m.host is None or m.host == "*":
        host_rank = (2, 0)
    elif m.host.startswith("*."):
        host_rank = (1, -len(m.host))
    else:
        host_rank = (0, 0)
    if m.path is not None:
        path_rank = (0, 0)
    elif m.path_regex is not None:
        path_rank = (1, 0)
    elif m.path_prefix is not None:
        path_rank = (2, -len(m.path_prefix))
    else:
        path_rank = (3, 0)
    return (
        *host_rank,
        *path_rank,
        -(len(m.headers) + len(m.query)),
        0 if m.methods else 1,
        route.index,
    )


def accepts(values: list[str], value: str | None, regex: str | None) -> bool:
    if value is not None:
        return value in values
    if regex is not None:
        return any(re.fullmatch(regex, v) for v in values)
    return bool(values)


def reference_match(
    routes: list[RouteConfig],
    method: str,
    host: str,
    path: str,
    headers: Mapping[str, str],
    query: str,
) -> tuple[str, dict[str, str]] | None:
    host = reference_host(host)
    header_items = headers.items()
    query_items = parse_qsl(query, keep_blank_values=True)
    for route in sorted(routes, key=reference_key):
        m = route.match
        if m.host is not None and m.host != "*":
            if m.host.startswith("*."):
                suffix = m.host[1:]
                if not (host.endswith(suffix) and len(host) > len(suffix)):
                    continue
            elif host != m.host:
                continue
        params: dict[str, str] = {}
        if m.path is not None and path != m.path:
            continue
        if m.path_prefix is not None and not path.startswith(m.path_prefix):
            continue
        if m.path_regex is not None:
            found = re.fullmatch(m.path_regex, path)
            if found is None:
                continue
            params = {k: v for k, v in found.groupdict().items() if v is not None}
        if m.methods is not None and method not in m.methods:
            continue
        if not all(
            accepts([v for k, v in header_items if k.lower() == h.name.lower()], h.value, h.regex)
            for h in m.headers
        ):
            continue
        if not all(
            accepts([v for k, v in query_items if k == q.name], q.value, q.regex) for q in m.query
        ):
            continue
        return route.name, params
    return None


# --- the properties ----------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(
    routes=route_sets(),
    requests=st.lists(
        st.tuples(
            st.sampled_from([*METHODS, "DELETE", "get"]),
            request_hosts(),
            request_paths(),
            request_headers(),
            request_queries(),
        ),
        min_size=1,
        max_size=5,
    ),
)
def test_match_agrees_with_linear_scan_in_specificity_order(
    routes: list[RouteConfig],
    requests: list[tuple[str, str, str, Mapping[str, str], str]],
) -> None:
    table = RouteTable(routes)
    for method, host, path, headers, query in requests:
        found = table.match(method, host, path, headers, query)
        got = None if found is None else (found.route.name, found.params)
        assert got == reference_match(routes, method, host, path, headers, query)


@settings(max_examples=200, deadline=None)
@given(routes=route_sets())
def test_ordered_is_the_specificity_order(routes: list[RouteConfig]) -> None:
    expected = [r.name for r in sorted(routes, key=reference_key)]
    assert [r.name for r in RouteTable(routes).ordered()] == expected
