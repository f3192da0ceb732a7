"""A middleware plugin the tests load as users do: by dotted path
(`type: tests.support.plugins.stamp:Stamp`), or by the entry point name `stamp-plugin`
once `install_entry_point` has run."""

from __future__ import annotations

from pathlib import Path

import pytest


def install_entry_point(directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A distribution on sys.path that declares `stamp-plugin` in the
    `gatehouse.middleware` group, as `pip install` of a plugin package would."""
    dist_info = directory / "gatehouse_stamp_plugin-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: gatehouse-stamp-plugin\nVersion: 1.0\n"
    )
    (dist_info / "entry_points.txt").write_text(
        "[gatehouse.middleware]\nstamp-plugin = tests.support.plugins.stamp:Stamp\n"
    )
    monkeypatch.syspath_prepend(str(directory))
