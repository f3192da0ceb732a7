"""`api_key`: options and their errors (file:line), keys files, hashed storage, and what a
request looks like after it (key stripped, consumer set, spoofed consumer removed)."""

from __future__ import annotations

import hashlib
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest
from multidict import CIMultiDict

from metrics.definitions import REGISTRY
from middleware.api_key import ApiKey, take_query_parameter
from proxy.config.document import ConfigError
from proxy.config.load import parse_config
from proxy.core.body import Body
from proxy.core.errors import Forbidden, Unauthorized
from proxy.core.models import Request, Response

HEAD = """\
listeners: [{bind: 127.0.0.1:0}]
upstreams: {app: {endpoints: ["http://127.0.0.1:9"]}}
routes: [{match: {path_prefix: /}, upstream: app, middleware: [keys]}]
middleware:
"""  # the `keys` instance's options start on line 6


def api_key(options: str, env: dict[str, str] | None = None) -> ApiKey:
    """The `keys` instance built from `options` (YAML lines under `keys:`)."""
    body = "  keys:\n    type: api_key\n" + textwrap.indent(textwrap.dedent(options), "    ")
    instance = parse_config(HEAD + body, env=env or {}).middleware["keys"].instance
    assert isinstance(instance, ApiKey)
    return instance


def errors_of(options: str, env: dict[str, str] | None = None) -> list[str]:
    body = "  keys:\n    type: api_key\n" + textwrap.indent(textwrap.dedent(options), "    ")
    with pytest.raises(ConfigError) as failed:
        parse_config(HEAD + body, env=env or {})
    return failed.value.errors


def request(target: bytes, headers: Sequence[tuple[str, str]] = ()) -> Request:
    return Request("GET", target, CIMultiDict(headers), Body.from_bytes(b""))


class Upstream:
    """The rest of the chain: records the request it was given."""

    def __init__(self) -> None:
        self.seen: list[Request] = []

    async def __call__(self, request: Request) -> Response:
        self.seen.append(request)
        return Response(200)


def failures(name: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "gatehouse_auth_failures_total", {"middleware": name, "reason": reason}
    )
    return value or 0.0


# -- storage --------------------------------------------------------------------------------


def test_keys_are_kept_only_as_sha256_digests() -> None:
    instance = api_key(
        """\
        keys:
          - plain-secret-1
          - {key: "${SECRET}", consumer: billing}
        """,
        env={"SECRET": "env-secret-2"},
    )
    assert instance._keys == {
        hashlib.sha256(b"plain-secret-1").digest(): "",
        hashlib.sha256(b"env-secret-2").digest(): "billing",
    }
    # Every attribute (dir(): a compiled instance has slots, not a __dict__).
    everything = repr([getattr(instance, name, None) for name in dir(instance)])
    assert "plain-secret-1" not in everything
    assert "env-secret-2" not in everything


def test_a_single_string_is_a_list_of_one_key() -> None:
    instance = api_key('keys: "${K}"\n', env={"K": "only"})
    assert instance.key_count == 1


# -- per request ----------------------------------------------------------------------------


async def test_header_key_sets_the_consumer_strips_the_key_and_replaces_a_spoofed_one() -> None:
    instance = api_key("keys: [{key: s3cret, consumer: alice}]\n")
    upstream = Upstream()
    sent = request(
        b"/x",
        [("X-API-Key", "s3cret"), ("X-Consumer", "admin"), ("x-consumer", "root")],
    )
    response = await instance(sent, upstream)
    assert response.status == 200
    (seen,) = upstream.seen
    assert seen.consumer == "alice"
    assert "X-API-Key" not in seen.headers
    assert seen.headers.getall("X-Consumer") == ["alice"]


async def test_raw_headers_stay_raw_bytes() -> None:
    # The front ends hand over the parser's byte pairs; reading them as a CIMultiDict
    # would cost every later hop the fast serializer.
    instance = api_key("keys: [{key: k, consumer: alice}]\n")
    upstream = Upstream()
    raw = [(b"Host", b"h"), (b"x-api-key", b"k"), (b"X-CONSUMER", b"evil"), (b"A", b"1")]
    await instance(Request("GET", b"/", raw, Body.from_bytes(b""), host="h"), upstream)
    assert upstream.seen[0].raw_headers == [
        (b"Host", b"h"),
        (b"A", b"1"),
        (b"X-Consumer", b"alice"),
    ]


async def test_a_key_without_consumer_removes_the_clients_consumer_header() -> None:
    instance = api_key("keys: [anonymous-key]\n")
    upstream = Upstream()
    await instance(request(b"/", [("X-API-Key", "anonymous-key"), ("X-Consumer", "x")]), upstream)
    assert upstream.seen[0].consumer == ""
    assert "X-Consumer" not in upstream.seen[0].headers


