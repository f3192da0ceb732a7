"""`cache`: a shared HTTP cache (RFC 9111) in front of the route's upstream.

A GET is looked up by its key (middleware/cache_key.py) and the variant its Vary fields
select. A fresh entry is the answer (with `Age` and `Cache-Status`, RFC 9211), or a 304
when the client's own conditions hold. A stale one is revalidated with the origin (its
ETag and Last-Modified as If-None-Match and If-Modified-Since; a 304 freshens the stored
fields), served at once while a background request revalidates it under
`stale-while-revalidate`, or served when the origin fails under `stale-if-error`
(RFC 5861). A miss goes upstream; a storable response (middleware/cache_rules.py)
streams to the client while a copy is kept, and is stored when it ends within
`max_object_size`.

Concurrent misses of one key are coalesced: the first goes upstream, the others wait
(at most `coalesce_timeout`) for its response to be stored and are answered from it. A
waiter whose leader's response was not stored (not storable, too big, failed) or did not
arrive in time goes upstream on its own; a waiter whose client goes away stops waiting.
Coalescing is per worker: with `backend: redis`, one miss per worker may reach the
origin.

The rules are pure functions of fields and times (cache_rules.py); the time comes from
`clock` (wall-clock seconds, as `Date` counts them), which the unit tests replace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from metrics.definitions import CACHE_LOOKUPS
from middleware import cache_options
from middleware import cache_rules as rules
from middleware.cache_answers import (
    CLIENT_CONDITIONS,
    Facts,
    background_request,
    bypass_reason,
    facts_of,
    fields_of,
    invalidates,
    quiet,
    stored_answer,
)
from middleware.cache_errors import NotCached
from middleware.cache_keep import Keeper
from middleware.cache_store import CacheBackendError, Entry, MemoryStore, pick_variant
from proxy import Body, Deferred, Handler, Option, Options, ProxyError, Request, Response

if TYPE_CHECKING:
    from middleware.cache_redis import RedisStore  # redis-py: imported only when configured

log = logging.getLogger(__name__)

_STALE_IF_ERROR_STATUSES = frozenset((500, 502, 503, 504))


_FOLLOW = object()  # a miss that waits for the key's leader (Cache._take_flight)


class _Fetching:
    """A phased miss's state: forwarded, its response to be kept as it streams."""

    __slots__ = ("fields", "flight", "fwd", "key", "request_time")

    def __init__(
        self,
        key: str,
        fields: list[tuple[str, str]],
        fwd: str,
        flight: asyncio.Future[bool] | None,
        request_time: float,
    ) -> None:
        self.key = key
        self.fields = fields
        self.fwd = fwd
        self.flight = flight  # the misses of this key waiting for it, if it leads them
        self.request_time = request_time


class _Bypassing:
    """A phased bypass's state: why the cache stays out of it."""

    __slots__ = ("why",)

    def __init__(self, why: str) -> None:
        self.why = why


