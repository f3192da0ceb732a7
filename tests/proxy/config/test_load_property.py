"""Config loading properties: values round-trip, a renamed key is always reported at its line
and path, and no input makes the loader raise anything but ConfigError."""

from __future__ import annotations

import copy
import ipaddress
import re
import string
from collections.abc import Iterator
from typing import Any

import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from yaml.nodes import MappingNode, Node, SequenceNode

from proxy.config.document import ConfigError
from proxy.config.load import parse_config
from proxy.config.values import (
    format_duration,
    format_size,
    parse_bind,
    parse_duration,
    parse_size,
    substitute_env,
)

SOURCE = "routes.yaml"

# Every feature, one key per line, so each key has its own line and column.
VALID = r"""
listeners:
  - bind: 0.0.0.0:8080
    name: public
admin:
  bind: 127.0.0.1:9901
http1_parser: auto
workers: 2
shutdown:
  grace_period: 30s
limits:
  max_head_bytes: 32KiB
  max_body_size: 10MiB
  header_timeout: 10s
  body_timeout: 60s
  keepalive_timeout: 75s
upstreams:
  users:
    endpoints:
      - http://127.0.0.1:8000
      - url: http://127.0.0.1:8001
        weight: 3
    balance: round_robin
    timeouts:
      connect: 2s
      read: 30s
    pool:
      max_connections: 256
      max_idle: 64
      idle_timeout: 4s
      wait_timeout: 5s
routes:
  - name: users-api
    match:
      host: api.example.com
      path_prefix: /users
      methods: [GET, POST]
      headers:
        X-Env: prod
        X-Ver:
          regex: "v[12]"
        X-Debug:
          present: true
      query:
        debug: "1"
    upstream: users
    rewrite:
      strip_prefix: /users
      add_prefix: /v1
      regex: "^/old/(.*)$"
      replacement: "/new/\\1"
      host: internal.example
    max_body_size: 1MiB
  - match:
      path_regex: "/orders/(?P<id>\\d+)"
    upstream: users
"""

# Every key of the schema, in any mapping: a renamed key must become none of these.
SCHEMA_KEYS = frozenset(
    {
        "listeners",
        "bind",
        "name",
        "admin",
        "upstreams",
        "routes",
        "limits",
        "http1_parser",
        "workers",
        "shutdown",
        "grace_period",
        "max_head_bytes",
        "max_body_size",
        "header_timeout",
        "body_timeout",
        "keepalive_timeout",
        "endpoints",
        "url",
        "weight",
        "balance",
        "timeouts",
        "connect",
        "read",
        "pool",
        "max_connections",
        "max_idle",
        "idle_timeout",
        "wait_timeout",
        "match",
        "host",
        "path",
        "path_prefix",
        "path_regex",
        "methods",
        "headers",
        "query",
        "upstream",
        "rewrite",
        "strip_prefix",
        "add_prefix",
        "regex",
        "replacement",
        "value",
        "present",
        # keys of sections VALID does not use: a key renamed to one of them is valid there
        "http2",
        "tls",
        "cert",
        "key",
        "min_version",
        "protocol",
        "ca",
        "verify",
        "sni",
        "max_concurrent_streams",
        "max_header_list_size",
        "initial_window_size",
        "max_resets_per_second",
        "max_control_frames_per_second",
        "websocket",
        "enabled",
        "max_duration",
        "middleware",
        "global_middleware",
        "type",
    }
)
KEY_ALPHABET = string.ascii_lowercase + "_"
ERROR_RE = re.compile(r"[^\n]+:\d+: [^\n]+")

DURATION_UNITS_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
SIZE_UNITS = {"B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KiB": 1024, "MiB": 1024**2}


def schema_key_positions(node: Node, path: str = "") -> Iterator[tuple[int, int, str, str]]:
    """(0-based line, column, key, parent path) of every schema key: not the user-chosen
    names under `upstreams`, `headers` and `query`."""
    if isinstance(node, MappingNode):
        named = path == "upstreams" or path.endswith((".headers", ".query"))
        for key, value in node.value:
            if not named:
                yield key.start_mark.line, key.start_mark.column, key.value, path
            yield from schema_key_positions(value, f"{path}.{key.value}" if path else key.value)
    elif isinstance(node, SequenceNode):
        for index, item in enumerate(node.value):
            yield from schema_key_positions(item, f"{path}[{index}]")


VALID_ROOT = yaml.compose(VALID, Loader=yaml.SafeLoader)
assert VALID_ROOT is not None
KEYS = list(schema_key_positions(VALID_ROOT))


def test_the_template_is_valid_and_covers_every_section() -> None:
    config = parse_config(VALID, SOURCE, env={})

    assert config.routes[0].rewrite.replacement == "/new/\\1"
    assert len(KEYS) > 40


