"""`gatehouse explain` and `gatehouse routes`: the config's answer without sending traffic.

`explain` takes a request (method, URL, headers), asks the gateway's own route table which
route it takes, and says why: what the chosen route matched on, why each route that is
tried before it (more specific) did not match, its middleware chain in order, its
upstream and the path the upstream would get. `routes` prints the route table in the
order routes are tried. Both build no pools and open no socket.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from multidict import CIMultiDict

from proxy.config.model import (
    Config,
    HeaderMatch,
    MiddlewareSpec,
    QueryMatch,
    RouteConfig,
    SplitConfig,
)
from proxy.core.canonical import canonical_target, check_authority, check_method
from proxy.core.errors import BadRequest
from proxy.exchange.forward import compile_rewrite
from proxy.exchange.routing import RouteTable, normalize_host


@dataclass
class Explanation:
    """What the config does with one request."""

    method: str
    host: str
    path: str
    query: str
    route: RouteConfig | None
    params: dict[str, str] = field(default_factory=dict)
    # Routes tried before the chosen one (all of them when none matched), each with why
    # it did not match.
    passed_over: list[tuple[RouteConfig, list[str]]] = field(default_factory=list)
    # The chosen route's chain (global_middleware first) and the path its upstream gets
    # after the rewrite; empty when no route matched.
    middleware: tuple[MiddlewareSpec, ...] = ()
    forwarded_path: str = ""
    # Why the gateway answers 400 before routing (the request is not one it serves).
    refused: str = ""


def explain(
    config: Config, method: str, url: str, headers: Sequence[tuple[str, str]] = ()
) -> Explanation:
    """The route `method url` with `headers` takes under `config`, and why. `url` is an
    absolute URL or a path (its host then comes from a Host header, or is empty); it is
    put in canonical form as a front end does (proxy/core/canonical.py), and a request the
    gateway refuses before routing is explained as that refusal."""
    host = next((value for name, value in headers if name.lower() == "host"), "")
    try:
        check_method(method)
        _, path, query, raw_target, authority = canonical_target(
            url.encode("latin-1"), method, config.path_normalization
        )
        if authority is not None:
            host = authority.decode("latin-1")
        check_authority(host.encode("latin-1"))
    except BadRequest as exc:
        return Explanation(method, host, url, "", None, refused=f"{exc.reason}: {exc.message}")
    header_map: CIMultiDict[str] = CIMultiDict(headers)
    table = RouteTable(config.routes)
    match = table.match(method, host, path, header_map, query)
    chosen = match.route if match is not None else None
    passed_over = []
    for route in table.ordered():
        if route is chosen:
            break
        passed_over.append((route, mismatches(route, method, host, path, header_map, query)))
    found = Explanation(
        method, host, path, query, chosen, match.params if match else {}, passed_over
    )
    if chosen is not None:
        found.middleware = (*config.global_middleware, *chosen.middleware)
        rewrite = compile_rewrite(chosen.rewrite)
        sent = raw_target.partition(b"?")[0].decode("latin-1") if chosen.forward_raw_path else path
        found.forwarded_path = rewrite(sent) if rewrite is not None else sent
    return found


def mismatches(
    route: RouteConfig, method: str, host: str, path: str, headers: CIMultiDict[str], query: str
) -> list[str]:
    """Why `route` does not take the request (empty when it does), one reason per
    condition, by the rules of proxy/exchange/routing.py."""
    match = route.match
    reasons: list[str] = []
    wanted = match.host
    if wanted not in (None, "", "*"):
        got = normalize_host(host)
        if wanted.startswith("*."):
            suffix = wanted[1:]
            if not (got.endswith(suffix) and len(got) > len(suffix)):
                reasons.append(f"host {got!r} is not a subdomain of {suffix[1:]!r}")
        elif got != wanted:
            reasons.append(f"host {got!r} is not {wanted!r}")
    if match.path is not None and path != match.path:
        reasons.append(f"path {path!r} is not {match.path!r}")
    if match.path_prefix is not None and not path.startswith(match.path_prefix):
        reasons.append(f"path {path!r} does not start with {match.path_prefix!r}")
    if match.path_regex is not None and re.fullmatch(match.path_regex, path) is None:
        reasons.append(f"path {path!r} does not match the regex {match.path_regex!r}")
    if match.methods is not None and method not in match.methods:
        reasons.append(f"method {method} is not one of {', '.join(match.methods)}")
    for matcher in match.headers:
        reason = _field_reason("header", matcher, headers.getall(matcher.name, []))
        if reason:
            reasons.append(reason)
    if match.query:
        values: dict[str, list[str]] = {}
        for key, value in parse_qsl(query, keep_blank_values=True):
            values.setdefault(key, []).append(value)
        for query_matcher in match.query:
            reason = _field_reason("query", query_matcher, values.get(query_matcher.name, []))
            if reason:
                reasons.append(reason)
    return reasons


def _field_reason(kind: str, matcher: HeaderMatch | QueryMatch, values: list[str]) -> str:
    if not values:
        return f"{kind} {matcher.name!r} is missing"
    if matcher.value is not None and matcher.value not in values:
        return f"{kind} {matcher.name!r} is {values[0]!r}, not {matcher.value!r}"
    if matcher.regex is not None and not any(re.fullmatch(matcher.regex, v) for v in values):
        return f"{kind} {matcher.name!r} is {values[0]!r}, not matching {matcher.regex!r}"
    return ""


def describe_match(route: RouteConfig) -> str:
    """A route's `match`, in one line."""
    match = route.match
    parts = [f"host {match.host}" if match.host else "any host"]
    if match.path is not None:
        parts.append(f"path {match.path}")
    elif match.path_prefix is not None:
        parts.append(f"path_prefix {match.path_prefix}")
    elif match.path_regex is not None:
        parts.append(f"path_regex {match.path_regex}")
    else:
        parts.append("any path")
    parts.append(f"methods {','.join(match.methods)}" if match.methods else "any method")
    parts += [f"header {h.name}{_condition(h)}" for h in match.headers]
    parts += [f"query {q.name}{_condition(q)}" for q in match.query]
    return ", ".join(parts)


