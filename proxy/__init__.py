"""Gatehouse, and its plugin surface: what a middleware may import of the gateway.

    from proxy import Handler, Options, Request, Response, Unauthorized

The names in `__all__` are the stable plugin surface: they keep their names and meaning
from release to release, and a change to one is announced first. The modules under
proxy/ are the gateway's inside and change without notice. The built-in middleware
(middleware/) are written as plugins are: they import this package and none of its
modules (an import-linter contract in pyproject.toml, and tests/proxy/test_plugin_surface.py).

What the surface holds:

- the message: `Request`, `Response`, `Body`;
- being a middleware: `Handler`, `Middleware`, `MiddlewareFactory` (proxy/plugin/base.py
  says what a factory and its optional hooks are) and `Options`, through which a factory
  reads its options at config load;
- reading options beyond the typed readers: `ConfigValueError` (raised by a parser given
  to `Options.converted`), `NodeReader` and `Reported` (`Options.reader`, `Options.node`),
  `did_you_mean`, `join_path`, `ca_bundle_problem`;
- errors the gateway answers as local replies: `ProxyError` and its family; `local_reply`
  to answer one without raising, `request_id_of` for the id it carries;
- HTTP field sets: `REQUEST_HOP_BY_HOP` (never forwarded as sent, or set by the gateway),
  `RESPONSE_HOP_BY_HOP` (never relayed);
- client addresses: `parse_address`, `parse_network`, `Address`, `Network`, `AddressSet`
  (a membership test by binary search), `ADDRESS_CACHE_ENTRIES` (the bound of a table
  keyed by something from the network);
- asking another service: `HttpClient` and `fetch` (the gateway's own client, on its
  upstream pools: proxy/upstream/fetch.py), `FetchUrl`, `parse_url`, `FetchResponse`,
  `tls_context`.

The names resolve on first use (PEP 562): importing any module of the gateway runs this
file first, and it loads nothing, so no module pays for the surface and none can meet an
import cycle through it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = [  # noqa: RUF022 - grouped by purpose, as the docstring lists them
    # the message
    "Body",
    "Request",
    "Response",
    # being a middleware
    "Handler",
    "Middleware",
    "MiddlewareFactory",
    "Options",
    # reading options
    "ConfigValueError",
    "NodeReader",
    "Reported",
    "ca_bundle_problem",
    "did_you_mean",
    "join_path",
    # errors and local replies
    "ProxyError",
    "AuthBadResponse",
    "AuthTimeout",
    "AuthUnavailable",
    "BadRequest",
    "BodyTooLarge",
    "CorsPreflightRefused",
    "Forbidden",
    "HeadTooLarge",
    "InternalError",
    "IpForbidden",
    "NoRoute",
    "PoolTimeout",
    "RateLimitUnavailable",
    "RateLimited",
    "RequestTimeout",
    "Unauthorized",
    "UpgradeNotAllowed",
    "UpstreamConnectError",
    "UpstreamConnectTimeout",
    "UpstreamOverloaded",
    "UpstreamProtocolError",
    "UpstreamReset",
    "UpstreamTimeout",
    "local_reply",
    "request_id_of",
    # HTTP field sets
    "REQUEST_HOP_BY_HOP",
    "RESPONSE_HOP_BY_HOP",
    # client addresses
    "ADDRESS_CACHE_ENTRIES",
    "Address",
    "AddressSet",
    "Network",
    "parse_address",
    "parse_network",
    # asking another service
    "FetchResponse",
    "FetchUrl",
    "HttpClient",
    "fetch",
    "parse_url",
    "tls_context",
]

# Where each name is defined (kept equal to __all__ by tests/proxy/test_plugin_surface.py).
_SOURCES = {
    "proxy.core.models": ("Body", "Request", "Response"),
    "proxy.plugin.base": ("Handler", "Middleware", "MiddlewareFactory"),
    "proxy.plugin.options": ("Options",),
    "proxy.config.values": ("ConfigValueError", "ca_bundle_problem"),
    "proxy.config.reader": ("NodeReader", "Reported", "did_you_mean", "join_path"),
    "proxy.core.errors": (
        "ProxyError",
        "AuthBadResponse",
        "AuthTimeout",
        "AuthUnavailable",
        "BadRequest",
        "BodyTooLarge",
        "CorsPreflightRefused",
        "Forbidden",
        "HeadTooLarge",
        "InternalError",
        "IpForbidden",
        "NoRoute",
        "PoolTimeout",
        "RateLimitUnavailable",
        "RateLimited",
        "RequestTimeout",
        "Unauthorized",
        "UpgradeNotAllowed",
        "UpstreamConnectError",
        "UpstreamConnectTimeout",
        "UpstreamOverloaded",
        "UpstreamProtocolError",
        "UpstreamReset",
        "UpstreamTimeout",
    ),
    "proxy.core.local_reply": ("local_reply", "request_id_of"),
    "proxy.core.headers": ("REQUEST_HOP_BY_HOP",),
    "proxy.upstream.h1": ("RESPONSE_HOP_BY_HOP",),
    "proxy.core.addresses": (
        "ADDRESS_CACHE_ENTRIES",
        "Address",
        "AddressSet",
        "Network",
        "parse_address",
        "parse_network",
    ),
    "proxy.upstream.fetch": (
        "FetchResponse",
        "FetchUrl",
        "HttpClient",
        "fetch",
        "parse_url",
        "tls_context",
    ),
}
_MODULE_OF = {name: module for module, names in _SOURCES.items() for name in names}

if TYPE_CHECKING:
    from proxy.config.reader import NodeReader, Reported, did_you_mean, join_path
    from proxy.config.values import ConfigValueError, ca_bundle_problem
    from proxy.core.addresses import (
        ADDRESS_CACHE_ENTRIES,
        Address,
        AddressSet,
        Network,
        parse_address,
        parse_network,
    )
    from proxy.core.errors import (
        AuthBadResponse,
        AuthTimeout,
        AuthUnavailable,
        BadRequest,
        BodyTooLarge,
        CorsPreflightRefused,
        Forbidden,
        HeadTooLarge,
        InternalError,
        IpForbidden,
        NoRoute,
        PoolTimeout,
        ProxyError,
        RateLimited,
        RateLimitUnavailable,
        RequestTimeout,
        Unauthorized,
        UpgradeNotAllowed,
        UpstreamConnectError,
        UpstreamConnectTimeout,
        UpstreamOverloaded,
        UpstreamProtocolError,
        UpstreamReset,
        UpstreamTimeout,
    )
    from proxy.core.headers import REQUEST_HOP_BY_HOP
    from proxy.core.local_reply import local_reply, request_id_of
    from proxy.core.models import Body, Request, Response
    from proxy.plugin.base import Handler, Middleware, MiddlewareFactory
    from proxy.plugin.options import Options
    from proxy.upstream.fetch import (
        FetchResponse,
        FetchUrl,
        HttpClient,
        fetch,
        parse_url,
        tls_context,
    )
    from proxy.upstream.h1 import RESPONSE_HOP_BY_HOP
else:

    def __getattr__(name: str) -> object:
        """Import a name of the surface on first use (and keep it here)."""
        module = _MODULE_OF.get(name)
        if module is None:
            raise AttributeError(f"module 'proxy' has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *__all__})
