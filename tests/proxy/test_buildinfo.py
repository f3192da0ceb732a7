"""proxy/buildinfo.py: which build runs, and what may be compiled."""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.metadata
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from proxy import buildinfo

ROOT = Path(__file__).resolve().parents[2]
OURS = {"proxy", "middleware", "metrics"}
EXTENSIONS = importlib.machinery.EXTENSION_SUFFIXES


def _source(module: str) -> Path:
    return ROOT / (module.replace(".", "/") + ".py")


@pytest.mark.parametrize("module", buildinfo.COMPILED)
def test_no_compiled_class_derives_from_a_dependency(module: str) -> None:
    """mypyc compiles without the dependencies' types (setup.py), and a compiled class
    whose base it cannot see crashes the process when used (it did: a prometheus
    Collector, an h2 configuration)."""
    tree = ast.parse(_source(module).read_text())
    foreign: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            top = node.module.partition(".")[0]
            if top not in OURS and top not in sys.stdlib_module_names:
                foreign.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.partition(".")[0]
                if top not in OURS and top not in sys.stdlib_module_names:
                    foreign.add((alias.asname or alias.name).partition(".")[0])
    classes = [node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]
    for cls in classes:
        for base in cls.bases:
            root = ast.unparse(base).partition(".")[0].partition("[")[0]
            assert root not in foreign, f"{module}.{cls.name} derives from {root}"


def test_the_compiled_modules_exist_and_h2compat_is_not_one() -> None:
    assert all(_source(module).is_file() for module in buildinfo.COMPILED)
    assert "proxy.codec.h2compat" not in buildinfo.COMPILED  # it patches h2's classes


def _environment(**env: str) -> dict[str, str]:
    """This process's environment without GATEHOUSE_PURE_PYTHON, plus `env`."""
    return {**{k: v for k, v in os.environ.items() if k != buildinfo.PURE_ENV}, **env}


def _run(code: str, **env: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=_environment(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


def test_pure_python_env_imports_every_compiled_module_from_its_source() -> None:
    code = (
        "import importlib, proxy.buildinfo as b\n"
        "print(all(importlib.import_module(m).__file__.endswith('.py') for m in b.COMPILED))\n"
        "print(b.build_kind(), b.describe())"
    )
    assert _run(code, GATEHOUSE_PURE_PYTHON="1").splitlines() == [
        "True",
        "pure pure Python (GATEHOUSE_PURE_PYTHON=1)",
    ]


def test_version_line_names_the_build_python_and_the_data_path_libraries() -> None:
    line = _run("import proxy.buildinfo as b; print(b.version_line())", GATEHOUSE_PURE_PYTHON="1")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # The installed distribution is found under its own name (not PyPI's other gatehouse).
    assert project["name"] == buildinfo.DISTRIBUTION
    assert line.startswith(f"gatehouse {project['version']}, ")
    assert ", pure Python (GATEHOUSE_PURE_PYTHON=1), CPython 3." in line
    for name in ("h2", "httptools", "uvloop"):
        assert f", {name} {importlib.metadata.version(name)}" in line


def test_the_version_of_a_library_not_installed_says_so() -> None:
    assert buildinfo.library_version("no-such-distribution-here") == "not installed"


def test_an_edited_checkout_runs_its_sources_and_says_why(tmp_path: Path) -> None:
    """A compiled module older than its source (an edit since `pip install -e .`) would
    run the old code: the checkout runs the pure build instead, with one line of why."""
    compiled = [_source(m).with_suffix(s) for m in buildinfo.COMPILED for s in EXTENSIONS]
    assert any(path.is_file() for path in compiled), "not built: run `pip install -e .`"
    source = _source(buildinfo.COMPILED[0])
    stamp = source.stat()
    try:
        source.touch()  # newer than its extension
        done = subprocess.run(
            [sys.executable, "-c", "import proxy.buildinfo as b; print(b.describe())"],
            cwd=ROOT,
            env=_environment(),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    finally:
        os.utime(source, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert done.stdout.strip() == "pure Python (the compiled modules are older than their sources)"
    assert "older than their source" in done.stderr
    assert "pip install -e ." in done.stderr


def test_gatehouse_version_prints_the_line_whole_at_any_terminal_width() -> None:
    # argparse's own version action re-wrapped it at COLUMNS, splitting "h2" from its
    # version on an 80-column terminal.
    env = {**os.environ, "COLUMNS": "40", "GATEHOUSE_PURE_PYTHON": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "--version"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    expected = _run(
        "import proxy.buildinfo as b; print(b.version_line())", GATEHOUSE_PURE_PYTHON="1"
    )
    assert done.stdout == expected + "\n"
