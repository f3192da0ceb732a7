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
