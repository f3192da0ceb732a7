"""The section readers of proxy/config, called on their own: what each records in the
`LoadContext` and what it checks against there (proxy/config/context.py). parse_config
orders them; these tests pin that the order is all they share."""

from __future__ import annotations

import yaml
from yaml.nodes import Node

from proxy.config.context import LoadContext
from proxy.config.middleware import read_chain, read_middleware
from proxy.config.reader import NodeReader
from proxy.config.routes import read_routes
from proxy.config.server import read_admin, read_listeners, read_path_normalization
from proxy.config.upstream import read_upstreams


def _node(text: str) -> Node:
    node = yaml.compose(text)
    assert node is not None
    return node


def _reader() -> NodeReader:
    return NodeReader("routes.yaml", {})


def test_upstreams_record_their_names_and_protocols() -> None:
    reader, context = _reader(), LoadContext()
    text = "{a: {endpoints: ['http://a:1']}, b: {endpoints: ['http://b:1'], protocol: h2c}}"

    read_upstreams(reader, context, _node(text), "upstreams")

    assert context.upstream_names == {"a", "b"}
    assert context.upstream_protocols == {"a": "http1", "b": "h2c"}
    assert reader.errors == []


def test_a_broken_upstream_is_still_a_known_name() -> None:
    reader, context = _reader(), LoadContext()

    read_upstreams(reader, context, _node("{a: [http://a:1]}"), "upstreams")

    assert context.upstream_names == {"a"}
    assert context.upstream_protocols == {}
    assert reader.errors == ["routes.yaml:1: upstreams.a: expected a mapping, got a list"]


def test_routes_check_their_upstream_against_the_context() -> None:
    reader = _reader()
    context = LoadContext(upstream_names={"users"}, upstream_protocols={"users": "http1"})

    read_routes(reader, context, _node("[{match: {}, upstream: usres}]"), "routes")

    assert reader.errors == [
        "routes.yaml:1: routes[0].upstream: unknown upstream 'usres' (did you mean 'users'?)"
    ]


def test_routes_leave_upstreams_unchecked_when_they_are_unknown() -> None:
    reader = _reader()

    routes = read_routes(reader, LoadContext(), _node("[{match: {}, upstream: x}]"), "routes")

    assert [route.upstream for route in routes] == ["x"]
    assert reader.errors == []


def test_route_paths_follow_the_path_normalization_read_before_them() -> None:
    reader, context = _reader(), LoadContext(upstream_names={"u"})
    read_path_normalization(reader, context, _node("{merge_slashes: false}"), "path_normalization")

    routes = read_routes(reader, context, _node("[{match: {path: /a//b}, upstream: u}]"), "routes")

    assert [route.match.path for route in routes] == ["/a//b"]
    assert reader.errors == []


def test_listeners_and_admin_share_the_addresses_bound() -> None:
    reader, context = _reader(), LoadContext()
    read_listeners(reader, context, _node("[{bind: ':8080'}]"), "listeners")

    read_admin(reader, context, _node("{bind: '0.0.0.0:8080'}"), "admin")

    assert context.binds == {("0.0.0.0", 8080): "listeners[0].bind"}
    assert reader.errors == ["routes.yaml:1: admin.bind: address already used by listeners[0].bind"]


def test_a_chain_does_not_report_again_a_middleware_whose_entry_failed() -> None:
    reader, context = _reader(), LoadContext()
    read_middleware(reader, context, _node("{auth: {type: no_such_type}}"), "middleware")
    errors = reader.errors

    chain = read_chain(reader, context, _node("[auth]"), "global_middleware")

    assert chain == ()
    assert context.failed_middleware == {"auth"}
    assert len(errors) == 1
    assert reader.errors == errors
