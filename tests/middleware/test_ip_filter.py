"""ip_filter and its client-address helper (middleware/client_ip.py) without sockets:
address parsing, range sets, the rightmost-untrusted X-Forwarded-For walk, the
deny-then-allow verdict, and the config errors with their lines."""

from __future__ import annotations

import ipaddress
import logging
import textwrap

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from middleware.client_ip import (
    ADDRESS_CACHE_ENTRIES,
    MAX_FORWARDED_HOPS,
    AddressSet,
    ClientIp,
    format_address,
    parse_address,
    parse_forwarded_entry,
    parse_network,
)
from middleware.ip_filter import VERDICT_CACHE_ENTRIES, IpFilter
from proxy.config import ConfigError, parse_config
from proxy.config_values import ConfigValueError
from proxy.errors import IpForbidden
from proxy.models import Body, Request, Response

HEAD = """\
listeners: [{bind: 127.0.0.1:0}]
upstreams: {app: {endpoints: ["http://127.0.0.1:9"]}}
routes: [{match: {path_prefix: /}, upstream: app}]
middleware:
"""


def build(options: str) -> IpFilter:
    """An ip_filter instance named `f` from its options (YAML flow mapping body)."""
    config = parse_config(HEAD + f"  f: {{type: ip_filter, {options}}}\n")
    instance = config.middleware["f"].instance
    assert isinstance(instance, IpFilter)
    return instance


def errors_of(middleware_lines: str) -> list[str]:
    """The errors of a config whose `middleware:` section is `middleware_lines` (line 5 on)."""
    with pytest.raises(ConfigError) as failed:
        parse_config(HEAD + textwrap.indent(textwrap.dedent(middleware_lines), "  "))
    return str(failed.value).splitlines()


def request_from(peer: str, *forwarded_for: str) -> Request:
    headers: CIMultiDict[str] = CIMultiDict([("Host", "t")])
    for value in forwarded_for:
        headers.add("X-Forwarded-For", value)
    return Request("GET", b"/", headers, Body.from_bytes(b""), client=(peer, 40000))


def a(text: str) -> tuple[int, int]:
    address = parse_address(text)
    assert address is not None, text
    return address


async def passes(ip_filter: IpFilter, request: Request) -> bool:
    """True when the filter calls the next handler, False when it refuses with 403."""

    async def endpoint(request: Request) -> Response:
        return Response(204)

    try:
        response = await ip_filter(request, endpoint)
    except IpForbidden as exc:
        refusal: IpForbidden | None = exc
    else:
        refusal = None
        assert response.status == 204
    if refusal is not None:
        assert (refusal.status, refusal.reason) == (403, "ip_forbidden")
    return refusal is None


# -- addresses ---------------------------------------------------------------------------


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
    "entry", ["", "unknown", "_hidden", "[2001:db8::1", "192.0.2.1:port", "[nope]:1", "a:b:c"]
)
def test_forwarded_entries_that_are_not_addresses(entry: str) -> None:
    assert parse_forwarded_entry(entry) is None


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


# -- the client address ------------------------------------------------------------------

TRUSTED = AddressSet([parse_network("10.0.0.0/8"), parse_network("fd00::/8")])


def test_without_trusted_proxies_the_peer_is_the_client_and_xff_is_ignored() -> None:
    client_ip = ClientIp(None)
    assert client_ip.text(request_from("10.0.0.2", "203.0.113.9")) == "10.0.0.2"


def test_an_untrusted_peer_is_the_client_whatever_its_xff_says() -> None:
    client_ip = ClientIp(TRUSTED)
    assert client_ip.text(request_from("198.51.100.1", "203.0.113.9")) == "198.51.100.1"


def test_the_rightmost_untrusted_entry_is_the_client_and_a_spoofed_leftmost_loses() -> None:
    client_ip = ClientIp(TRUSTED)
    # The client wrote "1.1.1.1"; the first proxy appended the client's real address.
    request = request_from("10.0.0.2", "1.1.1.1, 203.0.113.9, 10.0.0.7")
    assert client_ip.text(request) == "203.0.113.9"


def test_several_xff_fields_are_one_list_and_empty_elements_are_skipped() -> None:
    client_ip = ClientIp(TRUSTED)
    request = request_from("10.0.0.2", "1.1.1.1", "203.0.113.9,, 10.0.0.7 ,")
    assert client_ip.text(request) == "203.0.113.9"


