"""Test mode: every answer says which route, middleware and upstream handled it.

A gateway started by the test kit wraps its Runtime's entry points (`Server(config,
entry_points=tracer)`). Each exchange gets an id; the request sent upstream carries it in
`x-gatehouse-exchange` (the kit's upstreams record it and take it off again, so tests
see the request as the gateway forwarded it), and the answer to the client carries it
with the route and the middleware chain:

    x-gatehouse-exchange: 7
    x-gatehouse-route: users            (empty when no route matched)
    x-gatehouse-middleware: request_id, jwt, rate_limit

The same facts, with the endpoint and the retries, are kept in `Tracer.exchanges`. The
wrapping costs a production gateway nothing: only the kit passes a tracer.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from proxy.core.errors import ProxyError
from proxy.core.local_reply import local_reply
from proxy.core.models import Request, Response
from proxy.exchange.runtime import FastStart, Handler, ResponseCallback, Runtime
from proxy.upstream.h1 import StaleConnection

EXCHANGE_HEADER = "x-gatehouse-exchange"
ROUTE_HEADER = "x-gatehouse-route"
MIDDLEWARE_HEADER = "x-gatehouse-middleware"


@dataclass
class Exchange:
    """One request as the gateway handled it (test mode)."""

    id: str
    method: str
    path: str  # as the client sent it
    route: str  # "" when no route matched
    middleware: tuple[str, ...]  # the chain it ran through, global middleware first
    upstream: str  # the route's upstream ("" without a route)
    endpoint: str  # host:port of the endpoint that answered ("" when none did)
    retries: int
    status: int


class Tracer:
    """Wraps a Runtime's `handle` and `try_fast` (see the module docstring)."""

    def __init__(self) -> None:
        self.exchanges: dict[str, Exchange] = {}
        self._ids = itertools.count(1)
        # Exchanges begun and not answered yet, by id(request); the request is held so
        # that its id() is not reused meanwhile.
        self._running: dict[int, tuple[Request, str, str]] = {}

    def __call__(self, runtime: Runtime) -> tuple[Handler, FastStart]:
        async def handle(request: Request) -> Response:
            exchange = self._begin(request)
            response = await runtime.handle(request)
            self._mark(runtime, exchange, request, response)
            return response

        def try_fast(request: Request, on_response: ResponseCallback) -> bool:
            exchange = self._begin(request)

            def marked(response: Response | None, error: ProxyError | None) -> None:
                if response is None and not isinstance(error, StaleConnection):
                    # Answered as the front ends would answer it, but marked first. (A
                    # stale connection goes back through `handle`, with a new id.)
                    assert error is not None
                    response, error = local_reply(error, request), None
                if response is not None:
                    self._mark(runtime, exchange, request, response)
                on_response(response, error)

            return runtime.try_fast(request, marked)

        return handle, try_fast

    def _begin(self, request: Request) -> tuple[str, str]:
        """The exchange's id, set on the request; (id, the path as the client sent it).
        A request the fast path hands back to `handle` (its pooled connection turned out
        closed) keeps its id, so both tries are found under it."""
        begun = self._running.get(id(request))
        if begun is None:
            begun = self._running[id(request)] = (request, str(next(self._ids)), request.path)
        request.set_header(EXCHANGE_HEADER, begun[1])
        return begun[1], begun[2]

    def _mark(
        self, runtime: Runtime, exchange: tuple[str, str], request: Request, response: Response
    ) -> None:
        exchange_id, path = exchange
        self._running.pop(id(request), None)
        route = runtime.routes.get(request.route_name)
        if route is not None:
            chain = tuple(spec.name for spec in route.chain)
            upstream = route.config.upstream
        else:
            chain = tuple(spec.name for spec in runtime.config.global_middleware)
            upstream = ""
        self.exchanges[exchange_id] = Exchange(
            id=exchange_id,
            method=request.method,
            path=path,
            route=request.route_name,
            middleware=chain,
            upstream=upstream,
            endpoint=request.endpoint,
            retries=request.retries,
            status=response.status,
        )
        response.set_header(EXCHANGE_HEADER, exchange_id)
        response.set_header(ROUTE_HEADER, request.route_name)
        response.set_header(MIDDLEWARE_HEADER, ", ".join(chain))
