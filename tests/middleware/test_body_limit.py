"""`body_limit` without sockets: a declared length over the limit is refused before the
body is read, a streamed body is cut off when it passes the limit, the smallest limit
wins, and its option errors."""

from __future__ import annotations

import asyncio
import textwrap

import pytest
from multidict import CIMultiDict

from middleware.body_limit import BodyLimit
from proxy.config.document import ConfigError
from proxy.config.load import parse_config
from proxy.core.body import Body
from proxy.core.errors import BodyTooLarge
from proxy.core.models import Request, Response

HEAD = """\
listeners: [{bind: 127.0.0.1:0}]
upstreams: {app: {endpoints: ["http://127.0.0.1:9"]}}
routes: [{match: {path: /}, upstream: app}]
middleware:
"""


def load(size: str) -> BodyLimit:
    instance = parse_config(HEAD + f"  b: {{type: body_limit, max: {size}}}\n").middleware["b"]
    assert isinstance(instance.instance, BodyLimit)
    return instance.instance


def make_request(body: Body, upgrade: str = "") -> Request:
    return Request("POST", b"/upload", CIMultiDict(), body, upgrade=upgrade)


class Reader:
    """The rest of the chain: reads the whole body, like the forwarder does."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, request: Request) -> Response:
        self.calls += 1
        while await request.body.read():
            pass
        return Response(200)


async def test_a_declared_length_over_the_limit_is_refused_before_reading() -> None:
    body = Body(1025)  # Content-Length: 1025, nothing received yet
    reader = Reader()
    with pytest.raises(BodyTooLarge):
        await load("1KiB")(make_request(body), reader)
    assert reader.calls == 0
    assert body.bytes_read == 0


async def test_a_declared_length_at_the_limit_passes() -> None:
    body = Body(1024)
    body.feed(b"x" * 1024)
    body.feed_eof()
    response = await load("1KiB")(make_request(body), Reader())
    assert response.status == 200
    assert body.bytes_read == 1024


async def test_a_streamed_body_is_cut_off_when_it_passes_the_limit() -> None:
    body = Body(None)  # chunked: no declared length
    body.feed(b"x" * 6)
    reader = Reader()
    task = asyncio.create_task(load("10")(make_request(body), reader))
    await asyncio.sleep(0)  # the reader took the 6 bytes and waits for more
    assert body.bytes_read == 6
    body.feed(b"y" * 6)  # 12 bytes > 10: the body fails, its reader gets the error
    with pytest.raises(BodyTooLarge):
        await asyncio.wait_for(task, 5)
    assert body.limit == 10
    assert body.bytes_read == 6


async def test_bytes_already_received_over_the_limit_are_refused_at_once() -> None:
    body = Body(None)
    body.feed(b"z" * 20)
    reader = Reader()
    with pytest.raises(BodyTooLarge):
        await load("16B")(make_request(body), reader)
    assert reader.calls == 0


async def test_the_smaller_limit_wins() -> None:
    route_limited = Body(None)
    route_limited.limit = 100  # the route's max_body_size, set before the chain runs
    route_limited.feed_eof()
    await load("1MiB")(make_request(route_limited), Reader())
    assert route_limited.limit == 100
    tighter = Body(None)
    tighter.limit = 100
    tighter.feed_eof()
    await load("50B")(make_request(tighter), Reader())
    assert tighter.limit == 50


async def test_a_zero_limit_allows_only_empty_bodies() -> None:
    assert (await load("0")(make_request(Body.from_bytes(b"")), Reader())).status == 200
    with pytest.raises(BodyTooLarge):
        await load("0")(make_request(Body.from_bytes(b"x")), Reader())


async def test_websocket_handshakes_are_left_alone() -> None:
    body = Body(None)
    body.feed(b"frames" * 10)

    async def tunnel(request: Request) -> Response:
        return Response(101)

    response = await load("8B")(make_request(body, upgrade="websocket"), tunnel)
    assert response.status == 101
    assert body.limit is None


def test_option_errors() -> None:
    section = """\
        a: {type: body_limit}
        b: {type: body_limit, max: 1XB}
        c: {type: body_limit, max: -1}
        d: {type: body_limit, max: 1MiB, min: 1}
    """
    with pytest.raises(ConfigError) as failed:
        parse_config(HEAD + textwrap.indent(textwrap.dedent(section), "  "))
    assert str(failed.value).splitlines() == [
        "<string>:5: middleware.a: missing required key 'max'",
        "<string>:6: middleware.b.max: invalid size '1XB': unknown unit 'XB' (e.g. '512B', "
        "'16KiB' or '16Ki', '1MiB' or '1Mi', '1GiB', '10KB' or '10k', '10MB' or '10M', or a "
        "number of bytes)",
        "<string>:7: middleware.c.max: invalid size -1: must not be negative",
        "<string>:8: middleware.d.min: unknown key 'min' (expected one of: type, max)",
    ]
