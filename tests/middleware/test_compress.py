"""`compress` without sockets: which responses it compresses, the fields it rewrites, the
body it makes (whole or streamed), and every load-time check with its line."""

from __future__ import annotations

import random
import sys
import textwrap
import zlib

import pytest
from multidict import CIMultiDict

from middleware.compress import DEFAULT_CONTENT_TYPES, Compress
from proxy.config.document import ConfigError
from proxy.config.load import parse_config
from proxy.core.body import Body
from proxy.core.models import Request, Response

HEAD = """\
listeners: [{bind: 127.0.0.1:0}]
upstreams: {app: {endpoints: ["http://127.0.0.1:9"]}}
routes: [{match: {path: /}, upstream: app}]
middleware:
"""
TEXT = b"".join(b"line %05d of a text that compresses well\n" % i for i in range(500))


def load(section: str = "c: {type: compress}\n") -> Compress:
    config = parse_config(HEAD + textwrap.indent(textwrap.dedent(section), "  "))
    instance = config.middleware["c"].instance
    assert isinstance(instance, Compress)
    return instance


def errors_of(section: str) -> list[str]:
    with pytest.raises(ConfigError) as failed:
        parse_config(HEAD + textwrap.indent(textwrap.dedent(section), "  "))
    return str(failed.value).splitlines()


def request(accept: str | None = "gzip", method: str = "GET") -> Request:
    fields = [] if accept is None else [(b"accept-encoding", accept.encode())]
    return Request(method, b"/", fields, Body.from_bytes(b""))


def response(
    fields: list[tuple[str, str]] | None = None,
    body: Body | None = None,
    status: int = 200,
    content_type: str | None = "text/plain",
) -> Response:
    raw = [(n.lower().encode(), v.encode()) for n, v in fields or []]
    if content_type is not None:
        raw.insert(0, (b"content-type", content_type.encode()))
    return Response(status, raw, body if body is not None else Body.from_bytes(TEXT))


async def run(mw: Compress, req: Request, resp: Response) -> Response:
    async def endpoint(_: Request) -> Response:
        return resp

    return await mw(req, endpoint)


def streamed(data: bytes, pieces: int = 4) -> Body:
    """A body of unknown length with all of `data` fed but not yet ended."""
    body = Body(None)
    step = len(data) // pieces + 1
    for i in range(0, len(data), step):
        body.feed(data[i : i + step])
    return body


async def read_all(body: Body) -> bytes:
    parts = []
    while part := await body.read():
        parts.append(part)
    return b"".join(parts)


# --- load ----------------------------------------------------------------------------------


def test_defaults() -> None:
    mw = load()
    assert list(mw.codings) == ["zstd", "br", "gzip"]
    assert [c.level for c in mw.codings.values()] == [3, 4, 6]
    assert mw.min_size == 1024
    assert mw.types.patterns == DEFAULT_CONTENT_TYPES
    assert repr(mw) == "<Compress zstd,br,gzip min_size=1024>"


def test_options() -> None:
    mw = load("""\
        c:
          type: compress
          encodings: [gzip, zstd]
          min_size: 10KiB
          content_types: [text/html, application/*+json]
          gzip_level: 1
          zstd_level: 19
        """)
    assert [(c.name, c.level) for c in mw.codings.values()] == [("gzip", 1), ("zstd", 19)]
    assert mw.min_size == 10 * 1024
    assert "application/ld+json" in mw.types
    assert "text/plain" not in mw.types


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("c: {type: compress, encodings: [gzip, deflate]}", "unknown coding 'deflate'"),
        ("c: {type: compress, encodings: [br, br]}", "'br' is named twice"),
        ("c: {type: compress, encodings: []}", "name at least one coding"),
        ("c: {type: compress, content_types: ['*/*']}", "'*/*' is not a media type"),
        ("c: {type: compress, br_level: 12}", "br_level: must be at most 11, got 12"),
        ("c: {type: compress, zstd_level: 22}", "zstd_level: must be at most 19, got 22"),
        ("c: {type: compress, gzip_level: 0}", "gzip_level: must be at least 1, got 0"),
        ("c: {type: compress, min_size: lots}", "min_size: invalid size"),
        ("c: {type: compress, level: 3}", "unknown key 'level'"),
    ],
)
def test_a_wrong_option_is_a_config_error(section: str, message: str) -> None:
    errors = errors_of(section + "\n")
    assert any(message in line and line.startswith("<string>:5: ") for line in errors), errors


