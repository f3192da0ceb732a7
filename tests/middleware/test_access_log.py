"""`access_log` without sockets: the line it makes (fields, when, sampling, errors), its
options' errors, and the writer (bounded queue, pipe-atomic pieces, a blocked or broken
output that never blocks the event loop)."""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import re
import select
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from metrics.definitions import ACCESS_LOG_DROPPED, REGISTRY
from middleware.access_log import (
    DEFAULT_FIELDS,
    FIELDS,
    AccessLog,
    LineWriter,
    write_whole_lines,
)
from proxy.config.document import ConfigError
from proxy.config.load import parse_config
from proxy.core.body import Body
from proxy.core.errors import UpstreamTimeout
from proxy.core.models import Request, Response

HEAD = """\
listeners: [{bind: 127.0.0.1:0}]
upstreams: {app: {endpoints: ["http://127.0.0.1:9"]}}
routes: [{match: {path: /}, upstream: app}]
middleware:
"""
RFC3339_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def load(options: str = "{type: access_log}") -> AccessLog:
    instance = parse_config(HEAD + f"  log: {options}\n").middleware["log"].instance
    assert isinstance(instance, AccessLog)
    return instance


def errors_of(section: str) -> list[str]:
    with pytest.raises(ConfigError) as failed:
        parse_config(HEAD + textwrap.indent(textwrap.dedent(section), "  "))
    return str(failed.value).splitlines()


def dropped_total() -> float:
    return REGISTRY.get_sample_value("gatehouse_access_log_dropped_total") or 0.0


class Pipe:
    """A real pipe (read end non-blocking); each end closed once, by `close_read` or at
    the end of the test."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self._open = {self.read_fd, self.write_fd}

    def close_read(self) -> None:
        self._open.discard(self.read_fd)
        os.close(self.read_fd)

    def close(self) -> None:
        for fd in self._open:
            os.close(fd)
        self._open.clear()


@pytest.fixture
def pipe() -> Iterator[Pipe]:
    opened = Pipe()
    yield opened
    opened.close()


def read_lines(read_fd: int) -> list[dict[str, object]]:
    data = b""
    while True:
        try:
            chunk = os.read(read_fd, 1 << 16)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return [json.loads(line) for line in data.decode().splitlines()]


def to_pipe(log: AccessLog, write_fd: int, capacity: int = 1000) -> AccessLog:
    """Send `log`'s lines to a pipe instead of stdout."""
    log.writer = LineWriter(write_fd, capacity, lambda lines: None, log.encode)
    return log


def make_request(
    method: str = "POST", target: bytes = b"/users/7?token=secret", body: bytes = b"hello"
) -> Request:
    request = Request(
        method,
        target,
        [(b"Host", b"api.test"), (b"User-Agent", b"curl/8.5")],
        Body.from_bytes(body),
        client=("10.1.2.3", 5555),
    )
    request.exchange.route_name = "users"
    return request


async def test_the_line_is_written_once_the_response_body_is_sent(
    pipe: Pipe,
) -> None:
    read_fd, write_fd = pipe.read_fd, pipe.write_fd
    log = to_pipe(load(), write_fd)
    request = make_request()
    streaming = Body(None)

    async def endpoint(request: Request) -> Response:
        request.body.take_all()  # the forwarder reads the request body
        request.exchange.endpoint = "10.0.0.5:8000"
        request.exchange.upstream_s = 0.002
        request.consumer = "alice"
        request.path = "/7"  # a later rewrite does not change what is logged
        return Response(200, CIMultiDict(), streaming)

    response = await log(request, endpoint)
    streaming.feed(b"abc")
    streaming.feed(b"defg")
    streaming.feed_eof()
    assert "queued=0" in repr(log.writer)  # nothing yet: the body is still going out
    while await response.body.read():
        pass
    await log.close()

    (line,) = read_lines(read_fd)
    assert list(line) == list(DEFAULT_FIELDS)
    assert RFC3339_MS.fullmatch(str(line.pop("time")))
    assert re.fullmatch(r"[0-9a-f]{32}", str(line["request_id"]))
    assert line.pop("request_id") == request.request_id  # the id error replies would use
    duration = line.pop("duration_s")
    assert isinstance(duration, float)
    assert 0 <= duration < 5
    assert line == {
        "client_ip": "10.1.2.3",
        "method": "POST",
        "host": "api.test",
        "path": "/users/7",
        "protocol": "HTTP/1.1",
        "route": "users",
        "endpoint": "10.0.0.5:8000",
        "status": 200,
        "bytes_in": 5,
        "bytes_out": 7,
        "upstream_s": 0.002,
        "user_agent": "curl/8.5",
        "consumer": "alice",
        "retries": 0,
        "error": "",
        "tls": "",
        "trace_id": "",  # answered by the test's endpoint: no upstream try, no tracing
        "span_id": "",
    }


