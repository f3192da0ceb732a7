"""A whole gateway in the test's own event loop, on ephemeral ports, with the kit's
upstreams in place of the real services.

    gateway = await start_gateway("routes.yaml", fixtures={"users": users})
    async with gateway.client() as client:
        response = await client.get("/api/users/1")
    assert gateway.route_of(response) == "users"
    assert gateway.upstream_request(response).path == "/users/1"
    assert gateway.metric("gatehouse_requests_total", route="users", code="200") == 1

What changes from the file, so that the same routes.yaml runs in a test:
- every listener binds 127.0.0.1 on a free port (TLS and HTTP/2 settings stay), and the
  admin listener is always started, on 127.0.0.1 too;
- an endpoint whose host is the name of a kit upstream (`http://users:8080`, or just
  `http://users`) goes to that upstream, and `upstreams={"users": users}` sends every
  endpoint of the config's upstream `users` there: a production file needs no edit. Such
  an upstream speaks the kit upstream's protocol (http1 or h2c), over plain TCP;
- `workers` is ignored: one Server runs in this process (proxy/process/server.py), marked in test
  mode (proxy/testing/trace.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.metrics_core import Metric

from metrics.admin import AdminServer
from metrics.gateway import CONFIG_LAST_RELOAD_SUCCESS, CONFIG_RELOADS, record_certificates
from metrics.status_page import RequestRates, render_page
from proxy.config.document import ConfigError
from proxy.config.load import parse_config
from proxy.config.model import AdminConfig, Config
from proxy.config.upstream_model import EndpointConfig, UpstreamConfig
from proxy.config.view import config_view
from proxy.process.admin_views import (
    EndpointStates,
    certificates_view,
    middleware_view,
    purge_reply,
    routes_view,
    status_view,
    upstreams_view,
    with_expiry,
)
from proxy.process.gauges import ServerGauges
from proxy.process.server import ReloadRefused, Server
from proxy.testing.metrics import Baseline, current
from proxy.testing.trace import EXCHANGE_HEADER, Exchange, Tracer
from proxy.testing.upstream import ReceivedRequest, ScriptedUpstream

if TYPE_CHECKING:
    import httpx
    from websockets.asyncio.client import ClientConnection

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
DEFAULT_TIMEOUT_S = 10.0  # a client's timeouts: a hung test fails instead of hanging
SHUTDOWN_GRACE_S = 1.0


def read_source(source: str | Path) -> tuple[str, str]:
    """(YAML text, the name errors give): a Path, or a str without a newline, is a file;
    any other str is the YAML itself.

    Raises:
        ConfigError: the file cannot be read.
    """
    if isinstance(source, Path) or "\n" not in source:
        path = str(source)
        try:
            return Path(path).read_text(encoding="utf-8"), path
        except OSError as exc:
            raise ConfigError(
                [f"{path}: cannot read: {exc.strerror or exc} (YAML text needs a newline)"]
            ) from exc
    return source, "<test config>"


def config_for_test(
    text: str,
    source: str,
    *,
    fixtures: Mapping[str, ScriptedUpstream],
    upstreams: Mapping[str, ScriptedUpstream],
    env: Mapping[str, str] | None = None,
) -> Config:
    """The config `text` as the test gateway runs it (see the module docstring).

    Raises:
        ConfigError: the YAML is invalid, or `upstreams` names an upstream it lacks.
    """
    config = parse_config(text, source=source, env=env)
    missing = sorted(set(upstreams) - set(config.upstreams))
    if missing:
        raise ConfigError(
            [
                f"{source}: upstreams={{{missing[0]!r}: ...}} names no upstream of the config; "
                f"it has: {', '.join(sorted(config.upstreams))}"
            ]
        )
    listeners = tuple(replace(listener, host=LOOPBACK, port=0) for listener in config.listeners)
    redirected = {
        name: _redirect(upstream, fixtures, upstreams.get(name))
        for name, upstream in config.upstreams.items()
    }
    return replace(
        config, listeners=listeners, upstreams=redirected, admin=AdminConfig(LOOPBACK, 0)
    )


def _redirect(
    upstream: UpstreamConfig,
    fixtures: Mapping[str, ScriptedUpstream],
    instead: ScriptedUpstream | None,
) -> UpstreamConfig:
    """`upstream` with its endpoints pointed at kit upstreams where the test asks."""
    if instead is not None:
        return _speaking(upstream, (_endpoint_of(instead, weight=1),), {instead.protocol})
    if not any(endpoint.host in fixtures for endpoint in upstream.endpoints):
        return upstream
    protocols: set[str] = set()
    endpoints: list[EndpointConfig] = []
    for endpoint in upstream.endpoints:
        fixture = fixtures.get(endpoint.host)
        if fixture is None:
            endpoints.append(endpoint)
            continue
        protocols.add(fixture.protocol)
        endpoints.append(_endpoint_of(fixture, weight=endpoint.weight))
    return _speaking(upstream, tuple(endpoints), protocols)


def _speaking(
    upstream: UpstreamConfig, endpoints: tuple[EndpointConfig, ...], protocols: set[str]
) -> UpstreamConfig:
    if len(protocols) > 1:
        raise ConfigError(
            [
                f"upstreams.{upstream.name}: its endpoints go to kit upstreams speaking "
                f"{' and '.join(sorted(protocols))}; one upstream speaks one protocol"
            ]
        )
    # Addresses as written: nothing to re-resolve.
    return replace(upstream, endpoints=endpoints, protocol=protocols.pop(), resolve_interval=None)


def _endpoint_of(fixture: ScriptedUpstream, *, weight: int) -> EndpointConfig:
    return EndpointConfig(fixture.url, "http", fixture.host, fixture.port, weight)


class RunningGateway:
    """A started in-process gateway (see the module docstring); `await aclose()` ends it
    (the `gatehouse` fixture does)."""

    def __init__(
        self,
        source: str | Path,
        *,
        fixtures: Mapping[str, ScriptedUpstream] = {},
        upstreams: Mapping[str, ScriptedUpstream] = {},
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._source = source
        self._fixtures = dict(fixtures)
        self._upstreams = dict(upstreams)
        # Every kit upstream this gateway may send to, once each.
        self._kit = list({id(f): f for f in [*fixtures.values(), *upstreams.values()]}.values())
        self._env = env
        # The YAML running now, and the name its errors give (a path, or <test config>).
        self.text, self.source_name = read_source(source)
        self.config = config_for_test(
            self.text, self.source_name, fixtures=fixtures, upstreams=upstreams, env=env
        )
        self.tracer = Tracer()
        self.server = Server(self.config, entry_point=self.tracer)
        self._admin = AdminServer(_AdminApp(self))
        self._baseline = Baseline()
        self._clients: list[httpx.AsyncClient] = []
        self._websockets: list[ClientConnection] = []
        self._reload_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<RunningGateway {self.source_name} {self.urls}>"

    async def start(self) -> RunningGateway:
        """Bind the listeners and the admin listener, start the middleware.

        Raises:
            OSError: a listener cannot bind (a TLS file missing, say).
        """
        self._baseline = Baseline()
        try:
            await self.server.start()
            await self._admin.start(LOOPBACK, 0)
        except BaseException:
            # What did start (listeners bound before the one that failed) stops again.
            await self._admin.close()
            await self.server.shutdown(grace_period=0)
            raise
        return self

    async def aclose(self) -> None:
        """Close the clients still open, then drain and stop the gateway."""
        for client in self._clients:
            await client.aclose()
        for websocket in self._websockets:
            with contextlib.suppress(Exception):
                await websocket.close()
        await self._admin.close()
        await self.server.shutdown(grace_period=SHUTDOWN_GRACE_S)

    # -- where it listens ----------------------------------------------------------------
    @property
    def urls(self) -> dict[str, str]:
        """`http(s)://127.0.0.1:PORT` of each listener, by listener name."""
        return {
            listener.name: f"{'https' if listener.tls else 'http'}://{host}:{port}"
            for listener, (host, port) in zip(
                self.server.config.listeners, self.server.addresses, strict=True
            )
        }

    @property
    def url(self) -> str:
        """The first listener's URL."""
        return next(iter(self.urls.values()))

    @property
    def admin_url(self) -> str:
        assert self._admin.address is not None, "the gateway is not started"
        host, port = self._admin.address
        return f"http://{host}:{port}"

    # -- clients -------------------------------------------------------------------------
    def client(self, listener: str | None = None, **options: Any) -> httpx.AsyncClient:
        """An httpx client for a listener (the first by default); `http2=True` speaks h2c
        with prior knowledge. Closed with the gateway if the test did not close it."""
        import httpx

        base_url = self.urls[listener] if listener is not None else self.url
        if options.pop("http2", False):
            options.update(http1=False, http2=True)
        options.setdefault("timeout", DEFAULT_TIMEOUT_S)
        client = httpx.AsyncClient(base_url=base_url, **options)
        self._clients.append(client)
        return client

    def websocket(self, path: str, *, listener: str | None = None, **options: Any) -> Any:
        """`async with gateway.websocket("/chat") as ws:` a `websockets` client connection
        through the gateway (closed with the gateway if the test did not close it)."""
        from websockets.asyncio.client import connect

        base = self.urls[listener] if listener is not None else self.url
        url = "ws" + base.removeprefix("http") + path
        options.setdefault("open_timeout", DEFAULT_TIMEOUT_S)
        return _TrackedConnect(connect(url, **options), self._websockets)

    # -- what happened -------------------------------------------------------------------
    def exchange(self, response: Any) -> Exchange:
        """How the gateway handled the request `response` answers (an httpx response, or
        anything with `headers`): route, middleware chain, upstream, endpoint, retries."""
        exchange_id = response.headers.get(EXCHANGE_HEADER)
        if exchange_id is None:
            raise AssertionError(
                f"the response carries no {EXCHANGE_HEADER} header: it did not come from "
                f"this test gateway (status {getattr(response, 'status_code', '?')})"
            )
        try:
            return self.tracer.exchanges[exchange_id]
        except KeyError:
            raise AssertionError(f"exchange {exchange_id} is not one of this gateway's") from None

    def route_of(self, response: Any) -> str:
        """The name of the route that handled it ("" when none matched)."""
        return self.exchange(response).route

    def middleware_of(self, response: Any) -> tuple[str, ...]:
        """The middleware chain it went through, in order."""
        return self.exchange(response).middleware

    def upstream_requests(self, response: Any) -> list[ReceivedRequest]:
        """Every request the kit upstreams received for it (more than one after retries),
        in the order they arrived."""
        return self._received(self.exchange(response).id)

    def _received(self, exchange: str) -> list[ReceivedRequest]:
        received = [
            request
            for fixture in self._kit
            for request in fixture.requests
            if request.exchange == exchange
        ]
        return sorted(received, key=lambda request: request.received_at)

    def upstream_request(self, response: Any) -> ReceivedRequest:
        """The request a kit upstream received for it, as the gateway forwarded it (path
        after rewriting, headers added and removed); the last one after retries."""
        received = self.upstream_requests(response)
        if not received:
            exchange = self.exchange(response)
            where = f"route {exchange.route!r}" if exchange.route else "no route"
            chain = ", ".join(exchange.middleware)
            raise AssertionError(
                f"no kit upstream received {exchange.method} {exchange.path} "
                f"({where}, middleware: {chain or 'none'}; the gateway answered "
                f"{exchange.status} itself)"
            )
        return received[-1]

    def describe(self, last: int = 50) -> str:
        """What the gateway did, one line per exchange (the `last` ones): what the pytest
        plugin prints under a failed test."""
        exchanges = list(self.tracer.exchanges.values())
        lines = [f"{len(exchanges)} exchanges through {self.source_name} ({self.url})"]
        if len(exchanges) > last:
            lines.append(f"... the first {len(exchanges) - last} left out")
        for exchange in exchanges[-last:]:
            where = f"route {exchange.route}" if exchange.route else "no route"
            chain = ", ".join(exchange.middleware) or "no middleware"
            received = [f"{r.method} {r.target}" for r in self._received(exchange.id)]
            sent = (
                f"; {exchange.upstream} received {', '.join(received)}"
                if received
                else "; answered by the gateway"
            )
            lines.append(
                f"  #{exchange.id} {exchange.method} {exchange.path} -> {exchange.status} "
                f"({where}, {chain}{sent})"
            )
        return "\n".join(lines)

    def metric(self, name: str, **labels: str) -> float:
        """A metric's value summed over the series whose labels include `labels`;
        counters and histograms count from this gateway's start (proxy/testing/metrics.py).
        `gateway.metric("gatehouse_requests_total", route="users", code="200")`.

        Raises:
            LookupError: no such metric, or no such label on it.
        """
        return self._baseline.value(name, labels)

    async def scrape(self, *, openmetrics: bool = False) -> str:
        """GET /metrics from the admin listener, as Prometheus would."""
        accept = "application/openmetrics-text" if openmetrics else "text/plain"
        return (await self._admin_get("/metrics", accept)).decode()

    async def _admin_get(self, path: str, accept: str = "*/*") -> bytes:
        host, port = self._admin.address or ("", 0)
        reader, writer = await asyncio.open_connection(host, port)
        try:
            head = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: {accept}\r\n"
            writer.write(f"{head}Connection: close\r\n\r\n".encode())
            answer = await reader.read()
        finally:
            writer.close()
            await writer.wait_closed()
        return answer.partition(b"\r\n\r\n")[2]

    # -- reload --------------------------------------------------------------------------
    async def reload(self, source: str | Path | None = None) -> None:
        """Switch to `source` (the same file again when None) as SIGHUP would: requests
        running finish on the old config, new ones see the new one at once.

        Raises:
            ConfigError: the new YAML is invalid (the old config keeps serving).
            ReloadRefused: it is valid but cannot start (a listener cannot bind).
        """
        async with self._reload_lock:
            source = self._source if source is None else source
            try:
                text, name = read_source(source)
                config = config_for_test(
                    text, name, fixtures=self._fixtures, upstreams=self._upstreams, env=self._env
                )
                await self.server.prepare_reload(config)
            except (ConfigError, ReloadRefused):
                CONFIG_RELOADS.labels("failure").inc()
                raise
            await self.server.commit_reload()
            self.config = config
            self._source, self.text, self.source_name = source, text, name
            CONFIG_RELOADS.labels("success").inc()
            CONFIG_LAST_RELOAD_SUCCESS.set_to_current_time()
            record_certificates(config.tls_certificates())


