"""Answers the gateway gives without an upstream: a route's `redirect` and `respond`
(the end of its chain, where a forwarder would be), and a plaintext listener's
`redirect_https` (before routing, proxy/exchange/dispatch.py).

Every value a redirect takes from the request lands in a Location header that browsers
follow, so it is made safe here, whatever the route's template: characters a URL cannot
hold (and `\\`, which browsers read as `/`) are percent-encoded, and a Location that would
start with `//` because of what the client sent (a protocol-relative URL: another host)
starts with one `/`.
"""

from __future__ import annotations

import re

from multidict import CIMultiDict

from proxy.config.model import (
    ACME_CHALLENGE_PREFIX,
    HttpsRedirect,
    RedirectConfig,
    RedirectTemplate,
    RespondConfig,
)
from proxy.core.body import Body
from proxy.core.errors import InvalidHost
from proxy.core.local_reply import local_reply
from proxy.core.models import Request, Response

_DEFAULT_PORTS = {"http": 80, "https": 443}
# Visible ASCII but `\`: what a request's value may put in a Location as it is.
_UNSAFE = re.compile(r"[^!-\[\]-~]")
_LEADING_SLASHES = re.compile(r"[/\\]{2,}")


def _escape(value: str) -> str:
    return _UNSAFE.sub(lambda found: "".join(f"%{b:02X}" for b in found[0].encode()), value)


def split_host(request: Request) -> tuple[str, int]:
    """The request's host name (an IPv6 address keeps its brackets) and port (the
    scheme's default when the Host names none)."""
    host = request.host
    port = _DEFAULT_PORTS.get(request.scheme, 80)
    name, colon, digits = host.rpartition(":")
    if colon and digits.isdigit() and (not name.startswith("[") or name.endswith("]")):
        return name, int(digits)
    return host, port


def expand(template: RedirectTemplate, request: Request) -> str:
    """`template` filled in from `request` (its placeholders, docs/configuration.md)."""
    host, port = split_host(request)
    values = {
        "scheme": request.scheme,
        "host": host,
        "port": str(port),
        "path": request.path,
        "query": request.query,
        "uri": f"{request.path}?{request.query}" if request.query else request.path,
    }
    params = request.exchange.params
    pieces: list[str] = []
    for text, is_name in template:
        if is_name:
            value = params.get(text) if text in params else values.get(text, "")
            pieces.append(_escape(value or ""))
        else:
            pieces.append(text)
    location = "".join(pieces)
    if template and template[0][1] and _LEADING_SLASHES.match(location):
        location = "/" + _LEADING_SLASHES.sub("", location, count=1)
    return location


def redirect_response(status: int, location: str) -> Response:
    headers: CIMultiDict[str] = CIMultiDict([("Location", location)])
    return Response(status, headers, Body.from_bytes(b""))


class LocalAnswer:
    """The end of a route's chain that answers itself (`redirect` or `respond`); the
    dispatcher runs it like a chain's forwarder, after the route's middleware."""

    __slots__ = ("_redirect", "_respond")

    def __init__(self, redirect: RedirectConfig | None, respond: RespondConfig | None) -> None:
        assert (redirect is None) != (respond is None)
        self._redirect = redirect
        self._respond = respond

    async def __call__(self, request: Request) -> Response:
        redirect = self._redirect
        if redirect is not None:
            return redirect_response(redirect.status, expand(redirect.template, request))
        respond = self._respond
        assert respond is not None
        headers: CIMultiDict[str] = CIMultiDict(respond.headers)
        return Response(respond.status, headers, Body.from_bytes(respond.body))


def https_redirect(request: Request, redirect: HttpsRedirect) -> Response | None:
    """The answer of a `redirect_https` listener to `request`: None for an ACME HTTP-01
    challenge (routed as usual, so that it can be answered), else a redirect to the same
    host and target over HTTPS."""
    if request.path.startswith(ACME_CHALLENGE_PREFIX):
        return None
    if not request.host:
        return local_reply(InvalidHost("a redirect to HTTPS needs a Host"), request)
    host, _ = split_host(request)
    port = "" if redirect.port == 443 else f":{redirect.port}"
    target = request.target.decode("latin-1")
    return redirect_response(redirect.status, f"https://{host}{port}{_escape(target)}")
