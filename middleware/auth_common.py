"""What the credential middleware (`api_key`, `basic_auth`) share: reading their option
lists item by item, secret files line by line, challenges, and the consumer header.

None of this runs per request except `set_consumer`; the rest is config-load work.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from yaml.nodes import Node, ScalarNode

from proxy import NodeReader, Options, Reported, Request

DEFAULT_REALM = "gatehouse"
DEFAULT_CONSUMER_HEADER = "X-Consumer"

# RFC 9110 section 5.6.2: a field name is a token.
_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# A realm goes into a quoted-string (RFC 9110 section 5.6.4); we refuse the two characters
# that would need escaping, and control characters, rather than escape them.
_REALM_RE = re.compile(r"[ !#-\[\]-~]*")
# A consumer name is forwarded as a header value and logged: visible ASCII, no spaces.
CONSUMER_RE = re.compile(r"[!-~]{1,128}")


def option_node(options: Options, key: str) -> tuple[NodeReader, Node, str] | None:
    """The reader, raw YAML node and key path of option `key` (None when absent), for
    options that `Options` has no typed reader for (a list mixing strings and mappings)."""
    found = options.node(key)
    if found is None:
        return None
    return options.reader, found[0], found[1]


def header_name(options: Options, key: str, default: str, *, empty_ok: bool = False) -> str:
    """A header-name option (a token; "" only when `empty_ok`)."""
    name = options.string(key, default)
    if name == "" and empty_ok:
        return ""
    if not _TOKEN_RE.fullmatch(name):
        options.error(key, f"{name!r} is not a valid header name")
        return default
    return name


def realm(options: Options) -> str:
    """The `realm` option (default "gatehouse"), safe to put in a quoted-string."""
    value = options.string("realm", DEFAULT_REALM)
    if not _REALM_RE.fullmatch(value):
        options.error("realm", "must be printable ASCII without '\"' or '\\'")
        return DEFAULT_REALM
    return value


def read_lines(options: Options, key: str, path: str) -> list[tuple[int, str]] | None:
    """The (line number, stripped line) pairs of the file at `path` (option `key`), with
    blank lines and `#` comment lines left out; None (the error recorded) when the file
    cannot be read. Files are read at config load, relative to the working directory like
    every path in routes.yaml."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError as exc:
        options.error(key, f"cannot read {path!r}: {exc.strerror or exc}")
        return None
    except UnicodeDecodeError as exc:
        options.error(key, f"cannot read {path!r}: not UTF-8 ({exc.reason})")
        return None
    return [
        (number, line.strip())
        for number, line in enumerate(text.splitlines(), 1)
        if line.strip() and not line.lstrip().startswith("#")
    ]


def items(options: Options, key: str) -> Iterator[tuple[NodeReader, Node, str]]:
    """(reader, node, key path) of each item of list option `key`; a single scalar is a
    list of one. Nothing when the option is absent or not a list (the error recorded)."""
    found = option_node(options, key)
    if found is None:
        return
    reader, node, path = found
    if isinstance(node, ScalarNode):
        yield reader, node, path
        return
    try:
        children = reader.sequence(node, path)
    except Reported:
        options.failed = True
        return
    for index, child in enumerate(children):
        yield reader, child, f"{path}[{index}]"


def challenge(scheme: str, realm_value: str, extra: str = "") -> str:
    """A WWW-Authenticate value: `Basic realm="gatehouse", charset="UTF-8"`."""
    return f'{scheme} realm="{realm_value}"{extra}'


def header_values(request: Request, name: str) -> list[str]:
    """Every value of field `name` (case-insensitive), reading raw headers without
    turning them into a CIMultiDict (which would cost the message its fast serializer)."""
    raw = request.raw_headers
    if raw is None:
        return request.headers.getall(name, [])
    wanted = name.lower().encode("latin-1")
    return [
        value.decode("latin-1")
        for field, value in raw
        if len(field) == len(wanted) and field.lower() == wanted
    ]


def set_consumer(request: Request, header: str, consumer: str) -> None:
    """Replace whatever the client sent in `header` (it must not be able to claim an
    identity) by `consumer` (nothing when the credential names none). Consumer names and
    header names are checked at load, so `set_header` cannot refuse them."""
    if header:
        if consumer:
            request.set_header(header, consumer)
        else:
            request.remove_header(header)
