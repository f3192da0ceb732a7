"""Which build of Gatehouse runs: the compiled hot path, or the pure-Python package.

`pip install .` compiles the modules of `COMPILED` with mypyc where a C compiler exists
(setup.py reads the tuple below); each keeps its .py source beside the extension, so the
pure-Python package is always complete. Python's import system prefers an extension to a
source file of the same name, so the compiled build runs by default.
`GATEHOUSE_PURE_PYTHON=1` in the environment makes this process (and the workers it
starts) import the .py sources instead: `select_build()`, run by proxy/__init__.py before
any of these modules can load, puts a finder for sources alone ahead of the normal ones.

`describe()` is what `gatehouse --version` prints and the `build` label of
`gatehouse_build_info` (metrics/gateway.py). docs/architecture.md, "Compiled build".
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import platform
import sys
from collections.abc import Sequence
from importlib import metadata
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

PURE_ENV = "GATEHOUSE_PURE_PYTHON"

# The hot path (issue 16): codec adapters, front ends, connection, dispatch, routing,
# forwarding, headers, the upstream connections and pools, the middleware chain and the
# common middleware. setup.py reads this tuple with ast.literal_eval: literals only.
# Never here: a module with a class whose base comes from a dependency (mypyc compiles
# without the dependencies' types, and such a class crashes: metrics/live.py), and
# proxy/codec/h2compat.py, which patches h2's classes (tests/proxy/test_buildinfo.py).
COMPILED = (
    "proxy.codec.h1",
    "proxy.codec.h1_httptools",
    "proxy.codec.h1serialize",
    "proxy.codec.h2fields",
    "proxy.core.headers",
    "proxy.core.body",
    "proxy.core.models",
    "proxy.core.canonical",
    "proxy.core.exchange",
    "proxy.core.client_ip",
    "proxy.core.forwarded",
    "proxy.core.local_reply",
    "proxy.core.ids",
    "proxy.core.tracing",
    "proxy.frontend.connection",
    "proxy.frontend.h1",
    "proxy.frontend.h2.protocol",
    "proxy.frontend.h2.request",
    "proxy.frontend.h2.conn",
    "proxy.frontend.h2.send",
    "proxy.frontend.h2.receive",
    "proxy.frontend.h2.fields",
    "proxy.frontend.h2.data",
    "proxy.frontend.h2.limits",
    "proxy.exchange.dispatch",
    "proxy.exchange.routing",
    "proxy.exchange.forward",
    "proxy.exchange.eager",
    "proxy.exchange.phased",
    "proxy.exchange.retry",
    "proxy.exchange.circuit",
    "proxy.upstream.h1",
    "proxy.upstream.pool",
    "proxy.upstream.balancer",
    "proxy.upstream.policies",
    "proxy.upstream.h2.connection",
    "proxy.upstream.h2.pool",
    "proxy.upstream.h2.stream",
    "proxy.websocket.tunnel",
    "proxy.websocket.protocol",
    "middleware.chain",
    "middleware.access_log",
    "middleware.request_id",
    "middleware.api_key",
    "middleware.auth_common",
    "middleware.rate_limit",
    "middleware.rate_limit_core",
    "middleware.rate_limit_local",
    "middleware.headers",
    "middleware.cache",
    "middleware.cache_answers",
    "middleware.cache_rules",
    "middleware.cache_key",
    "middleware.cache_store",
    "metrics.children",
    "metrics.definitions",
    "metrics.traffic",
)

_COMPILED_NAMES = frozenset(COMPILED)
_SOURCES_ONLY = (
    (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES),
    (importlib.machinery.SourcelessFileLoader, importlib.machinery.BYTECODE_SUFFIXES),
)


class _SourcesFirst(MetaPathFinder):
    """Finds the compiled modules as .py files, never as extensions. It answers for those
    alone: every other module (the packages themselves among them) is found as usual, so
    that pytest's assertion rewriter still loads the packages its plugin lives in."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        if fullname not in _COMPILED_NAMES:
            return None
        for entry in path if path is not None else sys.path:
            finder = importlib.machinery.FileFinder(entry or ".", *_SOURCES_ONLY)
            spec = finder.find_spec(fullname, target)
            if spec is not None:
                return spec
        return None


def pure_requested() -> bool:
    return os.environ.get(PURE_ENV, "") == "1"


_stale: list[str] = []  # compiled modules older than their source (a checkout, edited)


def stale_extensions() -> list[str]:
    """In a source checkout (an editable install: setup.py beside the packages), the
    compiled modules whose .py was changed after they were built. A site-packages install
    writes both at once and is never checked."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "setup.py").is_file():
        return []
    stale = []
    for name in COMPILED:
        source = root / (name.replace(".", "/") + ".py")
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            built = source.with_suffix(suffix)
            if built.is_file():
                if source.stat().st_mtime > built.stat().st_mtime:
                    stale.append(name)
                break
    return stale


def select_build() -> None:
    """Install the sources-only finder when GATEHOUSE_PURE_PYTHON=1, or when a checkout's
    compiled modules are older than their sources (then with a warning: edited code would
    otherwise not run until `pip install -e .` compiles it again). Once per process."""
    if any(isinstance(f, _SourcesFirst) for f in sys.meta_path):
        return
    if not pure_requested():
        _stale[:] = stale_extensions()
        if not _stale:
            return
        sys.stderr.write(
            f"gatehouse: {len(_stale)} compiled module(s) older than their source "
            f"({_stale[0]}, ...); running the pure-Python build. `pip install -e .` "
            "compiles them again.\n"
        )
    sys.meta_path.insert(0, _SourcesFirst())


def compiled_modules() -> list[str]:
    """The modules of `COMPILED` that this process runs (or would import) compiled."""
    compiled = []
    for name in COMPILED:
        module = sys.modules.get(name)
        origin = getattr(module, "__file__", None) if module is not None else None
        if origin is None:
            spec = importlib.util.find_spec(name)
            origin = spec.origin if spec is not None else None
        if origin is not None and origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
            compiled.append(name)
    return compiled


def build_kind() -> str:
    """'compiled' when every hot module is, 'partial' when some are, else 'pure'."""
    count = len(compiled_modules())
    if count == len(COMPILED):
        return "compiled"
    return "partial" if count else "pure"


def describe() -> str:
    """One line: the build and why, e.g. 'compiled (mypyc: 43 of 43 hot modules)'."""
    count = len(compiled_modules())
    if count:
        return f"{build_kind()} (mypyc: {count} of {len(COMPILED)} hot modules)"
    if pure_requested():
        return f"pure Python ({PURE_ENV}=1)"
    if _stale:
        return "pure Python (the compiled modules are older than their sources)"
    return "pure Python (installed without the compiled modules)"


DISTRIBUTION = "gatehouse-proxy"  # the name pip knows it by (pyproject.toml)


def version() -> str:
    """The installed distribution's version ('unknown' in a source tree never installed)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


# The libraries whose versions decide how the data path behaves, for `--version`.
REPORTED_LIBRARIES = ("h2", "httptools", "uvloop")


def library_version(name: str) -> str:
    """The installed version of distribution `name`, or 'not installed'."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def version_line() -> str:
    """`gatehouse --version`: 'gatehouse 0.1.0, compiled (mypyc: ...), CPython 3.11.7,
    h2 4.3.0, httptools 0.6.4, uvloop 0.21.0'."""
    python = f"{platform.python_implementation()} {platform.python_version()}"
    libraries = ", ".join(f"{name} {library_version(name)}" for name in REPORTED_LIBRARIES)
    return f"gatehouse {version()}, {describe()}, {python}, {libraries}"
