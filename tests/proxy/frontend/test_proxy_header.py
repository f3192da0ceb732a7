"""The PROXY protocol header reader (proxy/frontend/proxy_header.py) without sockets: both
versions fed whole and byte by byte, never a byte of what follows taken, the headers that
name no client, every refusal, and random bytes."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.frontend.proxy_header import (
    V1_MAX_BYTES,
    V2_FIXED_BYTES,
    V2_MAX_PAYLOAD_BYTES,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderReader,
    ProxyHeaderState,
)

REQUEST = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"


def v2(
    command: int = 0x21,
    family: int = 0x11,
    source: str = "203.0.113.7",
    destination: str = "10.0.0.1",
    ports: tuple[int, int] = (51234, 443),
    tlvs: bytes = b"",
    length: int | None = None,
) -> bytes:
    """A v2 header: addresses for TCP over IPv4 (0x11) or IPv6 (0x21), else none."""
    if family in (0x11, 0x21):
        addresses = (
            ipaddress.ip_address(source).packed
            + ipaddress.ip_address(destination).packed
            + struct.pack("!HH", *ports)
        )
    elif family == 0x31:
        addresses = b"/run/client.sock".ljust(108, b"\0") + b"/run/lb.sock".ljust(108, b"\0")
    else:
        addresses = b""
    payload = addresses + tlvs
    size = len(payload) if length is None else length
    return V2_SIGNATURE + bytes([command, family]) + struct.pack("!H", size) + payload


def read_whole(data: bytes) -> tuple[ProxyHeader, int]:
    reader = ProxyHeaderReader()
    taken = reader.feed(data)
    assert reader.header is not None
    assert reader.state is ProxyHeaderState.DONE
    assert reader.wanted() == 0
    return reader.header, taken


def read_bytewise(data: bytes) -> tuple[ProxyHeader, int]:
    reader = ProxyHeaderReader()
    taken = 0
    for index in range(len(data)):
        assert reader.wanted() > 0
        taken += reader.feed(data[index : index + 1])
        if reader.header is not None:
            return reader.header, taken
    raise AssertionError(f"incomplete after {len(data)} bytes: {reader!r}")


@pytest.mark.parametrize("read", [read_whole, read_bytewise])
@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n",
            ProxyHeader(1, ("203.0.113.7", 51234), ("10.0.0.1", 443)),
        ),
        (
            b"PROXY TCP6 2001:DB8::7 ::1 0 65535\r\n",
            ProxyHeader(1, ("2001:db8::7", 0), ("::1", 65535)),
        ),
        (b"PROXY UNKNOWN\r\n", ProxyHeader(1, None)),
        (b"PROXY UNKNOWN ffff:: ffff:: 1 2\r\n", ProxyHeader(1, None)),  # the rest ignored
        (v2(), ProxyHeader(2, ("203.0.113.7", 51234), ("10.0.0.1", 443))),
        (
            v2(family=0x21, source="2001:db8::7", destination="::ffff:10.0.0.1"),
            ProxyHeader(2, ("2001:db8::7", 51234), ("10.0.0.1", 443)),
        ),
        # TLVs (type, length, value: here AWS's VPC endpoint id and a NOOP) are skipped.
        (
            v2(tlvs=b"\xea\x00\x08\x01vpce-1\x04\x00\x02ab"),
            ProxyHeader(2, ("203.0.113.7", 51234), ("10.0.0.1", 443)),
        ),
        (v2(command=0x20, family=0x00), ProxyHeader(2, None)),  # LOCAL: a health check
        (v2(command=0x20), ProxyHeader(2, None)),  # LOCAL ignores its addresses
        (v2(family=0x00, tlvs=b"junk"), ProxyHeader(2, None)),  # UNSPEC
        (v2(family=0x31), ProxyHeader(2, None)),  # a Unix socket names no IP client
    ],
)
def test_headers_are_read_and_nothing_after_them(
    read: object, header: bytes, expected: ProxyHeader
) -> None:
    assert callable(read)
    for rest in (b"", REQUEST, CLIENT_HELLO):
        found, taken = read(header + rest)
        assert found == expected
        assert taken == len(header)


def test_wanted_bounds_the_peek_to_what_can_still_be_header() -> None:
    reader = ProxyHeaderReader()
    assert reader.wanted() == V1_MAX_BYTES
    assert reader.feed(b"PROXY TCP4 ") == 11
    assert reader.wanted() == V1_MAX_BYTES - 11
    assert "V1" in repr(reader)
    reader = ProxyHeaderReader()
    assert reader.feed(V2_SIGNATURE[:5]) == 5
    assert reader.wanted() == V2_FIXED_BYTES - 5
    assert reader.feed(v2()[5:V2_FIXED_BYTES]) == V2_FIXED_BYTES - 5
    assert reader.wanted() == 12  # the IPv4 addresses and ports


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (REQUEST, "not a PROXY protocol header"),
        (CLIENT_HELLO, "not a PROXY protocol header"),
        (b"PRXY", "not a PROXY protocol header"),
        (b"\r\n\r\n\x00\r\nQUIX\n", "not a PROXY protocol header"),
        (b"PROXY TCP4 203.0.113.7 10.0.0.1 1 2\n", "not ended by CRLF"),
        (b"PROXY TCP5 203.0.113.7 10.0.0.1 1 2\r\n", "bad v1 header"),
        (b"PROXY TCP4 203.0.113.7 10.0.0.1 1\r\n", "bad v1 header"),
        (b"PROXY TCP4  203.0.113.7 10.0.0.1 1 2\r\n", "bad v1 header"),
        (b"PROXY TCP4 203.0.113.777 10.0.0.1 1 2\r\n", "bad v1 address"),
        (b"PROXY TCP4 2001:db8::1 10.0.0.1 1 2\r\n", "is not IPv4"),
        (b"PROXY TCP6 203.0.113.7 ::1 1 2\r\n", "is not IPv6"),
        (b"PROXY TCP4 203.0.113.7 10.0.0.1 01 2\r\n", "bad v1 port"),
        (b"PROXY TCP4 203.0.113.7 10.0.0.1 1 65536\r\n", "bad v1 port"),
        (b"PROXY TCP4 203.0.113.7 10.0.0.1 -1 2\r\n", "bad v1 port"),
        (b"PROXY TCP4 203.0.113.7 10.0.0.1 \xd9\xa1 2\r\n", "not ASCII"),
        (b"PROXY UNKNOWN" + b" " * 100 + b"\r\n", "longer than 107"),
        (b"PROXY " + b"x" * 101, "longer than 107"),
        (v2(command=0x22), "bad v2 version/command byte 0x22"),
        (v2(command=0x11), "bad v2 version/command byte 0x11"),
        (v2(family=0x12), "unsupported v2 family/transport 0x12"),  # UDP over IPv4
        (v2(family=0x10), "unsupported v2 family/transport 0x10"),
        (v2(family=0x41), "unsupported v2 family/transport 0x41"),
        (v2(tlvs=b"")[: V2_FIXED_BYTES - 2] + b"\x00\x04" + b"\x00" * 4, "need 12 bytes, got 4"),
        (v2(length=V2_MAX_PAYLOAD_BYTES + 1), "v2 header of 4097 bytes"),
    ],
)
def test_bad_headers_are_refused(data: bytes, message: str) -> None:
    for feed in ("whole", "bytewise"):
        reader = ProxyHeaderReader()
        with pytest.raises(ProxyHeaderError, match=message):  # noqa: PT012 - both ways
            if feed == "whole":
                reader.feed(data)
            else:
                for index in range(len(data)):
                    reader.feed(data[index : index + 1])
        assert reader.header is None


def test_a_v1_header_is_refused_as_soon_as_it_cannot_end_in_time() -> None:
    reader = ProxyHeaderReader()
    assert reader.feed(b"PROXY " + b"1" * (V1_MAX_BYTES - 7)) == V1_MAX_BYTES - 1
    assert reader.wanted() == 1
    with pytest.raises(ProxyHeaderError, match="longer than 107"):
        reader.feed(b"1")


@given(st.binary(max_size=300))
def test_random_bytes_give_a_header_or_a_refusal(data: bytes) -> None:
    reader = ProxyHeaderReader()
    try:
        taken = reader.feed(data)
    except ProxyHeaderError:
        return
    assert taken <= len(data)
    if reader.header is None:
        assert taken == len(data)  # all of it may still be the start of a header


@given(
    st.sampled_from(
        [
            b"PROXY TCP4 198.51.100.1 10.0.0.1 8080 80\r\n",
            b"PROXY UNKNOWN\r\n",
            v2(tlvs=b"\x04\x00\x03abc"),
            v2(family=0x21, source="2001:db8::1", destination="2001:db8::2"),
        ]
    ),
    st.lists(st.integers(1, 40), min_size=1, max_size=20),
)
def test_any_split_of_the_input_reads_the_same(header: bytes, sizes: list[int]) -> None:
    """As the socket reader does it: peek at what arrived (at most `wanted`), feed it,
    consume what was taken."""
    data = header + REQUEST
    expected, _ = read_whole(data)
    reader = ProxyHeaderReader()
    position = 0
    for size in sizes * 100:
        if reader.header is not None:
            break
        position += reader.feed(data[position : position + min(size, reader.wanted())])
    assert reader.header == expected
    assert position == len(header)
