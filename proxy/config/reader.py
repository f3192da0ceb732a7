"""NodeReader: reads typed values out of composed YAML nodes, recording every problem as
`file:line: key.path: message` instead of stopping at the first (`proxy/config/load.py` builds
the schema on it; the value parsers are in `proxy/config/values.py`).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from proxy.config.values import (
    ConfigValueError,
    ca_bundle_problem,
    parse_duration,
    parse_size,
    substitute_env,
)

# --- Reading values out of YAML nodes -------------------------------------------------------

_TAG = "tag:yaml.org,2002:"
_STR_TAG, _MERGE_TAG = _TAG + "str", _TAG + "merge"
_TEXT_TAGS = (_STR_TAG, _TAG + "timestamp")  # a date is just text to us
_CONSTRUCTOR = SafeConstructor()
# The stubs leave Resolver.resolve untyped.
_resolve_tag: Callable[[type[ScalarNode], str, tuple[bool, bool]], str] = Resolver().resolve
_CONSTRUCTORS: dict[str, Callable[[ScalarNode], object]] = {
    _TAG + "int": _CONSTRUCTOR.construct_yaml_int,
    _TAG + "float": _CONSTRUCTOR.construct_yaml_float,
    _TAG + "bool": _CONSTRUCTOR.construct_yaml_bool,
    _TAG + "null": lambda node: None,
}
_PLAIN_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
MAX_KEY_SHOWN = 64  # characters of a key in a key path
# An error is one line of a report: a value or key quoted whole in it is cut past this.
MAX_ERROR_CHARS = 1000

_T = TypeVar("_T")
_V = TypeVar("_V")
_N = TypeVar("_N", int, float)
Parse = Callable[[Node, str], _T]


class Reported(Exception):
    """Unwinds the parse of a value whose error NodeReader has already recorded."""


def join_path(path: str, key: str) -> str:
    """`routes[0]` + `upstream` -> `routes[0].upstream`; odd keys are quoted: `x['a.b']`,
    and a key past MAX_KEY_SHOWN characters is cut (`x['aaaa...']`), so that the paths of
    what lies under it do not each repeat it whole."""
    if len(key) > MAX_KEY_SHOWN:
        return f"{path}[{key[:MAX_KEY_SHOWN]!r}...]"
    if not _PLAIN_KEY_RE.fullmatch(key):
        return f"{path}[{key!r}]"
    return f"{path}.{key}" if path else key


def did_you_mean(word: str, options: Sequence[str]) -> str:
    """` (did you mean 'x'?)` when one of `options` is close to `word`, else ``."""
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def describe(node: Node, value: object) -> str:
    """What was found, for "expected X, got Y" messages: `a list`, `an integer (5)`..."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value})"
    return f"a string ({value!r})"


