"""Hostile routes.yaml documents: nesting past any recursion limit, aliases that stand for
exponentially many values ("billion laughs"), alias chains, cycles, long keys, and random
edits of a valid file. Whatever the text, the loader returns a Config or raises
ConfigError whose every line is `file:line: ...`, and spends little CPU doing so: a
limit that expanded the document before refusing it would be caught here.

The bound is on this process's CPU time (not the wall clock, which a busy CI machine
stretches) and is far above what these documents cost (milliseconds), far below what
expanding one of them would.
"""

from __future__ import annotations

import re
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config.document import ConfigError
from proxy.config.load import parse_config
from tests.proxy.config.test_load_property import VALID

SOURCE = "routes.yaml"
ERROR_RE = re.compile(r"routes\.yaml:[1-9][0-9]*: [^\n]+")
CPU_BUDGET_S = 2.0
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Where a hostile value is put: the top level, and places the schema reads into.
PLACES = [
    "x: {}\n",
    "limits: {{<<: {}}}\n",
    "routes: {}\n",
    "upstreams: {{u: {{endpoints: {}}}}}\n",
    "middleware: {{m: {{type: headers, request: {{set: {}}}}}}}\n",
    "listeners: [{{bind: {}}}]\n",
]


def config_errors(text: str) -> list[str] | None:
    """The loader's errors for `text` (None when it loads)."""
    try:
        parse_config(text, SOURCE, env={})
    except ConfigError as exc:
        return exc.errors
    return None


def assert_refused_or_loaded_cheaply(text: str) -> None:
    start = time.process_time()
    errors = config_errors(text)
    spent = time.process_time() - start
    if errors is not None:
        assert errors
        for error in errors:
            assert ERROR_RE.fullmatch(error), error
    assert spent < CPU_BUDGET_S, f"{spent:.2f}s of CPU for {len(text)} characters"


@SETTINGS
@given(
    st.lists(st.sampled_from(["[", "{a: ", "[1, ", "{? ", "- "]), min_size=1, max_size=5000),
    st.booleans(),
    st.sampled_from(PLACES),
)
def test_deep_flow_nesting_is_a_config_error(opening: list[str], close: bool, place: str) -> None:
    closers = {"[": "]", "{a: ": "}", "[1, ": "]", "{? ": "}", "- ": ""}
    value = (
        "".join(opening) + "1" + ("".join(closers[o] for o in reversed(opening)) if close else "")
    )
    assert_refused_or_loaded_cheaply(place.format(value.replace("- ", "[")))


@SETTINGS
@given(st.integers(1, 600), st.sampled_from(["- ", "k: ", "- k: "]))
def test_deep_block_nesting_is_a_config_error(depth: int, step: str) -> None:
    lines = [" " * (2 * level) + step.rstrip() for level in range(depth)]
    assert_refused_or_loaded_cheaply("x:\n" + "\n".join("  " + line for line in lines) + " 1\n")


@SETTINGS
@given(
    st.integers(1, 14),
    st.integers(1, 14),
    st.sampled_from(["list", "mapping", "merge"]),
    st.sampled_from(PLACES),
)
def test_aliases_of_aliases_are_refused_without_being_expanded(
    levels: int, fan_out: int, shape: str, place: str
) -> None:
    lines = [f"l0: &l0 {{{', '.join(f'k{index}: lol' for index in range(fan_out))}}}"]
    for level in range(1, levels):
        alias = f"*l{level - 1}"
        if shape == "list":
            value = f"[{', '.join([alias] * fan_out)}]"
        elif shape == "mapping":
            value = "{" + ", ".join(f"k{index}: {alias}" for index in range(fan_out)) + "}"
        else:  # `<<` merges: the loader reads each merged mapping's entries again
            value = f"{{<<: [{', '.join([alias] * fan_out)}], own{level}: 1}}"
        lines.append(f"l{level}: &l{level} {value}")
    text = "\n".join(lines) + "\n" + place.format(f"*l{levels - 1}")
    assert_refused_or_loaded_cheaply(text)


@SETTINGS
@given(st.integers(6, 14), st.integers(6, 14))
def test_merges_of_merges_are_refused_without_being_expanded(levels: int, fan_out: int) -> None:
    # The loader reads the entries of each mapping a `<<` merges, so here the aliases'
    # expansion is work it would do: 6^6 merged entries and up.
    lines = [f"l0: &l0 {{{', '.join(f'k{index}: 1' for index in range(fan_out))}}}"]
    for level in range(1, levels):
        aliases = ", ".join([f"*l{level - 1}"] * fan_out)
        lines.append(f"l{level}: &l{level} {{<<: [{aliases}], own{level}: 1}}")
    text = "\n".join(lines) + "\n" + f"limits: {{<<: *l{levels - 1}}}\n"
    assert_refused_or_loaded_cheaply(text)


@SETTINGS
@given(st.integers(1, 2000), st.sampled_from(PLACES))
def test_alias_chains_are_refused_at_the_depth_limit(length: int, place: str) -> None:
    lines = ["c0: &c0 [1]"] + [f"c{i}: &c{i} [*c{i - 1}, *c{i - 1}]" for i in range(1, length)]
    assert_refused_or_loaded_cheaply("\n".join(lines) + "\n" + place.format(f"*c{length - 1}"))


@SETTINGS
@given(st.integers(1, 200_000), st.sampled_from(PLACES), st.sampled_from(["plain", "explicit"]))
def test_long_keys_are_reported_briefly(length: int, place: str, form: str) -> None:
    key = "k" * length
    entry = f"{{{key}: 1}}" if form == "plain" else "{? " + key + " : {a: 1, b: [2, 3]}}"
    assert_refused_or_loaded_cheaply(place.format(entry))


@SETTINGS
@given(st.data())
def test_random_edits_of_a_valid_file_give_a_config_or_config_errors(data: st.DataObject) -> None:
    text = VALID
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(text)))
        insert = data.draw(
            st.sampled_from(["&a ", "*a", "!public ", "[", "{", "<<: *a\n", "\t", "'", "\x00"])
            | st.text(max_size=6)
        )
        cut = data.draw(st.integers(0, 4))
        text = text[:position] + insert + text[position + cut :]
    assert_refused_or_loaded_cheaply(text)
