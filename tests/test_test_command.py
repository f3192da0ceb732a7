"""The test command is one text: the README gives it, CONTRIBUTING.md and the docs' front
page repeat it, and `.ci/run` runs exactly it (in its virtualenv's `python`, quietly)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def commands_in(path: Path) -> list[str]:
    """The lines that install the test dependencies, in `sh` blocks or scripts."""
    return [
        line.strip().removeprefix("(").removesuffix(")")
        for line in path.read_text().splitlines()
        if line.strip().lstrip("(").startswith(".ci/system-deps &&")
    ]


def readme_command() -> str:
    [command] = commands_in(ROOT / "README.md")
    return command


@pytest.mark.parametrize("page", ["CONTRIBUTING.md", "docs/index.md"])
def test_the_pages_give_the_readmes_test_command(page: str) -> None:
    assert commands_in(ROOT / page) == [readme_command()]


def test_ci_runs_the_readmes_test_command() -> None:
    # .ci/run is inside its fresh virtualenv, where `python` is that virtualenv's, and pip
    # need not list what it installs.
    [ci] = commands_in(ROOT / ".ci" / "run")
    as_readme = re.sub(r"\bpython\b", "python3", ci).replace("install --quiet", "install")
    assert as_readme == readme_command()


def test_the_second_runs_options_are_ones_pytest_takes() -> None:
    # `--loops` is this suite's own option (tests/conftest.py): a typo in it would make
    # the second run fail at once, but only after the first run's ten minutes.
    second = readme_command().rsplit("&&", 1)[1].split()
    assert second[:4] == ["GATEHOUSE_PURE_PYTHON=1", "python3", "-m", "pytest"]
    options = [option for option in second[4:] if option != "--cov"]
    collect = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
    done = subprocess.run(
        [*collect, *options, "tests/test_test_command.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
