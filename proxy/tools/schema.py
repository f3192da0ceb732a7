"""`gatehouse schema`: the JSON Schema (draft 2020-12) of routes.yaml, for editors.

It is made from what the loader itself reads by: the key tables of proxy/config/keys.py and
upstream_keys.py (the keys the section readers accept, with their types, defaults and
meanings) and, for middleware, each type's `OPTIONS` (a key table on the built-ins) and
`REQUIRED`. An entry's `type` picks its options (`if type is X then X's options`), so an
editor completes them.

    gatehouse schema > gatehouse.schema.json
    # yaml-language-server: $schema=./gatehouse.schema.json      (first line of routes.yaml)
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

from middleware.registry import BUILTIN, ENTRY_POINT_GROUP, UnknownType, resolve
from proxy.config.keys import MIDDLEWARE_CHAIN_REF, MIDDLEWARE_ENTRY_REF, TOP
from proxy.config.spec import JsonSchema, Option, mapping_schema
from proxy.plugin.base import required_options

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
_DEFS = "#/$defs/"
# A type not in the registry: a plugin named `package.module:Factory`.
_PLUGIN_TYPE = {"type": "string", "pattern": "^[^:]+:[^:]+$"}


def middleware_types() -> dict[str, Any]:
    """The factory of each middleware type an entry may name without a module path: the
    built-ins and the installed `gatehouse.middleware` entry points that load."""
    factories: dict[str, Any] = {}
    names = list(BUILTIN)
    names += sorted(ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    for name in names:
        try:
            factories.setdefault(name, resolve(name))
        except UnknownType:  # a broken plugin: its entries are refused at load anyway
            continue
    return factories


def _options_schema(type_name: str, factory: Any) -> JsonSchema:
    """The mapping of one type's entries: `type` and the factory's options."""
    declared = getattr(factory, "OPTIONS", ())
    table: dict[str, Option] = {}
    for key in declared:
        option = declared[key] if isinstance(declared, dict) else None
        if isinstance(option, Option):
            table[key] = option
        else:  # a plugin that lists names only: any value
            table[key] = Option(f"an option of {type_name!r}", {})
    schema = mapping_schema(table, required_options(factory))
    type_key = {"const": type_name, "description": _first_line(factory)}
    schema["properties"] = {"type": type_key, **schema["properties"]}
    schema["required"] = ["type", *schema.get("required", [])]
    return schema


def _first_line(factory: Any) -> str:
    doc = (getattr(factory, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else "a middleware type"


def build_schema() -> JsonSchema:
    """The JSON Schema of routes.yaml."""
    factories = middleware_types()
    defs: JsonSchema = {}
    branches: list[JsonSchema] = []
    for type_name, factory in factories.items():
        name = f"middleware.{type_name}"
        defs[name] = _options_schema(type_name, factory)
        condition = {"properties": {"type": {"const": type_name}}, "required": ["type"]}
        branches.append({"if": condition, "then": {"$ref": _DEFS + name}})
    defs[MIDDLEWARE_ENTRY_REF.removeprefix(_DEFS)] = {
        "description": "a middleware entry: its type, and that type's options",
        "type": "object",
        "required": ["type"],
        "properties": {
            "type": {
                "description": "a built-in or installed type, or a plugin's package.module:Factory",
                "anyOf": [{"enum": list(factories)}, _PLUGIN_TYPE],
            }
        },
        "allOf": branches,
    }
    defs[MIDDLEWARE_CHAIN_REF.removeprefix(_DEFS)] = {
        "type": "array",
        "items": {
            "anyOf": [
                {"type": "string", "description": "the name of an entry of `middleware`"},
                {"$ref": MIDDLEWARE_ENTRY_REF},
            ]
        },
    }
    return {
        "$schema": SCHEMA_DIALECT,
        "title": "Gatehouse routes.yaml",
        "description": "The configuration of the Gatehouse API gateway (gatehouse schema)",
        **mapping_schema(TOP),
        "$defs": defs,
    }
