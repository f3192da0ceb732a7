"""routes.yaml loading: every feature, and every error with its line and key path."""

from __future__ import annotations

import math
from pathlib import Path
from textwrap import dedent

import pytest

from proxy.config import (
    DEFAULT_GRACE_PERIOD_S,
    AdminConfig,
    Config,
    ConfigError,
    EndpointConfig,
    HeaderMatch,
    LimitsConfig,
    ListenerConfig,
    MatchConfig,
    PoolConfig,
    QueryMatch,
    RewriteConfig,
    UpstreamTimeouts,
    load_config,
    parse_config,
)
from proxy.config_values import (
    ConfigValueError,
    format_duration,
    format_size,
    parse_bind,
    parse_duration,
    parse_endpoint_url,
    parse_host_pattern,
    parse_size,
    substitute_env,
)

SOURCE = "routes.yaml"

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

# The smallest valid file; tests append a `routes:` section or other keys to it.
BASE = """\
listeners: [{bind: ":0"}]
upstreams:
  users: {endpoints: [http://127.0.0.1:8000]}
"""


def parse(text: str, env: dict[str, str] | None = None) -> Config:
    return parse_config(dedent(text), source=SOURCE, env=env or {})


def errors_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text, env)
    return info.value.errors


def one_error(text: str, env: dict[str, str] | None = None) -> str:
    errors = errors_of(text, env)
    assert len(errors) == 1, errors
    return errors[0]


def routes(text: str) -> str:
    """BASE plus a `routes:` section given as an indented block."""
    return BASE + "routes:\n" + dedent(text)


def route_error(route_lines: str) -> str:
    """The one error of a file whose single route is `route_lines` (starting at line 5)."""
    return one_error(routes("  - " + dedent(route_lines).strip().replace("\n", "\n    ")))


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
    assert users.balance == "round_robin"
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
    assert users.balance == "round_robin"


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

    assert info.value.errors == [f"{path}: cannot read: No such file or directory"]


def test_load_config_reports_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_bytes(b"listeners: \xff\n")

    with pytest.raises(ConfigError) as info:
        load_config(str(path))

    assert info.value.errors[0].startswith(f"{path}: cannot read: not UTF-8")


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
        "routes.yaml:3: admin.tls: unknown key 'tls' (expected one of: bind)",
        "routes.yaml:7: upstreams.users.timeouts.connect: invalid duration '2 seconds' (e.g. "
        "'250ms', '5s', '1.5s', '2m', '1h' or a number of seconds)",
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


def test_a_recursive_alias_does_not_loop() -> None:
    text = BASE + "routes: []\nlimits: &l {<<: *l}\n"

    assert parse(text).limits == LimitsConfig()


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
        "routes.yaml:5: routes[0]: missing required key 'upstream'"
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


# --- ${VAR} substitution ---


def test_env_variables_are_substituted_in_string_values() -> None:
    route = parse(
        routes("  - {name: '${TEAM}-api', match: {path: /}, upstream: users}\n"), {"TEAM": "core"}
    ).routes[0]

    assert route.name == "core-api"


def test_env_default_is_used_when_the_variable_is_unset_or_empty() -> None:
    text = routes(
        """\
        - {name: "${A:-first}", match: {path: /a}, upstream: users}
        - {name: "${B:-second}", match: {path: /b}, upstream: users}
        - {name: "${C:-third}", match: {path: /c}, upstream: users}
        """
    )

    names = [route.name for route in parse(text, {"B": "", "C": "set"}).routes]

    assert names == ["first", "second", "set"]


def test_env_default_may_be_empty_or_contain_colons() -> None:
    text = routes("  - {name: 'x${E:-}', match: {path: /}, upstream: users}\n")
    assert parse(text).routes[0].name == "x"
    assert parse(
        BASE + "routes: []\nadmin: {bind: '${ADMIN:-127.0.0.1:9901}'}\n"
    ).admin == AdminConfig("127.0.0.1", 9901)


def test_a_missing_env_variable_is_an_error_naming_its_line_and_key() -> None:
    assert one_error(BASE + "routes: []\nadmin:\n  bind: ${ADMIN_BIND}\n") == (
        "routes.yaml:6: admin.bind: environment variable 'ADMIN_BIND' is not set"
    )


