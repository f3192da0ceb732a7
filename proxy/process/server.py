"""One worker's server: listeners, the timeout sweeper, graceful drain.

The process side (forking workers, restarting them, signals to the parent) lives in
`proxy/process/supervisor.py`; this module is what runs inside each worker, and what tests start
in-process.

Reload is two steps, so that every worker switches or none does: `prepare_reload` builds
the new Runtime and binds the new listeners beside the running ones (anything that can
fail happens here), then `commit_reload` swaps them in between two events of the loop,
or `abort_reload` throws them away. Exchanges already running finish on the Runtime they
started with; WebSocket tunnels on routes that still exist are not touched, and those on
routes that are gone get the grace period, then a 1001 close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from metrics.definitions import TunnelClose
from metrics.live import attach_source
from metrics.traffic import forget_series, set_enabled
from middleware.chain import MiddlewareStartFailed
from proxy.codec.h1 import resolve_codec
from proxy.config.model import Config, ListenerConfig
from proxy.exchange.dispatch import Start
from proxy.exchange.runtime import Runtime
from proxy.frontend.certificates import Certificate, CertificateSet, TlsSettings
from proxy.frontend.connection import ClientConnection
from proxy.frontend.listener import AcceptingServer, create_accepting_server
from proxy.frontend.select import plaintext_front_end, tls_front_end
from proxy.process.acme_serving import AcmeServing
from proxy.process.gauges import ServerGauges
from proxy.websocket.tunnel import Tunnel

log = logging.getLogger(__name__)

# The sweeper ticks at a quarter of the shortest timeout, within these bounds: timeouts
# are enforced to within ~25% without a timer per request.
MIN_SWEEP_INTERVAL_S = 0.01
MAX_SWEEP_INTERVAL_S = 1.0
LISTEN_BACKLOG = 1024
# After the grace period: how long WebSocket tunnels get to deliver their 1001 close frames.
TUNNEL_GOING_AWAY_S = 1.0


# What a Server's connections call to start an exchange, built from its Runtime: normally
# its dispatcher's `start`; the test kit (proxy/testing/trace.py) wraps it to mark answers.
EntryPoint = Callable[[Runtime], Start]


def runtime_entry_point(runtime: Runtime) -> Start:
    return runtime.dispatcher.start


class ReloadRefused(Exception):
    """A reload could not be prepared; `errors` says why, one line each."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


# A bound listener: asyncio's own server, or one that reads PROXY headers first.
Listening = asyncio.Server | AcceptingServer


@dataclass
class _PendingReload:
    config: Config
    runtime: Runtime
    bound: dict[ListenerConfig, Listening] = field(default_factory=dict)
    removed: list[ListenerConfig] = field(default_factory=list)
    # Listeners whose address an old one holds (no SO_REUSEPORT): bound at commit, after
    # the old one closes.
    deferred: list[ListenerConfig] = field(default_factory=list)


