"""`cors` without sockets: origin matching (exact, wildcard, `*`), preflights answered or
refused, the headers actual responses get, and the load-time checks (the Fetch standard's
rules for `*` with credentials)."""

from __future__ import annotations

import textwrap

import pytest
from multidict import CIMultiDict

from middleware.cors import Cors, parse_origin
from proxy.config.document import ConfigError
from proxy.config.load import parse_config
from proxy.core.body import Body
from proxy.core.errors import CorsPreflightRefused, RequestTimeout
from proxy.core.models import Request, Response

HEAD = """\
listeners: [{bind: 127.0.0.1:0}]
upstreams: {app: {endpoints: ["http://127.0.0.1:9"]}}
routes: [{match: {path: /}, upstream: app}]
middleware:
"""


def load(options: str) -> Cors:
    instance = parse_config(HEAD + f"  c: {options}\n").middleware["c"].instance
    assert isinstance(instance, Cors)
    return instance


def errors_of(section: str) -> list[str]:
    with pytest.raises(ConfigError) as failed:
        parse_config(HEAD + textwrap.indent(textwrap.dedent(section), "  "))
    return str(failed.value).splitlines()


def make_request(method: str, headers: dict[str, str]) -> Request:
    return Request(method, b"/api", CIMultiDict(headers), Body.from_bytes(b""))


class Upstream:
    """The rest of the chain: records what reached it, answers 200 with given headers."""

    def __init__(self, headers: list[tuple[str, str]] | None = None) -> None:
        self.seen: list[str] = []
        self.headers = headers or []

    async def __call__(self, request: Request) -> Response:
        self.seen.append(request.method)
        return Response(200, CIMultiDict(self.headers))


SITE = (
    "{type: cors, allow_origins: [https://app.example.com, 'https://*.example.org'], "
    "allow_methods: [GET, POST, DELETE], allow_headers: [Content-Type, X-Token], "
    "expose_headers: [X-Total], allow_credentials: true, max_age: 10m}"
)


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://app.example.com", True),
        ("HTTPS://APP.EXAMPLE.COM", True),
        ("https://a.example.org", True),
        ("https://a.b.example.org", True),
        ("https://example.org", False),  # the wildcard needs a label before the domain
        ("https://evil-example.org", False),
        ("https://a.example.org.evil.com", False),
        ("http://app.example.com", False),  # another scheme is another origin
        ("https://app.example.com:8443", False),
        ("null", False),
        ("", False),
    ],
)
def test_origin_matching(origin: str, allowed: bool) -> None:
    assert load(SITE).origin_allowed(origin) is allowed


def test_configured_origins_are_normalized() -> None:
    assert parse_origin("HTTPS://App.Example.COM:443") == ("https://app.example.com", False)
    assert parse_origin("http://localhost:8080") == ("http://localhost:8080", False)
    assert parse_origin("http://[::1]:3000") == ("http://[::1]:3000", False)
    assert parse_origin("https://*.example.org") == ("https://*.example.org", True)


async def test_an_allowed_preflight_is_answered_here() -> None:
    upstream = Upstream()
    request = make_request(
        "OPTIONS",
        {
            "Origin": "https://a.example.org",
            "Access-Control-Request-Method": "DELETE",
            "Access-Control-Request-Headers": "x-token, content-type",
        },
    )
    response = await load(SITE)(request, upstream)
    assert upstream.seen == []  # never forwarded
    assert response.status == 204
    assert dict(response.headers) == {
        "Access-Control-Allow-Origin": "https://a.example.org",
        "Access-Control-Allow-Credentials": "true",
        "Access-Control-Allow-Methods": "GET, POST, DELETE",
        "Access-Control-Allow-Headers": "Content-Type, X-Token",
        "Access-Control-Max-Age": "600",
        "Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
    }
    assert response.body.take_all() == b""


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        (
            {"Origin": "https://evil.com", "Access-Control-Request-Method": "GET"},
            "origin 'https://evil.com' is not allowed",
        ),
        (
            {"Origin": "https://app.example.com", "Access-Control-Request-Method": "PUT"},
            "method 'PUT' is not allowed",
        ),
        (
            {
                "Origin": "https://app.example.com",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type,authorization",
            },
            "header 'authorization' is not allowed",
        ),
    ],
)
async def test_a_refused_preflight_is_403_and_never_forwarded(
    headers: dict[str, str], message: str
) -> None:
    upstream = Upstream()
    with pytest.raises(CorsPreflightRefused) as refused:
        await load(SITE)(make_request("OPTIONS", headers), upstream)
    assert refused.value.status == 403
    assert refused.value.message == message
    assert upstream.seen == []


async def test_safelisted_methods_pass_even_when_not_listed() -> None:
    cors = load("{type: cors, allow_origins: [https://a.test], allow_methods: [PUT]}")
    headers = {"Origin": "https://a.test", "Access-Control-Request-Method": "POST"}
    response = await cors(make_request("OPTIONS", headers), Upstream())
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Methods"] == "PUT"


async def test_options_without_request_method_is_an_ordinary_request() -> None:
    upstream = Upstream()
    request = make_request("OPTIONS", {"Origin": "https://app.example.com"})
    response = await load(SITE)(request, upstream)
    assert upstream.seen == ["OPTIONS"]
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.example.com"


