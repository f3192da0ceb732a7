"""`!public` is accepted wherever routes.yaml takes a string: tagging any set of the
strings of a file that uses every section and the built-in middleware changes nothing the
gateway runs, only what /config may show."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from proxy.config.document import PUBLIC_TAG
from proxy.config.load import parse_config
from proxy.config.model import Config, MiddlewareSpec
from tests.proxy.config.test_load_property import VALID

SOURCE = "routes.yaml"
STR_TAG = "tag:yaml.org,2002:str"
MIDDLEWARE = r"""
middleware:
  inject:
    type: headers
    request:
      set: {X-Upstream-Key: upstream-key, X-Env: prod}
      add: {X-Trace: "on"}
      remove: [X-Debug]
    response:
      set: {X-Served-By: gatehouse}
  keys:
    type: api_key
    header: X-API-Key
    keys: [sk-live-aaaaaaaa, {key: sk-live-bbbbbbbb, consumer: billing}]
    realm: partners
  user-jwt:
    type: jwt
    algorithms: [HS256]
    secret: a-literal-hs256-secret-of-32-bytes-or-more!
    issuer: https://idp.example.com/
    forward_claims: {sub: X-User-Id}
  browser:
    type: cors
    allow_origins: ["https://app.example.com"]
    allow_methods: [GET, POST]
    allow_headers: [X-API-Key]
    max_age: 10m
  office: {type: ip_filter, allow: [10.0.0.0/8, 192.168.1.7]}
  ids: {type: request_id, header: X-Request-ID}
  auth:
    type: forward_auth
    url: "http://auth.internal:9000/check?tenant=a"
    forward_headers: [Authorization]
    copy_headers: [X-User]
  small: {type: body_limit, max: 1MiB}
global_middleware: [ids]
"""
# VALID with the middleware section before its routes, and one more route that uses them.
RICH = VALID.replace("routes:\n", MIDDLEWARE.lstrip("\n") + "routes:\n", 1) + (
    "  - {name: guarded, match: {path_prefix: /guarded}, upstream: users,\n"
    "     middleware: [inject, keys, user-jwt, browser, office, auth, small]}\n"
)


def string_scalars(root: Node) -> Iterator[ScalarNode]:
    """Every string scalar, keys included, each once."""
    pending, seen = [root], set()
    while pending:
        node = pending.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, ScalarNode) and node.tag == STR_TAG:
            yield node
        elif isinstance(node, SequenceNode):
            pending += node.value
        elif isinstance(node, MappingNode):
            pending += [part for pair in node.value for part in pair]


def retagged(indices: set[int]) -> str:
    """RICH re-emitted, with the string scalars at `indices` (in walk order) `!public`."""
    root = yaml.compose(RICH, Loader=yaml.SafeLoader)
    assert root is not None
    for index, node in enumerate(string_scalars(root)):
        if index in indices:
            node.tag = PUBLIC_TAG
    return yaml.serialize(root, width=10**6)  # no wrapping: the same lines either way


RICH_ROOT = yaml.compose(RICH, Loader=yaml.SafeLoader)
assert RICH_ROOT is not None
COUNT = len(list(string_scalars(RICH_ROOT)))


def shape(config: Config) -> object:
    """What the gateway runs, middleware by name, type, options and line (their instances
    are objects of their own each time)."""

    def spec(item: MiddlewareSpec) -> tuple[str, str, object, int]:
        # The options as data: the emitter quotes a tagged string, which is only style.
        return (item.name, item.type, yaml.safe_load(item.options), item.line)

    return (
        replace(config, middleware={}, global_middleware=(), routes=(), concealed=frozenset()),
        {name: spec(item) for name, item in config.middleware.items()},
        [spec(item) for item in config.global_middleware],
        [
            (replace(route, middleware=()), [spec(m) for m in route.middleware])
            for route in config.routes
        ],
    )


BASELINE = parse_config(retagged(set()), SOURCE, env={})


def test_the_file_uses_every_section_and_many_strings() -> None:
    assert len(BASELINE.middleware) == 8
    assert BASELINE.routes[-1].name == "guarded"
    assert COUNT > 150


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sets(st.integers(0, COUNT - 1)) | st.just(set(range(COUNT))))
def test_public_strings_load_as_the_same_config(indices: set[int]) -> None:
    text = retagged(indices)

    config = parse_config(text, SOURCE, env={})

    assert text.count(PUBLIC_TAG) == len(indices)
    assert shape(config) == shape(BASELINE)
