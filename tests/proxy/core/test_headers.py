"""Upstream request headers (no sockets): the HTTP/2 header list and, for comparison, the
HTTP/1.1 head built from the same requests."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from proxy.codec.h1serialize import UnsafeHeader
from proxy.core.body import Body
from proxy.core.canonical import client_fields
from proxy.core.client_cert import ClientCertificate
from proxy.core.headers import upstream_h2_headers, upstream_request_head
from proxy.core.models import RawHeaders, Request


def h1_request(
    headers: RawHeaders, *, method: str = "GET", connection: bytes | None = None
) -> Request:
    """A request as the HTTP/1.1 front end makes it: raw headers, Host among them, without
    the fields the client's Connection nominates."""
    return Request(
        method,
        b"/a?b=1",
        client_fields(headers, connection, False, "drop"),
        Body.from_bytes(b""),
        client=("10.0.0.9", 5555),
        host="api.test",
    )


def h2_request(headers: RawHeaders, *, method: str = "GET") -> Request:
    """A request as the HTTP/2 front end makes it: no pseudo-headers, host from
    :authority, no Connection."""
    return Request(
        method,
        b"/a?b=1",
        headers,
        Body.from_bytes(b""),
        http_version="2",
        client=("10.0.0.9", 5555),
        scheme="https",
        host="api.test",
    )


def names(headers: RawHeaders) -> list[bytes]:
    return [name for name, _ in headers]


def test_pseudo_headers_come_first_in_order() -> None:
    headers = upstream_h2_headers(h1_request([]), b"/a?b=1", "api.test", "https", None)
    assert headers[:4] == [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", b"api.test"),
        (b":path", b"/a?b=1"),
    ]


def test_fields_are_lower_cased_and_connection_specific_ones_dropped() -> None:
    request = h1_request(
        [
            (b"Host", b"api.test"),
            (b"Connection", b"keep-alive, X-Secret"),
            (b"X-Secret", b"hop"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Proxy-Connection", b"keep-alive"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Upgrade", b"websocket"),
            (b"TE", b"gzip"),
            (b"Expect", b"100-continue"),
            (b"Content-Length", b"999"),
            (b"X-Custom", b"Kept As Is"),
        ],
        connection=b"keep-alive, X-Secret",
    )
    headers = upstream_h2_headers(request, b"/a", "api.test", "http", None)
    fields = [name for name in names(headers) if not name.startswith(b":")]
    assert (b"x-custom", b"Kept As Is") in headers
    for dropped in (
        b"host",
        b"connection",
        b"x-secret",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
        b"expect",
        b"content-length",
    ):
        assert dropped not in fields
    assert all(name == name.lower() for name in fields)


def test_te_trailers_is_kept_for_grpc() -> None:
    request = h2_request([(b"te", b"trailers"), (b"content-type", b"application/grpc")])
    headers = upstream_h2_headers(request, b"/svc/Method", "api.test", "http", None)
    assert (b"te", b"trailers") in headers
    assert (b"content-type", b"application/grpc") in headers


CLAIMS: RawHeaders = [
    (b"X-Forwarded-For", b"1.2.3.4"),
    (b"X-Forwarded-Proto", b"https"),
    (b"X-Forwarded-Host", b"edge.test"),
    (b"Forwarded", b'for=1.2.3.4;proto=https, for="[2001:db8::7]:80"'),
    (b"X-Real-IP", b"1.2.3.4"),
    (b"Via", b"1.1 edge"),
]


def upstream_fields(request: Request, path: str) -> dict[bytes, bytes]:
    """The forwarding fields as each serializer sends them upstream, lower-cased; every
    path must agree, and each field must come once."""
    if path == "h2":
        fields = [
            (name, value)
            for name, value in upstream_h2_headers(request, b"/a", "api.test", "http", None)
            if not name.startswith(b":")
        ]
    else:
        if path == "h1-text":
            request.headers  # noqa: B018 - a middleware read them: the checked text path
        head = upstream_request_head(request, b"/a", "api.test", None, chunked=False)
        lines = head.split(b"\r\n")[1:]
        fields = [tuple(line.split(b": ", 1)) for line in lines if b": " in line]  # type: ignore[misc]
    names = [name.lower() for name, _ in fields]
    assert len(names) == len(set(names)), names
    return {name.lower(): value for name, value in fields}


SERIALIZERS = ["h1-raw", "h1-text", "h2"]


