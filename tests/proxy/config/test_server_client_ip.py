"""The `client_ip` section and listeners' `proxy_protocol` in routes.yaml: defaults, the
forms accepted, and every refusal with its line and key path."""

from __future__ import annotations

import ipaddress
from textwrap import dedent

from proxy.config.model import ClientIpConfig
from tests.support.config_helpers import errors_of, one_error, parse

ROUTES = """\
upstreams: {users: {endpoints: ["http://127.0.0.1:8000"]}}
routes: []
"""


def test_without_a_section_nobody_is_trusted() -> None:
    config = parse("listeners: [{bind: ':0'}]\n" + ROUTES)
    assert config.client_ip is None
    assert config.listeners[0].proxy_protocol is False


def test_the_section_with_its_default_source() -> None:
    config = parse(
        dedent("""\
        listeners: [{bind: ':0'}]
        client_ip:
          trusted_proxies: [10.0.0.0/8, "2001:db8::/32", 192.0.2.7, "::ffff:10.1.0.0/112"]
        """)
        + ROUTES
    )
    assert config.client_ip == ClientIpConfig(
        (
            ipaddress.IPv4Network("10.0.0.0/8"),
            ipaddress.IPv6Network("2001:db8::/32"),
            ipaddress.IPv4Network("192.0.2.7/32"),
            ipaddress.IPv4Network("10.1.0.0/16"),  # IPv4-mapped: the IPv4 range
        ),
        "x-forwarded-for",
    )


def test_one_address_reads_as_a_list_and_every_source_is_accepted() -> None:
    for source in ("x-forwarded-for", "forwarded", "proxy_protocol"):
        config = parse(
            dedent(f"""\
            listeners: [{{bind: ':0', proxy_protocol: true}}]
            client_ip: {{trusted_proxies: 10.0.0.1, source: {source}}}
            """)
            + ROUTES
        )
        assert config.client_ip is not None
        assert config.client_ip.trusted_proxies == (ipaddress.IPv4Network("10.0.0.1/32"),)
        assert config.client_ip.source == source
        assert config.listeners[0].proxy_protocol is True


def test_trusted_proxies_is_required() -> None:
    # As nginx's real_ip needs set_real_ip_from: a source believed from anyone would let
    # every client choose its own address.
    assert one_error("listeners: [{bind: ':0'}]\nclient_ip: {source: forwarded}\n" + ROUTES) == (
        "routes.yaml:2: client_ip: missing required key 'trusted_proxies' (the proxies whose"
        " word about the client is believed)"
    )


def test_bad_entries_are_reported_each_at_its_own_line() -> None:
    text = """\
        listeners: [{bind: ':0'}]
        client_ip:
          trusted_proxies:
            - 10.0.0.0/8
            - 10.0.0.1/8
            - nope
            - 7
          source: x-forwarded-four
          trusted_proxy: []
        """
    assert errors_of(dedent(text) + ROUTES) == [
        "routes.yaml:5: client_ip.trusted_proxies[1]: '10.0.0.1/8' has host bits set "
        "(did you mean '10.0.0.0/8'?)",
        "routes.yaml:6: client_ip.trusted_proxies[2]: 'nope' is not an IP address or CIDR "
        "range ('nope' does not appear to be an IPv4 or IPv6 network)",
        "routes.yaml:7: client_ip.trusted_proxies[3]: expected an IP address or CIDR range, "
        "got an integer (7); quote it to use it as text",
        "routes.yaml:8: client_ip.source: unsupported source 'x-forwarded-four' (supported: "
        "x-forwarded-for, forwarded, proxy_protocol) (did you mean 'x-forwarded-for'?)",
        "routes.yaml:9: client_ip.trusted_proxy: unknown key 'trusted_proxy' "
        "(did you mean 'trusted_proxies'?)",
    ]


def test_an_empty_or_odd_trust_list_is_refused() -> None:
    assert one_error("listeners: [{bind: ':0'}]\nclient_ip: {trusted_proxies: []}\n" + ROUTES) == (
        "routes.yaml:2: client_ip.trusted_proxies: must list at least one address or CIDR range"
    )
    assert one_error(
        "listeners: [{bind: ':0'}]\nclient_ip: {trusted_proxies: {a: 1}}\n" + ROUTES
    ) == ("routes.yaml:2: client_ip.trusted_proxies: expected a list, got a mapping")
    assert one_error("listeners: [{bind: ':0'}]\nclient_ip: [10.0.0.0/8]\n" + ROUTES) == (
        "routes.yaml:2: client_ip: expected a mapping, got a list"
    )


def test_a_proxy_protocol_listener_needs_client_ip() -> None:
    text = "listeners: [{bind: ':0'}, {bind: ':0', proxy_protocol: true}]\n" + ROUTES
    assert one_error(text) == (
        "routes.yaml:1: listeners[1].proxy_protocol: needs client_ip.trusted_proxies: the load"
        " balancers whose PROXY headers are believed"
    )
    assert one_error("listeners: [{bind: ':0', proxy_protocol: yes please}]\n" + ROUTES) == (
        "routes.yaml:1: listeners[0].proxy_protocol: expected true or false, got a string "
        "('yes please')"
    )


def test_a_broken_client_ip_section_is_reported_once() -> None:
    text = "listeners: [{bind: ':0', proxy_protocol: true}]\nclient_ip: {source: forwarded}\n"
    assert errors_of(text + ROUTES) == [
        "routes.yaml:2: client_ip: missing required key 'trusted_proxies' (the proxies whose"
        " word about the client is believed)"
    ]


def test_source_proxy_protocol_needs_such_a_listener() -> None:
    text = """\
        listeners: [{bind: ':0'}]
        client_ip: {trusted_proxies: [10.0.0.0/8], source: proxy_protocol}
        """
    assert one_error(dedent(text) + ROUTES) == (
        "routes.yaml:2: client_ip.source: proxy_protocol needs a listener with "
        "'proxy_protocol: true'"
    )
