"""What one Config compiles to: the route table, each route's chain and forwarder, the
upstreams with their pools, and the dispatcher that starts exchanges on them
(proxy/exchange/dispatch.py).

A reload builds a new Runtime and swaps it in; requests already running keep the one they
started with.
"""

from __future__ import annotations

from metrics.definitions import MIDDLEWARE_SECONDS
from metrics.traces import SpanExport
from middleware.chain import build_chain, close_all, start_all
from proxy.buildinfo import version
from proxy.config.model import Config, MiddlewareSpec, RouteConfig, TracingConfig
from proxy.core.canonical import spelling
from proxy.core.client_ip import ClientResolver
from proxy.core.errors import NoRoute
from proxy.core.models import Request, Response
from proxy.core.tracing import Tracer
from proxy.exchange.acme_http01 import Http01Responder, Http01Tokens, http01_hosts
from proxy.exchange.dispatch import Dispatcher, Handler
from proxy.exchange.eager import ChainEnd
from proxy.exchange.forward import Forwarder
from proxy.exchange.local_answers import LocalAnswer
from proxy.exchange.mirror import Mirror
from proxy.exchange.phased import PhasedChain, PhasedLink, offers_phases
from proxy.exchange.routing import RouteTable
from proxy.exchange.split import Split
from proxy.upstream.balancer import Upstream


class RouteRuntime:
    """A route's compiled state: its config and the handler its requests run through."""

    __slots__ = (
        "chain",
        "config",
        "eager",
        "forwarder",
        "handler",
        "identity_fields",
        "name",
        "phased",
        "split",
        "websocket",
    )

    def __init__(
        self,
        config: RouteConfig,
        forwarder: Forwarder | None,
        chain: tuple[MiddlewareSpec, ...] = (),
    ) -> None:
        self.config = config
        self.name = config.name
        self.forwarder = forwarder  # None: the route answers itself (`redirect`, `respond`)
        self.chain = chain  # global_middleware, then the route's own
        self.phased: PhasedChain | None = None
        # A split route's sides, each a RouteRuntime of its own (proxy/exchange/split.py);
        # the dispatcher runs a request as the side chosen. None: no split.
        self.split: Split | None = None
        if forwarder is None:
            # Rare answers, run in a task after the route's middleware like a forwarder.
            answer = LocalAnswer(config.redirect, config.respond)
            self.handler: Handler = build_chain(chain, answer) if chain else answer
            self.eager = False
        else:
            # No middleware: the forwarder itself, which the dispatcher recognises to start
            # the exchange synchronously (no EagerRun, no coroutine).
            self.handler = build_chain(chain, ChainEnd(forwarder)) if chain else forwarder
            # Run without a task when every middleware only ever awaits call_next (eager.py).
            self.eager = all(getattr(spec.instance, "EAGER", False) for spec in chain)
        # And as one function when every one offers phases too (phased.py).
        if forwarder is not None and chain and all(offers_phases(spec.instance) for spec in chain):
            end = ChainEnd(forwarder)
            links = [
                PhasedLink(
                    spec.instance,
                    MIDDLEWARE_SECONDS.labels(spec.name).observe,
                    build_chain(chain[index + 1 :], end, timed=True),
                )
                for index, spec in enumerate(chain)
            ]
            self.phased = PhasedChain(links, forwarder)
        self.websocket = config.websocket
        # The fields the chain sets for the upstream to believe: a client's copies, in any
        # spelling, are removed before the chain runs (middleware/base.py).
        self.identity_fields = frozenset(
            spelling(name)
            for spec in chain
            if (declared := getattr(spec.instance, "identity_headers", None)) is not None
            for name in declared()
        )


def _spec_key(spec: MiddlewareSpec) -> tuple[str, str, str]:
    return (spec.name, spec.type, spec.options)


def _kept_middleware(previous: Runtime | None) -> dict[tuple[str, str, str], MiddlewareSpec]:
    """The running instances a new Runtime may take over, by name, type and options."""
    if previous is None:
        return {}
    return {_spec_key(spec): spec for spec in previous.middleware() if spec.options}


def _tracer(config: TracingConfig | None, previous: Runtime | None) -> Tracer | None:
    """The `tracing:` section's Tracer; its export (thread and queue) is taken over from
    `previous` when the collector settings are the same."""
    if config is None:
        return None
    export: SpanExport | None = None
    if config.otlp_endpoint is not None:
        settings = (config.otlp_endpoint, config.headers, config.service_name)
        old = previous.tracer if previous is not None else None
        if old is not None and isinstance(old.sink, SpanExport) and old.sink.settings == settings:
            export = old.sink
        else:
            export = SpanExport(*settings, version())
    return Tracer(config.sample_ratio, config.parent_based, export)


async def _no_route(request: Request) -> Response:
    raise NoRoute(f"no route for {request.method} {request.path}")


