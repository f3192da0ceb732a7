"""The plugin surface (proxy/__init__.py): every name of `__all__` resolves to where it is
defined, importing `proxy` loads nothing else, and the built-in middleware import of the
gateway only what a plugin may (`from proxy import ...` of names in `__all__`). The same
rule is an import-linter contract in pyproject.toml (`lint-imports`)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import proxy

ROOT = Path(__file__).resolve().parents[2]
MIDDLEWARE = sorted((ROOT / "middleware").glob("*.py"))


def test_every_name_of_the_surface_resolves_to_its_definition() -> None:
    sources: dict[str, tuple[str, ...]] = proxy._SOURCES
    assert len(set(proxy.__all__)) == len(proxy.__all__)  # no name in two modules
    for module, names in sources.items():
        defining = importlib.import_module(module)
        for name in names:
            assert getattr(proxy, name) is getattr(defining, name), name
    assert set(proxy.__all__) <= set(dir(proxy))
    with pytest.raises(AttributeError, match="has no attribute 'Upstream'"):
        proxy.Upstream  # type: ignore[attr-defined]  # noqa: B018


def test_the_type_checkers_view_of_the_surface_is_the_same() -> None:
    """The re-exports under TYPE_CHECKING name what `_SOURCES` does, each from the
    same module, so that a plugin type-checks against exactly what it gets."""
    tree = ast.parse((ROOT / "proxy" / "__init__.py").read_text())
    [block] = [
        node
        for node in tree.body
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
    ]
    declared = {
        (node.module, alias.name)
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
        if alias.asname == alias.name  # `X as X`: an explicit re-export
    }
    sources: dict[str, tuple[str, ...]] = proxy._SOURCES
    assert declared == {(module, name) for module, names in sources.items() for name in names}


def test_importing_proxy_loads_nothing_else() -> None:
    """Nothing but proxy/buildinfo.py, which must choose the build before any module of
    the gateway can load."""
    code = "import proxy, sys; print(sorted(m for m in sys.modules if m.startswith('proxy.')))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert loaded.stdout.strip() == "['proxy.buildinfo']"


def test_a_middleware_imported_first_meets_no_cycle() -> None:
    # metrics.traffic imports proxy.core.errors; the surface must not need it back.
    code = "import metrics.traffic, middleware.forward_auth, middleware.jwt_auth"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def _gateway_imports(path: Path) -> list[tuple[int, str, tuple[str, ...]]]:
    """(line, module, names) of each import of `proxy` or a module under it, anywhere in
    the file (TYPE_CHECKING blocks and functions included)."""
    found: list[tuple[int, str, tuple[str, ...]]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "proxy" or alias.name.startswith("proxy."):
                    found.append((node.lineno, alias.name, ()))
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            module = node.module or ""
            if module == "proxy" or module.startswith("proxy."):
                found.append((node.lineno, module, tuple(a.name for a in node.names)))
    return found


@pytest.mark.parametrize("path", MIDDLEWARE, ids=[path.name for path in MIDDLEWARE])
def test_built_in_middleware_import_only_the_surface(path: Path) -> None:
    surface = set(proxy.__all__)
    wrong = [
        f"{path.name}:{line}: {module} {list(names)}"
        for line, module, names in _gateway_imports(path)
        if module != "proxy" or not names or not set(names) <= surface
    ]
    assert wrong == [], "middleware may import only names of proxy.__all__ from proxy"


def test_the_check_finds_what_it_must(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from typing import TYPE_CHECKING\n"
        "from proxy import Request\n"
        "import proxy.core.models\n"
        "if TYPE_CHECKING:\n"
        "    from proxy.upstream.pool import UpstreamPool\n"
    )
    assert _gateway_imports(sample) == [
        (2, "proxy", ("Request",)),
        (3, "proxy.core.models", ()),
        (5, "proxy.upstream.pool", ("UpstreamPool",)),
    ]
