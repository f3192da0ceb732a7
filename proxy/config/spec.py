"""`Option`: what one key of routes.yaml is (its type, default and meaning), written once.

A mapping of routes.yaml is described by a key table, `{key: Option}`. The loader takes
the keys it accepts (and those it requires) from the tables: `proxy/config/keys.py` (and
`upstream_keys.py`, an upstream's) for the gateway's own sections, and each middleware's
`OPTIONS` for its options (a built-in declares `OPTIONS` as such a table; a plugin may
still give a plain list of names). So a key cannot be accepted without being described,
and `gatehouse schema` (`proxy/tools/schema.py`) prints the tables as a JSON Schema.

Each constructor below makes an Option for one kind of value, with the JSON Schema of the
values the loader accepts for it: durations and sizes as the strings and numbers that
`proxy/config/values.py` parses, and, for every scalar that is not a string, a string
holding a `${VAR}` reference too (its value is typed after substitution). Defaults are
given as the loader's (durations in seconds, sizes in bytes) and shown as they would be
written (`10s`, `32KiB`).

Part of the plugin surface: import `Option` and the constructors through `proxy`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from proxy.config.values import DURATION_PATTERN, SIZE_PATTERN, format_duration, format_size

__all__ = [
    "UNSET",
    "KeyTable",
    "Option",
    "any_of",
    "boolean",
    "choice",
    "duration",
    "integer",
    "keys_of",
    "list_of",
    "mapping",
    "named",
    "nullable",
    "number",
    "raw",
    "required_of",
    "size",
    "string",
    "string_map",
    "strings",
    "text",
]

JsonSchema = dict[str, Any]


class _Unset:
    """The default of a key that has none (required, or nothing stands in for it)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()

# A string with a `${VAR}` reference stands for any scalar: it is typed after substitution.
_ENV_REFERENCE: JsonSchema = {
    "type": "string",
    "pattern": r"\$\{",
    "description": "a ${VAR} or ${VAR:-default} reference, typed after substitution",
}


def _scalar(schema: JsonSchema) -> JsonSchema:
    """`schema`, or a `${VAR}` reference."""
    return {"anyOf": [schema, _ENV_REFERENCE]}


def _amount(pattern: str, number_type: str, positive: bool, what: str) -> JsonSchema:
    bound = "exclusiveMinimum" if positive else "minimum"
    written: JsonSchema = {"type": "string", "pattern": pattern}
    if positive:
        written["description"] = f"a {what} greater than 0"
    return {"anyOf": [written, {"type": number_type, bound: 0}, _ENV_REFERENCE]}


def mapping_schema(keys: KeyTable, also_required: Sequence[str] = ()) -> JsonSchema:
    """The JSON Schema of a mapping with the keys of `keys` and no others."""
    schema: JsonSchema = {
        "type": "object",
        "properties": {key: option.json_schema() for key, option in keys.items()},
        "additionalProperties": False,
    }
    needed = list(dict.fromkeys((*required_of(keys), *also_required)))
    if needed:
        schema["required"] = needed
    return schema


