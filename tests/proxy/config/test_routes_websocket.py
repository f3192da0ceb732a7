"""routes.yaml: a route's `websocket` option. On by default when the route's upstream speaks
HTTP/1.1 (the upstream hop of a tunnel is an HTTP/1.1 Upgrade), off for h2c and h2
upstreams; `true`/`false`, or a mapping of the tunnels' deadlines (which turns it on). Every
error names the file, the line and the key path."""

from __future__ import annotations

import pytest

from proxy.config.model import WebSocketConfig
from tests.support.config_helpers import errors_of, one_error, parse

# One upstream per protocol (lines 3, 4 and 5); the route under test is on line 7.
UPSTREAMS = """\
listeners: [{bind: ":0"}]
upstreams:
  users: {endpoints: [http://127.0.0.1:8000]}
  grpc: {endpoints: [http://127.0.0.1:9000], protocol: h2c}
  secure: {endpoints: [https://127.0.0.1:9443], protocol: h2}
routes:
"""


def one_route(upstream: str, websocket: str | None = None) -> str:
    """The file with one route (line 7) to `upstream`, with `websocket: <websocket>`."""
    option = "" if websocket is None else f", websocket: {websocket}"
    return UPSTREAMS + f"  - {{match: {{}}, upstream: {upstream}{option}}}\n"


def websocket_of(text: str) -> WebSocketConfig:
    (route,) = parse(text).routes
    return route.websocket


# --- defaults ---


def test_websocket_is_on_by_default_for_an_http1_upstream() -> None:
    assert websocket_of(one_route("users")) == WebSocketConfig(
        enabled=True, idle_timeout=None, max_duration=None
    )


@pytest.mark.parametrize("upstream", ["grpc", "secure"])
def test_websocket_is_off_by_default_for_an_http2_upstream(upstream: str) -> None:
    assert websocket_of(one_route(upstream)) == WebSocketConfig(enabled=False)


def test_websocket_is_on_by_default_for_an_upstream_that_says_protocol_http1() -> None:
    text = """\
        listeners: [{bind: ":0"}]
        upstreams: {u: {endpoints: [http://a:1], protocol: http1}}
        routes: [{match: {}, upstream: u}]
    """

    assert websocket_of(text) == WebSocketConfig(enabled=True)


def test_the_default_follows_the_upstream_even_when_routes_come_first_in_the_file() -> None:
    text = """\
        listeners: [{bind: ":0"}]
        routes:
          - {name: ws, match: {path: /ws}, upstream: users}
          - {name: rpc, match: {path: /rpc}, upstream: grpc}
        upstreams:
          users: {endpoints: [http://127.0.0.1:8000]}
          grpc: {endpoints: [http://127.0.0.1:9000], protocol: h2c}
    """

    assert [route.websocket.enabled for route in parse(text).routes] == [True, False]


# --- true, false and the mapping ---


def test_websocket_true_on_an_http1_upstream_is_on() -> None:
    assert websocket_of(one_route("users", "true")) == WebSocketConfig(enabled=True)


def test_websocket_false_turns_it_off() -> None:
    assert websocket_of(one_route("users", "false")) == WebSocketConfig(enabled=False)


def test_a_mapping_of_deadlines_turns_it_on_with_those_deadlines() -> None:
    config = websocket_of(one_route("users", "{idle_timeout: 30s, max_duration: 1h}"))

    assert config == WebSocketConfig(enabled=True, idle_timeout=30.0, max_duration=3600.0)


@pytest.mark.parametrize(
    ("written", "idle_timeout", "max_duration"),
    [
        ("{}", None, None),
        ("{idle_timeout: 250ms}", 0.25, None),
        ("{max_duration: 2m}", None, 120.0),
        ("{idle_timeout: 1.5, max_duration: 10}", 1.5, 10.0),
        ("{idle_timeout: null, max_duration: null}", None, None),
        ("{enabled: true, idle_timeout: 5s}", 5.0, None),
    ],
)
def test_a_mapping_reads_each_deadline_in_seconds(
    written: str, idle_timeout: float | None, max_duration: float | None
) -> None:
    config = websocket_of(one_route("users", written))

    assert config == WebSocketConfig(
        enabled=True, idle_timeout=idle_timeout, max_duration=max_duration
    )


def test_enabled_false_in_a_mapping_turns_it_off() -> None:
    assert websocket_of(one_route("users", "{enabled: false}")) == WebSocketConfig(enabled=False)


def test_a_block_mapping_is_read_like_a_flow_mapping() -> None:
    text = UPSTREAMS + (
        "  - match: {}\n"
        "    upstream: users\n"
        "    websocket:\n"
        "      idle_timeout: 30s\n"
        "      max_duration: 1h\n"
    )

    assert websocket_of(text) == WebSocketConfig(
        enabled=True, idle_timeout=30.0, max_duration=3600.0
    )


@pytest.mark.parametrize("websocket", ["false", "{enabled: false}"])
@pytest.mark.parametrize("upstream", ["grpc", "secure"])
def test_turning_it_off_explicitly_on_an_http2_upstream_is_fine(
    upstream: str, websocket: str
) -> None:
    assert websocket_of(one_route(upstream, websocket)) == WebSocketConfig(enabled=False)


# --- errors ---


@pytest.mark.parametrize(
    ("written", "found"),
    [
        ("yes-please", "a string ('yes-please')"),
        ("'true'", "a string ('true')"),
        ("1", "an integer (1)"),
        ("null", "null"),
    ],
)
def test_websocket_that_is_not_a_boolean_or_a_mapping_is_an_error(written: str, found: str) -> None:
    assert one_error(one_route("users", written)) == (
        f"routes.yaml:7: routes[0].websocket: expected true, false or a mapping, got {found}"
    )


