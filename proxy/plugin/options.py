"""`Options`: how a middleware reads its YAML options, with routes.yaml's file:line errors.
Part of the plugin surface: import it from `proxy` (proxy/__init__.py).

Each reader takes the key and the value to use when the key is absent. An invalid value is
recorded as a config error (`routes.yaml:12: middleware.keys.header: expected a string,
got an integer (5)`) and the default is returned, so the factory runs to its end and one
`gatehouse check` reports every problem. `error` records a problem the factory finds
itself (a key file that does not exist, two options that exclude each other).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from yaml.nodes import Node, ScalarNode

from proxy.config.reader import Fields, NodeReader, Reported
from proxy.config.spec import Option, required_of

_T = TypeVar("_T")
_MISSING = object()


class Options:
    """The options of one middleware instance (`middleware.NAME` or an inline entry)."""

    def __init__(self, reader: NodeReader, fields: Fields, name: str, node: Node | None) -> None:
        self._reader = reader
        self._fields = fields
        self.name = name  # the instance's name: its metrics label and log name
        self._node = node
        self.failed = False  # an error was recorded for these options

    def __contains__(self, key: str) -> bool:
        return key in self._fields

    @property
    def path(self) -> str:
        """The key path of these options (`middleware.keys`, `routes[0].middleware[1]`)."""
        return self._fields.path

    def _get(self, key: str, parse: Callable[[Node, str], _T], default: _T) -> _T:
        node = self._fields.nodes.get(key)
        if node is None:
            return default
        try:
            return parse(node, self._fields.key_path(key))
        except Reported:
            self.failed = True
            return default

    def error(self, key: str | None, message: str) -> None:
        """Record a problem with `key` (None: with the options as a whole)."""
        self.failed = True
        if key is not None and key in self._fields:
            self._fields.error(key, message)
        else:
            self._reader.error(self._node, self.path, message)

    # -- typed readers ------------------------------------------------------------------
    def string(self, key: str, default: str = "") -> str:
        """A string (`${VAR}` substituted)."""
        return self._get(key, self._reader.string, default)

    def optional_string(self, key: str) -> str | None:
        """A string, or None when absent."""
        return self._get(key, self._reader.string, None)

    def integer(self, key: str, default: int, minimum: int = 0) -> int:
        """An integer >= `minimum`."""
        return self._get(key, lambda n, p: self._reader.integer(n, p, minimum), default)

    def number(self, key: str, default: float, minimum: float = 0.0) -> float:
        """An integer or a decimal >= `minimum`."""

        def parse(node: Node, path: str) -> float:
            value = self._reader.value(node, path)
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise self._reader.type_error(node, path, "a number")
            if value < minimum:
                raise self._reader.error(node, path, f"must be at least {minimum}, got {value}")
            return float(value)

        return self._get(key, parse, default)

    def boolean(self, key: str, default: bool) -> bool:
        """true or false."""
        return self._get(key, self._reader.boolean, default)

    def duration(self, key: str, default: float, *, positive: bool = False) -> float:
        """Seconds, from `250ms`, `5s`, `2m`..."""
        return self._get(key, lambda n, p: self._reader.duration(n, p, positive), default)

    def size(self, key: str, default: int, *, positive: bool = False) -> int:
        """Bytes, from `16KiB`, `1MiB`..."""
        return self._get(key, lambda n, p: self._reader.size(n, p, positive), default)

    def choice(self, key: str, choices: Sequence[str], default: str) -> str:
        """One of `choices`."""
        return self._get(key, lambda n, p: self._reader.choice(n, p, choices, key), default)

    def strings(self, key: str, default: Sequence[str] = ()) -> tuple[str, ...]:
        """A list of strings (a single string reads as a list of one)."""

        def parse(node: Node, path: str) -> tuple[str, ...]:
            if isinstance(node, ScalarNode):
                return (self._reader.string(node, path),)
            items = self._reader.sequence(node, path)
            values: list[str] = []
            failed = False
            for index, item in enumerate(items):
                try:
                    values.append(self._reader.string(item, f"{path}[{index}]"))
                except Reported:
                    failed = True
            if failed:
                raise Reported
            return tuple(values)

        return self._get(key, parse, tuple(default))

    def string_map(self, key: str) -> dict[str, str]:
        """A mapping of strings to strings (header names to values, say)."""

        def parse(node: Node, path: str) -> dict[str, str]:
            result: dict[str, str] = {}
            failed = False
            for _, name, value in self._reader.entries(node, path):
                try:
                    result[name] = self._reader.text(value, f"{path}.{name}")
                except Reported:
                    failed = True
            if failed:
                raise Reported
            return result

        return self._get(key, parse, {})

    def header_values(self, key: str) -> dict[str, str]:
        """A mapping of header names to the values the middleware sends (string_map); the
        values are hidden in the admin listener's /config, as they often carry
        credentials for the upstream."""
        found = self.node(key)
        if found is not None:
            self._reader.conceal(found[0])
        return self.string_map(key)

    def conceal(self, key: str) -> None:
        """Hide option `key`'s value (each scalar in it) in /config, whatever the key is
        called: for a plugin's options that are credentials or values it sends."""
        found = self.node(key)
        if found is not None:
            self._reader.conceal(found[0])

    def converted(self, key: str, parse: Callable[[str], _T], expected: str, default: _T) -> _T:
        """A string passed through `parse`, which raises ConfigValueError with the reason
        (a rate like `100/s`, a CIDR list entry...)."""
        return self._get(key, lambda n, p: self._reader.convert(n, p, parse, expected), default)

    @property
    def reader(self) -> NodeReader:
        """The config's reader, for options no typed reader here covers; errors it
        records are the config's, with their lines."""
        return self._reader

    def node(self, key: str) -> tuple[Node, str] | None:
        """The YAML node of option `key` and its key path (None when absent)."""
        node = self._fields.nodes.get(key)
        if node is None:
            return None
        return node, self._fields.key_path(key)

    def items(self, key: str) -> list[tuple[Node, str]] | None:
        """Each item of list option `key` with its own key path (`allow[2]`), so that a bad
        item is reported at its line; a single scalar reads as a list of one. None when
        absent or not a list (the error is recorded)."""
        found = self.node(key)
        if found is None:
            return None
        node, path = found
        if isinstance(node, ScalarNode):
            return [(node, path)]
        try:
            children = self._reader.sequence(node, path)
        except Reported:
            self.failed = True
            return None
        return [(child, f"{path}[{index}]") for index, child in enumerate(children)]

    def nested(
        self,
        key: str,
        allowed: Sequence[str] | Mapping[str, Option],
        required: Sequence[str] = (),
    ) -> Options | None:
        """A sub-mapping read the same way (None when absent or not a mapping): `allowed`
        is its keys, or its key table (whose required keys are then required too)."""
        node = self._fields.nodes.get(key)
        if node is None:
            return None
        if isinstance(allowed, Mapping):
            required = (*required, *required_of(allowed))
        try:
            fields = self._reader.mapping(
                node, self._fields.key_path(key), tuple(allowed), required
            )
        except Reported:
            self.failed = True
            return None
        return Options(self._reader, fields, self.name, node)
