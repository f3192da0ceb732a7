"""The middleware interface: what a `type:` in routes.yaml names. Part of the plugin
surface: import it from `proxy` (proxy/__init__.py).

A middleware is an object with `async def __call__(self, request, call_next) -> Response`:
it passes the request on (`await call_next(request)`, possibly after changing it, and
possibly changing the response), answers itself, or raises a ProxyError (answered as a
local reply). It never touches sockets.

Its type is a *factory*: a class (or any callable) with

- `OPTIONS`: the option keys it accepts (anything else is a config error with a
  did-you-mean), and optionally `REQUIRED`: those that must be given. `OPTIONS` is a
  list of names, or a key table `{name: Option}` (proxy/config/spec.py) that also says
  each option's type, default and meaning, which `gatehouse schema` prints for editors;
- a constructor taking an `Options` (proxy/plugin/options.py) that reads and validates its
  options at config load, reporting problems with the file:line errors of the rest of
  routes.yaml. It must not touch the event loop (`gatehouse check` constructs it too).

Optional hooks, awaited by the server: `async def start(self)` once the event loop runs
(open clients, start refresh tasks) and `async def close(self)` at shutdown.

Optional `identity_headers()` returns the names of the request fields it sets for the
upstream to rely on (the consumer, a user, token claims, values `headers` sets): the
gateway removes every spelling of them that the client sent (any case, `_` for `-`)
before the chain runs, so that whether or not the middleware sets one, the upstream never
sees a client's copy (proxy/core/canonical.py `without_spellings`).

Optional `ACCESS_CONTROL = True` says that it decides whether a request may go on at all
(authentication, address rules), and `SERVES_STORED = True` that it may answer a request
with a response stored for an earlier one (a cache). A chain that lists one that serves
stored responses before one that controls access is refused at config load: a response
stored for a client that was let through would reach clients never checked.

`PHASES = True` (a class or instance attribute) says that the phases below may be used.

Optional `EAGER = True` (a class or instance attribute) promises that the middleware
awaits nothing but `call_next`: a chain made only of such middleware runs without a task
(proxy/exchange/eager.py), which is most of what a chain costs. Do not set it on a middleware that
awaits I/O, a lock or a thread.

Phases. A middleware may also offer its work as plain calls (and say so with `PHASES`),
and a bodiless request on a chain made only of such middleware runs as one function,
without a coroutine per link or a task
(proxy/exchange/phased.py). `__call__` must do exactly what the phases do (the built-in
middleware write `__call__` with them):

- `request_phase(request) -> state`: the work before `call_next`. The state (anything)
  is handed back to the other phases; a `Response` is the answer, and the request goes no
  further. A ProxyError it raises is answered as it would be from `__call__`. A phase
  that must wait for something (a Redis answer) returns `Pending(future, then)`: the
  chain goes on when the future is done, with `then(request, result)` as the phase's
  outcome (a state, a Response, or a raised ProxyError). The future is cancelled if the
  client goes away meanwhile. A phase that meets a case too involved for phases (a
  cache's revalidation, which may forward twice or in the background) returns
  `Deferred(run)`: `run(call_next)` is awaited in a task with the rest of the chain as
  `call_next`, exactly as `__call__` would be, and its response (or ProxyError) is the
  middleware's outcome; its response phase does not run for that request.
- `response_phase(request, response, state) -> Response`: the work after `call_next`.
- `error_phase(request, error, state) -> Response`, optional: `call_next` raised the
  ProxyError `error` and the middleware answers it (without it, the error passes on).
- `abort_phase(request, state, status)`, optional: no response will come (the client
  went away: 499; a bug further in: 500).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from proxy.core.models import Request, Response
    from proxy.plugin.options import Options

Handler = Callable[["Request"], Awaitable["Response"]]


class Middleware(Protocol):
    """One link of a route's chain."""

    async def __call__(self, request: Request, call_next: Handler) -> Response: ...


class Pending:
    """What a request phase returns when it has to wait (see "Phases" above): `future`,
    and `then(request, result)`, which makes the phase's outcome from the future's
    result once it is done."""

    __slots__ = ("future", "then")

    def __init__(self, future: asyncio.Future[Any], then: Callable[[Request, Any], object]) -> None:
        self.future = future
        self.then = then


class Deferred:
    """What a request phase returns to handle this one request as a coroutine (see
    "Phases" above): `run(call_next)`, awaited in a task with the rest of the chain (the
    later middleware, then forwarding) as `call_next`; what it returns or raises is the
    middleware's answer."""

    __slots__ = ("run",)

    def __init__(self, run: Callable[[Handler], Coroutine[Any, Any, Response]]) -> None:
        self.run = run


class MiddlewareFactory(Protocol):
    """What a `type:` resolves to: reads its options, returns the middleware."""

    OPTIONS: ClassVar[Collection[str]]  # names, or a key table {name: Option}

    def __call__(self, options: Options) -> Middleware: ...


def required_options(factory: Any) -> Sequence[str]:
    """The factory's REQUIRED keys (none when it declares none)."""
    return tuple(getattr(factory, "REQUIRED", ()))
