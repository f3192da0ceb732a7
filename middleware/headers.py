"""`headers`: set, add and remove request headers (towards the upstream) and response
headers (towards the client).

Each side (`request`, `response`) takes `remove: [Name]`, `set: {Name: value}` (replaces
every value the message had) and `add: {Name: value}` (appends one more), applied in that
order. Values may name a few per-request variables in braces: `{request_id}`,
`{client_ip}`, `{host}`, `{method}`, `{path}`, `{scheme}`, `{route}`, `{consumer}`; `{{`
and `}}` are literal braces. (`${VAR}` stays the config loader's environment
substitution, done once at load.)

Names and values are checked at load: a name must be an RFC 9110 token and not one the
gateway manages itself (framing and connection fields, and Host, which the route's
`rewrite.host` sets); a value may hold no control characters (CR, LF and NUL above all)
and no leading or trailing whitespace (RFC 9110 section 5.5). A variable's value is
cleaned of CR, LF and NUL when it is substituted, so no request can smuggle a header.

Response changes also reach the gateway's own error replies for errors raised by what
follows this middleware in the chain (a 401 from a later auth middleware, a 502 from the
upstream), so security headers are on every answer.
"""

from __future__ import annotations

import logging
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from multidict import CIMultiDict

from proxy import (
    Handler,
    Option,
    Options,
    ProxyError,
    Request,
    Response,
    did_you_mean,
    local_reply,
    request_id_of,
)

log = logging.getLogger(__name__)

