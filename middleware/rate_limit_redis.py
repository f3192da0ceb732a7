"""The `redis` backend of `rate_limit`: one GCRA state per key in Redis, shared by every
worker, process and replica that points at the same server.

Each decision is one atomic Lua script (EVALSHA; on NOSCRIPT, after a Redis restart or a
`SCRIPT FLUSH`, the script is loaded again and the call repeated). The script reads the
key's `tat`, takes `now` from Redis' own clock (`TIME`), so gateways on hosts whose
clocks disagree still share one timeline, runs the same comparison as
`middleware.rate_limit_core.gcra`, stores the new `tat` with an expiry of
`new_tat - now + tolerance` (the moment the key would be the same as a fresh one, so idle
keys vanish by themselves), and returns the old `tat` and `now`. The Decision is then made
from those two numbers by `gcra()` itself, so the local and the Redis backends cannot
drift apart: the script only has to pick the same branch and the same new `tat`, which it
does with the same IEEE double operations in the same order (numbers cross the wire as
shortest round-trip strings, never truncated).

Decisions are pipelined: those asked for in one turn of the event loop wait together and
go out as one redis-py pipeline (one write, one read of all the replies, one pooled
connection), so the client's per-call work (pool, timeout, packing, parsing) is paid per
batch, not per request. Under load a batch holds as many decisions as requests arrived
in that turn; alone, a decision is a batch of one. Each reply is still its own script's
answer: a NOSCRIPT in the batch loads the script once and repeats only those calls.

Every batch is bounded by `timeout_s` (pool wait, connect, the round trip, a NOSCRIPT
reload): redis-py's socket timeouts plus an `asyncio.timeout` around the whole batch. A failure
of any kind is a `RateLimitBackendError`; the middleware's `on_redis_error` decides. An
outage is logged once when it starts and once when Redis answers again, never per
request. redis-py reconnects by itself: the pool checks a pooled connection before lending
it and drops one that broke, so the first decision after Redis comes back works.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio
from redis.exceptions import NoScriptError

from middleware.rate_limit_core import Decision, RateLimitBackendError, gcra
from middleware.redis_client import FAILURES, describe_url, make_client

log = logging.getLogger(__name__)

# Connections per backend (per worker): a batch of decisions is one short round trip, so a
# few are in flight at a time; past this many a batch waits for one (bounded by timeout_s).
POOL_MAX_CONNECTIONS = 64

# KEYS[1] the key. ARGV[1] emission_s, ARGV[2] tolerance_s (Python's repr: exact doubles),
# ARGV[3] `now` in seconds, or '' for Redis' clock (tests inject a clock through it).
# Returns {allowed (1|0), old tat, now}; numbers as '%.17g' strings, which read back as
# the same doubles (a Lua number returned to Redis would be truncated to an integer).
# The arithmetic mirrors rate_limit_core.gcra() operation for operation.
GCRA_SCRIPT = """
local now
if ARGV[3] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[3])
end
local emission = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or 0
local base = math.max(tat, now)
local new_tat = base + emission
local allow_at = new_tat - tolerance - emission
local old = string.format('%.17g', tat)
local at = string.format('%.17g', now)
if now + 0.000001 < allow_at then  -- rate_limit_core.SLACK_S
  return {0, old, at}
end
local ttl_ms = math.ceil((new_tat - now + tolerance) * 1000)
if ttl_ms < 1 then
  ttl_ms = 1
