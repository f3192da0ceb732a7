"""Header access that keeps raw headers raw (`header`, `set_header`, `add_header`,
`remove_header`): the same answers whether the headers are still the parser's byte pairs
or already a CIMultiDict, and unsafe fields refused either way."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from proxy.codec.h1serialize import UnsafeHeader
from proxy.core.body import Body
from proxy.core.models import Request, Response


def raw_request() -> Request:
    raw = [(b"Host", b"example"), (b"X-Tag", b"one"), (b"x-tag", b"two")]
    return Request("GET", b"/", raw, Body.from_bytes(b""), host="example")


def both() -> list[Request]:
    materialized = raw_request()
    _ = materialized.headers  # now a CIMultiDict
    return [raw_request(), materialized]


@pytest.mark.parametrize("request_", both())
def test_header_reads_the_first_value_case_insensitively(request_: Request) -> None:
    assert request_.header("X-TAG") == "one"
    assert request_.header("missing") is None


@pytest.mark.parametrize("request_", both())
def test_set_add_remove(request_: Request) -> None:
    request_.set_header("X-Tag", "only")
    request_.add_header("X-Extra", "a")
    request_.add_header("X-Extra", "b")
    request_.remove_header("host")
    assert request_.header("x-tag") == "only"
    assert request_.headers.getall("X-Extra") == ["a", "b"]
    assert "Host" not in request_.headers
    assert request_.headers.getall("x-tag") == ["only"]


def test_raw_headers_stay_raw() -> None:
    request = raw_request()
    request.set_header("X-Request-ID", "abc")
    request.add_header("Via", "1.1 test")
    request.remove_header("X-Tag")
    assert request.raw_headers == [
        (b"Host", b"example"),
        (b"X-Request-ID", b"abc"),
        (b"Via", b"1.1 test"),
    ]


@pytest.mark.parametrize(
    ("name", "value"), [("X-Bad", "a\r\nInjected: yes"), ("Bad Name", "v"), ("X", "nul\0")]
)
def test_unsafe_fields_are_refused_while_raw(name: str, value: str) -> None:
    # (once materialized, the checked serializer refuses them instead: h1serialize)
    request = raw_request()
    with pytest.raises(UnsafeHeader):
        request.set_header(name, value)
    with pytest.raises(UnsafeHeader):
        request.add_header(name, value)
    assert request.raw_headers == raw_request().raw_headers


def test_a_response_built_from_a_dict_works_too() -> None:
    response = Response(200, CIMultiDict([("A", "1")]))
    response.set_header("B", "2")
    assert response.header("b") == "2"
    assert response.raw_headers is None


def test_set_target_keeps_path_query_and_url_in_step() -> None:
    request = raw_request()
    assert str(request.url) == "http://example/"
    request.set_target(b"/a/b?x=1&y=2")
    assert (request.target, request.path, request.query) == (b"/a/b?x=1&y=2", "/a/b", "x=1&y=2")
    assert str(request.url) == "http://example/a/b?x=1&y=2"
    request.set_target(b"/c")
    assert (request.path, request.query, str(request.url)) == ("/c", "", "http://example/c")


@pytest.mark.parametrize("value", ["a\r\nInjected: yes", "a\nb", "nul\0"])
def test_a_name_set_before_is_still_refused_an_unsafe_value(value: str) -> None:
    # `set_header` remembers names it found to be tokens; the value is checked every time.
    request = raw_request()
    request.set_header("X-Remembered", "fine")
    with pytest.raises(UnsafeHeader):
        request.set_header("X-Remembered", value)
    with pytest.raises(UnsafeHeader):
        request.add_header("X-Remembered", value)
    assert request.header("x-remembered") == "fine"


def test_removing_an_absent_field_leaves_the_list_alone() -> None:
    request = raw_request()
    before = request.raw_headers
    request.remove_header("X-Consumer")
    assert request.raw_headers is before  # no copy for nothing to strip
    request.remove_header("x-TAG")  # every spelling and every value of one that is there
    assert request.raw_headers == [(b"Host", b"example")]


def test_set_header_replaces_only_fields_of_that_name() -> None:
    # The length is compared first: fields of the same length but another name stay.
    request = Request(
        "GET",
        b"/",
        [(b"X-Tag", b"1"), (b"X-Tab", b"2"), (b"x-tag", b"3"), (b"X-Tagg", b"4")],
        Body.from_bytes(b""),
        host="h",
    )
    request.set_header("X-TAG", "new")
    assert request.raw_headers == [(b"X-Tab", b"2"), (b"X-Tagg", b"4"), (b"X-TAG", b"new")]
