"""A route's mirror without sockets (proxy/exchange/mirror.py): which requests are
chosen, and the copy made of one. Sending copies to real shadows, and what the primary
sees meanwhile, is tests/e2e/test_mirror.py."""

from __future__ import annotations

from typing import Any, cast

import pytest
from multidict import CIMultiDict

from proxy.config.model import MirrorConfig
from proxy.core.body import Body
from proxy.core.models import Request
from proxy.exchange.mirror import Mirror, _copy_of


def mirror(percent: float) -> Mirror:
    return Mirror("unit", MirrorConfig("shadow", percent), cast(Any, None))


@pytest.mark.parametrize(
    ("percent", "chosen"),
    [
        (100, [True] * 10),
        (0, [False] * 10),
        (50, [False, True] * 5),
        (30, [False, False, False, True, False, False, True, False, False, True]),
        (12.5, [False] * 7 + [True] + [False] * 2),
    ],
)
def test_percent_chooses_evenly(percent: float, chosen: list[bool]) -> None:
    chooser = mirror(percent)
    assert [chooser._chosen() for _ in range(10)] == chosen


def raw_request() -> Request:
    raw = [(b"Host", b"api"), (b"X-Gatehouse-Mirror", b"forged"), (b"X-A", b"1")]
    request = Request(
        "POST", b"/p?q=1", raw, Body.from_bytes(b"body"), client=("10.0.0.9", 5), host="api"
    )
    request.request_id = "rid"
    request.peer_trusted = True
    return request


def test_a_copy_of_raw_fields_is_marked_and_keeps_the_client() -> None:
    original = raw_request()
    copy = _copy_of(original)
    assert copy.raw_headers == [(b"Host", b"api"), (b"X-A", b"1"), (b"X-Gatehouse-Mirror", b"1")]
    assert (copy.method, copy.target, copy.path, copy.query) == ("POST", b"/p?q=1", "/p", "q=1")
    assert (copy.client, copy.peer_trusted, copy.request_id) == (("10.0.0.9", 5), True, "rid")
    assert copy.host == "api"
    # The original is left as it was, its fields still raw.
    assert original.raw_headers is not None
    assert original.header("x-gatehouse-mirror") == "forged"
    assert copy.body is not original.body


def test_a_copy_of_fields_a_middleware_read_is_marked_too() -> None:
    original = raw_request()
    original.set_header("X-B", "2")
    _ = original.headers  # a CIMultiDict from now on
    copy = _copy_of(original)
    assert isinstance(copy.headers, CIMultiDict)
    assert copy.headers.getall("x-gatehouse-mirror") == ["1"]
    assert copy.headers["x-b"] == "2"
    assert original.headers.getall("x-gatehouse-mirror") == ["forged"]
