"""`gatehouse schema` (proxy/tools/schema.py): the JSON Schema of routes.yaml agrees with
the loader. What the loader accepts is read off the loader itself, by recording every
mapping it reads (`NodeReader.mapping`: the key path, the keys allowed and required) and
every default it falls back to (`Fields.get`, `Options`), while it loads a config that
uses every section and every built-in middleware."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import jsonschema  # type: ignore[import-untyped]  # (types-jsonschema is not a dependency)
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from yaml.nodes import MappingNode, ScalarNode

from middleware.registry import BUILTIN
from proxy.config.document import ConfigError
from proxy.config.load import parse_config
from proxy.config.reader import Fields, NodeReader
from proxy.config.values import (
    DURATION_PATTERN,
    SIZE_PATTERN,
    ConfigValueError,
    parse_duration,
    parse_size,
)
from proxy.plugin.options import Options
from proxy.tools.schema import build_schema
from tests.support.gateway_process import run_cli
from tests.support.tls import make_tls_files

ROOT = Path(__file__).resolve().parents[3]
SCHEMA = build_schema()
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
_TOKEN_RE = re.compile(r"\.?([A-Za-z0-9_-]+)|\[(\d+)\]|\['((?:[^'\\]|\\.)*)'\]")


class _Loader(yaml.SafeLoader):
    """YAML as the gateway reads it, and as editors do (YAML 1.2): keys are their text
    (`on:` is "on", not true), and `!public` is a string."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        self.flatten_mapping(node)
        return {
            key.value if isinstance(key, ScalarNode) else self.construct_object(key, deep): (
                self.construct_object(value, deep)
            )
            for key, value in node.value
        }


def _public(loader: yaml.SafeLoader, node: yaml.Node) -> str:
    assert isinstance(node, ScalarNode)
    return str(loader.construct_scalar(node))


_Loader.add_constructor("!public", _public)


