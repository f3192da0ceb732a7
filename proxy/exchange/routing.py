"""The route table: compiled once at config load, consulted once per request.

A request is matched on its Host header, its raw path, its method, and optionally its
headers and query parameters. Each route's `match:` (MatchConfig) is compiled once into
an index, so `RouteTable.match` does dictionary lookups rather than a scan of every route.

Matching rules
--------------
- **Host.** The request's Host value is normalised: port dropped (`api.example.com:8443`,
  `[::1]:8080` -> `[::1]`), one trailing dot dropped (`example.com.`), lower-cased
  (RFC 9110 4.2.3: the host is case-insensitive). A route host is exact (`api.example.com`),
  a wildcard (`*.example.com`: one or more labels before `.example.com`, so `a.example.com`
  and `a.b.example.com` but not `example.com` itself), or absent / `*` (any host, including
  an empty one). Route hosts carry no port: the port the client used never matters.
- **Path.** The raw path (before `?`) is matched as received: no percent-decoding, no
  dot-segment or `//` normalisation (the front end rejects what it must). `path` is an exact
  comparison. `path_prefix` is a plain string prefix, as in NGINX `location /prefix` and
  Envoy `prefix`: `/users` matches `/users`, `/users/1` and also `/users-admin`; write
  `/users/` to mean the directory only. `path_regex` must match the whole path
  (`re.fullmatch`); its named groups that took part in the match become `RouteMatch.params`.
  No path matcher means any path.
- **Methods.** Compared exactly (RFC 9110 9.1: method names are case-sensitive); `None` is
  any method. `HEAD` is not implied by `GET` (as in Envoy).
- **Headers.** Names are case-insensitive (RFC 9110 5.1). A matcher gives an exact `value`
  (case-sensitive), a `regex` (full match), or neither (the header must be present). When a
  header is repeated, one matching field line is enough (as in Traefik).
- **Query.** The raw query string (no leading `?`) is parsed with
  `urllib.parse.parse_qsl(keep_blank_values=True)`, so names and values are percent-decoded
  and `?debug` presents `debug` with value `""`. Names and values are case-sensitive; the
  rules are otherwise those of headers. It is parsed only when a candidate route has query
  matchers, and at most once per request.

Specificity: the most specific matching route wins
--------------------------------------------------
Candidates are ranked by, in order:

1. host: exact > wildcard (longer suffix first: `*.eu.example.com` > `*.example.com`) > any;
2. path: exact > regex > prefix (longer prefix first) > any;
3. more header + query matchers first;
4. a route with `methods` before one without;
5. file order (`RouteConfig.index`, then position in the sequence given).

So a host always outranks a path: `api.example.com` with no path beats `*.example.com` with
an exact path. Envoy ranks the same way (virtual host by domain first, then routes within
it) except that it uses file order inside a virtual host; NGINX ranks server_name first, then
`location =` > longest prefix. `specificity_key` is this rule as a sort key, and
`RouteTable.ordered` lists the routes in this order.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl

from multidict import CIMultiDict, CIMultiDictProxy
from mypy_extensions import mypyc_attr

from proxy.config.model import HeaderMatch, QueryMatch, RouteConfig

logger = logging.getLogger(__name__)

# Ranks within each specificity level; lower sorts first.
_HOST_EXACT, _HOST_WILDCARD, _HOST_ANY = 0, 1, 2
_PATH_EXACT, _PATH_REGEX, _PATH_PREFIX, _PATH_ANY = 0, 1, 2, 3

_NO_VALUES: tuple[str, ...] = ()


class RouteMatch:
    """The route chosen for a request, with the named groups of its `path_regex`. (A plain
    class: one is made per request, and a dataclass's __init__ stays interpreted in the
    compiled build.)"""

    __slots__ = ("params", "route")

    def __init__(self, route: RouteConfig, params: dict[str, str]) -> None:
        self.route = route
        self.params = params  # named groups of path_regex that took part; empty otherwise

    def __repr__(self) -> str:
        return f"RouteMatch(route={self.route.name!r}, params={self.params!r})"


def normalize_host(host: str) -> str:
    """Return a Host header value as routing compares it: without port, lower-cased.

    `API.Example.com:8080` -> `api.example.com`; `[::1]:8080` -> `[::1]`; `example.com.`
    -> `example.com`; `""` -> `""`. A bare IPv6 address (several colons, no brackets, not
    valid in Host per RFC 9110 7.2) is only lower-cased. Never raises.
    """
    if host.startswith("["):
        end = host.find("]")
        if end != -1:
            host = host[: end + 1]
    else:
        colon = host.find(":")
        if colon != -1 and host.find(":", colon + 1) == -1:
            host = host[:colon]
    if host.endswith("."):
        host = host[:-1]
    return host.lower()


def _host_pattern(route: RouteConfig) -> tuple[int, str]:
    """Classify a route's host as (rank, key): the exact host, or the wildcard suffix with
    its leading dot (`*.example.com` -> `.example.com`).

    Raises:
        ValueError: the host has a port, or a `*` anywhere but a leading `*.` label.
    """
    host = route.match.host
    if host is None or host in ("", "*"):
        return _HOST_ANY, ""
    wildcard = host.startswith("*.")
    bare = host[1:] if wildcard else host
    normalized = normalize_host(bare)
    if "*" in bare or normalized in ("", "."):
        raise ValueError(f"route {route.name!r}: host {host!r}: only a leading '*.' is allowed")
    if normalized != bare.lower().removesuffix("."):
        raise ValueError(f"route {route.name!r}: host {host!r}: a route host has no port")
    if wildcard:
        return _HOST_WILDCARD, normalized
    return _HOST_EXACT, normalized


def specificity_key(route: RouteConfig) -> tuple[int, int, int, int, int, int, int]:
    """The sort key of the specificity rule (module docstring): lower is more specific.

    Ties beyond `route.index` are left to a stable sort, that is to sequence order.

    Raises:
        ValueError: the route's host pattern is malformed (see `RouteTable`).
    """
    match = route.match
    host_rank, host_key = _host_pattern(route)
    if match.path is not None:
        path_rank, path_len = _PATH_EXACT, 0
    elif match.path_regex is not None:
        path_rank, path_len = _PATH_REGEX, 0
    elif match.path_prefix is not None:
        path_rank, path_len = _PATH_PREFIX, len(match.path_prefix)
    else:
        path_rank, path_len = _PATH_ANY, 0
    return (
        host_rank,
        -len(host_key) if host_rank == _HOST_WILDCARD else 0,
        path_rank,
        -path_len,
        -(len(match.headers) + len(match.query)),
        0 if match.methods is not None else 1,
        route.index,
    )


# A keep-alive client repeats its Host on every request; remembering a few thousand
# normalizations saves a per-request lower()/split.
_HOST_CACHE_SIZE = 4096
HeaderSource = Mapping[str, str] | Callable[[], Mapping[str, str]]


class _Request:
    """One request's fields as routing sees them; headers and query are indexed lazily,
    at most once, and only if a candidate route has such matchers."""

    __slots__ = ("_header_index", "_query_index", "headers", "method", "path", "query")

    def __init__(self, method: str, path: str, headers: HeaderSource, query: str) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.query = query
        self._header_index: dict[str, list[str]] | None = None
        self._query_index: dict[str, list[str]] | None = None

    def header_values(self, name: str) -> Sequence[str]:
        """All values of header `name` (given lower-cased), in order."""
        headers = self.headers
        if callable(headers):  # built on demand: most tables never look at headers
            headers = self.headers = headers()
        if isinstance(headers, CIMultiDict | CIMultiDictProxy):
            values: list[str] = headers.getall(name, [])
            return values
        index = self._header_index
        if index is None:
            index = {}
            for key, value in headers.items():
                index.setdefault(key.lower(), []).append(value)
            self._header_index = index
        return index.get(name, _NO_VALUES)

    def query_values(self, name: str) -> Sequence[str]:
        """All values of query parameter `name`, in order."""
        index = self._query_index
        if index is None:
            index = {}
            for key, value in parse_qsl(self.query, keep_blank_values=True):
                index.setdefault(key, []).append(value)
            self._query_index = index
        return index.get(name, _NO_VALUES)


@dataclass(frozen=True, slots=True)
class _ValueMatcher:
    """A compiled HeaderMatch or QueryMatch."""

    name: str  # lower-cased for headers
    value: str | None
    regex: re.Pattern[str] | None

    def accepts(self, values: Sequence[str]) -> bool:
        """Whether any of the field's values satisfies the matcher."""
        if self.value is not None:
            return self.value in values
        regex = self.regex
        if regex is not None:
            return any(regex.fullmatch(value) is not None for value in values)
        return len(values) > 0


