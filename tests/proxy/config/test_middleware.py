"""The middleware sections of routes.yaml: named instances, global and route chains, type
resolution (built-in, dotted path, entry point) and the errors each mistake gets."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from middleware.base import Handler
from middleware.registry import known_types, resolve
from middleware.request_id import RequestId
from proxy.config.document import ConfigError
from proxy.config.load import parse_config
from proxy.core.models import Request, Response
from tests.support.plugins import install_entry_point
from tests.support.plugins.stamp import Stamp

HEAD = """\
listeners: [{bind: 127.0.0.1:0}]
upstreams: {app: {endpoints: ["http://127.0.0.1:9"]}}
"""


def config_with(body: str) -> str:
    return HEAD + textwrap.dedent(body)


def errors_of(body: str) -> list[str]:
    with pytest.raises(ConfigError) as failed:
        parse_config(config_with(body))
    return str(failed.value).splitlines()


def test_chain_is_global_then_route_and_named_instances_are_shared() -> None:
    config = parse_config(
        config_with("""\
        middleware:
          stamp-a: {type: "tests.support.plugins.stamp:Stamp", value: a}
          rid: {type: request_id}
        global_middleware: [rid]
        routes:
          - {name: one, match: {path: /one}, upstream: app, middleware: [stamp-a]}
          - name: two
            match: {path: /two}
            upstream: app
            middleware: [stamp-a, {type: "tests.support.plugins.stamp:Stamp", value: inline}]
        """)
    )
    rid = config.middleware["rid"]
    assert [spec.name for spec in config.global_middleware] == ["rid"]
    assert isinstance(rid.instance, RequestId)
    one, two = config.routes
    assert [spec.name for spec in one.middleware] == ["stamp-a"]
    assert one.middleware[0] is two.middleware[0]  # one instance, shared state
    inline = two.middleware[1]
    # Inline entries take their type's name.
    assert inline.name == "tests.support.plugins.stamp:Stamp"
    assert isinstance(inline.instance, Stamp)
    assert inline.instance.value == "inline"


def test_unknown_middleware_reference_gets_a_did_you_mean() -> None:
    assert errors_of("""\
        middleware:
          keys: {type: request_id}
        routes:
          - {match: {path: /}, upstream: app, middleware: [kyes]}
        """) == [
        "<string>:6: routes[0].middleware[0]: unknown middleware 'kyes' (did you mean 'keys'?)"
    ]


def test_a_builtin_type_named_as_an_instance_says_how_to_use_it() -> None:
    assert errors_of("""\
        global_middleware: [request_id]
        routes: [{match: {path: /}, upstream: app}]
        """) == [
        "<string>:3: global_middleware[0]: unknown middleware 'request_id' "
        "(to use the built-in type, write {type: request_id})"
    ]


def test_unknown_type_gets_a_did_you_mean() -> None:
    assert errors_of("""\
        middleware:
          ids: {type: request_idd}
        routes: [{match: {path: /}, upstream: app, middleware: [ids]}]
        """) == [
        "<string>:4: middleware.ids.type: unknown middleware type 'request_idd' "
        "(did you mean 'request_id'?)"
    ]


def test_unknown_and_missing_options_are_errors_with_lines() -> None:
    assert errors_of("""\
        middleware:
          ids: {type: request_id, headr: X-Id}
          stamp:
            type: "tests.support.plugins.stamp:Stamp"
            header: X-S
        routes: [{match: {path: /}, upstream: app, middleware: [ids, stamp]}]
        """) == [
        "<string>:4: middleware.ids.headr: unknown key 'headr' (did you mean 'header'?)",
        "<string>:6: middleware.stamp: missing required key 'value'",
    ]


def test_option_type_errors_and_the_factorys_own_checks() -> None:
    assert errors_of("""\
        middleware:
          stamp: {type: "tests.support.plugins.stamp:Stamp", value: "", explode: maybe}
          ids: {type: request_id, trust_incoming: 3}
        routes: [{match: {path: /}, upstream: app, middleware: [stamp, ids]}]
        """) == [
        "<string>:4: middleware.stamp.value: must not be empty",
        "<string>:4: middleware.stamp.explode: expected true or false, got a string ('maybe')",
        "<string>:5: middleware.ids.trust_incoming: expected true or false, got an integer (3)",
    ]


@pytest.mark.parametrize(
    ("type_name", "message"),
    [
        (
            "no.such.module:Thing",
            "cannot import 'no.such.module' for type 'no.such.module:Thing': "
            "ModuleNotFoundError: No module named 'no'",
        ),
        (
            "tests.support.plugins.stamp:Nope",
            "module 'tests.support.plugins.stamp' has no 'Nope' "
            "(type 'tests.support.plugins.stamp:Nope')",
        ),
        (
            "tests.support.plugins.stamp:",
            "'tests.support.plugins.stamp:' is not 'package.module:Factory'",
        ),
    ],
)
def test_a_plugin_that_cannot_be_loaded_is_a_config_error(type_name: str, message: str) -> None:
    assert errors_of(f"""\
        middleware:
          p: {{type: "{type_name}"}}
        routes: [{{match: {{path: /}}, upstream: app, middleware: [p]}}]
        """) == [f"<string>:4: middleware.p.type: {message}"]


def test_a_plugin_that_raises_on_its_options_is_a_config_error() -> None:
    assert errors_of("""\
        middleware:
          boom: {type: "tests.support.plugins.stamp:Stamp", value: x, explode: true}
        routes: [{match: {path: /}, upstream: app, middleware: [boom]}]
        """) == [
        "<string>:4: middleware.boom: middleware 'tests.support.plugins.stamp:Stamp' "
        "failed to load: RuntimeError: the plugin blew up while reading its options"
    ]


def test_a_chain_must_be_a_list_and_an_instance_a_mapping() -> None:
    assert errors_of("""\
        middleware:
          odd: request_id
        global_middleware: {type: request_id}
        routes: [{match: {path: /}, upstream: app}]
        """) == [
        "<string>:4: middleware.odd: expected a mapping with a 'type', got a string ('request_id')",
        "<string>:5: global_middleware: expected a list, got a mapping",
    ]


def test_a_plugin_found_through_an_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_entry_point(tmp_path, monkeypatch)
    config = parse_config(
        config_with("""\
        middleware:
          s: {type: stamp-plugin, value: ep}
        routes: [{match: {path: /}, upstream: app, middleware: [s]}]
        """)
    )
    assert isinstance(config.middleware["s"].instance, Stamp)


# -- a cache before an access check ---------------------------------------------------------


class StoredAnswers:
    """A plugin that may answer from a store, as a cache does."""

    OPTIONS: tuple[str, ...] = ()
    SERVES_STORED = True

    def __init__(self, options: object) -> None:
        pass

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        return await call_next(request)


class Gate(StoredAnswers):
    """A plugin that controls access."""

    SERVES_STORED = False
    ACCESS_CONTROL = True


GUARDED = """\
middleware:
  keys: {type: api_key, keys: [k]}
  store: {type: cache}
  nets: {type: ip_filter, allow: [127.0.0.1]}
