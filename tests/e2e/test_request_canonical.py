"""The gateway decides access once, on one canonical request (issue 14, items 1-3), tried
as an attacker would against an upstream that behaves like a real Python server
(tests/support/upstreams/wsgi.py: `_` folded into `-`, the method upper-cased, repeated fields
joined). Every case runs on both HTTP/1.1 codecs and both loops, and over HTTP/2 where
it applies."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from h2.errors import ErrorCodes

from proxy.process.server import Server
from tests.support.gateway import GatewayFactory
from tests.support.h2_client import H2Client
from tests.support.helpers import RawClient, RawResponse
from tests.support.upstreams import WsgiUpstream

pytestmark = pytest.mark.socket

KEY = "k-alice"


@pytest.fixture
def wsgi() -> Iterator[WsgiUpstream]:
    with WsgiUpstream() as upstream:
        yield upstream


def config(wsgi: WsgiUpstream, codec: str, *, extra: str = "") -> str:
    """`/admin` behind api_key (consumer alice), DELETE on `/items` behind it too, and a
    public catch-all to the same upstream: the layout the attacks walk around."""
    return f"""
listeners:
  - bind: 127.0.0.1:0
http1_parser: {codec}
upstreams:
  app:
    endpoints: [{wsgi.url}]
middleware:
  keys: {{type: api_key, keys: [{{key: {KEY}, consumer: alice}}]}}
  role: {{type: headers, request: {{set: {{X-Role: user}}}}}}