def test_ipv6_hops_and_entries_with_ports() -> None:
    client_ip = ClientIp(TRUSTED)
    request = request_from("fd00::2", "[2001:db8::5]:4711, [fd00::3]:80")
    assert client_ip.text(request) == "2001:db8::5"


def test_when_every_hop_is_trusted_the_leftmost_is_the_client() -> None:
    client_ip = ClientIp(TRUSTED)
    assert client_ip.text(request_from("10.0.0.2", "10.9.9.9, 10.0.0.7")) == "10.9.9.9"
    assert client_ip.text(request_from("10.0.0.2")) == "10.0.0.2"  # no XFF: the peer


def test_garbage_forwarded_through_trusted_hops_makes_the_client_unknown() -> None:
    client_ip = ClientIp(TRUSTED)
    assert client_ip.address(request_from("10.0.0.2", "unknown, 10.0.0.7")) is None
    assert client_ip.text(request_from("10.0.0.2", "unknown")) == ""
    # ... but not when an untrusted entry is found first.
    assert client_ip.text(request_from("10.0.0.2", "unknown, 203.0.113.9")) == "203.0.113.9"


def test_the_walk_stops_after_max_hops_of_trusted_padding() -> None:
    client_ip = ClientIp(TRUSTED)
    padding = ", ".join(["10.0.0.9"] * MAX_FORWARDED_HOPS)
    assert client_ip.address(request_from("10.0.0.2", f"203.0.113.9, {padding}")) is None
    shorter = ", ".join(["10.0.0.9"] * (MAX_FORWARDED_HOPS - 1))
    assert client_ip.text(request_from("10.0.0.2", f"203.0.113.9, {shorter}")) == "203.0.113.9"


def test_remembered_chains_stay_right_when_the_table_starts_over() -> None:
    client_ip = ClientIp(TRUSTED)
    assert "10.0.0.0/8" in repr(client_ip)
    for index in range(ADDRESS_CACHE_ENTRIES + 10):
        forwarded = f"198.51.{index // 256}.{index % 256}, 10.0.0.7"
        expected = f"198.51.{index // 256}.{index % 256}"
        assert client_ip.text(request_from("10.0.0.2", forwarded)) == expected
    for _ in range(2):  # computed, then remembered
        assert client_ip.text(request_from("10.0.0.3", "1.1.1.1, 10.0.0.7")) == "1.1.1.1"
        assert client_ip.text(request_from("10.0.0.3", "unknown")) == ""
        assert client_ip.text(request_from("198.51.100.1", "1.1.1.1")) == "198.51.100.1"


def test_a_peer_that_is_not_an_ip_address_is_unknown() -> None:
    assert ClientIp(None).address(request_from("")) is None
    assert ClientIp(TRUSTED).address(request_from("", "1.1.1.1")) is None


# -- the verdict -------------------------------------------------------------------------


async def test_allow_list_admits_only_its_ranges() -> None:
    ip_filter = build("allow: [10.0.0.0/8, 192.168.1.5, '2001:db8::/32']")
    assert await passes(ip_filter, request_from("10.200.0.1"))
    assert await passes(ip_filter, request_from("192.168.1.5"))
    assert await passes(ip_filter, request_from("2001:db8::7"))
    assert await passes(ip_filter, request_from("::ffff:10.0.0.1"))
    assert not await passes(ip_filter, request_from("192.168.1.6"))
    assert not await passes(ip_filter, request_from("2001:db9::1"))


async def test_deny_list_refuses_its_ranges_and_admits_the_rest() -> None:
    ip_filter = build("deny: [203.0.113.0/24]")
    assert not await passes(ip_filter, request_from("203.0.113.77"))
    assert await passes(ip_filter, request_from("198.51.100.1"))


async def test_deny_wins_over_allow_whatever_the_order() -> None:
    ip_filter = build("deny: [10.1.0.0/16], allow: [10.0.0.0/8]")
    assert not await passes(ip_filter, request_from("10.1.2.3"))
    assert await passes(ip_filter, request_from("10.2.0.1"))
    assert not await passes(ip_filter, request_from("11.0.0.1"))