def _condition(matcher: HeaderMatch | QueryMatch) -> str:
    if matcher.value is not None:
        return f"={matcher.value}"
    if matcher.regex is not None:
        return f"~{matcher.regex}"
    return " present"


def render_explanation(config: Config, found: Explanation) -> str:
    """The text `gatehouse explain` prints."""
    lines = [f"{found.method} host={found.host or '(none)'} path={found.path}"
             + (f" query={found.query}" if found.query else "")]  # fmt: skip
    route = found.route
    if found.refused:
        lines.append(f"refused before routing: the gateway answers 400 {found.refused}")
        return "\n".join(lines)
    if route is None:
        lines.append("no route matches: the gateway answers 404 no_route")
    else:
        lines.append(f"route: {route.name} (routes[{route.index}]): {describe_match(route)}")
        if found.params:
            params = ", ".join(f"{k}={v}" for k, v in sorted(found.params.items()))
            lines.append(f"  params: {params}")
        names = " -> ".join(f"{spec.name} ({spec.type})" for spec in found.middleware)
        names = names or "(none)"
        lines.append(f"middleware: {names}")
        if not route.upstream:
            lines.append(f"answered by the gateway: {describe_answer(route)}")
            return _with_passed_over(lines, found, route)
        split = route.split
        if split is not None:
            lines.append(f"split: {describe_split(split)}")
        for name in [side.upstream for side in split.sides] if split else [route.upstream]:
            upstream = config.upstreams[name]
            endpoints = ", ".join(
                e.url + (f" weight {e.weight}" if e.weight != 1 else "") for e in upstream.endpoints
            )
            lines.append(
                f"upstream: {upstream.name} ({upstream.protocol}, {upstream.balance.policy}): "
                f"{endpoints}"
            )
        mirror = route.mirror
        if mirror is not None:
            lines.append(
                f"mirror: {mirror.percent:g}% to {mirror.upstream} (bodies up to "
                f"{mirror.max_body} bytes, {mirror.max_in_flight} in flight)"
            )
        forwarded = found.forwarded_path
        target = f"{forwarded}?{found.query}" if found.query else forwarded
        host_note = f", Host: {route.rewrite.host}" if route.rewrite.host else ""
        lines.append(f"forwarded as: {found.method} {target}{host_note}")
    return _with_passed_over(lines, found, route)


def _with_passed_over(lines: list[str], found: Explanation, route: RouteConfig | None) -> str:
    if found.passed_over:
        title = "tried first, did not match:" if route is not None else "routes that did not match:"
        lines.append(title)
        for other, reasons in found.passed_over:
            lines.append(f"  {other.name}: {'; '.join(reasons)}")
    return "\n".join(lines)


def describe_answer(route: RouteConfig) -> str:
    """What a route without an upstream answers: `redirect 301 https://{host}{uri}`,
    `respond 503`."""
    if route.redirect is not None:
        return f"redirect {route.redirect.status} {route.redirect.to}"
    assert route.respond is not None
    return f"respond {route.respond.status}"


def describe_split(split: SplitConfig) -> str:
    """`v1 90%, v2 10%, sticky by cookie session`: a split's sides and their shares."""
    total = sum(side.weight for side in split.sides)
    shares = ", ".join(
        f"{side.upstream} {side.weight * 100 / total:g}% (weight {side.weight})"
        for side in split.sides
    )
    if split.sticky_cookie is not None:
        return f"{shares}, sticky by cookie {split.sticky_cookie}"
    if split.sticky_header is not None:
        return f"{shares}, sticky by header {split.sticky_header}"
    return shares


def render_routes(config: Config) -> str:
    """The text `gatehouse routes` prints: the table, in the order routes are tried."""
    lines = []
    for position, route in enumerate(RouteTable(config.routes).ordered(), 1):
        chain = [spec.name for spec in (*config.global_middleware, *route.middleware)]
        lines.append(
            f"{position:>3}. {route.name}: {describe_match(route)} -> "
            f"{_answered_by(route)}" + (f" [{', '.join(chain)}]" if chain else "")
        )
    return "\n".join(lines)


def _answered_by(route: RouteConfig) -> str:
    if route.split is not None:
        return " | ".join(f"{side.upstream} ({side.weight})" for side in route.split.sides)
    return route.upstream or describe_answer(route)
