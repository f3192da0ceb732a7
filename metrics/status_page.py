"""The admin listener's status page (`GET /`): one server-rendered HTML page, no external
asset and no script, that reloads itself every `REFRESH_S` seconds (a meta refresh).

It shows the upstreams with each endpoint's state (a `DOWN` badge, class `down`, for an
endpoint out of rotation), the route table in match order with each route's chain, and
request rates and error ratios computed by the parent from the workers' counters:

- `RequestRates` keeps the counters it saw at each view (at most `MAX_SAMPLES`, none
  older than `KEEP_S`). A rate is the difference between now and the newest earlier view
  at least `MIN_WINDOW_S` old, over the time between them; with no such view (the first
  one), it is the count since the parent started over that time. The page says which.
- A route's error ratio is its 5xx responses over all its responses in that window; an
  endpoint's is its attempts that were not answered with a status below 500 (a 5xx, or
  a failure: connect error, timeout, reset...) over all its attempts.

Everything from the config (route and upstream names, hosts, match values) is escaped;
the page's Content-Security-Policy allows no script at all and only its own inline
style, so even a name that escaped escaping could not run code.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html import escape
from typing import Any

from prometheus_client.metrics_core import Metric

REFRESH_S = 2  # the page reloads itself this often
MIN_WINDOW_S = 1.0  # a rate over less time than this is noise; an older view is used
KEEP_S = 300.0
MAX_SAMPLES = 64
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = [
    ("content-type", "text/html; charset=utf-8"),
    ("content-security-policy", CONTENT_SECURITY_POLICY),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-store"),
]

Key = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Counts:
    """Responses (or attempts) and errors of each route and each endpoint, at one time."""

    at: float
    routes: dict[str, tuple[float, float]] = field(default_factory=dict)
    endpoints: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Rate:
    """Per second, and the share that were errors (None: nothing to divide)."""

    per_second: float
    error_ratio: float | None
    total: float


@dataclass(frozen=True, slots=True)
class Rates:
    """The rates of one view, over `window_s` seconds: since the previous view kept
    (`since` "previous") or since the parent started ("start")."""

    since: str
    window_s: float
    routes: dict[str, Rate]
    endpoints: dict[tuple[str, str], Rate]


def counts_of(metrics: Iterable[Metric], at: float) -> Counts:
    """The request counters of the merged `metrics` (metrics/aggregate.py)."""
    counts = Counts(at)
    for metric in metrics:
        if metric.name not in ("gatehouse_requests", "gatehouse_upstream_requests"):
            continue
        for sample in metric.samples:
            if sample.name == "gatehouse_requests_total":
                error = sample.labels.get("code", "").startswith("5")
                _add(counts.routes, sample.labels.get("route", ""), sample.value, error)
            elif sample.name == "gatehouse_upstream_requests_total":
                code = sample.labels.get("code", "")
                error = not (code.isdigit() and int(code) < 500)
                key = (sample.labels.get("upstream", ""), sample.labels.get("endpoint", ""))
                _add(counts.endpoints, key, sample.value, error)
    return counts


def _add(table: dict[Any, tuple[float, float]], key: Any, value: float, error: bool) -> None:
    total, errors = table.get(key, (0.0, 0.0))
    table[key] = (total + value, errors + (value if error else 0.0))


class RequestRates:
    """The parent's memory of earlier views, to turn counters into rates (see the module
    docstring). `now` is a monotonic clock; `started` when counting began on it."""

    def __init__(self, started: float, now: Callable[[], float] = time.monotonic) -> None:
        self._started = started
        self._now = now
        self._samples: list[Counts] = []

    def __repr__(self) -> str:
        return f"<RequestRates samples={len(self._samples)}>"

    def observe(self, metrics: Iterable[Metric]) -> Rates:
        """The rates as of now, and remember this view's counts."""
        now = self._now()
        current = counts_of(metrics, now)
        earlier = [s for s in self._samples if now - s.at >= MIN_WINDOW_S]
        base = earlier[-1] if earlier else Counts(self._started)
        since = "previous" if earlier else "start"
        window = max(now - base.at, 1e-9)
        self._samples = [s for s in self._samples if now - s.at <= KEEP_S]
        self._samples.append(current)
        del self._samples[:-MAX_SAMPLES]
        return Rates(
            since,
            window,
            {
                key: _rate(value, base.routes.get(key), window)
                for key, value in current.routes.items()
            },
            {
                key: _rate(value, base.endpoints.get(key), window)
                for key, value in current.endpoints.items()
            },
        )