# RFC 9110 section 5.1: field-name = token.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 9110 section 5.5: field-vchar (visible ASCII and obs-text) with inner SP / HTAB.
_VCHAR = r"[\x21-\x7e\x80-\xff]"
_FIELD_VALUE = re.compile(rf"(?:{_VCHAR}(?:[\t\x20-\x7e\x80-\xff]*{_VCHAR})?)?")
# Fields the gateway derives itself: setting them would break framing or the connection.
MANAGED_FIELDS = frozenset(
    {
        "connection",
        "content-length",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_REQUEST_MANAGED = MANAGED_FIELDS | {"host"}
# What `request` and `response` hold.
OPERATIONS: dict[str, Option] = {
    "set": Option.string_map(
        "fields set, replacing any of the same name ({client_ip}, {request_id}... expand)"
    ),
    "add": Option.string_map("fields added beside any of the same name"),
    "remove": Option.strings("fields removed", ()),
}
_UNSAFE_CHARS = str.maketrans("", "", "\r\n\x00")


def _client_ip(request: Request) -> str:
    return request.client[0]


def _host(request: Request) -> str:
    return request.host


def _method(request: Request) -> str:
    return request.method


def _path(request: Request) -> str:
    return request.path


def _scheme(request: Request) -> str:
    return request.scheme


def _route(request: Request) -> str:
    return request.exchange.route_name


def _consumer(request: Request) -> str:
    return request.consumer


VARIABLES: dict[str, Callable[[Request], str]] = {
    "request_id": request_id_of,
    "client_ip": _client_ip,
    "host": _host,
    "method": _method,
    "path": _path,
    "scheme": _scheme,
    "route": _route,
    "consumer": _consumer,
}

Part = str | Callable[[Request], str]


def error_reply(exc: ProxyError, request: Request) -> Response:
    """The local reply for `exc`, built where a middleware that must see every response
    (headers, cors, access_log) catches it, logged as `Runtime.handle` logs it."""
    if exc.status >= 500:
        log.info(
            "%s %s -> %d %s: %s", request.method, request.path, exc.status, exc.reason, exc.message
        )
    return local_reply(exc, request)


def compile_template(text: str) -> tuple[Part, ...]:
    """`text` as literal parts and variable getters (a plain string is one part).

    Raises:
        ValueError: unbalanced braces, an unknown variable or a format spec; the message
            says which.
    """
    parts: list[Part] = []
    for literal, field, spec, conversion in string.Formatter().parse(text):
        if literal:
            parts.append(literal)
        if field is None:
            continue
        if spec or conversion:
            raise ValueError(f"'{{{field}}}' takes no format spec or conversion")
        getter = VARIABLES.get(field)
        if getter is None:
            hint = did_you_mean(field, list(VARIABLES)) or (
                f" (known: {', '.join(VARIABLES)}; write {{{{ and }}}} for literal braces)"
            )
            raise ValueError(f"unknown variable {{{field}}}{hint}")
        parts.append(getter)
    return tuple(parts)


@dataclass(frozen=True, slots=True)
class HeaderOps:
    """One side's changes, compiled: `remove`, then `set`, then `add`. A value is either a
    string or a tuple of parts to render per request."""

    remove: tuple[str, ...] = ()
    set: tuple[tuple[str, str | tuple[Part, ...]], ...] = ()
    add: tuple[tuple[str, str | tuple[Part, ...]], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.remove or self.set or self.add)

    def apply(self, headers: CIMultiDict[str], request: Request) -> None:
        """Change `headers` (of `request`, or of its response)."""
        for name in self.remove:
            headers.popall(name, None)
        for name, value in self.set:
            headers[name] = value if isinstance(value, str) else _render(value, request)
        for name, value in self.add:
            headers.add(name, value if isinstance(value, str) else _render(value, request))


def _render(parts: tuple[Part, ...], request: Request) -> str:
    text = "".join(part if isinstance(part, str) else part(request) for part in parts)
    return text.translate(_UNSAFE_CHARS)


def header_name_problem(name: str, managed: frozenset[str] = MANAGED_FIELDS) -> str | None:
    """Why `name` cannot be set by configuration, or None."""
    if not _TOKEN.fullmatch(name):
        return f"{name!r} is not a valid header name (RFC 9110 section 5.1: a token)"
    if name.lower() in managed:
        hint = " (use the route's rewrite.host)" if name.lower() == "host" else ""
        return f"{name!r} is managed by the gateway and cannot be changed here{hint}"
    return None


def header_value_problem(value: str) -> str | None:
    """Why `value` cannot be a header value, or None."""
    if not _FIELD_VALUE.fullmatch(value):
        return (
            f"invalid header value {value!r}: no control characters (CR, LF, NUL...), "
            "characters beyond \\xff or leading/trailing whitespace"
        )
    return None


def read_header_ops(options: Options | None, managed: frozenset[str]) -> HeaderOps:
    """A side's `remove` / `set` / `add` (empty when `options` is None)."""
    if options is None:
        return HeaderOps()
    removed: list[str] = []
    for name in options.strings("remove"):
        problem = header_name_problem(name, managed)
        if problem is not None:
            options.error("remove", problem)
        elif name.lower() not in {r.lower() for r in removed}:
            removed.append(name)
    return HeaderOps(
        tuple(removed), _read_values(options, "set", managed), _read_values(options, "add", managed)
    )


def _read_values(
    options: Options, key: str, managed: frozenset[str]
) -> tuple[tuple[str, str | tuple[Part, ...]], ...]:
    values = options.header_values(key)  # hidden in /config: often credentials
    compiled: list[tuple[str, str | tuple[Part, ...]]] = []
    seen: dict[str, str] = {}
    problems: list[tuple[str, str]] = []
    for name, value in values.items():
        problem = header_name_problem(name, managed)
        if problem is None and name.lower() in seen:
            problem = f"{name!r} is also given as {seen[name.lower()]!r}"
        if problem is None:
            problem = header_value_problem(value)
        if problem is None:
            try:
                parts = compile_template(value)
            except ValueError as exc:
                problem = str(exc)
            else:
                literals = [part for part in parts if isinstance(part, str)]
                constant = len(literals) == len(parts)
                compiled.append((name, "".join(literals) if constant else parts))
        if problem is not None:
            problems.append((name, problem))
        seen[name.lower()] = name
    if problems:
        _report(options, key, list(values), problems)
    return tuple(compiled)


def _report(
    options: Options, key: str, names: Sequence[str], problems: list[tuple[str, str]]
) -> None:
    """Report each problem at its own entry (`...set.X-Name`, that entry's line)."""
    entries = options.nested(key, names)
    for name, problem in problems:
        if entries is not None:
            entries.error(name, problem)
        else:  # pragma: no cover - string_map read the mapping, so nested can too
            options.error(key, problem)


class Headers:
    """Change request and response headers."""

    OPTIONS: ClassVar[dict[str, Option]] = {
        "request": Option.mapping(OPERATIONS, "changes to the request before it goes upstream"),
        "response": Option.mapping(OPERATIONS, "changes to the response before the client"),
    }
    EAGER: ClassVar[bool] = True  # awaits nothing but call_next (proxy/exchange/eager.py)

    def __init__(self, options: Options) -> None:
        self.request_ops = read_header_ops(options.nested("request", OPERATIONS), _REQUEST_MANAGED)
        self.response_ops = read_header_ops(options.nested("response", OPERATIONS), MANAGED_FIELDS)
        if "request" not in options and "response" not in options:
            options.error(None, "expected 'request' or 'response' (or both)")

    def identity_headers(self) -> tuple[str, ...]:
        """The request fields `set` gives a value (middleware/base.py): the upstream
        trusts them to be the gateway's."""
        return tuple(name for name, _ in self.request_ops.set)

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        if self.request_ops:
            self.request_ops.apply(request.headers, request)
        if not self.response_ops:
            return await call_next(request)
        try:
            response = await call_next(request)
        except ProxyError as exc:
            response = error_reply(exc, request)
        self.response_ops.apply(response.headers, request)
        return response
