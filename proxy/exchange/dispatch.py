"""One entry for every exchange: `Dispatcher.start(request, reply)`.

An exchange runs in one of three modes, each kept because it measured faster for the
requests it takes (bench/README.md):

    front end -- start(request, reply): the route matched once; identity fields,
                 |                      the body limit and WebSocket permission applied
      +----------+-----------------------+--------------------------------+
      fast                               eager                            task
      bodiless, no middleware, an idle   bodiless, every middleware       anything else
      HTTP/1.1 connection: sent from     EAGER (awaits only call_next):   (bodies, upgrades,
      the front end's data_received,     as one function when each        middleware that
      answered from the upstream's       offers phases (PhasedRun),       wait): a Run the
      callback                           else EagerRun drives the chain   front end awaits
                                         by hand; its end takes the fast  in its task
      -> reply(response)                 path when it can -> reply(...)

`start` owns every fallback, so a front end only ever sees a response: a fast start
whose pooled connection turns out closed (the keep-alive race) is retried by the
forwarder itself (`Forwarder.try_start`); an eager chain that has to wait moves itself
to a task (proxy/exchange/eager.py); errors become local replies here. The exchange's
own state (route, parameters, chosen endpoint, chain run, timings) is its context,
`request.exchange` (`Exchange`, proxy/core/exchange.py).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING

from proxy.core.canonical import without_spellings
from proxy.core.errors import BodyTooLarge, InternalError, NoRoute, ProxyError, UpgradeNotAllowed
from proxy.core.local_reply import local_reply
from proxy.core.models import Request, Response
from proxy.exchange.eager import EagerRun
from proxy.exchange.local_answers import https_redirect

if TYPE_CHECKING:
    from proxy.core.tracing import Tracer
    from proxy.exchange.acme_http01 import Http01Responder
    from proxy.exchange.routing import RouteTable
    from proxy.exchange.runtime import RouteRuntime

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]
Reply = Callable[[Response], None]  # the answer to an exchange started without a task
Run = Callable[[], Awaitable[Response]]  # an exchange the front end runs in its task
Start = Callable[[Request, Reply], "Run | None"]  # `Dispatcher.start`'s shape


class Dispatcher:
    """Starts the exchanges of one Runtime (its route table and compiled routes)."""

    __slots__ = ("_http01", "_no_route", "_routes", "_table", "_tracer")

    def __init__(
        self,
        table: RouteTable,
        routes: dict[str, RouteRuntime],
        no_route: Handler | None,
        tracer: Tracer | None = None,
        http01: Http01Responder | None = None,
    ) -> None:
        self._table = table
        self._routes = routes
        self._no_route = no_route  # global_middleware ending in a 404, if any
        self._tracer = tracer  # `tracing:` (None: propagation only, at the upstream hop)
        self._http01 = http01  # ACME HTTP-01 challenges (None: no name uses them)

    def start(self, request: Request, reply: Reply) -> Run | None:
        """Begin `request`'s exchange. None: it runs without a task, and `reply` is
        called exactly once with the response (possibly before `start` returns). Else
        the caller awaits the returned Run in a task; its response never raises, and
        cancelling the task (the client went away) cancels the exchange."""
        exchange = request.exchange
        tracer = self._tracer
        if tracer is not None:
            exchange.trace = tracer.begin(request)
        try:
            if self._http01 is not None and (answer := self._http01.answer(request)) is not None:
                return partial(_answered, answer)
            listener = request.listener
            if listener is not None and listener.redirect_https is not None:
                answer = https_redirect(request, listener.redirect_https)
                if answer is not None:
                    return partial(_answered, answer)
            match = self._table.match(
                request.method, request.host, request.path, request.get_headers, request.query
            )
            if match is None:
                if self._no_route is None:
                    raise NoRoute(f"no route for {request.method} {request.path}")
                return partial(run_chain, self._no_route, request)
            route = self._routes[match.route.name]
            split = route.split
            if split is not None:  # a weighted split: run as the side chosen (split.py)
                route = split.choose(request)
            exchange.route_name = route.name
            exchange.params = match.params
            if route.identity_fields:
                without_spellings(request, route.identity_fields)
            body = request.body
            if request.upgrade:
                if not route.websocket.enabled:
                    raise UpgradeNotAllowed(f"route {route.name!r} does not allow WebSocket")
            else:
                limit = match.route.max_body_size
                if limit is not None:
                    if (body.length or 0) > limit or body.bytes_fed > limit:
                        raise BodyTooLarge()
                    body.limit = limit if body.limit is None else min(body.limit, limit)
        except ProxyError as exc:
            return partial(_answered, local_reply(exc, request))
        except Exception:
            log.exception("bug while routing %r", request)
            return partial(_answered, local_reply(InternalError(), request))
        if body.length == 0 and body.complete and not request.upgrade:  # bodiless
            forwarder = route.forwarder
            if route.handler is forwarder:
                if forwarder.try_start(request, exchange, partial(_reply, request, reply)):
                    return None
            elif route.phased is not None:
                route.phased.start(request, exchange, reply)
                return None
            elif route.eager:
                EagerRun(request, exchange, run_chain(route.handler, request), reply).start()
                return None
        return partial(run_chain, route.handler, request)


async def run_chain(handler: Handler, request: Request) -> Response:
    """A route's chain (or just its forwarder); failures become local replies."""
    try:
        return await handler(request)
    except ProxyError as exc:
        return failed_reply(exc, request)
    except Exception:
        log.exception("bug while handling %r", request)
        return local_reply(InternalError(), request)


async def _answered(response: Response) -> Response:
    return response


def _reply(
    request: Request, reply: Reply, response: Response | None, error: ProxyError | None
) -> None:
    """The fast path's answer, from the upstream connection's callback."""
    if response is None:
        assert error is not None
        response = failed_reply(error, request)
    reply(response)


def failed_reply(error: ProxyError, request: Request) -> Response:
    """The local reply to an exchange that failed with `error` (logged when it is a 5xx)."""
    if error.status >= 500:
        log.info(
            "%s %s -> %d %s: %s",
            request.method,
            request.path,
            error.status,
            error.reason,
            error.message,
        )
    return local_reply(error, request)
