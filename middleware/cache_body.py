"""A response body that streams to the client while the `cache` middleware keeps a copy.

`tee` puts a new `Body` in front of the upstream's: a task reads the upstream's chunks,
feeds each to the new body at once (the client gets it as it arrives), and keeps a copy
while the copy stays within `limit` bytes. Backpressure is the new body's: when the
client is slow and the new body pauses, the task stops reading the upstream until it
resumes. A client that goes away cancels the task, which discards the upstream's body.

`on_end` is awaited exactly once, in the task: with the whole body when it arrived
complete within `limit`, or with None when it did not (too big, failed, abandoned, or
with trailers, which the cache does not keep). A body that turns out too big is reported
as soon as it is (so that requests waiting for it go on), and streams on uncopied.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from proxy import Body

OnEnd = Callable[[bytes | None], Awaitable[None]]


def tee(source: Body, limit: int, on_end: OnEnd) -> tuple[Body, asyncio.Task[None]]:
    """The body to send to the client in place of `source`, and the task that feeds it."""
    resume = asyncio.Event()
    resume.set()
    copy = Body(source.length, on_pause=resume.clear, on_resume=resume.set)
    task = asyncio.get_running_loop().create_task(_pump(source, copy, resume, limit, on_end))
    copy.on_abandon = lambda: _cancel(task)
    return copy, task


async def _pump(source: Body, copy: Body, resume: asyncio.Event, limit: int, on_end: OnEnd) -> None:
    kept: list[bytes] | None = []
    size = 0
    try:
        while chunk := await source.read():
            if kept is not None:
                size += len(chunk)
                if size > limit:
                    kept = None
                    await on_end(None)
                else:
                    kept.append(chunk)
            copy.feed(chunk)
            if not resume.is_set():
                await resume.wait()
    except asyncio.CancelledError:  # the client went away
        source.discard()
        if kept is not None:
            await on_end(None)
        raise
    except Exception as exc:  # the upstream's body failed (a ProxyError: reset, timeout)
        copy.fail(exc)
        if kept is not None:
            await on_end(None)
        return
    copy.feed_eof(source.trailers)
    if kept is not None:
        await on_end(b"".join(kept) if not source.trailers else None)


def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
