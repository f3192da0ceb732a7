"""`cors`: Cross-Origin Resource Sharing (the Fetch standard's CORS protocol) answered at
the gateway.

A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) never reaches
the upstream: it is answered 204 with the `Access-Control-Allow-*` headers when its origin,
method and headers are all allowed, and 403 `cors_preflight_refused` (no allow headers)
when one is not. An actual request is always forwarded; when its origin is allowed the
response gets `Access-Control-Allow-Origin` (plus `-Allow-Credentials` and
`-Expose-Headers` as configured). A disallowed origin gets no CORS headers, and the browser
keeps the response from the page. Error replies raised after this middleware (a 401, a
429, a 502) get the headers too, so a page can read why it failed.

Origins are exact (`https://app.example.com`, scheme and host lowercased, a default port
dropped), `*` (any origin) or a wildcard for subdomains (`https://*.example.com`: one or
more labels before `example.com`, not `example.com` itself). `*` and
`allow_credentials: true` together are a config error: the Fetch standard forbids
`Access-Control-Allow-Origin: *` with credentials, and reflecting every origin with
credentials would let any site act as the user. `allow_methods` / `allow_headers` `*`
allow whatever the preflight asks for (the request is echoed back, which also covers
`Authorization`, which a literal `*` does not). With specific origins every response gets
`Vary: Origin`, so a shared cache never serves one origin's answer to another.
"""

from __future__ import annotations

import re
from typing import ClassVar

from multidict import CIMultiDict

from middleware.headers import error_reply
from proxy import (
    Body,
    CorsPreflightRefused,
    Handler,
    Option,
    Options,
    ProxyError,
    Request,
    Response,
)

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# scheme "://" host [":" port]; host a DNS name (optionally "*." first), IPv4 or [IPv6].
_ORIGIN = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<wild>\*\.)?"
    r"(?P<host>[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*"
    r"|\[[0-9a-f:.]+\])(?::(?P<port>[0-9]{1,5}))?"
)
_DEFAULT_PORTS = {"http": "80", "https": "443"}
DEFAULT_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
# Fetch standard: a CORS-safelisted method is allowed by any successful preflight.
_SAFELISTED_METHODS = frozenset({"GET", "HEAD", "POST"})
_PREFLIGHT_VARY = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"


def parse_origin(text: str) -> tuple[str, bool]:
    """A configured origin, normalized, and whether it is a `*.` wildcard.

    Raises:
        ValueError: not `scheme://host[:port]` (no path, no trailing slash).
    """
    match = _ORIGIN.fullmatch(text.lower())
    if match is None:
        raise ValueError(
            f"{text!r} is not an origin: expected scheme://host[:port] with no path, "
            "like https://app.example.com or https://*.example.com"
        )
    scheme, host, port = match["scheme"], match["host"], match["port"]
    wild = match["wild"] is not None
    if wild and (host.startswith("[") or "." not in host):
        raise ValueError(f"{text!r}: a wildcard needs a domain of two labels or more after '*.'")
    if port is not None:
        if int(port) > 65535:
            raise ValueError(f"{text!r}: port {port} is out of range")
        if _DEFAULT_PORTS.get(scheme) == port.lstrip("0"):
            port = None  # browsers send no default port in Origin
    origin = f"{scheme}://{'*.' if wild else ''}{host}" + (f":{port}" if port else "")
    return origin, wild


def _vary_origin(headers: CIMultiDict[str]) -> None:
    """Add `Origin` to the response's Vary unless it is there (or Vary is `*`)."""
    values = headers.getall("Vary", None)
    if not values:
        headers["Vary"] = "Origin"
        return
    for value in values:
        for token in value.split(","):
            if token.strip().lower() in ("origin", "*"):
                return
    headers.add("Vary", "Origin")


