"""Routes that answer themselves (`redirect`, `respond`) and `redirect_https` listeners:
what they read as, and the mistakes refused at load with their line."""

from __future__ import annotations

import pytest

from proxy.config.model import HttpsRedirect, RedirectConfig, RespondConfig
from proxy.config.values import ConfigValueError, parse_redirect_template
from tests.support.config_helpers import one_error, parse, route_error, routes
from tests.support.tls import make_tls_files


def test_a_redirect_route_reads_its_template_and_status() -> None:
    config = parse(
        routes(
            """
            - match: {path_regex: "/u/(?P<id>[0-9]+)"}
              redirect: {to: "https://{host}/users/{id}{{x}}", status: 301}
            """
        )
    )
    route = config.routes[0]
    assert route.upstream == ""
    assert not route.websocket.enabled
    assert route.redirect == RedirectConfig(
        "https://{host}/users/{id}{{x}}",
        (("https://", False), ("host", True), ("/users/", False), ("id", True), ("{x}", False)),
        301,
    )


def test_a_redirect_defaults_to_302() -> None:
    config = parse(routes("  - {match: {}, redirect: {to: /elsewhere}}\n"))
    assert config.routes[0].redirect == RedirectConfig("/elsewhere", (("/elsewhere", False),))


def test_a_respond_route_gets_a_plain_text_type_for_its_body() -> None:
    config = parse(
        routes(
            """
            - {match: {path: /a}, respond: {body: "hi"}}
            - {match: {path: /b}, respond: {status: 204}}
            - match: {path: /c}
              respond: {status: 503, body: "<p>", headers: {content-type: text/html, X-N: 1}}
            """
        )
    )
    assert [route.respond for route in config.routes] == [
        RespondConfig(200, b"hi", (("Content-Type", "text/plain; charset=utf-8"),)),
        RespondConfig(204, b"", ()),
        RespondConfig(503, b"<p>", (("content-type", "text/html"), ("X-N", "1"))),
    ]


@pytest.mark.parametrize(
    ("lines", "error"),
    [
        (
            "match: {}\nupstream: users\nredirect: {to: /x}",
            "routes[0].redirect: give one of upstream, redirect, respond (also upstream)",
        ),
        ("match: {}", "routes[0]: missing required key 'upstream' (or give redirect or respond)"),
        (
            "match: {}\nredirect: {to: 'https://{hots}{path}'}",
            "routes[0].redirect.to: unknown placeholder {hots} (known: {scheme}, {host},"
            " {port}, {path}, {query}, {uri})",
        ),
        (
            "match: {path_regex: '/(?P<id>.*)'}\nredirect: {to: '/{id}/{name}'}",
            "routes[0].redirect.to: unknown placeholder {name} (known: {scheme}, {host},"
            " {port}, {path}, {query}, {uri}, {id})",
        ),
        (
            "match: {}\nredirect: {to: 'https://x/{path'}",
            "routes[0].redirect.to: unmatched '{' at offset 10 (write {{ for a brace)",
        ),
        (
            "match: {}\nredirect: {to: '/a b'}",
            "routes[0].redirect.to: '/a b' cannot be part of a URL: percent-encode spaces,"
            " control and non-ASCII characters",
        ),
        ("match: {}\nredirect: {to: ''}", "routes[0].redirect.to: an empty redirect target"),
        (
            "match: {}\nredirect: {to: /x, status: 200}",
            "routes[0].redirect.status: a redirect's status is one of 301, 302, 303, 307, 308,"
            " not 200",
        ),
        ("match: {}\nredirect: {status: 301}", "routes[0].redirect: missing required key 'to'"),
        (
            "match: {}\nrespond: {status: 204, body: x}",
            "routes[0].respond.body: a 204 answer has no body",
        ),
        (
            "match: {}\nrespond: {status: 600}",
            "routes[0].respond.status: must be a status from 200 to 599, got 600",
        ),
        (
            "match: {}\nrespond: {status: 101}",
            "routes[0].respond.status: must be at least 200, got 101",
        ),
        (
            "match: {}\nrespond: {headers: {Content-Length: 5}}",
            "routes[0].respond.headers.Content-Length: Content-Length is written by the gateway"
            " from the body and the connection",
        ),
        (
            "match: {}\nrespond: {headers: {'X-A': \"a\\r\\nb\"}}",
            "routes[0].respond.headers.X-A: a header value must not hold CR, LF or NUL",
        ),
        (
            "match: {}\nrespond: {}\nrewrite: {strip_prefix: /a}",
            "routes[0].rewrite: rewrite is about forwarding: this route answers itself",
        ),
        (
            "match: {}\nrespond: {}\nwebsocket: true",
            "routes[0].websocket: websocket is about forwarding: this route answers itself",
        ),
    ],
)
def test_mistakes_in_a_route_that_answers_itself_are_refused(lines: str, error: str) -> None:
    assert route_error(lines).split(": ", 1)[1] == error


