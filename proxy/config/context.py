"""LoadContext: what the sections of one routes.yaml learn of each other while it is read.

Each section of the file is read by a function `read_X(reader, context, node, path)`: the
`NodeReader` reads typed values and records problems (it holds the file's name and the
environment, since it is what names the file in errors and substitutes `${VAR}`); the
context carries the few facts one section finds and another checks against. It is passed
explicitly, so what a section depends on is in its signature, and `proxy/config/load.py`
orders the sections so that each fact is written before it is read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from yaml.nodes import Node

from proxy.config.model import MiddlewareSpec, PathNormalization
from proxy.config.reader import Fields, NodeReader

_T = TypeVar("_T")


@dataclass(slots=True)
class LoadContext:
    """The cross-section state of one load. Each field says who writes it and who reads it;
    a None means "unknown" (the section is missing or unreadable), and the checks that need
    it are then skipped: the section's own error is the one worth reading."""

    # Written by `upstreams`, read by `routes`: the names defined (a route's upstream must
    # be one) and the protocol of each upstream read (WebSocket needs HTTP/1.1).
    upstream_names: set[str] | None = None
    upstream_protocols: dict[str, str] = field(default_factory=dict)
    # Written by `middleware`, read by the chains (`global_middleware`, a route's
    # `middleware`): the named instances, and the names defined but broken (a reference to
    # one is not reported again).
    named_middleware: dict[str, MiddlewareSpec] | None = None
    failed_middleware: set[str] = field(default_factory=set)
    # Written by load.py once `global_middleware` is read, read by the routes' chains: a
    # route's chain runs after it (a cache in it answers before a route's access checks).
    global_chain: tuple[MiddlewareSpec, ...] = ()
    # Written by `path_normalization`, read by `routes`: a route's path matcher must be in
    # the form that requests are normalized to.
    path_normalization: PathNormalization = field(default_factory=PathNormalization)
    # Written by `listeners` and `admin`: each address bound, and the key path that bound
    # it (two sockets on one address are an error).
    binds: dict[tuple[str, int], str] = field(default_factory=dict)
    # Written by `listeners`, read by `client_ip` and load.py: the listeners that take
    # PROXY headers, whose senders client_ip.trusted_proxies must name.
    proxy_protocol_listeners: list[Fields] = field(default_factory=list)


# A section of routes.yaml: its reader, the context, the section's node and key path.
Section = Callable[[NodeReader, LoadContext, Node, str], _T]
