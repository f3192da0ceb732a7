"""Parsing pipelined requests costs time linear in their number, however many arrive in
one read (both codecs, HTTP/1.1 and HTTP/1.0 keep-alive): no request may cost time in
proportion to the bytes read with it. h11's `trailing_data` copies its whole buffer, and
asking it once per request made a read of n requests cost O(n^2)."""

from __future__ import annotations

import time

import pytest

from proxy.protocol.h1codec import MessageHead, make_request_parser

# 10x the requests may cost at most this many times the CPU time (linear: ~10).
MAX_RATIO = 20.0
PADDING = b"X-Padding: " + b"p" * 500 + b"\r\n"  # ~550-byte heads: copies show sooner


class CountingSink:
    """An H1Sink that counts the requests it is given."""

    def __init__(self) -> None:
        self.heads = 0
        self.ends = 0

    def on_head(self, head: MessageHead) -> None:
        self.heads += 1

    def on_body(self, data: bytes) -> None:
        raise AssertionError("these requests have no body")

    def on_end(self, trailers: list[tuple[bytes, bytes]] | None) -> None:
        self.ends += 1


def parse_cost(codec: str, request: bytes, count: int) -> float:
    """CPU seconds to parse `count` copies of `request` fed in one piece (the least of
    two runs: other work on the machine only ever adds to it)."""
    costs = []
    for _ in range(2):
        sink = CountingSink()
        parser = make_request_parser(codec, sink, 64 * 1024)
        data = request * count
        started = time.process_time()
        assert parser.feed(data) is None
        costs.append(time.process_time() - started)
        assert sink.heads == sink.ends == count
    return min(costs)


@pytest.mark.parametrize("version", [b"1.1", b"1.0"])
def test_pipelined_requests_in_one_read_cost_time_linear_in_their_number(
    codec: str, version: bytes
) -> None:
    keep_alive = b"Connection: keep-alive\r\n" if version == b"1.0" else b""
    request = b"GET /a HTTP/%s\r\nHost: t\r\n%s%s\r\n" % (version, keep_alive, PADDING)
    small = parse_cost(codec, request, 400)
    large = parse_cost(codec, request, 4000)
    assert large <= MAX_RATIO * small, (small, large)
