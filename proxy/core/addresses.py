"""IP addresses as the gateway compares them, and address sets compiled for fast membership.

An address is (IP version, integer value): parsing is one `inet_pton`, and IPv4-mapped
IPv6 addresses (what a dual-stack socket reports for IPv4 peers) are IPv4, so
`::ffff:10.0.0.1` and `10.0.0.1` are one client. An `AddressSet` (a trust list, an
allow list) is merged at load into sorted disjoint intervals: membership is one `bisect`
however long the list. Used by `client_ip` resolution (proxy/core/client_ip.py) and ip_filter.
"""

from __future__ import annotations

import ipaddress
import socket
from bisect import bisect_right
from collections.abc import Iterable
from typing import TypeVar

from proxy.config.values import ConfigValueError

# An address as (IP version, integer value); IPv4-mapped IPv6 addresses are IPv4.
Address = tuple[int, int]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Entries in each table of remembered addresses (client resolution, ip_filter's verdicts).
ADDRESS_CACHE_ENTRIES = 4096

_MAPPED_PREFIX = 0xFFFF  # ::ffff:0:0/96 (RFC 4291 section 2.5.5.2), above the low 32 bits
_MAPPED_NETWORK = ipaddress.IPv6Network("::ffff:0:0/96")
_AF_INET, _AF_INET6 = socket.AF_INET, socket.AF_INET6
_inet_pton = socket.inet_pton


def parse_address(text: str) -> Address | None:
    """`text` as an Address, or None when it is not an IPv4 or IPv6 address. An IPv6 zone
    (`fe80::1%eth0`) is dropped; an IPv4-mapped IPv6 address (`::ffff:10.0.0.1`, what a
    dual-stack socket reports for IPv4 peers) becomes the IPv4 address."""
    try:
        if ":" not in text:
            return 4, int.from_bytes(_inet_pton(_AF_INET, text), "big")
        value = int.from_bytes(_inet_pton(_AF_INET6, text.partition("%")[0]), "big")
    except (OSError, ValueError):  # ValueError: an embedded NUL
        return None
    if value >> 32 == _MAPPED_PREFIX:
        return 4, value & 0xFFFFFFFF
    return 6, value


def parse_forwarded_entry(text: str) -> Address | None:
    """One X-Forwarded-For list entry, or the node of a `Forwarded: for=` parameter once
    unquoted (RFC 7239 section 6): an address, also in the forms with a port
    (`192.0.2.1:4711`, `[2001:db8::1]:4711`) or in brackets; None otherwise (`unknown`,
    an obfuscated identifier such as `_hidden`, garbage)."""
    address = parse_address(text)
    if address is not None or not text:
        return address
    if text[0] == "[":
        inside, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
            return None
        return parse_address(inside)
    host, colon, port = text.rpartition(":")
    if colon and ":" not in host and port.isdigit():
        return parse_address(host)
    return None


def format_address(address: Address) -> str:
    """The address in its canonical text form (`10.0.0.1`, `2001:db8::1`)."""
    version, value = address
    if version == 4:
        return str(ipaddress.IPv4Address(value))
    return str(ipaddress.IPv6Address(value))


def canonical(text: str) -> str:
    """`text` in canonical form when it is an IP address (`::ffff:10.0.0.1` reads
    `10.0.0.1`), else as it is (the peer of a Unix socket, "")."""
    address = parse_address(text)
    return format_address(address) if address is not None else text


def parse_network(text: str) -> Network:
    """An address (`192.0.2.7`, `2001:db8::1`) or a CIDR range (`10.0.0.0/8`,
    `2001:db8::/32`). IPv4-mapped IPv6 ranges become their IPv4 range.

    Raises:
        ConfigValueError: not an address or range, or a range with host bits set (a typo
            more often than not: `10.0.0.1/8` is refused with the range it probably meant).
    """
    try:
        network: Network = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            raise ConfigValueError(f"{text!r} is not an IP address or CIDR range ({exc})") from None
        raise ConfigValueError(f"{text!r} has host bits set (did you mean '{loose}'?)") from None
    if (
        isinstance(network, ipaddress.IPv6Network)
        and network.prefixlen >= 96
        and network.subnet_of(_MAPPED_NETWORK)
    ):
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


class AddressSet:
    """A set of addresses and ranges, merged at load into sorted disjoint intervals per IP
    version, so membership is one binary search however long the list."""

    __slots__ = ("_ends", "_starts", "networks")

    def __init__(self, networks: Iterable[Network]) -> None:
        self.networks = tuple(networks)  # as configured (for repr and messages)
        self._starts: dict[int, list[int]] = {4: [], 6: []}
        self._ends: dict[int, list[int]] = {4: [], 6: []}
        v4 = [n for n in self.networks if isinstance(n, ipaddress.IPv4Network)]
        v6 = [n for n in self.networks if isinstance(n, ipaddress.IPv6Network)]
        for version, group in (
            (4, ipaddress.collapse_addresses(v4)),
            (6, ipaddress.collapse_addresses(v6)),
        ):
            for network in group:
                self._starts[version].append(int(network.network_address))
                self._ends[version].append(int(network.broadcast_address))

    def __contains__(self, address: Address) -> bool:
        version, value = address
        starts = self._starts[version]
        index = bisect_right(starts, value) - 1
        return index >= 0 and value <= self._ends[version][index]

    def __len__(self) -> int:
        """The number of disjoint ranges after merging."""
        return len(self._starts[4]) + len(self._starts[6])

    def __repr__(self) -> str:
        return f"<AddressSet {', '.join(str(n) for n in self.networks)}>"


_K = TypeVar("_K")
_V = TypeVar("_V")


def remember(cache: dict[_K, _V], key: _K, value: _V) -> None:
    """Store in a bounded table: a full one starts over (cheaper than an LRU, and the
    working set of a gateway's clients refills it at once). The keys come from the
    network, so every such table must be bounded."""
    if len(cache) >= ADDRESS_CACHE_ENTRIES:
        cache.clear()
    cache[key] = value
