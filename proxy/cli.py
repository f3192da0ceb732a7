"""`gatehouse run FILE` and `gatehouse check FILE` (like `nginx -t`).

Exit codes: 0 success; 1 invalid configuration; 2 usage error; 3 could not start
(a listener failed to bind).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import replace

from proxy.config import ConfigError, load_config
from proxy.config_model import Config

log = logging.getLogger("proxy")

EXIT_OK, EXIT_CONFIG, EXIT_USAGE, EXIT_START = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gatehouse", description="Gatehouse API gateway")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="serve a routes.yaml")
    run.add_argument("config", help="path to routes.yaml")
    run.add_argument(
        "--workers", type=int, help="worker processes (default: from the file, else one per core)"
    )
    run.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    check = commands.add_parser("check", help="validate a routes.yaml and exit")
    check.add_argument("config", help="path to routes.yaml")
    return parser


# Young-generation collections every GC_GEN0_THRESHOLD allocations instead of CPython's 700:
# a request allocates ~100 short-lived objects, so the default ran a collection every few
# requests. Measured with h2load on `/` (h2c): 55.5 -> 52.5 us CPU per request.
GC_GEN0_THRESHOLD = 50_000


def tune_gc() -> None:
    """For a serving worker: what start-up allocated (modules, config, route tables) is
    moved out of the collector's sight, and young collections run far less often."""
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def run_worker(config: Config, *, loop: str = "uvloop", reuse_port: bool = False) -> int:
    """Serve `config` in this process until SIGTERM/SIGINT; returns the exit code."""
    from proxy.server import Server

    async def serve() -> int:
        server = Server(config)
        try:
            await server.start(reuse_port=reuse_port)
        except OSError as exc:
            log.error("cannot start: %s", exc)
            return EXIT_START
        tune_gc()
        await server.serve_until_signalled()
        return EXIT_OK

    if loop == "uvloop":
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
            return asyncio.run(serve())
        return int(uvloop.run(serve()))
    return asyncio.run(serve())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gatehouse` console script."""
    args = _parser().parse_args(argv)
    if args.command == "check":
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            for line in exc.errors:
                print(line, file=sys.stderr)  # noqa: T201 - the command's output
            print(f"{args.config}: {len(exc.errors)} error(s)", file=sys.stderr)  # noqa: T201
            return EXIT_CONFIG
        routes, upstreams = len(config.routes), len(config.upstreams)
        print(f"{args.config}: ok ({routes} routes, {upstreams} upstreams)")  # noqa: T201
        return EXIT_OK
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
    )
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for line in exc.errors:
            log.error("%s", line)
        return EXIT_CONFIG
    workers = args.workers if args.workers is not None else config.workers or os.cpu_count() or 1
    if workers < 1:
        log.error("--workers must be at least 1")
        return EXIT_USAGE
    if workers == 1:
        return run_worker(config, loop=args.loop)
    from proxy.supervisor import Supervisor

    supervisor = Supervisor(
        replace(config, workers=workers),
        workers,
        lambda cfg: run_worker(cfg, loop=args.loop, reuse_port=True),
    )
    return supervisor.run()
