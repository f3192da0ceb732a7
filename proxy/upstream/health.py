"""Active health checks (`upstreams.X.health_check`): one task per upstream, per worker.

Every worker checks on its own (as nginx plus does): no state is shared, and the
`gatehouse_upstream_healthy` gauge is merged across workers by `min`. Each round checks
every endpoint at once, each check bounded by `timeout`; rounds start `interval` apart,
give or take `jitter` (a fraction of the interval, drawn anew each round, so workers and
upstreams drift apart instead of probing in step). The first round runs within
`jitter * interval` of the start.

- `type: http`: a fresh connection (TLS for https:// endpoints, with the upstream's
  trust settings, SNI and ALPN) and one GET of `path` in the upstream's protocol:
  `GET path HTTP/1.1` with `Host: host:port` and `Connection: close` for http1
  upstreams, a stream on an HTTP/2 connection (prior knowledge for h2c, ALPN h2 for h2)
  for the others. Only the status is read. It passes when the status is in one of the
  `expect` ranges.
- `type: tcp`: a TCP connect (no TLS) that succeeds within `timeout`.

Endpoints start healthy, so a new upstream serves at once; `unhealthy_threshold` failed
checks in a row take one out of rotation, and `healthy_threshold` passed checks in a row
bring it back. Each change is logged at info and calls `Upstream.refresh_eligibility`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from metrics.definitions import count_health_check
from proxy.config.model import EndpointConfig, HealthCheckConfig
from proxy.core.errors import ProxyError
from proxy.upstream.transport import open_connection

if TYPE_CHECKING:
    from proxy.upstream.balancer import EndpointState

log = logging.getLogger(__name__)

# A status line longer than this is not one (RFC 9112 section 4: "HTTP/1.1 200 OK").
MAX_STATUS_LINE_BYTES = 8 * 1024
USER_AGENT = "gatehouse-health-check"


class HealthCheckFailed(Exception):
    """One check failed; the message says why (logged when the endpoint leaves)."""


class _StatusLineProtocol(asyncio.Protocol):
    """Sends one request and resolves `status` with the response's status code."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.status: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.status.done():
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n")
        if end < 0:
            if len(self.buffer) > MAX_STATUS_LINE_BYTES:
                self.status.set_exception(HealthCheckFailed("status line too long"))
            return
        line = bytes(self.buffer[:end])
        # RFC 9112 section 4: status-line = HTTP-version SP status-code SP [reason-phrase]
        parts = line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            shown = line[:60].decode("latin-1")
            self.status.set_exception(HealthCheckFailed(f"not an HTTP response: {shown!r}"))
            return
        self.status.set_result(int(parts[1]))

    closed_early = "connection closed before a status line"

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.status.done():
            self.status.set_exception(HealthCheckFailed(self.closed_early))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if not self.status.done():
            self.status.cancel()


class _H2StatusProtocol(_StatusLineProtocol):
    """Sends one GET on a new HTTP/2 connection and resolves `status` with the status of
    its response (RFC 9113 section 8.3.2: the `:status` pseudo-header)."""

    closed_early = "connection closed before an HTTP/2 response (does it speak HTTP/2?)"

    def __init__(self, authority: str, path: str, scheme: str) -> None:
        super().__init__(b"")
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config)
        self.conn.initiate_connection()
        headers = [(":method", "GET"), (":scheme", scheme), (":authority", authority),
                   (":path", path), ("user-agent", USER_AGENT)]  # fmt: skip
        self.conn.send_headers(1, headers, end_stream=True)
        self.request = self.conn.data_to_send()

    def data_received(self, data: bytes) -> None:
        if self.status.done():
            return
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.status.set_exception(HealthCheckFailed(f"not an HTTP/2 answer: {exc}"))
            return
        for event in events:
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == 1:
                status = dict(event.headers or []).get(b":status", b"")
                if not status.isdigit():
                    self.status.set_exception(HealthCheckFailed("response without a status"))
                else:
                    self.status.set_result(int(status))
                return
            if isinstance(event, h2.events.StreamReset | h2.events.ConnectionTerminated):
                self.status.set_exception(HealthCheckFailed(f"refused: {type(event).__name__}"))
                return
        if self.transport is not None:
            self.transport.write(self.conn.data_to_send())  # SETTINGS acknowledged


class _ConnectProtocol(asyncio.Protocol):
    """Only connects (type: tcp)."""

    def __init__(self) -> None:
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport


def status_expected(status: int, expect: Sequence[tuple[int, int]]) -> bool:
    """Whether `status` is in one of the inclusive `expect` ranges."""
    return any(low <= status <= high for low, high in expect)


