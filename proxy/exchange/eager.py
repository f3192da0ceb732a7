"""Running a route's middleware chain without a task, when it never has to wait.

Most middleware decide from the request alone (request_id, api_key, a local rate limit,
an access log line) and never await anything but `call_next`. For a bodiless request on
a route with such a chain, `EagerRun` drives the chain's coroutine by hand, as Python
3.12's eager tasks do: it runs synchronously from the front end's `data_received` until
the chain calls `call_next` at its end, where the request is sent on an idle pooled
connection by the synchronous fast path (`Forwarder.try_start`). The chain is then
suspended on a `FastForward`; the upstream connection's callback resumes it with the
response, the middleware see it, and the front end gets the result through the same
callback as the fast path. No task, no future.

When no idle connection exists, the chain is handed to a real task (`_continue`) before
the general forwarder runs, and carries on exactly as if it had been a task all along.
Only chains whose every middleware declares `EAGER = True` run this way: code that runs
before the first suspension runs outside any task, where `asyncio.timeout` and
`asyncio.current_task()` do not work, so a middleware that awaits anything besides
`call_next` (Redis, a JWKS fetch, a thread) must not declare it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any

from proxy.core.errors import InternalError, ProxyError
from proxy.core.exchange import Exchange
from proxy.core.local_reply import local_reply
from proxy.core.models import Request, Response

if TYPE_CHECKING:
    from proxy.exchange.forward import Forwarder

log = logging.getLogger(__name__)

Reply = Callable[[Response], None]
RouteCoroutine = Coroutine[Any, Any, Response]


class FastForward:
    """What `call_next` returns at the end of an eagerly run chain once the request went
    out on the fast path: awaiting it suspends the chain until the response arrives."""

    __slots__ = ("done", "error", "response")

    def __init__(self) -> None:
        self.done = False
        self.response: Response | None = None
        self.error: ProxyError | None = None

    def __await__(self) -> Generator[Any, None, Response]:
        if not self.done:
            yield self  # to EagerRun._step, which resumes us when the response is in
        if self.error is not None:
            raise self.error
        assert self.response is not None
        return self.response


class ToTask:
    """What `call_next` returns when the fast path cannot take the request: it suspends
    once, bare, so that EagerRun hands the chain to a task before `then` runs (the general
    forwarder needs one: `asyncio.timeout` works only inside a task)."""

    __slots__ = ("_then",)

    def __init__(self, then: Callable[[], Awaitable[Response]]) -> None:
        self._then = then

    def __await__(self) -> Generator[Any, None, Response]:
        yield None
        return (yield from self._then().__await__())


class EagerRun:
    """One request's chain, driven by hand (see the module docstring)."""

    __slots__ = (
        "_coroutine",
        "_exchange",
        "_pending",
        "_reply",
        "_request",
        "_task",
        "finished",
    )

    def __init__(
        self, request: Request, exchange: Exchange, coroutine: RouteCoroutine, reply: Reply
    ) -> None:
        self._request = request
        self._exchange = exchange
        self._coroutine = coroutine
        self._reply = reply
        self._pending: FastForward | None = None
        self._task: asyncio.Task[Response] | None = None  # once a task carries the chain
        self.finished = False  # answered or cancelled: nothing more will happen

    @property
    def eager(self) -> bool:
        """Still driven by hand (not finished, not handed to a task)."""
        return self._task is None and not self.finished

    def start(self) -> None:
        """Run the chain until it finishes or has to wait."""
        self._exchange.eager = self
        self._step()

    def cancel(self) -> None:
        """The client went away: the chain sees CancelledError where it waits, as a
        task's chain would (an access log records 499), and its answer is dropped."""
        if self.finished:
            return
        self.finished = True
        if self._task is not None:
            self._task.cancel()
            return
        self._pending = None  # a late upstream answer is discarded by _answered
        try:
            self._coroutine.throw(asyncio.CancelledError())
        except StopIteration as done:  # a middleware turned the cancel into an answer
            done.value.body.discard()
        except asyncio.CancelledError:
            pass
        except BaseException:
            log.exception("bug in an eagerly run middleware chain while cancelling")

    def forward(self, request: Request, forwarder: Forwarder) -> FastForward | None:
        """The chain's end: send on the fast path; None when it cannot (no idle
        connection), and the caller awaits the general forwarder instead."""
        pending = FastForward()
        if not forwarder.try_start(request, self._exchange, self._answered):
            return None
        self._pending = pending
        return pending

    def _answered(self, response: Response | None, error: ProxyError | None) -> None:
        # Called from the upstream connection's data_received (or, after the keep-alive
        # race, from the forwarder's retry task ending).
        pending = self._pending
        if pending is None:  # cancelled meanwhile: nobody takes the answer
            if response is not None:
                response.body.discard()
            return
        self._pending = None
        pending.done = True
        pending.response, pending.error = response, error
        self._step()

    def _step(self) -> None:
        try:
            awaited = self._coroutine.send(None)
        except StopIteration as done:
            self._finish(done.value)
            return
        except BaseException:  # the route coroutine turns ProxyErrors into replies itself
            log.exception("bug in an eagerly run middleware chain")
            self._finish(local_reply(InternalError(), self._request))
            return
        if awaited is not None and awaited is self._pending:
            return  # resumed by _answered
        # Something real to wait for: from here on, a task carries the chain.
        task = asyncio.get_running_loop().create_task(_continue(self._coroutine, awaited))
        self._task = task
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Response]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.error("bug in a middleware chain", exc_info=error)
            self._finish(local_reply(InternalError(), self._request))
            return
        self._finish(task.result())

    def _finish(self, response: Response) -> None:
        if self.finished:  # cancelled: the client is gone
            response.body.discard()
            return
        self.finished = True
        self._exchange.eager = None
        self._reply(response)


class ChainEnd:
    """What a chain's last `call_next` does: the fast path when the chain runs eagerly and
    an idle connection is there, the forwarder otherwise. (A class in this compiled
    module rather than a closure in runtime.py: it runs once per request.)"""

    __slots__ = ("_forwarder",)

    def __init__(self, forwarder: Forwarder) -> None:
        self._forwarder = forwarder

    def __call__(self, request: Request) -> Awaitable[Response]:
        forwarder = self._forwarder
        run = request.exchange.eager
        if isinstance(run, EagerRun) and run.eager:
            pending = run.forward(request, forwarder)
            if pending is not None:
                return pending
            return ToTask(lambda: forwarder(request))
        return forwarder(request)


async def _continue(coroutine: RouteCoroutine, awaited: Any) -> Response:
    """Carry on a coroutine that suspended on `awaited` outside a task, as a task would:
    wait for what it waits for, then resume it (it reads the outcome itself)."""
    while True:
        try:
            if awaited is None:
                await asyncio.sleep(0)  # a bare yield: give the loop one turn
            else:
                # The coroutine's own `await` marked the future as awaited; a task clears
                # the mark before waiting on it, and so must we, or our await is refused.
                awaited._asyncio_future_blocking = False
                await awaited
        except BaseException:  # the coroutine reads the outcome itself when resumed
            pass
        try:
            awaited = coroutine.send(None)
        except StopIteration as done:
            result: Response = done.value
            return result