def test_each_missing_env_variable_is_reported() -> None:
    assert errors_of(BASE + "routes: []\nadmin: {bind: '${HOST}:${PORT}'}\n") == [
        "routes.yaml:5: admin.bind: environment variable 'HOST' is not set",
        "routes.yaml:5: admin.bind: environment variable 'PORT' is not set",
    ]


def test_dollar_dollar_brace_is_a_literal_dollar_brace() -> None:
    text = routes("  - {name: 'cost-$${X}-$$y', match: {path: /}, upstream: users}\n")

    assert parse(text, {"X": "no"}).routes[0].name == "cost-${X}-$$y"


def test_env_values_are_inserted_as_is_not_substituted_again() -> None:
    text = routes("  - {name: '${A}', match: {path: /}, upstream: users}\n")

    assert parse(text, {"A": "${B}"}).routes[0].name == "${B}"


@pytest.mark.parametrize("quote", ["", "'"])
def test_env_values_are_typed_where_a_number_is_expected(quote: str) -> None:
    text = BASE + f"routes: []\nworkers: {quote}${{W:-3}}{quote}\n"

    assert parse(text).workers == 3
    assert parse(text, {"W": "8"}).workers == 8


def test_env_values_stay_text_where_a_string_is_expected() -> None:
    text = routes("  - {name: '${N}', match: {path: /}, upstream: users}\n")

    assert parse(text, {"N": "yes"}).routes[0].name == "yes"


def test_an_env_value_of_the_wrong_type_is_an_error() -> None:
    assert one_error(BASE + "routes: []\nworkers: ${W}\n", {"W": "lots"}) == (
        "routes.yaml:5: workers: expected an integer, got a string ('lots')"
    )


def test_an_unterminated_reference_is_an_error() -> None:
    assert one_error(BASE + "routes: []\nadmin: {bind: '${PORT'}\n") == (
        "routes.yaml:5: admin.bind: unterminated '${' (write '$${' for a literal '${')"
    )


@pytest.mark.parametrize("reference", ["${}", "${1X}", "${A-B}", "${A:=b}"])
def test_a_malformed_reference_is_an_error(reference: str) -> None:
    assert one_error(BASE + f"routes: []\nadmin: {{bind: '{reference}'}}\n") == (
        f"routes.yaml:5: admin.bind: invalid environment variable reference '{reference}'"
    )


def test_keys_are_not_substituted() -> None:
    config = parse(BASE.replace("users:", "${NAME}:") + "routes: []\n", {"NAME": "x"})

    assert list(config.upstreams) == ["${NAME}"]


def test_parse_config_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEHOUSE_TEST_WORKERS", "5")

    config = parse_config(BASE + "routes: []\nworkers: ${GATEHOUSE_TEST_WORKERS}\n")

    assert config.workers == 5
    assert config.source == "<string>"


def test_substitute_env_returns_text_and_problems() -> None:
    assert substitute_env("a${X}b${Y:-y}c", {"X": "1"}) == ("a1byc", [])
    assert substitute_env("${X}", {}) == ("${X}", ["environment variable 'X' is not set"])
    assert substitute_env("${X:-${Y}}", {})[1] == [
        "nested '${' in the default of '${X:-${Y}' is not supported"
    ]


