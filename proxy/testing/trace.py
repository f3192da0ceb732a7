"""Test mode: every answer says which route, middleware and upstream handled it.

A gateway started by the test kit wraps its Runtime's entry point (`Server(config,
entry_point=tracer)`). Each exchange gets an id; the request sent upstream carries it in
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

from proxy.core.models import Request, Response
from proxy.exchange.dispatch import Reply, Run, Start
from proxy.exchange.runtime import Runtime

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
    """Wraps a Runtime's dispatcher's `start` (see the module docstring)."""

    def __init__(self) -> None:
        self.exchanges: dict[str, Exchange] = {}
        self._ids = itertools.count(1)

    def __call__(self, runtime: Runtime) -> Start:
        start = runtime.dispatcher.start

        def traced_start(request: Request, reply: Reply) -> Run | None:
            exchange = self._begin(request)

            def marked(response: Response) -> None:
                self._mark(runtime, exchange, request, response)
                reply(response)

            run = start(request, marked)
            if run is None:
                return None

            async def traced_run() -> Response:
                response = await run()
                self._mark(runtime, exchange, request, response)
                return response

            return traced_run

        return traced_start

    def _begin(self, request: Request) -> tuple[str, str]:
        """The exchange's id, set on the request; (id, the path as the client sent it)."""
        exchange_id = str(next(self._ids))
        request.set_header(EXCHANGE_HEADER, exchange_id)
        return exchange_id, request.path

    def _mark(
        self, runtime: Runtime, exchange: tuple[str, str], request: Request, response: Response
    ) -> None:
        exchange_id, path = exchange
        route = runtime.routes.get(request.exchange.route_name)
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
            route=request.exchange.route_name,
            middleware=chain,
            upstream=upstream,
            endpoint=request.exchange.endpoint,
            retries=request.exchange.retries,
            status=response.status,
        )
        response.set_header(EXCHANGE_HEADER, exchange_id)
        response.set_header(ROUTE_HEADER, request.exchange.route_name)
        response.set_header(MIDDLEWARE_HEADER, ", ".join(chain))
