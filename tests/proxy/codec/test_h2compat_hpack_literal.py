"""Linear literal decoding (proxy/codec/h2compat.py) decodes exactly what hpack's
own method decodes, fails where it fails, and costs time linear in the block."""

from __future__ import annotations

import pytest
from hpack import Decoder, Encoder, HPACKDecodingError, NeverIndexedHeaderTuple
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.codec.h2compat import decode_literals_linearly
from tests.support.cost import least_cpu

names = st.sampled_from([b"content-type", b"x-a", b"x-b", b"cookie", b"authorization", b"x-" * 70])
values = st.binary(max_size=200)
fields = st.tuples(names, values).map(
    lambda field: field if field[0] != b"authorization" else NeverIndexedHeaderTuple(*field)
)
sections = st.lists(st.lists(fields, min_size=1, max_size=8), min_size=1, max_size=20)


def decoders() -> tuple[Decoder, Decoder]:
    """(hpack's decoder, one with linear literals)."""
    linear = Decoder()
    decode_literals_linearly(linear)
    return Decoder(), linear


@settings(max_examples=300, deadline=None)
@given(sections, st.booleans(), st.integers(min_value=0, max_value=4096))
def test_linear_literals_decode_what_hpack_decodes(
    blocks: list[list[tuple[bytes, bytes]]], huffman: bool, table: int
) -> None:
    """Every literal kind (indexed and literal names; incremental, without and never
    indexing; Huffman on and off) through a table that fills and evicts."""
    encoder = Encoder()
    encoder.header_table_size = table
    plain, linear = decoders()
    for section in blocks:
        block = encoder.encode(section, huffman=huffman)
        decoded = linear.decode(block, raw=True)
        expected = plain.decode(block, raw=True)
        assert decoded == expected
        assert [type(field) for field in decoded] == [type(field) for field in expected]
        assert linear.header_table.dynamic_entries == plain.header_table.dynamic_entries


@settings(max_examples=200, deadline=None)
@given(st.lists(fields, min_size=1, max_size=6), st.data())
def test_a_truncated_block_fails_as_it_does_in_hpack(
    section: list[tuple[bytes, bytes]], data: st.DataObject
) -> None:
    # A literal value first: its block is at least 2 bytes, so there is a place to cut.
    block = Encoder().encode([(b"x-first", b"v"), *section], huffman=data.draw(st.booleans()))
    cut = data.draw(st.integers(min_value=1, max_value=len(block) - 1))
    plain, linear = decoders()
    outcomes: list[object] = []
    for decoder in (plain, linear):
        try:
            outcomes.append(list(decoder.decode(block[:cut], raw=True)))
        except HPACKDecodingError as exc:
            outcomes.append(type(exc))
    assert outcomes[0] == outcomes[1]


def test_never_indexed_fields_stay_never_indexed() -> None:
    """RFC 7541 section 6.2.3: an intermediary re-encodes such a field the same way."""
    block = Encoder().encode([NeverIndexedHeaderTuple(b"authorization", b"secret")])
    plain, linear = decoders()
    (expected,) = plain.decode(block, raw=True)
    (field,) = linear.decode(block, raw=True)
    assert type(field) is type(expected) is NeverIndexedHeaderTuple
    assert not field.indexable


@pytest.mark.parametrize("huffman", [True, False])
def test_decoding_literal_fields_costs_time_linear_in_their_number(huffman: bool) -> None:
    """hpack's method copies the rest of the block for each literal field: 10x the
    fields cost it far more than 10x the time (the ratio grows with the block)."""
    costs = []
    for count in (5_000, 50_000):
        block = Encoder().encode([(b"x-f%d" % i, b"v") for i in range(count)], huffman=huffman)
        decoder = Decoder()
        decoder.max_header_list_size = 1 << 30
        decode_literals_linearly(decoder)

        def decode(block: bytes = block, decoder: Decoder = decoder, count: int = count) -> None:
            assert len(list(decoder.decode(block, raw=True))) == count

        costs.append(least_cpu(decode))
    assert costs[1] <= 20 * costs[0], costs
