"""The Forwarded header (RFC 7239, proxy/core/forwarded.py): the `for=` nodes of a value, and
the element this hop appends."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.forwarded import MalformedForwarded, forwarded_element, forwarded_for_nodes


@pytest.mark.parametrize(
    ("value", "nodes"),
    [
        ("for=192.0.2.43", ["192.0.2.43"]),
        ('for="[2001:db8:cafe::17]:4711"', ["[2001:db8:cafe::17]:4711"]),  # section 4's
        ("for=192.0.2.60;proto=http;by=203.0.113.43", ["192.0.2.60"]),  # examples
        ("for=192.0.2.43, for=198.51.100.17", ["192.0.2.43", "198.51.100.17"]),
        ("FOR=unknown;Proto=https", ["unknown"]),  # names are case-insensitive
        ("proto=https;by=_gw", [None]),  # an element without `for`
        ('for="_a\\"b\\\\c"', ['_a"b\\c']),  # quoted-pair unescaped
        ("for=[2001:db8::1]", ["[2001:db8::1]"]),  # unquoted, as some proxies write it
        (" for=1.1.1.1 ;\tproto=http , ,for=2.2.2.2 ,", ["1.1.1.1", "2.2.2.2"]),
        (";;for=1.1.1.1;;", ["1.1.1.1"]),
        ("", []),
    ],
)
def test_for_nodes_oldest_first(value: str, nodes: list[str | None]) -> None:
    assert forwarded_for_nodes(value, 10) == (nodes, False)


def test_only_the_last_nodes_are_kept() -> None:
    value = ", ".join(f"for=10.0.0.{n}" for n in range(1, 8))
    assert forwarded_for_nodes(value, 3) == (["10.0.0.5", "10.0.0.6", "10.0.0.7"], True)
    assert forwarded_for_nodes(value, 7) == ([f"10.0.0.{n}" for n in range(1, 8)], False)


@pytest.mark.parametrize(
    "value",
    [
        "for=1.1.1.1 for=2.2.2.2",  # pairs need ";" or ","
        "for=1.1.1.1;for=2.2.2.2",  # `for` twice in one element
        'for="1.1.1.1',  # an unterminated quoted-string
        'for="1.1.1.1"x',
        "for",
        "=1.1.1.1",
        "for=a=b",
        "f(r=1.1.1.1",
    ],
)
def test_malformed_values_are_refused(value: str) -> None:
    with pytest.raises(MalformedForwarded):
        forwarded_for_nodes(value, 10)


@given(st.text(alphabet=' \t,;="\\forx0123456789.:[]_-abc', max_size=60))
def test_any_value_parses_or_is_malformed(value: str) -> None:
    try:
        nodes, more = forwarded_for_nodes(value, 4)
    except MalformedForwarded:
        return
    assert len(nodes) <= 4
    if more:
        assert len(nodes) == 4


@pytest.mark.parametrize(
    ("peer", "host", "element"),
    [
        ("192.0.2.1", "api.test", "for=192.0.2.1;host=api.test;proto=http"),
        ("2001:db8::1", "api.test", 'for="[2001:db8::1]";host=api.test;proto=http'),
        ("192.0.2.1", "api.test:8443", 'for=192.0.2.1;host="api.test:8443";proto=http'),
        ("192.0.2.1", 'a"b\\c', 'for=192.0.2.1;host="a\\"b\\\\c";proto=http'),
        ("192.0.2.1", None, "for=192.0.2.1;proto=http"),
        ("", "api.test", "for=unknown;host=api.test;proto=http"),  # not an IP peer
    ],
)
def test_the_element_this_hop_appends(peer: str, host: str | None, element: str) -> None:
    assert forwarded_element(peer, "http", host) == element
    nodes, _ = forwarded_for_nodes(element, 2)
    assert nodes == [f"[{peer}]" if ":" in peer else peer or "unknown"]  # it reads back
