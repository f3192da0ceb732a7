"""`rate_limit`: GCRA per key, in a table shared by the workers (`local`) or in Redis.

A client may send `burst + 1` requests at once, then one every `period / requests` of the
`rate` (`rate: 10/min, burst: 9`: ten at once, then one every 6s; ten again after a
minute of silence). The key says whose budget a request spends: the client's IP (`ip`),
a request header (`header:X-API-Key`), the consumer an auth middleware earlier in the
chain found (`consumer`), or the route (`route`: one budget for everyone on it). A header
or consumer that is absent falls back to the client's IP, so leaving it out does not
escape the limit. A named instance used by several routes is one budget.

An allowed request goes on, and its response gets `RateLimit-Limit`, `RateLimit-Remaining`
and `RateLimit-Reset` (draft-ietf-httpapi-ratelimit-headers; integer seconds) unless
`headers: false` (the gateway's replace any the upstream sent). A refused one gets a 429
local reply with those headers, whatever `headers` says, and `Retry-After` (whole
seconds, rounded up, at least 1). When the backend cannot decide
(Redis down or slow), `on_redis_error: allow` lets the request through without headers
and `deny` answers 503; the backend logs the outage once, not per request. Every
decision counts in `gatehouse_rate_limit_decisions_total{middleware,result}`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from hashlib import blake2b
from typing import TYPE_CHECKING, ClassVar, Protocol

from metrics.definitions import RATE_LIMIT_DECISIONS, RATE_LIMIT_EVICTIONS
from middleware.rate_limit_core import Decision, RateLimitBackendError, whole_seconds
from middleware.rate_limit_local import (
    DEFAULT_MAX_KEYS,
    MAX_MAX_KEYS,
    LocalBackend,
    SharedTableError,
)
from proxy import (
    ConfigValueError,
    Handler,
    Option,
    Options,
    Pending,
    RateLimited,
    RateLimitUnavailable,
    Request,
    Response,
    local_reply,
)

if TYPE_CHECKING:
    from middleware.rate_limit_redis import RedisBackend  # imported only when configured

DEFAULT_REDIS_TIMEOUT_S = 0.05
REDIS_KEY_PREFIX = "gatehouse:rate_limit:"  # + instance name + ":" + key

_RATE_UNITS_S = {
    "s": 1,
    "sec": 1,
    "second": 1,
    "m": 60,
    "min": 60,
    "minute": 60,
    "h": 3600,
    "hour": 3600,
    "d": 86400,
    "day": 86400,
}
_RATE_RE = re.compile(r"(\d+)\s*/\s*(\d*)\s*([a-z]+)")
_RATE_FORMS = "e.g. '100/s', '1000/min', '10/h', '5/10s'; units s, m or min, h, d"
# RFC 9110 section 5.6.2: a header name is a token.
_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_KEY_FORMS = "'ip', 'header:NAME', 'consumer' or 'route'"


@dataclass(frozen=True, slots=True)
class Rate:
    """`requests` per `period_s`."""

    requests: int
    period_s: float

    @property
    def emission_s(self) -> float:
        """The spacing of requests at this rate."""
        return self.period_s / self.requests


def parse_rate(text: str) -> Rate:
    """`100/s`, `1000/min`, `10/h`, `5/10s` (five per ten seconds), `1/d`.

    Raises:
        ConfigValueError: not such a rate, or zero requests or a zero period.
    """
    match = _RATE_RE.fullmatch(text.strip().lower())
    unit = _RATE_UNITS_S.get(match.group(3)) if match else None
    if match is None or unit is None:
        raise ConfigValueError(f"invalid rate {text!r} ({_RATE_FORMS})")
    requests, count = int(match.group(1)), int(match.group(2) or 1)
    if requests == 0 or count == 0:
        raise ConfigValueError(f"invalid rate {text!r}: must allow at least one request")
    return Rate(requests, float(count * unit))


@dataclass(frozen=True, slots=True)
class KeySpec:
    """What a request's budget is keyed on: `kind` ip|header|consumer|route."""

    kind: str
    header: str = ""


