"""Keeping a response for the cache: stored as it streams to the client when it is
storable (within `max_object_size`), and the misses of its key that wait for it (a
flight) released once it is stored, or once it will not be."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from middleware import cache_rules as rules
from middleware.cache_answers import Facts, facts_of, fields_of
from middleware.cache_body import tee
from middleware.cache_store import CacheBackendError, Entry, MemoryStore
from proxy import Body, Response

if TYPE_CHECKING:
    from middleware.cache_redis import RedisStore


class Keeper:
    """Stores one cache's responses and tracks the tasks that do it."""

    def __init__(
        self,
        store: MemoryStore | RedisStore,
        *,
        max_object_bytes: int,
        heuristic: float,
        max_stale: float | None,
        keep_stale_s: float,
        status_name: str,
    ) -> None:
        self.store = store
        self.max_object_bytes = max_object_bytes
        self.heuristic = heuristic
        self.max_stale = max_stale
        self.keep_stale_s = keep_stale_s
        self.status_name = status_name
        self.flights: dict[str, asyncio.Future[bool]] = {}  # key -> stored, of its leader
        self.tasks: set[asyncio.Task[None]] = set()  # bodies being stored, refreshes

    async def close(self) -> None:
        """Stop storing (and the cache's refreshes, which it spawned here)."""
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def land(self, key: str, flight: asyncio.Future[bool] | None, stored: bool) -> None:
        """The leader's response was stored (or will not be): release its waiters."""
        if flight is None:
            return
        if self.flights.get(key) is flight:
            del self.flights[key]
        if not flight.done():
            flight.set_result(stored)

    def keep(
        self,
        fields: list[tuple[str, str]],
        key: str,
        response: Response,
        request_time: float,
        response_time: float,
        fwd: str,
        flight: asyncio.Future[bool] | None,
        fwd_status: bool,
    ) -> Response:
        """`response` to the request whose fields are `fields`, with its Cache-Status;
        stored under `key` as it streams when it is storable. `flight`: the misses
        waiting for it, released when it is stored or will not be."""
        response_fields = fields_of(response)
        why = rules.storable(response.status, fields, response_fields, heuristic=self.heuristic > 0)
        length = response.body.length
        if not why and length is not None and length > self.max_object_bytes:
            why = "too-big"
        if not why and response.upgrade is not None:
            why = "upgrade"
        status_code = response.status if fwd_status else 0
        if why:
            self.land(key, flight, False)
            response.add_header(
                "Cache-Status",
                rules.cache_status(
                    self.status_name, fwd=fwd, fwd_status=status_code, detail=f"not-stored-{why}"
                ),
            )
            return response
        names = rules.vary_names(response_fields)
        stored_fields = [pair for pair in response_fields if pair[0].lower() != "cache-status"]
        template = Entry(
            response.status,
            stored_fields,
            b"",
            request_time,
            response_time,
            names,
            rules.vary_values(names, fields),
        )

        async def on_end(body: bytes | None) -> None:
            if body is None:
                self.land(key, flight, False)
                return
            entry = template.with_body(body)
            try:
                await self.store.put(key, entry, self.keep_s(entry))
            except CacheBackendError:
                self.land(key, flight, False)
                return
            self.land(key, flight, True)

        body = response.body
        store = self.store
        if body.complete and not body.trailers:
            data = body.take_all()
            response.body = Body.from_bytes(data)
            if len(data) > self.max_object_bytes:
                self.land(key, flight, False)
            elif isinstance(store, MemoryStore):  # stored before the response goes
                store.put_now(key, template.with_body(data))
                self.land(key, flight, True)
            else:
                self.spawn(on_end(data))
        else:
            response.body, task = tee(body, self.max_object_bytes, on_end)
            self.track(task)
        facts = Facts(template, self.heuristic, self.max_stale)
        response.add_header(
            "Cache-Status",
            rules.cache_status(
                self.status_name,
                fwd=fwd,
                fwd_status=status_code,
                stored=True,
                ttl=facts.lifetime - facts.initial_age,
            ),
        )
        return response

    def keep_s(self, entry: Entry) -> float:
        """How long Redis should keep `entry`: its fresh time left, its stale windows,
        and `keep_stale` when it can be revalidated."""
        facts = facts_of(entry, self.heuristic, self.max_stale)
        keep = max(0.0, facts.lifetime - facts.initial_age) + max(facts.swr, facts.stale_if_error)
        if rules.validators(entry.fields):
            keep += self.keep_stale_s
        return keep

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self.track(task)

    def track(self, task: asyncio.Task[None]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