def _document(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass


def _errors(document: Any) -> list[str]:
    return [error.message for error in VALIDATOR.iter_errors(document)]


# --- the whole file --------------------------------------------------------------------


def _everything(tmp: Path) -> str:
    """A config that reads every mapping of the loader and every built-in middleware."""
    tls = make_tls_files(tmp)
    hashed = bcrypt.hashpw(b"secret", bcrypt.gensalt(4)).decode()
    return f"""
listeners:
  - {{bind: "127.0.0.1:0", name: plain, http2: true, proxy_protocol: true,
      redirect_https: {{port: 8443, status: 308}}}}
  - bind: "127.0.0.1:0"
    tls: {{cert: "{tls.cert}", key: "{tls.key}", min_version: "1.2"}}
  - bind: "127.0.0.1:0"
    tls:
      certificates: [{{cert: "{tls.cert}", key: "{tls.key}"}}]
      client_auth: {{ca: "{tls.ca}", mode: require}}
      acme: {{directory: "https://acme.example/dir", domains: [www.example.com],
              storage: "{tmp}/acme", email: ops@example.com, challenge: http-01,
              ca: "{tls.ca}", renew_before: 30d}}
client_ip: {{trusted_proxies: [10.0.0.0/8], source: x-forwarded-for}}
admin: {{bind: "127.0.0.1:0", token: "0123456789abcdef0123", hosts: [admin.internal]}}
limits: {{max_head_bytes: 32KiB, max_body_size: 1Mi, header_timeout: 10s,
          body_timeout: 1m, keepalive_timeout: 75s}}
http2: {{max_concurrent_streams: 100, max_header_list_size: 32KiB, initial_window_size: 1MiB,
         max_resets_per_second: 200, max_control_frames_per_second: 500}}
http1_parser: auto
workers: 2
shutdown: {{grace_period: 1m30s}}
reload: {{watch: true, interval: 1s}}
metrics: {{enabled: true}}
logging: {{format: text}}
tracing:
  otlp_endpoint: "http://127.0.0.1:4318"
  sample_ratio: 1.0
  parent_based: true
  service_name: gatehouse
  headers: {{X-Key: v}}
path_normalization: {{escaped_slashes: reject, merge_slashes: true}}
headers_with_underscores: drop
upstreams:
  web:
    endpoints: ["http://127.0.0.1:8001", {{url: "http://127.0.0.1:8002", weight: 2}}]
    balance: {{sticky: {{cookie: pin, ttl: 1h}}}}
    timeouts: {{connect: 2s, read: 30s}}
    pool: {{max_connections: 10, max_idle: 5, idle_timeout: 4s, wait_timeout: 5s}}
    protocol: http1
    health_check: {{type: http, path: /healthz, expect: [200, "300-399"], interval: 5s,
                    timeout: 1s, healthy_threshold: 2, unhealthy_threshold: 3, jitter: 10%}}
    outlier: {{consecutive_failures: 5, consecutive_5xx: 3, base_ejection: 30s,
               max_ejection: 5m, max_ejection_percent: 50}}
    retries: {{attempts: 3, on: [reset, 503], per_try_timeout: 2s,
               backoff: {{base: 25ms, max: 250ms}}, budget: {{percent: 20, min: 3}},
               body_limit: 64KiB}}
    circuit_breaker: {{max_connections: 10, max_pending: 5, max_requests: 10}}
    resolve: {{interval: 30s}}
  hashed:
    endpoints: ["https://127.0.0.1:8443"]
    balance: {{hash: {{header: X-User}}}}
    protocol: h2
    tls: {{ca: "{tls.ca}", verify: true, sni: localhost, cert: "{tls.cert}", key: "{tls.key}"}}
middleware:
  ids: {{type: request_id, header: X-Request-ID, trust_incoming: true, response: true}}
  keys:
    type: api_key
    header: X-API-Key
    query: api_key
    keys: [plain-key-0123, {{key: mapped-key-0123, consumer: partner}}]
    consumer_header: X-Consumer
    realm: gatehouse
  users:
    type: basic_auth
    users: {{alice: "{hashed}"}}
    realm: gatehouse
    forward_authorization: false
    consumer_header: X-Consumer
    cache_ttl: 60s
    cache_size: 1024
  tokens:
    type: jwt
    algorithms: [HS256]
    secret: a-long-enough-secret-for-hs256-0123456789
    issuer: https://issuer.example
    audience: [api]
    leeway: 30s
    required_claims: [sub]
    forward_claims: {{sub: X-Subject}}
    consumer_claim: sub
    cookie: token
    forward_token: true
    realm: gatehouse
  keyset:
    type: jwt
    algorithms: [RS256]
    jwks_url: https://keys.example/jwks.json
    jwks_refresh: 5m
    jwks_min_refresh: 30s
    jwks_timeout: 5s
    jwks_wait: 1s
    jwks_ca_file: "{tls.ca}"
  sso:
    type: oidc
    issuer: https://idp.example
    client_id: gateway
    client_secret: a-client-secret
    cookie_secret: [a-cookie-secret-of-32-bytes-or-more-0123]
    forward_claims: {{email: X-Email}}
    ca_file: "{tls.ca}"
  auth:
    type: forward_auth
    url: https://auth.example/check
    timeout: 2s
    forward_headers: [Authorization]
    copy_headers: [X-User]
    tls: {{ca: "{tls.ca}", verify: true, sni: auth.example}}
  local:
    type: rate_limit
    rate: 100/s
    burst: 10
    key: ip
    backend: local
    headers: true
    max_keys: 1000
  shared:
    type: rate_limit
    rate: 100/s
    key: "header:X-User"
    backend: redis
    redis: {{url: "redis://127.0.0.1:6379/0", timeout: 50ms, on_redis_error: allow}}
  pages:
    type: cache
    backend: memory
    max_object_size: 1MiB
    max_size: 64MiB
    key: {{method: true, host: true, query: sorted, query_keep: [a], query_drop: [b],
          headers: [Accept-Language]}}
    heuristic: 0.1
    max_stale: 1m
    keep_stale: 10m
    coalesce: true
    coalesce_timeout: 5s
    status_name: edge
  shared-pages:
    type: cache
    backend: redis
    redis: {{url: "redis://127.0.0.1:6379/0", timeout: 250ms}}
  log: {{type: access_log, fields: [method, path, status], sample: 1, output: stdout,
         queue_size: 100}}
  hdrs: {{type: headers, request: {{set: {{X-A: a}}, add: {{X-B: b}}, remove: [X-C]}},
          response: {{set: {{X-D: d}}}}}}
  cors: {{type: cors, allow_origins: ["https://app.example"], allow_methods: [GET],
          allow_headers: [X-A], expose_headers: [X-B], allow_credentials: false, max_age: 1h}}
  allow: {{type: ip_filter, allow: [10.0.0.0/8], deny: [10.0.0.1]}}
  cap: {{type: body_limit, max: 1Mi}}
  squeeze: {{type: compress, encodings: [br, gzip], min_size: 1KiB, content_types: [text/*],
             gzip_level: 6, br_level: 4, zstd_level: 3}}
  mtls:
    type: client_cert
    allow:
      - {{subject: "CN=a", issuer: "CN=ca", common_name: a, dns: "*.example.com",
          uri: "spiffe://example.org/*", email: "*@example.com"}}
global_middleware: [ids, log]
routes:
  - name: all
    match:
      host: api.example.com
      path_prefix: /api/
      methods: [GET, POST]
      headers: {{X-Env: prod, X-Ver: {{regex: "v[12]"}}, X-Debug: {{present: true}}}}
      query: {{debug: {{value: "1"}}}}
    upstream: web
    middleware: [keys, users, tokens, keyset, auth, local, shared, hdrs, cors, allow, cap,
                 mtls, squeeze, {{type: request_id}}]
    rewrite: {{strip_prefix: /api, add_prefix: /v1, regex: "^/old/(.*)$",
               replacement: '/new/\\1', host: web.internal}}
    max_body_size: 1MiB
    websocket: {{enabled: true, idle_timeout: 10m, max_duration: 24h}}
    forward_raw_path: false
    request_buffering: {{max_size: 1MiB}}
  - name: hashed
    match: {{path: /h}}
    upstream: hashed
  - name: canary
    match: {{path: /c}}
    upstream:
      split: [{{upstream: web, weight: 9}}, {{upstream: hashed, weight: 1}}]
      sticky: {{cookie: session}}
    mirror: {{upstream: hashed, percent: 50, max_body: 64KiB, max_in_flight: 8, timeout: 2s}}
  - name: canary-by-header
    match: {{path: /ch}}
    upstream: {{split: [{{upstream: web, weight: 1}}], sticky: {{header: X-User}}}}
  - name: moved
    match: {{path_regex: "^/old/(?P<rest>.*)$"}}
    redirect: {{to: "https://{{{{host}}}}/new/{{{{rest}}}}{{{{query}}}}", status: 301}}
  - name: down
    match: {{path: /down}}
    respond: {{status: 503, body: "back soon", headers: {{Retry-After: "120"}}}}
"""


class _Recorder:
    """What the loader reads: each mapping (path, allowed, required) and each default it
    falls back to (path, key, default)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.mappings: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = []
        self.defaults: list[tuple[str, str, object]] = []
        mapping, get, option_get = NodeReader.mapping, Fields.get, Options._get

        def record_mapping(
            reader: NodeReader, node: Any, path: str, allowed: Any, required: Any = ()
        ) -> Fields:
            self.mappings.append((path, tuple(allowed), tuple(required)))
            return mapping(reader, node, path, allowed, required)

        def record_get(fields: Fields, key: str, parse: Any, default: object) -> object:
            self.defaults.append((fields.path, key, default))
            return get(fields, key, parse, default)

        def record_option(options: Options, key: str, parse: Any, default: object) -> object:
            self.defaults.append((options.path, key, default))
            return option_get(options, key, parse, default)

        monkeypatch.setattr(NodeReader, "mapping", record_mapping)
        monkeypatch.setattr(Fields, "get", record_get)
        monkeypatch.setattr(Options, "_get", record_option)


def _resolve(schema: Any) -> Iterator[dict[str, Any]]:
    """`schema` and every alternative it stands for ($ref, anyOf, allOf, if/then)."""
    if not isinstance(schema, dict):
        return
    ref = schema.get("$ref")
    if ref is not None:
        target: Any = SCHEMA
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]
        yield from _resolve(target)
    yield schema
    for key in ("anyOf", "oneOf", "allOf"):
        for branch in schema.get(key, ()):
            yield from _resolve(branch)
    yield from _resolve(schema.get("then"))


def _at(path: str) -> list[dict[str, Any]]:
    """The object schemas (with properties) that describe the value at key path `path`."""
    current = [SCHEMA]
    for match in _TOKEN_RE.finditer(path):
        name, index, quoted = match.groups()
        following: list[dict[str, Any]] = []
        for schema in current:
            for alternative in _resolve(schema):
                if index is not None and isinstance(alternative.get("items"), dict):
                    following.append(alternative["items"])
                key = name if name is not None else quoted
                if key is None:
                    continue
                if key in alternative.get("properties", {}):
                    following.append(alternative["properties"][key])
                elif isinstance(alternative.get("additionalProperties"), dict):
                    following.append(alternative["additionalProperties"])
        current = following
    return [found for schema in current for found in _resolve(schema) if "properties" in found]


def _objects(schema: Any) -> Iterator[dict[str, Any]]:
    """Every object schema with properties in `schema`."""
    if isinstance(schema, dict):
        if "properties" in schema:
            yield schema
        for key, value in schema.items():
            if key != "if":  # a condition on the type, not a mapping of the file
                yield from _objects(value)
    elif isinstance(schema, list):
        for value in schema:
            yield from _objects(value)


@pytest.fixture(scope="module")
def everything(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _everything(tmp_path_factory.mktemp("schema"))


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch, everything: str) -> _Recorder:
    recorder = _Recorder(monkeypatch)
    parse_config(everything, "everything.yaml", env={})
    return recorder


def test_the_schema_is_a_valid_draft_2020_12_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_the_everything_config_loads_and_validates(everything: str) -> None:
    parse_config(everything, "everything.yaml", env={})  # raises with the loader's errors
    assert _errors(_document(everything)) == []


def test_every_mapping_the_loader_reads_has_the_same_keys_in_the_schema(
    recorded: _Recorder,
) -> None:
    """A key the loader accepts (a section reader's or a middleware's) that the schema
    lacks, or the other way round, fails here; so does a required key it does not
    require."""
    reached: set[int] = set()
    for path, allowed, required in recorded.mappings:
        candidates = _at(path)
        same = [c for c in candidates if set(c["properties"]) == set(allowed)]
        assert same, f"{path or '(top)'}: the loader allows {sorted(allowed)}, the schema " + (
            str([sorted(c["properties"]) for c in candidates]) if candidates else "nothing"
        )
        for schema in same:
            assert set(required) <= set(schema.get("required", ())), path
            reached.add(id(schema))
    # Every mapping of the schema was read by the loader above (the middleware entry's
    # own, which holds only the type discriminator, stands for the per-type ones).
    entry = SCHEMA["$defs"]["middleware"]
    unread = [
        sorted(schema["properties"])
        for schema in _objects(SCHEMA)
        if id(schema) not in reached and schema is not entry
    ]
    assert unread == []


def test_every_built_in_middleware_is_in_the_schema() -> None:
    for name in BUILTIN:
        options = SCHEMA["$defs"][f"middleware.{name}"]
        assert options["properties"]["type"] == {
            "const": name,
            **{"description": options["properties"]["type"]["description"]},
        }
        for key, option in options["properties"].items():
            assert option.get("description"), f"{name}.{key} has no description"


def _amount(value: object, option: dict[str, Any]) -> object:
    """A default as the loader holds it: durations in seconds, sizes in bytes."""
    patterns = {branch.get("pattern") for branch in option.get("anyOf", ())}
    if isinstance(value, str) and DURATION_PATTERN in patterns:
        return parse_duration(value)
    if isinstance(value, str) and SIZE_PATTERN in patterns:
        return parse_size(value)
    if isinstance(value, dict) and "max_size" in value:  # request_buffering: {max_size}
        return parse_size(value["max_size"])
    return value


def _plain(value: object) -> object:
    if isinstance(value, tuple | list | frozenset | set):
        return sorted(str(item) for item in value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


_PLAIN_TYPES = (str, int, float, bool, type(None), tuple, list, frozenset)
# The loader holds these defaults in another form than they are written.
_WRITTEN_OTHERWISE = {
    "expect",  # ((200, 399),) is written "200-399"
    "max_idle",  # 64, or max_connections when that is smaller (10 above)
}


def test_the_schemas_defaults_are_the_loaders(recorded: _Recorder) -> None:
    allowed = {path: set(keys) for path, keys, _ in recorded.mappings}
    compared = 0
    for path, key, default in recorded.defaults:
        # (of the middleware types' mappings, the one of this entry's type)
        for schema in (c for c in _at(path) if set(c["properties"]) == allowed[path]):
            option = schema["properties"].get(key)
            if option is None or "default" not in option or key in _WRITTEN_OTHERWISE:
                continue
            if not isinstance(default, _PLAIN_TYPES):  # parsed (BalanceConfig, KeySpec...)
                continue
            expected = _plain(_amount(option["default"], option))
            assert _plain(default) == expected, f"{path}.{key}"
            compared += 1
    assert compared > 100


# --- what the schema accepts and refuses, as the loader does ---------------------------


def _configs() -> Iterator[tuple[str, str]]:
    """routes.yaml, every gatehouse config among the examples' YAML files (the others are
    compose, Prometheus and Grafana files), and the bench templates filled in."""
    yield "routes.yaml", (ROOT / "routes.yaml").read_text()
    for path in sorted((ROOT / "examples").rglob("*.yaml")):
        document = _document(path.read_text())
        if isinstance(document, dict) and "listeners" in document:
            yield str(path.relative_to(ROOT)), path.read_text()
    for path in sorted((ROOT / "bench").glob("*.tmpl")):
        text = path.read_text()
        for name, value in (
            ("port", "8080"),
            ("upstream_port", "8001"),
            ("upstream", "127.0.0.1:8001"),
        ):
            text = text.replace("{" + name + "}", value)
        yield str(path.relative_to(ROOT)), text


@pytest.mark.parametrize(("name", "text"), list(_configs()), ids=[n for n, _ in _configs()])
def test_the_bundled_configs_validate(name: str, text: str) -> None:
    assert _errors(_document(text)) == []


_BASE = """
listeners: [{bind: "127.0.0.1:0"}]
upstreams: {web: {endpoints: ["http://127.0.0.1:8001"]}}
routes: [{match: {path_prefix: /}, upstream: web}]
"""


@pytest.mark.parametrize(
    ("extra", "loader_says"),
    [
        ("limits: {max_body_sise: 1MiB}", "unknown key 'max_body_sise'"),
        ("limits: {header_timeout: 30s1m}", "invalid duration"),
        ("limits: {max_body_size: 10m}", "ambiguous unit"),
        ("workers: two", "expected an integer"),
        ("http1_parser: llhttp", "unsupported parser"),
        ("middleware: {ids: {type: request_id, heder: X-Id}}", "unknown key 'heder'"),
        ("middleware: {lim: {type: rate_limit, burst: 1}}", "missing required key 'rate'"),
        ("middleware: {ids: {type: request_id, response: maybe}}", "expected true or false"),
        ("middleware: {cap: {type: body_limit, max: lots}}", "invalid size"),
        ("middleware: {x: {header: X-Id}}", "missing required key 'type'"),
        ("reload: {watch: true, interval: 1s, extra: 1}", "unknown key 'extra'"),
    ],
)
def test_a_wrong_config_is_refused_by_the_schema_as_by_the_loader(
    extra: str, loader_says: str
) -> None:
    text = _BASE + extra + "\n"
    with pytest.raises(ConfigError) as refused:
        parse_config(text, "wrong.yaml", env={})
    assert loader_says in str(refused.value)
    assert _errors(_document(text)) != []
    assert _errors(_document(_BASE)) == []


def test_a_variable_reference_is_accepted_where_a_number_is() -> None:
    assert _errors(_document(_BASE + 'workers: "${WORKERS:-2}"\n')) == []


# --- durations and sizes: the patterns say what the parsers accept ----------------------

_DURATION_TEXT = st.text(alphabet="0123456789.nsumhd\u00b5 -", max_size=12)
_SIZE_TEXT = st.text(alphabet="0123456789.bBkKmMgGtTiI -", max_size=8)


@given(_DURATION_TEXT)
def test_the_duration_pattern_accepts_what_parse_duration_does(text: str) -> None:
    try:
        parse_duration(text)
        parsed = True
    except ConfigValueError as exc:
        parsed = "too large" in str(exc)
    assert bool(re.search(DURATION_PATTERN, text)) == parsed, text


@given(_SIZE_TEXT)
def test_the_size_pattern_accepts_what_parse_size_does(text: str) -> None:
    try:
        parse_size(text)
        parsed = True
    except ConfigValueError as exc:
        parsed = "whole number of bytes" in str(exc)
    assert bool(re.search(SIZE_PATTERN, text)) == parsed, text


# --- the command ----------------------------------------------------------------------


def test_gatehouse_schema_prints_the_schema() -> None:
    done = run_cli("schema")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == SCHEMA
