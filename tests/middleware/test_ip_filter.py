"""ip_filter without sockets: the deny-then-allow verdict on `Request.client` (decided by
proxy/core/client_ip.py before any middleware runs), its bounded verdict cache, and the config
errors with their lines, among them `trusted_proxies`, which moved to `client_ip`."""

from __future__ import annotations

import logging
import textwrap

import pytest
from multidict import CIMultiDict

from middleware.ip_filter import VERDICT_CACHE_ENTRIES, IpFilter
from proxy.config.document import ConfigError
from proxy.config.load import parse_config
from proxy.core.body import Body
from proxy.core.client_ip import UNKNOWN_CLIENT
from proxy.core.errors import IpForbidden
from proxy.core.models import Request, Response

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


def request_from(client: str) -> Request:
    """A request whose client (as proxy/core/client_ip.py decided it) is `client`."""
    headers: CIMultiDict[str] = CIMultiDict([("Host", "t")])
    return Request("GET", b"/", headers, Body.from_bytes(b""), client=(client, 40000))


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
    ip_filter = build("deny: [203.0.113.0/24]")
    assert not await passes(ip_filter, request_from(UNKNOWN_CLIENT[0]))
    assert await passes(ip_filter, request_from("198.51.100.1"))
    assert not await passes(ip_filter, request_from("203.0.113.1"))


async def test_the_filter_decides_on_the_client_not_the_peer() -> None:
    ip_filter = build("allow: [198.51.100.0/24]")
    request = request_from("10.0.0.2")
    request.client = ("198.51.100.9", 0)  # what client_ip found behind a trusted proxy
    assert await passes(ip_filter, request)
    request = request_from("198.51.100.9")
    request.client = ("203.0.113.1", 0)
    assert not await passes(ip_filter, request)


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
        f: {type: ip_filter, allow: {a: 1}, deny: [5]}
        g: {type: ip_filter, allow: []}
        """) == [
        "<string>:5: middleware.f.allow: expected a list, got a mapping",
        "<string>:5: middleware.f.deny[0]: expected an IP address or CIDR range, "
        "got an integer (5); quote it to use it as text",
        "<string>:6: middleware.g.allow: must list at least one address or CIDR range",
    ]


def test_trusted_proxies_is_an_error_that_names_its_new_place() -> None:
    assert errors_of(
        "f: {type: ip_filter, allow: [10.0.0.0/8], trusted_proxies: [10.0.0.1]}\n"
    ) == [
        "<string>:5: middleware.f.trusted_proxies: moved to the top-level 'client_ip: "
        "{trusted_proxies: [...]}', which decides the client for every middleware, the access "
        "log and X-Forwarded-For"
    ]


def test_a_filter_needs_allow_or_deny() -> None:
    assert errors_of("f: {type: ip_filter}\n") == [
        "<string>:5: middleware.f: give 'allow', 'deny' or both"
    ]
    assert errors_of("f: {type: ip_filter, alow: [10.0.0.0/8]}\n") == [
        "<string>:5: middleware.f.alow: unknown key 'alow' (did you mean 'allow'?)",
        "<string>:5: middleware.f: give 'allow', 'deny' or both",
    ]


async def test_a_refusal_is_traced_at_debug_level(caplog: pytest.LogCaptureFixture) -> None:
    ip_filter = build("allow: [10.0.0.0/8]")
    assert "10.0.0.0/8" in repr(ip_filter)
    with caplog.at_level(logging.DEBUG, logger="middleware.ip_filter"):
        assert not await passes(ip_filter, request_from("203.0.113.5"))
        assert not await passes(ip_filter, request_from(UNKNOWN_CLIENT[0]))
    assert [r.getMessage() for r in caplog.records] == [
        "f: refused client 203.0.113.5",
        "f: refused client unknown",
    ]
