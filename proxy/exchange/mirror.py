"""Request mirroring (a route's `mirror`, docs/traffic.md): a copy of the requests a route
forwards goes to a shadow upstream, whose answers are read and dropped.

The copy never delays or changes the primary exchange:

- It is made by the route's forwarder once the primary is under way (`Forwarder.try_start`
  after its request went out; `Forwarder.__call__` before its first try), from the
  request as the chain left it: the method, target and header fields, and the body. A
  body already whole in memory (request buffering, the default, or none) is shared, not
  copied. A streaming body is copied chunk by chunk as the primary's upstream
  connection reads it (`Body.tap`), up to `max_body`, and the copy is sent once the
  body has ended; the primary never waits for it. A body larger than `max_body` (said
  by its Content-Length at once, or found while it streams) is not mirrored, nor is one
  that never ends (the client went away: not counted either). Trailers are not copied.
- The copy is sent from a task of its own through the shadow upstream's pools
  (`Forwarder.send_once`: one try, no retry; the shadow's circuit breaker may refuse
  it), and the answer is read to its end and dropped, all within `timeout`. Nothing of
  it reaches the client, and a client that goes away does not cancel it.
- At most `max_in_flight` copies are out at once (per worker); a copy beyond that is
  dropped. Which requests are copied is `percent` of them, spread evenly (a running
  count, no randomness: 10 copies 1 in 10).
- The copy carries `X-Gatehouse-Mirror: 1` (the client's own value, if any, is
  replaced) and the Host the primary is sent with; WebSocket upgrades are never copied.

Every request chosen for copying is counted once in gatehouse_mirror_requests_total: sent
(the shadow answered, whatever its status), failed (no whole answer within `timeout`:
refused, reset, timed out), dropped or too_large.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from metrics.traffic import count_mirror
from proxy.config.model import MirrorConfig
from proxy.core.body import Body
from proxy.core.errors import ProxyError
from proxy.core.models import Request

if TYPE_CHECKING:
    from proxy.exchange.forward import Forwarder

log = logging.getLogger(__name__)

MIRROR_HEADER = "X-Gatehouse-Mirror"


class Mirror:
    """One route's mirror: which requests are copied, and the copies in flight."""

    __slots__ = (
        "_config",
        "_forwarder",
        "_route",
        "_tally",
        "in_flight",
        "tasks",
    )

    def __init__(self, route: str, config: MirrorConfig, forwarder: Forwarder) -> None:
        self._route = route
        self._config = config
        self._forwarder = forwarder  # to the shadow upstream, with the route's rewrite
        self._tally = 0.0  # percent accumulated since the last copy
        self.in_flight = 0  # copies sent and not yet done
        self.tasks: set[asyncio.Task[None]] = set()  # (the loop keeps only weak references)

    def __repr__(self) -> str:
        return f"<Mirror {self._route} -> {self._config.upstream} in_flight={self.in_flight}>"

    def start(self, request: Request, whole: bytes | None) -> None:
        """The primary exchange of `request` is under way: copy it when it is one of the
        `percent` chosen. `whole` is its body when in memory (b"" for none), None when
        it streams (then `request.body` has not been read yet)."""
        if not self._chosen():
            return
        config = self._config
        if self.in_flight >= config.max_in_flight:
            count_mirror(self._route, "dropped")
            return
        if whole is not None:
            if len(whole) > config.max_body:
                count_mirror(self._route, "too_large")
                return
            self._send(_copy_of(request), whole)
            return
        body = request.body
        if body.length is not None and body.length > config.max_body:
            count_mirror(self._route, "too_large")
            return
        body.tap = _Tee(self, body, _copy_of(request), config.max_body).take

    def cancel(self) -> None:
        """Stop the copies still out (the gateway is stopping); they count as failed."""
        for task in list(self.tasks):
            task.cancel()

    def _chosen(self) -> bool:
        """`percent` of the calls, evenly: the tally gains `percent` each call and a copy
        is made each time it reaches 100."""
        percent = self._config.percent
        if percent >= 100.0:
            return True
        self._tally += percent
        if self._tally >= 100.0:
            self._tally -= 100.0
            return True
        return False

    def _send(self, copy: Request, data: bytes) -> None:
        """Send `copy` with body `data` from a task."""
        self.in_flight += 1
        copy.body = Body.from_bytes(data)
        task = asyncio.get_running_loop().create_task(self._exchange(copy))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _streamed(self, copy: Request, data: bytes | None) -> None:
        """A streamed body's copy is whole (`data`), or was over max_body (None)."""
        if data is None:
            count_mirror(self._route, "too_large")
        elif self.in_flight >= self._config.max_in_flight:
            count_mirror(self._route, "dropped")  # (the bound, checked again at the end)
        else:
            self._send(copy, data)

    async def _exchange(self, copy: Request) -> None:
        result = "failed"
        try:
            async with asyncio.timeout(self._config.timeout):
                response = await self._forwarder.send_once(copy)
                body = response.body
                try:
                    while await body.read():
                        pass
                finally:
                    body.discard()  # (nothing, once read to the end)
            result = "sent"
        except (ProxyError, TimeoutError):
            pass
        except Exception:
            log.exception("bug while mirroring %r", copy)
        finally:
            self.in_flight -= 1
            count_mirror(self._route, result)


class _Tee:
    """Takes the copy of a streaming body as the primary's upstream connection reads it
    (`Body.tap`), and sends the mirror's copy at its end."""

    __slots__ = ("_body", "_chunks", "_copy", "_limit", "_mirror", "_size")

    def __init__(self, mirror: Mirror, body: Body, copy: Request, limit: int) -> None:
        self._mirror = mirror
        self._body = body
        self._copy = copy
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0

    def take(self, data: bytes) -> None:
        body = self._body
        if data:
            self._size += len(data)
            if self._size > self._limit:
                body.tap = None
                self._chunks.clear()
                self._mirror._streamed(self._copy, None)
            else:
                self._chunks.append(data)
            return
        body.tap = None  # the end: the primary's connection read the whole body
        self._mirror._streamed(self._copy, b"".join(self._chunks))


def _copy_of(request: Request) -> Request:
    """A request with `request`'s method, target, fields and client (`Request.copy_head`),
    marked as a mirror copy; its body is set when it is sent."""
    copy = request.copy_head()
    copy.set_header(MIRROR_HEADER, "1")  # (the client's own value, if any, replaced)
    return copy