@dataclass(frozen=True, slots=True)
class _CompiledRoute:
    """A route's matchers compiled once (exact and prefix paths are tested by the index)."""

    route: RouteConfig
    methods: frozenset[str] | None
    regex: re.Pattern[str] | None
    headers: tuple[_ValueMatcher, ...]
    query: tuple[_ValueMatcher, ...]

    def accepts_fields(self, request: _Request) -> bool:
        """Whether every header and query matcher accepts the request."""
        return all(m.accepts(request.header_values(m.name)) for m in self.headers) and all(
            m.accepts(request.query_values(m.name)) for m in self.query
        )


def _first_match(candidates: Sequence[_CompiledRoute], request: _Request) -> RouteMatch | None:
    """The first candidate (they are in specificity order) that accepts the request."""
    for compiled in candidates:
        methods = compiled.methods
        if methods is not None and request.method not in methods:
            continue
        params: dict[str, str] = {}
        regex = compiled.regex
        if regex is not None:
            found = regex.fullmatch(request.path)
            if found is None:
                continue
            params = {k: v for k, v in found.groupdict().items() if v is not None}
        if (compiled.headers or compiled.query) and not compiled.accepts_fields(request):
            continue
        return RouteMatch(compiled.route, params)
    return None


class _PathIndex:
    """The routes of one host bucket, indexed by path matcher."""

    __slots__ = ("any", "exact", "prefixes", "regex")

    def __init__(self) -> None:
        self.exact: dict[str, list[_CompiledRoute]] = {}
        self.regex: list[_CompiledRoute] = []
        # (prefix length, {prefix: routes}), longest first: at most one prefix of each
        # length can match a path, so a lookup costs one dict probe per distinct length.
        self.prefixes: list[tuple[int, dict[str, list[_CompiledRoute]]]] = []
        self.any: list[_CompiledRoute] = []

    def add(self, compiled: _CompiledRoute) -> None:
        """Append a route; routes must be added in specificity order."""
        match = compiled.route.match
        if match.path is not None:
            self.exact.setdefault(match.path, []).append(compiled)
        elif match.path_regex is not None:
            self.regex.append(compiled)
        elif match.path_prefix is not None:
            prefix = match.path_prefix
            for length, table in self.prefixes:
                if length == len(prefix):
                    table.setdefault(prefix, []).append(compiled)
                    break
            else:
                # Specificity order puts longer prefixes first, so appending keeps the
                # list sorted by length, longest first.
                self.prefixes.append((len(prefix), {prefix: [compiled]}))
        else:
            self.any.append(compiled)

    def lookup(self, request: _Request) -> RouteMatch | None:
        """The most specific route of this bucket that accepts the request."""
        path = request.path
        if self.exact:
            candidates = self.exact.get(path)
            if candidates is not None:
                found = _first_match(candidates, request)
                if found is not None:
                    return found
        if self.regex:
            found = _first_match(self.regex, request)
            if found is not None:
                return found
        path_len = len(path)
        for length, table in self.prefixes:
            if length > path_len:
                continue
            candidates = table.get(path[:length])
            if candidates is not None:
                found = _first_match(candidates, request)
                if found is not None:
                    return found
        if self.any:
            return _first_match(self.any, request)
        return None


