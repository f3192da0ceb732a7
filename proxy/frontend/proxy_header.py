"""The PROXY protocol header (HAProxy's "PROXY protocol" specification, versions 1 and 2),
parsed without I/O.

A load balancer that relays TCP (HAProxy `send-proxy`/`send-proxy-v2`, an AWS NLB, ...)
writes one header at the start of the connection saying whom it relays for, then the
client's bytes unchanged. Both forms:

- v1, text: `PROXY TCP4 <src> <dst> <sport> <dport>\\r\\n` (TCP6 likewise), or
  `PROXY UNKNOWN ...\\r\\n`; at most 107 bytes with the CRLF.
- v2, binary: a 12-byte signature, a version/command byte (0x20 LOCAL, 0x21 PROXY), a
  family/transport byte (0x11 TCP over IPv4, 0x21 TCP over IPv6; 0x00 UNSPEC, 0x31 TCP
  over a Unix socket), a 16-bit length, then the addresses and TLVs (skipped here).

LOCAL (the balancer's own health check), UNKNOWN, UNSPEC and Unix-socket headers carry no
usable client address: the connection is served as its TCP peer's (`ProxyHeader.source`
is None), as the specification asks. Anything else (a UDP header on a TCP listener, a
bad signature, version or address, a header over the bounds) is refused.

`ProxyHeaderReader.feed` takes what has arrived and returns how many of those bytes
belong to the header, never one more: the socket reader (proxy/frontend/listener.py) peeks,
feeds, then consumes exactly that many, so the TLS ClientHello or the HTTP request that
follows stays unread for the layer that owns it.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

from proxy.core.addresses import canonical

V1_PREFIX = b"PROXY "
V1_MAX_BYTES = 107  # the specification's bound, "PROXY UNKNOWN" with two full IPv6 addresses
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_BYTES = 16  # signature, version/command, family/transport, length
# The v2 length field allows 64 KiB of addresses and TLVs; real balancers send a few
# dozen bytes (AWS's VPC endpoint TLV, HAProxy's SSL TLVs). More is refused.
V2_MAX_PAYLOAD_BYTES = 4096

_V2_LOCAL, _V2_PROXY = 0x20, 0x21
_UNSPEC, _TCP4, _TCP6, _UNIX_STREAM = 0x00, 0x11, 0x21, 0x31
_V2_ADDRESS_BYTES = {_TCP4: 12, _TCP6: 36, _UNIX_STREAM: 216}
_MAX_PORT = 65535


class ProxyHeaderState(enum.Enum):
    """How far the header has been read."""

    START = "start"  # nothing yet, or too little to tell the version
    V1 = "v1"
    V2 = "v2"
    DONE = "done"


class ProxyHeaderError(Exception):
    """The bytes are not a valid PROXY protocol header (or one this listener refuses)."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed header. `source` is the client's (address, port), in canonical form;
    None when the header names no client (LOCAL, UNKNOWN, UNSPEC, Unix socket)."""

    version: int
    source: tuple[str, int] | None
    destination: tuple[str, int] | None = None


class ProxyHeaderReader:
    """Reads one PROXY header from the start of a byte stream (see the module docstring)."""

    __slots__ = ("_buffer", "_needed", "header", "state")

    def __init__(self) -> None:
        self.state = ProxyHeaderState.START
        self._buffer = bytearray()
        self._needed = V2_FIXED_BYTES  # v2: the header's whole length once known
        self.header: ProxyHeader | None = None

    def __repr__(self) -> str:
        return f"<ProxyHeaderReader {self.state.name} read={len(self._buffer)}>"

    def wanted(self) -> int:
        """The most bytes that can still belong to the header (what to peek at)."""
        state = self.state
        if state is ProxyHeaderState.V2:
            return self._needed - len(self._buffer)
        if state is ProxyHeaderState.DONE:
            return 0
        return V1_MAX_BYTES - len(self._buffer)

    def feed(self, data: bytes) -> int:
        """Take the header's bytes from the start of `data`; the number taken. When it
        completes the header, `header` is set and the rest of `data` is not the header's.

        Raises:
            ProxyHeaderError: the bytes so far cannot begin a valid header.
        """
        taken = 0
        while taken < len(data) and self.state is not ProxyHeaderState.DONE:
            state = self.state
            if state is ProxyHeaderState.START:
                taken += self._start(data[taken:])
            elif state is ProxyHeaderState.V1:
                taken += self._v1(data[taken:])
            elif state is ProxyHeaderState.V2:
                taken += self._v2(data[taken:])
            else:  # pragma: no cover - the loop stops at DONE
                raise AssertionError(state)
        return taken

    def _start(self, data: bytes) -> int:
        """Tell the version from the first bytes (each form's prefix is checked as it
        arrives, so a client speaking TLS or HTTP here is refused at once)."""
        seen = bytes(self._buffer) + data[: V2_FIXED_BYTES - len(self._buffer)]
        if V1_PREFIX.startswith(seen[: len(V1_PREFIX)]):
            if len(seen) < len(V1_PREFIX):
                return self._take(data, len(seen) - len(self._buffer))
            self.state = ProxyHeaderState.V1
            return 0
        if V2_SIGNATURE.startswith(seen[: len(V2_SIGNATURE)]):
            self.state = ProxyHeaderState.V2
            return 0
        raise ProxyHeaderError("not a PROXY protocol header")

    def _take(self, data: bytes, count: int) -> int:
        """Buffer at most `count` bytes of `data`; how many were."""
        chunk = data[:count]
        self._buffer += chunk
        return len(chunk)

    def _v1(self, data: bytes) -> int:
        end = data.find(b"\n")
        if end < 0:
            if len(self._buffer) + len(data) >= V1_MAX_BYTES:
                raise ProxyHeaderError(f"v1 header longer than {V1_MAX_BYTES} bytes")
            return self._take(data, len(data))
        taken = self._take(data, end + 1)
        line = bytes(self._buffer)
        if len(line) > V1_MAX_BYTES:
            raise ProxyHeaderError(f"v1 header longer than {V1_MAX_BYTES} bytes")
        if not line.endswith(b"\r\n"):
            raise ProxyHeaderError("v1 header not ended by CRLF")
        self.header = _parse_v1(line[len(V1_PREFIX) : -2])
        self.state = ProxyHeaderState.DONE
        return taken

    def _v2(self, data: bytes) -> int:
        have = len(self._buffer)
        taken = self._take(data, self._needed - have)
        fixed = bytes(self._buffer[:V2_FIXED_BYTES])
        if not V2_SIGNATURE.startswith(fixed[: len(V2_SIGNATURE)]):
            raise ProxyHeaderError("not a PROXY protocol header (a v2 signature gone wrong)")
        if have < V2_FIXED_BYTES <= len(self._buffer):
            length = int.from_bytes(fixed[14:16], "big")
            if length > V2_MAX_PAYLOAD_BYTES:
                raise ProxyHeaderError(
                    f"v2 header of {length} bytes (at most {V2_MAX_PAYLOAD_BYTES})"
                )
            self._needed = V2_FIXED_BYTES + length
        if len(self._buffer) == self._needed:
            self.header = _parse_v2(bytes(self._buffer))
            self.state = ProxyHeaderState.DONE
        return taken


def _parse_v1(fields_text: bytes) -> ProxyHeader:
    """The part of a v1 line after `PROXY ` and before the CRLF."""
    try:
        text = fields_text.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("v1 header is not ASCII") from None
    fields = text.split(" ")
    if fields[0] == "UNKNOWN":
        return ProxyHeader(1, None)  # the rest of the line is to be ignored
    if fields[0] not in ("TCP4", "TCP6") or len(fields) != 5:
        raise ProxyHeaderError(f"bad v1 header {text!r}")
    version = 4 if fields[0] == "TCP4" else 6
    source = (_v1_address(fields[1], version), _v1_port(fields[3]))
    destination = (_v1_address(fields[2], version), _v1_port(fields[4]))
    return ProxyHeader(1, source, destination)


def _v1_address(text: str, version: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyHeaderError(f"bad v1 address {text!r}") from None
    if address.version != version:
        raise ProxyHeaderError(f"v1 address {text!r} is not IPv{version}")
    return canonical(str(address))


def _v1_port(text: str) -> int:
    # Decimal, 0..65535, no sign or leading zero (the specification's form).
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0"):
        raise ProxyHeaderError(f"bad v1 port {text!r}")
    port = int(text)
    if port > _MAX_PORT:
        raise ProxyHeaderError(f"bad v1 port {text!r}")
    return port


def _parse_v2(header: bytes) -> ProxyHeader:
    """A whole v2 header (fixed part, addresses, TLVs)."""
    command, family = header[12], header[13]
    payload = header[V2_FIXED_BYTES:]
    if command == _V2_LOCAL:
        return ProxyHeader(2, None)  # the balancer's own connection: its address stands
    if command != _V2_PROXY:
        raise ProxyHeaderError(f"bad v2 version/command byte 0x{command:02x}")
    if family == _UNSPEC:
        return ProxyHeader(2, None)
    needed = _V2_ADDRESS_BYTES.get(family)
    if needed is None:
        raise ProxyHeaderError(f"unsupported v2 family/transport 0x{family:02x}")
    if len(payload) < needed:
        raise ProxyHeaderError(f"v2 addresses need {needed} bytes, got {len(payload)}")
    if family == _UNIX_STREAM:
        return ProxyHeader(2, None)
    size = 4 if family == _TCP4 else 16
    source_ip = ipaddress.ip_address(payload[:size])
    destination_ip = ipaddress.ip_address(payload[size : 2 * size])
    ports = payload[2 * size : 2 * size + 4]
    return ProxyHeader(
        2,
        (canonical(str(source_ip)), int.from_bytes(ports[:2], "big")),
        (canonical(str(destination_ip)), int.from_bytes(ports[2:], "big")),
    )
