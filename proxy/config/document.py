"""routes.yaml before its schema: the file read within a size limit and as UTF-8, then
composed into YAML nodes within a nesting limit and an alias-expansion limit, with the
`!public` tag read.

Every refusal here is a `ConfigError` whose lines read `{source}:{line}: {message}` like
the schema's, so `gatehouse check`, start-up and a reload report a file that cannot be read,
is too big, is not UTF-8 or is not YAML the same way as a misspelt key.

The limits keep a hostile or broken file from costing more than its size: PyYAML composes
nodes recursively, so nesting a few hundred levels deep ends in a RecursionError, and
aliases can make a small file stand for an exponentially large document ("billion
laughs"); both are refused at the line where the limit is crossed, before any reader walks
the tree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import yaml
from yaml.composer import ComposerError
from yaml.error import Mark
from yaml.events import AliasEvent, MappingStartEvent, SequenceStartEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

MAX_CONFIG_BYTES = 1024 * 1024  # 1 MiB: ~10,000 routes; PyYAML composes that in seconds
# Lists and mappings inside each other, aliases counted as expanded. The deepest part of
# the schema is about 8 levels (routes[0].match.headers.X.regex); a plugin's options add
# a few. 64 keeps every recursive reader far from Python's recursion limit.
MAX_NESTING_DEPTH = 64
# Nodes with every alias expanded: a 1 MiB file without aliases holds at most ~500,000.
MAX_EXPANDED_NODES = 1_000_000
PUBLIC_TAG = "!public"  # marks a string value /config may show (proxy/config/view.py)
_STR_TAG = "tag:yaml.org,2002:str"


class ConfigError(Exception):
    """The config is invalid. `errors` holds every problem found, one line each, sorted by
    line, as `{source}:{line}: {keypath}: {message}` (line 1 when no line is to blame)."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors: list[str] = list(errors)
        super().__init__("\n".join(self.errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)


@dataclass(frozen=True, slots=True)
class Document:
    """A composed routes.yaml: its root node (None for an empty file) and the start offsets
    (in the text) of the scalars tagged `!public`, whose tag is then plain `str`."""

    root: Node | None
    public: frozenset[int]


def read_config_file(path: str) -> str:
    """The text of the config file at `path`.

    Raises:
        ConfigError: it cannot be read, is larger than MAX_CONFIG_BYTES, or is not UTF-8.
    """
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)  # not all of /dev/zero
    except OSError as exc:
        raise ConfigError([f"{path}:1: cannot read: {exc.strerror or exc}"]) from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{path}:1: {_too_big()}"])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        message = f"cannot read: not UTF-8 ({exc.reason} at byte {exc.start})"
        raise ConfigError([f"{path}:{line}: {message}"]) from None


def compose_document(text: str, source: str) -> Document:
    """`text` as YAML nodes, within the limits above.

    Raises:
        ConfigError: the text is too big, is not YAML (a single document), nests too
            deeply, expands too far through aliases, has an alias that contains itself, or
            tags something other than a string `!public`. Any other exception is a bug.
    """
    if len(text) > MAX_CONFIG_BYTES or len(text.encode("utf-8", "replace")) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{source}:1: {_too_big()}"])
    loader: _BoundedLoader | None = None
    try:
        loader = _BoundedLoader(text)  # its reader checks every character at once
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = exc.problem or exc.context or "syntax error"
        if exc.context and exc.problem and not exc.context.startswith("while"):
            message = f"{exc.context}, {exc.problem}"  # "expected a single document..., but"
        line = mark.line + 1 if mark else 1
        raise ConfigError([f"{source}:{line}: invalid YAML: {message}"]) from None
    except yaml.YAMLError as exc:  # ReaderError: a character that YAML does not allow
        line = text.count("\n", 0, getattr(exc, "position", 0)) + 1
        reason = str(exc).splitlines()[0]
        raise ConfigError([f"{source}:{line}: invalid YAML: {reason}"]) from None
    finally:
        if loader is not None:
            loader.dispose()
    return Document(root, frozenset(loader.public))


def _too_big() -> str:
    return f"larger than {MAX_CONFIG_BYTES // 1024 // 1024} MiB, the limit for a config file"


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader's composer with the nesting and expansion limits, and `!public`.

    The parser below it is iterative; only composing recurses, one level per nested list
    or mapping, so counting levels here bounds the recursion. Aliases do not recurse (they
    return the node already composed), but what they stand for counts: each node's
    expanded size and depth are kept, so an alias adds its target's.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.public: set[int] = set()
        self._depth = 0  # lists and mappings open around the node being composed
        self._expanded = 0  # nodes so far, aliases expanded
        self._sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes, depth) expanded

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, AliasEvent):
            self._alias(event)
            return super().compose_node(parent, index)  # an unknown anchor: its own error
        deeper = isinstance(event, SequenceStartEvent | MappingStartEvent)
        if deeper and self._depth >= MAX_NESTING_DEPTH:
            message = f"nested deeper than {MAX_NESTING_DEPTH} levels of lists and mappings"
            raise _error(message, event.start_mark)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        assert node is not None  # None only at the end of the stream, never inside it
        if node.tag == PUBLIC_TAG:
            if not isinstance(node, ScalarNode):
                message = f"{PUBLIC_TAG} marks a string, not a list or mapping"
                raise _error(message, node.start_mark)
            node.tag = _STR_TAG
            self.public.add(node.start_mark.index)
        self._measure(node)
        return node

    def _alias(self, event: AliasEvent) -> None:
        """Count what an alias to a node composed already stands for."""
        target = self.anchors.get(event.anchor)
        if target is None:
            return
        size = self._sizes.get(id(target))
        if size is None:  # still being composed: the alias is inside its own anchor
            message = f"alias *{event.anchor} is inside the node it refers to (a cycle)"
            raise _error(message, event.start_mark)
        nodes, depth = size
        if self._depth + depth > MAX_NESTING_DEPTH:
            message = (
                f"alias *{event.anchor} nests deeper than {MAX_NESTING_DEPTH} levels of "
                "lists and mappings where it is used"
            )
            raise _error(message, event.start_mark)
        self._count(nodes, event.start_mark)

    def _measure(self, node: Node) -> None:
        if isinstance(node, SequenceNode):
            children: list[Node] = node.value
        elif isinstance(node, MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        nodes, depth = 1, 0
        for child in children:
            child_nodes, child_depth = self._sizes[id(child)]
            nodes += child_nodes
            depth = max(depth, child_depth + 1)
        self._sizes[id(node)] = (nodes, depth)
        self._count(1, node.start_mark)

    def _count(self, nodes: int, mark: object) -> None:
        self._expanded += nodes
        if self._expanded > MAX_EXPANDED_NODES:
            message = (
                f"more than {MAX_EXPANDED_NODES:,} values with aliases expanded "
                "(an alias of an alias of ...: a 'billion laughs' document)"
            )
            raise _error(message, mark)


def _error(message: str, mark: object) -> ComposerError:
    """A composer error at `mark`, reported like the parser's own (`file:line: invalid
    YAML: message`)."""
    return ComposerError(None, None, message, mark if isinstance(mark, Mark) else None)
