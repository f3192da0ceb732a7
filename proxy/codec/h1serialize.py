"""HTTP/1.1 serialization: the one place message heads and chunks are turned into bytes.

Both sides (responses to clients, requests to upstreams) and both codecs use it. A header
name or value holding CR, LF or NUL would let one message smuggle another (response
splitting, RFC 9110 section 5.5), so it is refused here, whatever produced it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from http import HTTPStatus

_FORBIDDEN = re.compile(r"[\r\n\x00]")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# One regex pass over the whole block, plus a line count (a value holding "\r\nX: y" would
# otherwise read as two valid lines): far cheaper per request than a check per header.
_HEADER_BLOCK = re.compile(r"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+: [^\r\n\x00]*\r\n)*")
_REASONS = {status.value: status.phrase for status in HTTPStatus}
LAST_CHUNK = b"0\r\n\r\n"


class UnsafeHeader(ValueError):
    """A header name or value that cannot be written without splitting the message."""


def check_headers(pairs: Iterable[tuple[str, str]]) -> None:
    """Refuse names that are not tokens and values with CR, LF or NUL.

    Raises:
        UnsafeHeader: naming the offending header.
    """
    for name, value in pairs:
        if not _TOKEN.fullmatch(name) or _FORBIDDEN.search(value):
            raise UnsafeHeader(f"unsafe header {name!r}")


def header_block(headers: list[tuple[str, str]]) -> str:
    """`Name: value\r\n` for each header.

    Raises:
        UnsafeHeader: a name that is not a token, or a value with CR, LF or NUL.
    """
    block = "".join([f"{name}: {value}\r\n" for name, value in headers])
    if block.count("\n") != len(headers) or not _HEADER_BLOCK.fullmatch(block):
        check_headers(headers)  # names the culprit
        raise UnsafeHeader("unsafe header")  # pragma: no cover - check_headers raised
    return block


def reason_phrase(status: int) -> str:
    """The standard reason phrase for `status` ("" for unknown codes)."""
    return _REASONS.get(status, "")


def response_head(status: int, reason: str, headers: list[tuple[str, str]]) -> bytes:
    """`HTTP/1.1 status reason` + headers + blank line.

    Raises:
        UnsafeHeader: a header would split the message.
    """
    if _FORBIDDEN.search(reason):
        raise UnsafeHeader("unsafe reason phrase")
    return f"HTTP/1.1 {status} {reason}\r\n{header_block(headers)}\r\n".encode("latin-1")


def request_head(method: str, target: bytes, headers: list[tuple[str, str]]) -> bytes:
    """`METHOD target HTTP/1.1` + headers + blank line.

    Raises:
        UnsafeHeader: a header (or the target) would split the message.
    """
    if b"\r" in target or b"\n" in target or b" " in target or b"\x00" in target:
        raise UnsafeHeader("unsafe request target")
    block = header_block(headers).encode("latin-1")
    return b"%s %s HTTP/1.1\r\n%s\r\n" % (method.encode("ascii"), target, block)


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (RFC 9112 section 7.1)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def last_chunk(trailers: list[tuple[str, str]] | None) -> bytes:
    """The zero-length chunk, with trailer fields when there are any.

    Raises:
        UnsafeHeader: a trailer would split the message.
    """
    if not trailers:
        return LAST_CHUNK
    return b"0\r\n" + header_block(trailers).encode("latin-1") + b"\r\n"
