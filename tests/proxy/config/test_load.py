"""routes.yaml loading and error reporting: the whole file, YAML itself, unknown and
missing keys, wrong types, and every error with its line and key path.

The values inside (durations, sizes, ${VAR}, addresses) are in test_values.py; the
sections in test_server.py and test_routes.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config.document import ConfigError
from proxy.config.load import load_config
from proxy.config.model import (
    DEFAULT_GRACE_PERIOD_S,
    AdminConfig,
    HeaderMatch,
    LimitsConfig,
    ListenerConfig,
    MatchConfig,
    QueryMatch,
    RewriteConfig,
)
from proxy.config.upstream_model import BalanceConfig, EndpointConfig, PoolConfig, UpstreamTimeouts
from tests.support.config_helpers import BASE, SOURCE, errors_of, one_error, parse, route_error

# The example from the brief, every section and feature at once.
FULL = r"""
listeners:
  - bind: 0.0.0.0:8080
    name: public
  - bind: "[::1]:0"
admin: {bind: 127.0.0.1:9901}
http1_parser: h11
workers: 2
shutdown: {grace_period: 45s}
limits: {max_head_bytes: 16KiB, max_body_size: 10MiB, header_timeout: 5s, body_timeout: 1m,
         keepalive_timeout: 250ms}
