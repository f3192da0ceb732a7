"""Every way a config file can be refused, through the real commands and a real gateway
process: `gatehouse check` and POST /reload report each as `file:line: ...` (never a
traceback or a 500), every refused reload is counted in
`gatehouse_config_reloads_total{result="failure"}`, and the running config keeps serving.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from proxy.config.document import MAX_CONFIG_BYTES
from tests.support.admin_client import admin_config, admin_reload, metric, wait_ready
from tests.support.gateway_process import free_port, run_cli, run_gateway
from tests.support.upstreams import UpstreamServer, serve_in_thread

pytestmark = pytest.mark.socket

ROUTE = """
  - name: stable
    match: {path_prefix: /stable}
    upstream: app
    rewrite: {strip_prefix: /stable, add_prefix: /echo}
"""
DEEP = "x: " + "[" * 100_000 + "\n"
LAUGHS = (
    "l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    + "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9))
    + "listeners: *l8\n"
)
# What each file is, and the line its one error must name.
BAD_FILES: dict[str, tuple[bytes, int, str]] = {
    "deep": (DEEP.encode(), 1, "invalid YAML: nested deeper than 64 levels"),
    "laughs": (LAUGHS.encode(), 7, "invalid YAML: more than 1,000,000 values"),
    "cycle": (b"listeners: &l [*l]\n", 1, "invalid YAML: alias *l is inside the node"),
    "too-big": (b"#" * (MAX_CONFIG_BYTES + 1), 1, "larger than 1 MiB"),
    "not-utf8": (b"listeners:\n  - bind: \xff\n", 2, "cannot read: not UTF-8"),
    "public-list": (b"listeners: !public []\n", 1, "!public marks a string"),
}


@pytest.fixture
def h1_upstream() -> Iterator[UpstreamServer]:
    with serve_in_thread(UpstreamServer()) as server:
        yield server


def one_line_at(path: Path, text: str, line: int, detail: str) -> None:
    """`text` (a command's stderr, a 422's errors) says `path:line: ...detail...` first."""
    first = text.strip().splitlines()[0]
    assert first.startswith(f"{path}:{line}: "), text[:2000]
    assert detail in first
    assert "Traceback" not in text


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_check_reports_a_hostile_file_as_one_file_line_error(tmp_path: Path, kind: str) -> None:
    data, line, detail = BAD_FILES[kind]
    path = tmp_path / f"{kind}.yaml"
    path.write_bytes(data)

    result = run_cli("check", str(path))

    assert result.returncode == 1
    one_line_at(path, result.stderr, line, detail)
    assert result.stderr.strip().splitlines()[-1] == f"{path}: 1 error(s)"


def test_every_refused_reload_names_a_line_is_counted_and_changes_nothing(
    tmp_path: Path, h1_upstream: UpstreamServer
) -> None:
    port, admin = free_port(), free_port()
    good = admin_config(port, admin, h1_upstream.url, ROUTE)
    failing_middleware = good.replace(
        "routes:\n",
        "middleware:\n  stamp:\n    type: tests.support.plugins.stamp:Stamp\n    value: x\n"
        "    fail_start: true\nroutes:\n",
    ).replace(
        "rewrite: {strip_prefix: /stable",
        "middleware: [stamp]\n    rewrite: {strip_prefix: /stable",
    )
    # The instance's own line: its mapping starts on the line after `stamp:`.
    stamp_line = failing_middleware.splitlines().index("  stamp:") + 2
    refusals: list[tuple[str, bytes, int, str]] = [
        (kind, data, line, detail) for kind, (data, line, detail) in sorted(BAD_FILES.items())
    ]
    refusals += [
        ("yaml", good.replace("routes:\n", "routes: [\n").encode(), 0, "invalid YAML"),
        ("schema", good.replace("upstream: app", "upstream: nope").encode(), 0, "unknown upstream"),
        (
            "middleware-start",
            failing_middleware.encode(),
            stamp_line,
            "cannot start the new config: middleware 'stamp' cannot start: "
            "ConnectionRefusedError: the stamp backend is not there",
        ),
    ]
    with run_gateway(good, tmp_path, port=port) as gw:
        wait_ready(admin)
        for count, (kind, data, line, detail) in enumerate(refusals, start=1):
            gw.config_path.write_bytes(data)
            refused = admin_reload(admin)
            assert refused.status_code == 422, (kind, refused.text)
            errors = refused.json()["errors"]
            for error in errors:
                assert re.match(rf"{re.escape(str(gw.config_path))}:[1-9][0-9]*: ", error), error
            if line:
                one_line_at(gw.config_path, errors[0], line, detail)
            else:
                assert detail in errors[0], (kind, errors)
            assert metric(admin, "gatehouse_config_reloads_total", result="failure") == count
            assert httpx.get(f"{gw.url}/stable/x", timeout=10).status_code == 200, kind
        gw.config_path.write_text(good)
        assert admin_reload(admin).status_code == 200
        assert metric(admin, "gatehouse_config_reloads_total", result="success") == 1
        assert "reload refused, the running config stays" in gw.stderr()


def test_gatehouse_reload_of_a_hostile_file_exits_1_with_its_line(
    tmp_path: Path, h1_upstream: UpstreamServer
) -> None:
    port, admin = free_port(), free_port()
    with run_gateway(admin_config(port, admin, h1_upstream.url, ROUTE), tmp_path, port=port) as gw:
        wait_ready(admin)
        gw.config_path.write_text(DEEP)
        local = run_cli("reload", str(gw.config_path))  # refused before asking
        asked = run_cli("reload", str(gw.config_path), "--admin", f"127.0.0.1:{admin}")
        assert metric(admin, "gatehouse_config_reloads_total", result="failure") == 1
    assert local.returncode == 1
    one_line_at(gw.config_path, local.stderr, 1, "nested deeper than 64 levels")
    assert asked.returncode == 1
    one_line_at(gw.config_path, asked.stderr, 1, "nested deeper than 64 levels")
    assert "reload refused (422)" in asked.stderr


def test_check_reports_a_bug_while_loading_as_a_file_line_error_then_its_traceback(
    tmp_path: Path,
) -> None:
    path = tmp_path / "buggy.yaml"
    path.write_text(
        "listeners: [{bind: ':0'}]\nupstreams: {app: {endpoints: [http://127.0.0.1:9]}}\n"
        "middleware: {m: {type: 'tests.support.plugins.stamp:Misdeclared'}}\nroutes: []\n"
    )

    result = run_cli("check", str(path))

    assert result.returncode == 1
    first, *rest = result.stderr.splitlines()
    assert first.startswith(f"{path}:1: cannot load the config (a bug): TypeError(")
    assert rest[0] == "Traceback (most recent call last):"  # for the bug report