@pytest.mark.parametrize(("module", "coding"), [("brotli", "br"), ("zstandard", "zstd")])
def test_a_missing_library_is_a_config_error_that_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, module: str, coding: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    errors = errors_of("c: {type: compress}\n")
    assert errors == [
        f"<string>:5: middleware.c: {coding} needs the Python package "
        f"'{module}', which is not installed (pip install {module}); or leave {coding} "
        "out of encodings"
    ]
    other = "br" if coding == "zstd" else "zstd"
    assert list(load(f"c: {{type: compress, encodings: [gzip, {other}]}}\n").codings) == [
        "gzip",
        other,
    ]


# --- which responses ------------------------------------------------------------------------


async def test_a_whole_body_is_compressed_at_once() -> None:
    result = await run(load(), request("gzip"), response())
    assert result.headers["Content-Encoding"] == "gzip"
    assert result.body.complete  # still whole: the front end sends it with a length
    assert zlib.decompress(result.body.take_all(), 31) == TEXT


async def test_a_body_that_is_still_arriving_is_streamed() -> None:
    source = streamed(TEXT)
    result = await run(load(), request("gzip"), response(body=source))
    assert result.body is not source
    assert result.body.length is None
    source.feed_eof([("x-checksum", "1")])
    assert zlib.decompress(await read_all(result.body), 31) == TEXT
    assert result.body.trailers == [("x-checksum", "1")]


async def test_a_whole_body_that_does_not_shrink_goes_out_as_it_was() -> None:
    noise = random.Random(3).randbytes(5000)  # (compressed data, under a text type)
    source = Body(None)
    source.feed(noise)
    source.feed_eof([("x-t", "1")])
    result = await run(
        load("c: {type: compress, min_size: 10B}\n"), request("gzip"), response(body=source)
    )
    assert "Content-Encoding" not in result.headers
    assert result.headers["Vary"] == "Accept-Encoding"
    assert result.body.take_all() == noise
    assert result.body.trailers == [("x-t", "1")]


@pytest.mark.parametrize(
    ("body", "compressed"),
    [
        (Body.from_bytes(TEXT[:1023]), False),  # declared length below min_size
        (Body.from_bytes(TEXT[:1024]), True),
        (Body.from_bytes(b""), False),
    ],
)
async def test_min_size_against_a_declared_length(body: Body, compressed: bool) -> None:
    result = await run(load(), request("gzip"), response(body=body))
    assert ("Content-Encoding" in result.headers) is compressed
    assert ("Vary" in result.headers) is compressed


async def test_min_size_against_a_body_that_came_whole_without_a_length() -> None:
    small = Body(None)
    small.feed(TEXT[:1000])
    small.feed_eof()
    result = await run(load(), request("gzip"), response(body=small))
    assert "Content-Encoding" not in result.headers
    assert "Vary" not in result.headers
    assert result.body is small


async def test_a_body_of_unknown_length_still_arriving_is_compressed_however_small() -> None:
    tiny = streamed(b"data: hi\n\n", pieces=1)
    result = await run(load(), request("br"), response(body=tiny, content_type="text/event-stream"))
    assert result.headers["Content-Encoding"] == "br"


@pytest.mark.parametrize(
    ("fields", "status", "content_type"),
    [
        ([("Content-Encoding", "gzip")], 200, "text/plain"),
        ([("Content-Encoding", "br, identity")], 200, "text/plain"),
        ([("Cache-Control", "max-age=60, No-Transform")], 200, "text/plain"),
        ([("Content-Range", "bytes 0-9/100")], 200, "text/plain"),
        ([], 206, "text/plain"),
        ([], 204, "text/plain"),
        ([], 101, "text/plain"),
        ([], 200, "image/png"),
        ([], 200, None),
        ([], 200, "application/grpc"),
    ],
)
async def test_responses_left_alone(
    fields: list[tuple[str, str]], status: int, content_type: str | None
) -> None:
    original = response(fields, status=status, content_type=content_type)
    raw = list(original.raw_headers or [])
    body = original.body
    result = await run(load(), request("gzip, br, zstd"), original)
    assert result.raw_headers == raw  # not even converted
    assert result.body is body


async def test_content_encoding_identity_is_no_coding() -> None:
    result = await run(load(), request("zstd"), response([("Content-Encoding", "identity")]))
    assert result.headers.getall("Content-Encoding") == ["zstd"]


