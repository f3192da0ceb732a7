"""The end of every chain: rewrite the request, pick an endpoint, exchange, retry.

Two kinds of retry happen here. The keep-alive race (a reused HTTP/1.1 connection the
upstream closed as we sent, `StaleConnection`) is retried at once on a fresh connection to
the same endpoint, and an HTTP/2 pool retries a refused stream once itself; neither counts
as a try. The upstream's `retries` policy (proxy/exchange/retry.py) then decides whether a failed
try is tried again on another endpoint, and the circuit breaker (proxy/exchange/circuit.py) may
refuse a request or a try at once with 503 `upstream_overloaded`.

The synchronous fast path (`try_start`) sends a bodiless request on an idle HTTP/1.1
connection and has no retry loop: a failure reaches the dispatcher through its callback,
except the keep-alive race, which `try_start` retries itself by running this whole path
in a task. So a route takes the fast path only while the retry policy needs nothing more: its `on`
holds only connect-failure and refused-stream (which cannot happen on an idle HTTP/1.1
connection) and no `per_try_timeout` is set; otherwise every request takes this path.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING, cast

from metrics.traffic import PER_TRY_TIMEOUT, failure_code
from proxy.codec.h1serialize import UnsafeHeader
from proxy.config.model import RewriteConfig, WebSocketConfig
from proxy.core.body import Body
from proxy.core.errors import (
    BadRequest,
    InternalError,
    ProxyError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from proxy.core.exchange import Exchange
from proxy.core.headers import upstream_h2_headers, upstream_request_head
from proxy.core.models import Request, Response
from proxy.exchange.circuit import CircuitBreaker
from proxy.exchange.retry import ReplayBody, RetryPolicy, load_of
from proxy.upstream.balancer import EndpointState, Upstream
from proxy.upstream.h1 import Http1UpstreamConnection, ResponseCallback, StaleConnection
from proxy.upstream.h2.pool import H2Pool
from proxy.upstream.h2.stream import StreamRefused
from proxy.upstream.pool import UpstreamPool
from proxy.websocket.protocol import accept_value, new_key
from proxy.websocket.upstream import UpstreamHandshake

if TYPE_CHECKING:
    from proxy.exchange.mirror import Mirror

log = logging.getLogger(__name__)

PathRewrite = Callable[[str], str]


def compile_rewrite(rewrite: RewriteConfig) -> PathRewrite | None:
    """The route's path rewrite as one function, built at load (None: forward as is)."""
    steps: list[PathRewrite] = []
    if rewrite.regex is not None:
        pattern = re.compile(rewrite.regex)
        replacement = rewrite.replacement or ""
        steps.append(lambda path: pattern.sub(replacement, path, count=1))
    if rewrite.strip_prefix:
        prefix = rewrite.strip_prefix.rstrip("/")
        size = len(prefix)

        def strip(path: str) -> str:
            if path.startswith(prefix) and (len(path) == size or path[size] in "/?"):
                return path[size:] or "/"
            return path

        steps.append(strip)
    if rewrite.add_prefix:
        add = rewrite.add_prefix.rstrip("/")
        steps.append(lambda path: add + path if path.startswith("/") else f"{add}/{path}")
    if not steps:
        return None
    if len(steps) == 1:
        return steps[0]

    def run_all(path: str) -> str:
        for step in steps:
            path = step(path)
        return path

    return run_all


