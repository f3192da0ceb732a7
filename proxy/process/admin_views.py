"""What the admin listener's live API shows, as JSON-able data built by the supervising
parent: `/routes`, `/middleware`, `/certificates` from the running config, and
`/upstreams` from the running config and what the workers last reported.

- Routes and middleware come from the `Config` the parent loaded and from the same
  redacted view of the file `/config` serves (proxy/config/view.py): a route's `match`
  and `rewrite`, and a middleware's options, are shown as `/config` shows them, so what
  `/config` hides (header values a middleware sends, the values a route matches headers
  and query parameters on, credentials, URL userinfo) stays hidden here too.
- Certificates (every one of each TLS listener) are read when the config is loaded
  (start, each successful reload), as `gatehouse_certificate_expiry_timestamp_seconds`
  is: what is shown is what the listeners serve, not a file renewed since.
- Upstreams combine each worker's metrics snapshot (pool gauges summed,
  `gatehouse_upstream_healthy` merged by min, as the metrics are) with the endpoint
  states the workers send beside it (`ServerGauges.endpoint_states`): the active check's
  verdict, an outlier ejection's end, requests in flight.

Nothing here runs per request: each view is built when asked.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client.metrics_core import Metric

from metrics.gateway import certificate_names, leaf_certificate
from proxy.config.model import Config, MiddlewareSpec, RouteConfig
from proxy.exchange.routing import RouteTable

EndpointStates = list[dict[str, Any]]  # one worker's `endpoints` (ServerGauges.endpoint_states)


def routes_view(config: Config, view: dict[str, Any]) -> list[dict[str, Any]]:
    """The route table in the order routes are tried (most specific first), each with
    its middleware chain (`global_middleware` first). `view` is `/config`'s redacted
    view of the same file, which `match` and `rewrite` are taken from."""
    document = view.get("config") or {}
    written = document.get("routes") or []
    routes = []
    for position, route in enumerate(RouteTable(config.routes).ordered(), 1):
        entry = written[route.index] if route.index < len(written) else {}
        entry = entry if isinstance(entry, dict) else {}
        routes.append(
            {
                "position": position,
                "name": route.name,
                "index": route.index,
                "match": entry.get("match", {}),
                "upstream": route.upstream or None,
                # A route that answers itself: its `redirect` or `respond`, as written.
                "redirect": entry.get("redirect"),
                "respond": entry.get("respond"),
                "rewrite": entry.get("rewrite"),
                "websocket": route.websocket.enabled,
                "middleware": [
                    {"name": spec.name, "type": spec.type}
                    for spec in (*config.global_middleware, *route.middleware)
                ],
            }
        )
    return routes


def middleware_view(config: Config, view: dict[str, Any]) -> list[dict[str, Any]]:
    """Every middleware instance: named ones (`middleware.NAME`) in the file's order,
    then inline ones in the order they are written; each with its type, where it is
    defined, the routes whose chain runs it (in the order routes are tried), and its
    options as `/config` shows them (redacted)."""
    document = view.get("config") or {}
    named_options = document.get("middleware") or {}
    instances: dict[int, dict[str, Any]] = {}
    order: list[int] = []

    def seen(spec: MiddlewareSpec, defined: str, options: object) -> dict[str, Any]:
        found = instances.get(id(spec))
        if found is None:
            found = instances[id(spec)] = {
                "name": spec.name,
                "type": spec.type,
                "defined": defined,
                "global": False,
                "routes": [],
                "options": _options(options),
            }
            order.append(id(spec))
        return found

    for name, spec in config.middleware.items():
        seen(spec, f"middleware.{name}", named_options.get(name))
    ordered = RouteTable(config.routes).ordered()
    written_global = document.get("global_middleware") or []
    for position, spec in enumerate(config.global_middleware):
        entry = seen(
            spec,
            f"global_middleware[{position}]",
            _written(written_global, position, named_options),
        )
        entry["global"] = True
        entry["routes"] = [route.name for route in ordered]
    written_routes = document.get("routes") or []
    for route in ordered:
        chain = _route_chain(written_routes, route)
        for position, spec in enumerate(route.middleware):
            entry = seen(
                spec,
                f"routes[{route.index}].middleware[{position}]",
                _written(chain, position, named_options),
            )
            if route.name not in entry["routes"]:
                entry["routes"].append(route.name)
    return [instances[key] for key in order]


def _route_chain(written: Sequence[Any], route: RouteConfig) -> list[Any]:
    entry = written[route.index] if route.index < len(written) else None
    chain = entry.get("middleware") if isinstance(entry, dict) else None
    return chain if isinstance(chain, list) else []


def _written(chain: Sequence[Any], position: int, named: dict[str, Any]) -> object:
    """A chain entry's options as the view shows them: a name's entry in `middleware`,
    or the inline mapping."""
    item = chain[position] if position < len(chain) else None
    if isinstance(item, str):
        return named.get(item)
    return item


def _options(written: object) -> dict[str, Any]:
    if not isinstance(written, dict):
        return {}
    return {key: value for key, value in written.items() if key != "type"}


def certificates_view(config: Config, acme: Sequence[tuple[str, str]] = ()) -> list[dict[str, Any]]:
    """Every certificate of each TLS listener (the leaf of its chain), in the order
    listed (`default`: the first, served without SNI or for an unknown name), then
    those ACME obtained for it (`acme`: (listener name, chain file), `"source": "acme"`):
    the names it is for, its subject and issuer, when it is valid; or why it cannot be
    read."""
    certificates = []
    for listener in config.listeners:
        if listener.tls is None:
            continue
        files = [
            (item.cert, position == 0) for position, item in enumerate(listener.tls.certificates)
        ]
        obtained = [path for owner, path in acme if owner == listener.name]
        for path, default in [*files, *((path, False) for path in obtained)]:
            entry: dict[str, Any] = {
                "listener": listener.name,
                "address": f"{listener.host}:{listener.port}",
                "file": path,
                "default": default,
            }
            if path in obtained:
                entry["source"] = "acme"
            leaf = leaf_certificate(path)
            if leaf is None:
                entry["error"] = "cannot read the certificate"
            else:
                names = certificate_names(leaf)
                entry.update(
                    {
                        "names": names.split(",") if names else [],
                        "subject": leaf.subject.rfc4514_string(),
                        "issuer": leaf.issuer.rfc4514_string(),
                        "serial": format(leaf.serial_number, "x"),
                        "not_before": leaf.not_valid_before_utc.isoformat(),
                        "not_after": leaf.not_valid_after_utc.isoformat(),
                        "expires_at": leaf.not_valid_after_utc.timestamp(),
                    }
                )
            certificates.append(entry)
    return certificates


def with_expiry(certificates: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
    """`certificates` with the seconds left until each expires, as of `now`."""
    return [
        {**entry, "expires_in_seconds": round(entry["expires_at"] - now)}
        if "expires_at" in entry
        else entry
        for entry in certificates
    ]


def upstreams_view(
    config: Config, metrics: Iterable[Metric], workers: Sequence[EndpointStates]
) -> list[dict[str, Any]]:
    """Each upstream of the running config, its settings, and each endpoint's state over
    all workers: `metrics` are the workers' merged families (metrics/aggregate.py),
    `workers` the endpoint states each worker reported with its snapshot."""
    gauges = _endpoint_gauges(metrics)
    reported: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for states in workers:
        for state in states:
            reported.setdefault((state["upstream"], state["endpoint"]), []).append(state)
    upstreams = []
    for name, upstream in config.upstreams.items():
        labels = [label for (owner, label) in reported if owner == name]
        # Endpoints as the workers report them (a DNS name's resolved addresses), else
        # as configured, before any worker has reported.
        labels += [
            label
            for owner, label in gauges
            if owner == name and label not in labels and (owner, label) not in reported
        ]
        if not labels:
            labels = [f"{e.host}:{e.port}" for e in upstream.endpoints]
        check = upstream.health_check
        endpoints = [
            _endpoint(label, gauges.get((name, label), {}), reported.get((name, label), []))
            for label in labels
        ]
        upstreams.append(
            {
                "name": name,
                "protocol": upstream.protocol,
                "balance": upstream.balance.policy,
                "health_check": (
                    None
                    if check is None
                    else {"type": check.type, "path": check.path, "interval": check.interval}
                ),
                "outlier_detection": upstream.outlier is not None,
                "panic": any(
                    s["panic"] for states in workers for s in states if s["upstream"] == name
                ),
                "endpoints": endpoints,
            }
        )
    return upstreams


_GAUGES = {
    "gatehouse_upstream_healthy": "in_rotation",
    "gatehouse_upstream_open_connections": "open",
    "gatehouse_upstream_idle_connections": "idle",
    "gatehouse_upstream_waiting_requests": "waiting",
}


def _endpoint_gauges(metrics: Iterable[Metric]) -> dict[tuple[str, str], dict[str, float]]:
    gauges: dict[tuple[str, str], dict[str, float]] = {}
    for metric in metrics:
        field = _GAUGES.get(metric.name)
        if field is None:
            continue
        for sample in metric.samples:
            key = (sample.labels.get("upstream", ""), sample.labels.get("endpoint", ""))
            gauges.setdefault(key, {})[field] = sample.value
    return gauges


def _endpoint(label: str, gauges: dict[str, float], states: list[dict[str, Any]]) -> dict[str, Any]:
    in_rotation = gauges.get("in_rotation")
    healthy = all(state["healthy"] for state in states) if states else None
    until = [state["ejected_until"] for state in states if state["ejected_until"] is not None]
    if in_rotation is None and healthy is None:
        status = "unknown"  # no worker has reported it yet
    elif in_rotation == 1.0 or (in_rotation is None and healthy and not until):
        status = "up"
    elif healthy is False or not until:
        status = "down"
    else:
        status = "ejected"
    return {
        "endpoint": label,
        "status": status,
        "in_rotation": None if in_rotation is None else in_rotation == 1.0,
        "healthy": healthy,
        "ejected_workers": len(until),
        "ejected_until": max(until) if until else None,
        "in_flight": sum(int(state["in_flight"]) for state in states),
        "pool": {field: int(gauges.get(field, 0.0)) for field in ("open", "idle", "waiting")},
        "workers": len(states),
    }


def status_view(
    config: Config,
    view: dict[str, Any],
    metrics: Sequence[Metric],
    workers: Sequence[EndpointStates],
    certificates: list[dict[str, Any]],
    generation: int,
) -> dict[str, Any]:
    """What the status page shows (metrics/status_page.py `render_page`): the upstreams,
    routes and certificates as their endpoints give them, and the config's identity."""
    return {
        "upstreams": upstreams_view(config, metrics, workers),
        "routes": routes_view(config, view),
        "certificates": certificates,
        "workers": len(workers),
        "generation": generation,
        "sha256": view.get("sha256", ""),
    }


def purge_reply(
    middleware: str, replies: Sequence[tuple[str, object]]
) -> tuple[int, dict[str, Any]]:
    """POST /cache/purge's answer from each worker's reply to `cache_purge` (named by
    who answered; an exception when it did not): the entries purged, summed per cache
    instance; 404 when no worker has a cache instance so named, 502 when a worker or a
    Redis failed (the others purged)."""
    purged: dict[str, int] = {}
    errors: list[str] = []
    for who, reply in replies:
        if not isinstance(reply, dict) or not reply.get("ok"):
            errors.append(f"{who}: {reply}")
            continue
        for name, count in reply.get("purged", {}).items():
            if isinstance(count, int):
                purged[name] = purged.get(name, 0) + count
            else:
                purged.setdefault(name, 0)
                errors.append(f"{who}: {name}: {count}")
    if not purged and not errors:
        which = f"named {middleware!r}" if middleware else "in the running config"
        return 404, {"ok": False, "error": "no_cache", "message": f"no cache middleware {which}"}
    return (502 if errors else 200), {"ok": not errors, "purged": purged, "errors": errors}
