"""The middleware sections of routes.yaml: `middleware` (named instances),
`global_middleware` and each route's `middleware` list (names, or inline entries).

`read_middleware` reads the named instances, `read_chain` a list of them, refusing a
chain where a middleware that answers from a store (`SERVES_STORED`, a cache) comes before
one that controls access (`ACCESS_CONTROL`, authentication or address rules). Each instance's
`type` is resolved first (middleware/registry.py), because the type says which other keys
are allowed; then its factory reads its options through `Options` (proxy/plugin/options.py),
so a plugin's errors look like every other error in the file. A factory that raises (a plugin's
bug, a key file it cannot read) is a config error naming the instance, not a crash.
"""

from __future__ import annotations

from contextlib import suppress

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode

from middleware.registry import UnknownType, known_types, resolve
from proxy.config.context import LoadContext
from proxy.config.model import MiddlewareSpec
from proxy.config.reader import NodeReader, Reported, did_you_mean, join_path
from proxy.plugin.base import required_options
from proxy.plugin.options import Options


def read_middleware(
    reader: NodeReader, context: LoadContext, node: Node, path: str
) -> dict[str, MiddlewareSpec]:
    """`middleware`: name -> instance. Records the instances in `context` for the chains
    to refer to, with the names whose entry failed (a reference to one is not an error of
    its own).

    Raises:
        Reported: the section is not a mapping (recorded; the chains' references are then
            left unchecked).
    """
    specs: dict[str, MiddlewareSpec] = {}
    context.named_middleware = None
    entries = reader.entries(node, path)
    context.failed_middleware = {name for _, name, _ in entries}
    for _, name, value in entries:
        with suppress(Reported):
            specs[name] = _middleware_instance(reader, value, join_path(path, name), name)
            context.failed_middleware.discard(name)
    context.named_middleware = specs
    return specs


def _middleware_instance(
    reader: NodeReader, node: Node, path: str, name: str | None
) -> MiddlewareSpec:
    """One instance: `{type: ..., options...}`. `name` None: an inline entry, named
    after its type."""
    if not isinstance(node, MappingNode):
        raise reader.type_error(node, path, "a mapping with a 'type'")
    type_node = next((v for k, v in node.value if getattr(k, "value", None) == "type"), None)
    if type_node is None:
        raise reader.error(node, path, "missing required key 'type'")
    type_path = join_path(path, "type")
    type_name = reader.string(type_node, type_path)
    try:
        factory = resolve(type_name)
    except UnknownType as exc:
        hint = did_you_mean(type_name, known_types()) if ":" not in type_name else ""
        raise reader.error(type_node, type_path, f"{exc}{hint}") from None
    allowed = ("type", *getattr(factory, "OPTIONS", ()))
    required = required_options(factory)
    fields = reader.mapping(node, path, allowed, required)
    if any(key not in fields for key in required):
        raise Reported  # reported by `mapping`; the factory would only add noise
    instance_name = name if name is not None else type_name
    options = Options(reader, fields, instance_name, node)
    try:
        instance = factory(options)
    except Reported:
        raise
    except Exception as exc:  # a plugin's own failure is the config's problem, not ours
        message = f"middleware {type_name!r} failed to load: {type(exc).__name__}: {exc}"
        raise reader.error(node, path, message) from None
    if not callable(instance):
        raise reader.error(node, path, f"type {type_name!r} did not build a middleware")
    line = node.start_mark.line + 1
    return MiddlewareSpec(instance_name, type_name, instance, yaml.serialize(node), line)


def read_chain(
    reader: NodeReader, context: LoadContext, node: Node, path: str
) -> tuple[MiddlewareSpec, ...]:
    """A list of middleware (`global_middleware`, a route's `middleware`): names of
    `middleware` entries, or inline `{type: ...}`. An entry that fails is left out.

    Raises:
        Reported: not a list (recorded).
    """
    chain: list[MiddlewareSpec] = []
    # The first middleware before this point that may answer from its store (a cache),
    # global_middleware's for a route's chain.
    stored = next((spec for spec in context.global_chain if _serves_stored(spec)), None)
    for item, item_path in reader.items(node, path):
        with suppress(Reported):
            if isinstance(item, ScalarNode):
                spec = _named(reader, context, item, item_path)
            else:
                spec = _middleware_instance(reader, item, item_path, None)
            chain.append(spec)
            if stored is not None and getattr(spec.instance, "ACCESS_CONTROL", False):
                reader.error(item, item_path, _unguarded(spec, stored, context))
            elif stored is None and _serves_stored(spec):
                stored = spec
    return tuple(chain)


def _serves_stored(spec: MiddlewareSpec) -> bool:
    return bool(getattr(spec.instance, "SERVES_STORED", False))


def _unguarded(guard: MiddlewareSpec, stored: MiddlewareSpec, context: LoadContext) -> str:
    """Why `guard` may not come after `stored`: a response stored for a client it let
    through would be given to clients it never checked (a key, a cookie or an address the
    cache's key does not hold)."""
    where = ""
    if any(spec is stored for spec in context.global_chain):
        where = " in global_middleware (name it in the routes' own chains instead)"
    return (
        f"{guard.name!r} ({guard.type}) controls access, but {stored.name!r} ({stored.type})"
        f"{where} comes before it and would answer from its store requests that "
        f"{guard.name!r} never checked: list {stored.name!r} after the access checks"
    )


def _named(reader: NodeReader, context: LoadContext, node: Node, path: str) -> MiddlewareSpec:
    name = reader.string(node, path)
    named = context.named_middleware
    if named is None or name in context.failed_middleware:
        raise Reported  # the section, or this entry, was reported already
    spec = named.get(name)
    if spec is None:
        if name in known_types() and name not in named:
            hint = f" (to use the built-in type, write {{type: {name}}})"
        else:
            hint = did_you_mean(name, sorted(named)) if named else " (none are defined)"
        raise reader.error(node, path, f"unknown middleware {name!r}{hint}")
    return spec
