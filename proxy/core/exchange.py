"""The context of one exchange: what is known of it besides its two messages, and what
the pipeline keeps for it on the way (`request.exchange`, proxy/core/models.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from proxy.core.tracing import TraceContext


class Cancellable(Protocol):
    """Work on an exchange that a client going away stops (a chain run, a task)."""

    def cancel(self) -> object: ...


class Exchange:
    """What is known of one exchange besides its two messages, and what the pipeline
    keeps for it on the way: its context. Every `Request` has one (`request.exchange`),
    from its arrival, so a request answered before routing (a 400, a 404) still has its
    arrival time and an empty route name.

    The record (route, parameters, endpoint, retries, timings) is filled in by the
    exchange pipeline and read by metrics, the access log and the test kit's tracing.
    The rest belongs to the dispatcher (proxy/exchange/dispatch.py) and is typed here
    only as far as the core needs, so the core imports nothing above it.
    """

    __slots__ = (
        "balanced",
        "chain_inner_s",
        "eager",
        "endpoint",
        "error",
        "params",
        "received_at",
        "retries",
        "retry",
        "route_name",
        "trace",
        "traceparent",
        "upstream_s",
    )

    def __init__(self, received_at: float) -> None:
        self.received_at = received_at  # the request head was complete (duration metric)
        self.route_name = ""
        self.params: dict[str, str] = {}  # the route path's named parameters
        self.endpoint = ""  # host:port of the upstream endpoint the request went to
        self.retries = 0  # tries after the first (proxy/exchange/retry.py); endpoint is the last's
        self.upstream_s = 0.0  # the upstream's part: sending until the response head
        # The gateway's own error code when it answered instead of an upstream (the
        # `error` of its local reply: "upstream_timeout", "unauthorized"...); "" when the
        # response is the upstream's, so that a 504 of ours is told from an upstream's.
        self.error = ""
        # The W3C trace the exchange belongs to (proxy/core/tracing.py): from its arrival
        # when the gateway traces, else from its first upstream try if the request came
        # with a traceparent (propagation only).
        self.trace: TraceContext | None = None
        # Without either: the traceparent the last upstream try was sent with (the usual
        # request, with no trace of its own on a gateway that does not trace, costs no
        # TraceContext), b"" before any.
        self.traceparent = b""
        self.chain_inner_s = 0.0  # (middleware/chain.py: what the links after one took)
        # The upstream endpoint (an EndpointState) the fast path chose but could not use
        # (no idle connection): the task path's first try goes there rather than asking
        # the balance policy again (proxy/exchange/forward.py).
        self.balanced: object | None = None
        # The chain while it runs without a task (an EagerRun, proxy/exchange/eager.py).
        self.eager: Cancellable | None = None
        # The fast path's keep-alive race, retried by the forwarder in a task of its own.
        self.retry: Cancellable | None = None

    def cancel(self) -> None:
        """The client went away: its chain sees CancelledError where it waits, and a
        retry in flight is abandoned (its upstream connection is closed)."""
        if self.eager is not None:
            self.eager.cancel()
        if self.retry is not None:
            self.retry.cancel()
        trace = self.trace
        if trace is not None and trace.sink is not None:
            trace.finish(499, "client_closed")