async def test_fields_choose_and_order_the_keys(pipe: Pipe) -> None:
    read_fd, write_fd = pipe.read_fd, pipe.write_fd
    log = to_pipe(load("{type: access_log, fields: [status, path, status, method]}"), write_fd)

    async def endpoint(request: Request) -> Response:
        return Response(201, None, Body.from_bytes(b"x"))

    (await log(make_request(), endpoint)).body.take_all()
    await log.close()

    assert read_lines(read_fd) == [{"status": 201, "path": "/users/7", "method": "POST"}]


async def test_the_peer_is_logged_apart_from_the_client_when_asked(pipe: Pipe) -> None:
    read_fd, write_fd = pipe.read_fd, pipe.write_fd
    log = to_pipe(load("{type: access_log, fields: [client_ip, peer_ip]}"), write_fd)

    async def endpoint(request: Request) -> Response:
        return Response(204)

    request = make_request()
    request.client = ("203.0.113.9", 0)  # what client_ip found behind the peer 10.1.2.3
    (await log(request, endpoint)).body.take_all()
    await log.close()

    assert read_lines(read_fd) == [{"client_ip": "203.0.113.9", "peer_ip": "10.1.2.3"}]
    assert "peer_ip" in FIELDS
    assert "peer_ip" not in DEFAULT_FIELDS  # a default line keeps its shape


async def test_a_proxy_error_is_answered_here_and_logged_with_its_status_and_size(
    pipe: Pipe,
) -> None:
    read_fd, write_fd = pipe.read_fd, pipe.write_fd
    log = to_pipe(load("{type: access_log, fields: [status, bytes_out, request_id]}"), write_fd)
    request = make_request()
    request.request_id = "rid-1"

    async def endpoint(request: Request) -> Response:
        raise UpstreamTimeout()

    response = await log(request, endpoint)
    body = response.body.take_all()
    await log.close()

    assert response.status == 504
    assert json.loads(body)["request_id"] == "rid-1"
    assert read_lines(read_fd) == [{"status": 504, "bytes_out": len(body), "request_id": "rid-1"}]


async def test_a_client_gone_before_the_response_is_logged_as_499(
    pipe: Pipe,
) -> None:
    read_fd, write_fd = pipe.read_fd, pipe.write_fd
    log = to_pipe(load("{type: access_log, fields: [status, bytes_out, error]}"), write_fd)

    async def endpoint(request: Request) -> Response:
        await asyncio.sleep(10)
        raise AssertionError("not reached")

    task = asyncio.create_task(log(make_request(), endpoint))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await log.close()

    assert read_lines(read_fd) == [{"status": 499, "bytes_out": 0, "error": "client_closed"}]


async def test_a_bug_further_in_is_logged_as_500_internal_error(pipe: Pipe) -> None:
    read_fd, write_fd = pipe.read_fd, pipe.write_fd
    log = to_pipe(load("{type: access_log, fields: [status, error]}"), write_fd)

    async def endpoint(request: Request) -> Response:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError):
        await log(make_request(), endpoint)
    await log.close()

    assert read_lines(read_fd) == [{"status": 500, "error": "internal_error"}]


async def test_a_head_response_sends_no_body_bytes(pipe: Pipe) -> None:
    read_fd, write_fd = pipe.read_fd, pipe.write_fd
    log = to_pipe(load("{type: access_log, fields: [method, bytes_out]}"), write_fd)

    async def endpoint(request: Request) -> Response:
        return Response(200, None, Body.from_bytes(b"the body a GET would get"))

    (await log(make_request("HEAD", body=b""), endpoint)).body.take_all()
    await log.close()

    assert read_lines(read_fd) == [{"method": "HEAD", "bytes_out": 0}]


async def test_sample_zero_keeps_only_server_errors(pipe: Pipe) -> None:
    read_fd, write_fd = pipe.read_fd, pipe.write_fd
    log = to_pipe(load("{type: access_log, sample: 0, fields: [status]}"), write_fd)
    statuses = iter([200, 404, 503, 200, 500])

    async def endpoint(request: Request) -> Response:
        return Response(next(statuses), None, Body.from_bytes(b""))

    for _ in range(5):
        (await log(make_request(), endpoint)).body.take_all()
    await log.close()

    assert read_lines(read_fd) == [{"status": 503}, {"status": 500}]