def parse_key(text: str) -> KeySpec:
    """`ip`, `header:NAME`, `consumer` or `route`.

    Raises:
        ConfigValueError: anything else, or a header name that is not a token.
    """
    if text in ("ip", "consumer", "route"):
        return KeySpec(text)
    kind, colon, name = text.partition(":")
    if kind == "header" and colon:
        if not _TOKEN_RE.fullmatch(name):
            raise ConfigValueError(f"invalid header name {name!r} in key {text!r}")
        return KeySpec("header", name)
    raise ConfigValueError(f"invalid key {text!r} (expected {_KEY_FORMS})")


def key_function(spec: KeySpec) -> Callable[[Request], str]:
    """The request -> key function for `spec`. An absent header or consumer falls back
    to the client's IP; the prefixes keep the two spaces apart."""
    if spec.kind == "ip":
        return lambda request: request.client[0]
    if spec.kind == "route":
        return lambda request: request.exchange.route_name
    if spec.kind == "consumer":
        return lambda request: (
            "c:" + request.consumer if request.consumer else "ip:" + request.client[0]
        )
    name = spec.header

    def by_header(request: Request) -> str:
        value = request.header(name)  # keeps raw headers raw (no CIMultiDict built)
        return "h:" + value if value else "ip:" + request.client[0]

    return by_header


def local_table_key(path: str, rate: Rate, burst: int, key: KeySpec, max_keys: int) -> str:
    """What names an instance's local table in the shared directory, so that every process
    constructing the same instance opens the same one: where the instance is defined
    (`middleware.NAME`; an inline entry is `routes[i].middleware[j]`, as all of those are
    named after their type) and a digest of the options that give the records their
    meaning (rate, burst, key, max_keys). A reload changing one of them starts a fresh
    table; `headers` (and anything else) leaves it as it is."""
    meaning = f"{rate.requests}/{rate.period_s!r} {burst} {key.kind}:{key.header} {max_keys}"
    return f"{path}:{blake2b(meaning.encode(), digest_size=8).hexdigest()}"


