"""`compress`: responses compressed with gzip, Brotli or zstd, as each client's
Accept-Encoding allows (docs/middleware/compress.md).

The coding is the one the client prefers among `encodings`, ties going to the order of
`encodings` (middleware/compress_negotiate.py). A response is compressed when all of
these hold; otherwise it goes out as the upstream sent it:

- its status is not 1xx, 204, 206 or 304, it is not a range (no Content-Range) and the
  request was not HEAD;
- it has no content coding yet (Content-Encoding absent, or `identity`), and no
  `Cache-Control: no-transform`;
- its media type is one of `content_types` (parameters ignored), and not gRPC's;
- its body is not known to be smaller than `min_size`: a declared length, or a body that
  had arrived whole by the time the head did. A body of unknown length still arriving is
  compressed: holding it back until `min_size` bytes came would delay the first event of
  a server-sent stream.

A compressed response loses its length (the front ends frame it: chunked on HTTP/1.1,
DATA frames on HTTP/2) and Accept-Ranges, and the digests of the uncompressed bytes
(Content-MD5, Digest, Content-Digest, Repr-Digest); it gets Content-Encoding, and a strong
ETag becomes weak (`W/"..."`), since the bytes are no longer the ones it named.

`Vary: Accept-Encoding` goes on every response whose coding depends on the client's
Accept-Encoding, compressed or not: a response that passed every test above but the
client's asking (a HEAD, a client that accepts no offered coding), so that a cache never
gives one client's coding to another. A 304 gets it too, as its 200 would have had
(RFC 9110 section 15.4.5), and, when the client accepted a coding, its ETag is weakened
as the 200's was. Responses that are never compressed whatever the client says (an
already encoded body, no-transform, a range, a type not listed, a small body) are left
as they are. Errors the gateway answers itself are small JSON bodies and pass through.

Every response is counted once in gatehouse_compress_responses_total: by the coding sent,
or as `identity` with the reason that kept it as it was (`SENT_AS_IS`); the body bytes of
those compressed, before and after, in gatehouse_compress_bytes_total
(docs/middleware/compress.md, "Metrics").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from metrics.definitions import COMPRESS_BYTES, COMPRESS_RESPONSES
from middleware.compress_codecs import (
    DEFAULT_LEVELS,
    LEVELS,
    LIBRARIES,
    WHOLE_BYTES,
    Coding,
    CompressedBody,
)
from middleware.compress_negotiate import MediaTypes, Negotiator, media_pattern_problem
from proxy import Body, Handler, Option, Options, Request, Response

DEFAULT_ENCODINGS = ("zstd", "br", "gzip")
DEFAULT_MIN_SIZE = 1024
# Text and the structured formats built on it, and the few binary formats that are not
# compressed already (SVG, icons, uncompressed fonts, WebAssembly).
DEFAULT_CONTENT_TYPES = (
    "text/*",
    "application/json",
    "application/*+json",
    "application/x-ndjson",
    "application/javascript",
    "application/xml",
    "application/*+xml",
    "application/yaml",
    "application/wasm",
    "image/svg+xml",
    "image/x-icon",
    "image/vnd.microsoft.icon",
    "image/bmp",
    "font/ttf",
    "font/otf",
    "application/vnd.ms-fontobject",
)
# Why a response went out as the upstream sent it (the `reason` label beside
# encoding="identity"), in the order `response_phase` decides: a status that is never
# compressed (1xx, 204, 304; a 206 counts as a range), a coding set upstream, a range,
# no-transform, a media type not listed, a body known to be small, a HEAD, a client that
# accepts no offered coding, a whole body that did not get smaller.
SENT_AS_IS = (
    "status",
    "already_encoded",
    "range",
    "no_transform",
    "content_type",
    "too_small",
    "head",
    "not_accepted",
    "incompressible",
)
# Fields that describe the bytes as the upstream sent them, dropped when they change.
_STALE_WHEN_COMPRESSED = frozenset(
    {
        b"content-length",
        b"accept-ranges",
        b"content-md5",
        b"digest",
        b"content-digest",
        b"repr-digest",
    }
)


def _values(message: Request | Response, name: bytes) -> list[str]:
    """Every value of field `name` (lowercase), without turning raw headers into a
    CIMultiDict."""
    raw = message.raw_headers
    if raw is None:
        return message.headers.getall(name.decode("latin-1"), [])
    size = len(name)
    return [
        value.decode("latin-1")
        for field, value in raw
        if len(field) == size and field.lower() == name
    ]


def _tokens(values: list[str]) -> set[str]:
    """The lowercased list elements of a field's values, each cut at '=' (directives)."""
    return {
        element.partition("=")[0].strip().lower()
        for value in values
        for element in value.split(",")
    }