# --- durations and sizes ---


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("5s", 5.0),
        ("1.5s", 1.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("10", 10.0),
        ("0", 0.0),
        (".5s", 0.5),
        ("1ms", 0.001),
        (3, 3.0),
        (0.75, 0.75),
    ],
)
def test_parse_duration_reads_units_and_bare_seconds(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("-1s", "invalid duration '-1s': must not be negative"),
        (-1, "invalid duration -1: must not be negative"),
        ("5x", "invalid duration '5x' (e.g."),
        ("s", "invalid duration 's' (e.g."),
        ("", "invalid duration '' (e.g."),
        ("1 s", "invalid duration '1 s' (e.g."),
        ("1e3", "invalid duration '1e3' (e.g."),
        ("1h30m", "invalid duration '1h30m' (e.g."),
        (math.inf, "invalid duration inf: must be a finite number"),
        (math.nan, "invalid duration nan: must be a finite number"),
        ("9" * 400 + "h", "too large"),
    ],
)
def test_parse_duration_rejects_malformed_values(text: str | float, message: str) -> None:
    with pytest.raises(ConfigValueError) as info:
        parse_duration(text)

    assert message in str(info.value)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("16KiB", 16 * 1024),
        ("1MiB", 1024**2),
        ("1GiB", 1024**3),
        ("2TiB", 2 * 1024**4),
        ("10KB", 10_000),
        ("10MB", 10_000_000),
        ("1GB", 10**9),
        ("512B", 512),
        ("512", 512),
        ("16kib", 16 * 1024),
        ("1.5KiB", 1536),
        ("0.5KB", 500),
        (100, 100),
        (0, 0),
    ],
)
def test_parse_size_reads_binary_and_decimal_units(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("-1KiB", "invalid size '-1KiB': must not be negative"),
        (-5, "invalid size -5: must not be negative"),
        ("10XB", "invalid size '10XB': unknown unit 'XB'"),
        ("KiB", "invalid size 'KiB' (e.g."),
        ("1.1B", "invalid size '1.1B': not a whole number of bytes"),
        ("1 KiB", "invalid size '1 KiB' (e.g."),
    ],
)
def test_parse_size_rejects_malformed_values(text: str | int, message: str) -> None:
    with pytest.raises(ConfigValueError) as info:
        parse_size(text)

    assert message in str(info.value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (7200.0, "2h"),
        (90.0, "90s"),
        (120.0, "2m"),
        (0.25, "250ms"),
        (1e-05, "0.00001s"),
    ],
)
def test_format_duration_picks_the_shortest_exact_unit(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0B"), (1000, "1000B"), (16384, "16KiB"), (3 * 1024**2, "3MiB"), (1024**3, "1GiB")],
)
def test_format_size_picks_the_largest_exact_binary_unit(size: int, text: str) -> None:
    assert format_size(size) == text


def test_durations_and_sizes_accept_bare_numbers_in_yaml() -> None:
    text = (
        BASE + "routes: []\nlimits: {header_timeout: 3, body_timeout: 0.5, max_body_size: 2048}\n"
    )

    limits = parse(text).limits

    assert (limits.header_timeout, limits.body_timeout, limits.max_body_size) == (3.0, 0.5, 2048)


@pytest.mark.parametrize(
    "extra",
    [
        "limits: {header_timeout: 0s}",
        "limits: {body_timeout: 0}",
        "limits: {max_head_bytes: 0}",
        "upstreams: {users: {endpoints: [http://x:1], timeouts: {connect: 0ms}}}",
    ],
)
def test_timeouts_and_head_limit_must_be_greater_than_zero(extra: str) -> None:
    text = "listeners: [{bind: ':0'}]\nroutes: []\n" + (
        "" if "upstreams" in extra else "upstreams: {}\n"
    )

    assert one_error(text + extra + "\n").endswith(": must be greater than 0")


def test_zero_is_allowed_where_it_means_something() -> None:
    text = (
        BASE
        + "routes: []\nshutdown: {grace_period: 0}\n"
        + "limits: {max_body_size: 0, keepalive_timeout: 0s}\n"
    )

    config = parse(text)

    assert (config.grace_period, config.limits.max_body_size, config.limits.keepalive_timeout) == (
        0,
        0,
        0,
    )


def test_max_body_size_null_means_unlimited() -> None:
    config = parse(routes("  - {match: {path: /}, upstream: users, max_body_size: null}\n"))

    assert config.routes[0].max_body_size is None


# --- listeners and bind addresses ---


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("0.0.0.0:8080", ("0.0.0.0", 8080)),
        ("127.0.0.1:65535", ("127.0.0.1", 65535)),
        (":8080", ("0.0.0.0", 8080)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:9000", ("::1", 9000)),
        ("[::]:80", ("::", 80)),
    ],
)
def test_parse_bind_reads_host_and_port(text: str, address: tuple[str, int]) -> None:
    assert parse_bind(text) == address


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("8080", "invalid bind address '8080' (expected 'host:port', '[ipv6]:port' or ':port')"),
        ("::1:80", "write IPv6 addresses in brackets, as '[::1]:8080'"),
        ("[::1]80", "invalid bind address '[::1]80'"),
        ("[::1:80", "invalid bind address '[::1:80'"),
        ("[nope]:80", "invalid IPv6 address 'nope'"),
        ("host:", "invalid port ''"),
        ("host:http", "invalid port 'http'"),
        ("host:-1", "invalid port '-1'"),
        ("host:65536", "port 65536 is out of range 0..65535"),
        ("bad host:80", "invalid host 'bad host'"),
    ],
)
def test_parse_bind_rejects_malformed_addresses(text: str, message: str) -> None:
    with pytest.raises(ConfigValueError) as info:
        parse_bind(text)

    assert message in str(info.value)


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