def test_redirect_https_reads_as_written() -> None:
    base = (
        "upstreams: {u: {endpoints: ['http://127.0.0.1:1']}}\nroutes: [{match: {}, upstream: u}]\n"
    )
    config = parse(
        "listeners:\n"
        "  - {bind: ':0', redirect_https: true}\n"
        "  - {bind: ':0', redirect_https: {port: 8443, status: 301}}\n"
        "  - {bind: ':0', redirect_https: false}\n" + base
    )
    assert [listener.redirect_https for listener in config.listeners] == [
        HttpsRedirect(443, 308),
        HttpsRedirect(8443, 301),
        None,
    ]


def test_redirect_https_is_for_plaintext_listeners(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    tls = make_tls_files(tmp_path_factory.mktemp("tls"))
    text = (
        "listeners:\n"
        f"  - {{bind: ':0', tls: {{cert: '{tls.cert}', key: '{tls.key}'}}, redirect_https: true}}\n"
        "upstreams: {u: {endpoints: ['http://127.0.0.1:1']}}\n"
        "routes: [{match: {}, upstream: u}]\n"
    )
    assert one_error(text) == (
        "routes.yaml:2: listeners[0].redirect_https: redirect_https is for a plaintext listener"
    )


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("{port: 0}", "listeners[0].redirect_https.port: must be at least 1, got 0"),
        (
            "{port: 70000}",
            "listeners[0].redirect_https.port: must be a port from 1 to 65535, got 70000",
        ),
        (
            "{status: 303}",
            "listeners[0].redirect_https.status: a redirect's status is one of 301, 302, 307,"
            " 308, not 303",
        ),
        (
            "yes please",
            "listeners[0].redirect_https: expected true, false or a mapping,"
            " got a string ('yes please')",
        ),
    ],
)
def test_redirect_https_mistakes_are_refused(value: str, error: str) -> None:
    text = (
        f"listeners: [{{bind: ':0', redirect_https: {value}}}]\n"
        "upstreams: {u: {endpoints: ['http://127.0.0.1:1']}}\n"
        "routes: [{match: {}, upstream: u}]\n"
    )
    assert one_error(text).split(": ", 1)[1] == error


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("/plain", (("/plain", False),)),
        ("{uri}", (("uri", True),)),
        ("{{{path}}}", (("{", False), ("path", True), ("}", False))),
        ("a{host}{port}b", (("a", False), ("host", True), ("port", True), ("b", False))),
    ],
)
def test_templates_split_into_text_and_names(
    text: str, parts: tuple[tuple[str, bool], ...]
) -> None:
    assert parse_redirect_template(text) == parts


@pytest.mark.parametrize("text", ["}", "{", "{a", "x}y", "\u00e9", "/a\tb"])
def test_malformed_templates_are_refused(text: str) -> None:
    with pytest.raises(ConfigValueError):
        parse_redirect_template(text)
