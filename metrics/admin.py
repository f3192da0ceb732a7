"""The admin listener (`admin.bind`), served by the supervising parent.

- GET /healthz: 200 while the parent runs (the process is alive).
- GET /readyz: 200 when a config is loaded and a worker serves it; 503 while draining
  or before the first worker listens.
- GET /metrics: every metric, summed over the workers; Prometheus text, or OpenMetrics
  when the Accept header asks for it.
- GET /config: the running config as JSON, secrets redacted.
- POST /reload: reload the config file now (like SIGHUP); 200, or 422 with the errors
  while the old config keeps serving.
- GET /upstreams, /routes, /middleware, /certificates: the live state as JSON (each
  endpoint's state over the workers; the route table in match order with its chains;
  the middleware instances with redacted options; the TLS listeners' certificates).
- GET /: the status page, HTML that reloads itself (metrics/status_page.py).
- POST /cache/purge?key=KEY or ?prefix=PREFIX (and `&middleware=NAME` for one instance):
  every worker's `cache` middleware forgets that key, or every key under the prefix, in
  its memory and in Redis (docs/middleware/cache.md).

Before any of that, each request passes the Host allow-list, the bearer token
(`admin.token`, except for /healthz and /readyz) and, for POST, the cross-site check
(metrics/admin_access.py says what each stops and why).

Operators point probes and Prometheus here, never at the traffic listeners, and keep it
off the public network (the example binds 127.0.0.1). It is a small HTTP/1.1 server on
h11: few requests, so clarity matters more than speed here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import parse_qs

import h11
from prometheus_client.metrics_core import Metric

from metrics.admin_access import SAFE_METHODS, AdminAccess, Refusal, admit, cross_site
from metrics.aggregate import exposition
from metrics.gateway import ADMIN_REFUSALS
from metrics.status_page import PAGE_HEADERS

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 10.0  # a scraper or probe that sends nothing for this long is dropped
MAX_REQUEST_BYTES = 64 * 1024


class AdminApp(Protocol):
    """What the admin listener reports on: the supervising parent."""

    def ready(self) -> tuple[bool, str]: ...

    async def metrics(self) -> list[Metric]: ...

    def config_view(self) -> dict[str, Any]: ...

    async def reload(self, reason: str) -> tuple[bool, list[str]]: ...

    async def upstreams(self) -> list[dict[str, Any]]: ...

    def routes(self) -> list[dict[str, Any]]: ...

    def middleware(self) -> list[dict[str, Any]]: ...

    def certificates(self) -> list[dict[str, Any]]: ...

    async def status_page(self) -> bytes: ...

    async def purge_cache(
        self, middleware: str, key: str, prefix: str | None
    ) -> tuple[int, dict[str, Any]]: ...


class AdminServer:
    """Serves an AdminApp on one address, to the requests `access` lets through
    (metrics/admin_access.py); `access` may be replaced while it serves (a reload)."""

    def __init__(self, app: AdminApp, access: AdminAccess | None = None) -> None:
        self._app = app
        self.access = access if access is not None else AdminAccess()
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._closing = False
        self.address: tuple[str, int] | None = None

    async def start(self, host: str, port: int) -> None:
        """Listen on host:port.

        Raises:
            OSError: the address cannot be bound.
        """
        self._server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        self.address = self._server.sockets[0].getsockname()[:2]
        log.info("admin listener on http://%s:%d", *self.address)

    def filenos(self) -> list[int]:
        """The listening sockets' descriptors (a forked worker closes its copies)."""
        return [sock.fileno() for sock in self._server.sockets] if self._server else []

    async def close(self) -> None:
        """Stop listening and end every connection, idle or answering."""
        if self._server is not None:
            self._closing = True
            self._server.close()
            for task in list(self._clients):
                task.cancel()
            await asyncio.gather(*self._clients, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        try:
            while True:
                request = await self._next_request(conn, reader)
                if request is None:
                    break
                try:
                    status, headers, body = await self._answer(request)
                except Exception:
                    log.exception("bug in the admin listener answering %r", request.target)
                    status, headers, body = _json(500, {"error": "internal_error"})
                headers.append(("content-length", str(len(body))))
                reason = HTTPStatus(status).phrase.encode()
                head = h11.Response(status_code=status, headers=headers, reason=reason)
                writer.write(conn.send(head))
                if request.method != b"HEAD":
                    writer.write(conn.send(h11.Data(data=body)))
                writer.write(conn.send(h11.EndOfMessage()))
                await writer.drain()
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            # A request h11 cannot read gets a 400 (and the connection closes), as on the
            # traffic listeners, rather than a silent drop.
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                status, headers, body = _json(exc.error_status_hint, {"error": "bad_request"})
                headers.append(("content-length", str(len(body))))
                with contextlib.suppress(h11.LocalProtocolError, ConnectionError):
                    writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
                    writer.write(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
                    await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        except asyncio.CancelledError:
            # close() ending the connection is this task's normal end: left cancelled, it
            # is logged as an error per connection by start_server's callback (Python 3.11).
            if not self._closing:
                raise
        except Exception:
            log.exception("bug in the admin listener")
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _next_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader
    ) -> h11.Request | None:
        """The next request (its body, if any, read and ignored); None when the client is
        done."""
        request: h11.Request | None = None
        async with asyncio.timeout(READ_TIMEOUT_S):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.EndOfMessage):
                    return request
                elif isinstance(event, h11.ConnectionClosed):
                    return None

    async def _answer(self, request: h11.Request) -> tuple[int, list[tuple[str, str]], bytes]:
        path = request.target.split(b"?", 1)[0].decode("ascii", "replace")
        method = request.method.decode("ascii", "replace")
        refusal = admit(self.access, path, request.headers)
        if refusal is not None:
            return _refused(refusal, method, path)
        allowed = _ROUTES.get(path)
        if allowed is None:
            return _json(404, {"error": "not_found", "paths": sorted(_ROUTES)})
        if method not in allowed and not (method == "HEAD" and "GET" in allowed):
            status, headers, body = _json(405, {"error": "method_not_allowed"})
            return status, [*headers, ("allow", ", ".join(allowed))], body
        if method not in SAFE_METHODS:
            refusal = cross_site(request.headers)
            if refusal is not None:
                return _refused(refusal, method, path)
        app = self._app
        if path == "/healthz":
            return 200, [("content-type", "text/plain")], b"ok\n"
        if path == "/readyz":
            ready, why = app.ready()
            return (200 if ready else 503), [("content-type", "text/plain")], why.encode() + b"\n"
        if path == "/metrics":
            accept = next((v.decode() for k, v in request.headers if k == b"accept"), None)
            body, content_type = exposition(await app.metrics(), accept)
            return 200, [("content-type", content_type)], body
        if path == "/config":
            return _json(200, app.config_view())
        if path == "/upstreams":
            return _json(200, {"upstreams": await app.upstreams()})
        if path == "/routes":
            return _json(200, {"routes": app.routes()})
        if path == "/middleware":
            return _json(200, {"middleware": app.middleware()})
        if path == "/certificates":
            return _json(200, {"certificates": app.certificates()})
        if path == "/":
            return 200, list(PAGE_HEADERS), await app.status_page()
        if path == "/cache/purge":
            return await self._purge(request.target)
        ok, errors = await app.reload("admin API")
        if ok:
            return _json(200, {"ok": True})
        return _json(422, {"ok": False, "errors": errors})

    async def _purge(self, target: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        query = parse_qs(target.partition(b"?")[2].decode("utf-8", "replace"), True)
        keys, prefixes = query.get("key", []), query.get("prefix", [])
        if len(keys) + len(prefixes) != 1:
            message = "give one key=KEY or one prefix=PREFIX (prefix= alone: every key)"
            return _json(400, {"error": "bad_request", "message": message})
        middleware = (query.get("middleware") or [""])[0]
        prefix = prefixes[0] if prefixes else None
        status, payload = await self._app.purge_cache(middleware, "".join(keys), prefix)
        return _json(status, payload)


_ROUTES: dict[str, tuple[str, ...]] = {
    "/": ("GET",),
    "/healthz": ("GET",),
    "/readyz": ("GET",),
    "/metrics": ("GET",),
    "/config": ("GET",),
    "/reload": ("POST",),
    "/upstreams": ("GET",),
    "/routes": ("GET",),
    "/middleware": ("GET",),
    "/certificates": ("GET",),
    "/cache/purge": ("POST",),
}


def _refused(refusal: Refusal, method: str, path: str) -> tuple[int, list[tuple[str, str]], bytes]:
    ADMIN_REFUSALS.labels(refusal.reason).inc()
    # info, not warning: anyone who reaches the port can cause these; the metric is what
    # to alert on.
    log.info("refused %s %s (%d): %s", method, path, refusal.status, refusal.message)
    status, headers, body = _json(
        refusal.status, {"error": refusal.error, "message": refusal.message}
    )
    return status, [*headers, *refusal.headers], body


def _json(status: int, payload: object) -> tuple[int, list[tuple[str, str]], bytes]:
    body = json.dumps(payload, indent=2, sort_keys=False).encode() + b"\n"
    return status, [("content-type", "application/json")], body
