"""Parsing pipelined requests costs time linear in their number, however many arrive in
one read (both codecs, HTTP/1.1 and HTTP/1.0 keep-alive): no request may cost time in
proportion to the bytes read with it. h11's `trailing_data` copies its whole buffer, and
asking it once per request made a read of n requests cost O(n^2)."""

from __future__ import annotations

import pytest

from proxy.codec.h1 import H1Error, MessageHead, make_request_parser
from tests.support.cost import least_cpu

# 10x the requests may cost at most this many times the CPU time (linear: ~10).
MAX_RATIO = 20.0
PADDING = b"X-Padding: " + b"p" * 500 + b"\r\n"  # ~550-byte heads: copies show sooner


class CountingSink:
    """An H1Sink that counts the requests it is given."""

    def __init__(self) -> None:
        self.heads = 0
        self.body = 0
        self.ends = 0
        self.trailers = 0

    def on_head(self, head: MessageHead) -> None:
        self.heads += 1

    def on_body(self, data: bytes) -> None:
        self.body += len(data)

    def on_end(self, trailers: list[tuple[bytes, bytes]] | None) -> None:
        self.ends += 1
        self.trailers += len(trailers or ())


def parse_cost(codec: str, request: bytes, count: int) -> float:
    """CPU seconds to parse `count` copies of `request` fed in one piece (tests/support/cost.py)."""
    data = request * count

    def parse() -> None:
        sink = CountingSink()
        parser = make_request_parser(codec, sink, 64 * 1024)
        assert parser.feed(data) is None
        assert sink.heads == sink.ends == count

    return least_cpu(parse)


@pytest.mark.parametrize("version", [b"1.1", b"1.0"])
def test_pipelined_requests_in_one_read_cost_time_linear_in_their_number(
    codec: str, version: bytes
) -> None:
    keep_alive = b"Connection: keep-alive\r\n" if version == b"1.0" else b""
    request = b"GET /a HTTP/%s\r\nHost: t\r\n%s%s\r\n" % (version, keep_alive, PADDING)
    small = parse_cost(codec, request, 400)
    large = parse_cost(codec, request, 4000)
    assert large <= MAX_RATIO * small, (small, large)


def pieces_cost(codec: str, pieces: list[bytes]) -> float:
    """CPU seconds to feed `pieces` one by one (tests/support/cost.py)."""

    def feed() -> None:
        sink = CountingSink()
        parser = make_request_parser(codec, sink, 4 * 1024 * 1024)
        for piece in pieces:
            assert parser.feed(piece) is None
        assert sink.heads == sink.ends == 1

    return least_cpu(feed)


def test_a_request_target_in_many_pieces_costs_time_linear_in_their_number(
    codec: str,
) -> None:
    """A target that arrives over many reads (the parser reports a piece per read) is
    joined once, not piece by piece."""
    costs = []
    for count in (300, 3000):
        pieces = [b"GET /"] + [b"a" * 100] * count + [b" HTTP/1.1\r\nHost: t\r\n\r\n"]
        costs.append(pieces_cost(codec, pieces))
    assert costs[1] <= MAX_RATIO * costs[0], costs


@pytest.mark.parametrize("pieces", [1, 64])
def test_a_trailer_section_larger_than_the_head_limit_is_refused(codec: str, pieces: int) -> None:
    """RFC 9112 section 7.1.2: trailers are bounded like the head (431), whether they
    come in one read or in many (llhttp has no bound of its own)."""
    parser = make_request_parser(codec, CountingSink(), 4096)
    parser.feed(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
    trailers = b"".join(b"X-T%d: %s\r\n" % (i, b"v" * 90) for i in range(100))  # ~10 KB
    size = -(-len(trailers) // pieces)
    parts = [b"0\r\n"] + [trailers[at : at + size] for at in range(0, len(trailers), size)]

    def feed_all() -> None:
        for part in parts:
            parser.feed(part)

    with pytest.raises(H1Error) as raised:
        feed_all()
    assert raised.value.too_large


def test_a_trailer_section_within_the_head_limit_passes(codec: str) -> None:
    """Chunk framing between body data is not counted against the limit, and trailers
    within it pass, also when they come in many pieces."""
    sink = CountingSink()
    parser = make_request_parser(codec, sink, 4096)
    parser.feed(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(1000):  # ~6 KB of framing and data, in pieces of one chunk
        parser.feed(b"1\r\na\r\n")
    trailers = b"0\r\n" + b"".join(b"X-T%d: v\r\n" % i for i in range(100)) + b"\r\n"
    for offset in range(0, len(trailers), 10):
        parser.feed(trailers[offset : offset + 10])
    assert (sink.body, sink.ends, sink.trailers) == (1000, 1, 100)