# --- upstreams ---


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("http://127.0.0.1:8000", ("http", "127.0.0.1", 8000, "http://127.0.0.1:8000")),
        ("http://Users-1", ("http", "users-1", 80, "http://users-1:80")),
        ("HTTP://users:81/", ("http", "users", 81, "http://users:81")),
        ("http://[::1]:8080", ("http", "::1", 8080, "http://[::1]:8080")),
        ("http://[::1]", ("http", "::1", 80, "http://[::1]:80")),
    ],
)
def test_parse_endpoint_url_reads_origin(text: str, parsed: tuple[str, str, int, str]) -> None:
    assert parse_endpoint_url(text) == parsed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("https://x", "unsupported scheme 'https' in 'https://x' (only http://)"),
        ("users:8000", "expected a URL like 'http://host:port'"),
        ("http://x/api", "a path is not allowed (use the route's rewrite.add_prefix)"),
        ("http://x?a=1", "a query or fragment is not allowed"),
        ("http://u:p@x", "credentials in the URL are not allowed"),
        ("http://:80", "missing host"),
        ("http://x:0", "port 0 is out of range 1..65535"),
        ("http://x:99999", "port 99999 is out of range 1..65535"),
        ("http://x:http", "invalid port 'http'"),
        ("http://[::1", "invalid endpoint 'http://[::1'"),
        ("http://[zz]:1", "invalid endpoint 'http://[zz]:1': 'zz' does not appear to be an IPv4"),
        ("http://a b:1", "invalid host 'a b'"),
    ],
)
def test_parse_endpoint_url_rejects_what_we_cannot_connect_to(text: str, message: str) -> None:
    with pytest.raises(ConfigValueError) as info:
        parse_endpoint_url(text)

    assert message in str(info.value)


def test_endpoint_errors_name_the_endpoint() -> None:
    text = """\
        listeners: [{bind: ':0'}]
        upstreams:
          users:
            endpoints:
              - https://a
              - {url: http://b, weight: 0}
              - {weight: 2}
              - http://b:80
        routes: []
    """

    assert errors_of(text) == [
        "routes.yaml:5: upstreams.users.endpoints[0]: unsupported scheme 'https' in "
        "'https://a' (only http://)",
        "routes.yaml:6: upstreams.users.endpoints[1].weight: must be at least 1, got 0",
        "routes.yaml:7: upstreams.users.endpoints[2]: missing required key 'url'",
        "routes.yaml:8: upstreams.users.endpoints[3]: duplicate endpoint 'http://b:80' "
        "(also upstreams.users.endpoints[1]; use weight)",
    ]


def test_an_upstream_needs_endpoints() -> None:
    assert one_error("listeners: [{bind: ':0'}]\nupstreams: {users: {}}\nroutes: []\n") == (
        "routes.yaml:2: upstreams.users: missing required key 'endpoints'"
    )


def test_only_round_robin_balancing_is_supported() -> None:
    text = """\
        listeners: [{bind: ':0'}]
        upstreams: {u: {endpoints: [http://x], balance: random}}
        routes: []
    """

    assert one_error(text) == (
        "routes.yaml:2: upstreams.u.balance: unsupported balance 'random' (supported: round_robin)"
    )


def test_max_idle_cannot_exceed_max_connections() -> None:
    text = """\
        listeners: [{bind: ':0'}]
        upstreams:
          u:
            endpoints: [http://x]
            pool: {max_connections: 2, max_idle: 3}
        routes: []
    """

    assert one_error(text) == (
        "routes.yaml:5: upstreams.u.pool.max_idle: max_idle (3) > max_connections (2): "
        "idle connections are part of max_connections"
    )


