"""forward_auth without the gateway: its options and their errors, the auth request it
builds, and its lifecycle (one test talks to a real service). The bounded body read is
the HTTP client's (tests/proxy/upstream/test_fetch.py)."""

from __future__ import annotations

import asyncio

import pytest
from multidict import CIMultiDict

from middleware.forward_auth import ForwardAuth
from proxy.config.document import ConfigError
from proxy.config.load import parse_config
from proxy.core.body import Body
from proxy.core.errors import BadRequest
from proxy.core.models import Request, Response
from tests.support.auth_service import AuthAnswer, AuthService
from tests.support.tls import TlsFiles

HEAD = """\
listeners: [{bind: 127.0.0.1:0}]
upstreams: {app: {endpoints: ["http://127.0.0.1:9"]}}
routes: [{match: {path_prefix: /}, upstream: app}]
middleware:
"""


def build(options: str) -> ForwardAuth:
    """A forward_auth instance named `a` from its options (a YAML flow mapping body)."""
    config = parse_config(HEAD + f"  a: {{type: forward_auth, {options}}}\n")
    instance = config.middleware["a"].instance
    assert isinstance(instance, ForwardAuth)
    return instance


def error_of(options: str) -> str:
    with pytest.raises(ConfigError) as failed:
        parse_config(HEAD + f"  a: {{type: forward_auth, {options}}}\n")
    errors = str(failed.value).splitlines()
    assert len(errors) == 1, errors
    return errors[0].removeprefix("<string>:5: middleware.a")


def client_request(headers: list[tuple[str, str]], *, target: bytes = b"/app?x=1") -> Request:
    return Request(
        "PUT",
        target,
        CIMultiDict(headers),
        Body.from_bytes(b""),
        client=("198.51.100.7", 50000),
        scheme="https",
        host="app.example.com",
    )


# -- options -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "endpoint", "target", "host"),
    [
        ("http://auth:9000/check", "http://auth:9000", b"/check", "auth:9000"),
        ("http://auth", "http://auth:80", b"/", "auth"),
        ("https://Auth.Example.com/v1/verify?app=shop", "https://auth.example.com:443",
         b"/v1/verify?app=shop", "auth.example.com"),
        ("http://[::1]:8080/x", "http://[::1]:8080", b"/x", "[::1]:8080"),
        ("https://auth:8443/", "https://auth:8443", b"/", "auth:8443"),
    ],
)  # fmt: skip
def test_the_url_becomes_an_endpoint_a_target_and_a_host(
    url: str, endpoint: str, target: bytes, host: str
) -> None:
    auth = build(f"url: '{url}'")
    assert auth.target.origin == endpoint
    assert auth.target.target == target
    assert auth.target.host_header == host
    assert auth.timeout == 2.0
    assert auth.forward_headers is None
    assert auth.copy_headers == ()
    assert (auth.client.tls is not None) is url.startswith("https")
    assert url in repr(auth)


def test_options_are_read() -> None:
    auth = build(
        "url: 'https://auth/', timeout: 250ms, forward_headers: [Authorization, Cookie], "
        "copy_headers: X-User, tls: {verify: false, sni: auth.internal}"
    )
    assert auth.timeout == 0.25
    assert auth.forward_headers == ("Authorization", "Cookie")
    assert auth.copy_headers == ("X-User",)
    assert auth.client.server_hostname == "auth.internal"
    assert build("url: 'http://a/', forward_headers: []").forward_headers == ()


