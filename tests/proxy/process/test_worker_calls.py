"""proxy.process.worker_calls: what the parent asks of all its workers at once, against
workers answering over real socketpairs (control.py's serve_requests): the config switch
commits only when every worker prepared, and aborts on every worker otherwise, a worker
that died meanwhile is no veto, and a worker that cannot answer keeps its last metrics."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from proxy.config.model import Config, ListenerConfig
from proxy.process.control import Message, WorkerChannel, open_channel, serve_requests
from proxy.process.worker_calls import (
    WorkerRecord,
    collect_metrics,
    purge_caches,
    switch_workers,
)

pytestmark = pytest.mark.socket

CONFIG = Config(
    listeners=(ListenerConfig(host="127.0.0.1", port=8080, name="main"),),
    upstreams={},
    routes=(),
)
Answer = Callable[[Message], Awaitable[Message]]


@dataclass
class FakeWorker:
    """A worker's end of the channel: answers each request with `answer`, and keeps the
    requests it was sent."""

    record: WorkerRecord
    answer: Answer
    seen: list[Message] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    writer: asyncio.StreamWriter | None = None

    async def handle(self, request: Message) -> Message:
        self.seen.append(request)
        return await self.answer(request)

    def ops(self) -> list[str]:
        return [str(request["op"]) for request in self.seen]

    async def go_away(self) -> None:
        """The worker's process is gone: its end of the channel closes, and the parent's
        with it (as when the parent reaps it)."""
        assert self.task is not None
        assert self.writer is not None
        self.task.cancel()
        await asyncio.wait({self.task})
        self.writer.close()
        await self.writer.wait_closed()
        await self.record.channel.aclose()


def ok(**fields: object) -> Answer:
    async def answer(request: Message) -> Message:
        return {"ok": True, **fields}

    return answer


def refusing(*errors: str) -> Answer:
    async def answer(request: Message) -> Message:
        if request["op"] == "prepare":
            return {"ok": False, "errors": list(errors)}
        return {"ok": True}

    return answer


Spawn = Callable[[int, Answer], Awaitable[FakeWorker]]


@pytest.fixture
async def spawn() -> AsyncIterator[Spawn]:
    workers: list[FakeWorker] = []

    async def make(pid: int, answer: Answer) -> FakeWorker:
        parent_sock, worker_sock = socket.socketpair()
        channel = WorkerChannel(parent_sock, lambda event: None)
        await channel.start()
        worker = FakeWorker(WorkerRecord(pid, channel, generation=0), answer)
        reader, worker.writer = await open_channel(worker_sock)
        worker.task = asyncio.get_running_loop().create_task(
            serve_requests(reader, worker.writer, worker.handle)
        )
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        if worker.task is not None and not worker.task.done():
            await worker.go_away()
        await worker.record.channel.aclose()


async def test_every_worker_prepares_then_every_worker_commits(spawn: Spawn) -> None:
    first, second = await spawn(11, ok()), await spawn(12, ok())

    errors = await switch_workers(
        CONFIG, "text", "routes.yaml", [first.record, second.record], {11, 12}
    )

    assert errors == []
    assert first.ops() == second.ops() == ["prepare", "commit"]
    assert first.seen[0]["ports"] == [8080]
    assert (first.seen[0]["text"], first.seen[0]["source"]) == ("text", "routes.yaml")


async def test_one_refusal_aborts_on_every_worker_with_its_errors_once(spawn: Spawn) -> None:
    error = "routes.yaml:3: routes[0].upstream: no upstream named 'gone'"
    first, second = await spawn(11, refusing(error)), await spawn(12, refusing(error))
    third = await spawn(13, ok())
    workers = [first.record, second.record, third.record]

    errors = await switch_workers(CONFIG, "text", "routes.yaml", workers, {11, 12, 13})

    assert errors == [error]
    assert first.ops() == second.ops() == third.ops() == ["prepare", "abort"]


async def test_a_worker_that_died_meanwhile_is_no_veto(spawn: Spawn) -> None:
    gone, serving = await spawn(11, ok()), await spawn(12, ok())
    await gone.go_away()

    workers = [gone.record, serving.record]
    assert await switch_workers(CONFIG, "text", "routes.yaml", workers, {12}) == []
    assert serving.ops() == ["prepare", "commit"]

    # Still counted among the living, its silence refuses the switch.
    errors = await switch_workers(CONFIG, "text", "routes.yaml", workers, {11, 12})
    assert len(errors) == 1
    assert errors[0].startswith("routes.yaml:1: worker 11: ")
    assert serving.ops() == ["prepare", "commit", "prepare", "abort"]


async def test_metrics_are_each_workers_answer_or_its_last_one(spawn: Spawn) -> None:
    families = [{"name": "gatehouse_requests", "samples": []}]
    endpoints = [{"upstream": "api", "endpoint": "10.0.0.1:80"}]
    answering = await spawn(11, ok(families=families, endpoints=endpoints))
    gone = await spawn(12, ok())
    gone.record.last_metrics = [{"name": "before", "samples": []}]
    await gone.go_away()

    snapshots = await collect_metrics([answering.record, gone.record])

    assert snapshots == [families, [{"name": "before", "samples": []}]]
    assert answering.record.last_endpoints == endpoints


async def test_a_purge_asks_every_worker_and_sums_their_counts(spawn: Spawn) -> None:
    first, second = (
        await spawn(11, ok(purged={"pages": 2})),
        await spawn(12, ok(purged={"pages": 1})),
    )

    status, body = await purge_caches([first.record, second.record], "pages", "/a", None)

    assert (status, body["purged"]) == (200, {"pages": 3})
    assert first.ops() == second.ops() == ["cache_purge"]
    assert (first.seen[0]["middleware"], first.seen[0]["key"]) == ("pages", "/a")
