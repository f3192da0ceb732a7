"""The `routes` section of routes.yaml: each route's match (host, path, methods, headers,
query), its upstream, rewrite and body limit. `read_routes` is the section; it checks each
route against what `upstreams`, `middleware` and `path_normalization` recorded in the
`LoadContext`, so `proxy/config/load.py` reads those first."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from contextlib import suppress
from functools import partial
from typing import TypeVar

from yaml.nodes import MappingNode, Node, ScalarNode

from proxy.config.answers import read_redirect, read_respond
from proxy.config.context import LoadContext
from proxy.config.keys import (
    MATCH,
    MATCH_VALUE,
    REQUEST_BUFFERING,
    REWRITE,
    ROUTE,
    WEBSOCKET,
)
from proxy.config.middleware import read_chain
from proxy.config.model import (
    DEFAULT_REQUEST_BUFFER_BYTES,
    HeaderMatch,
    MatchConfig,
    QueryMatch,
    RewriteConfig,
    RouteConfig,
    SplitConfig,
    WebSocketConfig,
)
from proxy.config.reader import NodeReader, Reported, did_you_mean, join_path
from proxy.config.spec import keys_of, required_of
from proxy.config.traffic import read_mirror, read_split
from proxy.config.values import parse_host_pattern
from proxy.core.canonical import InvalidTarget, normalize_path

_PATH_KEYS = ("path", "path_prefix", "path_regex")
_ANSWER_KEYS = ("upstream", "redirect", "respond")  # what answers a route's requests
_FORWARDING_KEYS = ("rewrite", "websocket", "forward_raw_path", "request_buffering", "mirror")
_BUFFER: int | None = DEFAULT_REQUEST_BUFFER_BYTES  # request_buffering's default
_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 5.6.2: methods, field names
_REWRITE_HOST_RE = re.compile(r"[^\s/?#@]+")
_M = TypeVar("_M", HeaderMatch, QueryMatch)


def _misspelt(node: Node, keys: tuple[str, ...]) -> bool:
    """Whether a key of mapping `node` is a misspelling of one of `keys` (which the
    reader has reported with a did-you-mean)."""
    written = [key.value for key, _ in node.value if isinstance(key.value, str)]
    return any(key not in keys and difflib.get_close_matches(key, keys, n=1) for key in written)


def _derive_route_name(match: MatchConfig) -> str:
    """`api.example.com/users*`, `/exact`, `~^/re$`, `/*` for a route without `name:`."""
    if match.path is not None:
        path = match.path
    elif match.path_prefix is not None:
        path = match.path_prefix + "*"
    elif match.path_regex is not None:
        path = "~" + match.path_regex
    else:
        path = "/*"
    return (match.host or "") + path


def _replacement_problem(regex: str, replacement: str) -> str | None:
    """Why `replacement` is not a valid `re` template for `regex`, or None if it is."""
    try:  # The same groups as `regex`, but it matches "", so the template can be expanded.
        probe = re.compile(f"(?:{regex})|").match("")
    except re.error:  # e.g. global flags, which must lead the pattern: skip the check
        return None
    try:
        if probe is not None:
            probe.expand(replacement)
    except (re.error, IndexError) as exc:
        return str(exc)
    return None


def read_routes(
    reader: NodeReader, context: LoadContext, node: Node, path: str
) -> tuple[RouteConfig, ...]:
    """`routes`, in file order (the first that matches a request wins). A route with an
    error is left out, and the others are still read.

    Raises:
        Reported: not a list (recorded).
    """
    routes: list[RouteConfig] = []
    names: dict[str, str] = {}
    for index, (item, item_path) in enumerate(reader.items(node, path)):
        with suppress(Reported):
            routes.append(_route(reader, context, item, item_path, index, names))
    return tuple(routes)


def _route(
    reader: NodeReader,
    context: LoadContext,
    node: Node,
    path: str,
    index: int,
    names: dict[str, str],
) -> RouteConfig:
    fields = reader.mapping(node, path, keys_of(ROUTE), required_of(ROUTE))
    errors_before = reader.error_count
    match = fields.get("match", partial(_match, reader, context), MatchConfig())
    name = fields.get("name", reader.name, "")
    if "name" not in fields and reader.error_count == errors_before:
        name = _derive_route_name(match)  # (a name derived from a bad match is noise)
    if name in names:
        key_path, hint = fields.key_path("name"), ""
        if "name" not in fields:
            key_path, hint = path, " (derived from its match: give the route a name)"
        message = f"duplicate route name {name!r} (also {names[name]}){hint}"
        reader.error(fields.nodes.get("name", node), key_path, message)
    elif name:
        names[name] = path
    upstream_ref = partial(_upstream_ref, reader, context)
    no_upstream: tuple[str, SplitConfig | None] = ("", None)
    upstream, split = fields.get("upstream", partial(_upstream, reader, context), no_upstream)
    answers = [key for key in _ANSWER_KEYS if key in fields]
    if not answers and not _misspelt(node, _ANSWER_KEYS):  # (a misspelling is reported)
        reader.error(node, path, "missing required key 'upstream' (or give redirect or respond)")
    for extra in answers[1:]:
        fields.error(extra, f"give one of upstream, redirect, respond (also {answers[0]})")
    params = tuple(re.compile(match.path_regex).groupindex) if match.path_regex else ()
    redirect = fields.get("redirect", partial(read_redirect, reader, params=params), None)
    respond = fields.get("respond", partial(read_respond, reader), None)
    sides = [side.upstream for side in split.sides] if split is not None else [upstream]
    # (A split route tunnels WebSocket only when every side can.)
    protocols = [context.upstream_protocols.get(side, "http1") for side in sides]
    protocol = next((found for found in protocols if found != "http1"), "http1")
    # On by default where the upstream hop can be an HTTP/1.1 Upgrade (never on a route
    # that answers itself).
    websocket = fields.get(
        "websocket",
        partial(_websocket, reader),
        WebSocketConfig(enabled=protocol == "http1" and "upstream" in fields),
    )
    if "upstream" not in fields:
        for key in _FORWARDING_KEYS:
            if key in fields and (key != "websocket" or websocket.enabled):
                fields.error(key, f"{key} is about forwarding: this route answers itself")
    if "websocket" in fields and websocket.enabled and protocol != "http1":
        fields.error(
            "websocket",
            f"WebSocket needs an HTTP/1.1 upstream (upstream {upstream!r} is {protocol})",
        )
    mirror = fields.get("mirror", partial(read_mirror, reader, upstream_ref=upstream_ref), None)
    return RouteConfig(
        name=name,
        match=match,
        upstream=upstream,
        rewrite=fields.get("rewrite", partial(_rewrite, reader), RewriteConfig()),
        max_body_size=fields.get("max_body_size", reader.optional(reader.size), None),
        websocket=websocket,
        middleware=fields.get("middleware", partial(read_chain, reader, context), ()),
        forward_raw_path=fields.get("forward_raw_path", reader.boolean, False),
        request_buffering=fields.get(
            "request_buffering", partial(_request_buffering, reader), _BUFFER
        ),
        index=index,
        redirect=redirect,
        respond=respond,
        split=split,
        mirror=mirror,
    )


def _websocket(reader: NodeReader, node: Node, path: str) -> WebSocketConfig:
    """`websocket: true|false`, or a mapping of the tunnels' deadlines (on)."""
    enabled = _switch(reader, node, path)
    if enabled is not None:
        return WebSocketConfig(enabled=enabled)
    fields = reader.mapping(node, path, keys_of(WEBSOCKET))
    positive = reader.optional(reader.positive_duration)
    return WebSocketConfig(
        enabled=fields.get("enabled", reader.boolean, True),
        idle_timeout=fields.get("idle_timeout", positive, None),
        max_duration=fields.get("max_duration", positive, None),
    )