async def test_an_allowed_origin_gets_the_headers_on_the_actual_response() -> None:
    upstream = Upstream([("Vary", "Accept-Encoding"), ("X-Total", "3")])
    request = make_request("GET", {"Origin": "https://app.example.com"})
    response = await load(SITE)(request, upstream)
    assert upstream.seen == ["GET"]
    assert list(response.headers.items()) == [
        ("Vary", "Accept-Encoding"),
        ("X-Total", "3"),
        ("Vary", "Origin"),
        ("Access-Control-Allow-Origin", "https://app.example.com"),
        ("Access-Control-Allow-Credentials", "true"),
        ("Access-Control-Expose-Headers", "X-Total"),
    ]


@pytest.mark.parametrize("headers", [{"Origin": "https://evil.com"}, {}])
async def test_other_origins_are_forwarded_but_get_no_cors_headers(
    headers: dict[str, str],
) -> None:
    upstream = Upstream([("Vary", "origin, accept")])
    response = await load(SITE)(make_request("POST", headers), upstream)
    assert upstream.seen == ["POST"]
    assert list(response.headers.items()) == [("Vary", "origin, accept")]  # Vary already there


async def test_any_origin_sends_a_star_everywhere_and_no_vary() -> None:
    cors = load("{type: cors, allow_origins: ['*'], expose_headers: ['*']}")
    for headers in ({"Origin": "https://whoever.test"}, {}):
        response = await cors(make_request("GET", headers), Upstream())
        assert dict(response.headers) == {
            "Access-Control-Allow-Origin": "*",
            "Access-Control-Expose-Headers": "*",
        }
    preflight = {"Origin": "https://x.test", "Access-Control-Request-Method": "PATCH"}
    response = await cors(make_request("OPTIONS", preflight), Upstream())
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in response.headers


async def test_star_methods_and_headers_echo_what_the_preflight_asks() -> None:
    cors = load(
        "{type: cors, allow_origins: [https://a.test], allow_methods: ['*'], "
        "allow_headers: ['*'], allow_credentials: true}"
    )
    headers = {
        "Origin": "https://a.test",
        "Access-Control-Request-Method": "PURGE",
        "Access-Control-Request-Headers": "authorization, x-anything",
    }
    response = await cors(make_request("OPTIONS", headers), Upstream())
    assert response.headers["Access-Control-Allow-Methods"] == "PURGE"
    assert response.headers["Access-Control-Allow-Headers"] == "authorization, x-anything"
    bad = {**headers, "Access-Control-Request-Method": "GET POST"}
    with pytest.raises(CorsPreflightRefused):  # not a method token: nothing to echo
        await cors(make_request("OPTIONS", bad), Upstream())


async def test_error_replies_from_later_in_the_chain_get_cors_headers() -> None:
    async def failing(request: Request) -> Response:
        raise RequestTimeout()

    request = make_request("GET", {"Origin": "https://app.example.com"})
    response = await load(SITE)(request, failing)
    assert response.status == 408
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.example.com"


def test_load_errors() -> None:
    assert errors_of("""\
        a: {type: cors}
        b: {type: cors, allow_origins: ['*'], allow_credentials: true}
        c:
          type: cors
          allow_origins: [https://a.test/, 'https://*.com', 'https://x.*.test', 'http://h:99999']
          allow_methods: [GET, "BAD METHOD"]
          allow_headers: ["X-A,X-B"]
          expose_headers: ['*']
          allow_credentials: true
          max_age: forever
        d: {type: cors, allow_origins: []}
        """) == [
        "<string>:5: middleware.a: missing required key 'allow_origins'",
        "<string>:6: middleware.b.allow_credentials: cannot be true with '*' in allow_origins: "
        "the Fetch standard forbids 'Access-Control-Allow-Origin: *' with credentials; list "
        "the origins (https://*.example.com allows every subdomain)",
        "<string>:9: middleware.c.allow_origins: 'https://a.test/' is not an origin: expected "
        "scheme://host[:port] with no path, like https://app.example.com or "
        "https://*.example.com",
        "<string>:9: middleware.c.allow_origins: 'https://*.com': a wildcard needs a domain of "
        "two labels or more after '*.'",
        "<string>:9: middleware.c.allow_origins: 'https://x.*.test' is not an origin: expected "
        "scheme://host[:port] with no path, like https://app.example.com or "
        "https://*.example.com",
        "<string>:9: middleware.c.allow_origins: 'http://h:99999': port 99999 is out of range",
        "<string>:10: middleware.c.allow_methods: 'BAD METHOD' is not a valid method name",
        "<string>:11: middleware.c.allow_headers: 'X-A,X-B' is not a valid header name",
        "<string>:12: middleware.c.expose_headers: '*' is a literal header name when "
        "credentials are allowed (Fetch standard): list the headers to expose",
        "<string>:14: middleware.c.max_age: invalid duration 'forever' (e.g. '250ms', '5s', "
        "'1.5s', '2m', '1m30s', '1h', '1d' or a number of seconds)",
        "<string>:15: middleware.d.allow_origins: at least one origin is required",
    ]