def test_the_https_context_trusts_the_given_ca(tls_files: TlsFiles) -> None:
    auth = build(f"url: 'https://localhost/', tls: {{ca: '{tls_files.ca}'}}")
    assert auth.client.tls is not None
    assert auth.client.server_hostname == "localhost"


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ("timeout: 1s", ": missing required key 'url'"),
        ("url: ''", ".url: must not be empty"),
        ("url: 5", ".url: expected a string, got an integer (5); quote it to use it as text"),
        ("url: 'auth:9000/check'",
         ".url: expected a URL like 'http://auth:9000/check', got 'auth:9000/check'"),
        ("url: 'ftp://auth/check'",
         ".url: unsupported scheme 'ftp' in 'ftp://auth/check' (http:// or https://)"),
        ("url: 'http://u:p@auth/check'",
         ".url: invalid url 'http://u:p@auth/check': credentials in the URL are not allowed"),
        ("url: 'http://auth/check#frag'",
         ".url: 'http://auth/check#frag': a fragment is not allowed"),
        ("url: 'http://[::1/check'", ".url: invalid url 'http://[::1/check': Invalid IPv6 URL"),
        ("url: 'http://auth:99999/'", ".url: port 99999 is out of range 1..65535"),
        ("url: 'http://auth/a b'", ".url: 'http://auth/a b': the path must be percent-encoded"),
        ("url: 'http://auth/', timeout: 0s", ".timeout: must be greater than 0"),
        ("url: 'http://auth/', tls: {verify: false}", ".tls: only applies to an https:// url"),
        ("url: 'https://auth/', tls: {ca: /nonexistent.pem}",
         ".tls.ca: '/nonexistent.pem' holds no PEM certificate"),
        ("url: 'https://auth/', tls: {vrify: false}",
         ".tls.vrify: unknown key 'vrify' (did you mean 'verify'?)"),
        ("url: 'http://auth/', forward_headers: [Authorization, 'bad name']",
         ".forward_headers: 'bad name' is not a valid header name"),
        ("url: 'http://auth/', forward_headers: [Host]",
         ".forward_headers: 'Host' is not sent from the client: forward_auth writes its own"),
        ("url: 'http://auth/', forward_headers: [x-forwarded-uri]",
         ".forward_headers: 'x-forwarded-uri' is not sent from the client: "
         "forward_auth writes its own"),
        ("url: 'http://auth/', copy_headers: [X-User, Content-Length]",
         ".copy_headers: 'Content-Length' is hop-by-hop or framing and cannot be copied"),
        ("url: 'http://auth/', copy_headers: ['a:b']",
         ".copy_headers: 'a:b' is not a valid header name"),
        ("url: 'http://auth/', copy_header: [X-User]",
         ".copy_header: unknown key 'copy_header' (did you mean 'copy_headers'?)"),
    ],
)  # fmt: skip
def test_option_errors(options: str, error: str) -> None:
    assert error_of(options) == error


def test_errors_in_tls_are_all_reported() -> None:
    with pytest.raises(ConfigError) as failed:
        parse_config(HEAD + "  a: {type: forward_auth, url: 'https://a/', tls: {ca: x, sni: 5}}\n")
    assert str(failed.value).splitlines() == [
        "<string>:5: middleware.a.tls.ca: 'x' holds no PEM certificate",
        "<string>:5: middleware.a.tls.sni: expected a string, got an integer (5); "
        "quote it to use it as text",
    ]


# -- the auth request --------------------------------------------------------------------


CLIENT_CLAIMS = [
    ("X-Forwarded-Uri", "/spoofed"),
    ("X-Forwarded-Method", "DELETE"),
    ("X-Forwarded-Proto", "ftp"),
    ("X-Forwarded-Host", "evil"),
    ("X-Forwarded-For", "192.0.2.1"),
    ("X-Forwarded-For", "192.0.2.2"),
    ("Forwarded", "for=192.0.2.1"),
    ("X-Real-IP", "192.0.2.1"),
]


def test_every_end_to_end_header_is_forwarded_by_default() -> None:
    auth = build("url: 'http://auth:9000/check'")
    request = client_request(
        [
            ("Host", "app.example.com"),
            ("Authorization", "Bearer t"),
            ("Connection", "keep-alive"),
            ("Content-Length", "0"),
            ("Transfer-Encoding", "chunked"),
            *CLIENT_CLAIMS,
            ("Via", "1.1 other"),
            ("Cookie", "a=1"),
            ("Cookie", "b=2"),
        ]
    )
    # The peer is not a trusted proxy: what it says about where it came from is dropped,
    # and X-Forwarded-For names the peer alone, as the upstream will get it.
    assert auth._auth_headers(request, request.headers) == [
        ("Host", "auth:9000"),
        ("Authorization", "Bearer t"),
        ("Cookie", "a=1"),
        ("Cookie", "b=2"),
        ("X-Forwarded-Method", "PUT"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "app.example.com"),
        ("X-Forwarded-Uri", "/app?x=1"),
        ("X-Forwarded-For", "198.51.100.7"),
    ]