def _request_buffering(reader: NodeReader, node: Node, path: str) -> int | None:
    """`request_buffering: true|false`, or `{max_size: SIZE}` (on)."""
    enabled = _switch(reader, node, path)
    if enabled is not None:
        return DEFAULT_REQUEST_BUFFER_BYTES if enabled else None
    fields = reader.mapping(node, path, keys_of(REQUEST_BUFFERING), required_of(REQUEST_BUFFERING))
    return fields.get("max_size", reader.positive_size, DEFAULT_REQUEST_BUFFER_BYTES)


def _switch(reader: NodeReader, node: Node, path: str) -> bool | None:
    """A setting written `true`/`false`, or as a mapping of its options (which turns it
    on): the boolean, or None for a mapping.

    Raises:
        Reported: neither (recorded).
    """
    if isinstance(node, MappingNode):
        return None
    enabled = reader.value(node, path)
    if not isinstance(enabled, bool):
        raise reader.type_error(node, path, "true, false or a mapping")
    return enabled


def _upstream(
    reader: NodeReader, context: LoadContext, node: Node, path: str
) -> tuple[str, SplitConfig | None]:
    """A route's `upstream`: a name, or a weighted split (proxy/config/traffic.py), whose
    first side stands for the route where one upstream is asked for."""
    if isinstance(node, ScalarNode):
        return _upstream_ref(reader, context, node, path), None
    split = read_split(reader, node, path, partial(_upstream_ref, reader, context))
    return split.sides[0].upstream, split


