"""A route's chain as one function: middleware that offer phases run as plain calls.

A middleware may offer its work as synchronous phases besides its `__call__`
(proxy/plugin/base.py, "Phases"):

    request_phase(request) -> state         before forwarding; a Response is the answer,
                                            a Pending a wait (the chain resumes from
                                            its future's callback), a Deferred this
                                            request run as the middleware's coroutine
    response_phase(request, response, state) -> Response
    error_phase(request, error, state) -> Response     optional: it answers a ProxyError
    abort_phase(request, state, status) -> None        optional: no response reaches it
                                                       (499 client gone, 500 a bug)

When every middleware of a route offers them (`PHASES`), a bodiless request runs the
whole chain as one loop (`PhasedRun`): the request phases in order, the request sent on
the fast path (`Forwarder.try_start`) or, with no idle connection, by the forwarder in a
task, then the response phases in reverse order from the upstream connection's callback.
No coroutine, no task in the common case, one object per request. It does what the
coroutine chain (middleware/chain.py) does with the same middleware, step for step:

- a request phase that returns a Response answers there: the phases of the middleware
  before it see that response, the later ones never run;
- a ProxyError (from a phase or from forwarding) passes outwards through the middleware
  that entered: one with an `error_phase` turns it into its response, which then goes on
  outwards as any response; unanswered, it is the local reply;
- a client going away, or a bug, is an `abort_phase` (499, 500) for every middleware that
  entered, innermost first; a bug is then logged and answered with a 500;
- a `Deferred` runs in a task with the link's `rest` (the coroutine chain of the
  middleware after it, then the forwarder) as `call_next`, and its outcome is the
  middleware's answer: the way for the rare cases (a cache's revalidation) to be what
  `__call__` is, while the common ones stay phases.

Each middleware is timed alone (its phases), into
`gatehouse_middleware_duration_seconds{middleware}`, and the forwarding is the request's
`upstream_s`, as the coroutine chain does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from time import perf_counter
from typing import TYPE_CHECKING, Any

from proxy.core.errors import InternalError, ProxyError
from proxy.core.exchange import Exchange
from proxy.core.local_reply import local_reply
from proxy.core.models import Request, Response
from proxy.exchange.dispatch import failed_reply
from proxy.plugin.base import Deferred, Handler, Pending

if TYPE_CHECKING:
    from proxy.exchange.forward import Forwarder

log = logging.getLogger(__name__)

Reply = Callable[[Response], None]
CLIENT_CLOSED_STATUS = 499
BUG_STATUS = 500


def offers_phases(middleware: object) -> bool:
    """Whether `middleware` can run in a PhasedChain: it says so (`PHASES`) and has both
    phases."""
    return (
        bool(getattr(middleware, "PHASES", False))
        and hasattr(middleware, "request_phase")
        and hasattr(middleware, "response_phase")
    )


class PhasedLink:
    """One middleware of a PhasedChain, with its phases looked up once."""

    __slots__ = (
        "abort_phase",
        "error_phase",
        "observe",
        "request_phase",
        "response_phase",
        "rest",
    )

    def __init__(self, middleware: Any, observe: Callable[[float], None], rest: Handler) -> None:
        self.request_phase: Callable[[Request], object] = middleware.request_phase
        self.response_phase: Callable[[Request, Response, object], Response] = (
            middleware.response_phase
        )
        self.error_phase: Callable[[Request, ProxyError, object], Response] | None = getattr(
            middleware, "error_phase", None
        )
        self.abort_phase: Callable[[Request, object, int], None] | None = getattr(
            middleware, "abort_phase", None
        )
        self.observe = observe  # the middleware's duration histogram
        # The coroutine chain after this link (timed: it sets the exchange's
        # chain_inner_s), the `call_next` of a Deferred.
        self.rest = rest


class PhasedChain:
    """A route's middleware, all offering phases, and its forwarder."""

    __slots__ = ("forwarder", "links")

    def __init__(self, links: Sequence[PhasedLink], forwarder: Forwarder) -> None:
        self.links = tuple(links)
        self.forwarder = forwarder

    def start(self, request: Request, exchange: Exchange, reply: Reply) -> None:
        """Run the chain for a bodiless request; `reply` is called exactly once."""
        PhasedRun(self, request, exchange, reply).begin()


