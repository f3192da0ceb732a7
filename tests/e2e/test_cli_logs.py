"""Process logs as JSON (`--log-format json`, `logging: {format: json}`): the gateway as a
user runs it, every line of its stderr one JSON object, the flag over the file, and the
config errors of a refused start in the same form."""

from __future__ import annotations

import json
import logging
import re
import signal
import sys
from pathlib import Path

import pytest

from proxy.config.load import parse_config
from proxy.process.logs import JsonFormatter
from tests.support.config_helpers import BASE, one_error
from tests.support.gateway_process import (
    free_port,
    gateway_config,
    run_cli,
    run_gateway,
    wait_until,
)

KEYS = {"time", "level", "logger", "pid", "message"}
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def json_lines(stderr: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    for line in lines:
        assert line.keys() >= KEYS, line
        assert TIME.fullmatch(str(line["time"])), line
    return lines


def served_and_stopped(tmp_path: Path, *args: str) -> tuple[int, str]:
    """Start a gateway whose file asks for JSON logs (with `args`), stop it with SIGTERM
    once it listens: (the supervisor's pid, what it logged)."""
    port = free_port()
    config = gateway_config(port, "http://127.0.0.1:9", extra="logging: {format: json}\n")
    with run_gateway(config, tmp_path, port=port, args=args) as gateway:
        gateway.signal(15)
        assert gateway.wait(10) == 0, gateway.stderr()
        return gateway.pid, gateway.stderr()


@pytest.mark.socket
def test_logging_format_json_in_the_file_makes_every_line_json(tmp_path: Path) -> None:
    pid, stderr = served_and_stopped(tmp_path, "--workers", "2")
    lines = json_lines(stderr)
    supervisor = [line for line in lines if line["pid"] == pid]
    assert any("supervising 2 workers" in str(line["message"]) for line in supervisor)
    assert {line["level"] for line in lines} <= {"INFO", "WARNING"}


@pytest.mark.socket
def test_the_flag_wins_over_the_file(tmp_path: Path) -> None:
    _, stderr = served_and_stopped(tmp_path, "--log-format", "text")
    assert "supervising" in stderr
    for line in stderr.splitlines():
        assert not line.startswith("{"), line
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ", line), line


def test_a_refused_start_reports_its_config_errors_as_json(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("listeners: [{bind: '127.0.0.1:notaport'}]\nupstreams: {}\nroutes: []\n")
    result = run_cli("run", str(path), "--log-format", "json")
    assert result.returncode == 1
    lines = json_lines(result.stderr)
    assert any(
        line["level"] == "ERROR"
        and str(line["message"]).startswith(f"{path}:1: listeners[0].bind:")
        for line in lines
    ), lines


def test_a_json_line_carries_the_traceback_and_keeps_to_one_line() -> None:
    try:
        raise ValueError("broken\nacross lines")
    except ValueError:
        record = logging.LogRecord(
            "proxy.x", logging.ERROR, __file__, 1, "failed: %s", ("ünïcode",), sys.exc_info()
        )
    text = JsonFormatter().format(record)
    assert "\n" not in text
    line = json.loads(text)
    assert line["message"] == "failed: ünïcode"
    assert line["level"] == "ERROR"
    assert line["logger"] == "proxy.x"
    assert "ValueError: broken\nacross lines" in str(line["exception"])


def test_logging_format_is_read_and_checked() -> None:
    assert parse_config(BASE + "routes: []\nlogging: {format: json}\n").log_format == "json"
    assert parse_config(BASE + "routes: []\n").log_format == "text"
    assert "logging.format: unsupported format 'jsn' (supported: text, json)" in one_error(
        BASE + "routes: []\nlogging: {format: jsn}\n"
    )
    assert "logging.level: unknown key 'level' (expected one of: format)" in one_error(
        BASE + "routes: []\nlogging: {level: debug}\n"
    )


@pytest.mark.socket
def test_a_reload_that_changes_the_format_says_it_takes_a_restart(tmp_path: Path) -> None:
    port = free_port()
    config = gateway_config(port, "http://127.0.0.1:9")
    with run_gateway(config, tmp_path, port=port) as gateway:
        gateway.config_path.write_text(config + "logging: {format: json}\n")
        gateway.signal(signal.SIGHUP)
        wanted = "logging.format: text -> json takes a restart"
        wait_until(lambda: wanted in gateway.stderr(), 10.0, "the reload's warning")
        gateway.signal(15)
        assert gateway.wait(10) == 0, gateway.stderr()
        stderr = gateway.stderr()
    assert not any(line.startswith("{") for line in stderr.splitlines())  # still text
