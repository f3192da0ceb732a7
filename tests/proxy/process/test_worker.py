"""The serving worker's collector tuning (`proxy.process.worker.tune_gc`), checked in a fresh
interpreter so the test process keeps its own settings."""

from __future__ import annotations

import subprocess
import sys

from proxy.process.worker import GC_GEN0_THRESHOLD


def test_tune_gc_freezes_start_up_objects_and_raises_the_young_threshold() -> None:
    code = (
        "import gc; from proxy.process.worker import tune_gc; tune_gc(); "
        "print(gc.get_threshold()[0], gc.get_freeze_count() > 0)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()

    assert out == [str(GC_GEN0_THRESHOLD), "True"]


def test_tune_allocator_keeps_body_sized_chunks_off_fresh_pages() -> None:
    """A worker raises glibc's mmap threshold: a 256 KiB chunk, allocated and freed over
    and over as bodies pass through, then reuses heap pages instead of faulting in new
    ones every time (the interpreter's own allocations are done before measuring)."""
    code = (
        "import resource, sys\n"
        "from proxy.process.worker import tune_allocator\n"
        "tuned = tune_allocator() if sys.argv[1] == 'tuned' else False\n"
        "chunk = b'x' * 262144\n"
        "def churn():\n"
        "    for _ in range(200):\n"
        "        copy = chunk[1:] + b'y'\n"
        "        del copy\n"
        "churn()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "churn()\n"
        "print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )

    def faults(mode: str) -> tuple[str, int]:
        out = subprocess.run(
            [sys.executable, "-c", code, mode], capture_output=True, text=True, check=True
        ).stdout.split()
        return out[0], int(out[1])

    tuned, tuned_faults = faults("tuned")
    assert tuned == "True"  # glibc: the project's machines and the image
    assert tuned_faults < 200  # not one page fault per chunk