def _compile_field(
    route: RouteConfig, kind: str, matcher: HeaderMatch | QueryMatch
) -> _ValueMatcher:
    if matcher.value is not None and matcher.regex is not None:
        raise ValueError(
            f"route {route.name!r}: {kind} {matcher.name!r}: give value or regex, not both"
        )
    regex = None
    if matcher.regex is not None:
        try:
            regex = re.compile(matcher.regex)
        except re.error as exc:
            raise ValueError(
                f"route {route.name!r}: {kind} {matcher.name!r}: bad regex: {exc}"
            ) from exc
    name = matcher.name.lower() if kind == "header" else matcher.name
    return _ValueMatcher(name, matcher.value, regex)


def _compile(route: RouteConfig) -> _CompiledRoute:
    match = route.match
    if sum(p is not None for p in (match.path, match.path_prefix, match.path_regex)) > 1:
        raise ValueError(
            f"route {route.name!r}: at most one of path, path_prefix, path_regex is allowed"
        )
    if match.methods is not None and not match.methods:
        raise ValueError(f"route {route.name!r}: methods is empty (leave it out for any)")
    regex = None
    if match.path_regex is not None:
        try:
            regex = re.compile(match.path_regex)
        except re.error as exc:
            raise ValueError(f"route {route.name!r}: path_regex: bad regex: {exc}") from exc
    return _CompiledRoute(
        route=route,
        methods=frozenset(match.methods) if match.methods is not None else None,
        regex=regex,
        headers=tuple(_compile_field(route, "header", m) for m in match.headers),
        query=tuple(_compile_field(route, "query", m) for m in match.query),
    )


