"""The values inside routes.yaml (proxy/config/values.py): ${VAR} substitution, durations
and sizes, bind addresses, endpoint URLs and host patterns, on their own and in a file."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

from proxy.config.load import parse_config
from proxy.config.model import AdminConfig
from proxy.config.values import (
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
from tests.support.config_helpers import BASE, errors_of, one_error, parse, routes


def rejection(parse_value: Callable[[Any], object], value: object) -> str:
    """The message of the ConfigValueError that `parse_value(value)` raises."""
    with pytest.raises(ConfigValueError) as info:
        parse_value(value)
    return str(info.value)


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
        # Go-style compounds, from the largest unit to the smallest, and days.
        ("1m30s", 90.0),
        ("1h30m", 5400.0),
        ("2h45m10.5s", 9910.5),
        ("1d", 86400.0),
        ("1d12h", 129600.0),
        ("1s500ms", 1.5),
        ("1500us", 0.0015),
        ("1500\u00b5s", 0.0015),
        ("1500\u03bcs", 0.0015),
        ("2000000ns", 0.002),
        ("1.5h", 5400.0),
        (" 1m30s ", 90.0),
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
        ("5x", "invalid duration '5x': '5' has no unit (e.g."),
        ("s", "invalid duration 's' (e.g."),
        ("", "invalid duration '' (e.g."),
        ("1 s", "invalid duration '1 s': '1' has no unit"),
        ("1e3", "invalid duration '1e3': '1' has no unit"),
        ("1m30", "invalid duration '1m30': '30' has no unit"),
        ("1m 30s", "invalid duration '1m 30s' (e.g."),
        ("30s1m", "invalid duration '30s1m': units must go from the largest to the smallest"),
        ("1m1m", "invalid duration '1m1m': units must go from the largest to the smallest"),
        ("1M", "invalid duration '1M': '1' has no unit"),
        ("1h-30m", "invalid duration '1h-30m' (e.g."),
        (math.inf, "invalid duration inf: must be a finite number"),
        (math.nan, "invalid duration nan: must be a finite number"),
        ("9" * 400 + "h", "too large"),
    ],
)
def test_parse_duration_rejects_malformed_values(text: str | float, message: str) -> None:
    assert message in rejection(parse_duration, text)


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
        # Kubernetes' quantities: k, M, G, T (powers of 1000) and Ki, Mi, Gi, Ti.
        ("10k", 10_000),
        ("10K", 10_000),
        ("1M", 10**6),
        ("2G", 2 * 10**9),
        ("1T", 10**12),
        ("16Ki", 16 * 1024),
        ("1Mi", 1024**2),
        ("4Gi", 4 * 1024**3),
        ("1Ti", 1024**4),
        ("1mi", 1024**2),
        ("1.5Mi", 1536 * 1024),
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
        ("10m", "invalid size '10m': ambiguous unit 'm': write 10M for powers of 1000 or 10Mi"),
        ("1g", "invalid size '1g': ambiguous unit 'g': write 1G for powers of 1000 or 1Gi"),
        ("1t", "ambiguous unit 't'"),
        ("1Kx", "invalid size '1Kx': unknown unit 'Kx'"),
    ],
)
def test_parse_size_rejects_malformed_values(text: str | int, message: str) -> None:
    assert message in rejection(parse_size, text)


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


def test_go_durations_and_kubernetes_sizes_are_read_from_yaml() -> None:
    text = BASE + (
        "routes: []\n"
        "limits: {header_timeout: 1m30s, keepalive_timeout: 1h, body_timeout: 1d, "
        "max_body_size: 10Mi, max_head_bytes: 64k}\n"
    )

    limits = parse(text).limits

    assert (limits.header_timeout, limits.keepalive_timeout, limits.body_timeout) == (
        90.0,
        3600.0,
        86400.0,
    )
    assert (limits.max_body_size, limits.max_head_bytes) == (10 * 1024**2, 64_000)


def test_an_ambiguous_size_in_yaml_names_its_line_and_both_spellings() -> None:
    message = one_error(BASE + "routes: []\nlimits:\n  max_body_size: 10m\n")

    assert "limits.max_body_size: invalid size '10m': ambiguous unit 'm'" in message
    assert "10M" in message
    assert "10Mi" in message


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


# --- bind addresses ---


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
    assert message in rejection(parse_bind, text)


# --- endpoint URLs ---


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
        ("ws://x", "unsupported scheme 'ws' in 'ws://x' (http:// or https://)"),
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
    assert message in rejection(parse_endpoint_url, text)


# --- host patterns ---


def test_parse_host_pattern_drops_one_trailing_dot() -> None:
    assert parse_host_pattern("Example.COM.") == "example.com"
