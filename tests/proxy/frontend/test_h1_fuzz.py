"""Hypothesis: whatever bytes a client sends, Http1Protocol answers with well-formed
responses (a 4xx local reply last when the input was bad) and closes; no exception escapes,
nothing is logged as a bug, and nothing hangs (h11's fuzz/afl-server.py, in-process).
"""

from __future__ import annotations

import asyncio
import itertools
import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy.config.model import LimitsConfig
from proxy.core.body import Body
from proxy.core.errors import ProxyError
from proxy.core.models import Request, Response
from tests.support.helpers import RecordingConnection, decode_responses, make_protocol, settle

# Hypothesis' failure explanation imports mypy_extensions, whose DeprecationWarning would turn a
# failing example into an INTERNALERROR under `filterwarnings = ["error"]`.
pytestmark = pytest.mark.filterwarnings(
    "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"
)

CODECS = st.sampled_from(["httptools", "h11"])
LIMITS = LimitsConfig(max_head_bytes=1024, max_body_size=4096)
ERROR_STATUSES = {400, 408, 413, 431}
CUTS = st.lists(st.integers(0, 600), max_size=8)

VALID = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"HEAD /x?y=1 HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"PUT /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"POST /e HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi",
    b"GET /old HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"DELETE /d HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
]

# Fragments that matter to HTTP/1.1 parsers: line ends, separators, framing headers.
TOKENS = [
    b"\r\n",
    b"\n",
    b"\r",
    b" ",
    b"\t",
    b":",
    b"\x00",
    b"\xff",
    b"0\r\n\r\n",
    b"Content-Length: 3\r\n",
    b"Content-Length: 99999999999999999999\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked, identity\r\n",
    b"Connection: close\r\n",
    b"Upgrade: websocket\r\nConnection: upgrade\r\n",
    b"Expect: 100-continue\r\n",
    b"HTTP/1.0",
    b"HTTP/1.1",
    b"CONNECT a:443 HTTP/1.1\r\n",
    b"ffffffff\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
]


@st.composite
def mutated_requests(draw: st.DrawFn) -> bytes:
    """A few valid requests in a row, then random edits: insertions of parser-relevant
    tokens or random bytes, deletions, and byte replacements."""
    data = bytearray(b"".join(draw(st.lists(st.sampled_from(VALID), min_size=1, max_size=4))))
    for _ in range(draw(st.integers(0, 6))):
        position = draw(st.integers(0, len(data)))
        edit = draw(st.sampled_from(["insert-token", "insert-bytes", "delete", "replace"]))
        if edit == "insert-token":
            data[position:position] = draw(st.sampled_from(TOKENS))
        elif edit == "insert-bytes":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif edit == "delete":
            data[position : position + draw(st.integers(1, 8))] = b""
        elif position < len(data):
            data[position] = draw(st.integers(0, 255))
    return bytes(data)


class _BugLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _fast_echo(request: Request) -> tuple[Response | None, ProxyError | None]:
    """The fast path's answer: synchronous, for requests whose body is complete."""
    body = request.body.take_all()
    return Response(200, CIMultiDict(), Body.from_bytes(request.target + b" " + body)), None


async def _feed_all(
    data: bytes, cuts: list[int], codec: str, *, eof: bool = True, fast: bool = False
) -> tuple[RecordingConnection, list[str]]:
    protocol, conn, server = make_protocol(codec, limits=LIMITS, fast=_fast_echo if fast else None)
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    for start, end in itertools.pairwise(bounds):
        # A paused transport delivers nothing: wait while the protocol has paused us.
        for _ in range(100):
            if conn.reading or conn.closed:
                break
            await asyncio.sleep(0)
        if conn.closed or not conn.reading:
            break
        protocol.feed(data[start:end])
        await asyncio.sleep(0)
    if eof and not conn.closed:
        protocol.on_eof()  # the client is done: whatever is pending must now finish
    await settle(protocol)
    return conn, [request.method for request in server.seen]


def check(data: bytes, cuts: list[int], codec: str, fast: bool) -> None:
    bug_log = _BugLog()
    logger = logging.getLogger("proxy")
    logger.addHandler(bug_log)
    try:
        conn, methods = asyncio.run(_feed_all(data, cuts, codec, fast=fast))
    finally:
        logger.removeHandler(bug_log)
    assert not bug_log.records, [r.getMessage() for r in bug_log.records]
    assert conn.closed, "the connection must close once the client sent EOF"
    output = bytes(conn.output)
    # One response per request the handler saw, plus possibly one local error reply.
    responses = decode_responses(output, [*methods, "GET"], strict=True)
    assert len(methods) <= len(responses) <= len(methods) + 1
    for response in responses[:-1]:
        assert response.header("connection") != "close"
    if responses and responses[-1].status in ERROR_STATUSES:
        assert responses[-1].header("connection") == "close"
    if len(responses) > len(methods):
        assert responses[-1].status in ERROR_STATUSES


FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@FUZZ
@given(data=st.binary(max_size=600), cuts=CUTS, codec=CODECS, fast=st.booleans())
def test_arbitrary_bytes_give_responses_or_an_error_reply_and_close(
    data: bytes, cuts: list[int], codec: str, fast: bool
) -> None:
    check(data, cuts, codec, fast)


@FUZZ
@given(data=mutated_requests(), cuts=CUTS, codec=CODECS, fast=st.booleans())
def test_mutated_requests_give_responses_or_an_error_reply_and_close(
    data: bytes, cuts: list[int], codec: str, fast: bool
) -> None:
    check(data, cuts, codec, fast)


@FUZZ
@given(
    requests=st.lists(st.sampled_from(VALID), min_size=1, max_size=5),
    cuts=CUTS,
    codec=CODECS,
    fast=st.booleans(),
)
def test_valid_requests_split_anywhere_are_all_answered(
    requests: list[bytes], cuts: list[int], codec: str, fast: bool
) -> None:
    data = b"".join(requests)
    bug_log = _BugLog()
    logging.getLogger("proxy").addHandler(bug_log)
    try:
        conn, methods = asyncio.run(_feed_all(data, cuts, codec, eof=False, fast=fast))
    finally:
        logging.getLogger("proxy").removeHandler(bug_log)
    assert not bug_log.records
    # Every request up to the first that ends the connection is answered, in order.
    expected = []
    for request in requests:
        expected.append(request.split(b" ", 1)[0].decode())
        if b"Connection: close" in request or (
            b"HTTP/1.0" in request and b"keep-alive" not in request
        ):
            break
    assert methods == expected
    responses = decode_responses(bytes(conn.output), methods, strict=True)
    assert [r.status for r in responses] == [200] * len(methods)