async def test_custom_header_and_consumer_header() -> None:
    instance = api_key("""\
        header: Authorization-Key
        consumer_header: X-Caller
        keys: [{key: k, consumer: bob}]
        """)
    upstream = Upstream()
    sent = request(b"/", [("authorization-key", "k"), ("X-Consumer", "kept")])
    await instance(sent, upstream)
    headers = upstream.seen[0].headers
    assert headers["X-Caller"] == "bob"
    assert headers["X-Consumer"] == "kept"  # not the configured header: not ours to touch
    assert "Authorization-Key" not in headers


async def test_consumer_header_can_be_turned_off() -> None:
    instance = api_key('consumer_header: ""\nkeys: [{key: k, consumer: bob}]\n')
    upstream = Upstream()
    await instance(request(b"/", [("X-API-Key", "k"), ("X-Consumer", "theirs")]), upstream)
    assert upstream.seen[0].headers["X-Consumer"] == "theirs"
    assert upstream.seen[0].consumer == "bob"


async def test_missing_key_is_401_with_a_challenge_and_counted() -> None:
    instance = api_key("realm: billing-api\nkeys: [k]\n")
    before = failures("keys", "missing")
    for headers in ([], [("X-API-Key", "")]):
        with pytest.raises(Unauthorized) as refused:
            await instance(request(b"/", headers), Upstream())
        assert refused.value.status == 401
        assert refused.value.challenge == 'ApiKey realm="billing-api"'
    assert failures("keys", "missing") == before + 2


async def test_wrong_key_is_403_and_counted() -> None:
    instance = api_key("keys: [right]\n")
    before = failures("keys", "invalid")
    with pytest.raises(Forbidden) as refused:
        await instance(request(b"/", [("X-API-Key", "wrong")]), Upstream())
    assert refused.value.status == 403
    assert failures("keys", "invalid") == before + 1


async def test_two_keys_in_one_request_are_refused() -> None:
    instance = api_key("keys: [a, b]\n")
    with pytest.raises(Forbidden):
        await instance(request(b"/", [("X-API-Key", "a"), ("X-API-Key", "b")]), Upstream())


async def test_query_key_is_cut_out_of_target_path_and_query() -> None:
    instance = api_key("query: api_key\nkeys: [{key: q-key, consumer: carol}]\n")
    upstream = Upstream()
    sent = request(b"/a/b?x=1&api_key=q-key&y=%20two")
    await instance(sent, upstream)
    seen = upstream.seen[0]
    assert seen.consumer == "carol"
    assert seen.target == b"/a/b?x=1&y=%20two"
    assert (seen.path, seen.query) == ("/a/b", "x=1&y=%20two")
    assert str(seen.url) == "http://localhost/a/b?x=1&y=%20two"


async def test_query_key_alone_leaves_no_question_mark() -> None:
    instance = api_key("query: api_key\nkeys: [k]\n")
    upstream = Upstream()
    await instance(request(b"/p?api_key=k"), upstream)
    seen = upstream.seen[0]
    assert (seen.target, seen.path, seen.query) == (b"/p", "/p", "")


async def test_header_wins_over_query_and_both_are_stripped() -> None:
    instance = api_key("query: api_key\nkeys: [{key: h, consumer: from-header}, q]\n")
    upstream = Upstream()
    await instance(request(b"/p?api_key=q&z=1", [("X-API-Key", "h")]), upstream)
    seen = upstream.seen[0]
    assert seen.consumer == "from-header"
    assert seen.target == b"/p?z=1"
    assert "X-API-Key" not in seen.headers


async def test_query_only_when_header_is_off() -> None:
    instance = api_key('header: ""\nquery: key\nkeys: [k]\n')
    upstream = Upstream()
    with pytest.raises(Unauthorized):
        await instance(request(b"/", [("X-API-Key", "k")]), upstream)
    await instance(request(b"/?key=k"), upstream)
    assert upstream.seen[0].headers == CIMultiDict()


async def test_a_percent_encoded_query_key_is_found_and_stripped() -> None:
    instance = api_key("query: api_key\nkeys: ['a+b/c']\n")
    upstream = Upstream()
    await instance(request(b"/?api%5Fkey=a%2Bb%2Fc&n=1"), upstream)
    assert upstream.seen[0].target == b"/?n=1"


def test_take_query_parameter_decodes_like_a_form_and_keeps_the_rest_byte_for_byte() -> None:
    assert take_query_parameter("a=1&key=x+y&b=%41&key=z&&c", b"key") == (
        [b"x y", b"z"],
        "a=1&b=%41&&c",
    )
    assert take_query_parameter("a=1&keyx=2", b"key") == ([], None)
    assert take_query_parameter("key", b"key") == ([b""], "")
    assert take_query_parameter("k%C3%A9y=%C3%A9", "kéy".encode()) == ([b"\xc3\xa9"], "")


