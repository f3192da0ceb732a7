"""etcd:// URLs: the members and the key, and what is refused."""

from __future__ import annotations

import pytest

from proxy.source.etcd_url import EtcdLocation, EtcdUrlError, parse_etcd_url


def test_url_gives_the_member_and_the_key_with_its_leading_slash() -> None:
    location = parse_etcd_url("etcd://127.0.0.1:2379/gatehouse/routes.yaml")
    assert location == EtcdLocation((("127.0.0.1", 2379),), "/gatehouse/routes.yaml")
    assert location.url == "etcd://127.0.0.1:2379/gatehouse/routes.yaml"
    assert location.at(7) == "etcd://127.0.0.1:2379/gatehouse/routes.yaml@7"


def test_port_defaults_to_2379_and_several_members_are_kept_in_order() -> None:
    location = parse_etcd_url("etcd://etcd-0,etcd-1:2380,[::1]:2381/k")
    assert location.endpoints == (("etcd-0", 2379), ("etcd-1", 2380), ("::1", 2381))
    assert location.url == "etcd://etcd-0:2379,etcd-1:2380,[::1]:2381/k"


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:2379/k", "expected etcd://"),
        ("etcd://127.0.0.1:2379", "no key"),
        ("etcd://127.0.0.1:2379/", "no key"),
        ("etcd:///k", "no host"),
        ("etcd://user:secret@127.0.0.1:2379/k", "credentials do not go in the URL"),
        ("etcd://127.0.0.1:0/k", "the port must be 1 to 65535"),
        ("etcd://127.0.0.1:http/k", "the port must be 1 to 65535"),
        ("etcd://127.0.0.1:2379/k?x=1", "no query"),
        ("etcd://[::1/k", "expected [IPV6]:PORT"),
        ("etcd://:2379/k", "no host"),
    ],
)
def test_url_refusals_say_why(url: str, why: str) -> None:
    with pytest.raises(EtcdUrlError, match=r"^" + r".*" + why.replace("[", r"\[")):
        parse_etcd_url(url)
