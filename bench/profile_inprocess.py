#!/usr/bin/env python3
"""cProfile one Gatehouse tree in process while an outside load runs (a bench aid).

    bench/profile_inprocess.py TREE PORT UPSTREAM OUT [--seconds 8] [--warmup 2]

TREE is a checkout of this repository (a git worktree of another commit, say); the
gateway of that tree serves 127.0.0.1:PORT with one route to UPSTREAM (host:port) in
this process, and after the warm-up its event loop is profiled for the given seconds
into OUT (pstats). Drive the load from outside meanwhile (wrk, h2load) and compare two
trees' profiles per request, e.g. by the calls of a function that runs once per request.
Both layouts of the tree are understood (before and after the package move of issue 15).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import sys
import time

CONFIG = """
listeners:
  - bind: 127.0.0.1:{port}
workers: 1
upstreams:
  origin:
    endpoints: [http://{upstream}]
routes:
  - name: all
    match: {{path_prefix: /}}
    upstream: origin
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tree")
    parser.add_argument("port", type=int)
    parser.add_argument("upstream")
    parser.add_argument("out")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.tree))
    import uvloop

    try:
        from proxy.config.load import parse_config
        from proxy.process.server import Server
    except ImportError:  # the layout before issue 15
        from proxy.config import parse_config  # type: ignore[attr-defined,no-redef]
        from proxy.server import Server  # type: ignore[import-not-found,no-redef]
    config = parse_config(CONFIG.format(port=args.port, upstream=args.upstream), "bench.yaml")

    async def serve() -> None:
        server = Server(config)
        await server.start()
        print("ready", flush=True)
        await asyncio.sleep(args.warmup)
        profile = cProfile.Profile()
        started = time.process_time()
        profile.enable()
        await asyncio.sleep(args.seconds)
        profile.disable()
        print(f"cpu_s={time.process_time() - started:.3f}", flush=True)
        profile.dump_stats(args.out)
        os._exit(0)  # no drain: the load is still running

    uvloop.run(serve())


if __name__ == "__main__":
    main()
