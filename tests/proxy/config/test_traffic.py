"""A route's traffic shaping in routes.yaml (proxy/config/traffic.py): `upstream: {split:
[...], sticky: ...}` and `mirror: {...}`."""

from __future__ import annotations

import pytest

from proxy.config.model import MirrorConfig, SplitConfig, SplitSide
from tests.support.config_helpers import errors_of, one_error, parse

TWO_MORE = """\
listeners: [{bind: ":0"}]
upstreams:
  v1: {endpoints: [http://127.0.0.1:8001]}
  v2: {endpoints: [http://127.0.0.1:8002]}
  grpc: {endpoints: [http://127.0.0.1:8003], protocol: h2c}
routes:
"""


def route(lines: str) -> str:
    """TWO_MORE with one route (line 7 on)."""
    return TWO_MORE + "  - " + lines.strip().replace("\n", "\n    ") + "\n"


def test_a_split_reads_its_sides_and_stands_for_its_first() -> None:
    config = parse(
        route(
            "match: {}\nupstream: {split: [{upstream: v1, weight: 90}, {upstream: v2, weight: 10}]}"
        )
    )
    (only,) = config.routes
    assert only.upstream == "v1"
    assert only.split == SplitConfig((SplitSide("v1", 90), SplitSide("v2", 10)))
    assert only.websocket.enabled  # every side is http1


@pytest.mark.parametrize(
    ("sticky", "cookie", "header"),
    [("{cookie: session}", "session", None), ("{header: X-User}", None, "x-user")],
)
def test_sticky_takes_a_cookie_or_a_header(sticky: str, cookie: str, header: str) -> None:
    config = parse(
        route(f"match: {{}}\nupstream: {{split: [{{upstream: v1, weight: 1}}], sticky: {sticky}}}")
    )
    split = config.routes[0].split
    assert split is not None
    assert (split.sticky_cookie, split.sticky_header) == (cookie, header)


@pytest.mark.parametrize(
    ("upstream", "message"),
    [
        (
            "{split: [{upstream: v3, weight: 1}]}",
            "routes[0].upstream.split[0].upstream: unknown upstream 'v3'",
        ),
        (
            "{split: [{upstream: v1, weight: 1}, {upstream: v1, weight: 2}]}",
            "routes[0].upstream.split[1].upstream: upstream 'v1' is already a side"
            " (routes[0].upstream.split[0])",
        ),
        (
            "{split: [{upstream: v1, weight: 0}, {upstream: v2, weight: 0}]}",
            "routes[0].upstream.split: the weights sum to 0: give a side a weight",
        ),
        ("{split: []}", "routes[0].upstream.split: give at least one side"),
        (
            "{split: [{upstream: v1, weight: -1}]}",
            "routes[0].upstream.split[0].weight: must be at least 0, got -1",
        ),
        (
            "{split: [{upstream: v1}]}",
            "routes[0].upstream.split[0]: missing required key 'weight'",
        ),
        (
            "{split: [{upstream: v1, weight: 1}], sticky: {cookie: a, header: b}}",
            "routes[0].upstream.sticky: give exactly one of cookie, header",
        ),
        (
            "{split: [{upstream: v1, weight: 1}], sticky: {header: 'X User'}}",
            "routes[0].upstream.sticky: invalid header name 'X User'",
        ),
        (
            "{sticky: {cookie: a}}",
            "routes[0].upstream: missing required key 'split'",
        ),
    ],
)
def test_a_bad_split_is_an_error_at_its_line(upstream: str, message: str) -> None:
    error = one_error(route(f"match: {{}}\nupstream: {upstream}"))
    assert error.startswith(f"routes.yaml:8: {message}"), error


def test_a_split_with_an_h2c_side_does_not_tunnel_websocket() -> None:
    config = parse(
        route(
            "match: {}\nupstream: {split: [{upstream: v1, weight: 1}, {upstream: grpc, weight: 1}]}"
        )
    )
    assert not config.routes[0].websocket.enabled
    message = one_error(
        route(
            "match: {}\n"
            "upstream: {split: [{upstream: v1, weight: 1}, {upstream: grpc, weight: 1}]}\n"
            "websocket: true"
        )
    )
    assert "WebSocket needs an HTTP/1.1 upstream" in message


def test_a_mirror_reads_its_settings_with_defaults() -> None:
    config = parse(route("match: {}\nupstream: v1\nmirror: {upstream: v2}"))
    assert config.routes[0].mirror == MirrorConfig("v2")
    config = parse(
        route(
            "match: {}\nupstream: v1\n"
            "mirror: {upstream: v2, percent: 12.5, max_body: 1KiB, max_in_flight: 3,"
            " timeout: 250ms}"
        )
    )
    assert config.routes[0].mirror == MirrorConfig("v2", 12.5, 1024, 3, 0.25)


@pytest.mark.parametrize(
    ("mirror", "message"),
    [
        ("{upstream: v9}", "routes[0].mirror.upstream: unknown upstream 'v9'"),
        ("{percent: 5}", "routes[0].mirror: missing required key 'upstream'"),
        (
            "{upstream: v2, percent: 101}",
            "routes[0].mirror.percent: must be from 0 to 100, got 101",
        ),
        (
            "{upstream: v2, percent: lots}",
            "routes[0].mirror.percent: expected a number from 0 to 100",
        ),
        ("{upstream: v2, max_in_flight: 0}", "routes[0].mirror.max_in_flight: must be at least 1"),
        ("{upstream: v2, timeout: 0s}", "routes[0].mirror.timeout:"),
    ],
)
def test_a_bad_mirror_is_an_error_at_its_line(mirror: str, message: str) -> None:
    error = one_error(route(f"match: {{}}\nupstream: v1\nmirror: {mirror}"))
    assert error.startswith(f"routes.yaml:9: {message}"), error


def test_a_route_that_answers_itself_has_no_mirror() -> None:
    errors = errors_of(route("match: {}\nrespond: {status: 204}\nmirror: {upstream: v2}"))
    assert errors == [
        "routes.yaml:9: routes[0].mirror: mirror is about forwarding: this route answers itself"
    ]