end
redis.call('SET', KEYS[1], string.format('%.17g', new_tat), 'PX', ttl_ms)
return {1, old, at}
"""

_FAILURES = FAILURES


# A decision waiting for its batch: its answer, and the script's keys and arguments.
_Waiting = tuple["asyncio.Future[Any]", tuple[bytes, ...]]


class BackendState(enum.Enum):
    """Where the backend is in its life; DOWN is an outage that has been logged."""

    NEW = "new"  # constructed, no client yet (config load, `gatehouse check`)
    UP = "up"  # the last call succeeded
    DOWN = "down"  # the last call failed: outage logged, its end will be
    CLOSED = "closed"


class RedisBackend:
    """GCRA decisions stored in Redis under `key_prefix + key`.

    The constructor only checks the URL; the client is made in `start()` (or on the first
    decision), on the running loop.

    Raises:
        ValueError: from the constructor, when redis-py cannot use `url`.
    """

    def __init__(
        self,
        url: str,
        timeout_s: float,
        key_prefix: str,
        *,
        now: Callable[[], float] | None = None,
    ) -> None:
        self.url = url
        self.where = describe_url(url)
        self.timeout_s = timeout_s
        self.key_prefix = key_prefix
        # A test clock replaces Redis' TIME; production passes None.
        self._now = now
        self.state = BackendState.NEW
        self._client: redis.asyncio.Redis | None = None
        self._sha = ""
        self._script = GCRA_SCRIPT.encode()
        self._outage_started = 0.0  # monotonic
        self._outage_failures = 0
        # Decisions asked for in this turn of the loop, sent together after it.
        self._waiting: list[_Waiting] = []
        self._sending: dict[asyncio.Task[None], list[_Waiting]] = {}  # batches on their way
        # emission/tolerance as sent: the middleware asks with the same pair every time.
        self._rate: tuple[float, float] = (-1.0, -1.0)
        self._rate_args: tuple[bytes, bytes] = (b"", b"")

    def __repr__(self) -> str:
        return f"<RedisBackend {self.where} {self.state.name} prefix={self.key_prefix!r}>"

    def _make_client(self) -> redis.asyncio.Redis:
        client = make_client(self.url, self.timeout_s, POOL_MAX_CONNECTIONS)
        self._client = client
        return client

    async def start(self) -> None:
        """Make the client and load the script (bounded by `timeout_s`). Redis being down
        is not an error here: it is logged as an outage and decisions follow
        `on_redis_error` until it answers."""
        if self.state is not BackendState.NEW:
            return
        client = self._make_client()
        self.state = BackendState.UP
        try:
            async with asyncio.timeout(self.timeout_s):
                self._sha = str(await client.script_load(self._script))
        except _FAILURES as exc:
            self._failed(exc)
            self._outage_failures = 0  # counts decisions, and this was none
        else:
            log.debug("%r: script loaded (%s)", self, self._sha)

    async def close(self) -> None:
        """Close the client and its connections; later decisions raise, and so do those
        whose batch is still on its way."""
        self.state = BackendState.CLOSED
        sending = dict(self._sending)
        for task in sending:
            task.cancel()
        await asyncio.gather(*sending, return_exceptions=True)
        # A batch cancelled before its task first ran never saw the cancellation.
        closed = RateLimitBackendError(f"{self!r} closed during the decision")
        for batch in sending.values():
            self._answer(batch, [closed] * len(batch))
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def decide(self, key: str, emission_s: float, tolerance_s: float) -> Decision:
        """Decide one request for `key` (see `rate_limit_core.gcra`), atomically in Redis.

        Raises:
            RateLimitBackendError: Redis failed, was unreachable or slower than `timeout_s`,
                or the backend is closed. Any other exception is a bug.
        """
        if asyncio.current_task() is None:
            # Driven by hand outside a task (proxy/exchange/eager.py; a chain should not be, since
            # this awaits I/O and is no EAGER middleware, but then this still holds):
            # yield a bare turn and go on inside a task as every other decision does.
            await asyncio.sleep(0)
        reply = await self.submit(key, emission_s, tolerance_s)
        return self.finish(reply, emission_s, tolerance_s)

    def submit(self, key: str, emission_s: float, tolerance_s: float) -> asyncio.Future[Any]:
        """Queue a decision for `key` in this loop turn's batch; the future's result is its
        reply, or what failed (`finish` reads either). Needs a running loop, not a task.

        Raises:
            RateLimitBackendError: the backend is closed.
        """
        client = self._client
        if client is None:
            if self.state is BackendState.CLOSED:
                raise RateLimitBackendError(f"{self!r} is closed")
            client = self._make_client()
            self.state = BackendState.UP
        if (emission_s, tolerance_s) != self._rate:
            self._rate = (emission_s, tolerance_s)
            self._rate_args = (repr(emission_s).encode(), repr(tolerance_s).encode())
        now = b"" if self._now is None else repr(self._now()).encode()
        full_key = (self.key_prefix + key).encode("utf-8", "surrogatepass")
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Any] = loop.create_future()
        self._waiting.append((answer, (full_key, *self._rate_args, now)))
        if len(self._waiting) == 1:  # the first of this turn: send them all after it
            loop.call_soon(self._send_waiting, client)
        return answer

    def finish(self, reply: Any, emission_s: float, tolerance_s: float) -> Decision:
        """The Decision of a submitted decision's reply.

        Raises:
            RateLimitBackendError: the reply is a failure (logged once per outage).
        """
        if isinstance(reply, BaseException):
            raise self._failed(reply) from reply
        try:
            tat, at = float(reply[1]), float(reply[2])
        except (ValueError, TypeError, IndexError) as malformed:
            raise self._failed(malformed) from malformed
        if self.state is BackendState.DOWN:
            self._recovered()
        decision, _ = gcra(tat, at, emission_s, tolerance_s)
        return decision

    def _send_waiting(self, client: redis.asyncio.Redis) -> None:
        """Send the decisions waiting since the last call as one batch (in a task)."""
        batch, self._waiting = self._waiting, []
        if self.state is BackendState.CLOSED:  # closed in the meantime
            self._answer(batch, [RateLimitBackendError(f"{self!r} is closed")] * len(batch))
        elif batch:
            task = asyncio.get_running_loop().create_task(self._send(client, batch))
            self._sending[task] = batch
            task.add_done_callback(self._sending.pop)

    async def _send(self, client: redis.asyncio.Redis, batch: list[_Waiting]) -> None:
        """Run `batch` and give each decision its reply; a failure of the whole batch
        (timeout, connection) is every decision's answer. Answers are results, never
        exceptions set on the futures: one exception raised by many awaiters would
        collect all their tracebacks."""
        calls = [call for _, call in batch]
        replies: list[Any]
        try:
            async with asyncio.timeout(self.timeout_s):
                replies = await self._run(client, calls)
        except _FAILURES as exc:
            replies = [exc] * len(batch)
        except Exception as bug:  # no Redis failure: a bug; the decisions still get answers
            log.exception("%r: a batch of decisions failed", self)
            replies = [bug] * len(batch)
        # (Cancelled: `close` answers the batch.)
        if len(replies) != len(batch):  # never from Redis; but no decision may wait forever
            replies = [ValueError(f"{len(replies)} replies to {len(batch)} calls")] * len(batch)
        self._answer(batch, replies)

    @staticmethod
    def _answer(batch: list[_Waiting], replies: list[Any]) -> None:
        for (answer, _), reply in zip(batch, replies, strict=True):
            if not answer.done():  # a decision whose request went away is cancelled
                answer.set_result(reply)

    async def _run(self, client: redis.asyncio.Redis, calls: list[tuple[bytes, ...]]) -> list[Any]:
        """The script's replies to `calls`, in order (an error reply in its place)."""
        if not self._sha:
            self._sha = str(await client.script_load(self._script))
        replies = await self._pipeline(client, calls)
        again = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if again:
            # Redis restarted or its script cache was flushed: load it again, and repeat
            # the calls that met the empty cache (the others ran).
            log.debug("%r: NOSCRIPT, loading the script again", self)
            self._sha = str(await client.script_load(self._script))
            repeated = await self._pipeline(client, [calls[i] for i in again])
            for index, reply in zip(again, repeated, strict=True):
                replies[index] = reply
        return replies

    async def _pipeline(
        self, client: redis.asyncio.Redis, calls: list[tuple[bytes, ...]]
    ) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        for call in calls:
            pipe.evalsha(self._sha, 1, *call)  # type: ignore[unused-awaitable]  # queued: the pipeline returns itself
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    def _failed(self, exc: BaseException) -> RateLimitBackendError:
        if isinstance(exc, TimeoutError) and not str(exc):
            reason = f"no answer within {self.timeout_s * 1000:.0f}ms"
        else:
            reason = f"{type(exc).__name__}: {exc}"
        if self.state is BackendState.UP:
            self.state = BackendState.DOWN
            self._outage_started = time.monotonic()
            self._outage_failures = 0
            log.warning(
                "rate_limit: Redis %s is unavailable (%s); decisions follow on_redis_error "
                "until it answers",
                self.where,
                reason,
            )
        self._outage_failures += 1
        return RateLimitBackendError(f"Redis {self.where}: {reason}")

    def _recovered(self) -> None:
        self.state = BackendState.UP
        log.warning(
            "rate_limit: Redis %s answers again after %.1fs (%d decisions failed meanwhile)",
            self.where,
            time.monotonic() - self._outage_started,
            self._outage_failures,
        )
