"""The real client address of a request, and address sets compiled for fast membership.

Without trusted proxies the client is the peer of the connection (`Request.client`).
Behind proxies it is found the standard way (nginx `real_ip_recursive on`, Envoy
`xff_num_trusted_hops`, MDN's "rightmost untrusted"): only when the peer itself is a
trusted proxy is X-Forwarded-For read, from the right, skipping addresses inside
`trusted_proxies`; the first address that is not trusted is the client. The leftmost
entries are whatever the client chose to write, so a spoofed entry never wins unless
every hop to its right is trusted.

Used by `ip_filter`; made to be shared with anything keyed by client address (rate
limits by ip, the access log). Address sets are built once at config load; a lookup is one
`inet_pton` and one `bisect`.
"""

from __future__ import annotations

import ipaddress
import socket
from bisect import bisect_right
from collections.abc import Iterable
from typing import TYPE_CHECKING, TypeVar

from yaml.nodes import Node

from middleware.options import ConfigValueError, Options
from proxy.config_reader import NodeReader, Reported

if TYPE_CHECKING:
    from proxy.models import Request

# An address as (IP version, integer value); IPv4-mapped IPv6 addresses are IPv4.
Address = tuple[int, int]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Entries in each table of remembered addresses (ClientIp, ip_filter's verdicts).
ADDRESS_CACHE_ENTRIES = 4096
# X-Forwarded-For entries walked at most: a legitimate chain has a handful of proxies, and
# a client can pad the header with addresses it knows are trusted to make us walk it all.
MAX_FORWARDED_HOPS = 32

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
    """One X-Forwarded-For list entry: an address, also in the forms some proxies write
    with a port (`192.0.2.1:4711`, `[2001:db8::1]:4711`) or in brackets; None otherwise
    (`unknown`, an obfuscated identifier, garbage)."""
    address = parse_address(text)
    if address is not None or not text:
        return address
    if text[0] == "[":
        inside, bracket, _ = text[1:].partition("]")
        return parse_address(inside) if bracket else None
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


def read_networks(options: Options, key: str) -> AddressSet | None:
    """Option `key`: a list of addresses and CIDR ranges (one string reads as a list of
    one), each checked at load with its own line in the error; None when absent (or
    broken: the errors are recorded). An empty list is an error: it would match nothing,
    which is never what a filter or a trust list means."""
    if key not in options:
        return None
    networks: list[Network] = []
    failed = False
    found = _option_items(options, key)
    if found is None:
        return None
    reader, items = found
    for node, path in items:
        try:
            networks.append(
                reader.convert(node, path, parse_network, "an IP address or CIDR range")
            )
        except Reported:
            failed = True
    if failed:
        options.failed = True
        return None
    if not networks:
        options.error(key, "must list at least one address or CIDR range")
        return None
    return AddressSet(networks)


def _option_items(options: Options, key: str) -> tuple[NodeReader, list[tuple[Node, str]]] | None:
    """The reader and the (node, key path) of each item of list option `key`, so that each
    bad entry is reported at its own line and path (`allow[2]`)."""
    items = options.items(key)
    if items is None:
        return None
    return options.reader, items


class ClientIp:
    """Finds a request's client address (see the module docstring). `trusted`: the
    proxies whose X-Forwarded-For entries are believed; None believes no one.

    Results are remembered per peer and per forwarded chain (keep-alive clients and busy
    proxies repeat theirs) in tables bounded by ADDRESS_CACHE_ENTRIES, which start over
    when full: their keys come from the network."""

    __slots__ = ("_chains", "_peers", "trusted")

    def __init__(self, trusted: AddressSet | None) -> None:
        self.trusted = trusted
        # peer text -> (its address, whether it is a trusted proxy)
        self._peers: dict[str, tuple[Address | None, bool]] = {}
        # (peer text, X-Forwarded-For) -> the client
        self._chains: dict[tuple[str, str], Address | None] = {}

    def __repr__(self) -> str:
        return f"<ClientIp trusted={self.trusted!r}>"

    def address(self, request: Request) -> Address | None:
        """The client's address; None when it cannot be known (the peer is not an IP
        address, or a trusted hop forwarded an entry that is not one, or the chain of
        trusted hops is longer than MAX_FORWARDED_HOPS)."""
        peer_text = request.client[0]
        trusted = self.trusted
        if trusted is None:
            return parse_address(peer_text)
        known = self._peers.get(peer_text)
        if known is None:
            peer = parse_address(peer_text)
            known = (peer, peer is not None and peer in trusted)
            _remember(self._peers, peer_text, known)
        peer, peer_trusted = known
        if not peer_trusted:
            return peer
        values = request.headers.getall("x-forwarded-for", None)
        if not values:
            return peer
        joined = values[0] if len(values) == 1 else ",".join(values)
        key = (peer_text, joined)
        chains = self._chains
        if key in chains:
            return chains[key]
        client = _walk(joined, peer, trusted)
        _remember(chains, key, client)
        return client

    def text(self, request: Request) -> str:
        """The client's address as canonical text, "" when unknown (for log lines and
        rate-limit keys)."""
        address = self.address(request)
        return format_address(address) if address is not None else ""


def _walk(forwarded_for: str, peer: Address | None, trusted: AddressSet) -> Address | None:
    """The rightmost untrusted entry of an X-Forwarded-For value that a trusted `peer`
    sent (the leftmost when all are trusted; `peer` when the list is empty)."""
    # Only the entries we may walk are split off (the header can be long).
    entries = forwarded_for.rsplit(",", MAX_FORWARDED_HOPS)
    client = peer
    for index in range(len(entries) - 1, -1, -1):
        if index == 0 and len(entries) > MAX_FORWARDED_HOPS:
            return None  # every hop walked was trusted, and there are more
        entry = entries[index].strip()
        if not entry:
            continue  # empty list elements are allowed (RFC 9110 section 5.6.1)
        address = parse_forwarded_entry(entry)
        if address is None:
            return None  # written by someone untrusted: we cannot tell who it was
        if address not in trusted:
            return address
        client = address
    return client  # every hop is trusted: the request began inside, at the leftmost


_K = TypeVar("_K")
_V = TypeVar("_V")


def _remember(cache: dict[_K, _V], key: _K, value: _V) -> None:
    """Store in a bounded table: a full one starts over (cheaper than an LRU, and the
    working set of a gateway's clients refills it at once)."""
    if len(cache) >= ADDRESS_CACHE_ENTRIES:
        cache.clear()
    cache[key] = value
