"""HPACK literal fields decoded in time linear in the header block (RFC 7541 section 6.2).

hpack's `Decoder.decode` hands each representation a memoryview of the rest of the block,
and its `_decode_literal` copies that view to bytes (and slices the copy twice more)
before reading one field: every literal field costs a copy of everything after it, so a
block of n literal fields costs O(n^2). A client controls n: up to the decoder's header
list limit, one HEADERS block of small literal fields took ~190 ms to decode here where
~15 ms is linear (16,000 fields, 158 KB). Indexed fields (section 6.1) were never
copied and are left to hpack.

`linear_literals` replaces the method on one decoder instance with the same reading done
on the view, copying only the name and value. It uses hpack 4.x internals (`decode_integer`,
`decode_huffman`, `HeaderTable`); tests/proxy/protocol/test_hpack_literal.py checks it
decodes what hpack's own method decodes.
"""

from __future__ import annotations

from collections.abc import Callable

from hpack import HeaderTuple, HPACKDecodingError, NeverIndexedHeaderTuple
from hpack.hpack import Decoder, decode_integer
from hpack.huffman_table import decode_huffman

LiteralDecoder = Callable[[bytes | memoryview, bool], tuple[HeaderTuple, int]]


def linear_literals(decoder: Decoder) -> None:
    """Make `decoder` read literal fields without copying the rest of the block."""
    decoder._decode_literal = _literal_decoder(decoder)  # type: ignore[method-assign,assignment]


def _literal_decoder(decoder: Decoder) -> LiteralDecoder:
    def decode_literal(data: bytes | memoryview, should_index: bool) -> tuple[HeaderTuple, int]:
        """One literal field at the start of `data`: (the field, bytes consumed).

        Raises:
            HPACKDecodingError: the block ends inside the field, or an integer in it is
                malformed.
        """
        view = data if isinstance(data, memoryview) else memoryview(data)
        first = view[0]
        # Section 6.2.1 (incremental indexing): a 6-bit name index; sections 6.2.2 and
        # 6.2.3 (without indexing, never indexed): a 4-bit one, and bit 0x10 for "never".
        if should_index:
            indexed_name, prefix_bits, never_indexed = first & 0x3F, 6, False
        else:
            indexed_name, prefix_bits, never_indexed = first & 0x0F, 4, bool(first & 0x10)
        name: bytes
        if indexed_name:
            index, position = decode_integer(view, prefix_bits)
            name = decoder.header_table.get_by_index(index)[0]
        else:
            name, position = _string(view, 1)
        value, position = _string(view, position)
        field = NeverIndexedHeaderTuple(name, value) if never_indexed else HeaderTuple(name, value)
        if should_index:
            decoder.header_table.add(name, value)
        return field, position

    return decode_literal


def _string(view: memoryview, start: int) -> tuple[bytes, int]:
    """The string literal (section 5.2) at `start`: its bytes, Huffman-decoded when
    flagged, and where it ends.

    Raises:
        HPACKDecodingError: the block ends inside it, or its length is malformed.
    """
    if start >= len(view):
        raise HPACKDecodingError("Truncated header block")
    length, consumed = decode_integer(view[start:], 7)
    begin = start + consumed
    raw = bytes(view[begin : begin + length])
    if len(raw) != length:
        raise HPACKDecodingError("Truncated header block")
    huffman = view[start] & 0x80
    return (decode_huffman(raw) if huffman else raw), begin + length
