"""Request smuggling: ambiguous framing and malformed heads get 400 and a close, and never
reach the upstream as (two) requests.

Each case is a request whose framing a lenient parser could read differently from a strict
one, followed by a second request (`GET /smuggled`) that a desynchronised parser would
take for the next message. RFC 9112 sections 2.2, 5, 6.1, 6.3 and 7.1.
"""

from __future__ import annotations

import pytest

from proxy.process.server import Server
from tests.support.gateway import assert_still_serves
from tests.support.helpers import RawClient, parse_all
from tests.support.upstreams import UpstreamServer

pytestmark = pytest.mark.socket

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n"


def post(*headers: bytes, body: bytes = b"", version: bytes = b"1.1") -> bytes:
    head = (
        b"POST /echo HTTP/" + version + b"\r\nHost: t\r\n" + b"".join(h + b"\r\n" for h in headers)
    )
    return head + b"\r\n" + body


CASES = {
    "cl-then-te": post(
        b"Content-Length: 6", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n" + SMUGGLED
    ),
    "te-then-cl": post(
        b"Transfer-Encoding: chunked", b"Content-Length: 6", body=b"0\r\n\r\n" + SMUGGLED
    ),
    "duplicate-cl-same": post(b"Content-Length: 3", b"Content-Length: 3", body=b"abc"),
    "duplicate-cl-different": post(
        b"Content-Length: 3", b"Content-Length: 40", body=b"abc" + SMUGGLED
    ),
    "cl-list": post(b"Content-Length: 3, 3", body=b"abc"),
    "cl-plus-sign": post(b"Content-Length: +3", body=b"abc"),
    "cl-negative": post(b"Content-Length: -3", body=b"abc"),
    "cl-hex": post(b"Content-Length: 0x3", body=b"abc"),
    "cl-inner-space": post(b"Content-Length: 1 0", body=b"abc"),
    "cl-overflow": post(b"Content-Length: 99999999999999999999999999", body=b"abc"),
    "te-trailing-space": post(b"Transfer-Encoding: chunked ", body=b"0\r\n\r\n" + SMUGGLED),
    "te-xchunked": post(b"Transfer-Encoding: xchunked", body=b"0\r\n\r\n" + SMUGGLED),
    "te-chunked-identity": post(
        b"Transfer-Encoding: chunked, identity", body=b"0\r\n\r\n" + SMUGGLED
    ),
    "te-identity-chunked": post(
        b"Transfer-Encoding: identity, chunked", body=b"0\r\n\r\n" + SMUGGLED
    ),
    "te-twice": post(
        b"Transfer-Encoding: chunked",
        b"Transfer-Encoding: chunked",
        body=b"0\r\n\r\n" + SMUGGLED,
    ),
    "te-gzip": post(b"Transfer-Encoding: gzip", body=b"abc"),
    "te-vertical-tab": post(b"Transfer-Encoding:\x0bchunked", body=b"0\r\n\r\n" + SMUGGLED),
    "te-name-space": post(b"Transfer-Encoding : chunked", body=b"0\r\n\r\n" + SMUGGLED),
    "te-on-http10": post(
        b"Transfer-Encoding: chunked", body=b"3\r\nabc\r\n0\r\n\r\n" + SMUGGLED, version=b"1.0"
    ),
    "bare-lf": b"GET /echo HTTP/1.1\nHost: t\n\n" + SMUGGLED,
    "bare-lf-in-one-header": b"GET /echo HTTP/1.1\r\nHost: t\nX-A: b\r\n\r\n" + SMUGGLED,
    "bare-lf-after-request-line": b"GET /echo HTTP/1.1\nHost: t\r\n\r\n" + SMUGGLED,
    "chunk-size-invalid": post(
        b"Transfer-Encoding: chunked", body=b"zz\r\nhello\r\n0\r\n\r\n" + SMUGGLED
    ),
    "chunk-size-negative": post(
        b"Transfer-Encoding: chunked", body=b"-5\r\nhello\r\n0\r\n\r\n" + SMUGGLED
    ),
    "chunk-size-0x-prefix": post(
        b"Transfer-Encoding: chunked", body=b"0x5\r\nhello\r\n0\r\n\r\n" + SMUGGLED
    ),
    "chunk-size-overflow": post(
        b"Transfer-Encoding: chunked",
        body=b"10000000000000000000000000005\r\nhello\r\n0\r\n\r\n" + SMUGGLED,
    ),
    "chunk-size-space": post(
        b"Transfer-Encoding: chunked", body=b"5 5\r\nhello\r\n0\r\n\r\n" + SMUGGLED
    ),
    "chunk-data-too-long": post(
        b"Transfer-Encoding: chunked", body=b"3\r\nhello\r\n0\r\n\r\n" + SMUGGLED
    ),
    "chunk-bare-lf": post(b"Transfer-Encoding: chunked", body=b"5\nhello\n0\n\n" + SMUGGLED),
    "header-name-space": b"GET /echo HTTP/1.1\r\nHost: t\r\nX Bad: 1\r\n\r\n" + SMUGGLED,
    "host-space-before-colon": b"GET /echo HTTP/1.1\r\nHost : t\r\n\r\n" + SMUGGLED,
    "header-name-non-token": b"GET /echo HTTP/1.1\r\nHost: t\r\nX@A: 1\r\n\r\n" + SMUGGLED,
    "header-name-empty": b"GET /echo HTTP/1.1\r\nHost: t\r\n: v\r\n\r\n" + SMUGGLED,
    "header-no-colon": b"GET /echo HTTP/1.1\r\nHost: t\r\nNoColon\r\n\r\n" + SMUGGLED,
    "nul-in-value": b"GET /echo HTTP/1.1\r\nHost: t\r\nX-A: a\x00b\r\n\r\n" + SMUGGLED,
    "bare-cr-in-value": b"GET /echo HTTP/1.1\r\nHost: t\r\nX-A: a\rb\r\n\r\n" + SMUGGLED,
    "obs-fold": b"GET /echo HTTP/1.1\r\nHost: t\r\nX-A: a\r\n b\r\n\r\n" + SMUGGLED,
    "obs-fold-tab": b"GET /echo HTTP/1.1\r\nHost: t\r\nX-A: a\r\n\tb\r\n\r\n" + SMUGGLED,
    "obs-fold-te": post(b"Transfer-Encoding: identity\r\n chunked", body=b"0\r\n\r\n" + SMUGGLED),
    "space-before-first-header": b"GET /echo HTTP/1.1\r\n Host: t\r\n\r\n" + SMUGGLED,
    "no-host-http11": b"GET /echo HTTP/1.1\r\n\r\n" + SMUGGLED,
    "two-hosts": b"GET /echo HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n" + SMUGGLED,
}


