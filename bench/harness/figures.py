"""Rounds, medians and same-round ratios.

On a small machine shared by the load generator, the origin and the proxy, a target's
throughput moves from one minute to the next for reasons of its own. Two targets measured
one after the other within the same round saw nearly the same machine, so their ratio in
that round is steadier than either figure; the driver reports the median of those
per-round ratios, not the ratio of the medians.
"""

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from harness.load import Sample


@dataclass(slots=True)
class Round:
    """One measured run of one target in one round, or why there is none."""

    index: int
    sample: Sample | None = None
    error: str | None = None
    cpu10k: float | None = None  # CPU-seconds of the target's processes per 10k requests
    origin_cpu10k: float | None = None  # the same for the origin
    idle_pct: float | None = None  # the whole machine's idle time during the run

    def value(self, key: str) -> float | None:
        """A figure of this round by name (`rps`, `cpu10k`, a Sample field); None if absent."""
        if key == "cpu10k":
            return self.cpu10k
        if key == "origin_cpu10k":
            return self.origin_cpu10k
        if key == "idle_pct":
            return self.idle_pct
        if self.sample is None:
            return None
        if key == "rps":
            return self.sample.rps
        figure = getattr(self.sample, key)
        return None if figure is None else float(figure)

    def to_json(self) -> dict[str, object]:
        record: dict[str, object] = {"round": self.index}
        if self.error is not None:
            record["error"] = self.error
        if self.sample is not None:
            record.update(asdict(self.sample), rps=self.sample.rps)
            record.update(
                cpu10k=self.cpu10k, origin_cpu10k=self.origin_cpu10k, idle_pct=self.idle_pct
            )
        return record


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values that are there; None if none is."""
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def paired_values(target: Sequence[Round], base: Sequence[Round], key: str) -> list[float]:
    """target/base for key in every round where both have a non-zero figure."""
    base_by_round = {one.index: one for one in base}
    ratios = []
    for one in target:
        other = base_by_round.get(one.index)
        if other is None:
            continue
        top, bottom = one.value(key), other.value(key)
        if top is not None and bottom:
            ratios.append(top / bottom)
    return ratios


def paired_ratio(target: Sequence[Round], base: Sequence[Round], key: str) -> float | None:
    """The median over rounds of target/base for key, each taken within one round."""
    return median(paired_values(target, base, key))


@dataclass(frozen=True, slots=True)
class Summary:
    """A target's rounds in one phase, reduced to medians (and totals of failures)."""

    rounds: int
    failed: int
    rps: float
    spread_pct: float  # (max - min) / median of the rounds' req/s
    errors: int
    non2xx: int
    p50_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    max_ms: float | None
    mbps: float | None
    cpu10k: float | None
    origin_cpu10k: float | None
    idle_pct: float | None


def summarize(rounds: Sequence[Round]) -> Summary | None:
    """None when no round has a measurement."""
    measured = [one for one in rounds if one.sample is not None]
    if not measured:
        return None
    rates = [one.sample.rps for one in measured if one.sample is not None]
    middle = statistics.median(rates)

    def med(key: str) -> float | None:
        return median(one.value(key) for one in measured)

    return Summary(
        rounds=len(measured),
        failed=len(rounds) - len(measured),
        rps=middle,
        spread_pct=(max(rates) - min(rates)) / middle * 100 if middle else 0.0,
        errors=sum(one.sample.errors for one in measured if one.sample is not None),
        non2xx=sum(one.sample.non2xx for one in measured if one.sample is not None),
        p50_ms=med("p50_ms"),
        p99_ms=med("p99_ms"),
        mean_ms=med("mean_ms"),
        max_ms=med("max_ms"),
        mbps=med("mbps"),
        cpu10k=med("cpu10k"),
        origin_cpu10k=med("origin_cpu10k"),
        idle_pct=med("idle_pct"),
    )
