"""routes.yaml -> the frozen, typed configuration of `proxy.config.model`.

The loader checks everything once, at load time (CONTRIBUTING.md, style), and reports every problem
together, each as `file:line: key.path: message`. The model lives in `proxy.config.model`
(an upstream's in `proxy.config.upstream_model`), the document limits and `ConfigError` in
`proxy.config.document`.

This module reads the top level and orders the sections; each section is a function
`read_X(reader, context, node, path)` of the module named for it (`upstream`,
`middleware`, `routes`, and `server` for the gateway's own settings), given the
`NodeReader` that records problems (`reader`) and the `LoadContext` that carries what one
section learns for another (`context`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import replace
from functools import partial
from typing import TypeVar

from yaml.nodes import MappingNode, Node

from proxy.config.context import LoadContext, Section
from proxy.config.document import (
    ConfigError,
    compose_document,
    read_config_file,
)
from proxy.config.keys import TOP
from proxy.config.middleware import read_chain, read_middleware
from proxy.config.model import (
    DEFAULT_GRACE_PERIOD_S,
    ClientIpConfig,
    Config,
    Http2Config,
    LimitsConfig,
    ListenerConfig,
    MetricsConfig,
    MiddlewareSpec,
    PathNormalization,
    ReloadConfig,
    RouteConfig,
)
from proxy.config.reader import NodeReader, Reported, describe
from proxy.config.routes import read_routes
from proxy.config.server import (
    read_admin,
    read_client_ip,
    read_headers_with_underscores,
    read_http1_parser,
    read_http2,
    read_limits,
    read_listeners,
    read_logging,
    read_metrics,
    read_path_normalization,
    read_reload,
    read_shutdown,
    read_tracing,
    read_workers,
)
from proxy.config.spec import keys_of, required_of
from proxy.config.upstream import read_upstreams
from proxy.config.upstream_model import UpstreamConfig

__all__ = ["load_config", "parse_config"]

_T = TypeVar("_T")


def load_config(path: str, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the YAML file at `path` (see parse_config).

    Raises:
        ConfigError: the file cannot be read (or is over MAX_CONFIG_BYTES, or not UTF-8),
            or it is invalid. Any other exception is a bug.
    """
    return parse_config(read_config_file(path), source=path, env=env)


def parse_config(
    text: str, source: str = "<string>", env: Mapping[str, str] | None = None
) -> Config:
    """Validate a routes.yaml document and return it as a frozen Config.

    `${VAR}` and `${VAR:-default}` are substituted in every scalar value (not in keys) from
    `env` (default os.environ); `$${` is a literal `${`. A value that held a reference is
    then typed like a plain YAML scalar where a number or boolean is expected, so
    `workers: "${WORKERS:-2}"` is an int. YAML anchors, aliases and `<<` merges work.

    The document is at most MAX_CONFIG_BYTES long and MAX_NESTING_DEPTH levels deep with
    aliases expanded (proxy/config/document.py); `!public` marks a string value that
    /config may show in clear (proxy/config/view.py).

    Raises:
        ConfigError: with every problem found, each naming `source`, the line and the key
            path. Any other exception is a bug.
    """
    document = compose_document(text, source)
    reader = NodeReader(source, os.environ if env is None else env)
    config = _read_config(reader, LoadContext(), document.root)
    if config is None or reader.errors:
        raise ConfigError(reader.errors)
    return replace(config, concealed=frozenset(reader.concealed))


def _read_config(reader: NodeReader, context: LoadContext, root: Node | None) -> Config | None:
    """The Config of the document `root`; check `reader.errors` before using it. Every
    section is read even after an error, so that one run reports every problem, and in
    an order that lets each find in `context` what it checks against."""
    if root is None:
        reader.error(None, "", "empty config (expected listeners, upstreams and routes)")
        return None
    if not isinstance(root, MappingNode):
        with suppress(Reported):  # describing `${X}` can itself be an error
            found = describe(root, reader.value(root, ""))
            reader.error(root, "", f"the top level must be a mapping (listeners, ...), not {found}")
        return None
    top = reader.mapping(root, "", keys_of(TOP), required_of(TOP))

    def section(key: str, read: Section[_T], default: _T) -> _T:
        return top.get(key, partial(read, reader, context), default)

    no_routes: tuple[RouteConfig, ...] = ()
    listeners: tuple[ListenerConfig, ...] = section("listeners", read_listeners, ())
    upstreams: dict[str, UpstreamConfig] = section("upstreams", read_upstreams, {})
    # Named middleware first: the chains below refer to them. Without the section, a
    # reference is checked against none; with an unreadable one, not at all.
    context.named_middleware = {} if "middleware" not in top else None
    middleware: dict[str, MiddlewareSpec] = section("middleware", read_middleware, {})
    # Before the routes: their path matchers must be in the form requests are put in.
    paths = section("path_normalization", read_path_normalization, PathNormalization())
    # Before the routes: a route's chain is checked as the global chain's continuation.
    global_chain: tuple[MiddlewareSpec, ...] = section("global_middleware", read_chain, ())
    context.global_chain = global_chain
    client_ip: ClientIpConfig | None = section("client_ip", read_client_ip, None)
    if client_ip is None and "client_ip" not in top:
        for fields in context.proxy_protocol_listeners:
            fields.error(
                "proxy_protocol",
                "needs client_ip.trusted_proxies: the load balancers whose PROXY headers"
                " are believed",
            )
    return Config(
        listeners=listeners,
        upstreams=upstreams,
        middleware=middleware,
        global_middleware=global_chain,
        routes=section("routes", read_routes, no_routes),
        admin=section("admin", read_admin, None),
        limits=section("limits", read_limits, LimitsConfig()),
        http2=section("http2", read_http2, Http2Config()),
        http1_parser=section("http1_parser", read_http1_parser, "auto"),
        workers=section("workers", read_workers, None),
        grace_period=section("shutdown", read_shutdown, DEFAULT_GRACE_PERIOD_S),
        reload=section("reload", read_reload, ReloadConfig()),
        metrics=section("metrics", read_metrics, MetricsConfig()),
        path_normalization=paths,
        headers_with_underscores=section(
            "headers_with_underscores", read_headers_with_underscores, "drop"
        ),
        client_ip=client_ip,
        log_format=section("logging", read_logging, "text"),
        tracing=section("tracing", read_tracing, None),
        source=reader.source,
    )
