"""The middleware sections of routes.yaml: `middleware` (named instances),
`global_middleware` and each route's `middleware` list (names, or inline entries).

A mixin of the loader like `config_routes.RouteSections`. Each instance's `type` is resolved
first (middleware/registry.py), because the type says which other keys are allowed; then
its factory reads its options through `middleware.options.Options`, so a plugin's errors
look like every other error in the file. A factory that raises (a plugin's bug, a key file
it cannot read) is a config error naming the instance, not a crash.
"""

from __future__ import annotations

from contextlib import suppress

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode

from middleware.base import required_options
from middleware.options import Options
from middleware.registry import UnknownType, known_types, resolve
from proxy.config.model import MiddlewareSpec
from proxy.config.reader import NodeReader, Reported, did_you_mean, join_path


class MiddlewareSections(NodeReader):
    """Reads `middleware`, `global_middleware` and route chains."""

    # The named instances; None while unread or unreadable (references are then unchecked).
    _named_middleware: dict[str, MiddlewareSpec] | None = None
    _failed_middleware: frozenset[str] | set[str] = frozenset()  # defined but broken

    def _middleware_section(self, node: Node, path: str) -> dict[str, MiddlewareSpec]:
        specs: dict[str, MiddlewareSpec] = {}
        self._named_middleware = None
        entries = self.entries(node, path)
        self._failed_middleware = {name for _, name, _ in entries}
        for _, name, value in entries:
            with suppress(Reported):
                specs[name] = self._middleware_instance(value, join_path(path, name), name)
                self._failed_middleware.discard(name)
        self._named_middleware = specs
        return specs

    def _middleware_instance(self, node: Node, path: str, name: str | None) -> MiddlewareSpec:
        """One instance: `{type: ..., options...}`. `name` None: an inline entry, named
        after its type."""
        if not isinstance(node, MappingNode):
            raise self.type_error(node, path, "a mapping with a 'type'")
        type_node = next((v for k, v in node.value if getattr(k, "value", None) == "type"), None)
        if type_node is None:
            raise self.error(node, path, "missing required key 'type'")
        type_path = join_path(path, "type")
        type_name = self.string(type_node, type_path)
        try:
            factory = resolve(type_name)
        except UnknownType as exc:
            hint = did_you_mean(type_name, known_types()) if ":" not in type_name else ""
            raise self.error(type_node, type_path, f"{exc}{hint}") from None
        allowed = ("type", *getattr(factory, "OPTIONS", ()))
        required = required_options(factory)
        fields = self.mapping(node, path, allowed, required)
        if any(key not in fields for key in required):
            raise Reported  # reported by `mapping`; the factory would only add noise
        instance_name = name if name is not None else type_name
        options = Options(self, fields, instance_name, node)
        try:
            instance = factory(options)
        except Reported:
            raise
        except Exception as exc:  # a plugin's own failure is the config's problem, not ours
            message = f"middleware {type_name!r} failed to load: {type(exc).__name__}: {exc}"
            raise self.error(node, path, message) from None
        if not callable(instance):
            raise self.error(node, path, f"type {type_name!r} did not build a middleware")
        line = node.start_mark.line + 1
        return MiddlewareSpec(instance_name, type_name, instance, yaml.serialize(node), line)

    def _chain(self, node: Node, path: str) -> tuple[MiddlewareSpec, ...]:
        """A list of middleware: names of `middleware` entries, or inline `{type: ...}`."""
        chain: list[MiddlewareSpec] = []
        for index, item in enumerate(self.sequence(node, path)):
            item_path = f"{path}[{index}]"
            with suppress(Reported):
                if isinstance(item, ScalarNode):
                    chain.append(self._named(item, item_path))
                else:
                    chain.append(self._middleware_instance(item, item_path, None))
        return tuple(chain)

    def _named(self, node: Node, path: str) -> MiddlewareSpec:
        name = self.string(node, path)
        named = self._named_middleware
        if named is None or name in self._failed_middleware:
            raise Reported  # the section, or this entry, was reported already
        spec = named.get(name)
        if spec is None:
            if name in known_types() and name not in named:
                hint = f" (to use the built-in type, write {{type: {name}}})"
            else:
                hint = did_you_mean(name, sorted(named)) if named else " (none are defined)"
            raise self.error(node, path, f"unknown middleware {name!r}{hint}")
        return spec
