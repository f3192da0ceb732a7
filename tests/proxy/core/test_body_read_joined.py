"""`Body.read_joined`: the next chunk with those already buffered behind it, up to a
limit, and the same bookkeeping as `read` (bytes read, consumed windows, resume)."""

from __future__ import annotations

import asyncio

import pytest

from proxy.core.body import BODY_HIGH_WATER_BYTES, BODY_LOW_WATER_BYTES, Body
from proxy.core.errors import BadRequest


async def test_joins_what_is_buffered_and_accounts_for_all_of_it() -> None:
    body = Body(None)
    consumed: list[int] = []
    body.on_consumed = consumed.append
    for piece in (b"a", b"bc", b"def"):
        body.feed(piece)
    assert await body.read_joined() == b"abcdef"
    assert (body.bytes_read, sum(consumed)) == (6, 6)
    body.feed_eof()
    assert await body.read_joined() == b""


async def test_stops_at_the_limit_and_a_larger_chunk_comes_alone() -> None:
    body = Body(None)
    for piece in (b"aa", b"bb", b"cc", b"d" * 10, b"e"):
        body.feed(piece)
    assert await body.read_joined(limit=5) == b"aabb"
    assert await body.read_joined(limit=5) == b"cc"
    assert await body.read_joined(limit=5) == b"d" * 10
    assert await body.read_joined(limit=5) == b"e"
    assert body.bytes_read == 17


async def test_waits_for_the_first_chunk_and_takes_no_more_than_has_come() -> None:
    body = Body(None)
    reader = asyncio.ensure_future(body.read_joined())
    await asyncio.sleep(0)
    assert not reader.done()
    body.feed(b"x")
    assert await reader == b"x"


async def test_resumes_the_producer_once_drained_below_the_low_watermark() -> None:
    calls: list[str] = []
    body = Body(
        None, on_pause=lambda: calls.append("pause"), on_resume=lambda: calls.append("resume")
    )
    piece = b"p" * 1024
    for _ in range(BODY_HIGH_WATER_BYTES // len(piece) + 1):
        body.feed(piece)
    assert calls == ["pause"]
    taken = 0
    while calls == ["pause"]:
        taken += len(await body.read_joined())
    assert calls == ["pause", "resume"]
    assert taken >= BODY_HIGH_WATER_BYTES - BODY_LOW_WATER_BYTES


async def test_raises_what_the_producer_failed_with() -> None:
    body = Body(None)
    body.feed(b"ab")
    body.fail(BadRequest("broken"))
    with pytest.raises(BadRequest):
        await body.read_joined()
