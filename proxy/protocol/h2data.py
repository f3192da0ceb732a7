"""Response DATA frames without h2's per-frame machinery.

h2 builds one frame object per `send_data` call and runs both state machines for it:
about 5 us per 16 KiB frame here, a third of the gateway's CPU for a 1 MiB response. For
the frames in the middle of a response nothing in those machines changes (the stream is
open and stays open; END_STREAM is never among them), so they are framed here (RFC 9113
section 6.1) and only the flow-control windows, which h2 must keep counting, are charged.
The last frame of every chunk still goes through h2.
"""

from __future__ import annotations

import struct

import h2.connection

# RFC 9113 section 4.1: 24-bit length, type (DATA = 0), flags, reserved bit + stream id.
_FRAME_HEADER = struct.Struct(">BHBBL")
DATA_TYPE = 0


def frame_data(
    conn: h2.connection.H2Connection, stream_id: int, data: memoryview, frame_size: int
) -> bytes:
    """DATA frames (no flags) carrying all of `data`, each at most `frame_size` bytes,
    charged to the stream's and the connection's send windows.

    The caller makes sure the stream is open on our side and that `data` fits both
    windows (h2's `local_flow_control_window`).
    """
    size = len(data)
    stream = conn.streams[stream_id]
    stream.outbound_flow_control_window -= size
    conn.outbound_flow_control_window -= size
    parts: list[bytes | memoryview] = []
    pack = _FRAME_HEADER.pack
    for offset in range(0, size, frame_size):
        piece = data[offset : offset + frame_size]
        length = len(piece)
        parts.append(pack(length >> 16, length & 0xFFFF, DATA_TYPE, 0, stream_id))
        parts.append(piece)
    return b"".join(parts)