def test_pool_limits_have_minimums() -> None:
    text = """\
        listeners: [{bind: ':0'}]
        upstreams: {u: {endpoints: [http://x], pool: {max_connections: 0, max_idle: -1}}}
        routes: []
    """

    assert errors_of(text) == [
        "routes.yaml:2: upstreams.u.pool.max_connections: must be at least 1, got 0",
        "routes.yaml:2: upstreams.u.pool.max_idle: must be at least 0, got -1",
    ]


# --- routes ---


def test_an_unknown_upstream_suggests_the_closest_one() -> None:
    assert route_error("match: {path: /}\nupstream: usres\n") == (
        "routes.yaml:6: routes[0].upstream: unknown upstream 'usres' (did you mean 'users'?)"
    )


def test_an_unknown_upstream_with_no_upstreams_defined_says_so() -> None:
    text = "listeners: [{bind: ':0'}]\nupstreams: {}\nroutes: [{match: {}, upstream: x}]\n"

    assert (
        one_error(text)
        == "routes.yaml:3: routes[0].upstream: unknown upstream 'x' (no upstreams are defined)"
    )


def test_an_unreadable_upstreams_section_does_not_make_every_route_an_error() -> None:
    text = "listeners: [{bind: ':0'}]\nupstreams: [x]\nroutes: [{match: {}, upstream: x}]\n"

    assert one_error(text) == "routes.yaml:2: upstreams: expected a mapping, got a list"


def test_a_route_to_an_invalid_upstream_only_reports_the_upstream() -> None:
    text = """\
        listeners: [{bind: ':0'}]
        upstreams: {u: {endpoints: []}}
        routes: [{match: {}, upstream: u}]
    """

    assert (
        one_error(text) == "routes.yaml:2: upstreams.u.endpoints: at least one endpoint is required"
    )


@pytest.mark.parametrize(
    ("match", "name"),
    [
        ("{host: api.example.com, path_prefix: /users}", "api.example.com/users*"),
        ("{path: /exact}", "/exact"),
        ("{path_regex: '^/re$'}", "~^/re$"),
        ("{host: '*.example.com'}", "*.example.com/*"),
        ("{methods: [GET]}", "/*"),
        ("{}", "/*"),
    ],
)
def test_a_route_without_a_name_is_named_after_its_match(match: str, name: str) -> None:
    config = parse(routes(f"  - {{match: {match}, upstream: users}}\n"))

    assert config.routes[0].name == name


def test_route_index_is_the_position_in_the_file() -> None:
    text = routes(
        "  - {match: {path: /a}, upstream: users}\n  - {match: {path: /b}, upstream: users}\n"
    )

    assert [route.index for route in parse(text).routes] == [0, 1]


def test_duplicate_route_names_are_errors_on_the_duplicate() -> None:
    text = routes(
        """\
        - {name: api, match: {path: /a}, upstream: users}
        - {name: api, match: {path: /b}, upstream: users}
        """
    )

    assert (
        one_error(text)
        == "routes.yaml:6: routes[1].name: duplicate route name 'api' (also routes[0])"
    )


def test_duplicate_derived_route_names_ask_for_a_name() -> None:
    text = routes(
        """\
        - {match: {path: /a, methods: [GET]}, upstream: users}
        - {match: {path: /a, methods: [POST]}, upstream: users}
        """
    )

    assert one_error(text) == (
        "routes.yaml:6: routes[1]: duplicate route name '/a' (also routes[0]) "
        "(derived from its match: give the route a name)"
    )


def test_an_empty_route_name_is_an_error() -> None:
    assert route_error("name: ' '\nmatch: {}\nupstream: users\n") == (
        "routes.yaml:5: routes[0].name: must not be empty"
    )


def test_a_route_needs_match_and_upstream() -> None:
    assert errors_of(routes("  - {name: r}\n")) == [
        "routes.yaml:5: routes[0]: missing required key 'match'",
        "routes.yaml:5: routes[0]: missing required key 'upstream'",
    ]


@pytest.mark.parametrize(
    ("host", "parsed"),
    [
        ("API.Example.COM", "api.example.com"),
        ("'*.example.com'", "*.example.com"),
        ("example.com.", "example.com"),
        ("'[::1]'", "[::1]"),
        ("'*'", None),
        ("10.0.0.1", "10.0.0.1"),
    ],
)
def test_match_host_is_normalised(host: str, parsed: str | None) -> None:
    config = parse(routes(f"  - {{match: {{host: {host}}}, upstream: users}}\n"))

    assert config.routes[0].match.host == parsed