async def test_an_unknown_client_is_refused_even_by_a_deny_only_filter() -> None:
    ip_filter = build("deny: [203.0.113.0/24], trusted_proxies: [10.0.0.0/8]")
    assert not await passes(ip_filter, request_from("10.0.0.2", "garbage"))
    assert await passes(ip_filter, request_from("10.0.0.2", "198.51.100.1"))
    assert not await passes(ip_filter, request_from("10.0.0.2", "203.0.113.1"))


async def test_trusted_proxies_decide_on_the_forwarded_client() -> None:
    ip_filter = build("allow: [198.51.100.0/24], trusted_proxies: [10.0.0.0/8]")
    assert await passes(ip_filter, request_from("10.0.0.2", "198.51.100.9"))
    assert not await passes(ip_filter, request_from("10.0.0.2", "198.51.100.9, 1.2.3.4"))
    # a spoofed allowed address on the left does not help
    assert not await passes(ip_filter, request_from("10.0.0.2", "198.51.100.9, 203.0.113.1"))


async def test_the_verdict_cache_is_bounded_and_still_right_when_it_starts_over() -> None:
    ip_filter = build("allow: [10.0.0.0/8]")
    for index in range(VERDICT_CACHE_ENTRIES + 10):
        peer = f"11.0.{index // 256}.{index % 256}"
        assert not await passes(ip_filter, request_from(peer))
    assert await passes(ip_filter, request_from("10.0.0.1"))
    assert await passes(ip_filter, request_from("10.0.0.1"))  # from the cache
    assert not await passes(ip_filter, request_from("11.0.0.0"))


# -- config errors -----------------------------------------------------------------------


def test_bad_entries_are_reported_each_at_its_own_line() -> None:
    assert errors_of("""\
        f:
          type: ip_filter
          allow:
            - 10.0.0.0/8
            - 10.0.0.300
            - 10.0.0.1/8
          deny: [fe80::/10, 'nope']
        """) == [
        "<string>:9: middleware.f.allow[1]: '10.0.0.300' is not an IP address or CIDR range "
        "('10.0.0.300' does not appear to be an IPv4 or IPv6 network)",
        "<string>:10: middleware.f.allow[2]: '10.0.0.1/8' has host bits set "
        "(did you mean '10.0.0.0/8'?)",
        "<string>:11: middleware.f.deny[1]: 'nope' is not an IP address or CIDR range "
        "('nope' does not appear to be an IPv4 or IPv6 network)",
    ]


def test_a_single_string_is_a_list_of_one_and_other_types_are_refused() -> None:
    assert build("allow: 10.0.0.0/8").allow is not None
    assert errors_of("""\
        f: {type: ip_filter, allow: {a: 1}, deny: [5], trusted_proxies: []}
        """) == [
        "<string>:5: middleware.f.allow: expected a list, got a mapping",
        "<string>:5: middleware.f.deny[0]: expected an IP address or CIDR range, "
        "got an integer (5); quote it to use it as text",
        "<string>:5: middleware.f.trusted_proxies: must list at least one address or CIDR range",
    ]


def test_a_filter_needs_allow_or_deny() -> None:
    assert errors_of("f: {type: ip_filter, trusted_proxies: [10.0.0.0/8]}\n") == [
        "<string>:5: middleware.f: give 'allow', 'deny' or both"
    ]
    assert errors_of("f: {type: ip_filter, alow: [10.0.0.0/8]}\n") == [
        "<string>:5: middleware.f.alow: unknown key 'alow' (did you mean 'allow'?)",
        "<string>:5: middleware.f: give 'allow', 'deny' or both",
    ]


async def test_a_refusal_is_traced_at_debug_level(caplog: pytest.LogCaptureFixture) -> None:
    ip_filter = build("allow: [10.0.0.0/8], trusted_proxies: [127.0.0.1]")
    assert "10.0.0.0/8" in repr(ip_filter)
    with caplog.at_level(logging.DEBUG, logger="middleware.ip_filter"):
        assert not await passes(ip_filter, request_from("127.0.0.1", "203.0.113.5"))
        assert not await passes(ip_filter, request_from("127.0.0.1", "garbage"))
    assert [r.getMessage() for r in caplog.records] == [
        "f: refused client 203.0.113.5",
        "f: refused client unknown",
    ]
