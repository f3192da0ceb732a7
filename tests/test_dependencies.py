"""pyproject.toml's runtime dependencies: every third-party package the gateway's code
imports is declared there (an undeclared one is installed only by luck, as a dependency of
another, at whatever version that one allows), and the floors that close known flaws hold.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The testing kit (proxy/testing) is the `testing` extra's, not the gateway's.
RUNTIME_PACKAGES = ("proxy", "middleware", "metrics")
OUR_PACKAGES = {"proxy", "middleware", "metrics", "tests"}


def _declared() -> dict[str, str]:
    """Runtime dependencies, by normalised name -> the requirement as written."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {}
    for requirement in project["dependencies"]:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement)
        assert name is not None, requirement
        declared[_normalise(name.group())] = requirement
    return declared


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_modules() -> dict[str, str]:
    """Top-level module -> the first file importing it, over the runtime packages."""
    found: dict[str, str] = {}
    for package in RUNTIME_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "testing" in path.relative_to(ROOT).parts[1:2]:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def test_every_third_party_import_of_the_gateway_is_a_declared_dependency() -> None:
    declared = _declared()
    distributions = importlib.metadata.packages_distributions()
    undeclared = []
    for module, where in sorted(_imported_modules().items()):
        if module in sys.stdlib_module_names or module in OUR_PACKAGES:
            continue
        names = {_normalise(name) for name in distributions.get(module, [module])}
        if not names & declared.keys():
            undeclared.append(f"{module} (imported by {where})")
    assert undeclared == []


def _floor(requirement: str) -> tuple[int, ...]:
    found = re.search(r">=\s*([0-9.]+)", requirement)
    assert found is not None, f"{requirement!r} has no floor"
    return tuple(int(part) for part in found.group(1).split("."))


def test_the_floors_close_the_known_flaws() -> None:
    declared = _declared()
    assert _floor(declared["h11"]) >= (0, 16)  # CVE-2025-43859, chunked-body smuggling
    # The `crit` header check middleware/jwt_auth.py relies on came with 2.12.
    assert _floor(declared["pyjwt"]) >= (2, 12)
    assert "crypto" in declared["pyjwt"]
    assert _floor(declared["cryptography"]) >= (46, 0, 5)  # CVE-2026-26007
