"""Build hook: compile the hot path with mypyc where a C compiler exists.

pyproject.toml holds the project's metadata; this file only adds the compiled build
(docs/architecture.md, "Compiled build"). The modules named by `COMPILED` in
proxy/buildinfo.py are compiled from their unchanged, type-annotated sources into one
shared library (`proxy._compiled__mypyc`) and a small extension per module; every .py
stays in the package, so the pure build is complete and GATEHOUSE_PURE_PYTHON=1 selects it
at run time. Without mypyc or a working C compiler the install goes on as the pure build
after a one-line notice; GATEHOUSE_PURE_PYTHON=1 at install time skips compiling.
"""

from __future__ import annotations

import ast
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent
NOTICE = "gatehouse: {why}; installing the pure-Python build (slower, same behaviour)"


def compiled_sources() -> list[str]:
    """The .py files of `COMPILED` (proxy/buildinfo.py), read without importing it."""
    tree = ast.parse((ROOT / "proxy" / "buildinfo.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "COMPILED":
            modules = ast.literal_eval(node.value)
            return [name.replace(".", "/") + ".py" for name in modules]
    raise RuntimeError("proxy/buildinfo.py has no COMPILED tuple")


def remove_stale_extensions() -> None:
    """Delete compiled modules an earlier in-place build (an editable install) left in the
    tree: falling back to the pure build must not leave old compiled code to run."""
    for package in ("proxy", "middleware", "metrics"):
        for stale in (ROOT / package).rglob("*.so"):
            stale.unlink()


def fall_back(why: str) -> list[object]:
    print(NOTICE.format(why=why), file=sys.stderr)
    remove_stale_extensions()  # those of this build, if it failed after writing some
    return []


class OptionalBuildExt(build_ext):
    """build_ext that falls back to the pure build instead of failing the install."""

    def build_extensions(self) -> None:
        # mypyc writes a C file per module (multi_file): compile them on every CPU.
        compile_serially = self.compiler.compile

        def compile_in_parallel(sources: list[str], *args: object, **kwargs: object) -> list[str]:
            if len(sources) < 2:
                return compile_serially(sources, *args, **kwargs)
            with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
                done = pool.map(lambda one: compile_serially([one], *args, **kwargs), sources)
                return [obj for objects in done for obj in objects]

        self.compiler.compile = compile_in_parallel
        super().build_extensions()

    def run(self) -> None:
        try:
            super().run()
        except Exception as error:  # no compiler, no Python headers: setuptools' errors
            fall_back(f"compiling failed ({error})")


def extensions() -> list[object]:
    # Whatever the outcome, no compiled module of an earlier build stays beside the
    # sources (one since dropped from COMPILED would shadow its .py).
    remove_stale_extensions()
    if os.environ.get("GATEHOUSE_PURE_PYTHON") == "1":
        return fall_back("GATEHOUSE_PURE_PYTHON=1")
    try:
        from mypyc.build import mypycify
    except ImportError:
        return fall_back("mypyc is not installed")
    # The build checks types with mypy's defaults, not the project's strict settings, and
    # never reads the dependencies' types (--no-site-packages): whether pip has installed
    # them yet must not change the compiled code, and mypyc would represent a library's
    # IntEnum typed `int` (h2's error codes) as a bare int. Their values are objects to
    # mypyc, which only specialises what it compiles itself.
    options = [
        "--config-file",
        os.devnull,
        "--no-site-packages",
        "--ignore-missing-imports",
        "--follow-imports=silent",
    ]
    try:
        built = mypycify(
            [*options, *compiled_sources()], group_name="proxy._compiled", multi_file=True
        )
    except (SystemExit, Exception) as error:  # mypy found errors: mypycify exits
        return fall_back(f"mypyc could not compile ({error})")
    for extension in built:
        # multi_file puts each module's C file in build/ and the group's headers in the
        # directory of its package (build/proxy/), which the module files must include.
        extension.include_dirs.append(os.path.join("build", "proxy"))
    return list(built)


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