async def test_sample_keeps_about_that_fraction(pipe: Pipe) -> None:
    read_fd, write_fd = pipe.read_fd, pipe.write_fd
    log = to_pipe(load("{type: access_log, sample: 0.25, fields: [status]}"), write_fd, 5000)

    async def endpoint(request: Request) -> Response:
        return Response(200, None, Body.from_bytes(b""))

    for _ in range(2000):
        (await log(make_request(), endpoint)).body.take_all()
    await log.close()

    kept = len(read_lines(read_fd))
    assert 350 < kept < 650  # 500 expected; this range is > 6 standard deviations wide


async def test_an_earlier_on_done_callback_still_runs(pipe: Pipe) -> None:
    read_fd, write_fd = pipe.read_fd, pipe.write_fd
    log = to_pipe(load("{type: access_log, fields: [status]}"), write_fd)
    calls: list[str] = []

    async def endpoint(request: Request) -> Response:
        body = Body.from_bytes(b"x")
        body.on_done = lambda: calls.append("earlier")
        return Response(200, None, body)

    (await log(make_request(), endpoint)).body.take_all()
    await log.close()

    assert calls == ["earlier"]
    assert read_lines(read_fd) == [{"status": 200}]


def test_option_errors_have_lines_and_did_you_mean() -> None:
    assert errors_of("""\
        a: {type: access_log, fields: [time, stauts]}
        b: {type: access_log, sample: 1.5, output: file}
        c:
          type: access_log
          sample: -0.1
          queue_size: 0
          fields: []
        """) == [
        "<string>:5: middleware.a.fields: unknown field 'stauts' (did you mean 'status'?)",
        "<string>:6: middleware.b.sample: must be between 0 and 1, got 1.5",
        "<string>:6: middleware.b.output: unsupported output 'file' (supported: stdout, stderr)",
        "<string>:9: middleware.c.sample: must be at least 0.0, got -0.1",
        "<string>:10: middleware.c.queue_size: must be at least 1, got 0",
        "<string>:11: middleware.c.fields: at least one field is required",
    ]


def test_defaults() -> None:
    log = load()
    assert log.fields == DEFAULT_FIELDS
    assert log.sample == 1.0
    assert log.output == "stdout"
    assert log.writer.fd == 1
    assert log.writer.capacity == 10_000
    assert load("{type: access_log, output: stderr}").writer.fd == 2


# --- the writer ---


async def test_a_blocked_output_drops_and_counts_lines_without_blocking_the_loop(
    pipe: Pipe,
) -> None:
    write_fd = pipe.write_fd
    fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 4096)
    os.write(write_fd, b"x" * 4096)  # full: the writer thread's first write blocks
    before = dropped_total()
    writer = LineWriter(write_fd, 50, ACCESS_LOG_DROPPED.inc)
    record: dict[str, object] = {"path": "/" + "x" * 500}

    # The loop keeps turning while the writer thread is stuck: a put that waited for the
    # thread would never return (the bounds below are on a hang, not on a busy machine).
    started = time.monotonic()
    for _ in range(400):
        writer.put(record)
        await asyncio.sleep(0)
    assert time.monotonic() - started < 10.0
    assert "queued=50" in repr(writer)  # the queue stays bounded: the rest was dropped
    dropped = writer.dropped
    assert dropped > 300

    started = time.monotonic()
    await writer.aclose(flush_s=0.2)  # cannot flush: gives up in time, counting the rest
    assert time.monotonic() - started < 0.2 + 5.0
    assert writer.dropped == dropped + 50
    assert dropped_total() - before == writer.dropped
    pipe.close_read()  # the stuck write now fails (EPIPE) and the thread ends
    for thread in threading.enumerate():
        if thread.name.startswith("access-log"):
            thread.join(timeout=5)


async def test_a_failed_write_counts_the_lines_and_warns_once(
    pipe: Pipe, caplog: pytest.LogCaptureFixture
) -> None:
    write_fd = pipe.write_fd
    pipe.close_read()  # EPIPE from now on
    dropped: list[int] = []
    writer = LineWriter(write_fd, 100, dropped.append)
    with caplog.at_level(logging.WARNING, logger="middleware.access_log"):
        for _ in range(3):
            writer.put({"n": 1})
            await writer.aclose()
    assert sum(dropped) == 3 == writer.dropped
    assert [r.getMessage() for r in caplog.records] == [
        f"access log: writing to fd {write_fd} failed: [Errno 32] Broken pipe"
    ]


async def test_lines_put_after_close_are_still_written(pipe: Pipe) -> None:
    read_fd, write_fd = pipe.read_fd, pipe.write_fd
    writer = LineWriter(write_fd, 100, lambda lines: None)
    writer.put({"n": 1})
    await writer.aclose()
    writer.put({"n": 2})  # a stream that ended after a reload closed its chain
    await writer.aclose()
    assert read_lines(read_fd) == [{"n": 1}, {"n": 2}]


