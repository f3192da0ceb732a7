"""`Body.on_done`: called once when the consumer is finished with a body, however it ends
(what an access log waits for to know the bytes sent and the total time)."""

from __future__ import annotations

import pytest

from proxy.core.body import Body
from proxy.core.errors import UpstreamReset


def watched(body: Body) -> list[int]:
    calls: list[int] = []
    body.on_done = lambda: calls.append(body.bytes_read)
    return calls


async def test_called_once_when_read_to_the_end() -> None:
    body = Body(None)
    calls = watched(body)
    body.feed(b"abc")
    body.feed_eof()
    assert await body.read() == b"abc"
    assert calls == []
    assert await body.read() == b""
    assert await body.read() == b""
    assert calls == [3]


def test_called_when_taken_whole() -> None:
    body = Body.from_bytes(b"hello")
    calls = watched(body)
    assert body.take_all() == b"hello"
    assert calls == [5]


async def test_called_when_the_producer_fails() -> None:
    body = Body(None)
    calls = watched(body)
    body.fail(UpstreamReset())
    with pytest.raises(UpstreamReset):
        await body.read()
    assert calls == [0]


def test_called_once_when_discarded() -> None:
    body = Body(None)
    calls = watched(body)
    body.feed(b"xy")
    body.discard()
    body.discard()
    assert calls == [0]
