"""proxy.config_view: what the admin listener's /config shows. Every file here is a valid
routes.yaml (checked with parse_config first, since only a running config is shown) and
the view is read back through JSON, as a client of /config gets it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from textwrap import dedent
from typing import Any

import yaml

from proxy.config import parse_config
from proxy.config_view import REDACTED, config_view, redact
from tests.tls import TlsFiles

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


def view(text: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The /config document for `text`, after checking that `text` is a valid config."""
    text = dedent(text)
    parse_config(text, source=SOURCE, env=ENV if env is None else env)
    shown: dict[str, Any] = json.loads(json.dumps(config_view(text, SOURCE), allow_nan=False))
    return shown


def middleware_of(text: str) -> dict[str, Any]:
    """The view of `HEAD` + a `middleware:` section + a route using every instance."""
    names = list(yaml.safe_load(dedent(text)))
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


def test_credentials_a_route_sends_in_headers_are_redacted() -> None:
    shown = middleware_of("""
        inject:
          type: headers
          request:
            set:
              Authorization: "Bearer upstream-token-1"
              X-API-Key: upstream-api-key-2
              Proxy-Authorization: "Basic cHJveHk6cGFzcw=="
              X-Auth-Token: upstream-token-3
              Cookie: "session=upstream-cookie-4"
              X-Env: prod
            remove: [Authorization, X-API-Key]
          response:
            set: {Set-Cookie: "sid=response-cookie-5", X-Served-By: gatehouse}
    """)
    request = shown["inject"]["request"]
    assert request["set"] == {
        "Authorization": REDACTED,
        "X-API-Key": REDACTED,
        "Proxy-Authorization": REDACTED,
        "X-Auth-Token": REDACTED,
        "Cookie": REDACTED,
        "X-Env": "prod",
    }
    assert request["remove"] == ["Authorization", "X-API-Key"]  # names, not values
    assert shown["inject"]["response"]["set"] == {
        "Set-Cookie": REDACTED,
        "X-Served-By": "gatehouse",
    }


def test_a_route_matching_on_a_secret_header_value_hides_it() -> None:
    shown = view(
        HEAD
        + "routes:\n  - name: internal\n    upstream: app\n"
        + "    match: {path_prefix: /, headers: {X-Internal-Token: s3cr3t-match, X-Env: prod}}\n"
    )
    match = shown["config"]["routes"][0]["match"]
    assert match["headers"] == {"X-Internal-Token": REDACTED, "X-Env": "prod"}


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


def test_the_redis_password_in_a_url_is_redacted() -> None:
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
        "url": f"redis://gatehouse:{REDACTED}@redis.internal:6379/0",
        "timeout": "50ms",
    }
    assert shown["anonymous"]["redis"]["url"] == f"rediss://:{REDACTED}@redis.internal:6380/1"
    assert shown["by-env"]["redis"]["url"] == "redis://:${REDIS_PASSWORD}@redis.internal:6379/0"
    assert shown["by-env-or-default"]["redis"]["url"] == (
        "redis://:${REDIS_PASSWORD:-" + REDACTED + "}@redis.internal:6379/0"
    )


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
            match: {host: api.example.com, path_prefix: /v1, methods: [GET, POST],
                    query: {debug: "1"}}
            upstream: app
            rewrite: {strip_prefix: /v1, regex: "^/old/(.*)$", replacement: "/new/\\\\1"}
            max_body_size: 1MiB
    """
    assert view(text)["config"] == yaml.safe_load(dedent(text))


def test_dates_in_the_file_are_shown_as_the_text_written() -> None:
    # The config reader takes a date for text ("a date is just text to us"), so a header
    # value like this is valid; the view must still be JSON.
    shown = middleware_of("""
        stamp:
          type: headers
          response: {set: {X-Release: 2024-01-31, X-Built: 2024-01-31T10:20:30Z}}
    """)
    assert shown["stamp"]["response"]["set"] == {
        "X-Release": "2024-01-31",
        "X-Built": "2024-01-31T10:20:30Z",
    }


def test_the_bundled_routes_yaml_is_shown() -> None:
    path = Path(__file__).parents[2] / "routes.yaml"
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


def test_redact_hides_only_the_password_of_a_urls_userinfo() -> None:
    urls = {
        "redis://u:pw@h:6379/0?x=1": f"redis://u:{REDACTED}@h:6379/0?x=1",
        "redis://:p%40ss@h": f"redis://:{REDACTED}@h",
        "redis://only-a-user@h/0": "redis://only-a-user@h/0",
        "https://h/path/a:b@c?d=e:f@g#h:i@j": "https://h/path/a:b@c?d=e:f@g#h:i@j",
        "http://h:8080": "http://h:8080",
        "not a url: a:b@c://": "not a url: a:b@c://",
    }
    assert redact(list(urls)) == list(urls.values())


def test_redact_leaves_its_input_alone() -> None:
    value = {"secret": "s", "list": [{"password": "p"}]}
    before = json.dumps(value)
    redact(value)
    assert json.dumps(value) == before
