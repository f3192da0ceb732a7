"""`headers` without sockets: remove / set / add on both sides, variables, what reaches
error replies, and every load-time check with its line."""

from __future__ import annotations

import textwrap

import pytest
from multidict import CIMultiDict

from middleware.headers import Headers, compile_template
from proxy.config.document import ConfigError
from proxy.config.load import parse_config
from proxy.core.body import Body
from proxy.core.errors import UpstreamConnectError
from proxy.core.models import Request, Response

HEAD = """\
listeners: [{bind: 127.0.0.1:0}]
upstreams: {app: {endpoints: ["http://127.0.0.1:9"]}}
routes: [{match: {path: /}, upstream: app}]
middleware:
"""


def load(section: str) -> Headers:
    config = parse_config(HEAD + textwrap.indent(textwrap.dedent(section), "  "))
    instance = config.middleware["h"].instance
    assert isinstance(instance, Headers)
    return instance


def errors_of(section: str) -> list[str]:
    with pytest.raises(ConfigError) as failed:
        parse_config(HEAD + textwrap.indent(textwrap.dedent(section), "  "))
    return str(failed.value).splitlines()


def make_request(headers: list[tuple[str, str]]) -> Request:
    request = Request(
        "GET", b"/orders/1", CIMultiDict(headers), Body.from_bytes(b""), client=("10.9.8.7", 1)
    )
    request.host = "shop.test"
    request.exchange.route_name = "orders"
    return request


async def test_request_remove_then_set_then_add() -> None:
    mw = load("""\
        h:
          type: headers
          request:
            remove: [X-Internal, x-debug]
            set: {X-Env: prod, X-Multi: one}
            add: {X-Multi: two, X-Trace: a}
        """)
    request = make_request(
        [("X-Internal", "1"), ("X-Debug", "1"), ("X-Env", "dev"), ("X-Env", "qa"), ("X-Keep", "k")]
    )
    seen: list[tuple[str, str]] = []

    async def endpoint(request: Request) -> Response:
        seen.extend(request.headers.items())
        return Response(200)

    await mw(request, endpoint)
    assert seen == [
        ("X-Env", "prod"),  # replaced where the first value was
        ("X-Keep", "k"),
        ("X-Multi", "one"),
        ("X-Multi", "two"),
        ("X-Trace", "a"),
    ]


async def test_response_changes_and_variables() -> None:
    mw = load("""\
        h:
          type: headers
          request:
            set: {X-Client: "{client_ip} via {host} {method} {path} ({route}, {scheme})"}
          response:
            remove: [Server]
            set: {X-Request-ID: "{request_id}", Cache-Control: no-store}
            add: {X-Who: "{consumer}", X-Braces: "{{literal}}"}
        """)
    request = make_request([("X-Request-ID", "abc-1")])

    async def endpoint(request: Request) -> Response:
        assert request.headers["X-Client"] == "10.9.8.7 via shop.test GET /orders/1 (orders, http)"
        request.consumer = "alice"
        return Response(200, CIMultiDict([("Server", "app/1.0"), ("Cache-Control", "max-age=9")]))

    response = await mw(request, endpoint)
    assert list(response.headers.items()) == [
        ("Cache-Control", "no-store"),
        ("X-Request-ID", "abc-1"),  # request_id_of: the client's id, when no middleware set one
        ("X-Who", "alice"),
        ("X-Braces", "{literal}"),
    ]


async def test_a_variable_cannot_smuggle_a_header() -> None:
    mw = load("h: {type: headers, request: {set: {X-User: 'user={consumer}'}}}\n")
    request = make_request([])
    request.consumer = "bob\r\nX-Admin: 1\x00"

    async def endpoint(request: Request) -> Response:
        return Response(204)

    await mw(request, endpoint)
    assert request.headers["X-User"] == "user=bobX-Admin: 1"
    assert "X-Admin" not in request.headers


async def test_error_replies_from_later_in_the_chain_get_the_response_headers() -> None:
    mw = load("h: {type: headers, response: {set: {Strict-Transport-Security: max-age=60}}}\n")

    async def endpoint(request: Request) -> Response:
        raise UpstreamConnectError()

    response = await mw(make_request([]), endpoint)
    assert response.status == 502
    assert response.headers["Strict-Transport-Security"] == "max-age=60"
    assert b"upstream_connect_failed" in response.body.take_all()


