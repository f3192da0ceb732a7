"""`Body.tap`: every chunk the consumer takes, in order, then b"" at the end it reads,
however it takes them (`read`, `read_joined`, `take_all`); what a route's mirror copies a
streaming body with (proxy/exchange/mirror.py)."""

from __future__ import annotations

from proxy.core.body import Body


def tapped(body: Body) -> list[bytes]:
    taken: list[bytes] = []
    body.tap = taken.append
    return taken


async def test_read_gives_each_chunk_then_the_end() -> None:
    body = Body()
    taken = tapped(body)
    body.feed(b"one")
    body.feed(b"two")
    assert await body.read() == b"one"
    assert taken == [b"one"]
    body.feed_eof()
    assert await body.read() == b"two"
    assert await body.read() == b""
    assert taken == [b"one", b"two", b""]


async def test_read_joined_gives_the_chunks_it_joins() -> None:
    body = Body()
    taken = tapped(body)
    for part in (b"a", b"b", b"c"):
        body.feed(part)
    body.feed_eof()
    assert await body.read_joined() == b"abc"
    assert await body.read_joined() == b""
    assert b"".join(taken) == b"abc"
    assert taken[-1] == b""


async def test_take_all_gives_the_whole_body_and_the_end() -> None:
    body = Body()
    taken = tapped(body)
    body.feed(b"x" * 10)
    body.feed(b"y")
    body.feed_eof()
    assert body.take_all() == b"x" * 10 + b"y"
    assert taken == [b"x" * 10 + b"y", b""]


async def test_an_untapped_body_reads_as_before() -> None:
    body = Body()
    body.feed(b"data")
    body.feed_eof()
    assert body.tap is None
    assert await body.read_joined() == b"data"
    assert await body.read() == b""