upstreams:
  users:
    endpoints:
      - http://127.0.0.1:8000
      - {url: http://127.0.0.1:8001, weight: 3}
    balance: round_robin
    timeouts: {connect: 1.5s, read: 1h}
    pool: {max_connections: 100, max_idle: 10, idle_timeout: 2s, wait_timeout: 500ms}
routes:
  - name: users-api
    match:
      host: API.Example.com
      path_prefix: /users
      methods: [get, POST]
      headers: {X-Env: prod, X-Ver: {regex: "v[12]"}, X-Debug: {present: true}}
      query: {debug: "1", v: {regex: "\\d+"}}
    upstream: users
    rewrite: {strip_prefix: /users, add_prefix: /v1, regex: "^/old/(.*)$",
              replacement: "/new/\\1", host: internal.example}
    max_body_size: 1MiB
"""


# --- the whole file ---


def test_full_example_parses_into_typed_frozen_objects() -> None:
    config = parse(FULL)

    assert config.listeners == (
        ListenerConfig("0.0.0.0", 8080, "public"),
        ListenerConfig("::1", 0, "listeners[1]"),
    )
    assert config.admin == AdminConfig("127.0.0.1", 9901)
    assert config.http1_parser == "h11"
    assert config.workers == 2
    assert config.grace_period == 45.0
    assert config.limits == LimitsConfig(16384, 10 * 1024 * 1024, 5.0, 60.0, 0.25)
    users = config.upstreams["users"]
    assert users.endpoints == (
        EndpointConfig("http://127.0.0.1:8000", "http", "127.0.0.1", 8000, 1),
        EndpointConfig("http://127.0.0.1:8001", "http", "127.0.0.1", 8001, 3),
    )
    assert users.balance == BalanceConfig()
    assert users.timeouts == UpstreamTimeouts(connect=1.5, read=3600.0)
    assert users.pool == PoolConfig(100, 10, 2.0, 0.5)
    (route,) = config.routes
    assert route.name == "users-api"
    assert route.upstream == "users"
    assert route.index == 0
    assert route.max_body_size == 1024 * 1024
    assert route.match == MatchConfig(
        host="api.example.com",
        path_prefix="/users",
        methods=("GET", "POST"),
        headers=(
            HeaderMatch("x-env", value="prod"),
            HeaderMatch("x-ver", regex="v[12]"),
            HeaderMatch("x-debug"),
        ),
        query=(QueryMatch("debug", value="1"), QueryMatch("v", regex=r"\d+")),
    )
    assert route.rewrite == RewriteConfig(
        "/users", "/v1", "^/old/(.*)$", r"/new/\1", "internal.example"
    )
    assert config.source == SOURCE


def test_config_objects_are_frozen() -> None:
    config = parse(FULL)

    with pytest.raises(AttributeError):
        config.workers = 3  # type: ignore[misc]


def test_optional_sections_take_their_defaults() -> None:
    config = parse(BASE + "routes: []\n")

    assert config.admin is None
    assert config.limits == LimitsConfig()
    assert config.http1_parser == "auto"
    assert config.workers is None
    assert config.grace_period == DEFAULT_GRACE_PERIOD_S
    assert config.routes == ()
    users = config.upstreams["users"]
    assert users.timeouts == UpstreamTimeouts()
    assert users.pool == PoolConfig()
    assert users.balance == BalanceConfig()


def test_load_config_reads_the_file_and_records_its_path(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(FULL, encoding="utf-8")

    config = load_config(str(path))

    assert config.source == str(path)
    assert config.routes[0].name == "users-api"


def test_load_config_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(BASE + "routes: []\nworkers: 0\n", encoding="utf-8")

    with pytest.raises(ConfigError) as info:
        load_config(str(path))

    assert info.value.errors == [f"{path}:5: workers: must be at least 1, got 0"]


def test_load_config_reports_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"

    with pytest.raises(ConfigError) as info:
        load_config(str(path))

    assert info.value.errors == [f"{path}:1: cannot read: No such file or directory"]


def test_load_config_reports_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_bytes(b"listeners:\n  - bind: \xff\n")

    with pytest.raises(ConfigError) as info:
        load_config(str(path))

    assert info.value.errors == [
        f"{path}:2: cannot read: not UTF-8 (invalid start byte at byte 21)"
    ]


def test_load_config_takes_env_like_parse_config(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(BASE + "routes: []\nworkers: ${N}\n", encoding="utf-8")

    assert load_config(str(path), env={"N": "3"}).workers == 3


def test_config_error_str_is_one_error_per_line() -> None:
    error = ConfigError(["a.yaml:1: x: bad", "a.yaml:2: y: worse"])

    assert str(error) == "a.yaml:1: x: bad\na.yaml:2: y: worse"
    assert error.errors == ["a.yaml:1: x: bad", "a.yaml:2: y: worse"]


# --- all errors at once ---


def test_a_file_with_several_mistakes_reports_all_of_them_in_line_order() -> None:
    text = """\
        listeners:
          - bind: 0.0.0.0:99999
        admin: {bind: 127.0.0.1:9901, tls: on}
        upstreams:
          users:
            endpoints: [http://127.0.0.1:8000]
            timeouts: {connect: 2 seconds}
          orders:
            endpoints: []
        limits: {max_body_size: -1MiB}
        routes:
          - {match: {path: /a}, upstream: users}
          - {match: {path: /b}, upstream: orders}
          - {match: {path: /c}, upstream: usres}
          - match: {path_prefix: users}
            upstrem: users
        workers: many
    """

    assert errors_of(text) == [
        "routes.yaml:2: listeners[0].bind: port 99999 is out of range 0..65535",
        "routes.yaml:3: admin.tls: unknown key 'tls' (expected one of: bind, token, hosts)",
        "routes.yaml:7: upstreams.users.timeouts.connect: invalid duration '2 seconds': '2' "
        "has no unit (e.g. '250ms', '5s', '1.5s', '2m', '1m30s', '1h', '1d' or a number of "
        "seconds)",
        "routes.yaml:9: upstreams.orders.endpoints: at least one endpoint is required",
        "routes.yaml:10: limits.max_body_size: invalid size '-1MiB': must not be negative",
        "routes.yaml:14: routes[2].upstream: unknown upstream 'usres' (did you mean 'users'?)",
        "routes.yaml:15: routes[3].match.path_prefix: must start with '/', got 'users'",
        "routes.yaml:16: routes[3].upstrem: unknown key 'upstrem' (did you mean 'upstream'?)",
        "routes.yaml:17: workers: expected an integer, got a string ('many')",
    ]


def test_errors_are_sorted_by_line_not_by_section() -> None:
    text = """\
        routes: [{match: {path: /}, upstream: nowhere}]
        upstreams: {users: {endpoints: [ftp://x]}}
        listeners: [{bind: nowhere}]
    """

    assert [error.split(":")[1] for error in errors_of(text)] == ["1", "2", "3"]


def test_every_error_is_a_single_line() -> None:
    errors = errors_of(BASE + "routes: [{match: {path_regex: '(\\n'}, upstream: users}]\n")

    assert all("\n" not in error for error in errors)


# --- YAML itself ---


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_an_empty_file_is_an_error(text: str) -> None:
    assert one_error(text) == (
        "routes.yaml:1: empty config (expected listeners, upstreams and routes)"
    )


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("- a\n- b\n", "a list"),
        ("just text\n", "a string ('just text')"),
        ("42\n", "an integer (42)"),
    ],
)
def test_a_top_level_that_is_not_a_mapping_is_an_error(text: str, found: str) -> None:
    assert one_error(text) == (
        f"routes.yaml:1: the top level must be a mapping (listeners, ...), not {found}"
    )


def test_a_top_level_env_reference_that_is_unset_is_reported() -> None:
    assert one_error("${CONFIG}\n") == ("routes.yaml:1: environment variable 'CONFIG' is not set")


def test_a_yaml_syntax_error_names_its_line() -> None:
    assert one_error(BASE + "routes: [\n  {match: {}, upstream: users}\n") == (
        "routes.yaml:6: invalid YAML: expected ',' or ']', but got '<stream end>'"
    )


def test_a_tab_indent_is_a_yaml_error() -> None:
    assert one_error(BASE + "routes:\n\t- x\n").startswith("routes.yaml:5: invalid YAML: ")


def test_several_yaml_documents_are_an_error() -> None:
    assert one_error(BASE + "routes: []\n---\nworkers: 1\n") == (
        "routes.yaml:5: invalid YAML: expected a single document in the stream, "
        "but found another document"
    )


def test_a_character_yaml_forbids_is_an_error_on_its_line() -> None:
    assert one_error(BASE + "routes: []\nworkers: \x07\n").startswith(
        "routes.yaml:5: invalid YAML: unacceptable character"
    )


def test_duplicate_keys_are_errors_at_the_second_occurrence() -> None:
    text = (
        BASE
        + "routes: []\nworkers: 1\nupstreams: {}\n"
        + "limits: {header_timeout: 1s, header_timeout: 2s}\n"
    )

    assert errors_of(text) == [
        "routes.yaml:6: upstreams: duplicate key 'upstreams' (first at line 2)",
        "routes.yaml:7: limits.header_timeout: duplicate key 'header_timeout' (first at line 7)",
    ]


def test_duplicate_upstream_names_are_errors() -> None:
    text = BASE + "  users: {endpoints: [http://other:80]}\nroutes: []\n"

    assert (
        one_error(text) == "routes.yaml:4: upstreams.users: duplicate key 'users' (first at line 3)"
    )


def test_anchors_aliases_and_merge_keys_are_supported() -> None:
    text = """\
        listeners: [{bind: ":0"}]
        upstreams:
          a: &base
            endpoints: [http://a:1]
            timeouts: &slow {connect: 9s, read: 90s}
          b:
            <<: *base
            endpoints: [http://b:1]
          c:
            endpoints: [http://c:1]
            timeouts: *slow
        routes: []
    """

    upstreams = parse(text).upstreams

    assert upstreams["b"].endpoints[0].host == "b"  # an explicit key beats the merged one
    assert upstreams["b"].timeouts == UpstreamTimeouts(9.0, 90.0)
    assert upstreams["c"].timeouts == UpstreamTimeouts(9.0, 90.0)


def test_merging_something_other_than_a_mapping_is_an_error() -> None:
    text = BASE + "routes: []\nlimits: {<<: [1]}\n"

    assert one_error(text) == (
        "routes.yaml:5: limits: expected a mapping to merge with '<<', got an integer (1)"
    )


def test_a_recursive_alias_is_an_error_not_a_loop() -> None:
    text = BASE + "routes: []\nlimits: &l {<<: *l}\n"

    assert one_error(text) == (
        "routes.yaml:5: invalid YAML: alias *l is inside the node it refers to (a cycle)"
    )


def test_an_unsupported_tag_is_an_error() -> None:
    assert one_error(BASE + "routes: !!binary aGk=\n") == (
        "routes.yaml:4: routes: unsupported YAML tag '!!binary'"
    )


def test_a_non_scalar_key_is_an_error() -> None:
    assert one_error(BASE + "routes: []\nlimits: {? [a] : 1}\n") == (
        "routes.yaml:5: limits: expected a string key, got a list"
    )


def test_a_key_that_needs_quoting_is_shown_quoted_in_the_path() -> None:
    text = BASE + "  'users.v2': {endpoints: [http://x:1]}\n  v3: {endpoints: [2]}\nroutes: []\n"

    assert errors_of(text) == [
        "routes.yaml:5: upstreams.v3.endpoints[0]: expected a URL like 'http://host:port', or a "
        "mapping with url and weight, got an integer (2); quote it to use it as text",
    ]
    assert (
        "users.v2"
        in parse(BASE + "  'users.v2': {endpoints: [http://x:1]}\nroutes: []\n").upstreams
    )


# --- unknown keys and missing keys ---


def test_an_unknown_key_suggests_the_closest_known_key() -> None:
    assert route_error("match: {path: /}\nupstrem: users\n") == (
        "routes.yaml:6: routes[0].upstrem: unknown key 'upstrem' (did you mean 'upstream'?)"
    )


def test_an_unknown_top_level_key_suggests_the_closest_known_key() -> None:
    assert one_error(BASE + "routes: []\nlimit: {}\n") == (
        "routes.yaml:5: limit: unknown key 'limit' (did you mean 'limits'?)"
    )


def test_an_unknown_key_with_nothing_close_lists_the_known_keys() -> None:
    assert one_error(BASE + "routes: []\nshutdown: {zzz: 1}\n") == (
        "routes.yaml:5: shutdown.zzz: unknown key 'zzz' (expected one of: grace_period)"
    )


def test_missing_top_level_keys_are_reported_at_line_1() -> None:
    assert errors_of("workers: 1\n") == [
        "routes.yaml:1: missing required key 'listeners'",
        "routes.yaml:1: missing required key 'upstreams'",
        "routes.yaml:1: missing required key 'routes'",
    ]


def test_a_missing_key_is_reported_at_its_mapping() -> None:
    assert route_error("name: r\nmatch: {path: /}\n") == (
        "routes.yaml:5: routes[0]: missing required key 'upstream' (or give redirect or respond)"
    )


def test_a_misspelt_required_key_is_reported_once() -> None:
    errors = errors_of("listeners: [{bnd: ':1'}]\nupstreams: {}\nroutes: []\n")

    assert errors == [
        "routes.yaml:1: listeners[0].bnd: unknown key 'bnd' (did you mean 'bind'?)",
    ]


# --- types ---


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ("workers: many", "workers: expected an integer, got a string ('many')"),
        ("workers: 1.5", "workers: expected an integer, got a number (1.5)"),
        ("workers: true", "workers: expected an integer, got a boolean (true)"),
        ("limits: null", "limits: expected a mapping, got null"),
        ("limits: [1]", "limits: expected a mapping, got a list"),
        ("admin: {bind: [1]}", "admin.bind: expected an address like '0.0.0.0:8080', got a list"),
        (
            "limits: {header_timeout: [1]}",
            "limits.header_timeout: expected a duration like '5s' or '250ms', got a list",
        ),
        (
            "limits: {max_body_size: 1.5}",
            "limits.max_body_size: expected a size like '16KiB' or '10MB', got a number (1.5)",
        ),
        (
            "http1_parser: 1",
            "http1_parser: expected a string, got an integer (1); quote it to use it as text",
        ),
    ],
)
def test_a_wrong_type_names_what_was_expected(extra: str, error: str) -> None:
    assert one_error(BASE + "routes: []\n" + extra + "\n") == f"routes.yaml:5: {error}"


def test_a_list_where_a_mapping_is_expected_is_an_error() -> None:
    assert one_error(
        BASE.replace("upstreams:\n  users:", "upstreams:\n  - users:") + "routes: []\n"
    ) == ("routes.yaml:3: upstreams: expected a mapping, got a list")


def test_routes_must_be_a_list() -> None:
    assert (
        one_error(BASE + "routes: {a: 1}\n")
        == "routes.yaml:4: routes: expected a list, got a mapping"
    )


def test_a_quoted_number_is_a_string_where_a_number_is_expected() -> None:
    assert one_error(BASE + "routes: []\nworkers: '2'\n") == (
        "routes.yaml:5: workers: expected an integer, got a string ('2')"
    )