routes:
  - name: admin
    match: {{path_prefix: /admin}}
    middleware: [keys]
    upstream: app
  - name: admin-host
    match: {{host: admin.test}}
    middleware: [keys]
    upstream: app
  - name: delete-items
    match: {{path_prefix: /items, methods: [DELETE]}}
    middleware: [keys]
    upstream: app
  - name: roles
    match: {{path_prefix: /roles}}
    middleware: [role]
    upstream: app
  - name: public
    match: {{path_prefix: /}}
    upstream: app
{extra}
"""


async def send(server: Server, head: bytes) -> RawResponse:
    async with await RawClient.connect(server.addresses[0]) as client:
        await client.send(head)
        return await client.response()


def seen(response: RawResponse) -> dict[str, Any]:
    """What the WSGI upstream understood."""
    assert response.status == 200, response.body
    found: dict[str, Any] = json.loads(response.body)
    return found


# -- item 1: paths, absolute-form --------------------------------------------------------


@pytest.mark.parametrize(
    "path", [b"/%61dmin", b"//admin", b"/./admin", b"/x/../admin", b"/adm%69n/users"]
)
async def test_every_spelling_of_admin_meets_its_auth(
    gateway_factory: GatewayFactory, wsgi: WsgiUpstream, codec: str, path: bytes
) -> None:
    server = await gateway_factory(config(wsgi, codec))
    refused = await send(server, b"GET " + path + b" HTTP/1.1\r\nHost: t\r\n\r\n")
    assert refused.status == 401
    allowed = await send(
        server, b"GET " + path + b" HTTP/1.1\r\nHost: t\r\nX-API-Key: " + KEY.encode() + b"\r\n\r\n"
    )
    assert seen(allowed)["path"].startswith("/admin")
    assert seen(allowed)["headers"]["HTTP_X_CONSUMER"] == "alice"


async def test_an_escaped_slash_is_refused_by_default_and_unescaped_when_configured(
    gateway_factory: GatewayFactory, wsgi: WsgiUpstream, codec: str
) -> None:
    strict = await gateway_factory(config(wsgi, codec))
    answer = await send(strict, b"GET /%2fadmin HTTP/1.1\r\nHost: t\r\n\r\n")
    assert answer.status == 400
    assert json.loads(answer.body)["error"] == "invalid_target"
    unescaping = await gateway_factory(
        config(wsgi, codec, extra="path_normalization: {escaped_slashes: unescape}")
    )
    assert (await send(unescaping, b"GET /%2fadmin HTTP/1.1\r\nHost: t\r\n\r\n")).status == 401


async def test_an_absolute_form_target_is_routed_by_its_own_authority_and_sent_in_origin_form(
    gateway_factory: GatewayFactory, wsgi: WsgiUpstream, codec: str
) -> None:
    server = await gateway_factory(config(wsgi, codec))
    # RFC 9112 section 3.2.2: the target's authority, not Host, is what was asked for.
    refused = await send(server, b"GET http://admin.test/x HTTP/1.1\r\nHost: public.test\r\n\r\n")
    assert refused.status == 401
    answer = await send(
        server, b"GET http://public.test/%61dmin/../x?q=1 HTTP/1.1\r\nHost: admin.test\r\n\r\n"
    )
    assert (seen(answer)["path"], seen(answer)["query"]) == ("/x", "q=1")
    assert seen(answer)["headers"]["HTTP_HOST"] == "public.test"
    for target in (b"http://user@public.test/x", b"ftp://public.test/x", b"x/y"):
        assert (
            await send(server, b"GET " + target + b" HTTP/1.1\r\nHost: t\r\n\r\n")
        ).status == 400


# -- item 2: method case -----------------------------------------------------------------


@pytest.mark.parametrize("method", [b"dElEtE", b"delete", b"post", b"Get"])
async def test_a_registered_method_in_another_case_is_refused(
    gateway_factory: GatewayFactory, wsgi: WsgiUpstream, codec: str, method: bytes
) -> None:
    server = await gateway_factory(config(wsgi, codec))
    answer = await send(server, method + b" /items/1 HTTP/1.1\r\nHost: t\r\n\r\n")
    assert answer.status == 400
    # A method of the application's own, in any case, is not ours to refuse.
    custom = await send(server, b"GET /items/1 HTTP/1.1\r\nHost: t\r\n\r\n")
    assert seen(custom)["method"] == "GET"


async def test_http2_resets_a_stream_whose_method_is_a_registered_one_in_another_case(
    gateway_factory: GatewayFactory, wsgi: WsgiUpstream
) -> None:
    server = await gateway_factory(config(wsgi, "httptools"))
    host, port = server.addresses[0]
    async with await H2Client.connect(host, port) as client:
        for method in ("dElEtE", "post"):
            result = await client.request("/items/1", method=method)
            assert result.reset_code == ErrorCodes.PROTOCOL_ERROR
        assert (await client.request("/items/1", method="DELETE")).status == 401


# -- item 3: identity headers ------------------------------------------------------------


async def test_connection_cannot_nominate_away_a_field_the_gateway_sets(
    gateway_factory: GatewayFactory, wsgi: WsgiUpstream, codec: str
) -> None:
    server = await gateway_factory(config(wsgi, codec))
    answer = await send(
        server,
        b"GET /admin HTTP/1.1\r\nHost: t\r\nConnection: X-Consumer, X-Other\r\n"
        b"X-Other: hop\r\nX-API-Key: " + KEY.encode() + b"\r\n\r\n",
    )
    headers = seen(answer)["headers"]
    assert headers["HTTP_X_CONSUMER"] == "alice"
    assert "HTTP_X_OTHER" not in headers  # the client's own nominated field: its hop only


@pytest.mark.parametrize(
    ("policy", "status", "consumer", "other"),
    [
        ("drop", 200, "alice", None),
        ("reject", 400, None, None),
        # Allowed in general, but never in the spelling of a field the gateway sets.
        ("allow", 200, "alice", "o"),
    ],
)
async def test_underscore_spellings_never_reach_the_upstream_as_the_gateways_identity(
    gateway_factory: GatewayFactory,
    wsgi: WsgiUpstream,
    codec: str,
    policy: str,
    status: int,
    consumer: str | None,
    other: str | None,
) -> None:
    server = await gateway_factory(config(wsgi, codec, extra=f"headers_with_underscores: {policy}"))
    for connection in (b"", b"Connection: X-Consumer\r\n"):
        answer = await send(
            server,
            b"GET /admin HTTP/1.1\r\nHost: t\r\nX_Consumer: admin\r\nx_CONSUMER: root\r\n"
            b"X_Other: o\r\nX_Forwarded_For: 6.6.6.6\r\n"
            + connection
            + b"X-API-Key: "
            + KEY.encode()
            + b"\r\n\r\n",
        )
        assert answer.status == status
        if status == 200:
            headers = seen(answer)["headers"]
            assert headers["HTTP_X_CONSUMER"] == consumer
            assert headers.get("HTTP_X_OTHER") == other
            assert "6.6.6.6" not in headers["HTTP_X_FORWARDED_FOR"]


async def test_a_field_the_headers_middleware_sets_cannot_be_sent_in_another_spelling(
    gateway_factory: GatewayFactory, wsgi: WsgiUpstream, codec: str
) -> None:
    server = await gateway_factory(config(wsgi, codec, extra="headers_with_underscores: allow"))
    answer = await send(
        server, b"GET /roles HTTP/1.1\r\nHost: t\r\nX_Role: admin\r\nx-role: root\r\n\r\n"
    )
    assert seen(answer)["headers"]["HTTP_X_ROLE"] == "user"


async def test_http2_applies_the_same_underscore_and_identity_rules(
    gateway_factory: GatewayFactory, wsgi: WsgiUpstream
) -> None:
    server = await gateway_factory(config(wsgi, "httptools"))
    host, port = server.addresses[0]
    async with await H2Client.connect(host, port) as client:
        result = await client.request(
            "/admin", headers=[("x_consumer", "admin"), ("x_other", "o"), ("x-api-key", KEY)]
        )
    headers = json.loads(result.body)["headers"]
    assert headers["HTTP_X_CONSUMER"] == "alice"
    assert "HTTP_X_OTHER" not in headers


@pytest.mark.parametrize(
    "fields",
    [
        b"Authorization: Bearer a\r\nAuthorization: Bearer b\r\n",
        b"authorization: Basic YTpi\r\nAUTHORIZATION: Basic YzpkIA==\r\n",
        b"Proxy-Authorization: Basic a\r\nProxy-Authorization: Basic b\r\n",
        b"Content-Type: text/plain\r\nContent-Type: application/json\r\n",
        b"Host: u\r\n",
    ],
)
async def test_a_repeated_singleton_field_is_refused(
    gateway_factory: GatewayFactory, wsgi: WsgiUpstream, codec: str, fields: bytes
) -> None:
    server = await gateway_factory(config(wsgi, codec))
    answer = await send(server, b"GET /x HTTP/1.1\r\nHost: t\r\n" + fields + b"\r\n")
    assert answer.status == 400
    if b"Host" not in fields:  # (a second Host is a framing error: bad_request)
        assert json.loads(answer.body)["error"] == "invalid_header"


@pytest.mark.parametrize(
    "fields",
    [
        [("authorization", "Bearer a"), ("authorization", "Bearer b")],
        [("content-type", "a/b"), ("content-type", "c/d")],
        [("host", "other.test")],  # names another entity than :authority
    ],
)
async def test_http2_refuses_a_repeated_singleton_field_and_a_host_unlike_authority(
    gateway_factory: GatewayFactory, wsgi: WsgiUpstream, fields: list[tuple[str, str]]
) -> None:
    server = await gateway_factory(config(wsgi, "httptools"))
    host, port = server.addresses[0]
    async with await H2Client.connect(host, port) as client:
        client.conn.config.validate_outbound_headers = False  # h2 would refuse to send them
        answer = await client.request("/x", headers=fields)
    assert answer.status == 400
    assert json.loads(answer.body)["error"] in ("invalid_header", "invalid_host")


@pytest.mark.parametrize("host", [b"a b", b"evil.com/x@y", b"user@evil.com", b"ev%il.com", b"[::1"])
async def test_a_host_that_is_not_an_authority_is_refused(
    gateway_factory: GatewayFactory, wsgi: WsgiUpstream, codec: str, host: bytes
) -> None:
    server = await gateway_factory(config(wsgi, codec))
    answer = await send(server, b"GET /x HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert answer.status == 400
    fine = await send(server, b"GET /x HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n")
    assert seen(fine)["path"] == "/x"


async def test_http2_refuses_an_authority_that_is_not_one(
    gateway_factory: GatewayFactory, wsgi: WsgiUpstream
) -> None:
    server = await gateway_factory(config(wsgi, "httptools"))
    host, port = server.addresses[0]
    async with await H2Client.connect(host, port) as client:
        stream = client.send_request("/x", authority="evil.com/x@y")
        await client.flush()
        result = client.streams[stream]
        await client.wait_for("the answer", lambda: result.ended or result.reset_code is not None)
        assert result.status == 400
