"""Request field validation for HTTP/2 (RFC 9113 sections 8.2 and 8.3) and the response
field lists, without sockets."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from proxy.codec.h2fields import trailer_fields
from proxy.core.errors import HeadTooLarge
from proxy.core.models import Response
from proxy.frontend.h2.fields import (
    MalformedRequest,
    request_fields,
    response_fields,
)

BASE = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a.test"), (b":path", b"/x")]


def test_a_valid_request_is_split_into_pseudo_and_regular_fields() -> None:
    fields = request_fields([*BASE, (b"accept", b"*/*"), (b"content-length", b"5")], 4096)

    assert (fields.method, fields.scheme, fields.authority, fields.path) == (
        b"GET",
        b"https",
        b"a.test",
        b"/x",
    )
    assert fields.headers == [(b"accept", b"*/*"), (b"content-length", b"5")]
    assert fields.content_length == 5


def test_cookie_crumbs_are_joined_for_http1_upstreams() -> None:
    fields = request_fields([*BASE, (b"cookie", b"a=1"), (b"cookie", b"b=2")], 4096)

    assert fields.headers == [(b"cookie", b"a=1; b=2")]


def test_host_stands_in_for_a_missing_authority() -> None:
    fields = request_fields([*BASE[:2], BASE[3], (b"host", b"h.test")], 4096)

    assert fields.authority == b"h.test"


@pytest.mark.parametrize(
    "extra",
    [
        [(b"x-a", b"one\r\ntwo")],
        [(b"x-a", b"nul\x00")],
        [(b"x-a", b" padded")],
        [(b"X-Upper", b"v")],
        [(b"bad name", b"v")],
        [(b"connection", b"close")],
        [(b"transfer-encoding", b"chunked")],
        [(b"upgrade", b"websocket")],
        [(b"te", b"gzip")],
        [(b"content-length", b"abc")],
        [(b"content-length", b"1"), (b"content-length", b"2")],
        [(b"x-a", b"v"), (b":path", b"/again")],
        [(b":unknown", b"v")],
    ],
)
def test_malformed_fields_are_refused(extra: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(MalformedRequest):
        request_fields([*BASE, *extra], 4096)


@pytest.mark.parametrize(
    "fields",
    [
        [(b":scheme", b"http"), (b":path", b"/")],  # no :method
        [(b":method", b"GET"), (b":scheme", b"http")],  # no :path
        [(b":method", b"GET"), (b":path", b"/")],  # no :scheme
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"x")],  # not absolute
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"*")],  # * is OPTIONS only
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":protocol", b"ws")],
    ],
)
def test_missing_or_wrong_pseudo_headers_are_refused(fields: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(MalformedRequest):
        request_fields(fields, 4096)


def test_options_star_and_extended_connect_are_accepted() -> None:
    star = request_fields([(b":method", b"OPTIONS"), (b":scheme", b"http"), (b":path", b"*")], 4096)
    connect = request_fields(
        [*BASE[1:], (b":method", b"CONNECT"), (b":protocol", b"websocket")], 4096
    )

    assert star.path == b"*"
    assert connect.protocol == b"websocket"


def test_a_field_list_over_the_limit_is_head_too_large() -> None:
    with pytest.raises(HeadTooLarge):
        request_fields([*BASE, (b"x-big", b"v" * 500)], 500)


def test_response_fields_drop_connection_specific_and_framing_fields() -> None:
    raw = [(b"Content-Type", b"text/plain"), (b"Connection", b"x"), (b"Content-Length", b"9")]
    response = Response(200, raw)

    assert response_fields(response, 12) == [
        (b":status", b"200"),
        (b"content-type", b"text/plain"),
        (b"content-length", b"12"),
    ]


def test_model_fields_with_control_characters_are_dropped() -> None:
    response = Response(404, CIMultiDict({"X-Ok": "yes", "X-Bad": "a\r\nb"}))

    assert response_fields(response, None) == [(b":status", b"404"), (b"x-ok", b"yes")]
    assert trailer_fields([("Grpc-Status", "0"), ("x-bad", "\n")]) == [(b"grpc-status", b"0")]


@pytest.mark.parametrize(
    "pseudo",
    [
        (b":method", b"GET /admin HTTP/1.1"),
        (b":method", b"G\xffT"),
        (b":path", b"/a b"),
        (b":path", b"/a\tb"),
        (b":authority", b"a b"),
        (b":authority", b"a\x7f"),
    ],
)
def test_pseudo_headers_that_would_split_an_http1_request_line_are_refused(
    pseudo: tuple[bytes, bytes],
) -> None:
    fields = [field for field in BASE if field[0] != pseudo[0]]

    with pytest.raises(MalformedRequest):
        request_fields([pseudo, *fields], 4096)


def test_trailers_a_trailer_section_must_not_carry_are_dropped() -> None:
    trailers = [("grpc-status", "0"), ("Content-Length", "3"), ("connection", "x")]

    assert trailer_fields(trailers) == [(b"grpc-status", b"0")]
