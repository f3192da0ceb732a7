"""Local replies: the small JSON answers the gateway gives itself (docs/errors.md).

Each is counted by reason; the counter is the metrics package's, which installs it here
when it is imported (`count_with`), so the core imports nothing of metrics.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from multidict import CIMultiDict

from proxy.core.body import Body
from proxy.core.errors import ProxyError
from proxy.core.ids import new_request_id
from proxy.core.models import Request, Response


def _not_counted(reason: str) -> None:
    """No metrics loaded (a tool or a unit test that uses the core alone)."""


_count: Callable[[str], None] = _not_counted


def count_with(counter: Callable[[str], None]) -> None:
    """Count every local reply from now on with `counter(reason)`."""
    global _count
    _count = counter


def request_id_of(request: Request | None) -> str:
    """The request's id: set by middleware, else the client's X-Request-ID, else new."""
    if request is None:
        return new_request_id()
    if not request.request_id:
        # `header`, not `headers`: reading the raw fields keeps them raw (models.py).
        request.request_id = request.header("x-request-id") or new_request_id()
    return request.request_id


def local_reply(error: ProxyError, request: Request | None) -> Response:
    """`{"error": reason, "message": ..., "request_id": ...}` with the error's status
    (counted in `gatehouse_local_replies_total{reason}`)."""
    _count(error.reason)
    if request is not None:
        request.exchange.error = error.reason
    request_id = request_id_of(request)
    payload = {"error": error.reason, "message": error.message, "request_id": request_id}
    data = json.dumps(payload).encode()
    headers: CIMultiDict[str] = CIMultiDict(
        [("Content-Type", "application/json"), ("X-Request-ID", request_id)]
    )
    if error.status == 401:
        headers["WWW-Authenticate"] = getattr(error, "challenge", 'Bearer realm="gatehouse"')
    return Response(error.status, headers, Body.from_bytes(data))
