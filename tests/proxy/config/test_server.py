"""The listeners and admin sections of routes.yaml, and the top-level settings
(http1_parser, workers): proxy/config/server.py. Routes are in test_routes.py, upstreams in
test_upstream.py."""

from __future__ import annotations

import pytest

from tests.support.config_helpers import BASE, one_error, parse

# --- listeners and admin ---


def test_listeners_get_default_names_by_position() -> None:
    text = """\
        listeners: [{bind: ':0'}, {bind: ':0', name: internal}, {bind: ':0'}]
        upstreams: {}
        routes: []
    """

    names = [listener.name for listener in parse(text).listeners]

    assert names == ["listeners[0]", "internal", "listeners[2]"]


def test_at_least_one_listener_is_required() -> None:
    assert one_error("listeners: []\nupstreams: {}\nroutes: []\n") == (
        "routes.yaml:1: listeners: at least one listener is required"
    )


def test_duplicate_listener_names_are_errors() -> None:
    text = """\
        listeners:
          - {bind: ':1', name: a}
          - {bind: ':2', name: a}
        upstreams: {}
        routes: []
    """

    assert one_error(text) == (
        "routes.yaml:3: listeners[1].name: duplicate listener name 'a' (also listeners[0])"
    )


def test_two_sockets_on_one_address_are_an_error_but_port_0_is_not() -> None:
    text = """\
        listeners: [{bind: ':8080'}, {bind: '0.0.0.0:0'}, {bind: ':0'}]
        admin: {bind: '0.0.0.0:8080'}
        upstreams: {}
        routes: []
    """

    assert one_error(text) == "routes.yaml:2: admin.bind: address already used by listeners[0].bind"


def test_an_unquoted_port_needs_host_or_colon() -> None:
    assert one_error("listeners: [{bind: 8080}]\nupstreams: {}\nroutes: []\n") == (
        "routes.yaml:1: listeners[0].bind: expected an address like '0.0.0.0:8080', "
        "got an integer (8080); quote it to use it as text"
    )


def test_admin_requires_bind() -> None:
    assert (
        one_error(BASE + "routes: []\nadmin: {}\n")
        == "routes.yaml:5: admin: missing required key 'bind'"
    )


TOKEN = "0123456789abcdef0123456789abcdef"


def test_admin_token_and_hosts_are_read_after_substitution() -> None:
    text = BASE + "routes: []\nadmin:\n  bind: 127.0.0.1:9901\n  token: ${ADMIN_TOKEN}\n"
    text += "  hosts: [Gatehouse-Admin.Internal, metrics.example.com.]\n"

    admin = parse(text, env={"ADMIN_TOKEN": TOKEN}).admin

    assert admin is not None
    assert (admin.token, admin.hosts) == (
        TOKEN,
        ("gatehouse-admin.internal", "metrics.example.com"),
    )
    assert admin.line == 6  # admin.bind's: an address that cannot be bound names it


def test_admin_without_token_or_hosts_is_open_on_ip_literals_and_localhost() -> None:
    admin = parse(BASE + "routes: []\nadmin: {bind: 127.0.0.1:9901}\n").admin

    assert admin is not None
    assert (admin.token, admin.hosts) == (None, ())


@pytest.mark.parametrize(
    ("token", "env", "message"),
    [
        ('"${ADMIN_TOKEN}"', {"ADMIN_TOKEN": ""}, "empty (is the variable it names set?)"),
        ('"${ADMIN_TOKEN:-}"', {}, "empty (is the variable it names set?)"),
        ('"${ADMIN_TOKEN}"', {}, "environment variable 'ADMIN_TOKEN' is not set"),
        (
            "short-token",
            {},
            "at least 16 characters, got 11 (make one with: openssl rand -hex 32)",
        ),
        (
            '"0123456789abcdef 0123"',
            {},
            "a bearer token is letters, digits and -._~+/ with optional trailing '=' "
            "(RFC 6750 section 2.1)",
        ),
        (
            "12345678901234567890",
            {},
            "expected a string, got an integer (12345678901234567890); quote it to use it as text",
        ),
    ],
)
def test_an_admin_token_that_would_not_protect_is_an_error(
    token: str, env: dict[str, str], message: str
) -> None:
    text = BASE + f"routes: []\nadmin:\n  bind: 127.0.0.1:9901\n  token: {token}\n"

    assert one_error(text, env=env) == f"routes.yaml:7: admin.token: {message}"


@pytest.mark.parametrize(
    ("host", "hint"),
    [
        ("admin.internal:9901", " (any port is accepted)"),
        ("evil example", ""),
        ("http://admin.internal", " (any port is accepted)"),
        ("*.internal", ""),
        ("", ""),
    ],
)
def test_an_admin_host_must_be_a_name(host: str, hint: str) -> None:
    text = (
        BASE + f"routes: []\nadmin:\n  bind: 127.0.0.1:9901\n  hosts: ['ok.internal', '{host}']\n"
    )

    assert one_error(text) == (
        f"routes.yaml:7: admin.hosts[1]: expected a host name like "
        f"'gatehouse-admin.internal', got {host!r}{hint}"
    )


# --- top-level settings ---


@pytest.mark.parametrize("parser", ["auto", "httptools", "h11"])
def test_http1_parser_accepts_the_known_parsers(parser: str) -> None:
    assert parse(BASE + f"routes: []\nhttp1_parser: {parser}\n").http1_parser == parser


def test_an_unknown_http1_parser_is_an_error() -> None:
    assert one_error(BASE + "routes: []\nhttp1_parser: h1\n") == (
        "routes.yaml:5: http1_parser: unsupported parser 'h1' (supported: auto, httptools, h11) "
        "(did you mean 'h11'?)"
    )


@pytest.mark.parametrize(("workers", "parsed"), [("null", None), ("~", None), ("1", 1), ("16", 16)])
def test_workers_is_null_or_a_positive_integer(workers: str, parsed: int | None) -> None:
    assert parse(BASE + f"routes: []\nworkers: {workers}\n").workers == parsed


def test_workers_must_be_at_least_one() -> None:
    assert (
        one_error(BASE + "routes: []\nworkers: 0\n")
        == "routes.yaml:5: workers: must be at least 1, got 0"
    )