class Compress:
    """Compress responses by content negotiation."""

    OPTIONS: ClassVar[dict[str, Option]] = {
        "encodings": Option.strings(
            "the codings offered (zstd, br, gzip), in the gateway's order of preference",
            DEFAULT_ENCODINGS,
        ),
        "min_size": Option.size(
            "responses known to be smaller than this are sent as they are", DEFAULT_MIN_SIZE
        ),
        "content_types": Option.strings(
            "the media types compressed: type/subtype, type/* or type/*+suffix",
            DEFAULT_CONTENT_TYPES,
        ),
        "gzip_level": Option.integer(
            "gzip's level, 1 (fastest) to 9 (smallest)",
            DEFAULT_LEVELS["gzip"],
            minimum=LEVELS["gzip"][0],
            maximum=LEVELS["gzip"][1],
        ),
        "br_level": Option.integer(
            "Brotli's quality, 0 (fastest) to 11 (smallest)",
            DEFAULT_LEVELS["br"],
            minimum=LEVELS["br"][0],
            maximum=LEVELS["br"][1],
        ),
        "zstd_level": Option.integer(
            "zstd's level, 1 (fastest) to 19 (smallest)",
            DEFAULT_LEVELS["zstd"],
            minimum=LEVELS["zstd"][0],
            maximum=LEVELS["zstd"][1],
        ),
    }
    EAGER: ClassVar[bool] = True  # awaits nothing but call_next (proxy/exchange/eager.py)
    PHASES: ClassVar[bool] = True  # request_phase, response_phase (proxy/exchange/phased.py)

    def __init__(self, options: Options) -> None:
        levels = {name: self._level(options, name) for name in LEVELS}  # all checked
        self.codings: dict[str, Coding] = {}
        for name in self._encodings(options):
            try:
                self.codings[name] = Coding(name, levels[name])
            except ImportError:
                package = LIBRARIES[name][1]
                options.error(
                    "encodings",
                    f"{name} needs the Python package {package!r}, which is not installed "
                    f"(pip install {package}); or leave {name} out of encodings",
                )
        self.negotiator = Negotiator(tuple(self.codings))
        self.min_size = options.size("min_size", DEFAULT_MIN_SIZE)
        patterns = options.strings("content_types", DEFAULT_CONTENT_TYPES)
        for pattern in patterns:
            problem = media_pattern_problem(pattern)
            if problem is not None:
                options.error("content_types", problem)
        self.types = MediaTypes(patterns)
        # The counters' children, looked up once: counting a response is one call.
        self.name = options.name
        self._sent_as_is: dict[str, Callable[[], None]] = {
            reason: COMPRESS_RESPONSES.labels(self.name, "identity", reason).inc
            for reason in SENT_AS_IS
        }
        self._compressed: dict[str, Callable[[], None]] = {
            name: COMPRESS_RESPONSES.labels(self.name, name, "compressed").inc
            for name in self.codings
        }
        self._bytes_in: Callable[[float], None] = COMPRESS_BYTES.labels(self.name, "in").inc
        self._bytes_out: Callable[[float], None] = COMPRESS_BYTES.labels(self.name, "out").inc

    @staticmethod
    def _encodings(options: Options) -> tuple[str, ...]:
        names = options.strings("encodings", DEFAULT_ENCODINGS)
        chosen: list[str] = []
        for name in names:
            if name not in LEVELS:
                options.error("encodings", f"unknown coding {name!r} (known: zstd, br, gzip)")
            elif name in chosen:
                options.error("encodings", f"{name!r} is named twice")
            else:
                chosen.append(name)
        if "encodings" in options and not names:
            options.error("encodings", "name at least one coding")
        return tuple(chosen)

    @staticmethod
    def _level(options: Options, name: str) -> int:
        key = f"{name}_level"
        low, high = LEVELS[name]
        level = options.integer(key, DEFAULT_LEVELS[name], minimum=low)
        if level > high:
            options.error(key, f"must be at most {high}, got {level}")
            return DEFAULT_LEVELS[name]
        return level

    def __repr__(self) -> str:
        return f"<Compress {','.join(self.codings)} min_size={self.min_size}>"

    # Phases (proxy/plugin/base.py): the state is the coding the client accepts ("" none).
    def request_phase(self, request: Request) -> str:
        """Read which coding the client accepts (before any later middleware changes the
        request's fields)."""
        return self.negotiator.choose(_values(request, b"accept-encoding"))

    def response_phase(self, request: Request, response: Response, state: object) -> Response:
        """Compress the response, or leave it, and say what it varies on."""
        coding_name = str(state)
        status = response.status
        if status < 200 or status in (204, 206) or response.upgrade is not None:
            self._sent_as_is["range" if status == 206 else "status"]()
            return response
        fixed = self._fixed_coding(response)
        if fixed is not None:
            self._sent_as_is[fixed]()
            return response
        content_type = response.header("content-type")
        if content_type is None:
            if status != 304:  # (a 304 usually names no type: its 200 may have been compressed)
                self._sent_as_is["content_type"]()
                return response
        elif content_type not in self.types or _is_grpc(content_type):
            self._sent_as_is["content_type"]()
            return response
        if status == 304:
            _add_vary(response)
            if coding_name:
                _weaken_etag(response)
            self._sent_as_is["status"]()
            return response
        body = response.body
        size = body.length
        head = request.method == "HEAD"
        if size is None and body.complete and not head:
            size = body.bytes_fed - body.bytes_read
        if size is not None and (size < self.min_size or size == 0):
            self._sent_as_is["too_small"]()
            return response
        _add_vary(response)
        if head:
            self._sent_as_is["head"]()
            return response
        if not coding_name:
            self._sent_as_is["not_accepted"]()
            return response
        coding = self.codings[coding_name]
        if size is not None and size <= WHOLE_BYTES and body.complete:
            data = body.take_all()
            compressed = coding.whole(data)
            if len(compressed) >= len(data):  # incompressible after all: send it as it was
                response.body = _whole(data, body)
                self._sent_as_is["incompressible"]()
                return response
            response.body = _whole(compressed, body)
            self._bytes_in(len(data))
            self._bytes_out(len(compressed))
        else:
            streamed = CompressedBody(body, coding.stream(), self._bytes_in, self._bytes_out)
            response.body = streamed.body
        self._compressed[coding_name]()
        _mark_compressed(response, coding_name)
        return response

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        coding = self.request_phase(request)
        response = await call_next(request)
        return self.response_phase(request, response, coding)

    @staticmethod
    def _fixed_coding(response: Response) -> str | None:
        """Why the response may not be given a coding, whatever the client asks (it has
        one, is a range, or says no-transform), as a reason of SENT_AS_IS; None when it
        may."""
        encodings = _tokens(_values(response, b"content-encoding"))
        if encodings - {"identity", ""}:
            return "already_encoded"
        if response.header("content-range") is not None:
            return "range"
        if "no-transform" in _tokens(_values(response, b"cache-control")):
            return "no_transform"
        return None