class PhasedRun:
    """One request through a PhasedChain (see the module docstring)."""

    __slots__ = (
        "_chain",
        "_exchange",
        "_reply",
        "_request",
        "_sent_at",
        "_spent",
        "_states",
        "_task",
        "_waiting",
        "finished",
    )

    def __init__(
        self, chain: PhasedChain, request: Request, exchange: Exchange, reply: Reply
    ) -> None:
        self._chain = chain
        self._request = request
        self._exchange = exchange
        self._reply = reply
        self._states: list[object] = []  # of the middleware that entered, in order
        self._spent: list[float] = []  # each one's time in its phases so far
        self._sent_at = 0.0
        self._task: asyncio.Task[Response] | None = None  # the forwarder, without fast path
        self._waiting: Pending | None = None  # what a request phase waits for
        self.finished = False  # answered or cancelled: nothing more will happen

    def begin(self) -> None:
        self._enter(0)

    def _enter(self, first: int) -> None:
        """The request phases from link `first` on, then the forwarding."""
        request = self._request
        links = self._chain.links
        for index in range(first, len(links)):
            link = links[index]
            started = perf_counter()
            try:
                state = link.request_phase(request)
            except ProxyError as error:
                link.observe(perf_counter() - started)  # it ran: it counts
                self._unwind(index - 1, error)
                return
            except Exception:
                link.observe(perf_counter() - started)
                self._bug(index - 1)
                return
            if isinstance(state, Deferred):  # run as a coroutine, in a task
                state = Pending(
                    asyncio.get_running_loop().create_task(state.run(link.rest)), _its_answer
                )
            if isinstance(state, Pending):  # resumed by _resumed
                self._exchange.chain_inner_s = 0.0  # (a Deferred's rest sets it)
                self._waiting = state
                self._spent.append(started)  # (a start until it resumes)
                self._exchange.eager = self  # a client going away cancels the wait
                state.future.add_done_callback(self._resumed)
                return
            if not self._entered(index, state, perf_counter() - started):
                return
        self._forward()

    def _entered(self, index: int, state: object, spent: float) -> bool:
        """Keep link `index`'s state; False when it answered (the answer is on its way)."""
        if isinstance(state, Response):  # it answered: the later ones never run
            self._chain.links[index].observe(spent)
            self._leave(index - 1, state)
            return False
        self._states.append(state)
        self._spent.append(spent)
        return True

    def _resumed(self, future: asyncio.Future[Any]) -> None:
        pending = self._waiting
        if self.finished or pending is None or future.cancelled():
            _drop(future)  # the client went away: cancel() has aborted the chain
            return
        self._waiting = None
        self._exchange.eager = None
        index = len(self._states)
        link = self._chain.links[index]
        # Its time, less a Deferred's forwarding and later middleware.
        started = self._spent.pop() + self._exchange.chain_inner_s
        try:
            state = pending.then(self._request, future.result())
        except ProxyError as error:
            link.observe(perf_counter() - started)
            self._unwind(index - 1, error)
            return
        except Exception as bug:
            link.observe(perf_counter() - started)
            self._bug(index - 1, error=bug)
            return
        if self._entered(index, state, perf_counter() - started):
            self._enter(index + 1)

    def _forward(self) -> None:
        exchange = self._exchange
        forwarder = self._chain.forwarder
        exchange.eager = self  # a client going away cancels us (Exchange.cancel)
        self._sent_at = perf_counter()
        if forwarder.try_start(self._request, exchange, self._answered):
            return
        task = asyncio.get_running_loop().create_task(forwarder(self._request))
        self._task = task
        task.add_done_callback(self._forwarded)

    def _forwarded(self, task: asyncio.Task[Response]) -> None:
        if task.cancelled():
            return  # cancel() has aborted the chain
        error = task.exception()
        if error is None:
            self._answered(task.result(), None)
        elif isinstance(error, ProxyError):
            self._answered(None, error)
        else:
            self._exchange.eager = None
            self._exchange.upstream_s = perf_counter() - self._sent_at
            self._bug(len(self._states) - 1, error=error)

    def _answered(self, response: Response | None, error: ProxyError | None) -> None:
        # From the upstream connection's callback (or the forwarder's task ending).
        if self.finished:  # the client went away meanwhile: nobody takes the answer
            if response is not None:
                response.body.discard()
            return
        self._exchange.eager = None
        self._exchange.upstream_s = perf_counter() - self._sent_at
        depth = len(self._states) - 1
        if response is not None:
            self._leave(depth, response)
        else:
            assert error is not None
            self._unwind(depth, error)

    def _leave(self, depth: int, response: Response) -> None:
        """The response phases of the middleware at `depth` and outwards."""
        links = self._chain.links
        request = self._request
        for index in range(depth, -1, -1):
            link = links[index]
            started = perf_counter()
            try:
                response = link.response_phase(request, response, self._states[index])
            except ProxyError as error:
                response.body.discard()
                link.observe(self._spent[index] + perf_counter() - started)
                self._unwind(index - 1, error)
                return
            except Exception:
                response.body.discard()
                self._bug(index - 1, failed=index)
                return
            link.observe(self._spent[index] + perf_counter() - started)
        self._finish(response)

    def _unwind(self, depth: int, error: ProxyError) -> None:
        """`error` passes outwards from `depth` until a middleware answers it."""
        links = self._chain.links
        request = self._request
        for index in range(depth, -1, -1):
            link = links[index]
            handler = link.error_phase
            if handler is None:
                link.observe(self._spent[index])
                continue
            started = perf_counter()
            try:
                response = handler(request, error, self._states[index])
            except ProxyError as again:
                link.observe(self._spent[index] + perf_counter() - started)
                error = again
                continue
            except Exception:
                self._bug(index - 1, failed=index)
                return
            link.observe(self._spent[index] + perf_counter() - started)
            self._leave(index - 1, response)
            return
        self._finish(failed_reply(error, request))

    def _bug(self, depth: int, failed: int = -1, error: BaseException | None = None) -> None:
        """A middleware (at `failed`, if any) or the forwarder raised what is no
        ProxyError (`error`, or the one being handled): the ones that entered hear 500,
        and the client gets one."""
        log.error("bug while handling %r", self._request, exc_info=error or True)
        self._abort(depth, BUG_STATUS, failed)
        self._finish(local_reply(InternalError(), self._request))

    def _abort(self, depth: int, status: int, failed: int = -1) -> None:
        links = self._chain.links
        if failed >= 0:
            links[failed].observe(self._spent[failed])
        for index in range(depth, -1, -1):
            link = links[index]
            if link.abort_phase is not None:
                try:
                    link.abort_phase(self._request, self._states[index], status)
                except Exception:
                    log.exception("bug in a middleware's abort phase")
            link.observe(self._spent[index])

    def cancel(self) -> None:
        """The client went away: every middleware that entered hears 499, and a late
        answer is dropped."""
        if self.finished:
            return
        self.finished = True
        self._exchange.eager = None
        if self._task is not None:
            self._task.cancel()
        waiting = self._waiting
        if waiting is not None:  # a request phase's wait: it hears nothing, as a
            self._waiting = None  # coroutine cancelled in its await would not
            waiting.future.cancel()
            self._chain.links[len(self._states)].observe(perf_counter() - self._spent.pop())
        self._abort(len(self._states) - 1, CLIENT_CLOSED_STATUS)

    def _finish(self, response: Response) -> None:
        if self.finished:  # cancelled: the client is gone
            response.body.discard()
            return
        self.finished = True
        self._reply(response)


def _its_answer(request: Request, response: Response) -> Response:
    """A Deferred's outcome: the response its coroutine returned is the answer."""
    return response


def _drop(future: asyncio.Future[Any]) -> None:
    """The outcome of a wait that nobody takes now: an exception marked as seen, the body
    of a Deferred's response let go (its upstream connection freed)."""
    if future.cancelled():
        return
    if future.exception() is None:
        result = future.result()
        if isinstance(result, Response):
            result.body.discard()