@st.composite
def renamed_key(draw: st.DrawFn, key: str) -> str:
    """A typo of `key` (did-you-mean territory) or an unrelated name, never a schema key."""
    position = draw(st.integers(0, len(key) - 1))
    letter = draw(st.sampled_from(KEY_ALPHABET))
    name = draw(
        st.sampled_from(
            [
                key[:position] + key[position + 1 :],  # deletion
                key[:position] + letter + key[position:],  # insertion
                key[:position] + letter + key[position + 1 :],  # substitution
                key[:position]
                + key[position + 1 : position + 2]
                + key[position : position + 1]
                + key[position + 2 :],  # transposition
            ]
        )
        | st.text(KEY_ALPHABET, min_size=1, max_size=16)
    )
    assume(bool(name) and name not in SCHEMA_KEYS)
    return name


@st.composite
def config_with_a_renamed_key(draw: st.DrawFn) -> tuple[str, int, str, str]:
    """(text, 1-based line, key path, new key) of VALID with one schema key renamed."""
    line, column, key, parent = draw(st.sampled_from(KEYS))
    new = draw(renamed_key(key))
    lines = VALID.split("\n")
    assert lines[line][column : column + len(key)] == key
    lines[line] = lines[line][:column] + new + lines[line][column + len(key) :]
    return "\n".join(lines), line + 1, f"{parent}.{new}" if parent else new, new


@given(config_with_a_renamed_key())
def test_a_renamed_key_is_reported_with_its_line_and_path(case: tuple[str, int, str, str]) -> None:
    text, line, path, new = case

    errors = config_errors(text)

    assert errors is not None, f"renaming to {new!r} at line {line} was accepted"
    prefix = f"{SOURCE}:{line}: {path}: unknown key {new!r} ("
    assert any(error.startswith(prefix) for error in errors), errors
    lines = [int(error.split(":")[1]) for error in errors]
    assert lines == sorted(lines)


# --- no input crashes the loader ---

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["5s", "-1s", "16KiB", ":0", "[::1]:1", "http://x:1", "/a", "${X}", "*"])
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
VALID_DATA = yaml.safe_load(VALID)


def value_paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from value_paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from value_paths(item, (*path, index))


VALUE_PATHS = list(value_paths(VALID_DATA))[1:]


def config_errors(text: str) -> list[str] | None:
    """The loader's errors for `text`, or None if it is valid."""
    try:
        parse_config(text, SOURCE, env={})
    except ConfigError as exc:
        return exc.errors
    return None


def assert_only_config_errors(text: str) -> None:
    errors = config_errors(text)
    if errors is not None:
        assert errors
        for error in errors:
            assert ERROR_RE.fullmatch(error), error
            assert error.startswith(f"{SOURCE}:")


@settings(max_examples=300)
@given(st.sampled_from(VALUE_PATHS), values)
def test_any_value_anywhere_gives_a_config_or_config_errors(
    path: tuple[Any, ...], junk: Any
) -> None:
    data = copy.deepcopy(VALID_DATA)
    target = data
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = junk

    assert_only_config_errors(yaml.safe_dump(data, sort_keys=False))


@given(values)
def test_any_yaml_document_gives_a_config_or_config_errors(document: Any) -> None:
    assert_only_config_errors(yaml.safe_dump(document))


@given(st.text(max_size=200) | st.sampled_from(["${X}", "- ${X}", "'$${X}'", "${X:-1}"]))
def test_any_text_gives_a_config_or_config_errors(text: str) -> None:
    assert_only_config_errors(text)


# --- values round-trip ---


@given(st.integers(0, 10**12), st.sampled_from(sorted(DURATION_UNITS_S)))
def test_a_whole_number_of_any_duration_unit_parses_exactly(count: int, unit: str) -> None:
    expected = count / 1000 if unit == "ms" else float(count * DURATION_UNITS_S[unit])

    assert parse_duration(f"{count}{unit}") == expected


@given(st.floats(min_value=0, max_value=1e15, allow_nan=False, allow_infinity=False))
def test_format_duration_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.integers(0, 2**40), st.sampled_from(sorted(SIZE_UNITS)))
def test_a_whole_number_of_any_size_unit_parses_exactly(count: int, unit: str) -> None:
    assert parse_size(f"{count}{unit}") == count * SIZE_UNITS[unit]
    assert parse_size(f"{count}{unit.lower()}") == count * SIZE_UNITS[unit]


@given(st.integers(0, 2**62))
def test_format_size_round_trips(size: int) -> None:
    assert parse_size(format_size(size)) == size


@given(st.ip_addresses(), st.integers(0, 65535))
def test_bind_addresses_round_trip(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
) -> None:
    text = f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"

    assert parse_bind(text) == (str(address), port)


@given(st.text(alphabet="${}:-ab", max_size=30))
def test_escaping_dollar_brace_round_trips_any_text(text: str) -> None:
    escaped = text.replace("${", "$${")

    assert substitute_env(escaped, {}) == (text, [])


@given(
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True),
    st.text(max_size=20),
    st.text(alphabet=string.ascii_letters + "/:.", max_size=10),
)
def test_a_set_variable_is_inserted_verbatim(name: str, value: str, default: str) -> None:
    assert substitute_env(f"<${{{name}}}>", {name: value}) == (f"<{value}>", [])
    expected = value if value else default
    assert substitute_env(f"<${{{name}:-{default}}}>", {name: value}) == (f"<{expected}>", [])