# -- keys files -----------------------------------------------------------------------------


async def test_keys_file_with_consumers_comments_and_inline_keys(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(
        "# team keys\n"
        "\n"
        "file-key-1 alice\n"
        "  file-key-2\tbob   # rotated 2026-01\n"
        "file-key-3  # no consumer\n"
    )
    instance = api_key(f"keys: [inline]\nkeys_file: {keys}\n")
    assert instance.key_count == 4
    for key, consumer in [("file-key-1", "alice"), ("file-key-2", "bob"), ("file-key-3", "")]:
        upstream = Upstream()
        await instance(request(b"/", [("X-API-Key", key)]), upstream)
        assert upstream.seen[0].consumer == consumer


def test_keys_file_errors_name_the_file_line(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("good\ntoo many fields here\ndup-key\ndup-key x\nk bad\x7fname\n")
    assert errors_of(f"keys: [good]\nkeys_file: {keys}\n") == [
        f"<string>:8: middleware.keys.keys_file: {keys}:1: duplicate key (first at line 7)",
        f"<string>:8: middleware.keys.keys_file: {keys}:2: expected 'KEY' or 'KEY CONSUMER', "
        "got 4 fields",
        f"<string>:8: middleware.keys.keys_file: {keys}:4: duplicate key (first at {keys}:3)",
        f"<string>:8: middleware.keys.keys_file: {keys}:5: consumer 'bad\\x7fname' must be "
        "1-128 visible ASCII characters, no spaces",
    ]


def test_unreadable_and_empty_keys_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    assert errors_of(f"keys_file: {missing}\n") == [
        f"<string>:7: middleware.keys.keys_file: cannot read '{missing}': No such file or directory"
    ]
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\n")
    assert errors_of(f"keys_file: {binary}\n") == [
        f"<string>:7: middleware.keys.keys_file: cannot read '{binary}': "
        "not UTF-8 (invalid start byte)"
    ]
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n")
    assert errors_of(f"keys_file: {empty}\n") == [
        "<string>:6: middleware.keys: no keys: give 'keys' or 'keys_file'"
    ]


# -- option errors --------------------------------------------------------------------------


def test_inline_key_errors_have_lines_and_never_quote_the_key() -> None:
    errors = errors_of("""\
        keys:
          - top-secret
          - {key: top-secret, consumer: other}
          - ""
          - " padded "
          - {consumer: nokey}
          - {key: k2, consumer: "two words"}
          - {key: k3, consumr: x}
          - [nested]
        """)
    assert errors == [
        "<string>:9: middleware.keys.keys[1]: duplicate key (first at line 8)",
        "<string>:10: middleware.keys.keys[2]: a key must not be empty",
        "<string>:11: middleware.keys.keys[3]: a key must not start or end with whitespace "
        "(clients cannot send it)",
        "<string>:12: middleware.keys.keys[4]: missing required key 'key'",
        "<string>:13: middleware.keys.keys[5]: consumer 'two words' must be 1-128 visible "
        "ASCII characters, no spaces",
        "<string>:14: middleware.keys.keys[6].consumr: unknown key 'consumr' "
        "(did you mean 'consumer'?)",
        "<string>:15: middleware.keys.keys[7]: expected a string, got a list",
    ]
    assert not any("top-secret" in error for error in errors)


def test_option_errors() -> None:
    assert errors_of("""\
        header: "X API Key"
        query: "api key"
        consumer_header: "X:Consumer"
        realm: 'say "hi"'
        keys: {a: b}
        kyes: [x]
        """) == [
        "<string>:7: middleware.keys.header: 'X API Key' is not a valid header name",
        "<string>:8: middleware.keys.query: a parameter name is letters, digits and '._~-'",
        "<string>:9: middleware.keys.consumer_header: 'X:Consumer' is not a valid header name",
        "<string>:10: middleware.keys.realm: must be printable ASCII without '\"' or '\\'",
        "<string>:11: middleware.keys.keys: expected a list, got a mapping",
        "<string>:12: middleware.keys.kyes: unknown key 'kyes' (did you mean 'keys'?)",
    ]


def test_a_key_source_is_needed() -> None:
    assert errors_of('header: ""\nkeys: [k]\n') == [
        "<string>:7: middleware.keys.header: give a header or a query parameter to read "
        "the key from"
    ]
    assert errors_of("realm: r\n") == [
        "<string>:6: middleware.keys: no keys: give 'keys' or 'keys_file'"
    ]


def test_an_unset_environment_variable_is_reported_at_its_key() -> None:
    assert errors_of('keys: ["${NOPE}"]\n') == [
        "<string>:7: middleware.keys.keys[0]: environment variable 'NOPE' is not set"
    ]
