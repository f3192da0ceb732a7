"""`body_limit`: a cap on the request body, for the routes (or the whole gateway) whose
chain names it.

It is the route's `max_body_size` as middleware, on the same mechanism: a declared
`Content-Length` above `max` (or a body already past it) is answered 413 `body_too_large`
at once, before a byte of the body is read (so a client that sent `Expect: 100-continue`
never uploads); a body without a declared length (chunked, or HTTP/2 DATA frames) is cut
off with 413 when the bytes received pass `max` (`Body.limit`: feeding past it fails the
body, whoever reads it gets the error). The smaller of this limit, the route's and the
global one wins. WebSocket handshakes are left alone: their "body" is the tunnel.
"""

from __future__ import annotations

from typing import ClassVar

from proxy import BodyTooLarge, Handler, Option, Options, Request, Response


class BodyLimit:
    """Refuse request bodies larger than `max` bytes with 413."""

    OPTIONS: ClassVar[dict[str, Option]] = {
        "max": Option.size("the largest request body, in bytes (413 beyond)", required=True),
    }
    EAGER = True  # awaits nothing but call_next (proxy/exchange/eager.py)
    REQUIRED = ("max",)

    def __init__(self, options: Options) -> None:
        self.max_bytes = options.size("max", 0)

    def __repr__(self) -> str:
        return f"<BodyLimit max={self.max_bytes}>"

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        if not request.upgrade:
            body = request.body
            limit = self.max_bytes
            if (body.length or 0) > limit or body.bytes_fed > limit:
                raise BodyTooLarge()
            if body.limit is None or body.limit > limit:
                body.limit = limit
        return await call_next(request)
