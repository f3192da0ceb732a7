"""Metric values by name and labels, counted from when a test gateway started.

An in-process gateway counts into this process's registry, which outlives one test, so
counters and histograms are read as the change since the gateway started (a `Baseline`);
gauges are read as they are. Several gateways running at once in one process share the
registry, as the workers of one gateway do.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client.metrics_core import Metric

from metrics.aggregate import Snapshot, merge, snapshot
from metrics.definitions import REGISTRY
from metrics.gateway import GATEWAY_REGISTRY
from proxy.config.reader import did_you_mean

_CUMULATIVE = ("counter", "histogram", "summary")


def current() -> list[Metric]:
    """Every metric of this process: the gateway's own and the per-request ones."""
    return merge([snapshot(GATEWAY_REGISTRY), snapshot(REGISTRY)])


class Baseline:
    """The cumulative samples at one moment; `value` reads a sample's change since."""

    def __init__(self) -> None:
        self._before = _cumulative_values(snapshot(GATEWAY_REGISTRY) + snapshot(REGISTRY))

    def value(self, name: str, labels: Mapping[str, str]) -> float:
        """The sum of the samples named `name` (the full sample name, as /metrics shows
        it: `gatehouse_requests_total`, `..._seconds_count`) whose labels include
        `labels`; counters and histograms as the change since the baseline.

        Raises:
            LookupError: no family has a sample of that name, or one of `labels` is not
                one of its labels.
        """
        families = current()
        for family in families:
            names = {sample.name for sample in family.samples} | {_total_name(family)}
            if name not in names:
                continue
            label_names = {key for sample in family.samples for key in sample.labels}
            unknown = sorted(set(labels) - label_names)
            if unknown and family.samples:  # no sample yet: nothing to tell labels by
                raise LookupError(
                    f"{name} has no label {unknown[0]!r}; its labels: "
                    f"{', '.join(sorted(label_names)) or '(none)'}"
                )
            cumulative = family.type in _CUMULATIVE
            total = 0.0
            for sample in family.samples:
                if sample.name != name or not _has_labels(sample.labels, labels):
                    continue
                total += sample.value
                if cumulative:
                    total -= self._before.get(_key(sample.name, sample.labels), 0.0)
            return total
        known = sorted({sample.name for family in families for sample in family.samples})
        raise LookupError(f"no metric named {name!r}{did_you_mean(name, known)}")


def _total_name(family: Metric) -> str:
    # A counter with no sample yet is still known by its exposed name.
    return family.name + "_total" if family.type == "counter" else family.name


def _has_labels(sample: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    return all(sample.get(key) == str(value) for key, value in wanted.items())


def _key(name: str, labels: Mapping[str, str]) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


def _cumulative_values(
    families: Snapshot,
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        _key(name, labels): value
        for family in families
        if family["type"] in _CUMULATIVE
        for name, labels, value in family["samples"]
    }
