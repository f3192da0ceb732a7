"""A route's traffic shaping (docs/traffic.md): `upstream: {split: [...], sticky: ...}`,
a weighted split between upstreams, and `mirror: {...}`, copies of its requests sent to a
shadow upstream. Read here so that routes.py keeps to the route itself; the runtime
pieces are proxy/exchange/split.py and proxy/exchange/mirror.py."""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import suppress
from functools import partial

from yaml.nodes import Node

from proxy.config.keys import MIRROR, SPLIT, SPLIT_SIDE, SPLIT_STICKY
from proxy.config.model import (
    DEFAULT_MIRROR_MAX_BODY,
    DEFAULT_MIRROR_MAX_IN_FLIGHT,
    DEFAULT_MIRROR_TIMEOUT_S,
    MirrorConfig,
    SplitConfig,
    SplitSide,
)
from proxy.config.reader import NodeReader, Reported
from proxy.config.spec import keys_of, required_of

# RFC 9110 section 5.6.2: field names; RFC 6265 section 4.1.1: a cookie-name is one too.
_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

UpstreamRef = Callable[[Node, str], str]  # reads an upstream's name, checked against the file's


def read_split(reader: NodeReader, node: Node, path: str, upstream_ref: UpstreamRef) -> SplitConfig:
    """`upstream: {split: [{upstream, weight}, ...], sticky: {cookie|header: NAME}}`.

    Raises:
        Reported: not a mapping, no usable side, or weights that sum to 0 (recorded).
    """
    fields = reader.mapping(node, path, keys_of(SPLIT), required_of(SPLIT))
    no_sides: tuple[SplitSide, ...] = ()
    sides = fields.get("split", partial(_sides, reader, upstream_ref), no_sides)
    not_sticky: tuple[str | None, str | None] = (None, None)
    sticky = fields.get("sticky", partial(_sticky, reader), not_sticky)
    if not sides:
        raise Reported  # missing, or each side had an error (recorded)
    return SplitConfig(sides=sides, sticky_cookie=sticky[0], sticky_header=sticky[1])


def _sides(
    reader: NodeReader, upstream_ref: UpstreamRef, node: Node, path: str
) -> tuple[SplitSide, ...]:
    sides: list[SplitSide] = []
    seen: dict[str, str] = {}
    errors_before = reader.error_count
    for item, item_path in reader.nonempty_items(node, path, "give at least one side"):
        with suppress(Reported):
            fields = reader.mapping(item, item_path, keys_of(SPLIT_SIDE), required_of(SPLIT_SIDE))
            upstream = fields.get("upstream", upstream_ref, "")
            weight = fields.get("weight", reader.integer, -1)
            if not upstream or weight < 0:
                continue  # (recorded)
            if upstream in seen:
                message = f"upstream {upstream!r} is already a side ({seen[upstream]})"
                raise fields.error("upstream", message)
            seen[upstream] = item_path
            sides.append(SplitSide(upstream, weight))
    if reader.error_count > errors_before:
        raise Reported  # a split missing a side would send its share elsewhere
    if sides and sum(side.weight for side in sides) == 0:
        raise reader.error(node, path, "the weights sum to 0: give a side a weight")
    return tuple(sides)


def _sticky(reader: NodeReader, node: Node, path: str) -> tuple[str | None, str | None]:
    """(cookie, header) of `sticky`: exactly one of them is given."""
    fields = reader.mapping(node, path, keys_of(SPLIT_STICKY))
    if len(fields.nodes) != 1:
        raise reader.error(node, path, "give exactly one of cookie, header")
    cookie = fields.get("cookie", reader.string, None)
    header = fields.get("header", reader.string, None)
    value = cookie if cookie is not None else header
    if value is None:
        raise Reported  # (recorded)
    if not _TOKEN_RE.fullmatch(value):
        kind = "cookie" if cookie is not None else "header"
        raise reader.error(node, path, f"invalid {kind} name {value!r}")
    return cookie, header.lower() if header is not None else None


def read_mirror(
    reader: NodeReader, node: Node, path: str, upstream_ref: UpstreamRef
) -> MirrorConfig:
    """`mirror: {upstream, percent, max_body, max_in_flight, timeout}`.

    Raises:
        Reported: not a mapping, or no valid upstream (recorded).
    """
    fields = reader.mapping(node, path, keys_of(MIRROR), required_of(MIRROR))
    upstream = fields.get("upstream", upstream_ref, "")
    if not upstream:
        raise Reported  # (recorded)
    return MirrorConfig(
        upstream=upstream,
        percent=fields.get("percent", partial(_percent, reader), 100.0),
        max_body=fields.get("max_body", reader.size, DEFAULT_MIRROR_MAX_BODY),
        max_in_flight=fields.get(
            "max_in_flight", reader.positive_integer, DEFAULT_MIRROR_MAX_IN_FLIGHT
        ),
        timeout=fields.get("timeout", reader.positive_duration, DEFAULT_MIRROR_TIMEOUT_S),
    )


def _percent(reader: NodeReader, node: Node, path: str) -> float:
    value = reader.value(node, path)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise reader.type_error(node, path, "a number from 0 to 100")
    if not 0 <= value <= 100:
        raise reader.error(node, path, f"must be from 0 to 100, got {value}")
    return float(value)
