"""A route's chain: `global_middleware`, then the route's own list, then forwarding, composed
once when the config is loaded into a single handler.

Each link times its middleware *alone*: the link after it records how long the rest of
the chain took (`Request.chain_inner_s`), and the difference goes to
`gatehouse_middleware_duration_seconds{middleware}`. The last link times the forwarding
itself, which is the request's `upstream_s`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from time import perf_counter
from typing import Any, Protocol

from metrics.definitions import MIDDLEWARE_SECONDS
from proxy import Handler, Request, Response

log = logging.getLogger(__name__)


class MiddlewareSpec(Protocol):
    """What the chain needs of a middleware instance as the config names it (it is
    proxy/config/model.py's MiddlewareSpec, which this package does not import: it uses
    only the plugin surface)."""

    @property
    def name(self) -> str: ...  # the metrics label and log name

    @property
    def instance(self) -> Any: ...  # the middleware

    @property
    def line(self) -> int: ...  # where it is written


def build_chain(
    specs: Sequence[MiddlewareSpec], endpoint: Handler, *, timed: bool = False
) -> Handler:
    """The handler that runs `specs` in order, then `endpoint` (the forwarder); just
    `endpoint` when there is no middleware (which keeps the synchronous fast path),
    unless `timed` asks for the forwarding to be timed even then (the rest of a phased
    chain after a link: proxy/exchange/phased.py)."""
    if not specs and not timed:
        return endpoint
    handler = _timed_endpoint(endpoint)
    for spec in reversed(specs):
        handler = _link(spec, handler)
    return handler


def _link(spec: MiddlewareSpec, call_next: Handler) -> Handler:
    middleware = spec.instance
    observe = MIDDLEWARE_SECONDS.labels(spec.name).observe

    async def run(request: Request) -> Response:
        start = perf_counter()
        request.exchange.chain_inner_s = 0.0
        try:
            response: Response = await middleware(request, call_next)
            return response
        finally:
            total = perf_counter() - start
            observe(total - request.exchange.chain_inner_s)
            request.exchange.chain_inner_s = total

    return run


def _timed_endpoint(endpoint: Handler) -> Handler:
    async def forward(request: Request) -> Response:
        start = perf_counter()
        try:
            return await endpoint(request)
        finally:
            request.exchange.upstream_s = request.exchange.chain_inner_s = perf_counter() - start

    return forward


class MiddlewareStartFailed(Exception):
    """A middleware's `start()` hook raised; `spec` is the instance (its name and the
    line it is written on), the exception it raised is the cause."""

    def __init__(self, spec: MiddlewareSpec, cause: Exception) -> None:
        self.spec = spec
        self.cause = cause
        super().__init__(f"middleware {spec.name!r} cannot start: {type(cause).__name__}: {cause}")


async def start_all(specs: Iterable[MiddlewareSpec]) -> None:
    """Await each instance's `start()` hook once (instances shared by chains are one).

    Raises:
        MiddlewareStartFailed: a hook raised; the instances after it are not started.
    """
    for spec in _unique(specs):
        start = getattr(spec.instance, "start", None)
        if start is not None:
            try:
                await start()
            except Exception as exc:
                raise MiddlewareStartFailed(spec, exc) from exc


async def close_all(specs: Iterable[MiddlewareSpec]) -> None:
    """Await each instance's `close()` hook; one failing does not stop the others."""
    for spec in _unique(specs):
        close = getattr(spec.instance, "close", None)
        if close is None:
            continue
        try:
            await close()
        except Exception:
            log.exception("middleware %r failed to close", spec.name)


def _unique(specs: Iterable[MiddlewareSpec]) -> list[MiddlewareSpec]:
    seen: set[int] = set()
    unique: list[MiddlewareSpec] = []
    for spec in specs:
        if id(spec.instance) not in seen:
            seen.add(id(spec.instance))
            unique.append(spec)
    return unique
