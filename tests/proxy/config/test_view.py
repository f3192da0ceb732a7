"""proxy.config.view: what the admin listener's /config shows. Every file here is a valid
routes.yaml (checked with parse_config first, since only a running config is shown) and
the view is read back through JSON, as a client of /config gets it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from textwrap import dedent
from typing import Any

import yaml

from proxy.config.load import parse_config
from proxy.config.view import REDACTED, config_view, redact
from tests.support.tls import TlsFiles

SOURCE = "/etc/gatehouse/routes.yaml"
ENV = {
    "USERS_API_KEY": "env-users-key-value",
    "BILLING_API_KEY": "env-billing-key-value",
    "JWT_SECRET": "env-jwt-secret-0123456789abcdef0123456789",
    "REDIS_PASSWORD": "env-redis-password",
    "UPSTREAM_TOKEN": "env-upstream-token",
}
HEAD = """\
listeners: [{bind: ":0"}]
upstreams:
  app: {endpoints: [http://127.0.0.1:8000]}
"""


class _PublicLoader(yaml.SafeLoader):
    """SafeLoader that reads `!public` strings (to list the instance names)."""


def _public(loader: _PublicLoader, node: yaml.ScalarNode) -> str:
    return loader.construct_scalar(node)


_PublicLoader.add_constructor("!public", _public)


def view(text: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The /config document for `text`, after checking that `text` is a valid config, with
    the positions its loading marked hidden (as the supervisor shows it)."""
    text = dedent(text)
    config = parse_config(text, source=SOURCE, env=ENV if env is None else env)
    answer = config_view(text, SOURCE, config.concealed)
    shown: dict[str, Any] = json.loads(json.dumps(answer, allow_nan=False))
    return shown


def middleware_of(text: str) -> dict[str, Any]:
    """The view of `HEAD` + a `middleware:` section + a route using every instance."""
    names = list(yaml.load(dedent(text), Loader=_PublicLoader))
    route = f"{{name: r, match: {{path_prefix: /}}, upstream: app, middleware: {names}}}"
    document = (
        HEAD
        + "middleware:\n"
        + "".join(f"  {line}\n" for line in dedent(text).splitlines())
        + f"routes:\n  - {route}\n"
    )
    shown: dict[str, Any] = view(document)["config"]["middleware"]
    return shown


def leaked(shown: object, *secrets: str) -> list[str]:
    text = json.dumps(shown)
    return [secret for secret in secrets if secret in text]


# --- the secrets of each middleware and listener --------------------------------------


def test_api_key_keys_are_redacted_and_the_rest_shown(tmp_path: Path) -> None:
    keys_file = tmp_path / "api-keys.txt"
    keys_file.write_text("sk-live-dddddddd partner\n")
    shown = middleware_of(f"""
        partner-keys:
          type: api_key
          header: X-API-Key
          keys: [sk-live-aaaaaaaa, {{key: sk-live-bbbbbbbb, consumer: billing}}]
          keys_file: {keys_file}
          realm: partners
    """)
    assert shown["partner-keys"] == {
        "type": "api_key",
        "header": "X-API-Key",
        "keys": [REDACTED, {"key": REDACTED, "consumer": REDACTED}],
        "keys_file": str(keys_file),
        "realm": "partners",
    }


def test_basic_auth_users_are_redacted_in_both_forms(tmp_path: Path) -> None:
    bcrypt = "$2y$10$.vGA1O9wmRjrwAVXD98HNOgsNpDczlqm3Jq7KnEd1rVAGv3Fykk1a"
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"carol:{bcrypt}\n")
    shown = middleware_of(f"""
        staff:
          type: basic_auth
          users: {{alice: "{bcrypt}"}}
          realm: staff
        ops:
          type: basic_auth
          users: ["bob:{bcrypt}"]
          htpasswd_file: {htpasswd}
    """)
    assert shown["staff"] == {"type": "basic_auth", "users": {"alice": REDACTED}, "realm": "staff"}
    assert shown["ops"]["users"] == [REDACTED]
    assert shown["ops"]["htpasswd_file"] == str(htpasswd)
    assert leaked(shown, bcrypt) == []


def test_jwt_secret_is_redacted() -> None:
    secret = "a-literal-hs256-secret-of-32-bytes-or-more!"
    shown = middleware_of(f"""
        user-jwt:
          type: jwt
          algorithms: [HS256]
          secret: "{secret}"
          issuer: https://idp.example.com/
          forward_claims: {{sub: X-User-Id}}
    """)
    assert shown["user-jwt"] == {
        "type": "jwt",
        "algorithms": ["HS256"],
        "secret": REDACTED,
        "issuer": "https://idp.example.com/",
        "forward_claims": {"sub": "X-User-Id"},
    }


def test_every_header_value_the_headers_middleware_sends_is_hidden() -> None:
    shown = middleware_of("""
        inject:
          type: headers
          request:
            set:
              Authorization: "Bearer upstream-token-1"
              X-Internal-Secret: upstream-secret-2
              X-Env: prod-3
              X-Region: !public eu-west-1
            add: {X-Tenant-Signature: tenant-sig-4, X-Via: !public gatehouse}
            remove: [Authorization, X-API-Key]
          response:
            set: {Set-Cookie: "sid=response-cookie-5", X-Served-By: node-6}
            add: {X-Debug: !public "on"}
    """)
    request = shown["inject"]["request"]
    # By position, whatever the header is called; !public values as written.
    assert request["set"] == {
        "Authorization": REDACTED,
        "X-Internal-Secret": REDACTED,
        "X-Env": REDACTED,
        "X-Region": "eu-west-1",
    }
    assert request["add"] == {"X-Tenant-Signature": REDACTED, "X-Via": "gatehouse"}
    assert request["remove"] == ["Authorization", "X-API-Key"]  # names, not values
    assert shown["inject"]["response"] == {
        "set": {"Set-Cookie": REDACTED, "X-Served-By": REDACTED},
        "add": {"X-Debug": "on"},
    }
    assert leaked(shown, "upstream-token-1", "upstream-secret-2", "prod-3", "tenant-sig-4") == []
    assert leaked(shown, "response-cookie-5", "node-6") == []


def test_route_matcher_values_and_regexes_are_hidden() -> None:
    shown = view(
        HEAD
        + dedent("""
        routes:
          - name: internal
            upstream: app
            match:
              path_prefix: /
              headers:
                X-Internal-Token: s3cr3t-match-1
                X-Signature: {regex: "^sig-2-[0-9a-f]+$"}
                X-Tenant: {value: tenant-3}
                X-Env: !public prod
                X-Debug: {present: true}
              query:
                access_token: query-token-4
                sig: {regex: "^query-sig-5"}
                lang: !public en
        """)
    )
    match = shown["config"]["routes"][0]["match"]
    assert match["headers"] == {
        "X-Internal-Token": REDACTED,
        "X-Signature": {"regex": REDACTED},
        "X-Tenant": {"value": REDACTED},
        "X-Env": "prod",
        "X-Debug": {"present": True},
    }
    assert match["query"] == {"access_token": REDACTED, "sig": {"regex": REDACTED}, "lang": "en"}
    assert match["path_prefix"] == "/"
    assert (
        leaked(shown, "s3cr3t-match-1", "sig-2", "tenant-3", "query-token-4", "query-sig-5") == []
    )


def test_a_hidden_value_stays_hidden_where_an_alias_repeats_it() -> None:
    shown = view(
        HEAD
        + dedent("""
        middleware:
          inject: {type: headers, request: {set: {X-Upstream-Key: &key upstream-key-1}}}
        routes:
          - {name: *key, upstream: app, match: {path_prefix: /}, middleware: [inject]}
        """)
    )
    # The alias shares the node: hidden in a place that shows its values otherwise.
    assert shown["config"]["routes"][0]["name"] == REDACTED
    assert leaked(shown, "upstream-key-1") == []


def test_references_in_hidden_positions_are_shown_as_written() -> None:
    shown = middleware_of("""
        inject:
          type: headers
          request: {set: {X-Upstream-Key: "${UPSTREAM_TOKEN}", X-Other: "${UNSET:-a-default-6}"}}
    """)
    assert shown["inject"]["request"]["set"] == {
        "X-Upstream-Key": "${UPSTREAM_TOKEN}",
        "X-Other": "${UNSET:-" + REDACTED + "}",
    }


def test_a_plugin_hides_the_options_it_conceals() -> None:
    shown = middleware_of("""
        stamp:
          type: tests.support.plugins.stamp:Stamp
          header: X-Stamp
          value: stamp-credential-7
    """)
    assert shown["stamp"] == {
        "type": "tests.support.plugins.stamp:Stamp",
        "header": "X-Stamp",
        "value": REDACTED,
    }


def test_public_shows_a_value_under_a_secret_key_and_a_whole_url() -> None:
    shown = middleware_of("""
        demo-keys: {type: api_key, keys: [!public demo-key-everyone-knows, sk-live-eeeeeeee]}
        auth:
          type: forward_auth
          url: !public "http://auth.internal:9000/check?tenant=demo"
    """)
    assert shown["demo-keys"]["keys"] == ["demo-key-everyone-knows", REDACTED]
    assert shown["auth"]["url"] == "http://auth.internal:9000/check?tenant=demo"


def test_the_tls_private_key_is_redacted(tls_files: TlsFiles) -> None:
    shown = view(f"""
        listeners:
          - bind: ":0"
            tls: {{cert: "{tls_files.cert}", key: "{tls_files.key}"}}
        upstreams:
          app: {{endpoints: [http://127.0.0.1:8000]}}
        routes: []
    """)
    assert shown["config"]["listeners"][0]["tls"] == {"cert": str(tls_files.cert), "key": REDACTED}


def test_the_userinfo_of_a_url_is_redacted() -> None:
    shown = middleware_of("""
        shared:
          type: rate_limit
          rate: 100/s
          backend: redis
          redis: {url: "redis://gatehouse:hunter2-redis@redis.internal:6379/0", timeout: 50ms}
        anonymous:
          type: rate_limit
          rate: 100/s
          backend: redis
          redis: {url: "rediss://:hunter3-redis@redis.internal:6380/1"}
        by-env:
          type: rate_limit
          rate: 100/s
          backend: redis
          redis: {url: "redis://:${REDIS_PASSWORD}@redis.internal:6379/0"}
        by-env-or-default:
          type: rate_limit
          rate: 100/s
          backend: redis
          redis: {url: "redis://:${REDIS_PASSWORD:-dev-redis-pass}@redis.internal:6379/0"}
    """)
    assert shown["shared"]["redis"] == {
        "url": f"redis://{REDACTED}:{REDACTED}@redis.internal:6379/0",
        "timeout": "50ms",
    }
    assert shown["anonymous"]["redis"]["url"] == f"rediss://:{REDACTED}@redis.internal:6380/1"
    assert shown["by-env"]["redis"]["url"] == "redis://:${REDIS_PASSWORD}@redis.internal:6379/0"
    assert shown["by-env-or-default"]["redis"]["url"] == (
        "redis://:${REDIS_PASSWORD:-" + REDACTED + "}@redis.internal:6379/0"
    )


def test_query_strings_of_urls_are_redacted_everywhere() -> None:
    shown = view(
        dedent("""
        listeners: [{bind: ":0"}]
        upstreams:
          app: {endpoints: ["http://10.0.0.5:8000"]}
        middleware:
          auth:
            type: forward_auth
            url: "http://auth.internal:9000/check?token=fa-token-1&mode=strict"
          idp:
            type: jwt
            algorithms: [RS256]
            jwks_url: "https://idp.example.com/jwks?access_token=jwks-token-2"
        routes:
          - {name: r, match: {path_prefix: /}, upstream: app, middleware: [auth, idp]}
        """)
    )["config"]
    middleware = shown["middleware"]
    assert middleware["auth"]["url"] == (
        f"http://auth.internal:9000/check?token={REDACTED}&mode={REDACTED}"
    )
    assert middleware["idp"]["jwks_url"] == f"https://idp.example.com/jwks?access_token={REDACTED}"
    assert shown["upstreams"]["app"]["endpoints"] == ["http://10.0.0.5:8000"]
    assert leaked(shown, "fa-token-1", "strict", "jwks-token-2") == []


def test_names_chosen_for_upstreams_and_middleware_are_not_taken_for_secrets() -> None:
    # The README's own names: an upstream `users` and a middleware instance `keys`.
    shown = view("""
        listeners: [{bind: ":0"}]
        upstreams:
          users: {endpoints: [http://10.0.0.5:8000], balance: round_robin}
          tokens: {endpoints: [http://10.0.0.6:8000]}
        middleware:
          keys: {type: api_key, header: X-API-Key, keys: [sk-live-cccccccc]}
        routes:
          - {name: users-api, match: {path_prefix: /}, upstream: users, middleware: [keys]}
    """)["config"]
    assert shown["upstreams"] == {
        "users": {"endpoints": ["http://10.0.0.5:8000"], "balance": "round_robin"},
        "tokens": {"endpoints": ["http://10.0.0.6:8000"]},
    }
    assert shown["middleware"]["keys"] == {
        "type": "api_key",
        "header": "X-API-Key",
        "keys": [REDACTED],
    }


# --- ${VAR} references -----------------------------------------------------------------


def test_references_are_shown_as_written_and_their_values_never() -> None:
    document = view(
        HEAD
        + dedent("""
        middleware:
          partner-keys:
            type: api_key
            keys: ["${USERS_API_KEY}", {key: "${BILLING_API_KEY}", consumer: billing}]
          user-jwt: {type: jwt, algorithms: [HS256], secret: "${JWT_SECRET}"}
        routes:
          - {name: r, match: {path_prefix: /}, upstream: app, middleware: [partner-keys, user-jwt]}
        """)
    )
    shown = document["config"]["middleware"]
    assert shown["partner-keys"]["keys"] == [
        "${USERS_API_KEY}",
        {"key": "${BILLING_API_KEY}", "consumer": REDACTED},
    ]
    assert shown["user-jwt"]["secret"] == "${JWT_SECRET}"
    assert leaked(document, *ENV.values()) == []


def test_the_default_of_a_reference_is_a_literal_and_is_redacted() -> None:
    shown = middleware_of("""
        user-jwt:
          type: jwt
          algorithms: [HS256]
          secret: "${UNSET_JWT_SECRET:-a-default-secret-written-in-the-file}"
        partner-keys: {type: api_key, keys: ["${USERS_API_KEY:-sk-default-key}"]}
    """)
    assert shown["user-jwt"]["secret"] == "${UNSET_JWT_SECRET:-" + REDACTED + "}"
    assert shown["partner-keys"]["keys"] == ["${USERS_API_KEY:-" + REDACTED + "}"]
    assert leaked(shown, "a-default-secret-written-in-the-file", "sk-default-key") == []


def test_text_around_a_reference_or_an_escaped_one_is_redacted() -> None:
    shown = middleware_of("""
        inject:
          type: headers
          request: {set: {Authorization: "Bearer ${UPSTREAM_TOKEN}"}}
        partner-keys: {type: api_key, keys: ["$${LITERAL_KEY}"]}
    """)
    assert shown["inject"]["request"]["set"] == {"Authorization": REDACTED}
    assert shown["partner-keys"]["keys"] == [REDACTED]  # a literal "${LITERAL_KEY}"


def test_references_outside_secrets_are_shown_as_written() -> None:
    shown = view(
        'listeners: [{bind: ":0"}]\nadmin: {bind: "${ADMIN_BIND:-127.0.0.1:9901}"}\n'
        "upstreams:\n  app: {endpoints: ['http://127.0.0.1:${APP_PORT:-8001}']}\nroutes: []\n"
    )["config"]
    assert shown["admin"] == {"bind": "${ADMIN_BIND:-127.0.0.1:9901}"}
    assert shown["upstreams"]["app"]["endpoints"] == ["http://127.0.0.1:${APP_PORT:-8001}"]


# --- the document as a whole ------------------------------------------------------------


def test_source_and_sha256_name_the_file_as_written() -> None:
    text = HEAD + "routes: []\n"
    shown = view(text)
    assert shown["source"] == SOURCE
    assert shown["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert view(text + "# a comment changes the file\n")["sha256"] != shown["sha256"]
    assert set(shown) == {"source", "sha256", "config"}


def test_a_config_without_secrets_is_shown_unchanged() -> None:
    text = """
        listeners:
          - {bind: 0.0.0.0:8080, name: public}
        workers: 2
        limits: {max_head_bytes: 16KiB, header_timeout: 5s}
        upstreams:
          app:
            endpoints: [http://127.0.0.1:8000, {url: http://127.0.0.1:8001, weight: 3}]
            timeouts: {connect: 1.5s, read: 1h}
        routes:
          - name: api
            match: {host: api.example.com, path_prefix: /v1, methods: [GET, POST]}
            upstream: app
            rewrite: {strip_prefix: /v1, regex: "^/old/(.*)$", replacement: "/new/\\\\1"}
            max_body_size: 1MiB
    """
    assert view(text)["config"] == yaml.safe_load(dedent(text))


def test_dates_in_the_file_are_still_json() -> None:
    # The config reader takes a date for text ("a date is just text to us"), so a header
    # value like this is valid; hidden or marked public, the view must still be JSON.
    shown = middleware_of("""
        stamp:
          type: headers
          response: {set: {X-Release: 2024-01-31, X-Built: !public 2024-01-31T10:20:30Z}}
    """)
    assert shown["stamp"]["response"]["set"] == {
        "X-Release": REDACTED,
        "X-Built": "2024-01-31T10:20:30Z",
    }


def test_the_bundled_routes_yaml_is_shown() -> None:
    path = Path(__file__).parents[3] / "routes.yaml"
    shown = view(path.read_text(), env={})["config"]
    assert shown["admin"] == {"bind": "${GATEHOUSE_ADMIN_BIND:-127.0.0.1:9901}"}
    assert shown["upstreams"]["echo"]["endpoints"] == ["http://127.0.0.1:${ECHO_PORT:-8001}"]
    assert REDACTED not in json.dumps(shown)


# --- redact() itself ----------------------------------------------------------------------


def test_redact_reaches_into_nested_lists_and_mappings() -> None:
    value = {
        "a": [{"token": ["t1", {"deep": ["t2", 3, None, True]}]}, {"plain": [["x"]]}],
        "b": {"nested": {"password": [[{"x": "p1"}], "p2"]}},
        "API_KEY": 42,
        "monkey": "not a secret: 'key' is a word of its own",
        "Keys": "${K}",
    }
    assert redact(value) == {
        "a": [
            {"token": [REDACTED, {"deep": [REDACTED, REDACTED, REDACTED, REDACTED]}]},
            {"plain": [["x"]]},
        ],
        "b": {"nested": {"password": [[{"x": REDACTED}], REDACTED]}},
        "API_KEY": REDACTED,
        "monkey": "not a secret: 'key' is a word of its own",
        "Keys": "${K}",
    }


def test_redact_hides_the_userinfo_and_query_values_of_urls() -> None:
    urls = {
        "redis://u:pw@h:6379/0?x=1": f"redis://{REDACTED}:{REDACTED}@h:6379/0?x={REDACTED}",
        "redis://:p%40ss@h": f"redis://:{REDACTED}@h",
        "https://ghp-token@h/repo.git": f"https://{REDACTED}@h/repo.git",
        "redis://u:@h": f"redis://{REDACTED}:@h",
        "https://h/path/a:b@c?d=e:f@g#h:i@j": f"https://h/path/a:b@c?d={REDACTED}#h:i@j",
        "https://h/?bare-secret&empty=&a=${A}": f"https://h/?{REDACTED}&empty=&a=${{A}}",
        "https://h/?": "https://h/?",
        "http://h:8080": "http://h:8080",
        "not a url: a:b@c://": "not a url: a:b@c://",
    }
    assert redact(list(urls)) == list(urls.values())


def test_redact_leaves_its_input_alone() -> None:
    value = {"secret": "s", "list": [{"password": "p"}]}
    before = json.dumps(value)
    redact(value)
    assert json.dumps(value) == before
