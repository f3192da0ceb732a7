"""The answers the gateway gives without an upstream: a route's `redirect` and
`respond`, and a plaintext listener's `redirect_https` (proxy/exchange/local_answers.py
gives them). Read here so that routes.py and server.py keep to their sections."""

from __future__ import annotations

import re
from functools import partial

from yaml.nodes import MappingNode, Node

from proxy.config.keys import HTTPS_REDIRECT, REDIRECT, RESPOND
from proxy.config.model import (
    REDIRECT_STATUSES,
    HttpsRedirect,
    RedirectConfig,
    RedirectTemplate,
    RespondConfig,
)
from proxy.config.reader import NodeReader
from proxy.config.spec import keys_of, required_of
from proxy.config.values import parse_redirect_template

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 section 5.6.2
# Fields the front ends write from the body, or that belong to the connection: a fixed
# answer naming them would contradict the framing the gateway sends.
_FRAMING_FIELDS = frozenset(
    ("content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te", "trailer")
)
_NO_BODY_STATUSES = (204, 304)


def read_redirect(
    reader: NodeReader, node: Node, path: str, params: tuple[str, ...]
) -> RedirectConfig:
    """`routes[i].redirect: {to, status}`; `params` are the route's path_regex groups,
    which `to` may name."""
    fields = reader.mapping(node, path, keys_of(REDIRECT), required_of(REDIRECT))

    def status(value: Node, where: str) -> int:
        return _status(reader, value, where, REDIRECT_STATUSES)

    def template(value: Node, where: str) -> tuple[str, RedirectTemplate]:
        text = reader.string(value, where)
        parse = partial(parse_redirect_template, params=params)
        return text, reader.convert(value, where, parse, "a URL template")

    unset: tuple[str, RedirectTemplate] = ("", ())
    to, parts = fields.get("to", template, unset)
    return RedirectConfig(to, parts, fields.get("status", status, 302))


def read_respond(reader: NodeReader, node: Node, path: str) -> RespondConfig:
    """`routes[i].respond: {status, body, headers}`."""
    fields = reader.mapping(node, path, keys_of(RESPOND))

    def status(value: Node, where: str) -> int:
        found = reader.integer(value, where, 200)
        if found > 599:
            raise reader.error(value, where, f"must be a status from 200 to 599, got {found}")
        return found

    def headers(value: Node, where: str) -> tuple[tuple[str, str], ...]:
        pairs: list[tuple[str, str]] = []
        for key_node, key, item in reader.entries(value, where):
            here = f"{where}.{key}"
            if not _TOKEN.fullmatch(key):
                raise reader.error(key_node, here, f"{key!r} is not a valid header name")
            if key.lower() in _FRAMING_FIELDS:
                raise reader.error(
                    key_node,
                    here,
                    f"{key} is written by the gateway from the body and the connection",
                )
            text = reader.text(item, here)
            if any(bad in text for bad in "\r\n\x00"):
                raise reader.error(item, here, "a header value must not hold CR, LF or NUL")
            pairs.append((key, text))
        return tuple(pairs)

    answer = RespondConfig(
        status=fields.get("status", status, 200),
        body=fields.get("body", reader.string, "").encode(),
        headers=fields.get("headers", headers, ()),
    )
    if answer.body and answer.status in _NO_BODY_STATUSES:
        fields.error("body", f"a {answer.status} answer has no body")
    if answer.body and not any(name.lower() == "content-type" for name, _ in answer.headers):
        plain = ("Content-Type", "text/plain; charset=utf-8")
        answer = RespondConfig(answer.status, answer.body, (*answer.headers, plain))
    return answer


def read_https_redirect(reader: NodeReader, node: Node, path: str) -> HttpsRedirect | None:
    """`listeners[i].redirect_https`: true, false, or `{port, status}` (on)."""
    if not isinstance(node, MappingNode):
        if not isinstance(value := reader.value(node, path), bool):
            raise reader.type_error(node, path, "true, false or a mapping")
        return HttpsRedirect() if value else None
    fields = reader.mapping(node, path, keys_of(HTTPS_REDIRECT))

    def port(item: Node, where: str) -> int:
        found = reader.integer(item, where, 1)
        if found > 65535:
            raise reader.error(item, where, f"must be a port from 1 to 65535, got {found}")
        return found

    def status(item: Node, where: str) -> int:
        return _status(reader, item, where, (301, 302, 307, 308))

    return HttpsRedirect(fields.get("port", port, 443), fields.get("status", status, 308))


def _status(reader: NodeReader, node: Node, path: str, allowed: tuple[int, ...]) -> int:
    found = reader.integer(node, path, 0)
    if found not in allowed:
        choices = ", ".join(map(str, allowed))
        raise reader.error(node, path, f"a redirect's status is one of {choices}, not {found}")
    return found
