"""A stream's validated fields -> the `Request` every front end gives: the canonical
target (proxy/core/canonical.py), RFC 8441's WebSocket CONNECT as the GET it stands for,
and the client's address (`client_ip:`)."""

from __future__ import annotations

from proxy.core.body import Body
from proxy.core.canonical import canonical_target
from proxy.core.errors import BadRequest
from proxy.core.models import Request
from proxy.frontend.connection import ClientConnection
from proxy.frontend.h2.conn import H2Exchange
from proxy.frontend.h2.fields import RequestFields


def stream_request(
    fields: RequestFields,
    body: Body,
    stream: H2Exchange,
    conn: ClientConnection,
    stream_ended: bool,
) -> Request:
    """The request a stream's HEADERS carry.

    Raises:
        ProxyError: a CONNECT that is not WebSocket (400), a target the gateway does not
            serve (400, proxy/core/canonical.py): answered on the stream.
    """
    method = fields.method.decode("ascii", "replace")
    upgrade = ""
    if fields.method == b"CONNECT":
        if fields.protocol != b"websocket" or stream_ended:
            raise BadRequest("CONNECT is only for WebSocket (RFC 8441) here")
        # RFC 8441: WebSocket over this stream. Routed, and forwarded upstream, as the
        # HTTP/1.1 GET with Upgrade it stands for; the stream's DATA is the tunnel, not a
        # body, so no body limit or body timeout applies to it.
        method, upgrade = "GET", "websocket"
        body.limit = None
        stream.tunnel = True
    server = conn.server
    target, path, query, raw_target, _ = canonical_target(
        fields.path, method, server.path_normalization
    )
    request = Request(
        method,
        target,
        list(fields.headers),  # the memo's list stays as validated
        body,
        http_version="2",
        client=conn.client,
        scheme=conn.scheme,
        tls_version=conn.tls_version,
        listener=conn.listener,
        client_cert=conn.client_cert,
        host=fields.authority.decode("latin-1"),
        upgrade=upgrade,
        path=path,
        query=query,
        raw_target=raw_target,
    )
    resolve_client = server.client_ip
    if resolve_client is not None:
        resolve_client(request)  # `client_ip:` (proxy/core/client_ip.py)
    return request
