"""Which factory a `type:` names: a built-in by its name, a plugin by `package.module:Factory`,
or a plugin installed under the `gatehouse.middleware` entry point group.

Built-ins are imported on first use, so a config without `jwt` never imports PyJWT.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

ENTRY_POINT_GROUP = "gatehouse.middleware"

# type name -> "module:attribute" of its factory
BUILTIN: dict[str, str] = {
    "api_key": "middleware.api_key:ApiKey",
    "basic_auth": "middleware.basic_auth:BasicAuth",
    "jwt": "middleware.jwt_auth:JwtAuth",
    "forward_auth": "middleware.forward_auth:ForwardAuth",
    "oidc": "middleware.oidc:Oidc",
    "rate_limit": "middleware.rate_limit:RateLimit",
    "access_log": "middleware.access_log:AccessLog",
    "request_id": "middleware.request_id:RequestId",
    "headers": "middleware.headers:Headers",
    "cors": "middleware.cors:Cors",
    "ip_filter": "middleware.ip_filter:IpFilter",
    "body_limit": "middleware.body_limit:BodyLimit",
    "client_cert": "middleware.client_cert:ClientCert",
    "cache": "middleware.cache:Cache",
    "compress": "middleware.compress:Compress",
}


class UnknownType(Exception):
    """The type names nothing we can load; the message says why."""


def resolve(type_name: str) -> Any:
    """The factory `type_name` names.

    Raises:
        UnknownType: not a built-in, not an entry point, or the import failed.
    """
    target = BUILTIN.get(type_name)
    if target is None and ":" not in type_name:
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if entry_point.name == type_name:
                try:
                    return entry_point.load()
                except Exception as exc:
                    raise UnknownType(
                        f"entry point {type_name!r} ({entry_point.value}) failed to load: "
                        f"{type(exc).__name__}: {exc}"
                    ) from None
        raise UnknownType(f"unknown middleware type {type_name!r}")
    module_name, _, attribute = (target or type_name).partition(":")
    if not module_name or not attribute:
        raise UnknownType(f"{type_name!r} is not 'package.module:Factory'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module failed while importing
        raise UnknownType(
            f"cannot import {module_name!r} for type {type_name!r}: {type(exc).__name__}: {exc}"
        ) from None
    factory = getattr(module, attribute, None)
    if factory is None:
        raise UnknownType(f"module {module_name!r} has no {attribute!r} (type {type_name!r})")
    return factory


def known_types() -> list[str]:
    """Built-in names and installed entry points (for did-you-mean)."""
    names = set(BUILTIN)
    names.update(ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)