async def check_endpoint(
    endpoint: EndpointConfig,
    config: HealthCheckConfig,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    *,
    http2: bool = False,
) -> None:
    """Check `endpoint` once (see the module docstring).

    Raises:
        HealthCheckFailed: the check failed; its message says why.
    """
    host, port = endpoint.host, endpoint.port
    try:
        async with asyncio.timeout(config.timeout):
            if config.type == "tcp":
                connected = await open_connection(_ConnectProtocol, host, port, config.timeout)
                if connected.transport is not None:
                    connected.transport.close()
                return
            request = (
                f"GET {config.path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                f"User-Agent: {USER_AGENT}\r\nConnection: close\r\n\r\n"
            ).encode("latin-1")
            use_tls = tls if endpoint.scheme == "https" else None

            def status_protocol() -> _StatusLineProtocol:
                if http2:
                    return _H2StatusProtocol(f"{host}:{port}", config.path, endpoint.scheme)
                return _StatusLineProtocol(request)

            protocol = await open_connection(
                status_protocol,
                host,
                port,
                config.timeout,
                tls=use_tls,
                server_hostname=server_hostname if use_tls is not None else None,
            )
            try:
                status = await protocol.status
            finally:
                protocol.close()
    except TimeoutError:
        raise HealthCheckFailed(f"no answer within {config.timeout:g}s") from None
    except ProxyError as exc:  # connect refused, unreachable, TLS refused
        raise HealthCheckFailed(exc.message) from None
    if not status_expected(status, config.expect):
        raise HealthCheckFailed(f"status {status}")


class HealthChecker:
    """The active checks of one upstream's endpoints, in one task.

    `on_change` is called after an endpoint's `healthy` flipped (the upstream refreshes
    what is in rotation). `check` runs one check of an endpoint and raises
    HealthCheckFailed when it fails (tests give a scripted one); `random` draws the
    jitter."""

    def __init__(
        self,
        upstream: str,
        config: HealthCheckConfig,
        endpoints: Sequence[EndpointState],
        on_change: Callable[[], None],
        check: Callable[[EndpointState], Awaitable[None]] | None = None,
        *,
        tls: ssl.SSLContext | None = None,
        server_hostname: Callable[[EndpointState], str | None] | None = None,
        http2: bool = False,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.upstream = upstream
        self.config = config
        self.endpoints = endpoints
        self.on_change = on_change
        self._tls = tls
        self._server_hostname = server_hostname
        self._http2 = http2  # the upstream speaks h2 or h2c: so do the checks
        self._check = check or self._check_endpoint
        self._random = rng
        # Per endpoint: passed checks in a row (> 0) or failed ones (< 0).
        self.streaks = [0] * len(endpoints)
        self.rounds = 0
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        task = self._task
        running = task is not None and not task.done() and not task.cancelling()
        state = "RUNNING" if running else "STOPPED"
        healthy = sum(1 for e in self.endpoints if e.healthy)
        return (
            f"<HealthChecker {self.upstream} {state} healthy={healthy}/{len(self.endpoints)}"
            f" rounds={self.rounds}>"
        )

    def start(self) -> None:
        """Start checking (in the running loop); a second call does nothing."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"health-check {self.upstream}"
            )

    def cancel(self) -> None:
        """Stop checking now; `aclose` waits for the task to end."""
        if self._task is not None:
            self._task.cancel()

    async def aclose(self) -> None:
        """Stop checking and wait until the task has ended."""
        task = self._task
        if task is None:
            return
        task.cancel()
        await asyncio.wait([task])

    def delay(self) -> float:
        """Seconds until the next round: `interval` give or take `jitter` of it."""
        config = self.config
        return config.interval * (1.0 + config.jitter * (2.0 * self._random() - 1.0))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        config = self.config
        await asyncio.sleep(config.interval * config.jitter * self._random())
        while True:
            started = loop.time()
            await self.check_round()
            await asyncio.sleep(max(0.0, started + self.delay() - loop.time()))

    async def check_round(self) -> None:
        """Check every endpoint once, at the same time, and apply the results."""
        self.rounds += 1
        results = await asyncio.gather(
            *(self._check(endpoint) for endpoint in self.endpoints), return_exceptions=True
        )
        changed = False
        for endpoint, result in zip(self.endpoints, results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, HealthCheckFailed):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                log.error(
                    "bug while health checking %s endpoint %s",
                    self.upstream,
                    endpoint.label,
                    exc_info=result,
                )
                result = HealthCheckFailed(f"bug: {result!r}")
            changed |= self.record(endpoint, result)
        if changed:
            self.on_change()

    def record(self, endpoint: EndpointState, failure: BaseException | None) -> bool:
        """Apply one check's result (`failure` None: passed); True when `healthy` flipped."""
        count_health_check(self.upstream, endpoint.label, failure is None)
        index = endpoint.index
        streak = self.streaks[index]
        config = self.config
        if failure is None:
            streak = streak + 1 if streak > 0 else 1
            self.streaks[index] = streak
            if not endpoint.healthy and streak >= config.healthy_threshold:
                endpoint.healthy = True
                log.info(
                    "upstream %s endpoint %s healthy again: %d checks passed in a row",
                    self.upstream,
                    endpoint.label,
                    streak,
                )
                return True
            return False
        streak = streak - 1 if streak < 0 else -1
        self.streaks[index] = streak
        log.debug(
            "upstream %s endpoint %s health check failed: %s",
            self.upstream,
            endpoint.label,
            failure,
        )
        if endpoint.healthy and -streak >= config.unhealthy_threshold:
            endpoint.healthy = False
            log.info(
                "upstream %s endpoint %s unhealthy: %s", self.upstream, endpoint.label, failure
            )
            return True
        return False

    async def _check_endpoint(self, endpoint: EndpointState) -> None:
        hostname = self._server_hostname(endpoint) if self._server_hostname else None
        await check_endpoint(
            endpoint.pool.endpoint, self.config, self._tls, hostname, http2=self._http2
        )
