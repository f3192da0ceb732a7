"""Active health checks (`upstreams.X.health_check`): one task per upstream, per worker.

Every worker checks on its own (as nginx plus does): no state is shared, and the
`gatehouse_upstream_healthy` gauge is merged across workers by `min`. Each round checks
every endpoint at once, each check bounded by `timeout`; rounds start `interval` apart,
give or take `jitter` (a fraction of the interval, drawn anew each round, so workers and
upstreams drift apart instead of probing in step). The first round runs within
`jitter * interval` of the start.

- `type: http`: one GET of `path` on a fresh connection, through the gateway's own client
  (fetch.py) in the upstream's protocol: HTTP/1.1 with `Host: host:port` and
  `Connection: close` for http1 upstreams, a stream on an HTTP/2 connection (prior
  knowledge for h2c, ALPN h2 for h2) for the others; TLS for https:// endpoints with the
  upstream's trust settings and SNI. Only the status is read (the body is not: the
  connection closes). It passes when the status is in one of the `expect` ranges.
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
from typing import TYPE_CHECKING

from metrics.traffic import count_health_check
from proxy.config.model import DEFAULT_MAX_HEAD_BYTES
from proxy.config.upstream_model import EndpointConfig, HealthCheckConfig
from proxy.core.errors import ProxyError, UpstreamProtocolError, UpstreamReset, UpstreamTimeout
from proxy.upstream.fetch import FetchUrl, fetch
from proxy.upstream.transport import open_connection

if TYPE_CHECKING:
    from proxy.upstream.balancer import EndpointState

log = logging.getLogger(__name__)

USER_AGENT = "gatehouse-health-check"
# What the codec says about a malformed response starts with this (proxy/upstream/h1.py).
_MALFORMED = "malformed response: "


class HealthCheckFailed(Exception):
    """One check failed; the message says why (logged when the endpoint leaves)."""


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
    codec: str = "auto",
    max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES,
) -> None:
    """Check `endpoint` once (see the module docstring). `tls` and `server_hostname`
    apply to an https:// endpoint; `codec` and `max_head_bytes` parse an HTTP/1.1 answer.

    Raises:
        HealthCheckFailed: the check failed; its message says why.
    """
    host, port = endpoint.host, endpoint.port
    if config.type == "tcp":
        try:
            async with asyncio.timeout(config.timeout):
                connected = await open_connection(_ConnectProtocol, host, port, config.timeout)
        except TimeoutError:
            raise HealthCheckFailed(f"no answer within {config.timeout:g}s") from None
        except ProxyError as exc:  # connect refused, unreachable
            raise HealthCheckFailed(exc.message) from None
        if connected.transport is not None:
            connected.transport.close()
        return
    bracketed = f"[{host}]" if ":" in host else host
    url = FetchUrl(
        endpoint.scheme, host, port, config.path.encode("latin-1"), f"{bracketed}:{port}"
    )
    try:
        answer = await fetch(
            "GET",
            url,
            [("User-Agent", USER_AGENT)],
            timeout_s=config.timeout,
            max_body=0,  # the status is all a check reads
            tls=tls,
            sni=server_hostname,
            http2=http2,
            codec=codec,
            max_head_bytes=max_head_bytes,
        )
    except UpstreamTimeout:
        raise HealthCheckFailed(f"no answer within {config.timeout:g}s") from None
    except ProxyError as exc:  # connect refused, unreachable, TLS refused, a bad answer
        raise HealthCheckFailed(_failure(exc, http2)) from None
    except ValueError as exc:  # a path the request line cannot carry
        raise HealthCheckFailed(f"cannot send the check: {exc}") from None
    if not status_expected(answer.status, config.expect):
        raise HealthCheckFailed(f"status {answer.status}")


def _failure(error: ProxyError, http2: bool) -> str:
    """Why a check failed, from the error the client raised."""
    if http2:
        if isinstance(error, UpstreamProtocolError):
            return f"not an HTTP/2 answer: {error.message}"
        return error.message
    if isinstance(error, UpstreamReset):
        return "connection closed before a status line"
    if isinstance(error, UpstreamProtocolError):
        return f"not an HTTP response: {error.message.removeprefix(_MALFORMED)}"
    return error.message


class HealthChecker:
    """The active checks of one upstream's endpoints, in one task.

    `on_change` is called after an endpoint's `healthy` flipped (the upstream refreshes
    what is in rotation). `check` runs one check of an endpoint and raises
    HealthCheckFailed when it fails (tests give a scripted one); `random` draws the
    jitter. `tls`, `server_hostname`, `http2`, `codec` and `max_head_bytes` are the
    upstream's, so that a check talks to an endpoint as forwarding does."""

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
        codec: str = "auto",
        max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.upstream = upstream
        self.config = config
        self.endpoints = endpoints
        self.on_change = on_change
        self._tls = tls
        self._server_hostname = server_hostname
        self._http2 = http2  # the upstream speaks h2 or h2c: so do the checks
        self._codec = codec  # an http1 upstream's answers are parsed as the forwarder does
        self._max_head_bytes = max_head_bytes
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
            endpoint.pool.endpoint,
            self.config,
            self._tls,
            hostname,
            http2=self._http2,
            codec=self._codec,
            max_head_bytes=self._max_head_bytes,
        )
