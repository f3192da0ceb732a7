"""A middleware plugin as a user would write one, loaded by the tests by dotted path
(`type: tests.support.plugins.stamp:Stamp`) and through a `gatehouse.middleware` entry point.

It stamps a header on the request and on the response, can refuse requests carrying a
header, can fail to start (`fail_start: true`), and records its lifecycle hooks so tests
can see them run.
"""

from __future__ import annotations

import asyncio

from middleware.base import Handler
from middleware.options import Options
from proxy import Deferred, Pending
from proxy.core.errors import ProxyError
from proxy.core.models import Request, Response

EVENTS: list[str] = []  # "start:NAME" / "close:NAME" / "cancelled:NAME", in order
WAITS: dict[str, asyncio.Future[str]] = {}  # what a PhasedStamp's request phase waits for


class Refused(ProxyError):
    """The stamp plugin said no."""

    status, reason = 418, "stamp_refused"


class Stamp:
    """Adds `header: value` upstream and on the response; refuses `refuse_header`."""

    OPTIONS: tuple[str, ...] = ("header", "value", "refuse_header", "explode", "fail_start")
    REQUIRED = ("value",)

    def __init__(self, options: Options) -> None:
        self.name = options.name
        self.header = options.string("header", "X-Stamp")
        self.value = options.string("value")
        options.conceal("value")  # a header value it sends: /config shows it <redacted>
        if not self.value:
            options.error("value", "must not be empty")
        self.refuse_header = options.optional_string("refuse_header")
        if options.boolean("explode", False):
            raise RuntimeError("the plugin blew up while reading its options")
        self.fail_start = options.boolean("fail_start", False)

    async def start(self) -> None:
        EVENTS.append(f"start:{self.name}")
        if self.fail_start:
            raise ConnectionRefusedError("the stamp backend is not there")

    async def close(self) -> None:
        EVENTS.append(f"close:{self.name}")

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        if self.refuse_header and self.refuse_header in request.headers:
            raise Refused(f"{self.refuse_header} is not welcome")
        stamps = request.headers.get(self.header)
        request.headers[self.header] = f"{stamps},{self.value}" if stamps else self.value
        try:
            response = await call_next(request)
        except asyncio.CancelledError:
            EVENTS.append(f"cancelled:{self.name}")  # the client went away meanwhile
            raise
        response.headers.add(self.header, self.value)
        return response


class EagerStamp(Stamp):
    """The same, declaring that it awaits nothing but call_next (proxy/exchange/eager.py)."""

    EAGER = True


class Misdeclared:
    """A plugin with a bug in its declaration (OPTIONS is not a list of names): loading it
    fails inside the loader itself, which is how a bug there shows."""

    OPTIONS = 5

    def __init__(self, options: Options) -> None:  # pragma: no cover - never reached
        pass


class Answered(ProxyError):
    """An error a PhasedStamp's error phase answered."""


class PhasedStamp(EagerStamp):
    """The same as EagerStamp, offering its work as phases too (proxy/exchange/phased.py),
    and recording each: `request:NAME`, `response:NAME`, `error:NAME:STATUS`,
    `abort:NAME:STATUS`. `X-Wait-At: NAME` makes its request phase wait for a future that
    `WAITS[NAME]` holds (a test resolves it), `X-Defer-At: NAME` hands the request to its
    coroutine (`Deferred`: recorded as `deferred:NAME`, its `__call__` then runs with the
    rest of the chain), `X-Answer-At: NAME` makes it answer 203 itself,
    `X-Bug-At: NAME` makes it raise what is no ProxyError; with `answer_errors: true` its
    error phase turns an error from further in into a 299 carrying the error's reason."""

    OPTIONS = (*Stamp.OPTIONS, "answer_errors")
    PHASES = True

    def __init__(self, options: Options) -> None:
        super().__init__(options)
        self.answer_errors = options.boolean("answer_errors", False)
        if not self.answer_errors:
            self.error_phase = None  # type: ignore[assignment]  # then errors pass on

    def request_phase(self, request: Request) -> object:
        EVENTS.append(f"request:{self.name}")
        if request.header("X-Bug-At") == self.name:
            raise RuntimeError(f"{self.name} has a bug")
        if request.header("X-Wait-At") == self.name:
            waited: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            WAITS[self.name] = waited
            return Pending(waited, self._waited)
        if request.header("X-Defer-At") == self.name:
            return Deferred(lambda call_next: self._deferred(request, call_next))
        if request.header("X-Answer-At") == self.name:
            return Response(203, [(b"X-Answered-By", self.name.encode())])
        if self.refuse_header and request.header(self.refuse_header) is not None:
            raise Refused(f"{self.refuse_header} is not welcome")
        stamps = request.header(self.header)
        request.set_header(self.header, f"{stamps},{self.value}" if stamps else self.value)
        return self.value

    async def _deferred(self, request: Request, call_next: Handler) -> Response:
        EVENTS.append(f"deferred:{self.name}")
        response = await self(request, call_next)
        response.add_header("X-Deferred-By", self.name)
        return response

    def _waited(self, request: Request, result: str) -> object:
        EVENTS.append(f"resumed:{self.name}:{result}")
        if result == "refuse":
            raise Refused("refused after waiting")
        stamps = request.header(self.header)
        request.set_header(self.header, f"{stamps},{self.value}" if stamps else self.value)
        return self.value

    def response_phase(self, request: Request, response: Response, state: object) -> Response:
        EVENTS.append(f"response:{self.name}")
        response.add_header(self.header, str(state))
        return response

    def error_phase(self, request: Request, error: ProxyError, state: object) -> Response:
        EVENTS.append(f"error:{self.name}:{error.status}")
        answer = Response(299, [(b"X-Error", error.reason.encode())])
        return self.response_phase(request, answer, state)

    def abort_phase(self, request: Request, state: object, status: int) -> None:
        EVENTS.append(f"abort:{self.name}:{status}")