async def test_request_only_changes_leave_the_response_untouched() -> None:
    mw = load("h: {type: headers, request: {add: {X-A: '1'}}}\n")
    upstream = Response(200, [(b"x-up", b"1")])

    async def endpoint(request: Request) -> Response:
        return upstream

    response = await mw(make_request([]), endpoint)
    assert response is upstream
    assert response.raw_headers == [(b"x-up", b"1")]  # not even converted


def test_constant_values_are_precomputed() -> None:
    mw = load("h: {type: headers, request: {set: {X-A: 'a {{b}}', X-B: '{host}!'}}}\n")
    (name_a, value_a), (name_b, value_b) = mw.request_ops.set
    assert (name_a, value_a) == ("X-A", "a {b}")  # a plain string, rendered once
    assert name_b == "X-B"
    assert not isinstance(value_b, str)
    assert compile_template("") == ()


def test_load_errors_name_the_entry_and_its_line() -> None:
    assert errors_of("""\
        h:
          type: headers
          request:
            set:
              X-Ok: fine
              X Bad: 1
              X-Var: "{reqest_id}"
              X-Brace: "a}b"
              X-Spec: "{host:>10}"
            add: {Host: evil, x-ok: again}
            remove: [Content-Length, "X:Y"]
          response:
            set: {X-Nl: "a\\r\\nb", X-Space: " padded"}
            add: {Transfer-Encoding: chunked}
        """) == [
        "<string>:10: middleware.h.request.set['X Bad']: 'X Bad' is not a valid header name "
        "(RFC 9110 section 5.1: a token)",
        "<string>:11: middleware.h.request.set.X-Var: unknown variable {reqest_id} "
        "(did you mean 'request_id'?)",
        "<string>:12: middleware.h.request.set.X-Brace: Single '}' encountered in format string",
        "<string>:13: middleware.h.request.set.X-Spec: '{host}' takes no format spec or conversion",
        "<string>:14: middleware.h.request.add.Host: 'Host' is managed by the gateway and "
        "cannot be changed here (use the route's rewrite.host)",
        "<string>:15: middleware.h.request.remove: 'Content-Length' is managed by the "
        "gateway and cannot be changed here",
        "<string>:15: middleware.h.request.remove: 'X:Y' is not a valid header name "
        "(RFC 9110 section 5.1: a token)",
        "<string>:17: middleware.h.response.set.X-Nl: invalid header value 'a\\r\\nb': no "
        "control characters (CR, LF, NUL...), characters beyond \\xff or leading/trailing "
        "whitespace",
        "<string>:17: middleware.h.response.set.X-Space: invalid header value ' padded': no "
        "control characters (CR, LF, NUL...), characters beyond \\xff or leading/trailing "
        "whitespace",
        "<string>:18: middleware.h.response.add.Transfer-Encoding: 'Transfer-Encoding' is "
        "managed by the gateway and cannot be changed here",
    ]


def test_a_name_given_twice_in_one_map_is_an_error() -> None:
    assert errors_of("""\
        h:
          type: headers
          response:
            set:
              X-Frame-Options: DENY
              x-frame-options: SAMEORIGIN
        """) == [
        "<string>:10: middleware.h.response.set.x-frame-options: 'x-frame-options' is also "
        "given as 'X-Frame-Options'"
    ]


def test_shape_errors() -> None:
    assert errors_of("""\
        a: {type: headers}
        b: {type: headers, request: {sett: {}}}
        c: {type: headers, response: {set: [X-A]}}
        d: {type: headers, request: {add: {X-A: [1]}}}
        e: {type: headers, request: {set: {X-Unknown: "{nope}"}}}
        """) == [
        "<string>:5: middleware.a: expected 'request' or 'response' (or both)",
        "<string>:6: middleware.b.request.sett: unknown key 'sett' (did you mean 'set'?)",
        "<string>:7: middleware.c.response.set: expected a mapping, got a list",
        "<string>:8: middleware.d.request.add.X-A: expected a string, got a list",
        "<string>:9: middleware.e.request.set.X-Unknown: unknown variable {nope} (known: "
        "request_id, client_ip, host, method, path, scheme, route, consumer; write {{ and }} "
        "for literal braces)",
    ]


def test_numbers_and_booleans_are_written_as_given() -> None:
    mw = load("h: {type: headers, response: {set: {X-Num: 10, X-Flag: true}}}\n")
    assert mw.response_ops.set == (("X-Num", "10"), ("X-Flag", "true"))
