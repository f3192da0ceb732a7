"""Every use of h2's and hpack's internals, in one place, each behind a named function.

Gatehouse drives h2 (and the hpack it decodes and encodes with) through their public API,
except where an RFC or a measurement asked for more. Those places reach into objects the
libraries do not document as API, and they are all here: the other modules call only the
functions below, named for what they do. tests/proxy/codec/test_h2compat.py checks each
assumption against the installed h2 and hpack, so that an upgrade which moves one fails
that test rather than misbehaving in production; pyproject keeps both below 5.

Written against h2 4.4.1 and hpack 4.2.0 (pyproject allows h2 4.3 and hpack 4.1 up, below
5). What each part relies on, and why:

- `reopen_after_goaway`: `H2Connection.state_machine.state`; streams finish after the
  peer's graceful GOAWAY (python-hyper/h2 #1181).
- `buffered_frame_bytes`: `H2Connection.incoming_buffer._data`; an oversized frame is
  refused from its header.
- `initiate_with_settings`: `H2Connection.local_settings`, set for the preface and
  replaced after it; limits looser than the advertised ones.
- `set_header_list_cap`: `H2Connection.decoder.max_header_list_size`; the HPACK-bomb cap.
- `half_closed_local`: `H2Connection.streams`, `H2Stream.state_machine`; the RFC 8441
  half-close.
- `takes_whole_frames`, `open_stream_directly`: `H2Connection.incoming_buffer`,
  `_begin_new_stream`, `highest_inbound_stream_id`, both state machines, h2's
  `_decode_headers`; a request's HEADERS frame read without h2's generic receive path
  (proxy/frontend/h2/protocol.py).
- `charge_send_windows`, `account_whole_response`, `encode_fields`: `H2Connection.streams`,
  both state machines, the send windows, `H2Connection.encoder`; frames made without h2
  (proxy/frontend/h2/data.py).
- `PerStreamContentLength`: `H2Stream._initialize_content_length`,
  `H2Stream._track_content_length`, `H2Stream.config`; content-length as a stream error.
- `memoise_hpack`: `Decoder.decode`, `Encoder.encode`, `Encoder.table_size_changes`;
  repeated HPACK blocks as dictionary lookups.
- `linear_literals`: `Decoder._decode_literal`, `decode_integer`, `decode_huffman`,
  `Decoder.header_table`; literal fields decoded in linear time.

Three of them replace a library method: `PerStreamContentLength` two methods of h2's
`H2Stream` class (once, when this module is imported), `memoise_hpack` and
`linear_literals` methods of one connection's HPACK coder instances. That is
monkey-patching, and it stays in this module: the hot modules that call it (the HTTP/2
front end and upstream connection) replace no method themselves, so that they can be
compiled (mypyc) as they are.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import h2.config
import h2.connection
import h2.settings
from h2.connection import AllowedStreamIDs, ConnectionInputs, ConnectionState, _decode_headers
from h2.stream import H2Stream, StreamClosedBy, StreamInputs, StreamState
from hpack import HeaderTuple, HPACKDecodingError, NeverIndexedHeaderTuple
from hpack.hpack import Decoder, decode_integer
from hpack.huffman_table import decode_huffman

# -- the connection ---------------------------------------------------------------------


def reopen_after_goaway(conn: h2.connection.H2Connection) -> None:
    """Let the streams already open finish after the peer's graceful GOAWAY.

    h2 moves its connection state machine to CLOSED on any GOAWAY it receives
    (python-hyper/h2 issue #1181), after which nothing more can be sent on the streams in
    flight; RFC 9113 section 6.8 lets the streams up to last_stream_id complete. This
    sets `H2Connection.state_machine.state` back to our side's open state (h2 4.x:
    SERVER_OPEN or CLIENT_OPEN). The caller opens no new stream afterwards.
    """
    client = conn.config.client_side
    conn.state_machine.state = (
        ConnectionState.CLIENT_OPEN if client else ConnectionState.SERVER_OPEN
    )


def buffered_frame_bytes(conn: h2.connection.H2Connection) -> int:
    """The bytes h2 holds of a frame not yet wholly received (after `receive_data`).

    h2 checks a frame's length against SETTINGS_MAX_FRAME_SIZE only once all of the frame
    is there, where its 9-byte header already tells (RFC 9113 section 4.2): comparing this
    with `max_inbound_frame_size + 9` refuses an oversized frame before it is buffered.
    h2 4.x keeps those bytes in its FrameBuffer's `_data` bytearray (`incoming_buffer`).
    """
    return len(conn.incoming_buffer._data)


def initiate_with_settings(
    conn: h2.connection.H2Connection,
    advertised: h2.settings.Settings,
    enforced: h2.settings.Settings,
) -> None:
    """Queue the connection preface with a SETTINGS frame of `advertised`, and make h2
    enforce `enforced` on the peer from then on (limits looser than the advertised ones).

    `initiate_connection` serialises `H2Connection.local_settings`, so assigning it first
    chooses what is advertised. Replacing it afterwards relies on h2 4.x reading the
    limits it enforces (e.g. SETTINGS_MAX_CONCURRENT_STREAMS when a stream opens) from
    that object each time, and on a fresh `Settings` having nothing pending, so that the
    peer's ACK of the advertised SETTINGS changes none of them.
    """
    conn.local_settings = advertised
    conn.initiate_connection()
    conn.local_settings = enforced


def set_header_list_cap(conn: h2.connection.H2Connection, size: int) -> None:
    """Make `size` the decoded size of a header list at which h2 fails the connection.

    That is hpack's `Decoder.max_header_list_size` (h2 4.x: `H2Connection.decoder`), which
    h2 sets to the advertised SETTINGS_MAX_HEADER_LIST_SIZE when that is acknowledged
    (an HPACK bomb, CVE-2016-6581); a looser cap there leaves the caller to answer a list
    between the two per stream.
    """
    conn.decoder.max_header_list_size = size


# -- streams ----------------------------------------------------------------------------


def takes_whole_frames(conn: h2.connection.H2Connection) -> bool:
    """True when a server connection's next input may be read frame by frame without h2:
    the client's preface has been read, h2 holds no part of a frame, no header block
    waits for its CONTINUATION frames, and the connection is idle or open (no GOAWAY
    either way).

    Then a whole frame may be handled by `open_stream_directly`, provided every frame
    before it has gone to h2 (`receive_data`) first and every frame after it goes later:
    h2 sees the rest of the input in order. h2 4.x keeps the preface still expected, the
    partial frame and the open header block in its FrameBuffer (`incoming_buffer`:
    `_preamble_len`, `_data`, `_headers_buffer`).
    """
    buffer = conn.incoming_buffer
    return (
        not buffer._preamble_len
        and not buffer._data
        and not buffer._headers_buffer
        and conn.state_machine.state in _OPEN_TO_REQUESTS
    )


# A server connection is IDLE until its first request, then SERVER_OPEN (h2 4.x).
_OPEN_TO_REQUESTS = frozenset({ConnectionState.IDLE, ConnectionState.SERVER_OPEN})


def open_stream_directly(
    conn: h2.connection.H2Connection, stream_id: int, block: bytes, end_stream: bool
) -> list[tuple[bytes, bytes]] | None:
    """Receive a HEADERS frame that opens a new stream as h2 would: its header block
    (complete, END_HEADERS; neither padded nor with a priority) decoded by the
    connection's HPACK decoder, the stream created and moved to open (half-closed
    (remote) with `end_stream`). Returns the fields, which are what h2's RequestReceived
    would carry under the front end's configuration (validation and normalisation off).

    None, with nothing changed, when h2 might answer the frame otherwise: a stream id
    that is not new or not odd (trailers, or a protocol error), or as many streams known
    as h2's limit on open ones (h2 counts them, forgetting the closed ones as it does).
    The caller hands such a frame to h2. Call only when `takes_whole_frames` holds.

    Raises:
        h2.exceptions.ProtocolError: the header block does not decode, or decodes past
            the header list cap (DenialOfServiceError), as h2 raises it: a connection
            error.

    h2 4.x: `_decode_headers`, `_begin_new_stream`, `highest_inbound_stream_id`,
    `local_settings.max_concurrent_streams`, and the stream state machine's `state`,
    `client` and `headers_received`, which its RECV_HEADERS input sets. The connection's
    own machine goes to (or stays in) SERVER_OPEN on RECV_HEADERS, with no other effect,
    and the content-length h2 would note is left to the front end
    (`PerStreamContentLength`).
    """
    if (
        stream_id <= conn.highest_inbound_stream_id
        or not stream_id & 1
        or len(conn.streams) >= conn.local_settings.max_concurrent_streams
    ):
        return None
    fields = list(_decode_headers(conn.decoder, block))
    stream = conn._begin_new_stream(stream_id, AllowedStreamIDs.ODD)
    conn.state_machine.state = ConnectionState.SERVER_OPEN
    machine = stream.state_machine
    machine.client = False
    machine.headers_received = True
    machine.state = StreamState.HALF_CLOSED_REMOTE if end_stream else StreamState.OPEN
    return fields


def half_closed_local(conn: h2.connection.H2Connection, stream_id: int) -> bool:
    """True when h2 holds the stream as half-closed (local): our END_STREAM has gone and
    the peer may still send (RFC 9113 section 5.1). False for a stream in any other state,
    or one h2 has forgotten. h2 4.x: `H2Connection.streams`, `H2Stream.state_machine`."""
    stream = conn.streams.get(stream_id)
    return stream is not None and stream.state_machine.state is StreamState.HALF_CLOSED_LOCAL


def charge_send_windows(conn: h2.connection.H2Connection, stream_id: int, size: int) -> None:
    """Take `size` bytes from the stream's and the connection's send windows, as h2's
    `send_data` does, for DATA framed without it; the stream's state does not change.

    h2 4.x keeps the windows in `H2Stream.outbound_flow_control_window` and
    `H2Connection.outbound_flow_control_window`. The stream must be one h2 knows.
    """
    conn.streams[stream_id].outbound_flow_control_window -= size
    conn.outbound_flow_control_window -= size


def account_whole_response(conn: h2.connection.H2Connection, stream_id: int, size: int) -> bool:
    """Leave h2's state as `send_headers` and then `send_data(..., end_stream=True)` of
    `size` bytes would (END_STREAM on the headers when `size` is 0), for a whole response
    framed without h2: the connection's state machine takes SEND_HEADERS (and SEND_DATA),
    the stream's SEND_HEADERS (SEND_DATA) and SEND_END_STREAM, and `size` is charged to
    the send windows. The caller then frames the response (with `encode_fields`).

    False, with nothing changed, when h2 does not know the stream or `size` exceeds what
    its windows allow. Uses h2 4.x's `H2Connection.streams` and both state machines.

    Raises:
        h2.exceptions.ProtocolError: the stream is not open for sending (as h2's own calls
            would raise it, before anything is encoded).
    """
    stream = conn.streams.get(stream_id)
    if stream is None:
        return False
    window = min(stream.outbound_flow_control_window, conn.outbound_flow_control_window)
    if size > window:
        return False
    machine = stream.state_machine
    if (
        conn.state_machine.state is ConnectionState.SERVER_OPEN
        and machine.state is StreamState.HALF_CLOSED_REMOTE
        and machine.client is False
        and not machine.headers_sent
    ):
        # The common case, a whole request answered: what the inputs below do from
        # these states (SEND_HEADERS sets headers_sent, SEND_END_STREAM closes the
        # stream and notes why), without the machines' table lookups.
        machine.headers_sent = True
        machine.state = StreamState.CLOSED
        machine.stream_closed_by = StreamClosedBy.SEND_END_STREAM
    else:
        conn.state_machine.process_input(ConnectionInputs.SEND_HEADERS)
        machine.process_input(StreamInputs.SEND_HEADERS)
        if size:
            conn.state_machine.process_input(ConnectionInputs.SEND_DATA)
            machine.process_input(StreamInputs.SEND_DATA)
        machine.process_input(StreamInputs.SEND_END_STREAM)
    if size:
        stream.outbound_flow_control_window -= size
        conn.outbound_flow_control_window -= size
    return True


def encode_fields(conn: h2.connection.H2Connection, fields: Sequence[tuple[bytes, bytes]]) -> bytes:
    """The HPACK header block of `fields` from the connection's own encoder (h2 4.x:
    `H2Connection.encoder`), so that its compression context stays in step with the
    blocks h2 makes. `fields` must already be valid and lower-cased."""
    return conn.encoder.encode(fields)


# -- content-length, checked per stream -------------------------------------------------


class PerStreamContentLength(h2.config.H2Configuration):
    """An h2 configuration under which h2 leaves content-length to its user.

    h2 treats a body that disagrees with its content-length (or a content-length that is
    not a number) as a connection error, killing every stream in flight, where RFC 9113
    section 8.1.1 asks for a stream error; the HTTP/2 front end checks it per stream
    instead. h2 4.x does the check in two methods of `H2Stream`, which this module
    replaces once, on the class, by ones that do nothing for a stream whose `config` is
    of this class; connections with any other configuration (the upstream client's) keep
    h2's own check.
    """


def _unless_per_stream(method: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(method)
    def checked(stream: H2Stream, *args: object) -> None:
        if isinstance(stream.config, PerStreamContentLength):
            return None
        return method(stream, *args)

    return checked


# Monkey-patching, confined to this module (see the module docstring); the flag keeps a
# second import (a test reloading the module) from wrapping the methods twice.
if not getattr(H2Stream, "_gatehouse_content_length", False):
    H2Stream._initialize_content_length = _unless_per_stream(  # type: ignore[method-assign]
        H2Stream._initialize_content_length
    )
    H2Stream._track_content_length = _unless_per_stream(  # type: ignore[method-assign]
        H2Stream._track_content_length
    )
    H2Stream._gatehouse_content_length = True  # type: ignore[attr-defined]


# -- HPACK memoised ---------------------------------------------------------------------
#
# HPACK (RFC 7541) is stateful, so a header block can only be reused while the dynamic
# table it refers to is unchanged. The rule that makes this safe is simple: a block made
# only of one-byte *indexed* representations (bytes 0x80-0xFE, section 6.1) never changes
# the table, and every change to the table (a literal with incremental indexing, section
# 6.2.1, or a size update, section 6.3) shows up as a byte outside that range. So:
#
# - decoding: an all-indexed block decodes to the same fields until a block that is not
#   all-indexed arrives; then the cache is dropped.
# - encoding: a field list that encoded to an all-indexed block encodes to it again until
#   some list encodes to anything else; then the cache is dropped.
#
# On a keep-alive connection that repeats its requests (API polling, load generators,
# gRPC calls to one method) both directions become dictionary lookups. Measured on this
# machine: h2's decode + encode of a typical request/response pair is ~45% of its
# per-stream cost.

_INDEXED_ONLY = re.compile(rb"[\x80-\xfe]+")
MAX_CACHED_BLOCKS = 64  # per connection and direction: a few kinds of request or response


def memoise_hpack(conn: h2.connection.H2Connection) -> None:
    """Wrap `conn`'s HPACK decoder and encoder with the caches described above.

    Replaces `decode` and `encode` on the connection's own `Decoder` and `Encoder`
    instances (h2 4.x calls them through `H2Connection.decoder` and `.encoder`), and reads
    hpack 4.x's `Encoder.table_size_changes` (pending size updates the next block must
    start with).
    """
    decoder = conn.decoder
    decode: Callable[..., Any] = decoder.decode
    decoded: dict[tuple[bytes, bool], tuple[Any, ...]] = {}

    def cached_decode(data: bytes, raw: bool = False) -> list[Any]:
        if _INDEXED_ONLY.fullmatch(data) is None:
            decoded.clear()  # the table may change: nothing cached is sure any more
            result: list[Any] = decode(data, raw)
            return result
        key = (bytes(data), raw)
        hit = decoded.get(key)
        if hit is not None:
            return list(hit)
        result = decode(data, raw)
        if len(decoded) < MAX_CACHED_BLOCKS:
            decoded[key] = tuple(result)
        return result

    encoder = conn.encoder
    encode: Callable[..., bytes] = encoder.encode
    encoded: dict[tuple[Any, ...], bytes] = {}

    def cached_encode(headers: Iterable[Any], huffman: bool = True) -> bytes:
        fields = tuple(headers)
        if encoder.table_size_changes:
            # The peer resized our table (SETTINGS_HEADER_TABLE_SIZE): this block must
            # start with a size update, and entries cached blocks point at may be gone.
            encoded.clear()
        hit = encoded.get(fields)
        if hit is not None:
            return hit
        block = encode(fields, huffman)
        if _INDEXED_ONLY.fullmatch(block) is None:
            encoded.clear()
        elif len(encoded) < MAX_CACHED_BLOCKS:
            encoded[fields] = block
        return block

    decoder.decode = cached_decode  # type: ignore[method-assign]
    encoder.encode = cached_encode  # type: ignore[method-assign]


# -- HPACK literal fields in linear time ------------------------------------------------
#
# RFC 7541 section 6.2. hpack's `Decoder.decode` hands each representation a memoryview
# of the rest of the block, and its `_decode_literal` copies that view to bytes (and
# slices the copy twice more) before reading one field: every literal field costs a copy
# of everything after it, so a block of n literal fields costs O(n^2). A client controls
# n: up to the decoder's header list limit, one HEADERS block of small literal fields took
# ~190 ms to decode here where ~15 ms is linear (16,000 fields, 158 KB). Indexed fields
# (section 6.1) were never copied and are left to hpack.
#
# The replacement does the same reading on the view, copying only the name and value,
# with hpack 4.x's own pieces (`decode_integer`, `decode_huffman`, the decoder's
# `header_table`); tests/proxy/protocol/test_hpack_literal.py checks that it decodes what
# hpack's own method decodes.

LiteralDecoder = Callable[[bytes | memoryview, bool], tuple[HeaderTuple, int]]


def linear_literals(conn: h2.connection.H2Connection) -> None:
    """Make `conn`'s HPACK decoder (h2 4.x: `H2Connection.decoder`) read literal fields
    without copying the rest of the block."""
    decode_literals_linearly(conn.decoder)


def decode_literals_linearly(decoder: Decoder) -> None:
    """Replace `_decode_literal` on this one hpack `Decoder` (hpack 4.x calls it as
    `self._decode_literal(data, should_index=...)` for every literal representation)."""
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
