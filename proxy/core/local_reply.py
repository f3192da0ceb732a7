"""Local replies: the small JSON answers the gateway gives itself (DESIGN.md, errors)."""

from __future__ import annotations

import json
import uuid

from multidict import CIMultiDict

from metrics.definitions import count_local_reply
from proxy.core.errors import ProxyError
from proxy.core.models import Body, Request, Response


def request_id_of(request: Request | None) -> str:
    """The request's id: set by middleware, else the client's X-Request-ID, else new."""
    if request is None:
        return uuid.uuid4().hex
    if not request.request_id:
        request.request_id = request.headers.get("x-request-id", "") or uuid.uuid4().hex
    return request.request_id


def local_reply(error: ProxyError, request: Request | None) -> Response:
    """`{"error": reason, "message": ..., "request_id": ...}` with the error's status
    (counted in `gatehouse_local_replies_total{reason}`)."""
    count_local_reply(error.reason)
    request_id = request_id_of(request)
    payload = {"error": error.reason, "message": error.message, "request_id": request_id}
    data = json.dumps(payload).encode()
    headers: CIMultiDict[str] = CIMultiDict(
        [("Content-Type", "application/json"), ("X-Request-ID", request_id)]
    )
    if error.status == 401:
        headers["WWW-Authenticate"] = getattr(error, "challenge", 'Bearer realm="gatehouse"')
    return Response(error.status, headers, Body.from_bytes(data))
