"""docs/operations.md's metrics table against the code: every metric the gateway defines
(the workers' registry, the live gauges, the parent's own) is in the table with the
labels it has, and the table names nothing else."""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

import metrics.definitions
import metrics.gateway
import metrics.live
import metrics.traffic
from metrics.local import LocalCounter, LocalHistogram

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
_NAME = re.compile(r"`(gatehouse_[a-z0-9_]+)`")


def documented() -> dict[str, tuple[str, ...]]:
    """The metrics table of operations.md: exposed name -> its labels, sorted."""
    text = OPERATIONS.read_text()
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    table: dict[str, tuple[str, ...]] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("| `gatehouse_") or len(cells) < 3:
            continue
        labels = tuple(sorted(label.strip() for label in cells[1].split(",") if label.strip()))
        for name in _NAME.findall(cells[0]):
            assert name not in table, f"{name} is in the table twice"
            table[name] = labels
    return table


def _exposed(name: str, kind: str) -> str:
    # Counters are exposed (and documented) with their `_total`.
    return f"{name}_total" if kind == "counter" else name


def defined() -> dict[str, tuple[str, ...]]:
    """Every metric the code declares, by exposed name, with its labels sorted."""
    found: dict[str, tuple[str, ...]] = {}
    modules: tuple[ModuleType, ...] = (metrics.definitions, metrics.traffic, metrics.gateway)
    for module in modules:
        for item in vars(module).values():
            if isinstance(item, MetricWrapperBase):
                # prometheus-client keeps the declared name and labels on the wrapper.
                found[_exposed(item._name, str(item._type))] = tuple(sorted(item._labelnames))
            elif isinstance(item, LocalCounter):
                found[_exposed(item.name, "counter")] = tuple(sorted(item.labelnames))
            elif isinstance(item, LocalHistogram):
                found[item.name] = tuple(sorted(item.labelnames))
    for family in metrics.live._families():
        found[family.name] = tuple(sorted(family._labelnames))
    return found


def registered(registry: CollectorRegistry) -> set[str]:
    """The exposed names of a registry's families, as a scrape would list them."""
    return {_exposed(family.name, family.type) for family in registry.collect()}


def test_every_metric_registered_is_declared_where_the_table_test_looks() -> None:
    declared = set(defined())
    names = registered(metrics.definitions.REGISTRY) | registered(metrics.gateway.GATEWAY_REGISTRY)
    assert names - declared == set()


def test_the_operations_table_lists_every_metric_with_its_labels() -> None:
    table, code = documented(), defined()

    assert sorted(set(code) - set(table)) == [], "defined but not in docs/operations.md"
    assert sorted(set(table) - set(code)) == [], "in docs/operations.md but not defined"
    wrong = {name: (table[name], code[name]) for name in code if table[name] != code[name]}
    assert wrong == {}, "(documented labels, defined labels)"
