"""The response parsers hand on a body of known length exactly: every byte once, the end at
its last byte, the next response read afresh, and a short or overlong body refused. The
httptools parser passes the reads after the head to its sink as they came (no copy by
llhttp): the chunk objects the sink gets are the ones fed."""

from __future__ import annotations

import pytest

from proxy.codec.h1 import H1Error, MessageHead, ResponseParser, make_response_parser

CODECS = ["httptools", "h11"]


class RecordingSink:
    def __init__(self) -> None:
        self.heads: list[MessageHead] = []
        self.chunks: list[bytes] = []
        self.ends = 0

    def on_head(self, head: MessageHead) -> None:
        self.heads.append(head)

    def on_body(self, data: bytes) -> None:
        self.chunks.append(data)

    def on_end(self, trailers: list[tuple[bytes, bytes]] | None) -> None:
        self.ends += 1


def parser(codec: str) -> tuple[ResponseParser, RecordingSink]:
    sink = RecordingSink()
    return make_response_parser(codec, sink, 8192), sink


def response(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n" % (len(body), extra) + body


BODY = bytes(range(256)) * 64  # 16 KiB


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("cut", [0, 1, 100, len(BODY) - 1])  # body bytes in the head's read
def test_a_body_of_known_length_in_pieces_is_handed_on_whole_and_ends_at_its_last_byte(
    codec: str, cut: int
) -> None:
    reader, sink = parser(codec)
    for _ in range(2):  # the next response on the same connection, read afresh
        reader.begin(b"GET")
        whole = response(BODY)
        head_end = len(whole) - len(BODY)
        reader.feed(whole[: head_end + cut])
        rest = [
            whole[head_end + cut + i : head_end + cut + i + 5000]
            for i in range(0, len(BODY) - cut, 5000)
        ]
        for piece in rest:
            assert not reader.reusable
            reader.feed(piece)
        assert b"".join(sink.chunks) == BODY
        assert sink.ends == len(sink.heads)
        assert reader.reusable
        if codec == "httptools":
            # Past the head's read, each piece went on as it was fed.
            assert all(any(chunk is piece for chunk in sink.chunks) for piece in rest)
        sink.chunks.clear()


@pytest.mark.parametrize("codec", CODECS)
def test_bytes_after_a_body_of_known_length_are_refused(codec: str) -> None:
    reader, sink = parser(codec)
    reader.begin(b"GET")
    whole = response(BODY)
    reader.feed(whole[:100])
    with pytest.raises(H1Error):
        reader.feed(whole[100:] + b"garbage, not a response\r\n\r\n")
    assert b"".join(sink.chunks) == BODY  # the body itself was whole


@pytest.mark.parametrize("codec", CODECS)
def test_a_connection_closed_inside_a_body_of_known_length_is_an_error(codec: str) -> None:
    reader, sink = parser(codec)
    reader.begin(b"GET")
    whole = response(BODY)
    reader.feed(whole[:100])
    reader.feed(whole[100:-10])
    with pytest.raises(H1Error):
        reader.feed_eof()
    assert sink.ends == 0


@pytest.mark.parametrize("codec", CODECS)
def test_a_head_response_with_a_length_has_no_body_and_the_next_response_reads(
    codec: str,
) -> None:
    reader, sink = parser(codec)
    reader.begin(b"HEAD")
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n")
    assert sink.ends == 1
    reader.begin(b"GET")
    reader.feed(response(b"hello"))
    assert sink.chunks == [b"hello"]
    assert sink.ends == 2