class Forwarder:
    """Sends a route's requests to its upstream."""

    __slots__ = (
        "_breaker",
        "_buffer_limit",
        "_fast",
        "_host_rewrite",
        "_http2",
        "_load",
        "_max_head_bytes",
        "_protocol",
        "_raw_path",
        "_retry",
        "_rewrite",
        "_websocket",
        "fast_starts",
        "mirror",
        "upstream",
    )

    def __init__(
        self,
        upstream: Upstream,
        rewrite: RewriteConfig,
        max_head_bytes: int = 64 * 1024,
        websocket: WebSocketConfig | None = None,
        forward_raw_path: bool = False,
        request_buffering: int | None = None,
    ) -> None:
        self.upstream = upstream
        self._raw_path = forward_raw_path
        self._buffer_limit = request_buffering
        self._rewrite = compile_rewrite(rewrite)
        self._host_rewrite = rewrite.host
        self._http2 = upstream.http2
        self._max_head_bytes = max_head_bytes  # for a WebSocket handshake's answer
        self._websocket = websocket or WebSocketConfig()  # the route's tunnel settings
        self._load = load = load_of(upstream)  # shared by every route to the upstream
        self._retry = RetryPolicy(upstream.name, upstream.config.retries, load)
        self._breaker = CircuitBreaker(upstream, upstream.config.circuit_breaker, load)
        self._fast = not upstream.http2 and self._retry.fast_path_ok
        self._protocol = "2" if upstream.http2 else "1.1"  # the upstream hop's, for traces
        self.fast_starts = 0  # requests try_start sent (the tests read it)
        # The route's `mirror` (proxy/exchange/mirror.py), set by the Runtime; None: none.
        self.mirror: Mirror | None = None

    def _host_of(self, request: Request, pool: UpstreamPool | H2Pool) -> str:
        """The Host to send: the route's `rewrite.host`, else the client's, else the
        endpoint's own address."""
        endpoint = pool.endpoint
        return self._host_rewrite or request.host or f"{endpoint.host}:{endpoint.port}"

    def target_of(self, request: Request) -> bytes:
        """The request target to send: the canonical one (or, on a route with
        `forward_raw_path`, the client's own spelling), through the route's rewrite."""
        rewrite = self._rewrite
        if rewrite is None:
            return request.raw_target if self._raw_path else request.target
        if self._raw_path:
            path = rewrite(request.raw_target.partition(b"?")[0].decode("latin-1"))
        else:
            path = rewrite(request.path)
        target = f"{path}?{request.query}" if request.query else path
        return target.encode("latin-1")

    def try_start(
        self, request: Request, exchange: Exchange, on_response: ResponseCallback
    ) -> bool:
        """The synchronous fast path (proxy/exchange/dispatch.py): send a bodiless request
        on an idle pooled connection; False when none is idle or anything is unusual (an
        HTTP/2 upstream, a retry policy the fast path cannot follow, `max_requests`
        reached: the task path answers 503). Once started, `on_response` is called
        exactly once; a connection the upstream had closed meanwhile (the keep-alive
        race) is retried here, in a task, before it is called."""
        if not self._fast:
            return False
        load = self._load
        if load.active >= self._breaker.max_requests:
            return False
        upstream = self.upstream
        state = upstream.choose(request)
        pool = cast(UpstreamPool, state.pool)
        conn = pool.take_idle()
        if conn is None:
            # Choosing again on the task path would advance round robin twice: an
            # endpoint with no connection yet would be skipped every time and starve.
            exchange.balanced = state
            return False
        exchange.endpoint = pool.label
        host = self._host_of(request, pool)
        try:
            head = upstream_request_head(request, self.target_of(request), host, 0, chunked=False)
        except UnsafeHeader:
            pool.release(conn)
            return False
        state.in_flight += 1
        load.active += 1

        def answered(response: Response | None, error: ProxyError | None) -> None:
            state.in_flight -= 1
            load.active -= 1
            upstream.report(state, response.status if response is not None else None, error)
            if response is not None:
                upstream.policy.on_response(request, response, state)
                _traced_try(request, upstream.name, response, None, "1.1")
            elif isinstance(error, StaleConnection):
                exchange.balanced = state  # a fresh connection to the same endpoint
                self._retry_stale(request, exchange, on_response)
                return
            else:
                _traced_try(request, upstream.name, None, error, "1.1")
            on_response(response, error)

        conn.start(request.method, head, answered)
        self.fast_starts += 1
        mirror = self.mirror
        if mirror is not None:
            mirror.start(request, b"")
        return True

    def _retry_stale(
        self, request: Request, exchange: Exchange, on_response: ResponseCallback
    ) -> None:
        """The fast path's keep-alive race: the whole forwarding again, in a task."""
        retry = asyncio.get_running_loop().create_task(self(request, mirror=False))
        exchange.retry = retry

        def done(task: asyncio.Task[Response]) -> None:
            exchange.retry = None
            if task.cancelled():
                return  # the client went away
            error = task.exception()
            if error is None:
                on_response(task.result(), None)
            elif isinstance(error, ProxyError):
                on_response(None, error)
            else:
                log.error("bug while retrying a stale connection", exc_info=error)
                on_response(None, InternalError())

        retry.add_done_callback(done)

    async def __call__(self, request: Request, mirror: bool = True) -> Response:
        """Forward `request` and return the upstream's response (body still streaming),
        retrying failed tries as the upstream's `retries` allow; a copy goes to the
        route's mirror, if any, unless `mirror` is false (the fast path copied it).

        Raises:
            ProxyError: 502/503/504 for upstream failures (the last try's), 503
                `upstream_overloaded` from the circuit breaker, 4xx for a failed client
                body.
        """
        if request.upgrade:
            return await self._upgrade(request)
        body = request.body
        limit = self._buffer_limit
        if limit is not None and not body.complete and not _streams(request):
            # Request buffering: the body comes in before any upstream connection is
            # taken, so a slow client holds only its own socket, never a pooled one.
            await body.fill(limit)
        self._breaker.admit()
        # A body with trailers keeps its chunked framing (the trailers go with it).
        whole = body.take_all() if body.complete and not body.trailers else None
        replay = ReplayBody(body, whole)
        if mirror and self.mirror is not None:
            self.mirror.start(request, whole)
        load = self._load
        load.active += 1
        try:
            return await self._tries(request, replay)
        finally:
            load.active -= 1

    async def send_once(self, request: Request) -> Response:
        """Forward `request`, whose body is complete, in one try with no retry: a
        mirror's copy (proxy/exchange/mirror.py), which must cost its upstream no more
        than itself. The upstream's circuit breaker may refuse it, and its answer counts
        in the endpoint's health like any other.

        Raises:
            ProxyError: as `__call__`, for the one try.
        """
        self._breaker.admit()
        body = request.body
        replay = ReplayBody(body, body.take_all())
        upstream = self.upstream
        state = upstream.choose(request)
        self._breaker.admit_try(state.pool)
        load = self._load
        load.active += 1
        state.in_flight += 1
        try:
            response = await self._send(request, state, replay)
        except ProxyError as failure:  # not `exc`: mypyc gives one name one type
            upstream.report(state, None, failure)
            raise
        finally:
            state.in_flight -= 1
            load.active -= 1
        upstream.report(state, response.status, None)
        return response

    async def _tries(self, request: Request, replay: ReplayBody) -> Response:
        """The retry loop: a try, then (if the policy says so) a back-off and another try
        on an endpoint not tried yet."""
        upstream = self.upstream
        policy = self._retry
        tried: list[int] = []
        granted = False  # this request holds a retry of the upstream's budget
        try:
            while True:
                state = None
                if not tried:
                    exchange = request.exchange
                    state = cast("EndpointState | None", exchange.balanced)
                    exchange.balanced = None
                if state is None:
                    state = upstream.choose(request, tried)
                self._breaker.admit_try(state.pool)
                request.exchange.retries = len(tried)
                tried.append(state.index)
                state.in_flight += 1
                response: Response | None = None
                error: ProxyError | None = None
                try:
                    response = await self._try(request, state, replay)
                except ProxyError as exc:
                    error = exc
                finally:
                    state.in_flight -= 1
                    _traced_try(request, upstream.name, response, error, self._protocol)
                    if granted:
                        granted = False
                        policy.release()
                if response is None:
                    assert error is not None
                    upstream.report(state, None, error)
                    condition = policy.error_condition(error, len(tried))
                    if (
                        condition is None
                        or not policy.replayable(condition, request.method, replay)
                        or not policy.take_budget(condition)
                    ):
                        raise error
                else:
                    upstream.report(state, response.status, None)
                    condition = policy.status_condition(response.status, len(tried))
                    if (
                        condition is None
                        or not policy.replayable(condition, request.method, replay)
                        or not policy.take_budget(condition)
                    ):
                        upstream.policy.on_response(request, response, state)
                        return response
                    response.body.discard()  # its connection goes back (or closes)
                granted = True
                await asyncio.sleep(policy.backoff(len(tried) - 1))
        finally:
            if granted:  # cancelled during the back-off
                policy.release()

    async def _try(self, request: Request, state: EndpointState, replay: ReplayBody) -> Response:
        """One try on `state`'s endpoint, bounded up to the response head by the
        `per_try_timeout` when there is one."""
        timeout = self._retry.per_try_timeout
        if timeout is None:
            return await self._send(request, state, replay)
        # As asyncio.timeout does it, but the cancellation carries a message, so that the
        # upstream connection counts the cut try as a timeout, not as a client abort.
        task = asyncio.current_task()
        assert task is not None
        timer = asyncio.get_running_loop().call_later(timeout, task.cancel, PER_TRY_TIMEOUT)
        try:
            return await self._send(request, state, replay)
        except asyncio.CancelledError as cancelled:
            # Ours, and no other cancellation (the client's) pending: the try timed out.
            if PER_TRY_TIMEOUT in cancelled.args and task.uncancel() == 0:
                raise UpstreamTimeout(
                    f"no response head within per_try_timeout {timeout}s"
                ) from None
            raise
        finally:
            timer.cancel()

    async def _send(self, request: Request, state: EndpointState, replay: ReplayBody) -> Response:
        data = replay.data
        # A streamed body kept whole by an earlier try is sent framed by its length.
        length = len(data) if data is not None else request.body.length
        if self._http2:
            return await self._forward_h2(request, cast(H2Pool, state.pool), replay, length)
        return await self._forward_h1(request, cast(UpstreamPool, state.pool), replay, length)

    async def _forward_h1(
        self, request: Request, pool: UpstreamPool, replay: ReplayBody, length: int | None
    ) -> Response:
        request.exchange.endpoint = pool.label
        host = self._host_of(request, pool)
        try:
            head = upstream_request_head(
                request, self.target_of(request), host, length, chunked=length is None
            )
        except UnsafeHeader as exc:
            raise BadRequest(str(exc)) from None
        conn = await pool.acquire()
        try:
            return await _exchange_h1(conn, request.method, head, replay)
        except StaleConnection:
            if replay.data is None:
                raise  # a streamed body that was large or not wholly sent
            if length is None or length != len(replay.data):
                # The replay sends the body whole, framed by its now known length.
                head = upstream_request_head(
                    request, self.target_of(request), host, len(replay.data), chunked=False
                )
        # The keep-alive race: the upstream closed this idle connection as we sent on it.
        conn = await pool.acquire(fresh=True)
        return await _exchange_h1(conn, request.method, head, replay)

    async def _forward_h2(
        self, request: Request, pool: H2Pool, replay: ReplayBody, length: int | None
    ) -> Response:
        request.exchange.endpoint = pool.label
        endpoint = pool.endpoint
        host = self._host_of(request, pool)
        try:
            headers = upstream_h2_headers(
                request, self.target_of(request), host, endpoint.scheme, length
            )
        except UnsafeHeader as exc:
            raise BadRequest(str(exc)) from None
        try:
            return await pool.exchange(headers, replay.body, replay.data)
        except StreamRefused as refused:  # not `exc`: mypyc gives one name one type
            replay.keep(refused.replay)  # the pool could not retry it: maybe another endpoint
            raise

    async def _upgrade(self, request: Request) -> Response:
        """The upstream half of a WebSocket handshake: an HTTP/1.1 Upgrade on a connection
        of its own. A 101 comes back holding that connection (`Response.upgrade`) for the
        front end to tunnel; a refusal comes back as an ordinary response.

        An HTTP/2 client (RFC 8441) sends no Sec-WebSocket-Key, so this hop gets a fresh
        one and the upstream's Sec-WebSocket-Accept is checked against it here; an
        HTTP/1.1 client checks its own.

        Raises:
            ProxyError: 502/504 when the upstream cannot be reached or answers badly.
        """
        pool = cast(UpstreamPool, self.upstream.choose(request).pool)
        request.exchange.endpoint = pool.label
        host = self._host_of(request, pool)
        key: bytes | None = None
        if request.http_version == "2":
            key = new_key()
            raw = request.raw_headers
            if raw is not None:  # a key the client should not have sent would be a second one
                request.raw_headers = [(n, v) for n, v in raw if n != b"sec-websocket-key"]
        try:
            head = upstream_request_head(request, self.target_of(request), host, None, False)
        except UnsafeHeader as exc:
            raise BadRequest(str(exc)) from None
        extra = b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
        if key is not None:
            extra += b"Sec-WebSocket-Key: " + key + b"\r\n"
        head = head[:-2] + extra + b"\r\n"
        max_head = self._max_head_bytes
        settings = self._websocket
        try:
            handshake = await pool.open_dedicated(lambda: UpstreamHandshake(max_head, settings))
            sent_at = perf_counter()
            await handshake.exchange(head, pool.read_timeout)
        except ProxyError as error:  # not `exc`: mypyc gives one name one type
            pool.metrics.failure(failure_code(error))
            _traced_try(request, self.upstream.name, None, error, "1.1")
            raise
        pool.metrics.response(handshake.status, sent_at)
        trace = request.exchange.trace
        if trace is not None and trace.sink is not None:
            trace.end_hop(request, self.upstream.name, pool.label, handshake.status, "", 0, "1.1")
        reason = handshake.reason.decode("latin-1")
        if handshake.status != 101:
            handshake.close()
            return Response(
                handshake.status, handshake.headers, Body.from_bytes(handshake.body), reason
            )
        if key is not None:
            accept = [v for n, v in handshake.headers if n.lower() == b"sec-websocket-accept"]
            if accept != [accept_value(key)]:
                handshake.close()
                raise UpstreamProtocolError("the upstream's Sec-WebSocket-Accept is wrong")
        response = Response(101, handshake.headers, reason=reason)
        response.upgrade = handshake
        return response


