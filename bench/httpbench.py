#!/usr/bin/env python3
"""httpbench: reverse proxies against nginx, same run, same machine (the `harness` package).

Starts an nginx origin, the anchors (`direct`: the origin itself; `nginx`: nginx as a
reverse proxy, one worker) and every proxy under test (`--proxy NAME=COMMAND`, with
`--config NAME=TEMPLATE` rendered into `{config}`), each on free 127.0.0.1 ports in a
session of its own. Then, for each path (and over h2c with `--h2c`), it warms every
target up and loads them in turn for `--repeats` interleaved rounds of `--duration`
seconds (wrk for HTTP/1.1, h2load for h2c), reading the CPU time of each target's
processes from /proc around every run. It prints medians, the same-round ratios of each
proxy to the anchors and, last, `ratio_vs_nginx=R`. Standard library only; `--help` for
the options, bench/README.md for the method.
"""

import signal
import sys
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.cli import log, main


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


if __name__ == "__main__":
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        log("interrupted; every server started was stopped")
        sys.exit(130)