class Backend(Protocol):
    """Where GCRA state lives (rate_limit_local.LocalBackend, rate_limit_redis.RedisBackend)."""

    async def decide(self, key: str, emission_s: float, tolerance_s: float) -> Decision: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class RateLimit:
    """Admit requests at `rate` with `burst` per key; 429 beyond."""

    REDIS_OPTIONS: ClassVar[dict[str, Option]] = {
        "url": Option.string("redis://host:port/db or rediss://...", required=True),
        "timeout": Option.duration(
            "a decision slower than this is a Redis error", DEFAULT_REDIS_TIMEOUT_S, True
        ),
        "on_redis_error": Option.choice(
            ("allow", "deny"), "what a Redis error does to the request (deny: 503)", "allow"
        ),
    }
    OPTIONS: ClassVar[dict[str, Option]] = {
        "rate": Option.raw(
            "requests admitted per period: 100/s, 1000/min, 10/h, 5/10s (units s, m or min, h, d)",
            {"type": "string", "pattern": r"^\s*\d+\s*/"},
        ),
        "burst": Option.integer("requests beyond the rate admitted at once", 0),
        "key": Option.raw(
            "what is limited: ip, header:NAME, consumer or route",
            {
                "anyOf": [
                    {"enum": ["ip", "consumer", "route"]},
                    {"type": "string", "pattern": "^header:."},
                ]
            },
            "ip",
        ),
        "backend": Option.choice(
            ("local", "redis"), "one table per host, or shared through Redis", "local"
        ),
        "redis": Option.mapping(REDIS_OPTIONS, "the Redis backend (backend: redis)"),
        "headers": Option.boolean("send RateLimit and Retry-After headers", True),
        "max_keys": Option.integer(
            f"keys the local table holds (at most {MAX_MAX_KEYS})", DEFAULT_MAX_KEYS, 1
        ),
    }
    REQUIRED: ClassVar[tuple[str, ...]] = ("rate",)
    # With the local backend it awaits nothing but call_next (its decision is a
    # microseconds-long synchronous section), so its chain may run without a task.
    EAGER = False  # an instance attribute: use_backend sets it
    # Phases with either backend: a Redis decision is a Pending (proxy/exchange/phased.py).
    PHASES: ClassVar[bool] = True

    def __init__(self, options: Options) -> None:
        self.name = options.name
        self.rate = options.converted("rate", parse_rate, "a rate like '100/s'", Rate(1, 1.0))
        self.burst = options.integer("burst", 0)
        self.key = options.converted("key", parse_key, f"one of {_KEY_FORMS}", KeySpec("ip"))
        self.headers = options.boolean("headers", True)
        self.backend_name = options.choice("backend", ("local", "redis"), "local")
        self.emission_s = self.rate.emission_s
        self.tolerance_s = self.emission_s * self.burst
        self.limit = self.burst + 1  # what "N requests at once" admits
        self.on_backend_error = "allow"
        self._key_of = key_function(self.key)
        self._limit_header = str(self.limit)
        self._raw_limit = (b"RateLimit-Limit", self._limit_header.encode())
        self._count_allowed = RATE_LIMIT_DECISIONS.labels(self.name, "allowed").inc
        self._count_limited = RATE_LIMIT_DECISIONS.labels(self.name, "limited").inc
        self._count_backend_error = RATE_LIMIT_DECISIONS.labels(self.name, "backend_error").inc
        self.backend: Backend
        self._local: LocalBackend | None = None
        self._redis: RedisBackend | None = None  # the redis backend, when it is the one
        if self.backend_name == "redis":
            self.backend = self._redis_backend(options)
            if "max_keys" in options:
                options.error("max_keys", "only used with backend: local")
        else:
            if "redis" in options:
                options.error("redis", "only used with backend: redis")
            max_keys = options.integer("max_keys", DEFAULT_MAX_KEYS, minimum=1)
            if max_keys > MAX_MAX_KEYS:
                options.error("max_keys", f"must be at most {MAX_MAX_KEYS}, got {max_keys}")
                max_keys = DEFAULT_MAX_KEYS
            evictions = RATE_LIMIT_EVICTIONS.labels(self.name).inc
            shared_key = local_table_key(options.path, self.rate, self.burst, self.key, max_keys)
            try:
                local = LocalBackend(max_keys, shared_key=shared_key, on_evict=evictions)
            except SharedTableError as exc:
                options.error(None, f"the local backend's table cannot be made: {exc}")
                self.use_backend(_Unconfigured())
            else:
                self.use_backend(local)

    def use_backend(self, backend: Backend) -> None:
        """Decide with `backend` from now on (a test gives a local one its clock)."""
        self.backend = backend
        self._local = backend if isinstance(backend, LocalBackend) else None
        self.EAGER = self._local is not None

    def _redis_backend(self, options: Options) -> Backend:
        redis = options.nested("redis", self.REDIS_OPTIONS)
        if redis is None:
            if "redis" not in options:
                options.error("redis", "backend: redis needs a 'redis: {url: ...}' mapping")
            return _Unconfigured()
        url = redis.string("url")
        timeout_s = redis.duration("timeout", DEFAULT_REDIS_TIMEOUT_S, positive=True)
        self.on_backend_error = redis.choice("on_redis_error", ("allow", "deny"), "allow")
        if redis.failed or "url" not in redis:  # (a missing url is reported already)
            return _Unconfigured()
        try:
            from middleware.rate_limit_redis import RedisBackend  # redis-py: only when used
        except ImportError as exc:
            options.error("backend", f"the redis backend cannot be loaded: {exc}")
            return _Unconfigured()
        try:
            self._redis = RedisBackend(url, timeout_s, f"{REDIS_KEY_PREFIX}{self.name}:")
            return self._redis
        except ValueError as error:  # not `exc`: mypyc gives one name one type
            redis.error("url", f"invalid Redis URL: {error}")
            return _Unconfigured()

    def __repr__(self) -> str:
        rate = self.rate
        return (
            f"<RateLimit {self.name!r} {rate.requests}/{rate.period_s:g}s burst={self.burst} "
            f"key={self.key.kind}{':' + self.key.header if self.key.header else ''} "
            f"{self.backend!r}>"
        )

    async def start(self) -> None:
        """Start the backend (the Redis client)."""
        await self.backend.start()

    async def close(self) -> None:
        """Close the backend."""
        await self.backend.close()

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        local = self._local
        if local is not None:  # no coroutine to make: it never waits
            state = self.request_phase(request)
        else:
            try:
                decision = await self.backend.decide(
                    self._key_of(request), self.emission_s, self.tolerance_s
                )
            except RateLimitBackendError:
                state = self._backend_failed(request)
            else:
                state = self._decided(request, decision)
        if isinstance(state, Response):
            return state
        response = await call_next(request)
        return self.response_phase(request, response, state)

    # Phases (proxy/plugin/base.py): the state is the Decision (None: the backend failed
    # and `allow` let the request through without headers).
    def request_phase(self, request: Request) -> Decision | Response | Pending | None:
        """Decide: at once with the local backend, as a Pending with Redis (the decision
        joins the batch of its loop turn: rate_limit_redis.py)."""
        key = self._key_of(request)
        local = self._local
        if local is None:
            redis = self._redis
            if redis is None:  # no backend: the config failed (never served)
                return self._backend_failed(request)
            try:
                future = redis.submit(key, self.emission_s, self.tolerance_s)
            except RateLimitBackendError:  # closed
                return self._backend_failed(request)
            return Pending(future, self._answered)
        try:
            decision = local.decide_now(key, self.emission_s, self.tolerance_s)
        except RateLimitBackendError:
            return self._backend_failed(request)
        return self._decided(request, decision)

    def _answered(self, request: Request, reply: object) -> Decision | Response | None:
        """The outcome of a Redis decision's reply (Pending.then)."""
        redis = self._redis
        assert redis is not None
        try:
            decision = redis.finish(reply, self.emission_s, self.tolerance_s)
        except RateLimitBackendError:
            return self._backend_failed(request)
        return self._decided(request, decision)

    def _backend_failed(self, request: Request) -> Response | None:
        self._count_backend_error()
        if self.on_backend_error == "deny":
            # Answered here rather than raised: the backend logged the outage once.
            # The reason (a Redis address) stays in the log, not in the reply.
            return local_reply(RateLimitUnavailable(), request)
        return None

    def _decided(self, request: Request, decision: Decision) -> Decision | Response:
        if not decision.allowed:
            self._count_limited()
            return self._limited(request, decision)
        self._count_allowed()
        return decision

    def response_phase(self, request: Request, response: Response, state: object) -> Response:
        """The RateLimit-* headers of an allowed request's response."""
        if not self.headers or not isinstance(state, Decision):
            return response
        remaining = str(state.remaining)
        reset = str(whole_seconds(state.reset_after_s))
        raw = response.raw_headers
        if raw is not None:
            # Still the upstream's bytes: ours replace any it sent and are added as
            # bytes (digits: nothing to check), so no CIMultiDict is built and the
            # response keeps the raw serializer.
            response.raw_headers = [
                *[pair for pair in raw if len(pair[0]) not in (15, 19) or not _ours(pair)],
                self._raw_limit,
                (b"RateLimit-Remaining", remaining.encode()),
                (b"RateLimit-Reset", reset.encode()),
            ]
        else:
            headers = response.headers
            headers["RateLimit-Limit"] = self._limit_header
            headers["RateLimit-Remaining"] = remaining
            headers["RateLimit-Reset"] = reset
        return response

    def _limited(self, request: Request, decision: Decision) -> Response:
        retry_after = str(max(1, whole_seconds(decision.retry_after_s)))
        error = RateLimited(f"rate limit exceeded: retry in {retry_after}s")
        response = local_reply(error, request)
        headers = response.headers
        headers["Retry-After"] = retry_after
        headers["RateLimit-Limit"] = self._limit_header  # on a 429 whatever `headers` says
        headers["RateLimit-Remaining"] = "0"
        headers["RateLimit-Reset"] = str(whole_seconds(decision.reset_after_s))
        return response


_OUR_FIELDS = frozenset((b"ratelimit-limit", b"ratelimit-remaining", b"ratelimit-reset"))


def _ours(pair: tuple[bytes, bytes]) -> bool:
    """Whether a raw field (15 or 19 bytes long: checked first) is one we set."""
    return pair[0].lower() in _OUR_FIELDS


class _Unconfigured:
    """Stands in for a backend the config failed to describe (the load fails anyway)."""

    async def decide(self, key: str, emission_s: float, tolerance_s: float) -> Decision:
        raise RateLimitBackendError("no backend")

    async def start(self) -> None:
        """Nothing to start."""

    async def close(self) -> None:
        """Nothing to close."""