class NodeReader:
    """Reads typed values out of `yaml.compose()` nodes, recording every error as
    `{source}:{line}: {path}: {message}` (line from the node's start mark, 1-based).

    Readers take (node, key path) and return the value, or record an error and raise
    Reported; `get` turns that into the field's default so that reading goes on and all
    errors are collected. Scalar values (not keys) get `${VAR}` substitution from `env`.
    """

    def __init__(self, source: str, env: Mapping[str, str]) -> None:
        self.source = source
        self.env = env
        self._errors: list[tuple[int, int, str]] = []
        # Start offsets of the scalars /config hides by position (see `conceal`).
        self.concealed: set[int] = set()

    @property
    def errors(self) -> list[str]:
        """Every error so far, sorted by line (then in the order found)."""
        return [text for _, _, text in sorted(self._errors)]

    @property
    def error_count(self) -> int:
        """How many errors were recorded so far: a reader compares it before and after a
        part, to tell whether that part added any."""
        return len(self._errors)

    def error(self, node: Node | None, path: str, message: str) -> Reported:
        """Record an error at `node` (None: line 1); returns Reported for the caller to raise
        if it must."""
        line = node.start_mark.line + 1 if node is not None else 1
        where = f"{path}: " if path else ""
        text = f"{self.source}:{line}: {where}{message}"
        if len(text) > MAX_ERROR_CHARS:
            text = f"{text[:MAX_ERROR_CHARS]}... ({len(text) - MAX_ERROR_CHARS} more characters)"
        self._errors.append((line, len(self._errors), text))
        return Reported()

    def conceal(self, node: Node) -> None:
        """Have /config show `node`'s value as `<redacted>` wherever it appears, whatever
        its key is called: a header value a middleware sends, a value a route matches on.
        For a list or mapping, every scalar value in it (mapping keys stay shown). A value
        tagged `!public` is shown all the same (proxy/config/view.py)."""
        pending, seen = [node], set()
        while pending:  # iterative: the document's depth is bounded, but aliases repeat
            current = pending.pop()
            if id(current) in seen:
                continue
            seen.add(id(current))
            if isinstance(current, ScalarNode):
                self.concealed.add(current.start_mark.index)
            elif isinstance(current, SequenceNode):
                pending += current.value
            elif isinstance(current, MappingNode):
                pending += [value for _, value in current.value]

    # --- shapes ---

    def value(self, node: Node, path: str) -> object:
        """A scalar's Python value after `${VAR}` substitution; a collection is returned as
        the node itself. A scalar that held a reference is typed after substitution, quoted
        or not (a flow mapping needs the quotes): `workers: "${N:-2}"` is an int. Readers of
        strings (`string`, `text`) take the text as it is."""
        if not isinstance(node, ScalarNode):
            return node
        tag, text = node.tag, node.value
        if tag == _STR_TAG:
            text = self._substitute(node, path)
            if text != node.value:
                tag = _resolve_tag(ScalarNode, text, (True, False))
        if tag in _TEXT_TAGS:
            return text
        construct = _CONSTRUCTORS.get(tag)
        if construct is None:
            shown = "!!" + tag.removeprefix(_TAG) if tag.startswith(_TAG) else tag
            raise self.error(node, path, f"unsupported YAML tag {shown!r}")
        return construct(ScalarNode(tag, text))

    def _substitute(self, node: ScalarNode, path: str) -> str:
        text, problems = substitute_env(node.value, self.env)
        for problem in problems:
            self.error(node, path, problem)
        if problems:
            raise Reported
        return text

    def type_error(self, node: Node, path: str, expected: str, hint: str = "") -> Reported:
        """Record `expected {expected}, got {what node holds}{hint}`."""
        found = describe(node, self.value(node, path))
        return self.error(node, path, f"expected {expected}, got {found}{hint}")

    def entries(self, node: Node, path: str) -> list[tuple[Node, str, Node]]:
        """(key node, key, value node) of a mapping, with `<<` merges expanded (explicit keys
        win, then earlier merges). Duplicate and non-scalar keys are errors. (A merge
        cannot loop: proxy/config/document.py refuses an alias inside its own anchor.)"""
        if not isinstance(node, MappingNode):
            raise self.type_error(node, path, "a mapping")
        explicit: dict[str, tuple[Node, str, Node]] = {}
        merged: list[tuple[Node, str, Node]] = []
        for key_node, value_node in node.value:
            key = key_node.value
            if key_node.tag == _MERGE_TAG:
                sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
                for source in sources:
                    if not isinstance(source, MappingNode):
                        self.type_error(source, path, "a mapping to merge with '<<'")
                    else:
                        merged += self.entries(source, path)
            elif not isinstance(key_node, ScalarNode):
                self.error(key_node, path, f"expected a string key, got {describe(key_node, 0)}")
            elif key in explicit:
                first = explicit[key][0].start_mark.line + 1
                message = f"duplicate key {key!r} (first at line {first})"
                self.error(key_node, join_path(path, key), message)
            else:
                explicit[key] = (key_node, key, value_node)
        entries = list(explicit.values())
        for entry in merged:
            if entry[1] not in explicit:
                explicit[entry[1]] = entry
                entries.append(entry)
        return entries

    def mapping(
        self, node: Node, path: str, allowed: Sequence[str], required: Sequence[str] = ()
    ) -> Fields:
        """A mapping with a fixed set of keys: unknown keys (with a did-you-mean) and missing
        required ones are errors."""
        fields: dict[str, Node] = {}
        suggested: set[str] = set()
        for key_node, key, value_node in self.entries(node, path):
            if key in allowed:
                fields[key] = value_node
                continue
            close = difflib.get_close_matches(key, allowed, n=1)
            suggested.update(close)
            hint = (
                f"did you mean {close[0]!r}?" if close else f"expected one of: {', '.join(allowed)}"
            )
            self.error(key_node, join_path(path, key), f"unknown key {key!r} ({hint})")
        for key in required:
            if key not in fields and key not in suggested:  # a misspelt key is reported once
                self.error(node, path, f"missing required key {key!r}")
        return Fields(self, path, fields)

    def sequence(self, node: Node, path: str) -> list[Node]:
        """The items of a list."""
        if not isinstance(node, SequenceNode):
            raise self.type_error(node, path, "a list")
        return list(node.value)

    def items(self, node: Node, path: str) -> list[tuple[Node, str]]:
        """(node, key path) of each item of a list: `routes[2]`, so that an error in one
        names it."""
        return [(item, f"{path}[{index}]") for index, item in enumerate(self.sequence(node, path))]

    def nonempty_items(self, node: Node, path: str, if_empty: str) -> list[tuple[Node, str]]:
        """(node, path) of each item of a list that must not be empty."""
        items = self.items(node, path)
        if not items:
            raise self.error(node, path, if_empty)
        return items

    def name(self, node: Node, path: str) -> str:
        """A non-empty string, stripped."""
        name = self.string(node, path).strip()
        if not name:
            raise self.error(node, path, "must not be empty")
        return name

    def optional(self, parse: Parse[_T]) -> Parse[_T | None]:
        """`parse`, except that null reads as None."""

        def parse_optional(node: Node, path: str) -> _T | None:
            if self.value(node, path) is None:
                return None
            return parse(node, path)

        return parse_optional

    # --- scalars ---

    def string(self, node: Node, path: str, expected: str = "a string") -> str:
        """A string value (a number or boolean must be quoted to be read as text)."""
        if isinstance(node, ScalarNode) and node.tag == _STR_TAG:
            return self._substitute(node, path)
        quote = isinstance(node, ScalarNode) and self.value(node, path) is not None
        raise self.type_error(node, path, expected, "; quote it to use it as text" * quote)

    def text(self, node: Node, path: str) -> str:
        """Any non-null scalar as text, numbers and booleans as written (`debug: 1` -> "1")."""
        if isinstance(node, ScalarNode) and node.tag == _STR_TAG:
            return self._substitute(node, path)
        if isinstance(node, ScalarNode) and self.value(node, path) is not None:
            return str(node.value)
        raise self.type_error(node, path, "a string")

    def integer(self, node: Node, path: str, minimum: int = 0) -> int:
        """An integer >= `minimum`."""
        value = self.value(node, path)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.type_error(node, path, "an integer")
        if value < minimum:
            raise self.error(node, path, f"must be at least {minimum}, got {value}")
        return value

    def boolean(self, node: Node, path: str) -> bool:
        """true or false."""
        value = self.value(node, path)
        if not isinstance(value, bool):
            raise self.type_error(node, path, "true or false")
        return value

    def duration(self, node: Node, path: str, positive: bool = False) -> float:
        """Seconds, from `250ms`, `5s`, `1.5s`, `2m`, `1h` or a number (see parse_duration)."""
        value = self.value(node, path)
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise self.type_error(node, path, "a duration like '5s' or '250ms'")
        return self._amount(node, path, parse_duration, value, positive)

    def size(self, node: Node, path: str, positive: bool = False) -> int:
        """Bytes, from `16KiB`, `1MiB`, `10MB`, `512B` or an integer (see parse_size)."""
        value = self.value(node, path)
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise self.type_error(node, path, "a size like '16KiB' or '10MB'")
        return self._amount(node, path, parse_size, value, positive)

    def _amount(
        self, node: Node, path: str, parse: Callable[[_V], _N], value: _V, positive: bool
    ) -> _N:
        """`parse(value)`, a duration or size, with its ConfigValueError recorded; 0 is an
        error when `positive`."""
        try:
            amount = parse(value)
        except ConfigValueError as exc:
            raise self.error(node, path, str(exc)) from None
        if positive and amount == 0:
            raise self.error(node, path, "must be greater than 0")
        return amount

    # The common bounds as readers of their own, so that `Fields.get`, which takes a reader
    # of (node, path), can be given them as they are.

    def positive_integer(self, node: Node, path: str) -> int:
        """An integer >= 1: a count (workers, attempts, thresholds, weights)."""
        return self.integer(node, path, minimum=1)

    def positive_duration(self, node: Node, path: str) -> float:
        """A duration greater than 0: a timeout or an interval."""
        return self.duration(node, path, positive=True)

    def positive_size(self, node: Node, path: str) -> int:
        """A size greater than 0."""
        return self.size(node, path, positive=True)

    def readable_file(self, node: Node, path: str) -> str:
        """The name of a file that can be opened for reading (a certificate, a key, a CA
        bundle): like `nginx -t`, one that cannot is a config error, not a failure at the
        first connection."""
        name = self.string(node, path)
        try:
            with open(name, "rb"):
                pass
        except OSError as exc:
            raise self.error(node, path, f"cannot read {name!r}: {exc.strerror or exc}") from None
        return name

    def ca_bundle(self, node: Node, path: str) -> str:
        """The name of a readable file of PEM CA certificates (a bundle to verify peers
        against)."""
        ca = self.readable_file(node, path)
        problem = ca_bundle_problem(ca)
        if problem is not None:
            raise self.error(node, path, problem)
        return ca

    def choice(self, node: Node, path: str, choices: Sequence[str], what: str) -> str:
        """One of `choices`; otherwise `unsupported {what} 'x' (supported: ...)`."""
        value = self.string(node, path)
        if value not in choices:
            hint = did_you_mean(value, choices)
            message = f"unsupported {what} {value!r} (supported: {', '.join(choices)}){hint}"
            raise self.error(node, path, message)
        return value

    def regex(self, node: Node, path: str) -> str:
        """A pattern that Python's `re` compiles."""
        pattern = self.string(node, path)
        try:
            re.compile(pattern)
        except re.error as exc:
            raise self.error(node, path, f"invalid regex {pattern!r}: {exc}") from None
        return pattern

    def convert(self, node: Node, path: str, parse: Callable[[str], _T], expected: str) -> _T:
        """A string passed through `parse` (one of the parse_* functions above)."""
        text = self.string(node, path, expected)
        try:
            return parse(text)
        except ConfigValueError as exc:
            raise self.error(node, path, str(exc)) from None


class Fields:
    """The allowed keys that a mapping gave (from NodeReader.mapping), read one at a time."""

    def __init__(self, reader: NodeReader, path: str, nodes: dict[str, Node]) -> None:
        self.reader = reader
        self.path = path
        self.nodes = nodes  # key -> value node, in file order

    def __contains__(self, key: object) -> bool:
        return key in self.nodes

    def key_path(self, key: str) -> str:
        """The key path of `key`'s value: `routes[0].match`."""
        return join_path(self.path, key)

    def get(self, key: str, parse: Parse[_T], default: _T) -> _T:
        """`parse` the value of `key`, or `default` when the key is absent or its value is
        invalid (the error is recorded, so reading goes on)."""
        node = self.nodes.get(key)
        if node is None:
            return default
        try:
            return parse(node, self.key_path(key))
        except Reported:
            return default

    def error(self, key: str, message: str) -> Reported:
        """Record an error at the value of `key`."""
        return self.reader.error(self.nodes[key], self.key_path(key), message)
