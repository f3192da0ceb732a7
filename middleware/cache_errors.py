"""The cache's own refusal. A module of its own because the cache's modules are compiled
(proxy/buildinfo.py), and a ProxyError subclass compiled by mypyc would not keep the
class attributes (`status`, `reason`) its local reply reads."""

from __future__ import annotations

from proxy import ProxyError


class NotCached(ProxyError):
    """504 `not_cached`: the request said `only-if-cached`, and nothing usable is stored
    (RFC 9111 section 5.2.1.7)."""

    status, reason = 504, "not_cached"