def test_pieces_from_several_writers_never_split_a_line() -> None:
    read_fd, write_fd = os.pipe()
    lines = {
        name: [json.dumps({"w": name, "i": i, "pad": "y" * (i * 37 % 3000)}) for i in range(300)]
        for name in ("a", "b", "c")
    }
    received = bytearray()

    def read_slowly() -> None:
        while chunk := os.read(read_fd, 1000):
            received.extend(chunk)

    reader = threading.Thread(target=read_slowly)
    reader.start()
    writers = [
        threading.Thread(
            target=write_whole_lines, args=(write_fd, ("\n".join(batch) + "\n").encode())
        )
        for batch in lines.values()
    ]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join(timeout=20)
    os.close(write_fd)
    reader.join(timeout=20)
    os.close(read_fd)

    got = [json.loads(line) for line in received.decode().splitlines()]  # each line whole
    for name, batch in lines.items():
        assert [json.dumps(item) for item in got if item["w"] == name] == batch


def test_a_non_blocking_output_waits_until_writable() -> None:
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 4096)
    data = b"".join(b"%05d %s\n" % (i, b"z" * 90) for i in range(200))  # ~20 KiB
    received = bytearray()

    def read_slowly() -> None:
        while chunk := os.read(read_fd, 512):
            received.extend(chunk)
            select.select([], [], [], 0.001)

    reader = threading.Thread(target=read_slowly)
    reader.start()
    write_whole_lines(write_fd, data)
    os.close(write_fd)
    reader.join(timeout=20)
    os.close(read_fd)
    assert bytes(received) == data


_TEXT = st.text(max_size=40)  # any text: quotes, backslashes, controls, non-ASCII


@given(
    strings=st.tuples(*[_TEXT] * 12),
    numbers=st.tuples(*[st.integers(0, 10**12)] * 4),
    seconds=st.tuples(*[st.floats(0, 1e5)] * 2),
)
def test_a_line_is_the_json_of_its_values(
    strings: tuple[str, ...], numbers: tuple[int, ...], seconds: tuple[float, ...]
) -> None:
    rid, ip, method, host, path, route, endpoint, agent, consumer, error, tls, _ = strings
    status, bytes_in, bytes_out, retries = numbers
    values = (
        1_790_000_000.25,
        rid,
        ip,
        method,
        host,
        path,
        "2",
        route,
        endpoint,
        status,
        bytes_in,
        bytes_out,
        *seconds,
        agent,
        consumer,
        retries,
        error,
        tls,
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "00f067aa0ba902b7",
    )
    log = load()
    line = log.encode(values)
    assert line == log.encode_fields(values)  # the one-f-string path and the general one
    assert line.isascii()  # non-ASCII is escaped, as json.dumps does
    assert "\n" not in line
    assert json.loads(line) == {
        "time": "2026-09-21T14:13:20.250Z",
        "request_id": rid,
        "client_ip": ip,
        "method": method,
        "host": host,
        "path": path,
        "protocol": "HTTP/2",
        "route": route,
        "endpoint": endpoint,
        "status": status,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "duration_s": float(f"{seconds[0]:.6f}"),
        "upstream_s": float(f"{seconds[1]:.6f}"),
        "user_agent": agent,
        "consumer": consumer,
        "retries": retries,
        "error": error,
        "tls": tls,
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "span_id": "00f067aa0ba902b7",
    }


@pytest.mark.parametrize("to_a_file", [True, False])
async def test_a_batch_is_one_write_to_a_file_and_pipe_buf_pieces_to_a_pipe(
    to_a_file: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A regular file takes a whole batch at once; only a pipe needs PIPE_BUF pieces
    # (each write is a GIL hand-over between the loop and the writer thread).
    sizes: list[int] = []
    real_write = os.write

    def counting_write(fd: int, data: bytes | memoryview) -> int:
        sizes.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", counting_write)
    record = {"pad": "z" * 200}  # a line of about 210 bytes
    path = tmp_path / "access.log"
    read_fd = -1
    if to_a_file:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    else:
        read_fd, fd = os.pipe()  # 64 KiB by default: room for the whole batch
    try:
        writer = LineWriter(fd, 1000, lambda lines: None)
        for _ in range(100):  # about 21 KB: more than PIPE_BUF
            writer.put(record)
        await writer.aclose()
    finally:
        os.close(fd)
    assert sum(sizes) == 100 * (len(json.dumps(record, separators=(",", ":"))) + 1)
    if to_a_file:
        assert len(sizes) == 1
        assert len(path.read_text().splitlines()) == 100
    else:
        assert len(sizes) > 1
        assert max(sizes) <= select.PIPE_BUF
        with os.fdopen(read_fd, "rb") as pipe:
            assert len(pipe.read().splitlines()) == 100