@pytest.mark.parametrize("payload", list(CASES.values()), ids=list(CASES))
async def test_ambiguous_request_gets_400_and_never_reaches_upstream(
    gateway: Server, h1_upstream: UpstreamServer, payload: bytes
) -> None:
    async with await RawClient.connect(gateway.addresses[0]) as client:
        await client.send(payload)
        try:
            data = await client.read_until_closed()  # (kept open: for the 75 s keep-alive)
        except TimeoutError:
            pytest.fail(f"accepted and kept open, answered: {bytes(client.buffer)[:300]!r}")
    responses = parse_all(data)
    assert [r.status for r in responses] == [400], data[:300]
    assert responses[0].json()["error"] == "bad_request"
    assert responses[0].header("connection") == "close"
    assert h1_upstream.requests == []
    await assert_still_serves(gateway)


async def test_valid_chunked_request_with_extension_and_trailer_is_accepted(
    gateway: Server, h1_upstream: UpstreamServer
) -> None:
    # The strict checks must not refuse what RFC 9112 section 7.1 allows.
    payload = post(
        b"Transfer-Encoding: Chunked",
        body=b"5;name=value\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-Checksum: 1\r\n\r\n",
    )
    async with await RawClient.connect(gateway.addresses[0]) as client:
        await client.send(payload)
        response = await client.response()
    assert response.status == 200
    assert response.json()["body"] == "hello0123456789"
    assert len(h1_upstream.requests) == 1


async def test_content_length_with_surrounding_whitespace_is_accepted(
    gateway: Server, h1_upstream: UpstreamServer
) -> None:
    # RFC 9112 section 5.1: OWS around a field value is not part of it, so this is a
    # valid Content-Length of 2 (h11 accepts it; both codecs must agree).
    payload = b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length:  2 \t\r\n\r\nhi"
    async with await RawClient.connect(gateway.addresses[0]) as client:
        await client.send(payload)
        response = await client.response()
    assert response.status == 200
    assert response.json()["body"] == "hi"


async def test_header_value_whitespace_is_not_forwarded(
    gateway: Server, h1_upstream: UpstreamServer
) -> None:
    payload = b"GET /echo HTTP/1.1\r\nHost: t\r\nX-A: \t padded \t\r\n\r\n"
    async with await RawClient.connect(gateway.addresses[0]) as client:
        await client.send(payload)
        response = await client.response()
    assert response.status == 200
    assert h1_upstream.requests[0].header("x-a") == "padded"