@pytest.mark.parametrize(
    ("host", "message"),
    [
        (
            "api.*.com",
            "invalid host 'api.*.com' (expected 'api.example.com', '*.example.com' or '*')",
        ),
        ("'*example.com'", "invalid host '*example.com' (expected"),
        ("api.example.com:8080", "invalid host 'api.example.com:8080': a route host has no port"),
        ("''", "invalid host '' (expected"),
        ("'a b'", "invalid host 'a b' (expected"),
        ("'[zz]'", "invalid host '[zz]' (expected an IPv6 address like '[::1]')"),
        ("'[1::2::3]'", "invalid host '[1::2::3]' (expected an IPv6 address"),
        ("'[::1]:80'", "invalid host '[::1]:80' (expected an IPv6 address"),
    ],
)
def test_a_malformed_match_host_is_an_error(host: str, message: str) -> None:
    error = route_error(f"match: {{host: {host}}}\nupstream: users\n")

    assert error.startswith(f"routes.yaml:5: routes[0].match.host: {message}")


def test_parse_host_pattern_drops_one_trailing_dot() -> None:
    assert parse_host_pattern("Example.COM.") == "example.com"


def test_methods_are_upper_cased_and_deduplicated() -> None:
    config = parse(routes("  - {match: {methods: [get, GET, Post]}, upstream: users}\n"))

    assert config.routes[0].match.methods == ("GET", "POST")


def test_methods_must_be_a_non_empty_list_of_tokens() -> None:
    assert route_error("match: {methods: []}\nupstream: users\n") == (
        "routes.yaml:5: routes[0].match.methods: must not be empty (leave it out for any method)"
    )
    assert route_error("match: {methods: [GET, 'NO WAY']}\nupstream: users\n") == (
        "routes.yaml:5: routes[0].match.methods[1]: invalid method 'NO WAY'"
    )
    assert route_error("match: {methods: GET}\nupstream: users\n") == (
        "routes.yaml:5: routes[0].match.methods: expected a list, got a string ('GET')"
    )


def test_at_most_one_path_matcher_is_allowed() -> None:
    error = route_error("match: {path: /a, path_regex: /b}\nupstream: users\n")

    assert error == (
        "routes.yaml:5: routes[0].match.path_regex: give at most one of path, path_prefix, "
        "path_regex (path)"
    )


@pytest.mark.parametrize("key", ["path", "path_prefix"])
def test_paths_must_start_with_a_slash(key: str) -> None:
    assert route_error(f"match: {{{key}: users}}\nupstream: users\n") == (
        f"routes.yaml:5: routes[0].match.{key}: must start with '/', got 'users'"
    )


def test_path_regex_may_have_named_groups() -> None:
    config = parse(routes("  - {match: {path_regex: '/users/(?P<id>\\d+)'}, upstream: users}\n"))

    assert config.routes[0].match.path_regex == "/users/(?P<id>\\d+)"


def test_a_path_regex_that_does_not_compile_is_an_error() -> None:
    assert route_error("match: {path_regex: '/(a'}\nupstream: users\n") == (
        "routes.yaml:5: routes[0].match.path_regex: invalid regex '/(a': "
        "missing ), unterminated subpattern at position 1"
    )


def test_header_and_query_matches_take_value_regex_or_presence() -> None:
    text = routes(
        """\
        - match:
            headers: {X-A: a, X-B: {value: b}, X-C: {regex: 'c+'}, X-D: {present: true}}
            query: {n: 1, flag: true, r: {regex: '[0-9]+'}, p: {present: true}}
          upstream: users
        """
    )

    match = parse(text).routes[0].match

    assert match.headers == (
        HeaderMatch("x-a", value="a"),
        HeaderMatch("x-b", value="b"),
        HeaderMatch("x-c", regex="c+"),
        HeaderMatch("x-d"),
    )
    assert match.query == (
        QueryMatch("n", value="1"),  # numbers and booleans are taken as written
        QueryMatch("flag", value="true"),
        QueryMatch("r", regex="[0-9]+"),
        QueryMatch("p"),
    )


