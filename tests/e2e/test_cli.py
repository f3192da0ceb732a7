"""`gatehouse check` and `gatehouse run` as a user runs them: real subprocesses, exit codes,
and what they print (README, Commands)."""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

import pytest

from tests.support.gateway_process import free_port, gateway_config, run_cli, run_gateway

EXIT_TIMEOUT_S = 8.0  # a gateway that cannot start must say so promptly

# Three mistakes, one per line, that the loader must report together.
BROKEN_CONFIG = """\
listeners:
  - bind: 127.0.0.1:notaport
upstreams:
  app:
    endpoints: [http://127.0.0.1:9]
    timeouts: {conect: 2s}
routes:
  - match: {path_prefix: /}
    upstream: ap
"""


def test_check_accepts_the_bundled_routes_yaml() -> None:
    result = run_cli("check", "routes.yaml")
    assert result.returncode == 0, result.stderr
    assert "routes.yaml: ok" in result.stdout


def test_check_reports_every_mistake_with_file_line_and_key_path(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN_CONFIG)
    result = run_cli("check", str(path))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    expected = [
        (2, "listeners[0].bind", "notaport"),
        (6, "upstreams.app.timeouts.conect", "did you mean 'connect'"),
        (9, "routes[0].upstream", "did you mean 'app'"),
    ]
    for line_no, key_path, detail in expected:
        pattern = re.compile(rf"^{re.escape(str(path))}:{line_no}: {re.escape(key_path)}: .+")
        matching = [line for line in lines if pattern.match(line)]
        assert matching, f"no '{path}:{line_no}: {key_path}: ...' in:\n{result.stderr}"
        assert detail in matching[0]
    assert "ok" not in result.stdout


def test_check_on_a_missing_file_exits_1(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    result = run_cli("check", str(missing))
    assert result.returncode == 1
    assert str(missing) in result.stderr


def test_run_with_an_invalid_file_exits_1_and_logs_the_errors(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN_CONFIG)
    result = run_cli("run", str(path))
    assert result.returncode == 1
    assert f"{path}:6: upstreams.app.timeouts.conect:" in result.stderr
    assert f"{path}:9: routes[0].upstream:" in result.stderr


@pytest.mark.socket
@pytest.mark.parametrize("workers", ["1", "2"])
def test_run_on_a_port_in_use_exits_3(tmp_path: Path, workers: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with run_gateway(
            gateway_config(port, "http://127.0.0.1:9"),
            tmp_path,
            port=port,
            args=("--workers", workers),
            wait=False,
        ) as gateway:
            try:
                code = gateway.wait(EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"still running after {EXIT_TIMEOUT_S}s:\n{gateway.stderr()}")
            assert code == 3, gateway.stderr()
            assert "address already in use" in gateway.stderr()


@pytest.mark.socket
def test_run_serves_until_sigterm_then_exits_0(tmp_path: Path) -> None:
    port = free_port()
    with run_gateway(gateway_config(port, "http://127.0.0.1:9"), tmp_path, port=port) as gateway:
        gateway.signal(15)
        assert gateway.wait(10) == 0, gateway.stderr()


@pytest.mark.socket
@pytest.mark.parametrize("workers", ["0", "-1"])
def test_run_with_fewer_than_one_worker_is_a_usage_error(tmp_path: Path, workers: str) -> None:
    port = free_port()
    with run_gateway(
        gateway_config(port, "http://127.0.0.1:9"),
        tmp_path,
        port=port,
        args=("--workers", workers),
        wait=False,
    ) as gateway:
        try:
            code = gateway.wait(EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"--workers {workers} started a gateway:\n{gateway.stderr()}")
        assert code == 2, gateway.stderr()
        assert "at least 1" in gateway.stderr()


@pytest.mark.socket
def test_run_keeps_its_shared_directory_while_serving_and_removes_stale_ones(
    tmp_path: Path,
) -> None:
    """The directory for tables shared by the workers (the local rate limits) is named
    after the parent; one left by a gateway that was killed is removed at the next start,
    and the gateway's own is removed when it exits."""
    stale = Path("/dev/shm/gatehouse-999999999-leftover")  # above any pid_max
    stale.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with run_gateway(gateway_config(port, "http://127.0.0.1:9"), tmp_path, port=port) as gateway:
        assert not stale.exists()
        own = list(Path("/dev/shm").glob(f"gatehouse-{gateway.pid}-*"))
        assert len(own) == 1
        gateway.signal(15)
        assert gateway.wait(10) == 0, gateway.stderr()
        assert not own[0].exists()
