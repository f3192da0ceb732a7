"""A worker process: serves its share of the traffic until told to stop, and answers
its supervising parent (proxy/process/control.py).

The parent asks for:
- `metrics`: a snapshot of this process's registry (metrics/aggregate.py), and
  `endpoints`, what the balancers know of each endpoint that no metric says (an
  ejection's end, requests in flight: `ServerGauges.endpoint_states`), for the admin
  listener's /upstreams and status page;
- `prepare` (the config file's text, as the parent validated it) then `commit` or
  `abort`: a reload, in two steps so that every worker switches or none does
  (proxy/process/server.py);
- `acme`: the challenges its ACME orders are waiting on, and a nudge to load the
  certificates it stored (proxy/process/acme_serving.py).
The worker tells the parent `ready` once its listeners are bound. SIGTERM or SIGINT, or
the parent going away, drains it and ends it with exit code 0.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import signal
import socket
from dataclasses import replace

from metrics.aggregate import snapshot
from metrics.definitions import REGISTRY
from proxy.config.document import ConfigError
from proxy.config.load import parse_config
from proxy.config.model import Config
from proxy.process.control import Message, open_channel, serve_requests, write_message
from proxy.process.gauges import ServerGauges
from proxy.process.server import ReloadRefused, Server

log = logging.getLogger("proxy")

EXIT_OK, EXIT_START = 0, 3

# Young-generation collections every GC_GEN0_THRESHOLD allocations instead of CPython's 700:
# a request allocates ~100 short-lived objects, so the default ran a collection every few
# requests. Measured with h2load on `/` (h2c): 55.5 -> 52.5 us CPU per request.
GC_GEN0_THRESHOLD = 50_000


# glibc's allocator gives each allocation above its mmap threshold fresh pages, then
# unmaps them when freed. Bodies pass through in chunks of up to 256 KiB (a socket read),
# each a new bytes object, so every chunk paid page faults: a fifth of the CPU on /1m.
# Chunks come from the heap below this size, and up to TRIM bytes of freed heap are kept.
MALLOC_MMAP_THRESHOLD_BYTES = 1024 * 1024
MALLOC_TRIM_THRESHOLD_BYTES = 16 * 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt() parameters


def tune_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (measured on /1m: 936 to
    1522 requests per second, peak RSS 58 MB). False where there is no glibc (musl:
    nothing to tune)."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        gnu_get_libc_version = libc.gnu_get_libc_version  # glibc alone has it
    except (OSError, AttributeError):
        return False
    del gnu_get_libc_version
    return bool(
        mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES)
        and mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD_BYTES)
    )


def tune_gc() -> None:
    """For a serving worker: what start-up allocated (modules, config, route tables) is
    moved out of the collector's sight, and young collections run far less often."""
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def run_worker(
    config: Config,
    control: socket.socket | None = None,
    *,
    loop: str = "uvloop",
    reuse_port: bool = False,
) -> int:
    """Serve `config` in this process until SIGTERM/SIGINT (or the parent's channel
    closing); returns the exit code."""
    tune_allocator()
    if loop == "uvloop":
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
            return asyncio.run(_serve(config, control, reuse_port))
        return int(uvloop.run(_serve(config, control, reuse_port)))
    return asyncio.run(_serve(config, control, reuse_port))


async def _serve(config: Config, control: socket.socket | None, reuse_port: bool) -> int:
    server = Server(config)
    try:
        await server.start(reuse_port=reuse_port)
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_START
    tune_gc()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    link = None
    if control is not None:
        link = loop.create_task(_answer_parent(server, control, stop))
    await stop.wait()
    log.info("draining (grace period %.1fs)", server.config.grace_period)
    await server.shutdown()
    if link is not None:
        link.cancel()
    return EXIT_OK


async def _answer_parent(server: Server, control: socket.socket, stop: asyncio.Event) -> None:
    reader, writer = await open_channel(control)
    write_message(writer, {"event": "ready"})

    async def handle(request: Message) -> Message:
        op = request.get("op")
        if op == "metrics":
            return {
                "ok": True,
                "families": snapshot(REGISTRY),
                "endpoints": ServerGauges(server).endpoint_states(),
            }
        if op == "prepare":
            return await _prepare(server, request)
        if op == "commit":
            await server.commit_reload()
            return {"ok": True}
        if op == "abort":
            await server.abort_reload()
            return {"ok": True}
        if op == "acme":
            return {"ok": True, "errors": server.apply_acme(request)}
        if op == "cache_purge":
            purged = await server.purge_caches(
                str(request.get("middleware", "")),
                str(request.get("key", "")),
                None if request.get("prefix") is None else str(request["prefix"]),
            )
            return {"ok": True, "purged": purged}
        return {"ok": False, "errors": [f"unknown op {op!r}"]}

    try:
        await serve_requests(reader, writer, handle)
    finally:
        if not stop.is_set():
            log.error("the supervising parent went away: draining")
            stop.set()


async def _prepare(server: Server, request: Message) -> Message:
    """Parse the text the parent validated (this process builds its own middleware and
    pools from it) and prepare the switch."""
    source = request["source"]
    try:
        config = parse_config(request["text"], source=source)
    except ConfigError as exc:
        return {"ok": False, "errors": exc.errors}
    except Exception as exc:  # a bug: refused and logged, never a worker gone quiet
        log.exception("bug while loading the config for a reload")
        return {"ok": False, "errors": [f"{source}:1: cannot load the config: {exc!r}"]}
    ports = request.get("ports") or []
    if len(ports) == len(config.listeners):
        listeners = tuple(
            replace(listener, port=port)
            for listener, port in zip(config.listeners, ports, strict=True)
        )
        config = replace(config, listeners=listeners)
    try:
        await server.prepare_reload(config)
    except ReloadRefused as exc:
        return {"ok": False, "errors": exc.errors}
    return {"ok": True}
