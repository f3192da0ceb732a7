"""The conftest the plugin's pytester runs use: a hygiene check around every test.

Set up before the kit's fixtures (it is autouse) and so torn down after them, it fails
the test when a task, a file descriptor (socket) or a thread that the test made is still
there once the kit's teardown is over.
"""

import asyncio
import contextlib
import os
import threading
from collections.abc import AsyncIterator

import pytest_asyncio

# Closing transports release their sockets within a few loop turns; the bound leaves a
# busy machine room (only a test that does leak waits it out).
SETTLE_S = 3.0


def open_fds() -> dict[str, str]:
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed already
            found[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return found


@pytest_asyncio.fixture(autouse=True)
async def hygiene() -> AsyncIterator[None]:
    tasks = asyncio.all_tasks()
    fds = open_fds()
    threads = set(threading.enumerate())
    yield
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_S
    while True:
        left_tasks = asyncio.all_tasks() - tasks - {asyncio.current_task()}
        left_fds = {fd: what for fd, what in open_fds().items() if fds.get(fd) != what}
        left_threads = set(threading.enumerate()) - threads
        if not (left_tasks or left_fds or left_threads) or loop.time() > deadline:
            break
        await asyncio.sleep(0.01)
    assert not left_tasks, f"tasks left behind: {left_tasks}"
    assert not left_fds, f"file descriptors left open: {sorted(left_fds.values())}"
    assert not left_threads, f"threads left running: {left_threads}"
