"""The HTTP/1.1 upstream connection's body sender: it keeps a copy of a small streamed
body for a retry after the keep-alive race (`sent_body`), and building that copy costs
time linear in the number of chunks, however they trickle in. (No socket: a transport
that records what is written.)"""

from __future__ import annotations

import asyncio
import time

from proxy.config.upstream_model import EndpointConfig, PoolConfig, UpstreamTimeouts
from proxy.core.body import Body
from proxy.upstream.h1 import Http1UpstreamConnection, UpstreamConnState
from proxy.upstream.pool import UpstreamPool
from proxy.upstream.replay import REPLAY_BODY_LIMIT_BYTES
from tests.support.cost import RUNS, collector_off

# 10x the chunks may cost at most this many times the CPU time (linear: ~10).
MAX_RATIO = 20.0


class RecordingTransport:
    """The part of asyncio.Transport the sender uses: writes are kept."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False


def sender() -> tuple[Http1UpstreamConnection, RecordingTransport]:
    pool = UpstreamPool(
        EndpointConfig("http://127.0.0.1:9", "http", "127.0.0.1", 9),
        PoolConfig(),
        UpstreamTimeouts(),
        "httptools",
        32 * 1024,
    )
    conn = Http1UpstreamConnection(pool, "httptools", 32 * 1024)
    transport = RecordingTransport()
    conn.transport = transport  # type: ignore[assignment]
    conn.state = UpstreamConnState.ACTIVE
    return conn, transport


async def trickle(chunks: int) -> tuple[float, Http1UpstreamConnection, RecordingTransport]:
    """Feed a chunked body one byte at a time, each taken by the sender before the next
    comes (the client's chunks arrive slower than they are sent on); CPU seconds spent."""
    conn, transport = sender()
    body = Body(None)
    taken = asyncio.Event()
    body.on_consumed = lambda size: taken.set()
    task = asyncio.create_task(conn._send_body(body))
    with collector_off():  # tests/support/cost.py
        started = time.process_time()
        for _ in range(chunks):
            body.feed(b"a")
            await taken.wait()
            taken.clear()
        body.feed_eof()
        await task
        return time.process_time() - started, conn, transport


async def test_a_small_streamed_body_is_kept_whole_for_a_replay() -> None:
    _, conn, transport = await trickle(100)
    assert conn.sent_body == b"a" * 100
    assert b"".join(transport.written) == b"1\r\na\r\n" * 100 + b"0\r\n\r\n"


async def test_a_body_over_the_replay_limit_is_not_kept() -> None:
    _, conn, _ = await trickle(REPLAY_BODY_LIMIT_BYTES + 1)
    assert conn.sent_body is None


async def test_keeping_the_copy_costs_time_linear_in_the_chunks() -> None:
    """The copy was rebuilt per chunk ([*copy, data]): 10x the chunks cost ~30x."""
    small = min([(await trickle(4_000))[0] for _ in range(RUNS)])
    large = min([(await trickle(40_000))[0] for _ in range(RUNS)])
    assert large <= MAX_RATIO * small, (small, large)
