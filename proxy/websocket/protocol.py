"""What the gateway must know of WebSocket (RFC 6455) to tunnel it: the handshake's key and
accept values, where frames begin and end in a byte stream, and the close frame it sends.

The tunnel copies frames as bytes and never unmasks or decodes them. It still follows
frame boundaries in each direction (`FrameScanner`, a header parse per frame) for one
reason: a close frame we send on shutdown must start where a frame starts, or both peers
would read garbage where they should read "going away".
"""

from __future__ import annotations

import base64
import hashlib
import os

from wsproto.frame_protocol import FrameProtocol

# RFC 6455 section 1.3: the GUID appended to the client's key for the accept value.
_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# Close codes (RFC 6455 section 7.4.1) the gateway sends itself.
GOING_AWAY = 1001
_OPCODE_CLOSE = 0x8


def new_key() -> bytes:
    """A fresh Sec-WebSocket-Key: 16 random bytes, base64 (RFC 6455 section 4.1)."""
    return base64.b64encode(os.urandom(16))


def accept_value(key: bytes) -> bytes:
    """The Sec-WebSocket-Accept a server must answer `key` with (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.strip() + _ACCEPT_GUID).digest())


def is_websocket(upgrade: bytes | str | None) -> bool:
    """True when an Upgrade field value offers "websocket" (a comma-separated list of
    protocols, RFC 9110 section 7.8, compared case-insensitively)."""
    if not upgrade:
        return False
    if isinstance(upgrade, bytes):
        upgrade = upgrade.decode("latin-1")
    return any(
        token.strip().partition("/")[0].lower() == "websocket" for token in upgrade.split(",")
    )


def close_frame(code: int, reason: str, *, masked: bool) -> bytes:
    """A close frame; `masked` for frames we send as a client (to the upstream)."""
    return bytes(FrameProtocol(client=masked, extensions=[]).close(code, reason))


class FrameScanner:
    """Follows frame boundaries in one direction of a tunnel without copying anything.

    `feed` is called with every chunk in order; `left` is how many bytes of the current
    frame are still to come (0: the next byte starts a frame). A header split across
    chunks is kept in `_partial`. A stream that stops parsing as WebSocket (it cannot,
    once the handshake succeeded, unless a peer is broken) marks the scanner `lost`.
    """

    __slots__ = ("_partial", "close_seen", "left", "lost")

    def __init__(self) -> None:
        self.left = 0
        self._partial = b""
        self.close_seen = False  # a close frame passed: the close handshake has begun
        self.lost = False

    def __repr__(self) -> str:
        state = "LOST" if self.lost else "BOUNDARY" if self.at_boundary else "IN_FRAME"
        return f"<FrameScanner {state} left={self.left} close_seen={self.close_seen}>"

    @property
    def at_boundary(self) -> bool:
        """True when the next byte starts a frame."""
        return not self.left and not self._partial and not self.lost

    def feed(self, data: bytes) -> None:
        """Advance over `data`."""
        size = len(data)
        left = self.left
        if left >= size and not self._partial:
            self.left = left - size  # wholly inside the current frame (the common case)
            return
        self.left = self._scan(data)

    def split(self, data: bytes) -> tuple[bytes, bytes]:
        """`data` cut where its first frame boundary falls: the end of the frame under way,
        and what follows. With no boundary in `data`, all of it is the first part."""
        if self.at_boundary:
            return b"", data
        if self.lost:
            return data, b""
        before = self.left if not self._partial else self._header_rest(data)
        if before is None or before >= len(data):
            self.feed(data)
            return data, b""
        self.feed(data[:before])
        return data[:before], data[before:]

    def _header_rest(self, data: bytes) -> int | None:
        """With a partial header pending: how many bytes of `data` end its frame."""
        header = self._partial + data
        parsed = _parse_header(header, 0)
        if parsed is None:
            return None
        size, length, _ = parsed
        return size + length - len(self._partial)

    def _scan(self, data: bytes) -> int:
        if self.lost:
            return 0
        pos = self.left
        if self._partial:
            data = self._partial + data
            self._partial = b""
        end = len(data)
        while pos < end:
            parsed = _parse_header(data, pos)
            if parsed is None:
                self._partial = data[pos:]
                return 0
            size, length, opcode = parsed
            if opcode == _OPCODE_CLOSE:
                self.close_seen = True
            elif 0x3 <= opcode <= 0x7 or opcode >= 0xB:  # reserved: not WebSocket any more
                self.lost = True
                return 0
            pos += size + length
        return pos - end


def _parse_header(data: bytes, pos: int) -> tuple[int, int, int] | None:
    """(header size, payload length, opcode) of the frame at `pos`; None when the header
    is not complete in `data` yet."""
    available = len(data) - pos
    if available < 2:
        return None
    second = data[pos + 1]
    length = second & 0x7F
    size = 6 if second & 0x80 else 2  # a masked frame carries a 4-byte key
    if length == 126:
        if available < size + 2:
            return None
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        size += 2
    elif length == 127:
        if available < size + 8:
            return None
        length = int.from_bytes(data[pos + 2 : pos + 10], "big")
        size += 8
    elif available < size:
        return None
    return size, length, data[pos] & 0x0F