@dataclass(frozen=True, slots=True)
class Option:
    """One key: its `description`, the JSON Schema of its values (`schema`), its
    `default` (UNSET: none), whether it is `required`, and, for a mapping, its own key
    table (`keys`)."""

    description: str
    schema: Mapping[str, Any]
    default: Any = UNSET
    required: bool = False
    keys: Mapping[str, Option] | None = field(default=None)

    def json_schema(self) -> JsonSchema:
        """The key's JSON Schema, with its description and default."""
        result: JsonSchema = {"description": self.description}
        result.update(self.schema)
        if self.default is not UNSET:
            result["default"] = self.default
        return result

    # --- one constructor per kind of value (Option.string(...), ...) ---

    @staticmethod
    def raw(
        description: str, schema: JsonSchema, default: Any = UNSET, required: bool = False
    ) -> Option:
        """A key whose values no constructor below describes: `schema` as given."""
        return Option(description, schema, default, required)

    @staticmethod
    def string(description: str, default: Any = UNSET, required: bool = False) -> Option:
        """A string."""
        return Option(description, {"type": "string"}, default, required)

    @staticmethod
    def text(description: str, default: Any = UNSET, required: bool = False) -> Option:
        """A scalar read as text: numbers and booleans as written (`debug: 1` is "1")."""
        return Option(description, {"type": ["string", "number", "boolean"]}, default, required)

    @staticmethod
    def integer(
        description: str,
        default: Any = UNSET,
        minimum: int = 0,
        maximum: int | None = None,
        required: bool = False,
    ) -> Option:
        """An integer from `minimum` (to `maximum`)."""
        schema: JsonSchema = {"type": "integer", "minimum": minimum}
        if maximum is not None:
            schema["maximum"] = maximum
        return Option(description, _scalar(schema), default, required)

    @staticmethod
    def number(description: str, default: Any = UNSET, minimum: float = 0.0) -> Option:
        """An integer or a decimal >= `minimum`."""
        return Option(description, _scalar({"type": "number", "minimum": minimum}), default)

    @staticmethod
    def boolean(description: str, default: Any = UNSET) -> Option:
        """true or false."""
        return Option(description, _scalar({"type": "boolean"}), default)

    @staticmethod
    def duration(
        description: str,
        default: float | Any | None = UNSET,
        positive: bool = False,
        required: bool = False,
    ) -> Option:
        """A duration: `250ms`, `5s`, `1m30s`, `1h`, `1d`, or a number of seconds. A
        `default` in seconds is shown as written (`10s`)."""
        schema = _amount(DURATION_PATTERN, "number", positive, "duration")
        if isinstance(default, int | float) and not isinstance(default, bool):
            default = format_duration(float(default))
        return Option(description, schema, default, required)

    @staticmethod
    def size(
        description: str,
        default: int | Any | None = UNSET,
        positive: bool = False,
        required: bool = False,
    ) -> Option:
        """A size: `512B`, `16KiB` or `16Ki`, `10MB` or `10M`, or a number of bytes. A
        `default` in bytes is shown as written (`32KiB`)."""
        schema = _amount(SIZE_PATTERN, "integer", positive, "size")
        if isinstance(default, int) and not isinstance(default, bool):
            default = format_size(default)
        return Option(description, schema, default, required)

    @staticmethod
    def choice(choices: Sequence[str], description: str, default: Any = UNSET) -> Option:
        """One of `choices`."""
        return Option(description, _scalar({"enum": list(choices)}), default)

    @staticmethod
    def strings(description: str, default: Any = UNSET, required: bool = False) -> Option:
        """A list of strings; one string reads as a list of one."""
        schema: JsonSchema = {
            "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]
        }
        shown = list(default) if isinstance(default, tuple | list) else default
        return Option(description, schema, shown, required)

    @staticmethod
    def string_map(description: str) -> Option:
        """A mapping of names to values (numbers and booleans read as written)."""
        values: JsonSchema = {"type": ["string", "number", "boolean"]}
        return Option(description, {"type": "object", "additionalProperties": values})

    @staticmethod
    def mapping(
        keys: KeyTable,
        description: str,
        required: bool = False,
        also_required: Sequence[str] = (),
    ) -> Option:
        """A mapping with the keys of `keys` and no others (`also_required`: keys required
        beyond those the table marks, as a middleware's `REQUIRED`)."""
        return Option(description, mapping_schema(keys, also_required), UNSET, required, keys)

    @staticmethod
    def list_of(
        item: Option,
        description: str,
        min_items: int = 0,
        required: bool = False,
        default: Any = UNSET,
    ) -> Option:
        """A list of `item`s."""
        schema: JsonSchema = {"type": "array", "items": item.json_schema()}
        if min_items:
            schema["minItems"] = min_items
        return Option(description, schema, default, required, item.keys)

    @staticmethod
    def named(value: Option, description: str, required: bool = False) -> Option:
        """A mapping of names (chosen in the file) to `value`s."""
        schema: JsonSchema = {"type": "object", "additionalProperties": value.json_schema()}
        return Option(description, schema, UNSET, required, value.keys)

    @staticmethod
    def any_of(
        description: str, *options: Option, default: Any = UNSET, required: bool = False
    ) -> Option:
        """Any one of `options` (a switch written `true`/`false` or as a mapping, say)."""
        schema: JsonSchema = {"anyOf": [option.json_schema() for option in options]}
        return Option(description, schema, default, required)

    @staticmethod
    def nullable(option: Option) -> Option:
        """`option`, or null (which reads as leaving the key out)."""
        schema: JsonSchema = {"anyOf": [dict(option.schema), {"type": "null"}]}
        return Option(option.description, schema, option.default, option.required, option.keys)


KeyTable = Mapping[str, Option]


def keys_of(table: KeyTable) -> tuple[str, ...]:
    """The keys a table allows, in its order (what `NodeReader.mapping` is given)."""
    return tuple(table)


def required_of(table: KeyTable) -> tuple[str, ...]:
    """The keys a table requires."""
    return tuple(key for key, option in table.items() if option.required)


# The constructors under their own names, for the key tables (proxy/config/keys.py and
# upstream_keys.py).
raw = Option.raw
string = Option.string
text = Option.text
integer = Option.integer
number = Option.number
boolean = Option.boolean
duration = Option.duration
size = Option.size
choice = Option.choice
strings = Option.strings
string_map = Option.string_map
mapping = Option.mapping
list_of = Option.list_of
named = Option.named
any_of = Option.any_of
nullable = Option.nullable