def _upstream_ref(reader: NodeReader, context: LoadContext, node: Node, path: str) -> str:
    name = reader.string(node, path)
    known = context.upstream_names
    if known is not None and name not in known:
        hint = did_you_mean(name, sorted(known)) if known else " (no upstreams are defined)"
        raise reader.error(node, path, f"unknown upstream {name!r}{hint}")
    return name


def _match(reader: NodeReader, context: LoadContext, node: Node, path: str) -> MatchConfig:
    fields = reader.mapping(node, path, keys_of(MATCH))
    given = [key for key in _PATH_KEYS if key in fields]
    for extra in given[1:]:
        fields.error(extra, f"give at most one of path, path_prefix, path_regex ({given[0]})")
    return MatchConfig(
        host=fields.get("host", partial(_host_pattern, reader), None),
        path=fields.get("path", partial(_match_path, reader, context), None),
        path_prefix=fields.get("path_prefix", partial(_match_path, reader, context), None),
        path_regex=fields.get("path_regex", reader.regex, None),
        methods=fields.get("methods", partial(_methods, reader), None),
        headers=fields.get("headers", partial(_headers, reader), ()),
        query=fields.get("query", partial(_query, reader), ()),
    )


def _host_pattern(reader: NodeReader, node: Node, path: str) -> str | None:
    return reader.convert(node, path, parse_host_pattern, "a host like 'api.example.com'")


def _path(reader: NodeReader, node: Node, path: str) -> str:
    value = reader.string(node, path)
    if not value.startswith("/"):
        raise reader.error(node, path, f"must start with '/', got {value!r}")
    return value


def _match_path(reader: NodeReader, context: LoadContext, node: Node, path: str) -> str:
    """A `path` or `path_prefix`: requests are routed on their canonical path
    (proxy/core/canonical.py), so a matcher in any other form could never match as
    written."""
    value = _path(reader, node, path)
    try:
        canonical = normalize_path(value, context.path_normalization)
    except InvalidTarget as exc:
        raise reader.error(node, path, f"{value!r} can never match: {exc}") from None
    if canonical != value:
        message = (
            f"{value!r} can never match: requests are routed on their canonical path"
            f" (write {canonical!r})"
        )
        raise reader.error(node, path, message)
    return value


