"""`gatehouse explain` and `gatehouse routes` (proxy/tools/explain.py): the route a request
takes and why, checked against the gateway's own route table."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy.config.load import parse_config
from proxy.exchange.routing import RouteTable
from proxy.tools.explain import explain, mismatches, render_explanation, render_routes
from tests.support.gateway_process import run_cli

CONFIG = """
listeners: [{bind: 127.0.0.1:0}]
upstreams:
  users: {endpoints: [http://10.0.0.1:8000, {url: http://10.0.0.2:8000, weight: 3}]}
  admin: {endpoints: [http://10.0.0.3:8000]}
middleware:
  keys: {type: api_key, keys: [k1]}
global_middleware: [{type: request_id}]
routes:
  - name: users-api
    match: {host: api.example.com, path_prefix: /users, methods: [GET, POST]}
    middleware: [keys]
    upstream: users
    rewrite: {strip_prefix: /users}
  - name: users-admin
    match: {host: api.example.com, path_prefix: /users/admin, headers: {X-Admin: "yes"}}
    upstream: admin
  - name: by-id
    match: {host: "*.example.com", path_regex: "/items/(?P<id>[0-9]+)"}
    upstream: users
  - name: exact
    match: {path: /health, methods: [GET]}
    upstream: admin
  - name: debug
    match: {path_prefix: /, query: {debug: "1"}}
    upstream: admin
  - name: fallback
    match: {path_prefix: /}
    upstream: users
"""
config = parse_config(CONFIG)


def test_the_chosen_route_its_chain_upstream_and_rewritten_path_are_shown() -> None:
    found = explain(config, "GET", "http://api.example.com/users/42?x=1")
    assert found.route is not None
    assert found.route.name == "users-api"
    text = render_explanation(config, found)
    assert "route: users-api (routes[0])" in text
    assert "middleware: request_id (request_id) -> keys (api_key)" in text
    assert (
        "upstream: users (http1, round_robin): http://10.0.0.1:8000, http://10.0.0.2:8000 weight 3"
        in text
    )
    assert "forwarded as: GET /42?x=1" in text
    # The more specific route tried first, and why it did not match:
    assert (
        "  users-admin: path '/users/42' does not start with '/users/admin';"
        " header 'x-admin' is missing"
    ) in text


def test_every_reason_a_nearer_route_did_not_match_is_given() -> None:
    found = explain(config, "DELETE", "/users/1", [("Host", "API.Example.com:8443")])
    assert found.route is not None
    assert found.route.name == "fallback"
    reasons = dict((route.name, why) for route, why in found.passed_over)
    assert reasons["users-api"] == ["method DELETE is not one of GET, POST"]
    assert reasons["users-admin"] == [
        "path '/users/1' does not start with '/users/admin'",
        "header 'x-admin' is missing",
    ]
    assert reasons["debug"] == ["query 'debug' is missing"]
    assert reasons["by-id"] == ["path '/users/1' does not match the regex '/items/(?P<id>[0-9]+)'"]


def test_regex_params_and_a_request_no_route_takes() -> None:
    found = explain(config, "GET", "http://shop.example.com/items/42")
    assert found.route is not None
    assert (found.route.name, found.params) == ("by-id", {"id": "42"})
    nothing = explain(
        parse_config(CONFIG.replace("match: {path_prefix: /}\n", "match: {path_prefix: /x}\n")),
        "GET",
        "/zzz",
    )
    assert nothing.route is None
    assert "no route matches: the gateway answers 404 no_route" in render_explanation(
        config, nothing
    )


def test_the_path_is_explained_in_the_canonical_form_the_gateway_routes_on() -> None:
    found = explain(config, "GET", "http://api.example.com//x/../%75sers/./42")
    assert found.route is not None
    assert (found.route.name, found.path, found.forwarded_path) == ("users-api", "/users/42", "/42")
    assert "path=/users/42" in render_explanation(config, found)


def test_a_request_refused_before_routing_is_explained_as_that_refusal() -> None:
    for method, url in (("GET", "/a%2fb"), ("dElEtE", "/x"), ("GET", "http://a b/x")):
        found = explain(config, method, url)
        assert found.route is None
        assert found.refused
        assert "refused before routing: the gateway answers 400" in render_explanation(
            config, found
        )


def test_routes_lists_the_table_in_the_order_routes_are_tried() -> None:
    lines = render_routes(config).splitlines()
    assert [line.split(":")[0].split(". ")[1] for line in lines] == [
        "users-admin",
        "users-api",
        "by-id",
        "exact",
        "debug",
        "fallback",
    ]
    assert lines[1].endswith("-> users [request_id, keys]")


METHODS = st.sampled_from(["GET", "POST", "DELETE", "PUT"])
HOSTS = st.sampled_from(
    ["api.example.com", "API.example.com:443", "shop.example.com", "example.com", "", "other.test."]
)
PATHS = st.sampled_from(
    [
        "/users",
        "/users/1",
        "/users/admin",
        "/users/admin/x",
        "/items/7",
        "/items/x",
        "/health",
        "/",
        "/zz",
    ]
)
HEADERS = st.lists(
    st.sampled_from([("X-Admin", "yes"), ("X-Admin", "no"), ("x-admin", "yes")]), max_size=2
)
QUERIES = st.sampled_from(["", "debug=1", "debug=0", "a=1&debug=1", "debug"])


@settings(max_examples=300, deadline=None)
@given(method=METHODS, host=HOSTS, path=PATHS, headers=HEADERS, query=QUERIES)
def test_explain_agrees_with_the_route_table_and_gives_reasons_only_for_misses(
    method: str, host: str, path: str, headers: list[tuple[str, str]], query: str
) -> None:
    table = RouteTable(config.routes)
    header_map: CIMultiDict[str] = CIMultiDict(headers)
    expected = table.match(method, host, path, header_map, query)
    url = (
        f"http://{host}{path}" + (f"?{query}" if query else "")
        if host
        else path + (f"?{query}" if query else "")
    )
    found = explain(config, method, url, headers)
    assert (found.route.name if found.route else None) == (
        expected.route.name if expected else None
    )
    # The chosen route has no reason against it; every route tried before it has one.
    if found.route is not None:
        assert mismatches(found.route, method, host, path, header_map, query) == []
    assert all(reasons for _, reasons in found.passed_over)
    # And the first route explain finds no reason against is the one the table chose.
    first = next(
        (r for r in table.ordered() if not mismatches(r, method, host, path, header_map, query)),
        None,
    )
    assert first is found.route


def test_the_commands_print_and_exit(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(CONFIG)

    done = run_cli(
        "explain",
        str(path),
        "get",
        "/users/admin/x",
        "-H",
        "Host: api.example.com",
        "-H",
        "X-Admin: yes",
    )
    assert done.returncode == 0, done.stderr
    assert "route: users-admin (routes[1])" in done.stdout
    assert "forwarded as: GET /users/admin/x" in done.stdout
    assert run_cli("explain", str(path), "GET", "/", "-H", "no colon").returncode == 2
    table = run_cli("routes", str(path))
    assert table.returncode == 0
    assert table.stdout.splitlines()[0].startswith("  1. users-admin:")
    path.write_text("routes: nope\n")
    assert run_cli("routes", str(path)).returncode == 1


def test_routes_that_answer_themselves_say_what_they_answer() -> None:
    answering = parse_config(
        """
listeners: [{bind: 127.0.0.1:0}]
upstreams: {u: {endpoints: [http://10.0.0.1:8000]}}
routes:
  - name: moved
    match: {path_prefix: /old/}
    redirect: {to: "https://{host}{uri}", status: 301}
  - name: down
    match: {path_prefix: /down}
    respond: {status: 503, body: later}
  - name: rest
    match: {path_prefix: /}
    upstream: u
"""
    )
    moved = render_explanation(answering, explain(answering, "GET", "/old/a"))
    down = render_explanation(answering, explain(answering, "GET", "/down"))
    assert "answered by the gateway: redirect 301 https://{host}{uri}" in moved
    assert "upstream:" not in moved
    assert "answered by the gateway: respond 503" in down
    table = render_routes(answering).splitlines()
    assert table[0].endswith("-> redirect 301 https://{host}{uri}")
    assert table[1].endswith("-> respond 503")
    assert table[2].endswith("-> u")