def test_query_names_keep_their_case() -> None:
    config = parse(routes("  - {match: {query: {Q: '1', q: '2'}}, upstream: users}\n"))

    assert [query.name for query in config.routes[0].match.query] == ["Q", "q"]


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ("{X-A: {regex: '(', }}", "headers.X-A.regex: invalid regex '('"),
        ("{X-A: {present: false}}", "headers.X-A.present: only 'present: true' is supported"),
        (
            "{X-A: {value: a, regex: b}}",
            "headers.X-A: expected exactly one of value, regex, present: true",
        ),
        ("{X-A: {}}", "headers.X-A: expected exactly one of value, regex, present: true"),
        ("{X-A: {valu: a}}", "headers.X-A.valu: unknown key 'valu' (did you mean 'value'?)"),
        ("{X-A: null}", "headers.X-A: expected a string, got null"),
        ("{X-A: [a]}", "headers.X-A: expected a mapping, got a list"),
        ("{'X A': a}", "headers['X A']: invalid header name 'X A'"),
        (
            "{X-A: a, x-a: b}",
            "headers.x-a: duplicate header 'x-a' (also routes[0].match.headers.X-A)",
        ),
        ("[X-A]", "headers: expected a mapping, got a list"),
    ],
)
def test_a_malformed_header_match_is_an_error(headers: str, error: str) -> None:
    full = route_error(f"match: {{headers: {headers}}}\nupstream: users\n")

    assert full.startswith(f"routes.yaml:5: routes[0].match.{error}")


def test_an_empty_query_name_is_an_error() -> None:
    assert route_error("match: {query: {'': a}}\nupstream: users\n") == (
        "routes.yaml:5: routes[0].match.query['']: the parameter name must not be empty"
    )


def test_rewrite_regex_needs_replacement_and_vice_versa() -> None:
    text = routes(
        """\
        - {match: {path: /a}, upstream: users, rewrite: {regex: '^/a$'}}
        - {match: {path: /b}, upstream: users, rewrite: {replacement: /x}}
        """
    )

    assert errors_of(text) == [
        "routes.yaml:5: routes[0].rewrite.regex: regex needs replacement (give both or neither)",
        "routes.yaml:6: routes[1].rewrite.replacement: replacement needs regex "
        "(give both or neither)",
    ]


def test_rewrite_replacement_may_use_numbered_and_named_groups() -> None:
    text = routes(
        "  - match: {path_prefix: /}\n    upstream: users\n"
        "    rewrite: {regex: '^/(?P<v>v\\d)/(.*)$', replacement: '/\\2?v=\\g<v>'}\n"
    )

    assert parse(text).routes[0].rewrite.replacement == "/\\2?v=\\g<v>"


@pytest.mark.parametrize(
    ("replacement", "problem"),
    [("'/\\2'", "invalid group reference 2 at position 2"), ("'\\g<x>'", "unknown group name 'x'")],
)
def test_rewrite_replacement_must_fit_the_regex(replacement: str, problem: str) -> None:
    error = route_error(
        "match: {path: /}\nupstream: users\n"
        f"rewrite: {{regex: '/(a)', replacement: {replacement}}}\n"
    )

    assert error == f"routes.yaml:7: routes[0].rewrite.replacement: invalid replacement: {problem}"


def test_rewrite_with_global_regex_flags_is_accepted() -> None:
    text = routes(
        "  - {match: {}, upstream: users, rewrite: {regex: '(?i)^/A(.*)', replacement: '/b\\1'}}\n"
    )

    assert parse(text).routes[0].rewrite.regex == "(?i)^/A(.*)"


@pytest.mark.parametrize(
    ("rewrite", "error"),
    [
        ("{strip_prefix: users}", "rewrite.strip_prefix: must start with '/', got 'users'"),
        ("{add_prefix: v1}", "rewrite.add_prefix: must start with '/', got 'v1'"),
        ("{host: 'a b'}", "rewrite.host: invalid host 'a b'"),
        ("{regex: '(', replacement: x}", "rewrite.regex: invalid regex '('"),
        ("{hots: x}", "rewrite.hots: unknown key 'hots' (did you mean 'host'?)"),
    ],
)
def test_a_malformed_rewrite_is_an_error(rewrite: str, error: str) -> None:
    full = route_error(f"match: {{}}\nupstream: users\nrewrite: {rewrite}\n")

    assert full.startswith(f"routes.yaml:7: routes[0].{error}")


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
