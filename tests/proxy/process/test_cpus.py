"""The default worker count: CPUs the process may use, under a cgroup CPU limit."""

from __future__ import annotations

import os
from pathlib import Path

from proxy.process.cpus import cgroup_cpu_quota, usable_cpus


def test_cgroup_v2_quota_is_read_in_cpus(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(tmp_path) == 1.5


def test_cgroup_v2_without_a_limit_has_no_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None


def test_cgroup_v1_quota_is_read_and_minus_one_means_none(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    assert cgroup_cpu_quota(tmp_path) == 0.5
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(tmp_path) is None


def test_a_quota_rounds_up_and_never_exceeds_the_cpus_we_may_run_on(tmp_path: Path) -> None:
    allowed = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path) == allowed  # no cgroup files: affinity alone
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert usable_cpus(tmp_path) == 1  # half a CPU still gets one worker
    (tmp_path / "cpu.max").write_text(f"{(allowed + 8) * 100000} 100000\n")
    assert usable_cpus(tmp_path) == allowed
