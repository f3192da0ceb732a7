"""A middleware plugin of the kind an operator writes: requests must name a known tenant.

Configured as `type: tenant_header:TenantHeader` (a module on the Python path). It reads
the tenant from a header, refuses a missing or unknown one with 403, and tells the
upstream which tenant it serves in `X-Tenant-ID`, dropping the client's own copy.
"""

from __future__ import annotations

from proxy import Handler, Options, ProxyError, Request, Response


class UnknownTenant(ProxyError):
    """Answered as the gateway's JSON error: 403 {"error": "unknown_tenant", ...}."""

    status, reason = 403, "unknown_tenant"


class TenantHeader:
    OPTIONS = ("header", "tenants")
    REQUIRED = ("tenants",)
    EAGER = True  # awaits nothing but call_next: may run on the gateway's fast path

    def __init__(self, options: Options) -> None:
        self.header = options.string("header", "X-Tenant")
        self.tenants = frozenset(options.strings("tenants"))
        if not self.tenants:
            options.error("tenants", "name at least one tenant")

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        tenant = request.header(self.header)
        if tenant not in self.tenants:
            raise UnknownTenant(f"{self.header} must name a known tenant")
        request.remove_header("X-Tenant-ID")
        request.set_header("X-Tenant-ID", tenant)
        return await call_next(request)