class Cache:
    """A shared cache of the route's GET responses, in memory or in Redis."""

    # It may answer with a response stored for another client: no access check may
    # come after it in a chain (proxy/plugin/base.py).
    SERVES_STORED: ClassVar[bool] = True

    OPTIONS: ClassVar[dict[str, Option]] = cache_options.OPTIONS
    # With the memory backend it awaits nothing but call_next, except a coalesced miss's
    # wait for its leader (a plain future, which proxy/exchange/eager.py hands to a task):
    # its hits then run without a task. Redis calls need a task (`asyncio.timeout`).
    EAGER = False  # an instance attribute: __init__ sets it
    # The memory backend offers phases too (proxy/exchange/phased.py): a hit is then
    # answered as a plain call, without a coroutine. Redis' calls take a task.
    PHASES = False

    def __init__(self, options: Options) -> None:
        self.name = options.name
        self.max_object_bytes = options.size(
            "max_object_size", cache_options.DEFAULT_MAX_OBJECT_BYTES, positive=True
        )
        self.heuristic = options.number("heuristic", 0.0)
        self.max_stale = options.duration("max_stale", 0.0) if "max_stale" in options else None
        self.keep_stale_s = options.duration("keep_stale", cache_options.DEFAULT_KEEP_STALE_S)
        self.coalesce = options.boolean("coalesce", True)
        self.coalesce_timeout_s = options.duration(
            "coalesce_timeout", cache_options.DEFAULT_COALESCE_TIMEOUT_S, positive=True
        )
        self.status_name = options.string("status_name", "gatehouse")
        self.key_spec = cache_options.read_key_spec(options)
        self.clock: Callable[[], float] = time.time  # the unit tests drive their own
        self._counters = {
            result: CACHE_LOOKUPS.labels(self.name, result).inc
            for result in ("hit", "miss", "stale", "revalidated", "bypass")
        }
        self.backend_name = options.choice("backend", ("memory", "redis"), "memory")
        self.store: MemoryStore | RedisStore = cache_options.open_store(options)
        if self.backend_name == "memory":
            self.EAGER = True
            self.PHASES = True
        self.keeper = Keeper(
            self.store,
            max_object_bytes=self.max_object_bytes,
            heuristic=self.heuristic,
            max_stale=self.max_stale,
            keep_stale_s=self.keep_stale_s,
            status_name=self.status_name,
        )
        self.waiting = 0  # coalesced misses waiting for their leader
        # Called with `waiting` whenever it changes (the tests' barrier: N clients wait).
        self.on_waiting: Callable[[int], None] | None = None
        self._refreshing: set[str] = set()  # keys revalidated in the background

    def __repr__(self) -> str:
        return f"<Cache {self.name!r} {self.store!r} {self.key_spec!r}>"

    async def start(self) -> None:
        """Start the store (the Redis client)."""
        await self.store.start()

    async def close(self) -> None:
        """Stop storing and refreshing; close the store."""
        await self.keeper.close()
        await self.store.close()

    async def purge_cache(self, key: str, prefix: str | None = None) -> int:
        """Forget the entries of `key`, or of every key starting with `prefix` when it is
        given (the admin API's POST /cache/purge, through each worker: proxy/process/
        server.py); how many entries (memory) or keys (Redis) went.

        Raises:
            CacheBackendError: Redis failed.
        """
        if prefix is not None:
            return await self.store.purge(prefix)
        return await self.store.delete(key)

    # -- the exchange ----------------------------------------------------------------
    # Two ways in, one behaviour: `__call__` (the coroutine chain, and the Redis backend
    # always) and the phases (the memory backend on a phased chain). The phases take the
    # common cases themselves: a hit is answered in the request phase, a plain miss and a
    # bypass are forwarded and finished in the response phase. Anything else (a
    # coalesced wait, revalidation, stale-while-revalidate) is handed back as a Deferred
    # running `_consult`, the coroutine's own code, so that each rule exists once.
    async def __call__(self, request: Request, call_next: Handler) -> Response:
        if request.upgrade:  # a WebSocket handshake: its "response" is a tunnel
            return await call_next(request)
        fields = fields_of(request)
        names = rules.lowered_names(fields)
        why = bypass_reason(request, fields, names)
        if why:
            return await self._bypass(request, call_next, why)
        key = self.key_spec.key(request)
        try:
            entries = await self.store.get(key)
        except CacheBackendError:
            return await self._bypass(request, call_next, "backend-unavailable")
        return await self._consult(request, call_next, key, fields, names, entries)

    def request_phase(self, request: Request) -> object:
        """The memory backend's request phase (`PHASES`): a hit's answer, the state of a
        miss or bypass to forward, or the rest as a Deferred."""
        if request.upgrade:
            return None
        if request.method != "GET":
            self._counters["bypass"]()
            return _Bypassing("method")
        raw = request.raw_headers
        is_quiet = raw is not None and quiet(raw)
        fields: list[tuple[str, str]] = []  # read below unless the request is quiet
        names: frozenset[str] = frozenset()
        if not is_quiet:
            fields = fields_of(request)
            names = rules.lowered_names(fields)
            why = bypass_reason(request, fields, names)
            if why:
                self._counters["bypass"]()
                return _Bypassing(why)
        key = self.key_spec.key(request)
        store = self.store
        assert isinstance(store, MemoryStore)
        entries = store.get_now(key)
        if is_quiet:
            # Nothing the request says can change the answer (no Cache-Control, Pragma
            # or conditions): a fresh entry that varies on nothing is served without
            # reading its fields as text. Anything else takes the general way below.
            hit = self._quiet_hit(entries)
            if hit is not None:
                return hit
            fields = fields_of(request)
            names = rules.lowered_names(fields)
        entry = pick_variant(entries, fields) if entries else None
        demands = rules.request_demands(fields, names)
        if entry is not None:
            facts = self._facts(entry)
            age = rules.current_age(facts.initial_age, entry.response_time, self.clock())
            if not facts.must_validate and demands.satisfied(facts.lifetime, age, facts.stale_ok):
                self._counters["hit"]()
                status = rules.hit_status(self.status_name, facts.lifetime - age)
                return stored_answer(fields, entry, facts, age, status, names)
        elif not demands.only_if_cached:
            flight = self._take_flight(key, fields)
            if flight is not _FOLLOW:
                self._counters["miss"]()
                fwd = "vary-miss" if entries else "uri-miss"
                return _Fetching(key, fields, fwd, flight, self.clock())

        async def consult(call_next: Handler) -> Response:
            return await self._consult(request, call_next, key, fields, names, entries)

        return Deferred(consult)

    def _quiet_hit(self, entries: list[Entry]) -> Response | None:
        """The answer to a request without demands or conditions when the variant
        `pick_variant` would choose is the first, a fresh one that varies on nothing
        (what `_consult` serves as a hit)."""
        for entry in entries[:1]:
            if entry.vary_names:
                return None
            facts = self._facts(entry)
            age = rules.current_age(facts.initial_age, entry.response_time, self.clock())
            if facts.must_validate or not rules.NO_DEMANDS.satisfied(
                facts.lifetime, age, facts.stale_ok
            ):
                return None
            self._counters["hit"]()
            status = rules.hit_status(self.status_name, facts.lifetime - age)
            return Response(
                entry.status,
                [*facts.raw, (b"Age", b"%d" % age), (b"Cache-Status", status.encode("latin-1"))],
                Body.from_bytes(entry.body),
            )
        return None

    def response_phase(self, request: Request, response: Response, state: object) -> Response:
        if isinstance(state, _Fetching):
            return self.keeper.keep(
                state.fields,
                state.key,
                response,
                state.request_time,
                self.clock(),
                state.fwd,
                state.flight,
                False,
            )
        if isinstance(state, _Bypassing):
            if invalidates(request, response):
                store = self.store
                assert isinstance(store, MemoryStore)
                store.delete_now(self.key_spec.key(request, "GET"))
            return self._mark_bypass(response, state.why)
        return response  # a WebSocket handshake

    def error_phase(self, request: Request, error: ProxyError, state: object) -> Response:
        """Forwarding failed: a miss's waiters stop waiting; the error passes on."""
        if isinstance(state, _Fetching):
            self.keeper.land(state.key, state.flight, False)
        raise error

    def abort_phase(self, request: Request, state: object, status: int) -> None:
        if isinstance(state, _Fetching):
            self.keeper.land(state.key, state.flight, False)

    async def _consult(
        self,
        request: Request,
        call_next: Handler,
        key: str,
        fields: list[tuple[str, str]],
        names: frozenset[str],
        entries: list[Entry],
    ) -> Response:
        """Answer a GET from what is stored under its key (`entries`): a hit, a miss,
        or the stored response's revalidation."""
        entry = pick_variant(entries, fields) if entries else None
        demands = rules.request_demands(fields, names)
        if entry is None:
            if demands.only_if_cached:
                raise NotCached("only-if-cached, and nothing is stored")
            return await self._miss(
                request, call_next, key, fields, "vary-miss" if entries else "uri-miss"
            )
        facts = self._facts(entry)
        now = self.clock()
        age = rules.current_age(facts.initial_age, entry.response_time, now)
        if not facts.must_validate and demands.satisfied(facts.lifetime, age, facts.stale_ok):
            self._counters["hit"]()
            status = rules.hit_status(self.status_name, facts.lifetime - age)
            return stored_answer(fields, entry, facts, age, status, names)
        if demands.only_if_cached:
            raise NotCached("only-if-cached, and the stored response is stale")
        staleness = age - facts.lifetime
        if (
            not facts.must_validate
            and not demands.no_cache
            and demands.max_age is None
            and 0 <= staleness <= facts.swr
        ):
            self._counters["stale"]()
            self._refresh_later(request, call_next, key, entry)
            return stored_answer(
                fields,
                entry,
                facts,
                age,
                rules.cache_status(
                    self.status_name, hit=True, ttl=-staleness, detail="stale-while-revalidate"
                ),
            )
        # Forwarded because the entry is stale (or must be validated), or because the
        # request asked for it (no-cache, max-age) though it is fresh.
        fwd = "stale" if staleness >= 0 or facts.must_validate else "request"
        return await self._revalidate(request, call_next, key, fields, entry, facts, fwd)

    async def _bypass(self, request: Request, call_next: Handler, why: str) -> Response:
        self._counters["bypass"]()
        response = await call_next(request)
        if invalidates(request, response):
            with contextlib.suppress(CacheBackendError):
                await self.store.delete(self.key_spec.key(request, "GET"))
        return self._mark_bypass(response, why)

    def _mark_bypass(self, response: Response, why: str) -> Response:
        response.add_header(
            "Cache-Status", rules.cache_status(self.status_name, fwd="bypass", detail=why)
        )
        return response

    def _facts(self, entry: Entry) -> Facts:
        return facts_of(entry, self.heuristic, self.max_stale)

    # -- misses and coalescing -------------------------------------------------------
    def _take_flight(self, key: str, fields: list[tuple[str, str]]) -> Any:
        """A miss's part in coalescing: None when it goes upstream alone (coalescing off,
        or the client's own conditions), a new flight when it leads the key's misses,
        `_FOLLOW` when another request of the key is already on its way."""
        if not self.coalesce or any(
            rules.first_value(fields, name) is not None for name in CLIENT_CONDITIONS
        ):
            return None
        if key in self.keeper.flights:
            return _FOLLOW
        flight: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.keeper.flights[key] = flight
        return flight

    async def _miss(
        self,
        request: Request,
        call_next: Handler,
        key: str,
        fields: list[tuple[str, str]],
        fwd: str,
    ) -> Response:
        flight = self._take_flight(key, fields)
        if flight is not _FOLLOW:
            self._counters["miss"]()
            return await self._fetch(request, call_next, key, fields, fwd, flight)
        # Another request of this key is on its way: wait for its response to be stored
        # (a client going away cancels this wait, not the leader's flight).
        flight = self.keeper.flights[key]
        self._count_waiting(1)
        try:
            done, _ = await asyncio.wait((flight,), timeout=self.coalesce_timeout_s)
        finally:
            self._count_waiting(-1)
        if done and flight.result():
            try:
                entries = await self.store.get(key)
            except CacheBackendError:
                entries = []
            entry = pick_variant(entries, fields)
            if entry is not None:
                facts = self._facts(entry)
                age = rules.current_age(facts.initial_age, entry.response_time, self.clock())
                self._counters["hit"]()
                return stored_answer(
                    fields,
                    entry,
                    facts,
                    age,
                    rules.cache_status(
                        self.status_name, fwd=fwd, collapsed=True, ttl=facts.lifetime - age
                    ),
                )
        self._counters["miss"]()
        return await self._fetch(request, call_next, key, fields, fwd)

    def _count_waiting(self, change: int) -> None:
        self.waiting += change
        if self.on_waiting is not None:
            self.on_waiting(self.waiting)

    async def _fetch(
        self,
        request: Request,
        call_next: Handler,
        key: str,
        fields: list[tuple[str, str]],
        fwd: str,
        flight: asyncio.Future[bool] | None = None,
        fwd_status: bool = False,
    ) -> Response:
        """Forward the request; store a storable response as it streams to the client."""
        request_time = self.clock()
        try:
            response = await call_next(request)
        except BaseException:
            self.keeper.land(key, flight, False)
            raise
        return self.keeper.keep(
            fields, key, response, request_time, self.clock(), fwd, flight, fwd_status
        )

    # -- revalidation ----------------------------------------------------------------
    async def _revalidate(
        self,
        request: Request,
        call_next: Handler,
        key: str,
        fields: list[tuple[str, str]],
        entry: Entry,
        facts: Facts,
        fwd: str,
    ) -> Response:
        """Ask the origin whether the stale (or must-validate) entry still holds."""
        for name in CLIENT_CONDITIONS:
            request.remove_header(name)
        for name, value in rules.validators(entry.fields):
            request.set_header(name, value)
        request_time = self.clock()
        try:
            response = await call_next(request)
        except ProxyError as error:
            stale = self._stale_if_error(fields, entry, facts, error.status)
            if stale is None:
                raise
            return stale
        if response.status in _STALE_IF_ERROR_STATUSES:
            stale = self._stale_if_error(fields, entry, facts, response.status)
            if stale is not None:
                response.body.discard()
                return stale
        if response.status == 304:
            fresh_fields = fields_of(response)
            if rules.validator_matches(entry.fields, fresh_fields):
                response.body.discard()
                self._counters["revalidated"]()
                updated = entry.with_fields(
                    rules.updated_fields(entry.fields, fresh_fields), request_time, self.clock()
                )
                with contextlib.suppress(CacheBackendError):
                    await self.store.put(key, updated, self.keeper.keep_s(updated))
                updated_facts = self._facts(updated)
                age = rules.current_age(
                    updated_facts.initial_age, updated.response_time, self.clock()
                )
                return stored_answer(
                    fields,
                    updated,
                    updated_facts,
                    age,
                    rules.cache_status(
                        self.status_name,
                        fwd=fwd,
                        fwd_status=304,
                        ttl=updated_facts.lifetime - age,
                    ),
                )
            # A 304 about another response: ask again, unconditionally.
            response.body.discard()
            for name, _ in rules.validators(entry.fields):
                request.remove_header(name)
            self._counters["miss"]()
            return await self._fetch(request, call_next, key, fields, fwd)
        self._counters["miss"]()
        return self.keeper.keep(fields, key, response, request_time, self.clock(), fwd, None, True)

    def _stale_if_error(
        self, fields: list[tuple[str, str]], entry: Entry, facts: Facts, status: int
    ) -> Response | None:
        """The stale entry, if `stale-if-error` allows serving it for this failure."""
        age = rules.current_age(facts.initial_age, entry.response_time, self.clock())
        staleness = age - facts.lifetime
        if facts.stale_if_error <= 0 or staleness > facts.stale_if_error:
            return None
        self._counters["stale"]()
        return stored_answer(
            fields,
            entry,
            facts,
            age,
            rules.cache_status(
                self.status_name,
                fwd="stale",
                fwd_status=status,
                ttl=-max(0.0, staleness),
                detail="stale-if-error",
            ),
        )

    def _refresh_later(self, request: Request, call_next: Handler, key: str, entry: Entry) -> None:
        """Revalidate `entry` in the background (stale-while-revalidate), once per key
        at a time, with a copy of the request (the client's is answered meanwhile)."""
        if key in self._refreshing:
            return
        self._refreshing.add(key)
        copy = background_request(request, entry)
        self.keeper.spawn(self._refresh(copy, call_next, key, entry))

    async def _refresh(self, request: Request, call_next: Handler, key: str, entry: Entry) -> None:
        try:
            request_time = self.clock()
            response = await call_next(request)
            if response.status == 304 and rules.validator_matches(
                entry.fields, fields_of(response)
            ):
                response.body.discard()
                self._counters["revalidated"]()
                updated = entry.with_fields(
                    rules.updated_fields(entry.fields, fields_of(response)),
                    request_time,
                    self.clock(),
                )
                await self.store.put(key, updated, self.keeper.keep_s(updated))
                return
            fields = fields_of(request)
            response = self.keeper.keep(
                fields, key, response, request_time, self.clock(), "stale", None, True
            )
            # Nobody reads this response: read it here, so that `tee` stores it.
            body = response.body
            while await body.read():
                pass
        except (ProxyError, CacheBackendError) as exc:
            log.debug("cache %r: background revalidation of %r failed: %s", self.name, key, exc)
        finally:
            self._refreshing.discard(key)
