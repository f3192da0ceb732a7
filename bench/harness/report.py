"""What a run prints, and the JSON file it can write.

Per phase (protocol and path): one table of medians over the rounds, then the same-round
ratios of each proxy under test to each anchor, then any `--pair` asked for. The very last
line of the whole output is the summary figure bench/run promises:
`ratio_vs_nginx=R` (the first proxy under test over nginx, HTTP/1.1, first path; over
nginx-gzip, then direct, when the run has no nginx anchor).
"""

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

from harness.figures import Round, paired_ratio, paired_values, summarize

Results = Mapping[str, Mapping[str, Sequence[Round]]]  # phase -> target -> rounds
PROTOCOL_TITLES = {"h1": "HTTP/1.1", "h2c": "h2c (HTTP/2, prior knowledge)"}


def number(value: float | None, decimals: int = 2) -> str:
    if value is None:
        return "-"
    if value != value:  # NaN
        return "nan"
    return f"{value:.{decimals}f}"


def phase_key(protocol: str, path: str) -> str:
    return f"{protocol} {path}"


def table(protocol: str, results: Mapping[str, Sequence[Round]]) -> list[str]:
    """The medians of each target, one aligned row each."""
    latency = ("p50 ms", "p99 ms") if protocol == "h1" else ("mean ms", "max ms")
    rows = [
        (
            "target",
            "req/s",
            "spread",
            *latency,
            "CPU-s/10k",
            "origin CPU-s/10k",
            "MB/s",
            "idle%",
            "errors/non-2xx",
        )
    ]
    for name, rounds in results.items():
        summary = summarize(rounds)
        if summary is None:
            reason = next((one.error for one in rounds if one.error), "no measurement")
            rows.append((name, "FAILED", reason or "", "", "", "", "", "", "", ""))
            continue
        first, second = (
            (summary.p50_ms, summary.p99_ms)
            if protocol == "h1"
            else (summary.mean_ms, summary.max_ms)
        )
        failed = f" ({summary.failed} rounds failed)" if summary.failed else ""
        rows.append(
            (
                name,
                f"{summary.rps:,.0f}",
                f"{summary.spread_pct:.0f}%",
                number(first),
                number(second),
                number(summary.cpu10k, 3),
                number(summary.origin_cpu10k, 3),
                number(summary.mbps, 1),
                number(summary.idle_pct, 0),
                f"{summary.errors}/{summary.non2xx}{failed}",
            )
        )
    failed_rows = {row[0] for row in rows if row[1] == "FAILED"}
    widths = [
        max(len(row[column]) for row in rows if column < 2 or row[0] not in failed_rows)
        for column in range(len(rows[0]))
    ]
    lines = []
    for row in rows:
        if row[0] in failed_rows:
            lines.append(f"  {row[0].ljust(widths[0])}  FAILED: {row[2]}")
            continue
        cells = [row[0].ljust(widths[0])] + [
            cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


def anchor_ratios(
    results: Mapping[str, Sequence[Round]], proxies: Sequence[str], anchors: Sequence[str]
) -> list[str]:
    """Each proxy under test against each anchor measured in this phase."""
    lines = []
    for proxy in proxies:
        for anchor in anchors:
            if proxy not in results or anchor not in results:
                continue
            rate = paired_ratio(results[proxy], results[anchor], "rps")
            cpu = paired_ratio(results[proxy], results[anchor], "cpu10k")
            if rate is None:
                lines.append(f"    {proxy} / {anchor}: no round measured both")
                continue
            line = f"    {proxy} / {anchor}: req/s {rate:.3f}"
            if cpu is not None:
                line += f", CPU per request {number(cpu, 2)}x"
            lines.append(line)
    return ["  same-round ratios (median over rounds):", *lines] if lines else []


def pair_lines(
    results: Mapping[str, Sequence[Round]], pairs: Sequence[tuple[str, str]]
) -> list[str]:
    """The `--pair TARGET/BASE` comparisons: req/s and CPU per request, with every round."""
    lines = []
    for target, base in pairs:
        if target not in results or base not in results:
            continue
        rates = paired_values(results[target], results[base], "rps")
        cpu = paired_ratio(results[target], results[base], "cpu10k")
        if not rates:
            lines.append(f"    {target} / {base}: no round measured both")
            continue
        rate = paired_ratio(results[target], results[base], "rps") or 0.0
        line = f"    {target} / {base}: req/s {rate:.3f} (difference {rate - 1:+.1%})"
        if cpu is not None:
            line += f", CPU per request {cpu:.3f}x"
        lines.append(line + "; rounds " + ", ".join(f"{value:.3f}" for value in rates))
    return ["  pairs (median of same-round ratios):", *lines] if lines else []


def summary_line(results: Results, first_phase: str, proxies: Sequence[str]) -> str:
    """`ratio_vs_nginx=R` for the first proxy on the first HTTP/1.1 phase (see module doc)."""
    phase = results.get(first_phase, {})
    if proxies and proxies[0] in phase:
        for anchor in ("nginx", "nginx-gzip", "direct"):
            if anchor in phase:
                ratio = paired_ratio(phase[proxies[0]], phase[anchor], "rps")
                return f"ratio_vs_{anchor}={number(ratio, 3) if ratio is not None else 'nan'}"
    return "ratio_vs_nginx=nan"


def write_json(path: Path, settings: Mapping[str, object], results: Results) -> None:
    """Every round of every target, with the settings and the per-target medians."""
    document = {
        **settings,
        "runs": {
            phase: {name: [one.to_json() for one in rounds] for name, rounds in targets.items()}
            for phase, targets in results.items()
        },
        "summary": {
            phase: {
                name: (asdict(summary) if (summary := summarize(rounds)) else None)
                for name, rounds in targets.items()
            }
            for phase, targets in results.items()
        },
    }
    path.write_text(json.dumps(document, indent=1) + "\n")
