"""`Body.fill` (request buffering): waiting, reading nothing, for the whole body, up to a
size, or until the producer can send no more; and the producer's pause around it.
Ordered by the producer's own calls, no clock."""

from __future__ import annotations

import asyncio

import pytest

from proxy.core.body import BODY_HIGH_WATER_BYTES, Body
from proxy.core.errors import RequestTimeout


class Producer:
    """Records the pauses a body asks of its producer."""

    def __init__(self) -> None:
        self.paused = False
        self.calls: list[str] = []

    def pause(self) -> None:
        self.paused = True
        self.calls.append("pause")

    def resume(self) -> None:
        self.paused = False
        self.calls.append("resume")


def body_of(producer: Producer, **options: object) -> Body:
    return Body(None, on_pause=producer.pause, on_resume=producer.resume, **options)  # type: ignore[arg-type]


async def test_a_whole_body_ends_the_fill_and_is_taken_at_once() -> None:
    body = body_of(Producer())
    filling = asyncio.ensure_future(body.fill(1024))
    body.feed(b"ab")
    await asyncio.sleep(0)
    assert not filling.done()
    body.feed(b"cd")
    body.feed_eof()
    assert await filling is True
    assert body.take_all() == b"abcd"


async def test_more_than_the_limit_ends_the_fill_with_the_body_still_streaming() -> None:
    body = body_of(Producer())
    filling = asyncio.ensure_future(body.fill(3))
    body.feed(b"abc")
    await asyncio.sleep(0)
    assert not filling.done()  # exactly the limit: the rest may still fit
    body.feed(b"d")
    assert await filling is False
    assert await body.read() == b"abc"


async def test_the_producer_is_not_paused_below_the_limit_and_is_resumed_for_it() -> None:
    producer = Producer()
    body = body_of(producer)
    body.feed(b"x" * (BODY_HIGH_WATER_BYTES + 1))
    assert producer.calls == ["pause"]  # before the fill: the usual high watermark
    limit = 4 * BODY_HIGH_WATER_BYTES
    filling = asyncio.ensure_future(body.fill(limit))
    await asyncio.sleep(0)
    assert producer.calls == ["pause", "resume"]
    body.feed(b"x" * BODY_HIGH_WATER_BYTES)
    assert not producer.paused
    body.feed(b"x" * (2 * BODY_HIGH_WATER_BYTES))
    assert await filling is False
    body.feed(b"x")  # past the fill, the usual watermark is back
    assert producer.paused


async def test_a_full_window_ends_the_fill() -> None:
    body = body_of(Producer())
    filling = asyncio.ensure_future(body.fill(1024))
    body.feed(b"ab")
    await asyncio.sleep(0)
    assert body.waits_on_producer  # filling: the client is the slow side
    body.window_full()
    assert await filling is False
    assert not body.waits_on_producer


async def test_a_failed_body_fails_the_fill_and_ends_the_body() -> None:
    body = body_of(Producer())
    done: list[bool] = []
    body.on_done = lambda: done.append(True)
    filling = asyncio.ensure_future(body.fill(1024))
    body.feed(b"ab")
    body.fail(RequestTimeout())
    with pytest.raises(RequestTimeout):
        await filling
    assert done == [True]


async def test_filling_asks_for_a_100_continue_body_and_tells_the_producer() -> None:
    asked: list[str] = []
    body = Body(None, on_first_read=lambda: asked.append("continue"))
    body.on_fill = lambda: asked.append("fill")
    body.feed_eof()
    assert await body.fill(10) is True
    assert asked == ["continue", "fill"]