def _rate(now: tuple[float, float], before: tuple[float, float] | None, window: float) -> Rate:
    total, errors = now
    before_total, before_errors = before if before is not None else (0.0, 0.0)
    if total < before_total or errors < before_errors:
        before_total = before_errors = 0.0  # a series that restarted (a removed route back)
    delta, delta_errors = total - before_total, errors - before_errors
    return Rate(delta / window, delta_errors / delta if delta else None, total)


# -- the page --------------------------------------------------------------------------

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d2329;background:#fafbfc}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.6em 0 .4em}
.meta{color:#5a6570;margin:0}
table{border-collapse:collapse;width:100%;background:#fff;margin-bottom:.8em}
th,td{border:1px solid #d8dee4;padding:.3em .5em;text-align:left;vertical-align:top}
th{background:#eef1f4;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
code{font:12px ui-monospace,monospace;word-break:break-all}
.badge{display:inline-block;padding:.05em .5em;border-radius:.8em;font-weight:700;font-size:12px}
.badge.up{background:#d4f5dd;color:#11632a}.badge.down{background:#c62828;color:#fff}
.badge.ejected{background:#ef6c00;color:#fff}.badge.unknown{background:#e0e0e0;color:#333}
tr.down td{background:#fdecea}.bad{color:#c62828;font-weight:600}
caption{text-align:left;font-weight:600;padding:.3em 0}
"""


def render_page(status: dict[str, Any], rates: Rates, now: float) -> bytes:
    """The HTML of the status page. `status` holds the parent's views (`upstreams`,
    `routes`, `certificates`: proxy/process/admin_views.py) and `workers`, `generation`,
    `sha256`; `now` is the wall clock."""
    stamp = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    if rates.since == "previous":
        window = f"rates over the {rates.window_s:.1f} s since the previous view of this page"
    else:
        window = f"rates since the gateway started ({rates.window_s:.0f} s ago: first view)"
    sha256 = str(status.get("sha256", ""))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH_S}">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        # An empty icon of its own: no request for /favicon.ico, which would be a 404.
        '<link rel="icon" href="data:,">',
        "<title>Gatehouse status</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<header><h1>Gatehouse status</h1>",
        f'<p class="meta">at <time id="generated">{_e(stamp)}</time>; '
        f"{_e(status.get('workers', 0))} workers; config generation "
        f"{_e(status.get('generation', 0))} (<code>{_e(sha256[:12])}</code>); "
        f'refreshes every {REFRESH_S} s; <span id="window">{_e(window)}</span></p></header>',
        _upstreams(status.get("upstreams", []), rates),
        _routes(status.get("routes", []), rates),
        _certificates(status.get("certificates", [])),
        "</body></html>",
    ]
    return "\n".join(parts).encode()


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _per_second(rate: Rate | None) -> str:
    return "0" if rate is None else f"{rate.per_second:.2f}"


def _ratio(rate: Rate | None) -> str:
    if rate is None or rate.error_ratio is None:
        return "-"
    text = f"{rate.error_ratio * 100:.1f}%"
    return f'<span class="bad">{text}</span>' if rate.error_ratio > 0 else text


def _upstreams(upstreams: list[dict[str, Any]], rates: Rates) -> str:
    rows = ['<section id="upstreams"><h2>Upstreams</h2>']
    if not upstreams:
        rows.append("<p>No upstreams.</p>")
    for upstream in upstreams:
        name = upstream["name"]
        check = upstream.get("health_check")
        checked = (
            f"active checks: {_e(check['type'])} {_e(check['path'])} "
            f"every {_e(check['interval'])} s"
            if check
            else "no active checks"
        )
        panic = ' <span class="badge down">PANIC</span>' if upstream.get("panic") else ""
        rows += [
            f'<table class="upstream" data-upstream="{_e(name)}">',
            f'<caption>{_e(name)}{panic} <span class="meta">({_e(upstream["protocol"])}, '
            f"{_e(upstream['balance'])}; {checked})</span></caption>",
            "<tr><th>endpoint</th><th>state</th><th>in flight</th><th>open / idle / waiting</th>"
            "<th>attempts/s</th><th>errors</th><th>ejected until</th></tr>",
        ]
        for endpoint in upstream["endpoints"]:
            label = endpoint["endpoint"]
            status = endpoint["status"]
            badge = {"up": "UP", "down": "DOWN", "ejected": "EJECTED"}.get(status, "UNKNOWN")
            classes = "endpoint" if status == "up" else "endpoint down"
            pool = endpoint["pool"]
            until = endpoint.get("ejected_until")
            ejected = (
                datetime.fromtimestamp(until, UTC).strftime("%H:%M:%S UTC")
                + f" ({endpoint['ejected_workers']} of {endpoint['workers']} workers)"
                if until
                else "-"
            )
            rate = rates.endpoints.get((name, label))
            rows.append(
                f'<tr class="{classes}" data-endpoint="{_e(label)}" data-status="{_e(status)}">'
                f"<td><code>{_e(label)}</code></td>"
                f'<td><span class="badge {_e(status)}">{badge}</span></td>'
                f'<td class="num">{_e(endpoint["in_flight"])}</td>'
                f'<td class="num">{_e(pool["open"])} / {_e(pool["idle"])} / '
                f"{_e(pool['waiting'])}</td>"
                f'<td class="num">{_per_second(rate)}</td><td class="num">{_ratio(rate)}</td>'
                f"<td>{_e(ejected)}</td></tr>"
            )
        rows.append("</table>")
    rows.append("</section>")
    return "\n".join(rows)


def _routes(routes: list[dict[str, Any]], rates: Rates) -> str:
    rows = [
        '<section id="routes"><h2>Routes '
        '<span class="meta">(in the order they are tried)</span></h2>',
        "<table><tr><th>#</th><th>route</th><th>match</th><th>upstream</th><th>middleware</th>"
        "<th>requests/s</th><th>5xx</th><th>total</th></tr>",
    ]
    for route in routes:
        rate = rates.routes.get(route["name"])
        chain = ", ".join(f"{m['name']} ({m['type']})" for m in route["middleware"]) or "-"
        match = json.dumps(route["match"], separators=(", ", ": "), sort_keys=False)
        rows.append(
            f'<tr class="route" data-route="{_e(route["name"])}">'
            f'<td class="num">{_e(route["position"])}</td><td>{_e(route["name"])}</td>'
            f"<td><code>{_e(match)}</code></td><td>{_e(route['upstream'])}</td>"
            f'<td>{_e(chain)}</td><td class="num">{_per_second(rate)}</td>'
            f'<td class="num">{_ratio(rate)}</td>'
            f'<td class="num">{_e(int(rate.total) if rate else 0)}</td></tr>'
        )
    rows.append("</table></section>")
    return "\n".join(rows)


def _certificates(certificates: list[dict[str, Any]]) -> str:
    if not certificates:
        return ""
    rows = [
        '<section id="certificates"><h2>Certificates</h2>',
        "<table><tr><th>listener</th><th>names</th><th>issuer</th><th>expires</th></tr>",
    ]
    for cert in certificates:
        if "error" in cert:
            rows.append(
                f'<tr><td>{_e(cert["listener"])}</td><td colspan="3" class="bad">'
                f"{_e(cert['error'])}: <code>{_e(cert['file'])}</code></td></tr>"
            )
            continue
        days = cert["expires_in_seconds"] / 86400
        expiry = f"{cert['not_after']} ({days:.0f} days)"
        flag = ' class="bad"' if days < 14 else ""
        rows.append(
            f"<tr><td>{_e(cert['listener'])}</td><td>{_e(', '.join(cert['names']))}</td>"
            f"<td>{_e(cert['issuer'])}</td><td{flag}>{_e(expiry)}</td></tr>"
        )
    rows.append("</table></section>")
    return "\n".join(rows)