@pytest.mark.parametrize("path", SERIALIZERS)
def test_a_trusted_peer_keeps_the_chain_and_this_hop_is_appended(path: str) -> None:
    request = h1_request(CLAIMS)
    request.peer_trusted = True
    headers = upstream_fields(request, path)
    assert headers[b"x-forwarded-for"] == b"1.2.3.4, 10.0.0.9"
    assert headers[b"x-forwarded-proto"] == b"https, http"
    assert headers[b"x-forwarded-host"] == b"edge.test, api.test"
    assert headers[b"forwarded"] == (
        b'for=1.2.3.4;proto=https, for="[2001:db8::7]:80", for=10.0.0.9;host=api.test;proto=http'
    )
    assert headers[b"x-real-ip"] == b"1.2.3.4"
    assert headers[b"via"] == b"1.1 edge, 1.1 gatehouse"


@pytest.mark.parametrize("path", SERIALIZERS)
def test_an_untrusted_peer_s_claims_are_replaced(path: str) -> None:
    headers = upstream_fields(h1_request(CLAIMS), path)
    assert headers[b"x-forwarded-for"] == b"10.0.0.9"
    assert headers[b"x-forwarded-proto"] == b"http"
    assert headers[b"x-forwarded-host"] == b"api.test"
    assert b"forwarded" not in headers
    assert b"x-real-ip" not in headers
    assert headers[b"via"] == b"1.1 edge, 1.1 gatehouse"  # a list of hops, not a claim


@pytest.mark.parametrize("path", SERIALIZERS)
def test_the_hop_appended_is_the_peer_not_the_client_the_chain_named(path: str) -> None:
    request = h1_request([(b"X-Forwarded-For", b"203.0.113.5"), (b"Forwarded", b"for=x")])
    request.peer_trusted = True
    request.client = ("203.0.113.5", 0)  # what proxy/core/client_ip.py decided
    headers = upstream_fields(request, path)
    assert headers[b"x-forwarded-for"] == b"203.0.113.5, 10.0.0.9"
    assert headers[b"forwarded"] == b"for=x, for=10.0.0.9;host=api.test;proto=http"
    assert b"x-real-ip" not in headers


def test_an_ipv6_peer_is_bracketed_and_quoted_in_forwarded() -> None:
    request = h1_request([(b"Forwarded", b"for=unknown")])
    request.peer = ("2001:db8::9", 443)
    request.peer_trusted = True
    request.host = "api.test:8443"
    headers = upstream_fields(request, "h2")
    assert headers[b"forwarded"] == (
        b'for=unknown, for="[2001:db8::9]";host="api.test:8443";proto=http'
    )
    assert headers[b"x-forwarded-for"] == b"2001:db8::9"


def test_request_from_the_http2_front_end() -> None:
    headers = dict(upstream_h2_headers(h2_request([]), b"/a", "api.test", "http", None))
    assert headers[b"via"] == b"2 gatehouse"
    assert headers[b"x-forwarded-proto"] == b"https"
    assert headers[b"x-forwarded-for"] == b"10.0.0.9"


def test_content_length_only_when_known() -> None:
    post = h1_request([], method="POST")
    assert (b"content-length", b"12") in upstream_h2_headers(post, b"/", "h", "http", 12)
    assert b"content-length" not in names(upstream_h2_headers(post, b"/", "h", "http", None))
    assert (b"content-length", b"0") in upstream_h2_headers(post, b"/", "h", "http", 0)
    get = h1_request([])
    assert b"content-length" not in names(upstream_h2_headers(get, b"/", "h", "http", 0))


def test_repeated_forwarding_fields_are_joined_in_order_by_every_builder() -> None:
    """Each builder (raw HTTP/1.1 head, HTTP/2 list, the checked text path) joins the
    values of repeated fields once, in order, and appends this hop."""
    fields: RawHeaders = [(b"X-Forwarded-For", b"10.0.0.%d" % i) for i in range(1, 4)]
    fields += [(b"Via", b"1.1 a"), (b"Via", b"1.1 b")]
    expected_for = b"10.0.0.1, 10.0.0.2, 10.0.0.3, 10.0.0.9"

    def trusted(fields: RawHeaders) -> Request:  # from a trusted proxy: its lists kept
        request = h1_request(fields)
        request.peer_trusted = True
        return request

    raw_head = upstream_request_head(trusted(fields), b"/a", "api.test", None, False)
    assert b"\r\nX-Forwarded-For: " + expected_for + b"\r\n" in raw_head
    assert b"\r\nVia: 1.1 a, 1.1 b, 1.1 gatehouse\r\n" in raw_head
    h2_fields = dict(upstream_h2_headers(trusted(fields), b"/a", "api.test", "http", None))
    assert h2_fields[b"x-forwarded-for"] == expected_for
    assert h2_fields[b"via"] == b"1.1 a, 1.1 b, 1.1 gatehouse"
    text = trusted(fields)
    text.headers.add("X-Added", "yes")  # the headers are a CIMultiDict from now on
    text_head = upstream_request_head(text, b"/a", "api.test", None, False)
    assert b"\r\nX-Forwarded-For: " + expected_for + b"\r\n" in text_head
    assert b"\r\nVia: 1.1 a, 1.1 b, 1.1 gatehouse\r\n" in text_head


