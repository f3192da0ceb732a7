"""What the supervising parent asks of all its workers at once, over each worker's
channel (proxy/process/control.py): to switch to a new config (prepare on every worker,
then commit on every worker, or abort), their metrics, a cache purge. Also the parent's
record of each worker it forked (`WorkerRecord`), which those calls read and update.

Each call asks every worker given at once and waits for all of them, each within its
timeout; a worker that is gone, busy or refuses is told apart in what it returns, never
raised (proxy/process/supervisor.py decides what follows).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any

from metrics.aggregate import Snapshot
from proxy.config.model import Config
from proxy.process.admin_views import EndpointStates, purge_reply
from proxy.process.control import ChannelClosed, WorkerChannel

PREPARE_TIMEOUT_S = 30.0  # a worker builds the new config (and starts middleware) within this
COMMIT_TIMEOUT_S = 10.0
METRICS_TIMEOUT_S = 2.0  # a busy worker's last snapshot is used instead
# A cache purge walks Redis' keys under a prefix (bounded by the cache's own timeouts).
CACHE_PURGE_TIMEOUT_S = 30.0


@dataclass
class WorkerRecord:
    """One worker process as the parent knows it."""

    pid: int
    channel: WorkerChannel
    generation: int  # the config generation it was forked with
    started: float = field(default_factory=time.monotonic)
    ready: bool = False
    last_metrics: Snapshot = field(default_factory=list)
    last_endpoints: EndpointStates = field(default_factory=list)  # with its last snapshot


async def switch_workers(
    config: Config, text: str, source: str, workers: list[WorkerRecord], alive: Container[int]
) -> list[str]:
    """Prepare `config` (parsed from `text`, the file `source`) on every worker, then
    commit on every worker; on any failure, abort on every worker. The errors, or []
    when all switched. `alive`: the pids of the workers still running."""
    ports = [listener.port for listener in config.listeners]
    replies = await asyncio.gather(
        *(
            worker.channel.request(
                "prepare", PREPARE_TIMEOUT_S, text=text, source=source, ports=ports
            )
            for worker in workers
        ),
        return_exceptions=True,
    )
    errors: list[str] = []
    for worker, reply in zip(workers, replies, strict=True):
        if isinstance(reply, ChannelClosed):
            if worker.pid in alive:  # a worker that died meanwhile is no veto
                errors.append(f"{source}:1: worker {worker.pid}: {reply}")
        elif isinstance(reply, BaseException):
            raise reply
        elif not reply.get("ok"):
            refused = [f"{source}:1: worker {worker.pid} refused the config"]
            errors += [str(line) for line in reply.get("errors", refused)]
    step = "abort" if errors else "commit"
    await asyncio.gather(
        *(worker.channel.request(step, COMMIT_TIMEOUT_S) for worker in workers),
        return_exceptions=True,
    )
    return sorted(set(errors), key=errors.index)


async def collect_metrics(workers: list[WorkerRecord]) -> list[Snapshot]:
    """Each worker's metrics snapshot, asked for now; with it, each keeps its endpoint
    states for the admin views."""
    replies = await asyncio.gather(
        *(worker.channel.request("metrics", METRICS_TIMEOUT_S) for worker in workers),
        return_exceptions=True,
    )
    for worker, reply in zip(workers, replies, strict=True):
        if isinstance(reply, dict) and reply.get("ok"):
            worker.last_metrics = reply["families"]
            worker.last_endpoints = reply.get("endpoints", [])
        # else: busy or gone; its last snapshot stands in (counts never go backwards)
    return [worker.last_metrics for worker in workers]


async def purge_caches(
    workers: list[WorkerRecord], middleware: str, key: str, prefix: str | None
) -> tuple[int, dict[str, Any]]:
    """POST /cache/purge on every worker: the status and body of the answer, the counts
    summed (`purge_reply`)."""
    replies = await asyncio.gather(
        *(
            worker.channel.request(
                "cache_purge",
                CACHE_PURGE_TIMEOUT_S,
                middleware=middleware,
                key=key,
                prefix=prefix,
            )
            for worker in workers
        ),
        return_exceptions=True,
    )
    return purge_reply(
        middleware,
        [(f"worker {worker.pid}", reply) for worker, reply in zip(workers, replies, strict=True)],
    )