class _AdminApp:
    """The admin listener's view of an in-process gateway (metrics.admin.AdminApp)."""

    def __init__(self, gateway: RunningGateway) -> None:
        self._gateway = gateway
        self._rates = RequestRates(time.monotonic())

    def ready(self) -> tuple[bool, str]:
        if self._gateway.server.draining:
            return False, "draining"
        return True, "ready: 1 in-process test gateway serving"

    async def metrics(self) -> list[Metric]:
        return current()

    def config_view(self) -> dict[str, Any]:
        gateway = self._gateway
        return config_view(gateway.text, gateway.source_name, gateway.config.concealed)

    def _states(self) -> list[EndpointStates]:
        return [ServerGauges(self._gateway.server).endpoint_states()]

    async def upstreams(self) -> list[dict[str, Any]]:
        return upstreams_view(self._gateway.config, current(), self._states())

    def routes(self) -> list[dict[str, Any]]:
        return routes_view(self._gateway.config, self.config_view())

    def middleware(self) -> list[dict[str, Any]]:
        return middleware_view(self._gateway.config, self.config_view())

    def certificates(self) -> list[dict[str, Any]]:
        return with_expiry(certificates_view(self._gateway.config), time.time())

    async def status_page(self) -> bytes:
        merged = current()
        status = status_view(
            self._gateway.config,
            self.config_view(),
            merged,
            self._states(),
            self.certificates(),
            generation=0,
        )
        return render_page(status, self._rates.observe(merged), time.time())

    async def purge_cache(
        self, middleware: str, key: str, prefix: str | None
    ) -> tuple[int, dict[str, Any]]:
        try:
            reply: object = {
                "ok": True,
                "purged": await self._gateway.server.purge_caches(middleware, key, prefix),
            }
        except Exception as exc:  # a bug: answered as a failed worker would be
            reply = exc
        return purge_reply(middleware, [("the in-process gateway", reply)])

    async def reload(self, reason: str) -> tuple[bool, list[str]]:
        try:
            await self._gateway.reload()
        except ConfigError as exc:
            return False, exc.errors
        except ReloadRefused as exc:
            return False, exc.errors
        return True, []


class _TrackedConnect:
    """`websockets.connect(...)` that tells the gateway about the connection it opens."""

    def __init__(self, connect: Any, opened: list[ClientConnection]) -> None:
        self._connect = connect
        self._opened = opened

    async def __aenter__(self) -> ClientConnection:
        connection: ClientConnection = await self._connect.__aenter__()
        self._opened.append(connection)
        return connection

    async def __aexit__(self, *exc_info: Any) -> None:
        await self._connect.__aexit__(*exc_info)

    def __await__(self) -> Any:
        return self._open().__await__()

    async def _open(self) -> ClientConnection:
        connection: ClientConnection = await self._connect
        self._opened.append(connection)
        return connection


@contextlib.asynccontextmanager
async def running_gateway(
    source: str | Path,
    *,
    fixtures: Mapping[str, ScriptedUpstream] = {},
    upstreams: Mapping[str, ScriptedUpstream] = {},
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[RunningGateway]:
    """`async with running_gateway(...) as gateway:` outside pytest fixtures."""
    gateway = await RunningGateway(source, fixtures=fixtures, upstreams=upstreams, env=env).start()
    try:
        yield gateway
    finally:
        await gateway.aclose()