def _methods(reader: NodeReader, node: Node, path: str) -> tuple[str, ...]:
    methods: dict[str, None] = {}  # ordered set: duplicates are harmless
    for item, item_path in reader.nonempty_items(
        node, path, "must not be empty (leave it out for any method)"
    ):
        with suppress(Reported):
            method = reader.string(item, item_path).upper()
            if not _TOKEN_RE.fullmatch(method):
                raise reader.error(item, item_path, f"invalid method {method!r}")
            methods[method] = None
    return tuple(methods)


def _headers(reader: NodeReader, node: Node, path: str) -> tuple[HeaderMatch, ...]:
    return _value_matches(reader, node, path, HeaderMatch, header=True)


def _query(reader: NodeReader, node: Node, path: str) -> tuple[QueryMatch, ...]:
    return _value_matches(reader, node, path, QueryMatch, header=False)


def _value_matches(
    reader: NodeReader,
    node: Node,
    path: str,
    kind: Callable[[str, str | None, str | None], _M],
    header: bool,
) -> tuple[_M, ...]:
    matches: list[_M] = []
    seen: dict[str, str] = {}
    for key_node, key, value in reader.entries(node, path):
        item_path = join_path(path, key)
        name = key.lower() if header else key
        if header and not _TOKEN_RE.fullmatch(key):
            reader.error(key_node, item_path, f"invalid header name {key!r}")
        elif not key:
            reader.error(key_node, item_path, "the parameter name must not be empty")
        elif name in seen:  # header names differ only in case
            reader.error(key_node, item_path, f"duplicate header {key!r} (also {seen[name]})")
        seen[name] = item_path
        with suppress(Reported):
            matches.append(kind(name, *_value_match(reader, value, item_path)))
    return tuple(matches)


def _value_match(reader: NodeReader, node: Node, path: str) -> tuple[str | None, str | None]:
    """(value, regex) of a header or query match: a scalar is an exact value. Both are
    hidden in /config (a match on a secret header value is a credential)."""
    if reader.value(node, path) is not node:
        reader.conceal(node)
        return reader.text(node, path), None
    errors_before = reader.error_count
    fields = reader.mapping(node, path, keys_of(MATCH_VALUE))
    for key in ("value", "regex"):
        if key in fields:
            reader.conceal(fields.nodes[key])
    if not fields.nodes and reader.error_count > errors_before:
        raise Reported  # only unknown keys, already reported
    if len(fields.nodes) != 1:
        raise reader.error(node, path, "expected exactly one of value, regex, present: true")
    if not fields.get("present", reader.boolean, True):
        raise fields.error("present", "only 'present: true' is supported")
    value = fields.get("value", reader.text, None)
    regex = fields.get("regex", reader.regex, None)
    if value is None and regex is None and "present" not in fields:
        raise Reported  # the error is recorded
    return value, regex


def _rewrite(reader: NodeReader, node: Node, path: str) -> RewriteConfig:
    fields = reader.mapping(node, path, keys_of(REWRITE))
    rewrite = RewriteConfig(
        strip_prefix=fields.get("strip_prefix", partial(_path, reader), None),
        add_prefix=fields.get("add_prefix", partial(_path, reader), None),
        regex=fields.get("regex", reader.regex, None),
        replacement=fields.get("replacement", reader.string, None),
        host=fields.get("host", partial(_rewrite_host, reader), None),
    )
    for given, needs in (("regex", "replacement"), ("replacement", "regex")):
        if given in fields and needs not in fields:
            fields.error(given, f"{given} needs {needs} (give both or neither)")
    if rewrite.regex is not None and rewrite.replacement is not None:
        problem = _replacement_problem(rewrite.regex, rewrite.replacement)
        if problem:
            fields.error("replacement", f"invalid replacement: {problem}")
    return rewrite


def _rewrite_host(reader: NodeReader, node: Node, path: str) -> str:
    host = reader.string(node, path)
    if not _REWRITE_HOST_RE.fullmatch(host):
        raise reader.error(node, path, f"invalid host {host!r}")
    return host