"""


def test_a_cache_before_an_access_check_is_refused_where_the_check_is_listed() -> None:
    # A response stored for a client with a key would be given to clients without one.
    errors = errors_of(
        GUARDED
        + "routes:\n"
        + "  - {name: open, match: {path: /}, upstream: app, middleware: [keys, store]}\n"
        + "  - name: shut\n"
        + "    match: {path: /x}\n"
        + "    upstream: app\n"
        + "    middleware: [store, keys, nets]\n"
    )
    assert errors == [
        f"<string>:{line}: routes[1].middleware[{index}]: '{name}' ({type_}) controls access,"
        " but 'store' (cache) comes before it and would answer from its store requests that"
        f" '{name}' never checked: list 'store' after the access checks"
        for line, index, name, type_ in [(12, 1, "keys", "api_key"), (12, 2, "nets", "ip_filter")]
    ]


def test_a_global_cache_is_refused_before_a_routes_access_check_and_not_after_a_global_one() -> (
    None
):
    errors = errors_of(
        GUARDED
        + "global_middleware: [store]\n"
        + "routes:\n"
        + "  - {name: open, match: {path: /}, upstream: app}\n"
        + "  - {name: shut, match: {path: /x}, upstream: app, middleware: [nets]}\n"
    )
    assert errors == [
        "<string>:10: routes[1].middleware[0]: 'nets' (ip_filter) controls access, but 'store'"
        " (cache) in global_middleware (name it in the routes' own chains instead) comes"
        " before it and would answer from its store requests that 'nets' never checked:"
        " list 'store' after the access checks"
    ]
    config = parse_config(
        config_with(
            GUARDED
            + "global_middleware: [nets]\n"
            + "routes:\n"
            + "  - {name: shut, match: {path: /x}, upstream: app, middleware: [keys, store]}\n"
        )
    )
    assert [spec.name for spec in config.routes[0].middleware] == ["keys", "store"]


def test_a_plugin_says_it_serves_stored_answers_or_controls_access() -> None:
    here = "tests.proxy.config.test_middleware"
    chain = f'[{{type: "{here}:StoredAnswers"}}, {{type: "{here}:Gate"}}]'
    errors = errors_of(
        f"routes:\n  - {{name: r, match: {{path: /}}, upstream: app, middleware: {chain}}}\n"
    )
    assert len(errors) == 1
    assert f"'{here}:Gate' ({here}:Gate) controls access, but '{here}:StoredAnswers'" in errors[0]


ACCESS_CONTROL = {
    "api_key",
    "basic_auth",
    "jwt",
    "forward_auth",
    "oidc",
    "client_cert",
    "ip_filter",
}


@pytest.mark.parametrize("type_name", known_types())
def test_each_built_in_type_says_whether_it_controls_access_or_serves_stored_answers(
    type_name: str,
) -> None:
    factory = resolve(type_name)
    assert getattr(factory, "ACCESS_CONTROL", False) is (type_name in ACCESS_CONTROL)
    assert getattr(factory, "SERVES_STORED", False) is (type_name == "cache")