async def test_head_and_a_client_that_accepts_nothing_get_vary_only() -> None:
    for req in (request("gzip", "HEAD"), request(None), request("identity"), request("zstd;q=0")):
        original = response([("ETag", '"e"')], body=Body(len(TEXT)))
        body = original.body
        result = await run(load("c: {type: compress, encodings: [zstd]}\n"), req, original)
        assert result.headers["Vary"] == "Accept-Encoding"
        assert result.headers["ETag"] == '"e"'
        assert "Content-Encoding" not in result.headers
        assert result.body is body


async def test_the_accept_encoding_read_is_the_clients() -> None:
    mw = load()
    req = request("br")

    async def endpoint(request: Request) -> Response:
        request.remove_header("accept-encoding")  # (what a later middleware might do)
        return response()

    result = await mw(req, endpoint)
    assert result.headers["Content-Encoding"] == "br"


async def test_several_accept_encoding_lines_count_as_one_list() -> None:
    fields = CIMultiDict([("Accept-Encoding", "gzip;q=0.5"), ("Accept-Encoding", "br")])
    req = Request("GET", b"/", fields, Body.from_bytes(b""))
    result = await run(load(), req, response())
    assert result.headers["Content-Encoding"] == "br"


# --- the fields -----------------------------------------------------------------------------


async def test_the_fields_of_a_compressed_response() -> None:
    fields = [
        ("ETag", '"abc"'),
        ("Vary", "Origin"),
        ("Vary", "Cookie"),
        ("Accept-Ranges", "bytes"),
        ("Content-Length", str(len(TEXT))),
        ("Content-MD5", "x"),
        ("Digest", "sha-256=x"),
        ("Content-Digest", "sha-256=:x:"),
        ("Repr-Digest", "sha-256=:x:"),
        ("X-Other", "kept"),
    ]
    result = await run(load(), request("zstd"), response(fields, body=streamed(TEXT)))
    assert sorted(result.headers.items()) == sorted(
        [
            ("content-type", "text/plain"),
            ("x-other", "kept"),
            ("Vary", "Origin, Cookie, Accept-Encoding"),
            ("Content-Encoding", "zstd"),
            ("ETag", 'W/"abc"'),
        ]
    )


async def test_fields_already_read_as_a_multidict() -> None:
    original = Response(
        200,
        CIMultiDict([("Content-Type", "text/html"), ("ETag", 'W/"w"'), ("Accept-Ranges", "bytes")]),
        Body.from_bytes(TEXT),
    )
    result = await run(load(), request("gzip"), original)
    assert dict(result.headers) == {
        "Content-Type": "text/html",
        "ETag": 'W/"w"',
        "Vary": "Accept-Encoding",
        "Content-Encoding": "gzip",
    }


@pytest.mark.parametrize(
    ("vary", "expected"),
    [
        ([], ["Accept-Encoding"]),
        (["Origin"], ["Origin, Accept-Encoding"]),
        (["origin, ACCEPT-ENCODING"], ["origin, ACCEPT-ENCODING"]),
        (["*"], ["*"]),
        (["Origin", "accept-encoding"], ["Origin", "accept-encoding"]),
        ([" "], ["Accept-Encoding"]),
    ],
)
async def test_vary_is_merged_once(vary: list[str], expected: list[str]) -> None:
    result = await run(load(), request("gzip"), response([("Vary", v) for v in vary]))
    assert result.headers.getall("Vary") == expected


async def test_a_304_gets_vary_and_a_weak_etag_when_its_200_was_compressed() -> None:
    mw = load()
    not_modified = await run(
        mw, request("gzip"), response([("ETag", '"x"')], Body.from_bytes(b""), 304, None)
    )
    assert not_modified.headers["ETag"] == 'W/"x"'
    assert not_modified.headers["Vary"] == "Accept-Encoding"
    plain = await run(
        mw, request(None), response([("ETag", '"x"')], Body.from_bytes(b""), 304, None)
    )
    assert plain.headers["ETag"] == '"x"'
    assert plain.headers["Vary"] == "Accept-Encoding"
    image = response([("ETag", '"x"')], Body.from_bytes(b""), 304, "image/png")
    raw = list(image.raw_headers or [])
    assert (await run(mw, request("gzip"), image)).raw_headers == raw
