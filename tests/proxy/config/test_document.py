"""proxy.config.document: the file before its schema. A file that cannot be read, is too
big, is not UTF-8, nests too deeply or expands too far through aliases is a ConfigError
naming `file:line`, never a RecursionError or a long wait; `!public` is read."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from proxy.config.document import (
    MAX_CONFIG_BYTES,
    MAX_EXPANDED_NODES,
    MAX_NESTING_DEPTH,
    ConfigError,
    compose_document,
)
from proxy.config.load import load_config, parse_config

SOURCE = "routes.yaml"
VALID = """\
listeners: [{bind: ":0"}]
upstreams:
  app: {endpoints: [http://127.0.0.1:8000]}
routes:
  - {name: r, match: {path_prefix: /}, upstream: app}
"""


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, SOURCE, env={})
    return info.value.errors


def nested(depth: int, flow: bool) -> str:
    """`x:` holding `depth` lists inside each other (the mapping itself is one level)."""
    if flow:
        return "x: " + "[" * (depth - 1) + "1" + "]" * (depth - 1) + "\n"
    lines = ["x:"] + [" " * (2 * level) + "-" for level in range(1, depth - 1)]
    return "\n".join(lines) + "\n" + " " * (2 * (depth - 1)) + "- 1\n"


# --- size and encoding -------------------------------------------------------------------


def test_a_text_over_the_size_limit_is_refused_at_line_1() -> None:
    text = VALID + "#" * (MAX_CONFIG_BYTES - len(VALID)) + "\n"

    assert errors_of(text) == [f"{SOURCE}:1: larger than 1 MiB, the limit for a config file"]


def test_the_limit_counts_bytes_not_characters() -> None:
    padding = "é" * ((MAX_CONFIG_BYTES - len(VALID)) // 2 + 1)  # two bytes each in UTF-8
    assert len(VALID) + len(padding) + 2 < MAX_CONFIG_BYTES

    assert errors_of(VALID + f"# {padding}\n")[0].endswith("the limit for a config file")


def test_a_file_at_the_size_limit_is_read(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(VALID + "#" * (MAX_CONFIG_BYTES - len(VALID) - 1) + "\n")
    assert path.stat().st_size == MAX_CONFIG_BYTES

    assert load_config(str(path), env={}).routes[0].name == "r"


def test_a_file_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(VALID + "#" * MAX_CONFIG_BYTES + "\n")

    with pytest.raises(ConfigError) as info:
        load_config(str(path), env={})
    assert info.value.errors == [f"{path}:1: larger than 1 MiB, the limit for a config file"]


def test_an_endless_file_is_read_only_up_to_the_limit() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("/dev/zero", env={})
    assert info.value.errors == ["/dev/zero:1: larger than 1 MiB, the limit for a config file"]


def test_a_directory_is_refused_at_line_1(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path), env={})
    assert info.value.errors == [f"{tmp_path}:1: cannot read: Is a directory"]


# --- nesting ------------------------------------------------------------------------------


@pytest.mark.parametrize("flow", [True, False], ids=["flow", "block"])
def test_nesting_up_to_the_limit_is_composed(flow: bool) -> None:
    document = compose_document(nested(MAX_NESTING_DEPTH, flow), SOURCE)

    assert document.root is not None


@pytest.mark.parametrize("flow", [True, False], ids=["flow", "block"])
def test_nesting_past_the_limit_is_refused_at_its_line(flow: bool) -> None:
    text = nested(MAX_NESTING_DEPTH + 1, flow)
    line = 1 if flow else MAX_NESTING_DEPTH + 1  # where the 65th level begins

    assert errors_of(text) == [
        f"{SOURCE}:{line}: invalid YAML: nested deeper than 64 levels of lists and mappings"
    ]


def test_nesting_far_past_the_recursion_limit_is_a_config_error() -> None:
    depth = 20 * sys.getrecursionlimit()

    assert errors_of(nested(depth, flow=True)) == [
        f"{SOURCE}:1: invalid YAML: nested deeper than 64 levels of lists and mappings"
    ]
    assert errors_of("x: " + "{a: " * depth)[0].startswith(f"{SOURCE}:1: invalid YAML: nested")


def test_aliases_count_at_the_depth_they_are_used() -> None:
    # Each line nests the one before once more: 80 levels from 80 short lines.
    lines = ["l0: &l0 [1]"] + [f"l{i}: &l{i} [*l{i - 1}]" for i in range(1, 80)]

    assert errors_of("\n".join(lines) + "\n") == [
        f"{SOURCE}:64: invalid YAML: alias *l62 nests deeper than 64 levels of lists and "
        "mappings where it is used"
    ]


# --- aliases ------------------------------------------------------------------------------


def billion_laughs(levels: int, fan_out: int) -> str:
    lines = [f"l0: &l0 [{', '.join(['lol'] * fan_out)}]"]
    for level in range(1, levels):
        lines.append(f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * fan_out)}]")
    return "\n".join(lines) + "\n"


def test_a_billion_laughs_is_refused_where_it_passes_the_limit() -> None:
    start = time.process_time()

    errors = errors_of(billion_laughs(levels=9, fan_out=9))

    # 9^7 values stand for more than the limit: the 7th line is where it is crossed.
    assert 9**6 < MAX_EXPANDED_NODES < 9**7
    assert errors == [
        f"{SOURCE}:7: invalid YAML: more than 1,000,000 values with aliases expanded "
        "(an alias of an alias of ...: a 'billion laughs' document)"
    ]
    # Refused from what the file says, not by expanding it (a CPU bound, not a clock one).
    assert time.process_time() - start < 1.0


def test_aliases_within_the_limit_are_shared_not_refused() -> None:
    text = VALID + "x-shared: &s {a: 1}\n"  # an unknown key, but a valid document
    document = compose_document(billion_laughs(levels=6, fan_out=9), SOURCE)  # 9^6 < limit

    assert document.root is not None
    assert errors_of(text) == [
        f"{SOURCE}:6: x-shared: unknown key 'x-shared' (expected one of: listeners, admin, "
        "upstreams, middleware, global_middleware, routes, limits, http2, http1_parser, "
        "workers, shutdown, reload, metrics, path_normalization, headers_with_underscores, "
        "client_ip, logging, tracing)"
    ]


@pytest.mark.parametrize(
    "text",
    ["a: &a [*a]\n", "a: &a {b: *a}\n", "a: &a {<<: *a}\n", "a: &a [1, [2, *a]]\n"],
)
def test_an_alias_inside_its_own_anchor_is_refused(text: str) -> None:
    assert errors_of(text) == [
        f"{SOURCE}:1: invalid YAML: alias *a is inside the node it refers to (a cycle)"
    ]


def test_an_unknown_alias_is_still_the_parsers_error() -> None:
    assert errors_of("a: *nope\n") == [f"{SOURCE}:1: invalid YAML: found undefined alias 'nope'"]


# --- !public ------------------------------------------------------------------------------


def test_public_is_a_string_and_its_offset_is_recorded() -> None:
    text = 'a: !public secret\nb: plain\n!public c: !public "5"\n'

    document = compose_document(text, SOURCE)

    # Offsets of the tags (where the nodes start): the view finds the nodes by them.
    assert document.public == {
        text.index("!public secret"),
        text.index("!public c"),
        text.index('!public "5"'),
    }


def test_public_on_a_list_or_mapping_is_refused() -> None:
    assert errors_of(VALID + "x: !public [a]\n") == [
        f"{SOURCE}:6: invalid YAML: !public marks a string, not a list or mapping"
    ]
    assert errors_of(VALID + "x: !public {a: 1}\n")[0].endswith("not a list or mapping")


def test_a_public_number_is_a_string_where_a_number_is_expected() -> None:
    assert errors_of(VALID + "workers: !public 2\n") == [
        f"{SOURCE}:6: workers: expected an integer, got a string ('2')"
    ]