class Cors:
    """Answer CORS preflights and add CORS headers to responses for allowed origins."""

    OPTIONS: ClassVar[dict[str, Option]] = {
        "allow_origins": Option.strings(
            "origins allowed: https://app.example.com, https://*.example.com, or *",
            required=True,
        ),
        "allow_methods": Option.strings(
            "methods a preflight may ask for (* for any)", DEFAULT_METHODS
        ),
        "allow_headers": Option.strings("request headers a preflight may ask for (* for any)", ()),
        "expose_headers": Option.strings("response headers the browser may show the page", ()),
        "allow_credentials": Option.boolean("allow cookies and credentials", False),
        "max_age": Option.duration("how long a browser may cache a preflight (default: not said)"),
    }
    REQUIRED = ("allow_origins",)
    EAGER = True  # awaits nothing but call_next (proxy/exchange/eager.py)

    def __init__(self, options: Options) -> None:
        self.any_origin = False
        exact: set[str] = set()
        wildcards: list[str] = []
        origins = options.strings("allow_origins")
        for text in origins:
            if text == "*":
                self.any_origin = True
                continue
            try:
                origin, wild = parse_origin(text)
            except ValueError as exc:
                options.error("allow_origins", str(exc))
                continue
            if wild:
                scheme, _, rest = origin.partition("://*.")
                wildcards.append(re.escape(scheme) + r"://(?:[a-z0-9_-]+\.)+" + re.escape(rest))
            else:
                exact.add(origin)
        if "allow_origins" in options and not origins and not options.failed:
            options.error("allow_origins", "at least one origin is required")
        self.exact_origins = frozenset(exact)
        self._wildcard = re.compile("|".join(wildcards)) if wildcards else None

        self.allow_credentials = options.boolean("allow_credentials", False)
        if self.any_origin and self.allow_credentials:
            options.error(
                "allow_credentials",
                "cannot be true with '*' in allow_origins: the Fetch standard forbids "
                "'Access-Control-Allow-Origin: *' with credentials; list the origins "
                "(https://*.example.com allows every subdomain)",
            )

        methods = self._tokens(options, "allow_methods", DEFAULT_METHODS)
        self.any_method = "*" in methods
        self.methods = frozenset(m.upper() for m in methods if m != "*")
        self._methods_value = ", ".join(m.upper() for m in methods if m != "*")

        allow_headers = self._tokens(options, "allow_headers", ())
        self.any_header = "*" in allow_headers
        self.allow_headers = frozenset(h.lower() for h in allow_headers if h != "*")
        self._allow_headers_value = ", ".join(h for h in allow_headers if h != "*")

        expose = self._tokens(options, "expose_headers", ())
        if "*" in expose and self.allow_credentials:
            options.error(
                "expose_headers",
                "'*' is a literal header name when credentials are allowed (Fetch "
                "standard): list the headers to expose",
            )
        self._expose_value = ", ".join(expose)

        self.max_age: int | None = None
        if "max_age" in options:
            self.max_age = int(options.duration("max_age", 0))

    @staticmethod
    def _tokens(options: Options, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        values = options.strings(key, default)
        good = []
        for value in values:
            if value == "*" or _TOKEN.fullmatch(value):
                good.append(value)
            else:
                options.error(key, f"{value!r} is not a valid {key.split('_')[-1][:-1]} name")
        return tuple(good)

    def origin_allowed(self, origin: str) -> bool:
        """Whether a request's `Origin` may read responses."""
        if self.any_origin or origin in self.exact_origins:
            return True
        lowered = origin.lower()
        if lowered in self.exact_origins:
            return True
        return self._wildcard is not None and self._wildcard.fullmatch(lowered) is not None

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        headers = request.headers
        origin = headers.get("origin")
        if origin is not None and request.method == "OPTIONS":
            requested_method = headers.get("access-control-request-method")
            if requested_method is not None:
                return self._preflight(origin, requested_method, headers)
        try:
            response = await call_next(request)
        except ProxyError as exc:
            response = error_reply(exc, request)
        out = response.headers
        if self.any_origin:
            out["Access-Control-Allow-Origin"] = "*"
        else:
            _vary_origin(out)
            if origin is None or not self.origin_allowed(origin):
                return response
            out["Access-Control-Allow-Origin"] = origin
            if self.allow_credentials:
                out["Access-Control-Allow-Credentials"] = "true"
        if self._expose_value:
            out["Access-Control-Expose-Headers"] = self._expose_value
        return response

    def _preflight(self, origin: str, method: str, headers: CIMultiDict[str]) -> Response:
        """The answer to a preflight (RFC-less: the Fetch standard, CORS protocol).

        Raises:
            CorsPreflightRefused: the origin, the method or a header is not allowed.
        """
        if not self.origin_allowed(origin):
            raise CorsPreflightRefused(f"origin {origin!r} is not allowed")
        method = method.strip()
        if not _TOKEN.fullmatch(method) or not (
            self.any_method or method.upper() in self.methods or method in _SAFELISTED_METHODS
        ):
            raise CorsPreflightRefused(f"method {method!r} is not allowed")
        requested = headers.get("access-control-request-headers", "")
        names = [name.strip() for name in requested.split(",") if name.strip()]
        for name in names:
            if not _TOKEN.fullmatch(name) or not (
                self.any_header or name.lower() in self.allow_headers
            ):
                raise CorsPreflightRefused(f"header {name!r} is not allowed")
        out: CIMultiDict[str] = CIMultiDict()
        out["Access-Control-Allow-Origin"] = "*" if self.any_origin else origin
        if self.allow_credentials:
            out["Access-Control-Allow-Credentials"] = "true"
        out["Access-Control-Allow-Methods"] = (
            method if self.any_method or not self._methods_value else self._methods_value
        )
        allow_headers = ", ".join(names) if self.any_header else self._allow_headers_value
        if allow_headers:
            out["Access-Control-Allow-Headers"] = allow_headers
        if self.max_age is not None:
            out["Access-Control-Max-Age"] = str(self.max_age)
        out["Vary"] = _PREFLIGHT_VARY
        return Response(204, out, Body.from_bytes(b""))