def test_a_trusted_proxy_s_chain_and_claims_reach_the_service() -> None:
    everything = build("url: 'http://auth:9000/check'")
    listed = build("url: 'http://auth/', forward_headers: [Forwarded, X-Real-IP]")
    request = client_request([("Host", "app.example.com"), *CLIENT_CLAIMS])
    request.peer_trusted = True
    for auth in (everything, listed):
        headers = auth._auth_headers(request, request.headers)
        assert ("Forwarded", "for=192.0.2.1") in headers
        assert ("X-Real-IP", "192.0.2.1") in headers
        assert ("X-Forwarded-For", "192.0.2.1, 192.0.2.2, 198.51.100.7") in headers
        assert ("X-Forwarded-Proto", "https") in headers  # the gateway's own, always
    request.peer_trusted = False
    headers = listed._auth_headers(request, request.headers)
    assert [name for name, _ in headers if name in ("Forwarded", "X-Real-IP")] == []


def test_no_x_forwarded_host_without_a_host() -> None:
    auth = build("url: 'http://auth/', forward_headers: []")
    request = Request("GET", b"/", CIMultiDict(), Body.from_bytes(b""), client=("::1", 1))
    assert auth._auth_headers(request, request.headers) == [
        ("Host", "auth"),
        ("X-Forwarded-Method", "GET"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Uri", "/"),
        ("X-Forwarded-For", "::1"),
    ]


def test_only_the_listed_headers_are_forwarded_in_the_listed_order() -> None:
    auth = build("url: 'http://auth/', forward_headers: [Cookie, Authorization, X-Absent]")
    request = client_request(
        [("Authorization", "Basic x"), ("X-Other", "o"), ("cookie", "a=1"), ("Cookie", "b=2")]
    )
    assert auth._auth_headers(request, request.headers)[:4] == [
        ("Host", "auth"),
        ("Cookie", "a=1"),
        ("Cookie", "b=2"),
        ("Authorization", "Basic x"),
    ]


async def test_a_header_an_earlier_middleware_broke_is_a_400() -> None:
    auth = build("url: 'http://auth/'")
    request = client_request([("X-Set-By-Middleware", "a\r\nInjected: 1")])

    async def endpoint(request: Request) -> Response:
        raise AssertionError("not reached")

    with pytest.raises(BadRequest, match="cannot send the auth request"):
        await auth(request, endpoint)


# -- lifecycle ---------------------------------------------------------------------------


@pytest.mark.socket
async def test_start_opens_the_pool_close_drops_it_and_a_call_without_start_works() -> None:
    service = await AuthService(answer=AuthAnswer(200, [("X-User", "ada")])).start()
    try:
        auth = build(f"url: '{service.url}/check', copy_headers: [X-User]")
        reached: list[str] = []

        async def endpoint(request: Request) -> Response:
            reached.append(request.headers["X-User"])
            return Response(204)

        response = await auth(client_request([("X-User", "eve")]), endpoint)  # no start()
        assert response.status == 204
        assert reached == ["ada"]
        assert "idle=1" in repr(auth)
        await auth.close()
        assert "pool=None" in repr(auth)
        await auth.start()
        await auth.start()  # twice: still one pool
        assert "idle=0" in repr(auth)
        assert (await auth(client_request([]), endpoint)).status == 204
        await auth.close()
        await auth.close()
    finally:
        await service.stop()


@pytest.mark.socket
async def test_a_client_leaving_mid_answer_drops_the_service_connection() -> None:
    service = await AuthService(answer=AuthAnswer(401, body=b"partial", stall=True)).start()
    try:
        auth = build(f"url: '{service.url}'")
        await auth.start()

        async def endpoint(request: Request) -> Response:
            raise AssertionError("not reached")

        task = asyncio.create_task(auth(client_request([]), endpoint))
        async with asyncio.timeout(5):
            await service.stalled.wait()
        await asyncio.sleep(0.05)  # the head and the first chunk reach the gateway
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert "active=0 idle=0" in repr(auth)
        await auth.close()
    finally:
        await service.stop()