def _is_grpc(content_type: str) -> bool:
    """gRPC compresses its own messages (grpc-encoding) and refuses a Content-Encoding."""
    return content_type.strip().lower().startswith("application/grpc")


def _whole(data: bytes, source: Body) -> Body:
    """A complete body holding `data`, with `source`'s trailers."""
    body = Body.from_bytes(data)
    body.trailers = source.trailers
    return body


def _add_vary(response: Response) -> None:
    """Vary names Accept-Encoding (merged into the response's own Vary, once)."""
    values = _values(response, b"vary")
    tokens = _tokens(values)
    if "*" in tokens or "accept-encoding" in tokens:
        return
    kept = [value.strip() for value in values if value.strip()]
    response.set_header("Vary", ", ".join([*kept, "Accept-Encoding"]))


def _weaken_etag(response: Response) -> None:
    """A strong ETag becomes weak: it named the bytes the upstream sent."""
    etag = response.header("etag")
    if etag is not None and etag.startswith('"'):
        response.set_header("ETag", "W/" + etag)


def _mark_compressed(response: Response, coding: str) -> None:
    raw = response.raw_headers
    if raw is None:
        headers = response.headers
        for name in _STALE_WHEN_COMPRESSED:
            headers.popall(name.decode("latin-1"), None)
    else:
        response.raw_headers = [
            pair for pair in raw if pair[0].lower() not in _STALE_WHEN_COMPRESSED
        ]
    response.set_header("Content-Encoding", coding)
    _weaken_etag(response)