CLIENT_CERT = ClientCertificate(
    subject="CN=alice",
    issuer="CN=CA",
    common_name="alice",
    dns=(),
    uris=(),
    emails=(),
    fingerprint="ab" * 32,
    pem="",
    xfcc=f'Hash={"ab" * 32};Subject="CN=alice"',
)


@pytest.mark.parametrize("verified", [CLIENT_CERT, None])
def test_xfcc_is_the_gateways_alone_in_every_builder(verified: ClientCertificate | None) -> None:
    """A client's X-Forwarded-Client-Cert never passes, trusted peer or not; the verified
    certificate's element does, once."""
    forged: RawHeaders = [
        (b"X-Forwarded-Client-Cert", b'Hash=00;Subject="CN=root"'),
        (b"x-forwarded-client-cert", b"Hash=11"),
    ]

    def request() -> Request:
        made = h1_request(forged)
        made.peer_trusted = True
        made.client_cert = verified
        return made

    expected = [verified.xfcc.encode()] if verified is not None else []
    raw_head = upstream_request_head(request(), b"/a", "api.test", None, False)
    text = request()
    text.headers.add("X-Added", "yes")  # the checked text path
    text_head = upstream_request_head(text, b"/a", "api.test", None, False)
    for head in (raw_head, text_head):
        lines = head.decode().split("\r\n")
        xfcc = [line for line in lines if line.lower().startswith("x-forwarded-client-cert:")]
        assert [line.split(": ", 1)[1].encode() for line in xfcc] == expected
    h2_fields = upstream_h2_headers(request(), b"/a", "api.test", "https", None)
    assert [v for n, v in h2_fields if n == b"x-forwarded-client-cert"] == expected


def test_every_connection_field_of_the_client_nominates_its_fields() -> None:
    # scan_head joins the values of every Connection field into one (h1codec.py).
    request = h1_request(
        [(b"Connection", b"X-One"), (b"X-One", b"1"), (b"Connection", b"X-Two"), (b"X-Two", b"2")],
        connection=b"X-One,X-Two",
    )
    headers = upstream_h2_headers(request, b"/a", "api.test", "http", None)
    assert not {b"x-one", b"x-two", b"connection"} & set(names(headers))


def test_headers_set_by_middleware_are_used_and_checked() -> None:
    request = h1_request([(b"Connection", b"X-Gone"), (b"X-Gone", b"1")], connection=b"X-Gone")
    assert request.header("x-gone") is None  # the client's nominated field: gone on arrival
    # A field the gateway sets later stays, whatever a Connection header names (RFC 9110
    # section 7.6.1 nominates the client's fields, never the gateway's).
    request.headers = CIMultiDict([("X-Added", "yes"), ("Connection", "X-Gone"), ("X-Gone", "1")])
    headers = upstream_h2_headers(request, b"/a", "api.test", "http", None)
    assert (b"x-added", b"yes") in headers
    assert (b"x-gone", b"1") in headers
    assert b"connection" not in names(headers)
    request.headers = CIMultiDict([("X-Bad", "a\r\nInjected: 1")])
    with pytest.raises(UnsafeHeader):
        upstream_h2_headers(request, b"/a", "api.test", "http", None)


@pytest.mark.parametrize("target", [b"", b"/a b", b"/a\r\nX: y", b"/a\x00"])
def test_unsafe_target_is_refused(target: bytes) -> None:
    with pytest.raises(UnsafeHeader):
        upstream_h2_headers(h1_request([]), target, "api.test", "http", None)


def test_h1_head_and_h2_list_carry_the_same_fields() -> None:
    raw = [(b"Host", b"api.test"), (b"Accept", b"*/*"), (b"X-Forwarded-For", b"1.1.1.1")]
    head = upstream_request_head(h1_request(raw), b"/a", "api.test", None, chunked=False)
    h2_fields = upstream_h2_headers(h1_request(raw), b"/a", "api.test", "http", None)
    h1_fields = {
        line.split(b": ", 1)[0].lower() for line in head.split(b"\r\n")[1:] if b": " in line
    }
    h1_fields.discard(b"host")  # :authority in HTTP/2
    assert h1_fields == {name for name in names(h2_fields) if not name.startswith(b":")}