def _traced_try(
    request: Request,
    upstream: str,
    response: Response | None,
    error: ProxyError | None,
    protocol: str,
) -> None:
    """An upstream try ended (its response head came, or it failed): its client span is
    recorded when the exchange's trace is (proxy/core/tracing.py)."""
    exchange = request.exchange
    trace = exchange.trace
    if trace is not None and trace.sink is not None:
        trace.end_hop(
            request,
            upstream,
            exchange.endpoint,
            response.status if response is not None else None,
            error.reason if error is not None else "",
            exchange.retries,
            protocol,
        )


def _streams(request: Request) -> bool:
    """Whether the request's body is a stream by nature, never buffered: gRPC (its client
    streams and bidirectional calls exchange messages while the body is open)."""
    content_type = request.header("content-type")
    return content_type is not None and content_type.startswith("application/grpc")


async def _exchange_h1(
    conn: Http1UpstreamConnection, method: str, head: bytes, replay: ReplayBody
) -> Response:
    """One HTTP/1.1 exchange; a streamed body the connection copied whole (when small)
    is kept in `replay` for a retry, whatever the outcome."""
    if replay.data is not None:
        return await conn.exchange(method, head, replay.body, replay.data)
    # Never a copy left from this connection's previous request. (A method, not an
    # assignment here: mypy would take `conn.sent_body` below to be None, and mypyc checks.)
    conn.forget_sent_body()
    try:
        return await conn.exchange(method, head, replay.body, None)
    finally:
        replay.keep(conn.sent_body)
