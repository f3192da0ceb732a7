"""The copy an upstream connection keeps of a streamed request body as it sends it, so
that a request the upstream never processed can be sent again (the HTTP/1.1 keep-alive
race, a refused HTTP/2 stream): kept while it is small, given up beyond that (larger
bodies are not worth the memory; such a request is not retried).
"""

from __future__ import annotations

# Streamed request bodies up to this size are kept for a replay.
REPLAY_BODY_LIMIT_BYTES = 64 * 1024


class BodyCopy:
    """The chunks of a request body sent so far, up to `REPLAY_BODY_LIMIT_BYTES`."""

    __slots__ = ("_chunks", "_size")

    def __init__(self) -> None:
        self._chunks: list[bytes] | None = []
        self._size = 0

    def __repr__(self) -> str:
        kept = "given up" if self._chunks is None else f"{self._size} bytes"
        return f"<BodyCopy {kept}>"

    def add(self, data: bytes) -> None:
        """`data` is being sent: keep it, unless the copy grows past the limit (then
        nothing is kept any more)."""
        chunks = self._chunks
        if chunks is not None:
            # Appended in place: rebuilding the list per chunk made a body of many small
            # chunks cost time quadratic in their number.
            self._size += len(data)
            if self._size <= REPLAY_BODY_LIMIT_BYTES:
                chunks.append(data)
            else:
                self._chunks = None

    def joined(self) -> bytes | None:
        """All that was added, or None when the copy was given up."""
        chunks = self._chunks
        return b"".join(chunks) if chunks is not None else None