def test_enabled_that_is_not_a_boolean_is_an_error() -> None:
    assert one_error(one_route("users", "{enabled: 1}")) == (
        "routes.yaml:7: routes[0].websocket.enabled: expected true or false, got an integer (1)"
    )


@pytest.mark.parametrize("key", ["idle_timeout", "max_duration"])
@pytest.mark.parametrize("zero", ["0s", "0", "0ms"])
def test_a_zero_deadline_is_an_error(key: str, zero: str) -> None:
    assert one_error(one_route("users", f"{{{key}: {zero}}}")) == (
        f"routes.yaml:7: routes[0].websocket.{key}: must be greater than 0"
    )


def test_a_negative_deadline_is_an_error() -> None:
    assert one_error(one_route("users", "{idle_timeout: -1s}")) == (
        "routes.yaml:7: routes[0].websocket.idle_timeout: invalid duration '-1s': "
        "must not be negative"
    )


def test_a_misspelt_key_suggests_the_closest_one() -> None:
    assert one_error(one_route("users", "{idel_timeout: 5s}")) == (
        "routes.yaml:7: routes[0].websocket.idel_timeout: unknown key 'idel_timeout' "
        "(did you mean 'idle_timeout'?)"
    )


def test_an_unknown_key_lists_the_allowed_ones() -> None:
    assert one_error(one_route("users", "{subprotocols: [chat]}")) == (
        "routes.yaml:7: routes[0].websocket.subprotocols: unknown key 'subprotocols' "
        "(expected one of: enabled, idle_timeout, max_duration)"
    )


@pytest.mark.parametrize(
    ("upstream", "protocol"),
    [("grpc", "h2c"), ("secure", "h2")],
)
@pytest.mark.parametrize("websocket", ["true", "{enabled: true}", "{max_duration: 1h}"])
def test_turning_it_on_for_an_http2_upstream_is_an_error(
    upstream: str, protocol: str, websocket: str
) -> None:
    assert one_error(one_route(upstream, websocket)) == (
        f"routes.yaml:7: routes[0].websocket: WebSocket needs an HTTP/1.1 upstream "
        f"(upstream {upstream!r} is {protocol})"
    )


def test_errors_inside_a_block_mapping_name_their_own_lines() -> None:
    text = UPSTREAMS + (
        "  - match: {}\n"
        "    upstream: users\n"
        "    websocket:\n"
        "      idle_timeout: 0s\n"
        "      max_durration: 1h\n"
    )

    assert errors_of(text) == [
        "routes.yaml:10: routes[0].websocket.idle_timeout: must be greater than 0",
        "routes.yaml:11: routes[0].websocket.max_durration: unknown key 'max_durration' "
        "(did you mean 'max_duration'?)",
    ]


def test_the_http1_error_points_at_the_websocket_value() -> None:
    text = UPSTREAMS + (
        "  - match: {}\n    upstream: grpc\n\n    websocket:\n      max_duration: 1h\n"
    )

    assert one_error(text) == (
        "routes.yaml:11: routes[0].websocket: WebSocket needs an HTTP/1.1 upstream "
        "(upstream 'grpc' is h2c)"
    )


def test_every_route_with_a_websocket_problem_is_reported_in_one_run() -> None:
    text = UPSTREAMS + (
        "  - {name: a, match: {}, upstream: users, websocket: yes-please}\n"
        "  - {name: b, match: {}, upstream: users, websocket: {idle_timeout: 0s}}\n"
        "  - {name: c, match: {}, upstream: grpc, websocket: true}\n"
        "  - {name: d, match: {}, upstream: users, websocket: {idel_timeout: 5s}}\n"
    )

    assert errors_of(text) == [
        "routes.yaml:7: routes[0].websocket: expected true, false or a mapping, "
        "got a string ('yes-please')",
        "routes.yaml:8: routes[1].websocket.idle_timeout: must be greater than 0",
        "routes.yaml:9: routes[2].websocket: WebSocket needs an HTTP/1.1 upstream "
        "(upstream 'grpc' is h2c)",
        "routes.yaml:10: routes[3].websocket.idel_timeout: unknown key 'idel_timeout' "
        "(did you mean 'idle_timeout'?)",
    ]


def test_an_invalid_websocket_value_on_an_http2_route_is_reported_once() -> None:
    # The unreadable value falls back to the default (off for h2c), so the HTTP/1.1 check
    # does not pile a second error onto it.
    assert one_error(one_route("grpc", "yes-please")) == (
        "routes.yaml:7: routes[0].websocket: expected true, false or a mapping, "
        "got a string ('yes-please')"
    )


def test_a_route_to_an_unknown_upstream_only_reports_the_upstream() -> None:
    assert one_error(one_route("nope", "true")) == (
        "routes.yaml:7: routes[0].upstream: unknown upstream 'nope'"
    )


def test_a_route_to_an_upstream_with_a_bad_protocol_only_reports_the_protocol() -> None:
    text = """\
        listeners: [{bind: ":0"}]
        upstreams: {u: {endpoints: [http://a:1], protocol: h3}}
        routes: [{match: {}, upstream: u, websocket: true}]
    """

    assert one_error(text) == (
        "routes.yaml:2: upstreams.u.protocol: unsupported protocol 'h3' (supported: http1, h2c, h2)"
    )
