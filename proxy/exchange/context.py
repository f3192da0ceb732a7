"""The dispatcher's context for one exchange: the record every layer may read, plus what
only the pipeline needs on the way (proxy/exchange/dispatch.py).

`Request` and `Response` carry the messages; everything the pipeline decides about an
exchange (its route and parameters, the endpoint the balancer chose, a chain running
without a task, the forwarder's retry of a stale connection) lives here.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from proxy.core.models import ExchangeRecord, Response

if TYPE_CHECKING:
    from proxy.exchange.eager import EagerRun
    from proxy.upstream.balancer import EndpointState


class Exchange(ExchangeRecord):
    """One exchange as the dispatcher runs it (`request.exchange` once dispatched)."""

    __slots__ = ("balanced", "eager", "retry")

    def __init__(self, received_at: float) -> None:
        super().__init__(received_at)
        # The endpoint the fast path chose but could not use (no idle connection): the
        # task path's first try goes there rather than asking the policy again.
        self.balanced: EndpointState | None = None
        self.eager: EagerRun | None = None  # the chain, while it runs without a task
        # The fast path's keep-alive race, retried by the forwarder in a task of its own.
        self.retry: asyncio.Task[Response] | None = None

    def cancel(self) -> None:
        """The client went away: its chain sees CancelledError where it waits, and a
        retry in flight is abandoned (its upstream connection is closed)."""
        if self.eager is not None:
            self.eager.cancel()
        if self.retry is not None:
            self.retry.cancel()
