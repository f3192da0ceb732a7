"""`request_id`: every request gets an id, the upstream sees it, and the client gets it back.

The client's `X-Request-ID` is kept when it is sane (`trust_incoming`, on by default: a
gateway behind another proxy continues its trace), else a new one is made (32 hex
digits). The id is sent upstream in the same header, set on the response, and is the
`request_id` of the gateway's own error bodies and of the access log.
"""

from __future__ import annotations

import re
from typing import ClassVar

from proxy import Handler, Option, Options, Request, Response, new_request_id

# What an incoming id may look like: short, printable, no separators that could smuggle
# another header or break a log line.
_SANE_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


class RequestId:
    """Generate or propagate the request id header."""

    OPTIONS: ClassVar[dict[str, Option]] = {
        "header": Option.string("the header that carries the id", "X-Request-ID"),
        "trust_incoming": Option.boolean("keep a sane id the client sent", True),
        "response": Option.boolean("echo the id to the client", True),
    }
    EAGER: ClassVar[bool] = True  # awaits nothing but call_next (proxy/exchange/eager.py)
    PHASES: ClassVar[bool] = True  # request_phase, response_phase (proxy/exchange/phased.py)

    def __init__(self, options: Options) -> None:
        self.header = options.string("header", "X-Request-ID")
        self.trust_incoming = options.boolean("trust_incoming", True)
        self.on_response = options.boolean("response", True)  # echo it to the client

    # Phases (proxy/plugin/base.py): what `__call__` does, as two plain calls.
    def request_phase(self, request: Request) -> str:
        """Give the request its id; the id is the phase's state."""
        incoming = request.header(self.header) if self.trust_incoming else None
        if incoming and _SANE_ID.fullmatch(incoming):
            request_id = incoming
        else:
            request_id = new_request_id()
            request.set_header(self.header, request_id)  # replaces a missing or unsafe one
        request.request_id = request_id
        return request_id

    def response_phase(self, request: Request, response: Response, state: object) -> Response:
        """Echo the id to the client."""
        if self.on_response:
            response.set_header(self.header, str(state))
        return response

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        request_id = self.request_phase(request)
        response = await call_next(request)
        return self.response_phase(request, response, request_id)
