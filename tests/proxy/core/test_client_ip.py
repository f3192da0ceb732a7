"""The client of a request, decided once (proxy/core/client_ip.py), without sockets: who is
believed, the rightmost-untrusted walk of X-Forwarded-For and of Forwarded `for=` nodes,
unknown clients, the bounded tables, raw headers left raw."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from proxy.config.model import ClientIpConfig
from proxy.core.addresses import ADDRESS_CACHE_ENTRIES, parse_network
from proxy.core.body import Body
from proxy.core.client_ip import MAX_FORWARDED_HOPS, UNKNOWN_CLIENT, ClientResolver
from proxy.core.models import Request

TRUSTED = (parse_network("10.0.0.0/8"), parse_network("fd00::/8"))


def resolver(source: str = "x-forwarded-for") -> ClientResolver:
    return ClientResolver(ClientIpConfig(TRUSTED, source))


def request_from(peer: str, *values: str, field: str = "X-Forwarded-For") -> Request:
    """A request as the front ends make it (raw headers) from `peer`, with one `field`
    line per value."""
    raw = [(b"Host", b"t")] + [(field.encode(), value.encode("latin-1")) for value in values]
    return Request("GET", b"/", raw, Body.from_bytes(b""), client=(peer, 40000), host="t")


def client_of(resolve: ClientResolver, request: Request) -> str:
    resolve(request)
    return request.client[0]


def test_an_untrusted_peer_is_the_client_whatever_its_xff_says() -> None:
    request = request_from("198.51.100.1", "203.0.113.9")
    assert client_of(resolver(), request) == "198.51.100.1"
    assert request.peer_trusted is False
    assert request.peer == ("198.51.100.1", 40000)


def test_the_rightmost_untrusted_entry_is_the_client_and_a_spoofed_leftmost_loses() -> None:
    # The client wrote "1.1.1.1"; the first proxy appended the client's real address.
    request = request_from("10.0.0.2", "1.1.1.1, 203.0.113.9, 10.0.0.7")
    assert client_of(resolver(), request) == "203.0.113.9"
    assert request.peer_trusted is True
    assert request.peer == ("10.0.0.2", 40000)  # the hop, kept apart for logs and XFF
    assert request.raw_headers is not None  # read without building a CIMultiDict


def test_several_xff_fields_are_one_list_and_empty_elements_are_skipped() -> None:
    request = request_from("10.0.0.2", "1.1.1.1", "203.0.113.9,, 10.0.0.7 ,")
    assert client_of(resolver(), request) == "203.0.113.9"


def test_headers_a_middleware_rebuilt_are_read_too() -> None:
    headers: CIMultiDict[str] = CIMultiDict(
        [("Host", "t"), ("X-Forwarded-For", "1.1.1.1"), ("X-Forwarded-For", "203.0.113.9")]
    )
    request = Request("GET", b"/", headers, Body.from_bytes(b""), client=("10.0.0.2", 1))
    assert client_of(resolver(), request) == "203.0.113.9"
    single: CIMultiDict[str] = CIMultiDict([("X-Forwarded-For", "203.0.113.8")])
    request = Request("GET", b"/", single, Body.from_bytes(b""), client=("10.0.0.2", 1))
    assert client_of(resolver(), request) == "203.0.113.8"
    none: CIMultiDict[str] = CIMultiDict([("Host", "t")])
    request = Request("GET", b"/", none, Body.from_bytes(b""), client=("10.0.0.2", 1))
    assert client_of(resolver(), request) == "10.0.0.2"


def test_ipv6_hops_and_entries_with_ports() -> None:
    request = request_from("fd00::2", "[2001:db8::5]:4711, [fd00::3]:80")
    assert client_of(resolver(), request) == "2001:db8::5"


def test_when_every_hop_is_trusted_the_leftmost_is_the_client() -> None:
    assert client_of(resolver(), request_from("10.0.0.2", "10.9.9.9, 10.0.0.7")) == "10.9.9.9"
    assert client_of(resolver(), request_from("10.0.0.2")) == "10.0.0.2"  # no XFF: the peer
    assert client_of(resolver(), request_from("10.0.0.2", " , ")) == "10.0.0.2"


def test_garbage_forwarded_through_trusted_hops_makes_the_client_unknown() -> None:
    assert client_of(resolver(), request_from("10.0.0.2", "unknown, 10.0.0.7")) == ""
    assert client_of(resolver(), request_from("10.0.0.2", "unknown")) == ""
    # ... but not when an untrusted entry is found first.
    request = request_from("10.0.0.2", "unknown, 203.0.113.9")
    assert client_of(resolver(), request) == "203.0.113.9"


def test_the_walk_stops_after_max_hops_of_trusted_padding() -> None:
    padding = ", ".join(["10.0.0.9"] * MAX_FORWARDED_HOPS)
    request = request_from("10.0.0.2", f"203.0.113.9, {padding}")
    assert client_of(resolver(), request) == UNKNOWN_CLIENT[0]
    shorter = ", ".join(["10.0.0.9"] * (MAX_FORWARDED_HOPS - 1))
    assert client_of(resolver(), request_from("10.0.0.2", f"203.0.113.9, {shorter}")) == (
        "203.0.113.9"
    )


def test_remembered_chains_stay_right_when_the_tables_start_over() -> None:
    resolve = resolver()
    assert "10.0.0.0/8" in repr(resolve)
    for index in range(ADDRESS_CACHE_ENTRIES + 10):
        expected = f"198.51.{index // 256}.{index % 256}"
        assert client_of(resolve, request_from("10.0.0.2", f"{expected}, 10.0.0.7")) == expected
    for index in range(ADDRESS_CACHE_ENTRIES + 10):  # as many peers
        peer = f"198.18.{index // 256}.{index % 256}"
        assert client_of(resolve, request_from(peer, "1.1.1.1")) == peer
    for _ in range(2):  # computed, then remembered
        assert client_of(resolve, request_from("10.0.0.3", "1.1.1.1, 10.0.0.7")) == "1.1.1.1"
        assert client_of(resolve, request_from("10.0.0.3", "unknown")) == ""
        assert client_of(resolve, request_from("10.0.0.3", "10.0.0.4")) == "10.0.0.4"
        assert client_of(resolve, request_from("10.0.0.3", ",")) == "10.0.0.3"
        assert client_of(resolve, request_from("198.51.100.1", "1.1.1.1")) == "198.51.100.1"


def test_a_peer_that_is_not_an_ip_address_is_not_trusted() -> None:
    request = request_from("", "1.1.1.1")
    assert client_of(resolver(), request) == ""
    assert request.peer_trusted is False
    assert resolver().trusts("::ffff:10.0.0.1") is True  # a dual-stack socket's IPv4 peer


# -- source: forwarded (RFC 7239) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "client"),
    [
        (["for=203.0.113.9;proto=https, for=10.0.0.7"], "203.0.113.9"),
        (['for="[2001:db8:cafe::17]:4711"'], "2001:db8:cafe::17"),
        (['for="203.0.113.9:4711";by=10.0.0.7', "For=10.0.0.8"], "203.0.113.9"),
        (["for=1.1.1.1, for=203.0.113.9; proto=http ;host=x, for=10.0.0.7"], "203.0.113.9"),
        (["for=10.9.9.9, for=10.0.0.7"], "10.9.9.9"),  # every hop trusted: the leftmost
        (["for=unknown, for=10.0.0.7"], ""),  # RFC 7239 section 6.2
        (["for=_hidden, for=10.0.0.7"], ""),  # an obfuscated node, section 6.3
        (["proto=https, for=10.0.0.7"], ""),  # an element without `for`
        (['for="", for=10.0.0.7'], ""),
        (["for=unknown, for=203.0.113.9"], "203.0.113.9"),  # an untrusted hop first
        (["for=203.0.113.9 for=10.0.0.7"], ""),  # malformed: a value cannot be walked
        (["for=203.0.113.9;for=1.1.1.1"], ""),  # `for` twice in one element
        (['for="203.0.113.9'], ""),  # an unterminated quoted-string
        (["secret"], ""),
        (["proto=https"], ""),
        ([", ,"], "10.0.0.2"),  # no element at all: the peer
    ],
)
def test_forwarded_for_nodes_are_walked_from_the_right(values: list[str], client: str) -> None:
    request = request_from("10.0.0.2", *values, field="Forwarded")
    assert client_of(resolver("forwarded"), request) == client


def test_with_source_forwarded_x_forwarded_for_is_not_read() -> None:
    request = request_from("10.0.0.2", "203.0.113.9")
    assert client_of(resolver("forwarded"), request) == "10.0.0.2"
    request = request_from("10.0.0.2", "for=203.0.113.9", field="Forwarded")
    assert client_of(resolver(), request) == "10.0.0.2"


def test_a_long_forwarded_chain_of_trusted_hops_is_unknown() -> None:
    padding = ", ".join(["for=10.0.0.9"] * MAX_FORWARDED_HOPS)
    request = request_from("10.0.0.2", f"for=203.0.113.9, {padding}", field="Forwarded")
    assert client_of(resolver("forwarded"), request) == ""
    quoted = 'for="[fd00::1]:1";proto="h\\"t\\\\tp"'
    request = request_from("10.0.0.2", f"for=203.0.113.9, {quoted}", field="Forwarded")
    assert client_of(resolver("forwarded"), request) == "203.0.113.9"


# -- source: proxy_protocol -----------------------------------------------------------------


def test_with_source_proxy_protocol_no_header_is_read() -> None:
    request = request_from("10.0.0.2", "203.0.113.9")
    request.raw_headers.append((b"Forwarded", b"for=203.0.113.9"))  # type: ignore[union-attr]
    assert client_of(resolver("proxy_protocol"), request) == "10.0.0.2"
    assert request.peer_trusted is True  # its forwarding headers are kept (proxy/core/headers.py)