class Runtime:
    """Everything one Config compiles to.

    Built from a reload, it takes over from `previous` what the reload left unchanged: an
    upstream whose config is equal keeps its pools (and their idle connections), and a
    middleware instance whose name, type and options are equal is kept as it runs (its
    rate-limit table, key cache, Redis client). `retire` then closes what was not kept.
    """

    def __init__(self, config: Config, codec: str, previous: Runtime | None = None) -> None:
        self.config = config
        self.codec = codec
        # Who the client of each request is (None: the connection's peer, no work at all).
        self.client_ip = ClientResolver(config.client_ip) if config.client_ip else None
        self.table = RouteTable(config.routes)
        kept_specs = _kept_middleware(previous)
        self.kept: set[int] = set()  # ids of the instances taken over from `previous`

        def chain(specs: tuple[MiddlewareSpec, ...]) -> tuple[MiddlewareSpec, ...]:
            taken = tuple(kept_specs.get(_spec_key(spec), spec) for spec in specs)
            self.kept.update(id(spec.instance) for spec in taken if _spec_key(spec) in kept_specs)
            return taken

        global_middleware = chain(config.global_middleware)
        # A request no route matches still passes through global_middleware (an access
        # log line, a request id, global auth before the 404), whose end answers 404.
        self.no_route: Handler | None = (
            build_chain(global_middleware, _no_route) if global_middleware else None
        )
        self._no_route_chain = global_middleware
        max_head = config.limits.max_head_bytes
        old_upstreams = previous.upstreams if previous is not None else {}
        self.upstreams: dict[str, Upstream] = {}
        self.new_upstreams: list[Upstream] = []  # built here, not taken over (start())
        for name, upstream in config.upstreams.items():
            old = old_upstreams.get(name)
            if (
                old is not None
                and previous is not None
                and old.config == upstream
                and (previous.codec, previous.config.limits.max_head_bytes) == (codec, max_head)
            ):
                self.upstreams[name] = old
                continue
            self.upstreams[name] = Upstream(upstream, codec, max_head)
            self.new_upstreams.append(self.upstreams[name])
        self.mirrors: list[Mirror] = []  # the routes' mirrors (built by _route)
        self.routes = {
            route.name: self._route(route, chain((*config.global_middleware, *route.middleware)))
            for route in config.routes
        }
        self.tracer = _tracer(config.tracing, previous)
        # The process's ACME HTTP-01 tokens, the same object from one Runtime to the next.
        self.http01_tokens: Http01Tokens = (
            previous.http01_tokens if previous is not None else Http01Tokens()
        )
        hosts = http01_hosts(config)
        http01 = Http01Responder(hosts, self.http01_tokens) if hosts else None
        self.dispatcher = Dispatcher(self.table, self.routes, self.no_route, self.tracer, http01)

    def _forwarder(self, route: RouteConfig, upstream: str) -> Forwarder:
        return Forwarder(
            self.upstreams[upstream],
            route.rewrite,
            self.config.limits.max_head_bytes,
            route.websocket,
            route.forward_raw_path,
            route.request_buffering,
        )

    def _route(self, route: RouteConfig, chain: tuple[MiddlewareSpec, ...]) -> RouteRuntime:
        """A route compiled; a split route's sides each get a forwarder (and a chain over
        the same middleware instances) of their own, all sharing the route's mirror."""
        if not route.upstream:
            return RouteRuntime(route, None, chain)
        mirror = None
        if route.mirror is not None:
            # The shadow's forwarder: the route's rewrite; bodies come whole (no buffering).
            shadow = Forwarder(
                self.upstreams[route.mirror.upstream],
                route.rewrite,
                self.config.limits.max_head_bytes,
                None,
                route.forward_raw_path,
                None,
            )
            mirror = Mirror(route.name, route.mirror, shadow)
            self.mirrors.append(mirror)
        names = [side.upstream for side in route.split.sides] if route.split else [route.upstream]
        sides = []
        for name in names:
            forwarder = self._forwarder(route, name)
            forwarder.mirror = mirror
            sides.append(RouteRuntime(route, forwarder, chain))
        if route.split is None:
            return sides[0]
        compiled = RouteRuntime(route, sides[0].forwarder, chain)
        compiled.split = Split(route.name, route.split, sides)
        return compiled

    def middleware(self) -> list[MiddlewareSpec]:
        """Every middleware instance in the chains (shared ones once per chain)."""
        specs = [spec for route in self.routes.values() for spec in route.chain]
        return [*self._no_route_chain, *specs]

    async def start(self) -> None:
        """Start the middleware that need the event loop (clients, refresh tasks); those
        taken over from the previous Runtime are running already. The same goes for the
        upstreams' active health checks."""
        await start_all(spec for spec in self.middleware() if id(spec.instance) not in self.kept)
        for upstream in self.new_upstreams:
            upstream.start_health()

    async def aclose(self) -> None:
        """Close idle upstream connections, the health checks and the middleware's
        resources."""
        self.close()
        for mirror in self.mirrors:
            mirror.cancel()  # copies still out: nobody waits for their answers
        for upstream in self.upstreams.values():
            await upstream.aclose_health()
        await close_all(self.middleware())
        await self._close_export(None)

    async def _close_export(self, successor: Runtime | None) -> None:
        """Send the queued spans and stop the export thread, unless `successor` took
        the export over."""
        export = self.tracer.sink if self.tracer is not None else None
        if not isinstance(export, SpanExport):
            return
        taken = successor.tracer.sink if successor is not None and successor.tracer else None
        if taken is not export:
            await export.aclose()

    async def discard(self, previous: Runtime) -> None:
        """A prepared reload was abandoned: close what this Runtime made that `previous`
        does not use (it was never swapped in, so no request ran on it)."""
        await self.retire(previous)

    async def retire(self, successor: Runtime) -> None:
        """This Runtime was replaced by `successor`: close the upstreams and middleware it
        does not use. Upstream pools close their idle connections now and the busy ones
        as their exchanges end; callers delay this for middleware, whose in-flight
        requests may still be using them."""
        for name, upstream in self.upstreams.items():
            if successor.upstreams.get(name) is not upstream:
                upstream.close()
                await upstream.aclose_health()
        kept = {id(spec.instance) for spec in successor.middleware()}
        await close_all(spec for spec in self.middleware() if id(spec.instance) not in kept)
        await self._close_export(successor)

    def expire(self, now: float) -> None:
        """Sweeper tick for every upstream pool."""
        for upstream in self.upstreams.values():
            upstream.expire(now)

    def close(self) -> None:
        """Close idle upstream connections."""
        for upstream in self.upstreams.values():
            upstream.close()
