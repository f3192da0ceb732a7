"""Response frames without h2's per-frame machinery.

h2 builds a frame object per call, validates and normalises, and runs both state machines
for it: about 5 us per 16 KiB DATA frame here (a third of the gateway's CPU for a 1 MiB
response), and about 15 us for the HEADERS and DATA of a small response (a third of the
HTTP/2 front end's cost per request). Two cases are framed here instead (RFC 9113
sections 4.1, 6.1, 6.2, 6.10), with h2's bookkeeping kept exactly as its own calls
would leave it:

- the DATA frames of a response chunk that does not end the stream (`frame_data`):
  nothing changes in the state machines (the stream is open and stays open), only the
  flow-control windows are charged; the frames are headers beside views of the chunk,
  which go out with one writev (a 1 MiB response's bytes were copied twice more, by
  the framing and by the write buffer, 9% of the gateway's CPU on h2c /1m);
- a whole small response (`complete_response`): the stream's state machine is driven
  through the same inputs h2's send_headers/send_data would give it (SEND_HEADERS,
  SEND_DATA, SEND_END_STREAM), the windows are charged, and the header block comes from
  the connection's own HPACK encoder, so the compression context stays in step.

h2's bookkeeping (its stream objects, state machines, send windows and HPACK encoder) is
reached only through proxy/codec/h2compat.py, whose test checks it against the installed
h2; this module makes the frames.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import h2.connection

from proxy.codec.h2compat import account_whole_response, charge_send_windows, encode_fields

# RFC 9113 section 4.1: 24-bit length, type (DATA = 0), flags, reserved bit + stream id.
_FRAME_HEADER = struct.Struct(">BHBBL")
DATA_TYPE = 0
HEADERS_TYPE = 1
CONTINUATION_TYPE = 9
END_STREAM = 0x1
END_HEADERS = 0x4


def frame_data(
    conn: h2.connection.H2Connection, stream_id: int, data: memoryview, frame_size: int
) -> list[bytes | memoryview]:
    """DATA frames (no flags) carrying all of `data`, each at most `frame_size` bytes,
    charged to the stream's and the connection's send windows: a list of pieces, each
    frame's header then a view of its part of `data` (written as they are, with one
    writev: the body is not copied here).

    The caller makes sure the stream is open on our side and that `data` fits both
    windows (h2's `local_flow_control_window`).
    """
    size = len(data)
    charge_send_windows(conn, stream_id, size)
    parts: list[bytes | memoryview] = []
    pack = _FRAME_HEADER.pack
    for offset in range(0, size, frame_size):
        piece = data[offset : offset + frame_size]
        length = len(piece)
        parts.append(pack(length >> 16, length & 0xFFFF, DATA_TYPE, 0, stream_id))
        parts.append(piece)
    return parts


def complete_response(
    conn: h2.connection.H2Connection,
    stream_id: int,
    fields: Sequence[tuple[bytes, bytes]],
    data: bytes,
) -> bytes | None:
    """HEADERS (with CONTINUATION if the block is large) and, when `data` is not empty, one
    DATA frame: a whole response that ends the stream. None when it must go through h2
    instead (the stream is not open for sending, or `data` does not fit one frame or the
    windows); then nothing has changed.

    `fields` must already be valid and lower-cased (h2fields.response_fields).
    """
    size = len(data)
    frame_size = conn.max_outbound_frame_size
    # h2's state first, as its send_headers and send_data would leave it, before the
    # irreversible HPACK encoding; an invalid state raises there, with nothing encoded.
    if size > frame_size or not account_whole_response(conn, stream_id, size):
        return None
    block = encode_fields(conn, fields)
    pack = _FRAME_HEADER.pack
    end_on_headers = 0 if size else END_STREAM
    parts: list[bytes] = []
    if len(block) <= frame_size:
        length = len(block)
        flags = END_HEADERS | end_on_headers
        parts += (pack(length >> 16, length & 0xFFFF, HEADERS_TYPE, flags, stream_id), block)
    else:
        # RFC 9113 section 6.10: the rest of the block follows in CONTINUATION frames.
        for offset in range(0, len(block), frame_size):
            piece = block[offset : offset + frame_size]
            length = len(piece)
            last = offset + frame_size >= len(block)
            kind = HEADERS_TYPE if offset == 0 else CONTINUATION_TYPE
            flags = (end_on_headers if offset == 0 else 0) | (END_HEADERS if last else 0)
            parts += (pack(length >> 16, length & 0xFFFF, kind, flags, stream_id), piece)
    if size:
        parts += (pack(size >> 16, size & 0xFFFF, DATA_TYPE, END_STREAM, stream_id), data)
    return b"".join(parts)
