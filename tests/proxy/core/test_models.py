"""Header access that keeps raw headers raw (`header`, `set_header`, `add_header`,
`remove_header`): the same answers whether the headers are still the parser's byte pairs
or already a CIMultiDict, and unsafe fields refused either way. `Request.copy_head`: what
a copy the gateway sends on a request's behalf keeps of it."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from proxy.codec.h1serialize import UnsafeHeader
from proxy.config.model import ListenerConfig
from proxy.core.body import Body
from proxy.core.models import Request, Response
from tests.proxy.core.test_headers import CLIENT_CERT


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


LISTENER = ListenerConfig(host="127.0.0.1", port=8443, name="public")


def client_request() -> Request:
    """A request as a front end and the chain leave it: every field set to a value that
    is not its default."""
    request = Request(
        "POST",
        b"/orders/7?full=1",
        [(b"Host", b"shop.test"), (b"X-Tag", b"one")],
        Body.from_bytes(b"the client's body"),
        http_version="2",
        client=("203.0.113.9", 0),
        scheme="https",
        keep_alive=False,
        host="shop.test",
        upgrade="websocket",
        raw_target=b"/orders/%37?full=1",
        tls_version="TLSv1.3",
        listener=LISTENER,
        client_cert=CLIENT_CERT,
    )
    request.peer = ("10.0.0.2", 41000)
    request.peer_trusted = True
    request.request_id = "rid-1"
    request.consumer = "alice"
    request.exchange.route_name = "orders"
    request.exchange.params = {"id": "7"}
    request.exchange.endpoint = "10.0.1.5:8080"
    request.exchange.retries = 1
    return request


def test_a_copy_keeps_the_head_the_client_and_the_route() -> None:
    original = client_request()
    copy = original.copy_head()
    assert (copy.method, copy.target, copy.raw_target) == (
        "POST",
        b"/orders/7?full=1",
        b"/orders/%37?full=1",
    )
    assert (copy.path, copy.query, copy.host) == ("/orders/7", "full=1", "shop.test")
    assert (copy.http_version, copy.scheme, copy.tls_version) == ("2", "https", "TLSv1.3")
    assert (copy.client, copy.peer, copy.peer_trusted) == (
        ("203.0.113.9", 0),
        ("10.0.0.2", 41000),
        True,
    )
    assert copy.listener is LISTENER
    assert copy.client_cert is CLIENT_CERT
    assert (copy.request_id, copy.consumer) == ("rid-1", "alice")
    assert (copy.exchange.route_name, copy.exchange.params) == ("orders", {"id": "7"})
    assert str(copy.url) == "https://shop.test/orders/7?full=1"


def test_a_copy_has_no_body_tunnel_or_record_of_its_own_yet() -> None:
    original = client_request()
    copy = original.copy_head()
    assert copy.body is not original.body
    assert copy.body.complete
    assert copy.body.take_all() == b""
    assert original.body.take_all() == b"the client's body"  # (left unread by the copy)
    assert (copy.upgrade, copy.keep_alive) == ("", True)
    assert copy.exchange is not original.exchange
    assert (copy.exchange.endpoint, copy.exchange.retries) == ("", 0)
    assert copy.exchange.received_at >= original.exchange.received_at
    copy.exchange.params["id"] = "8"  # the copy's parameters are its own
    assert original.exchange.params == {"id": "7"}


def test_a_copy_of_raw_fields_stays_raw_and_apart_from_the_original() -> None:
    original = client_request()
    copy = original.copy_head()
    assert copy.raw_headers == [(b"Host", b"shop.test"), (b"X-Tag", b"one")]
    copy.set_header("X-Tag", "two")
    copy.add_header("X-Copy", "1")
    assert original.raw_headers == [(b"Host", b"shop.test"), (b"X-Tag", b"one")]


def test_a_copy_of_fields_already_read_is_a_dict_of_its_own() -> None:
    original = client_request()
    original.headers.add("X-Read", "yes")  # a CIMultiDict from now on
    copy = original.copy_head()
    assert copy.raw_headers is None
    assert copy.headers == original.headers
    assert copy.headers is not original.headers
    copy.remove_header("X-Read")
    assert original.header("x-read") == "yes"


def test_a_copy_takes_the_fields_and_the_body_it_is_given() -> None:
    original = client_request()
    fields = [(b"Host", b"shop.test"), (b"If-None-Match", b'"v1"')]
    body = Body.from_bytes(b"replacement")
    copy = original.copy_head(fields, body)
    assert copy.raw_headers is fields
    assert copy.body is body
    assert copy.host == "shop.test"  # the original's, whatever the fields say
    given = CIMultiDict([("Host", "other.test")])
    assert original.copy_head(given).headers is given
