"""Gatehouse, and its plugin surface: what a middleware may import of the gateway.

    from proxy import Handler, Options, Request, Response, Unauthorized

The names in `__all__` are the stable plugin surface: they keep their names and meaning
from release to release, and a change to one is announced first. The modules under
proxy/ are the gateway's inside and change without notice. The built-in middleware
(middleware/) are written as plugins are: they import this package and none of its
modules (an import-linter contract in pyproject.toml, and tests/proxy/test_plugin_surface.py).

What the surface holds:

- the message: `Request`, `Response`, `Body`, and `ClientCertificate` (what
  `Request.client_cert` holds on a connection that verified one);
- being a middleware: `Handler`, `Middleware`, `MiddlewareFactory` (proxy/plugin/base.py
  says what a factory and its optional hooks are) and `Options`, through which a factory
  reads its options at config load; `Option`, with which a factory declares them (each
  key's type, default and meaning: proxy/config/spec.py);
- reading options beyond the typed readers: `ConfigValueError` (raised by a parser given
  to `Options.converted`), `NodeReader` and `Reported` (`Options.reader`, `Options.node`),
  `did_you_mean`, `join_path`, `ca_bundle_problem`;
- errors the gateway answers as local replies: `ProxyError` and its family; `local_reply`
  to answer one without raising, `request_id_of` for the id it carries, `new_request_id`
  for a fresh one;
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

from proxy.buildinfo import select_build

# GATEHOUSE_PURE_PYTHON=1: the .py sources of the compiled modules, from here on (before
# any of them can load). proxy/buildinfo.py.
select_build()

# The surface, grouped by where each name is defined: `__all__` is these names, and the
# block under TYPE_CHECKING says the same for the type checker (the `as` form marks a
# re-export; tests/proxy/test_plugin_surface.py keeps the two equal).
_SOURCES = {
    "proxy.core.body": ("Body",),
    "proxy.core.models": ("Request", "Response"),
    "proxy.core.client_cert": ("ClientCertificate",),
    "proxy.plugin.base": ("Deferred", "Handler", "Middleware", "MiddlewareFactory", "Pending"),
    "proxy.plugin.options": ("Options",),
    "proxy.config.spec": ("Option",),
    "proxy.config.values": ("ConfigValueError", "ca_bundle_problem"),
    "proxy.config.reader": ("NodeReader", "Reported", "did_you_mean", "join_path"),
    "proxy.core.errors": (
        "ProxyError",
        "AuthBadResponse",
        "AuthTimeout",
        "AuthUnavailable",
        "BadRequest",
        "BodyTooLarge",
        "ClientCertForbidden",
        "ClientCertRequired",
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
    "proxy.core.ids": ("new_request_id",),
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
__all__ = list(_MODULE_OF)

if TYPE_CHECKING:
    from proxy.config.reader import (
        NodeReader as NodeReader,
    )
    from proxy.config.reader import (
        Reported as Reported,
    )
    from proxy.config.reader import (
        did_you_mean as did_you_mean,
    )
    from proxy.config.reader import (
        join_path as join_path,
    )
    from proxy.config.spec import (
        Option as Option,
    )
    from proxy.config.values import (
        ConfigValueError as ConfigValueError,
    )
    from proxy.config.values import (
        ca_bundle_problem as ca_bundle_problem,
    )
    from proxy.core.addresses import (
        ADDRESS_CACHE_ENTRIES as ADDRESS_CACHE_ENTRIES,
    )
    from proxy.core.addresses import (
        Address as Address,
    )
    from proxy.core.addresses import (
        AddressSet as AddressSet,
    )
    from proxy.core.addresses import (
        Network as Network,
    )
    from proxy.core.addresses import (
        parse_address as parse_address,
    )
    from proxy.core.addresses import (
        parse_network as parse_network,
    )
    from proxy.core.body import (
        Body as Body,
    )
    from proxy.core.client_cert import (
        ClientCertificate as ClientCertificate,
    )
    from proxy.core.errors import (
        AuthBadResponse as AuthBadResponse,
    )
    from proxy.core.errors import (
        AuthTimeout as AuthTimeout,
    )
    from proxy.core.errors import (
        AuthUnavailable as AuthUnavailable,
    )
    from proxy.core.errors import (
        BadRequest as BadRequest,
    )
    from proxy.core.errors import (
        BodyTooLarge as BodyTooLarge,
    )
    from proxy.core.errors import (
        ClientCertForbidden as ClientCertForbidden,
    )
    from proxy.core.errors import (
        ClientCertRequired as ClientCertRequired,
    )
    from proxy.core.errors import (
        CorsPreflightRefused as CorsPreflightRefused,
    )
    from proxy.core.errors import (
        Forbidden as Forbidden,
    )
    from proxy.core.errors import (
        HeadTooLarge as HeadTooLarge,
    )
    from proxy.core.errors import (
        InternalError as InternalError,
    )
    from proxy.core.errors import (
        IpForbidden as IpForbidden,
    )
    from proxy.core.errors import (
        NoRoute as NoRoute,
    )
    from proxy.core.errors import (
        PoolTimeout as PoolTimeout,
    )
    from proxy.core.errors import (
        ProxyError as ProxyError,
    )
    from proxy.core.errors import (
        RateLimited as RateLimited,
    )
    from proxy.core.errors import (
        RateLimitUnavailable as RateLimitUnavailable,
    )
    from proxy.core.errors import (
        RequestTimeout as RequestTimeout,
    )
    from proxy.core.errors import (
        Unauthorized as Unauthorized,
    )
    from proxy.core.errors import (
        UpgradeNotAllowed as UpgradeNotAllowed,
    )
    from proxy.core.errors import (
        UpstreamConnectError as UpstreamConnectError,
    )
    from proxy.core.errors import (
        UpstreamConnectTimeout as UpstreamConnectTimeout,
    )
    from proxy.core.errors import (
        UpstreamOverloaded as UpstreamOverloaded,
    )
    from proxy.core.errors import (
        UpstreamProtocolError as UpstreamProtocolError,
    )
    from proxy.core.errors import (
        UpstreamReset as UpstreamReset,
    )
    from proxy.core.errors import (
        UpstreamTimeout as UpstreamTimeout,
    )
    from proxy.core.headers import (
        REQUEST_HOP_BY_HOP as REQUEST_HOP_BY_HOP,
    )
    from proxy.core.ids import (
        new_request_id as new_request_id,
    )
    from proxy.core.local_reply import (
        local_reply as local_reply,
    )
    from proxy.core.local_reply import (
        request_id_of as request_id_of,
    )
    from proxy.core.models import (
        Request as Request,
    )
    from proxy.core.models import (
        Response as Response,
    )
    from proxy.plugin.base import (
        Deferred as Deferred,
    )
    from proxy.plugin.base import (
        Handler as Handler,
    )
    from proxy.plugin.base import (
        Middleware as Middleware,
    )
    from proxy.plugin.base import (
        MiddlewareFactory as MiddlewareFactory,
    )
    from proxy.plugin.base import (
        Pending as Pending,
    )
    from proxy.plugin.options import (
        Options as Options,
    )
    from proxy.upstream.fetch import (
        FetchResponse as FetchResponse,
    )
    from proxy.upstream.fetch import (
        FetchUrl as FetchUrl,
    )
    from proxy.upstream.fetch import (
        HttpClient as HttpClient,
    )
    from proxy.upstream.fetch import (
        fetch as fetch,
    )
    from proxy.upstream.fetch import (
        parse_url as parse_url,
    )
    from proxy.upstream.fetch import (
        tls_context as tls_context,
    )
    from proxy.upstream.h1 import (
        RESPONSE_HOP_BY_HOP as RESPONSE_HOP_BY_HOP,
    )
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
