"""The `Forwarded` header (RFC 7239): the `for=` nodes of a received value, and the element
this hop appends.

A value is a list of elements, one per proxy, oldest first; an element is `;`-separated
`name=value` pairs, each value a token or a quoted-string (section 4). Only `for` matters
for finding the client: its node is an address (IPv6 in brackets and quoted, either with
an optional port), `unknown`, or an obfuscated identifier such as `_hidden` (section 6).
The parser is lenient where real proxies are (an unquoted `for=[2001:db8::1]`, spaces
after `;`), and strict where leniency would let a client inject an element: a value that
does not parse is malformed as a whole.
"""

from __future__ import annotations

import re
from collections import deque

# RFC 9110 section 5.6.2: token.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
# A pair; the value is a quoted-string (section 5.6.4, backslash escapes) or a token,
# leniently with ":" and brackets (`for=[2001:db8::1]:80` unquoted, as some proxies
# write it).
_PAIR = re.compile(rf'({_TOKEN})=("(?:[^"\\]|\\.)*"|[!#$%&\'*+.^_`|~0-9A-Za-z:\[\]-]*)')
_ESCAPE = re.compile(r"\\(.)")
_TOKEN_RE = re.compile(_TOKEN)


class MalformedForwarded(ValueError):
    """The value is not a Forwarded list (RFC 7239 section 4)."""


def forwarded_for_nodes(value: str, keep: int) -> tuple[list[str | None], bool]:
    """The `for` node of each element of `value`, oldest first, as unquoted text (None
    for an element without `for`); only the last `keep` are returned, and the flag says
    whether there were more. Empty elements (`a, , b`) are skipped (RFC 9110 section
    5.6.1).

    Raises:
        MalformedForwarded: the value does not parse, or an element names `for` twice
            (section 4: a parameter occurs at most once per element).
    """
    nodes: deque[str | None] = deque(maxlen=keep)
    total = 0
    position, end = 0, len(value)
    while position < end:
        node: str | None = None
        pairs = 0
        while True:  # one element: pairs separated by ";" (section 4)
            position = _skip_ows(value, position)
            if position >= end or value[position] == ",":
                break
            if value[position] == ";":
                position += 1
                continue
            match = _PAIR.match(value, position)
            if match is None:
                raise MalformedForwarded(f"expected name=value at offset {position}")
            name, text = match.group(1), match.group(2)
            if text.startswith('"'):
                text = _ESCAPE.sub(r"\1", text[1:-1])
            if name.lower() == "for":
                if node is not None:
                    raise MalformedForwarded("'for' given twice in one element")
                node = text
            pairs += 1
            position = _skip_ows(value, match.end())
            if position < end and value[position] not in ",;":
                raise MalformedForwarded(f"expected ';' or ',' at offset {position}")
        if pairs:
            nodes.append(node)
            total += 1
        position += 1  # past the ","
    return list(nodes), total > keep


def _skip_ows(value: str, position: int) -> int:
    """The position of the first character at or after `position` that is not SP or HTAB."""
    end = len(value)
    while position < end and value[position] in " \t":
        position += 1
    return position


def _quoted(text: str) -> str:
    """`text` as an RFC 7239 value: a token as it is, anything else a quoted-string."""
    if _TOKEN_RE.fullmatch(text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def forwarded_element(peer: str, scheme: str, host: str | None) -> str:
    """The element this hop appends: `for` the peer the request came from (an IPv6
    address in brackets, quoted; `unknown` when the peer is not an IP address, section
    6), `host` as the request named it and `proto` its scheme (section 5)."""
    if not peer:
        node = "unknown"
    elif ":" in peer:
        node = f'"[{peer}]"'
    else:
        node = _quoted(peer)
    element = f"for={node}"
    if host:
        element += f";host={_quoted(host)}"
    return f"{element};proto={scheme}"
