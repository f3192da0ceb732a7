"""Addresses as the gateway compares them (proxy/core/addresses.py): parsing to a canonical
form, X-Forwarded-For entries and Forwarded nodes, CIDR ranges and merged address sets."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config.values import ConfigValueError
from proxy.core.addresses import (
    AddressSet,
    canonical,
    format_address,
    parse_address,
    parse_forwarded_entry,
    parse_network,
)


def a(text: str) -> tuple[int, int]:
    address = parse_address(text)
    assert address is not None, text
    return address


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.1.2.3", "10.1.2.3"),
        ("2001:db8::1", "2001:db8::1"),
        ("2001:DB8:0:0::1", "2001:db8::1"),
        ("::ffff:192.0.2.7", "192.0.2.7"),  # a dual-stack socket's IPv4 peer
        ("fe80::1%eth0", "fe80::1"),
        ("::1", "::1"),
    ],
)
def test_addresses_parse_to_their_canonical_form(text: str, expected: str) -> None:
    assert format_address(a(text)) == expected


@pytest.mark.parametrize(
    "text", ["", "unknown", "10.1.2", "10.1.2.256", "1.2.3.4\x00", "01.2.3.4x", "::g", "localhost"]
)
def test_non_addresses_are_none(text: str) -> None:
    assert parse_address(text) is None


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("192.0.2.1:4711", "192.0.2.1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("[2001:db8::1]:4711", "2001:db8::1"),
        ("2001:db8::1", "2001:db8::1"),
    ],
)
def test_forwarded_entries_with_ports_and_brackets(entry: str, expected: str) -> None:
    address = parse_forwarded_entry(entry)
    assert address is not None
    assert format_address(address) == expected


@pytest.mark.parametrize(
    "entry",
    ["", "unknown", "_hidden", "[2001:db8::1", "192.0.2.1:port", "[nope]:1", "a:b:c", "[::1]x"],
)
def test_forwarded_entries_that_are_not_addresses(entry: str) -> None:
    assert parse_forwarded_entry(entry) is None


def test_canonical_text_of_peers() -> None:
    assert canonical("::ffff:192.0.2.7") == "192.0.2.7"
    assert canonical("2001:DB8::1") == "2001:db8::1"
    assert canonical("") == ""  # the peer of a Unix socket stays as it is


def test_networks_parse_and_host_bits_are_refused_with_a_suggestion() -> None:
    assert str(parse_network("10.0.0.0/8")) == "10.0.0.0/8"
    assert str(parse_network("192.168.1.5")) == "192.168.1.5/32"
    assert str(parse_network("2001:db8::/32")) == "2001:db8::/32"
    assert str(parse_network("::ffff:10.0.0.0/104")) == "10.0.0.0/8"
    with pytest.raises(ConfigValueError, match=r"did you mean '10\.0\.0\.0/8'"):
        parse_network("10.0.0.1/8")
    with pytest.raises(ConfigValueError, match="is not an IP address or CIDR range"):
        parse_network("10.0.0.0/33")


def test_address_set_merges_ranges_and_keeps_versions_apart() -> None:
    networks = [parse_network(t) for t in ("10.0.0.0/9", "10.128.0.0/9", "10.1.2.3", "::/96")]
    addresses = AddressSet(networks)
    assert len(addresses) == 2  # 10.0.0.0/8 and ::/96
    assert a("10.0.0.0") in addresses
    assert a("10.255.255.255") in addresses
    assert a("11.0.0.0") not in addresses
    assert a("9.255.255.255") not in addresses
    assert a("::0.0.0.1") in addresses  # IPv6 ::/96, not the IPv4 0.0.0.1
    assert a("0.0.0.1") not in addresses
    assert "10.0.0.0/9" in repr(addresses)


@given(
    networks=st.lists(
        st.tuples(st.integers(0, 2**32 - 1), st.integers(8, 32)), min_size=1, max_size=20
    ),
    probes=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=20),
)
def test_address_set_agrees_with_ipaddress(
    networks: list[tuple[int, int]], probes: list[int]
) -> None:
    parsed = [ipaddress.IPv4Network((value, prefix), strict=False) for value, prefix in networks]
    addresses = AddressSet(parsed)
    for probe in probes + [int(n.network_address) for n in parsed]:
        expected = any(ipaddress.IPv4Address(probe) in n for n in parsed)
        assert ((4, probe) in addresses) is expected
