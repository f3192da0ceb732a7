"""The canonical request (proxy/core/canonical.py), without sockets: paths, targets, hosts,
methods and the client's header fields."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy.config.document import ConfigError
from proxy.config.load import parse_config
from proxy.config.model import PathNormalization
from proxy.core.body import Body
from proxy.core.canonical import (
    InvalidHeader,
    InvalidHost,
    InvalidMethod,
    InvalidTarget,
    canonical_target,
    check_authority,
    check_method,
    client_fields,
    normalize_path,
    spelling,
    without_spellings,
)
from proxy.core.models import Request

DEFAULT = PathNormalization()
UNESCAPE = PathNormalization(escaped_slashes="unescape")
KEEP = PathNormalization(escaped_slashes="keep")
NO_MERGE = PathNormalization(merge_slashes=False)


@pytest.mark.parametrize(
    ("path", "canonical"),
    [
        ("/", "/"),
        ("/users/42", "/users/42"),
        ("/%61dmin", "/admin"),
        ("/adm%69n/users", "/admin/users"),
        ("//admin", "/admin"),
        ("/a//b///c/", "/a/b/c/"),
        ("//", "/"),
        ("/./admin", "/admin"),
        ("/x/../admin", "/admin"),
        ("/a/%2e%2E/b", "/b"),
        ("/a/.%2e/b", "/b"),
        ("/a/b/..", "/a/"),
        ("/a/.", "/a/"),
        ("/a//../b", "/b"),  # slashes merge first, as nginx does
        ("/.well-known/x", "/.well-known/x"),
        ("/a/...", "/a/..."),
        ("/%7euser", "/~user"),
        ("/a%3fb", "/a%3Fb"),  # a reserved character stays encoded, its hex upper-cased
        ("/a%c3%a9", "/a%C3%A9"),
        ("/a b", "/a%20b"),  # a byte a path may not hold raw is encoded
        ("/caf\xc3\xa9", "/caf%C3%A9"),
        ("/a;b=c,d:e@f!$&'()*+", "/a;b=c,d:e@f!$&'()*+"),
        ("/a%25b", "/a%25b"),  # decoded once only: %25 is a literal "%"
    ],
)
def test_paths_in_canonical_form(path: str, canonical: str) -> None:
    assert normalize_path(path, DEFAULT) == canonical


def test_without_merge_slashes_empty_segments_stay() -> None:
    assert normalize_path("/a//b", NO_MERGE) == "/a//b"
    assert normalize_path("/a//../b", NO_MERGE) == "/a/b"


@pytest.mark.parametrize(
    ("path", "unescaped", "kept"),
    [
        ("/%2fadmin", "/admin", "/%2Fadmin"),
        ("/a%2F..%2Fadmin", "/admin", "/a%2F..%2Fadmin"),
        ("/a%2F%2Fb", "/a/b", "/a%2F%2Fb"),
        ("/a%5cb", "/a%5Cb", "/a%5Cb"),  # a backslash unescaped is a character, not a separator
        ("/a\\b", "/a%5Cb", "/a%5Cb"),
    ],
)
def test_escaped_slashes_follow_the_configured_action(path: str, unescaped: str, kept: str) -> None:
    with pytest.raises(InvalidTarget):
        normalize_path(path, DEFAULT)
    assert normalize_path(path, UNESCAPE) == unescaped
    assert normalize_path(path, KEEP) == kept


@pytest.mark.parametrize(
    "path", ["/..", "/../a", "/a/../..", "/%2e%2e/x", "/a%zz", "/a%2", "/a%00"]
)
def test_paths_the_gateway_refuses(path: str) -> None:
    with pytest.raises(InvalidTarget):
        normalize_path(path, UNESCAPE)


_ATOMS = st.sampled_from(
    [
        "/",
        "//",
        ".",
        "..",
        "%2e",
        "%2E",
        "a",
        "B",
        "%41",
        "%2f",
        "%5C",
        "\\",
        "%25",
        "%3f",
        "é",
        " ",
    ]
)


@given(st.lists(_ATOMS, max_size=20).map(lambda atoms: "/" + "".join(atoms)))
def test_the_canonical_form_is_a_fixed_point_with_no_dot_segment_or_double_slash(path: str) -> None:
    for policy in (UNESCAPE, KEEP):
        try:
            canonical = normalize_path(path, policy)
        except InvalidTarget:
            continue
        assert normalize_path(canonical, policy) == canonical
        assert "//" not in canonical
        assert not re.search(r"/\.\.?(/|$)", canonical)
        assert re.fullmatch(r"/([A-Za-z0-9\-._~!$&'()*+,;=:@/]|%[0-9A-F]{2})*", canonical)


def test_targets_in_each_form() -> None:
    assert canonical_target(b"/a/b?x=1", "GET", DEFAULT) == (
        b"/a/b?x=1",
        "/a/b",
        "x=1",
        b"/a/b?x=1",
        None,
    )
    assert canonical_target(b"/a/../%62?q=%2e#frag", "GET", DEFAULT) == (
        b"/b?q=%2e",
        "/b",
        "q=%2e",
        b"/a/../%62?q=%2e",
        None,
    )
    absolute = canonical_target(b"HTTP://Api.Test:8080/%61?x", "GET", DEFAULT)
    assert (absolute[0], absolute[4]) == (b"/a?x", b"Api.Test:8080")
    assert canonical_target(b"https://h", "GET", DEFAULT)[0] == b"/"
    assert canonical_target(b"http://h?q", "GET", DEFAULT)[0] == b"/?q"
    assert canonical_target(b"*", "OPTIONS", DEFAULT)[1] == "*"


@pytest.mark.parametrize(
    ("target", "method", "error"),
    [
        (b"*", "GET", InvalidTarget),
        (b"admin", "GET", InvalidTarget),
        (b"ftp://h/a", "GET", InvalidTarget),
        (b"http://user@h/a", "GET", InvalidHost),
        (b"http://h h/a", "GET", InvalidHost),
        (b"/%2f", "GET", InvalidTarget),
    ],
)
def test_targets_the_gateway_refuses(target: bytes, method: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        canonical_target(target, method, DEFAULT)


@pytest.mark.parametrize(
    "host",
    [b"", b"api.test", b"API.test:8443", b"127.0.0.1:80", b"[::1]:8080", b"a-b_c~d.e", b"%41"],
)
def test_authorities_accepted(host: bytes) -> None:
    check_authority(host)


@pytest.mark.parametrize(
    "host", [b"a b", b"evil.com/x@y", b"u@evil.com", b"h:x", b"[::1", b"a%zz", b"h\\x", b"a?b"]
)
def test_authorities_refused(host: bytes) -> None:
    with pytest.raises(InvalidHost):
        check_authority(host)


def test_methods_in_the_wrong_case_are_refused_and_custom_ones_pass() -> None:
    for method in ("GET", "DELETE", "PROPFIND", "Frobnicate", "frob", "PURGE"):
        check_method(method)
    for method in ("get", "dElEtE", "Post", "propfind", "m-search"):
        with pytest.raises(InvalidMethod):
            check_method(method)


HEADERS = [(b"Host", b"t"), (b"X_Consumer", b"admin"), (b"X-Trace", b"1"), (b"Cookie", b"c")]


def test_client_fields_follow_the_underscore_policy() -> None:
    assert client_fields(HEADERS, None, True, "allow") == HEADERS
    # Never the "_" spelling of a field the gateway sets or frames by, even under allow.
    spoofs = [(b"X_Forwarded_For", b"6.6.6.6"), (b"content_length", b"0"), (b"X_Real_IP", b"1")]
    assert client_fields(HEADERS + spoofs, None, True, "allow") == HEADERS
    assert client_fields(HEADERS, None, True, "drop") == [HEADERS[0], HEADERS[2], HEADERS[3]]
    with pytest.raises(InvalidHeader):
        client_fields(HEADERS, None, True, "reject")
    assert client_fields(HEADERS[:1], None, False, "reject") == HEADERS[:1]


def test_client_fields_drop_what_connection_nominates() -> None:
    assert client_fields(HEADERS, b"keep-alive, close", False, "allow") is HEADERS
    assert client_fields(HEADERS, b"X-TRACE ,cookie", False, "allow") == HEADERS[:2]


def test_every_spelling_of_an_identity_field_is_removed() -> None:
    spellings = frozenset({spelling("X-Consumer")})
    raw = Request(
        "GET",
        b"/",
        [(b"X_Consumer", b"a"), (b"x-consumer", b"b"), (b"X-CONSUMER", b"c"), (b"X-Other", b"d")],
        Body.from_bytes(b""),
        host="t",
    )
    without_spellings(raw, spellings)
    assert raw.raw_headers == [(b"X-Other", b"d")]
    model = Request(
        "GET", b"/", CIMultiDict([("x_consumer", "a"), ("X-Other", "d")]), Body.from_bytes(b"")
    )
    without_spellings(model, spellings)
    assert list(model.headers.items()) == [("X-Other", "d")]


BASE = """
listeners: [{bind: "127.0.0.1:0"}]
upstreams: {app: {endpoints: ["http://127.0.0.1:1"]}}
"""


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (
            "routes: [{match: {path_prefix: /adm%69n}, upstream: app}]",
            "'/adm%69n' can never match: requests are routed on their canonical path"
            " (write '/admin')",
        ),
        (
            "routes: [{match: {path: /a//b}, upstream: app}]",
            "(write '/a/b')",
        ),
        ("routes: [{match: {path: /a/%2Fb}, upstream: app}]", "escaped slash"),
        (
            "path_normalization: {escaped_slashes: drop}\nroutes: []",
            "unsupported action 'drop' (supported: reject, unescape, keep)",
        ),
        (
            "headers_with_underscores: keep\nroutes: []",
            "unsupported action 'keep' (supported: drop, reject, allow)",
        ),
    ],
)
def test_config_errors(document: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(BASE + document)


def test_route_paths_follow_the_configured_normalisation() -> None:
    config = parse_config(
        BASE + "path_normalization: {escaped_slashes: keep, merge_slashes: false}\n"
        "routes: [{match: {path: /a//b%2Fc}, upstream: app, forward_raw_path: true}]"
    )
    assert config.path_normalization == PathNormalization("keep", merge_slashes=False)
    assert config.routes[0].forward_raw_path
    assert parse_config(BASE + "routes: []").headers_with_underscores == "drop"