# A test counts the dispatcher's lookups with a subclass (tests/proxy/exchange/test_dispatch.py).
@mypyc_attr(allow_interpreted_subclasses=True)
class RouteTable:
    """The routes of one config, compiled into host and path indexes.

    Immutable after construction, so a reload builds a new table and swaps it in.

    Raises (from the constructor):
        ValueError: a route cannot be compiled: bad regex, a host with a port or a `*`
            other than a leading `*.`, several path matchers, empty `methods`. The config
            loader refuses these first, so at runtime this is a bug.
    """

    __slots__ = ("_any_host", "_exact_hosts", "_hosts", "_ordered", "_wildcard_hosts")

    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        keyed = sorted(((specificity_key(r), r) for r in routes), key=lambda kr: kr[0])
        self._ordered = [route for _, route in keyed]
        self._exact_hosts: dict[str, _PathIndex] = {}
        self._wildcard_hosts: dict[str, _PathIndex] = {}  # ".example.com" -> routes
        self._any_host: _PathIndex | None = None
        self._hosts: dict[str, str] = {}  # Host header as received -> normalized
        for route in self._ordered:
            rank, key = _host_pattern(route)
            if rank == _HOST_EXACT:
                index = self._exact_hosts.setdefault(key, _PathIndex())
            elif rank == _HOST_WILDCARD:
                index = self._wildcard_hosts.setdefault(key, _PathIndex())
            else:
                if self._any_host is None:
                    self._any_host = _PathIndex()
                index = self._any_host
            index.add(_compile(route))
        logger.debug("route table compiled: %r", self)

    def match(
        self, method: str, host: str, path: str, headers: HeaderSource, query: str
    ) -> RouteMatch | None:
        """The most specific route for a request, or None (a 404).

        `headers` is a mapping, or a function returning one (called only if a candidate
        route matches on headers). `host` is the Host header (or h2 `:authority`) as
        received, `path` the raw path before `?`, `query` the raw query string without
        `?` (`""` when there is none).
        Never raises; any exception is a bug.
        """
        request = _Request(method, path, headers, query)
        normalized = self._hosts.get(host)
        if normalized is None:
            normalized = normalize_host(host)
            if len(self._hosts) < _HOST_CACHE_SIZE:  # bounded: Host is client-controlled
                self._hosts[host] = normalized
        host = normalized
        index = self._exact_hosts.get(host)
        if index is not None:
            found = index.lookup(request)
            if found is not None:
                return found
        wildcards = self._wildcard_hosts
        if wildcards:
            # Every suffix of the host that starts at a dot after a non-empty label,
            # longest first: a.b.example.com -> .b.example.com, .example.com, .com
            dot = host.find(".", 1)
            while dot != -1:
                index = wildcards.get(host[dot:])
                if index is not None:
                    found = index.lookup(request)
                    if found is not None:
                        return found
                dot = host.find(".", dot + 1)
        if self._any_host is not None:
            return self._any_host.lookup(request)
        return None

    def ordered(self) -> list[RouteConfig]:
        """All routes, most specific first: the order in which they are tried."""
        return list(self._ordered)

    def __len__(self) -> int:
        return len(self._ordered)

    def __repr__(self) -> str:
        return (
            f"<RouteTable routes={len(self._ordered)} exact_hosts={len(self._exact_hosts)}"
            f" wildcard_hosts={len(self._wildcard_hosts)} any_host={self._any_host is not None}>"
        )
