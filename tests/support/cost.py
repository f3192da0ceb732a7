"""CPU cost of a piece of work, for the tests that compare N units with 10N (issue 14:
every count a client controls must cost linear time).

The figure is the least of a few runs with the garbage collector off: what else runs on
the machine, and collections that walk every live object (more of them in the bigger
run), only ever add to a run's CPU time, while a cost that grows with what came before
shows in every run.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

RUNS = 3


@contextmanager
def collector_off() -> Iterator[None]:
    """The garbage collector off for the block (back as it was after)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def least_cpu(work: Callable[[], Any], runs: int = RUNS) -> float:
    """The least CPU seconds (this process) of `runs` calls of `work`."""
    costs = []
    for _ in range(runs):
        with collector_off():
            started = time.process_time()
            work()
            costs.append(time.process_time() - started)
    return min(costs)