class Server:
    """Serves one Config on its listeners (one worker's share of the traffic)."""

    def __init__(self, config: Config, entry_point: EntryPoint = runtime_entry_point) -> None:
        self.config = config
        self.codec = resolve_codec(config.http1_parser)
        self.limits = config.limits
        self.http2 = config.http2
        self.path_normalization = config.path_normalization
        self.headers_with_underscores = config.headers_with_underscores
        self.runtime = Runtime(config, self.codec)
        self._entry_point = entry_point
        self.start_exchange = entry_point(self.runtime)
        self.client_ip = self.runtime.client_ip
        self.connections: set[ClientConnection] = set()
        self._gauges = ServerGauges(self)  # what metrics/live.py reads when scraped
        self.tunnels: set[Tunnel] = set()  # WebSocket tunnels (their sockets left `connections`)
        self.draining = False
        self.addresses: list[tuple[str, int]] = []
        self._listening: dict[ListenerConfig, Listening] = {}
        # Each TLS listener's certificates (proxy/frontend/certificates.py), bound or
        # being bound by a reload.
        self.certificate_sets: dict[ListenerConfig, CertificateSet] = {}
        self.acme = AcmeServing()  # certificates and challenges of `tls.acme` listeners
        self._reuse_port = False
        self._pending: _PendingReload | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self.reloads = 0  # reloads committed in this process
        self._sweeper: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self._all_closed = asyncio.Event()

    def __repr__(self) -> str:
        state = "DRAINING" if self.draining else "SERVING"
        return f"<Server {state} listeners={self.addresses} connections={len(self.connections)}>"

    async def start(self, *, reuse_port: bool = False) -> None:
        """Bind every listener and start the sweeper.

        Raises:
            OSError: a listener could not bind (address in use, permission).
            Exception: what a middleware's start() hook raised, with a note naming it.
        """
        self._reuse_port = reuse_port
        for listener in self.config.listeners:
            self._listening[listener] = await self._bind(listener)
        self._note_addresses()
        try:
            await self.runtime.start()
        except MiddlewareStartFailed as exc:
            # Its own exception, so that a worker that cannot reach a backend at start-up
            # stops as one that cannot bind does (OSError: EXIT_START).
            exc.cause.add_note(str(exc))
            raise exc.cause from None
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())
        attach_source(self._gauges, self.runtime.config.metrics.enabled)

    async def _bind(self, listener: ListenerConfig, *, serve: bool = True) -> Listening:
        """A listening socket for `listener` (accepting at once unless `serve` is false)."""
        context = self._tls_context(listener)
        front_end = tls_front_end if context is not None else plaintext_front_end
        server: Listening
        peeks = AcmeServing.peeks(listener)
        if listener.proxy_protocol or peeks:
            server = await create_accepting_server(
                self,
                listener,
                context,
                front_end,
                reuse_port=self._reuse_port,
                backlog=LISTEN_BACKLOG,
                start_serving=serve,
                choose_context=self.acme.choose_context if peeks else None,
            )
        else:
            server = await asyncio.get_running_loop().create_server(
                lambda: ClientConnection(self, listener, front_end),
                listener.host,
                listener.port,
                reuse_address=True,
                reuse_port=self._reuse_port or None,
                backlog=LISTEN_BACKLOG,
                ssl=context,
                start_serving=serve,
            )
        host, port = server.sockets[0].getsockname()[:2]
        scheme = "https" if context is not None else "http"
        protocols = "HTTP/1.1" + (" and HTTP/2" if listener.http2 else "")
        if listener.proxy_protocol:
            protocols = f"PROXY protocol, then {protocols}"
        log.info(
            "listening on %s://%s:%d (%s: %s, %s codec)",
            *(scheme, host, port, listener.name, protocols, self.codec),
        )
        return server

    def _note_addresses(self) -> None:
        """`addresses` in the config's listener order (what tests and logs read)."""
        self.addresses = [
            server.sockets[0].getsockname()[:2]
            for listener in self.config.listeners
            if (server := self._listening.get(listener)) is not None and server.sockets
        ]

    def _tls_context(self, listener: ListenerConfig) -> ssl.SSLContext | None:
        """The listener's server context, which hands each handshake to the context of
        the certificate for the name the client sent (proxy/frontend/certificates.py).

        Raises:
            OSError, ssl.SSLError: a certificate cannot be loaded.
        """
        tls = listener.tls
        if tls is None:
            return None
        pairs = [(item.cert, item.key) for item in tls.certificates]
        certificates = CertificateSet(TlsSettings.of(tls, listener.http2), pairs)
        self.certificate_sets[listener] = certificates
        if tls.acme is not None:
            self.acme.attach(listener, certificates)
        return certificates.context

    def reload_certificates(self) -> None:
        """Re-read every listener's certificate and key files: new handshakes use them,
        connections already open keep theirs (how a renewed certificate goes live).
        Every file is read before any is served, so all listeners switch or none does.

        Raises:
            ssl.SSLError, OSError: a file is missing or a pair does not load; every
                listener keeps the certificates it had.
        """
        reloaded: list[tuple[CertificateSet, tuple[Certificate, ...]]] = [
            (certificates, certificates.prepare_reload())
            for listener, certificates in self.certificate_sets.items()
            if listener in self._listening
        ]
        for certificates, loaded in reloaded:
            certificates.install(loaded)

    def apply_acme(self, state: dict[str, Any]) -> list[str]:
        """Take the supervisor's ACME state: challenges to answer, and certificates to
        load again from storage (proxy/process/acme_serving.py); what failed to load."""
        return self.acme.apply(state, self.runtime.http01_tokens)

    async def purge_caches(self, middleware: str, key: str, prefix: str | None) -> dict[str, Any]:
        """The admin API's cache purge in this worker: each `cache` instance (or the one
        named `middleware`) forgets `key`, or every key under `prefix`. Per instance, how
        many entries went, or why it failed."""
        results: dict[str, Any] = {}
        seen: set[int] = set()
        for spec in self.runtime.middleware():
            purge = getattr(spec.instance, "purge_cache", None)
            if purge is None or id(spec.instance) in seen:
                continue
            seen.add(id(spec.instance))
            if middleware and spec.name != middleware:
                continue
            try:
                results[spec.name] = int(await purge(key, prefix))
            except Exception as exc:  # a Redis failure: reported, not raised
                results[spec.name] = f"{type(exc).__name__}: {exc}"
        return results

    # -- reload ------------------------------------------------------------------------
    async def prepare_reload(self, config: Config) -> None:
        """Build everything `config` needs beside what is running (step 1 of 2).

        Raises:
            ReloadRefused: a new listener cannot bind, or a middleware cannot start; the
                running config is untouched.
        """
        if self._pending is not None:
            await self.abort_reload()
        if self.draining:
            raise ReloadRefused([f"{config.source}:1: draining: a reload is not taken any more"])
        runtime = Runtime(config, resolve_codec(config.http1_parser), previous=self.runtime)
        pending = _PendingReload(config, runtime)
        pending.removed = [old for old in self._listening if old not in config.listeners]
        held = {(old.host, old.port) for old in pending.removed}
        # Each refusal names the file and the line to blame (line 1 when none is).
        source = config.source
        try:
            for listener in config.listeners:
                if listener in self._listening:
                    continue
                if not self._reuse_port and (listener.host, listener.port) in held:
                    pending.deferred.append(listener)
                    continue
                try:
                    pending.bound[listener] = await self._bind(listener, serve=False)
                except (OSError, ssl.SSLError) as exc:
                    where = f"{listener.host}:{listener.port}"
                    raise ReloadRefused(
                        [
                            f"{source}:{listener.line}: cannot start the new config: "
                            f"{listener.name}: cannot listen on {where}: {exc}"
                        ]
                    ) from None
            await runtime.start()
        except ReloadRefused:
            await self._discard(pending)
            raise
        except MiddlewareStartFailed as exc:
            await self._discard(pending)
            line = exc.spec.line
            raise ReloadRefused([f"{source}:{line}: cannot start the new config: {exc}"]) from None
        except (OSError, ssl.SSLError) as exc:
            await self._discard(pending)
            raise ReloadRefused([f"{source}:1: cannot start the new config: {exc}"]) from None
        except Exception as exc:
            log.exception("bug while preparing a reload")
            await self._discard(pending)
            raise ReloadRefused([f"{source}:1: cannot start the new config: {exc!r}"]) from None
        self._pending = pending

    async def commit_reload(self) -> None:
        """Switch to the prepared config (step 2 of 2): new exchanges see it at once."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        old = self.runtime
        config = self.config = pending.config
        self.runtime = pending.runtime
        self.start_exchange = self._entry_point(self.runtime)
        self.client_ip = self.runtime.client_ip
        self.codec = self.runtime.codec
        self.limits = config.limits
        self.http2 = config.http2
        self.path_normalization = config.path_normalization
        self.headers_with_underscores = config.headers_with_underscores
        for listener in pending.removed:
            # Stops accepting; connections it accepted carry on until they end.
            self._listening.pop(listener).close()
            self.certificate_sets.pop(listener, None)
            self.acme.detach(listener)
        for listener, server in pending.bound.items():
            self._listening[listener] = server
            await server.start_serving()
        for listener in pending.deferred:
            try:
                self._listening[listener] = await self._bind(listener)
            except OSError as exc:
                log.error("reload: listener %s cannot bind: %s", listener.name, exc)
        self._note_addresses()
        try:
            self.reload_certificates()
        except (OSError, ssl.SSLError) as exc:
            log.error("reload: certificates not reloaded, the old ones stay: %s", exc)
        for name, upstream in self.runtime.upstreams.items():
            try:
                upstream.reload_client_certificate()
            except (OSError, ssl.SSLError) as exc:
                log.error("reload: upstream %s keeps its client certificate: %s", name, exc)
        self._drain_tunnels_of_removed_routes()
        removed = old.routes.keys() - self.runtime.routes.keys()
        if removed:
            loop = asyncio.get_running_loop()
            loop.call_later(config.grace_period, self._end_exchanges_of, removed)
        self._retire(old)
        # The series of routes and upstreams that are gone disappear from /metrics.
        endpoints = [
            (name, pool.label)
            for name, upstream in self.runtime.upstreams.items()
            for pool in upstream.all_pools
        ]
        forget_series(self.runtime.routes, self.runtime.upstreams, endpoints)
        set_enabled(config.metrics.enabled)
        self.reloads += 1
        log.info("reloaded %s: %d routes", config.source, len(config.routes))

    async def abort_reload(self) -> None:
        """Throw a prepared reload away; the running config carries on."""
        pending, self._pending = self._pending, None
        if pending is not None:
            await self._discard(pending)

    async def _discard(self, pending: _PendingReload) -> None:
        for server in pending.bound.values():
            server.close()
        for listener in pending.bound:
            self.certificate_sets.pop(listener, None)
            self.acme.detach(listener)
        await pending.runtime.discard(self.runtime)

    def _drain_tunnels_of_removed_routes(self) -> None:
        """Tunnels on a route that is gone (or no longer allows WebSocket) get the grace
        period to end on their own, then a 1001 close; the others are not touched."""
        routes = self.runtime.routes
        deadline = asyncio.get_running_loop().time() + self.config.grace_period
        for tunnel in self.tunnels:
            route = routes.get(tunnel.route)
            if route is None or not route.websocket.enabled:
                tunnel.drain_by(deadline)

    def _end_exchanges_of(self, removed: set[str]) -> None:
        """The grace period after a reload is over: exchanges still serving a route it
        removed (a long download, SSE, a gRPC stream) end; h2 resets the stream, h1
        closes the connection. A route a later reload brought back is spared."""
        gone = removed - self.runtime.routes.keys()
        for conn in list(self.connections) if gone else ():
            conn.routes_removed(gone)

    def _retire(self, old: Runtime) -> None:
        """Close what the old Runtime held and the new one does not. Its exchanges still
        running may use its middleware, so those close after the grace period."""
        successor = self.runtime

        async def retire() -> None:
            try:
                await asyncio.sleep(self.config.grace_period)
            finally:  # cancelled by shutdown: close at once
                await old.retire(successor)

        for name, upstream in old.upstreams.items():
            if successor.upstreams.get(name) is not upstream:
                upstream.close()  # idle connections now, busy ones as they are released
        task = asyncio.get_running_loop().create_task(retire())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def forget(self, conn: ClientConnection) -> None:
        """A client connection closed (or became a tunnel)."""
        self.connections.discard(conn)
        if not self.connections and not self.tunnels:
            self._all_closed.set()

    def tunnel_closed(self, tunnel: Tunnel) -> None:
        """A WebSocket tunnel ended."""
        self.tunnels.discard(tunnel)
        if not self.connections and not self.tunnels:
            self._all_closed.set()

    def _sweep_interval(self) -> float:
        limits = self.limits
        timeouts = [limits.header_timeout, limits.body_timeout, limits.keepalive_timeout]
        for upstream in self.config.upstreams.values():
            timeouts.append(upstream.timeouts.read)
            timeouts.append(upstream.pool.idle_timeout)
        for route in self.config.routes:
            websocket = route.websocket
            timeouts += [t for t in (websocket.idle_timeout, websocket.max_duration) if t]
        return min(MAX_SWEEP_INTERVAL_S, max(MIN_SWEEP_INTERVAL_S, min(timeouts) / 4))

    async def _sweep_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._sweep_interval())  # a reload may change the timeouts
            now = loop.time()
            # A bug in one timeout handler must not stop every other timeout.
            for conn in list(self.connections):
                try:
                    conn.expire(now)
                except Exception:
                    log.exception("bug while timing out %r", conn)
            for tunnel in list(self.tunnels):
                try:
                    tunnel.expire(now)
                except Exception:
                    log.exception("bug while timing out %r", tunnel)
            try:
                self.runtime.expire(now)
            except Exception:
                log.exception("bug while expiring upstream connections")

    async def shutdown(self, grace_period: float | None = None) -> None:
        """Stop accepting, let in-flight exchanges finish within the grace period, then
        close what is left. Idle keep-alive connections close at once; busy ones get
        `Connection: close` on their last response."""
        if self.draining:
            await self._stopped.wait()
            return
        self.draining = True
        grace = self.config.grace_period if grace_period is None else grace_period
        await self.abort_reload()
        for server in self._listening.values():
            server.close()
        for conn in list(self.connections):
            conn.begin_drain()
        if self.connections or self.tunnels:
            self._all_closed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._all_closed.wait()
        if self.tunnels:
            # WebSocket peers are told, at a frame boundary, that we are going away (1001),
            # and get a moment to read it before their sockets close.
            for tunnel in list(self.tunnels):
                tunnel.going_away(TunnelClose.SHUTDOWN)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TUNNEL_GOING_AWAY_S):
                    await self._all_closed.wait()
            for tunnel in list(self.tunnels):
                tunnel.abort()
        for conn in list(self.connections):
            conn.abort()
        if self.connections:
            await asyncio.sleep(0)
        if self._sweeper is not None:
            self._sweeper.cancel()
        for server in self._listening.values():
            await server.wait_closed()
        retiring = list(self._retiring)
        for task in retiring:
            task.cancel()  # what the replaced Runtimes still hold closes now
        await asyncio.gather(*retiring, return_exceptions=True)
        await self.runtime.aclose()
        self._stopped.set()
        log.info("stopped")
