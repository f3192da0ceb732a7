"""The HPACK memo must never change what is decoded or encoded, whatever the order of
field sections (hypothesis drives sequences that grow, evict and reuse the table)."""

from __future__ import annotations

import h2.config
import h2.connection
from hpack import Decoder, Encoder
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.codec.h2compat import memoise_hpack

Fields = list[tuple[bytes, bytes]]

names = st.sampled_from([b"content-type", b"x-a", b"x-b", b"cookie", b"date", b"etag"])
values = st.sampled_from([b"1", b"2", b"text/plain", b"a" * 40, b"b" * 300, b"x" * 1500])
field_lists = st.lists(st.lists(st.tuples(names, values), min_size=1, max_size=6), max_size=40)


def memoised_connection() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    memoise_hpack(conn)
    return conn


@settings(max_examples=200, deadline=None)
@given(field_lists, st.integers(min_value=0, max_value=4096))
def test_memoised_decoding_equals_plain_decoding(sections: list[Fields], table: int) -> None:
    encoder = Encoder()
    encoder.header_table_size = table
    blocks = [encoder.encode(fields) for fields in sections for _ in range(2)]
    plain = Decoder()
    memo = memoised_connection().decoder

    for block in blocks:
        assert memo.decode(block, raw=True) == plain.decode(block, raw=True)


@settings(max_examples=200, deadline=None)
@given(field_lists, st.integers(min_value=0, max_value=4096))
def test_memoised_encoding_decodes_to_the_same_fields(sections: list[Fields], table: int) -> None:
    memo = memoised_connection().encoder
    memo.header_table_size = table
    decoder = Decoder()

    for fields in [fields for fields in sections for _ in range(3)]:
        assert decoder.decode(memo.encode(fields), raw=True) == fields


def test_a_repeated_indexed_block_is_served_from_the_memo() -> None:
    fields = [(b":status", b"200"), (b"content-type", b"text/plain")]
    memo = memoised_connection()
    first = memo.encoder.encode(fields)  # literal with indexing: fills the table
    second = memo.encoder.encode(fields)  # all indexed now
    third = memo.encoder.encode(fields)

    assert first != second
    assert second == third
    assert all(0x80 <= byte <= 0xFE for byte in second)
