"""The key tables of routes.yaml's own sections: every key the loader accepts, with its
type, default and meaning (proxy/config/spec.py says what an `Option` is). Those of an
`upstreams` entry are in proxy/config/upstream_keys.py.

The section readers (`server.py`, `upstream.py`, `routes.py`, `load.py`) take the keys
they accept, and those they require, from these tables, so that a key cannot be read
without being listed here; `gatehouse schema` prints the tables as a JSON Schema, with
each middleware's options from its own `OPTIONS` (proxy/tools/schema.py).
tests/proxy/tools/test_schema.py checks what the readers accept against the tables, and
their defaults against the ones the readers use.
"""

from __future__ import annotations

from proxy.config.model import (
    ACME_CHALLENGES,
    CLIENT_AUTH_MODES,
    CLIENT_IP_SOURCES,
    DEFAULT_ACME_RENEW_BEFORE_S,
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_GRACE_PERIOD_S,
    DEFAULT_H2_INITIAL_WINDOW_BYTES,
    DEFAULT_H2_MAX_CONCURRENT_STREAMS,
    DEFAULT_H2_MAX_CONTROL_FRAMES_PER_SECOND,
    DEFAULT_H2_MAX_RESETS_PER_SECOND,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_KEEPALIVE_TIMEOUT_S,
    DEFAULT_MAX_HEAD_BYTES,
    DEFAULT_MIRROR_MAX_BODY,
    DEFAULT_MIRROR_MAX_IN_FLIGHT,
    DEFAULT_MIRROR_TIMEOUT_S,
    DEFAULT_RELOAD_WATCH_INTERVAL_S,
    DEFAULT_REQUEST_BUFFER_BYTES,
    ESCAPED_SLASH_ACTIONS,
    LOG_FORMATS,
    REDIRECT_STATUSES,
    UNDERSCORE_ACTIONS,
)
from proxy.config.spec import (
    KeyTable,
    any_of,
    boolean,
    choice,
    duration,
    integer,
    list_of,
    mapping,
    named,
    nullable,
    number,
    raw,
    size,
    string,
    string_map,
    strings,
    text,
)
from proxy.config.upstream_keys import UPSTREAM
from proxy.config.values import format_size

HTTP1_PARSERS = ("auto", "httptools", "h11")
TLS_VERSIONS = ("1.2", "1.3")
MAX_H2_WINDOW = 2**31 - 1  # RFC 9113 section 6.9.1
MAX_H2_SETTING = 2**32 - 1  # RFC 9113 section 6.5.1: SETTINGS values are 32-bit

# Where the middleware go: proxy/tools/schema.py defines these from the registry.
MIDDLEWARE_ENTRY_REF = "#/$defs/middleware"
MIDDLEWARE_CHAIN_REF = "#/$defs/middleware_chain"

_BIND = "the address to listen on: host:port, [ipv6]:port or :port (all IPv4 interfaces)"

# --- the server's own sections (proxy/config/server.py) ---

TLS_CERTIFICATE: KeyTable = {
    "cert": string("PEM certificate chain, leaf first", required=True),
    "key": string("PEM private key, not passphrase-protected", required=True),
}

ACME: KeyTable = {
    "directory": string(
        "the ACME server's directory URL, https:// (Let's Encrypt:"
        " https://acme-v02.api.letsencrypt.org/directory)",
        required=True,
    ),
    "domains": strings(
        "the DNS names to obtain certificates for, one certificate each", required=True
    ),
    "storage": string(
        "the directory that keeps the account key and the certificates (a volume in a"
        " container); a restart reuses them",
        required=True,
    ),
    "email": string("the account's contact address, for the CA's notices"),
    "challenge": choice(
        ACME_CHALLENGES,
        "how the names are proved: http-01 (port 80, a plaintext listener) or tls-alpn-01"
        " (this listener, port 443)",
        ACME_CHALLENGES[0],
    ),
    "ca": string(
        "a PEM bundle that verifies the directory's HTTPS (a private or test ACME server);"
        " default: the system's roots"
    ),
    "renew_before": duration(
        "renew this long before expiry (at most a third of the certificate's lifetime)",
        DEFAULT_ACME_RENEW_BEFORE_S,
        positive=True,
    ),
}

CLIENT_AUTH: KeyTable = {
    "ca": string("PEM bundle of the CAs client certificates must chain to", required=True),
    "mode": choice(
        CLIENT_AUTH_MODES,
        "require: no valid certificate, no handshake; optional: a client may send none,"
        " but one it sends must verify",
        CLIENT_AUTH_MODES[0],
    ),
}

LISTENER_TLS: KeyTable = {
    "certificates": list_of(
        mapping(TLS_CERTIFICATE, "one certificate and its key"),
        "the certificates served, each for the names of its subjectAltName (chosen by"
        " SNI; exact names before *.wildcards); the first also for clients that send no"
        " name or an unknown one",
        min_items=1,
    ),
    "cert": string("PEM certificate chain, leaf first (one certificate: instead of certificates)"),
    "key": string("PEM private key of cert, not passphrase-protected"),
    "min_version": raw(
        "the oldest TLS version accepted",
        {"enum": [*TLS_VERSIONS, *(float(version) for version in TLS_VERSIONS)]},
        TLS_VERSIONS[0],
    ),
    "client_auth": mapping(CLIENT_AUTH, "ask clients for a certificate (mutual TLS)"),
    "acme": mapping(
        ACME, "obtain and renew certificates from an ACME server (Let's Encrypt), RFC 8555"
    ),
}

HTTPS_REDIRECT: KeyTable = {
    "port": integer("the HTTPS port redirected to (left out of the URL when 443)", 443, 1, 65535),
    "status": raw("the redirect's status", {"enum": [301, 302, 307, 308]}, 308),
}

LISTENER: KeyTable = {
    "bind": string(_BIND, required=True),
    "name": string("the listener's name in logs and metrics (default listeners[N])"),
    "tls": mapping(LISTENER_TLS, "serve TLS on this listener (ALPN offers h2 and http/1.1)"),
    "http2": boolean("false: HTTP/1.1 only on this listener", True),
    "proxy_protocol": boolean(
        "every connection begins with a PROXY protocol header (v1 or v2) from a load"
        " balancer; needs client_ip",
        False,
    ),
    "redirect_https": any_of(
        "a plaintext listener: answer every request but ACME challenges with a redirect to"
        " HTTPS (true: port 443, status 308; default off)",
        boolean("on or off"),
        mapping(HTTPS_REDIRECT, "on, to this port, with this status"),
    ),
}

CLIENT_IP: KeyTable = {
    "trusted_proxies": strings(
        "addresses or CIDR ranges of the proxies whose word about the client is believed",
        required=True,
    ),
    "source": choice(
        CLIENT_IP_SOURCES, "where a trusted proxy tells the client's address", CLIENT_IP_SOURCES[0]
    ),
}

ADMIN: KeyTable = {
    "bind": string(
        "the admin listener's address (/metrics /healthz /readyz /config)", required=True
    ),
    "token": string(
        "bearer token required for all but /healthz and /readyz; 16+ characters"
        " (openssl rand -hex 32)"
    ),
    "hosts": list_of(
        string("a host name"),
        "Host names accepted besides IP literals, localhost and bind's own name",
    ),
}

LIMITS: KeyTable = {
    "max_head_bytes": size(
        "request line and headers (and, apart, a chunked request's trailers); larger: 431",
        DEFAULT_MAX_HEAD_BYTES,
        positive=True,
    ),
    "max_body_size": nullable(size("request body; larger: 413 (default unlimited)", None)),
    "header_timeout": duration(
        "the head not complete in time: 408", DEFAULT_HEADER_TIMEOUT_S, positive=True
    ),
    "body_timeout": duration(
        "idle gap between request body chunks: 408; also a client that stops reading the"
        " response is dropped after it",
        DEFAULT_BODY_TIMEOUT_S,
        positive=True,
    ),
    "keepalive_timeout": duration(
        "idle keep-alive connections are closed after this", DEFAULT_KEEPALIVE_TIMEOUT_S
    ),
}

HTTP2: KeyTable = {
    "max_concurrent_streams": integer(
        "SETTINGS_MAX_CONCURRENT_STREAMS; more streams are refused (REFUSED_STREAM)",
        DEFAULT_H2_MAX_CONCURRENT_STREAMS,
        minimum=1,
        maximum=MAX_H2_SETTING,
    ),
    "max_header_list_size": size(
        f"decoded request headers; larger: 431 on the stream (at most {MAX_H2_SETTING} bytes)",
        DEFAULT_MAX_HEAD_BYTES,
        positive=True,
    ),
    "initial_window_size": size(
        f"each stream's receive window (at most {MAX_H2_WINDOW} bytes)",
        DEFAULT_H2_INITIAL_WINDOW_BYTES,
        positive=True,
    ),
    "max_resets_per_second": integer(
        "stream resets a client may cause per second before GOAWAY (rapid reset)",
        DEFAULT_H2_MAX_RESETS_PER_SECOND,
        minimum=1,
    ),
    "max_control_frames_per_second": integer(
        "PING, SETTINGS and other control frames a client may send per second before GOAWAY",
        DEFAULT_H2_MAX_CONTROL_FRAMES_PER_SECOND,
        minimum=1,
    ),
}

SHUTDOWN: KeyTable = {
    "grace_period": duration(
        "how long in-flight requests get to finish on SIGTERM", DEFAULT_GRACE_PERIOD_S
    ),
}

RELOAD: KeyTable = {
    "watch": boolean("reload when the file changes", True),
    "interval": duration(
        "how often the file is polled", DEFAULT_RELOAD_WATCH_INTERVAL_S, positive=True
    ),
}

METRICS: KeyTable = {
    "enabled": boolean("false: no per-request counting on the data path", True),
}

LOGGING: KeyTable = {
    "format": choice(
        LOG_FORMATS,
        "process logs as text lines or one JSON object a line (the --log-format flag wins)",
        LOG_FORMATS[0],
    ),
}

TRACING: KeyTable = {
    "otlp_endpoint": string(
        "the OpenTelemetry collector's base URL, as OTEL_EXPORTER_OTLP_ENDPOINT: spans go to"
        " its /v1/traces over OTLP/HTTP (default none: trace context is propagated, no spans)"
    ),
    "sample_ratio": raw(
        "the share of traces starting here that are recorded, 0 to 1",
        {"type": "number", "minimum": 0, "maximum": 1},
        1.0,
    ),
    "parent_based": boolean(
        "follow the sampled flag of the caller's traceparent when there is one", True
    ),
    "service_name": string("the service.name of the gateway's spans", "gatehouse"),
    "headers": raw(
        "fields sent with every export (a collector's credentials; hidden from /config)",
        {"type": "object", "additionalProperties": {"type": "string"}},
    ),
}

PATH_NORMALIZATION: KeyTable = {
    "escaped_slashes": choice(
        ESCAPED_SLASH_ACTIONS,
        "%2F, %5C and a raw backslash: reject (400), unescape, or keep them encoded",
        ESCAPED_SLASH_ACTIONS[0],
    ),
    "merge_slashes": boolean('"//" in a path is "/"', True),
}

# --- routes (proxy/config/routes.py) ---

MATCH_VALUE: KeyTable = {
    "value": text("an exact value"),
    "regex": string("a regular expression the whole value must match"),
    "present": raw("the field or parameter is present, with any value", {"const": True}),
}

_MATCH_VALUES = named(
    any_of(
        "an exact value, or exactly one of value, regex, present",
        text("an exact value"),
        raw(
            "one of value, regex, present",
            {**mapping(MATCH_VALUE, "").schema, "minProperties": 1, "maxProperties": 1},
        ),
    ),
    "",
)

MATCH: KeyTable = {
    "host": string("exact (api.example.com), a wildcard (*.example.com) or * (any)"),
    "path": string("an exact path, in canonical form"),
    "path_prefix": string("a path prefix, in canonical form (/users also matches /users-x)"),
    "path_regex": string("a regular expression the whole path must match; named groups are"
                         " the route's parameters"),
    "methods": list_of(string("a method"), "methods matched exactly (HEAD is not GET)", 1),
    "headers": raw("header fields to match, by name", dict(_MATCH_VALUES.schema)),
    "query": raw("query parameters to match, by name", dict(_MATCH_VALUES.schema)),
}  # fmt: skip

REWRITE: KeyTable = {
    "strip_prefix": string("removed from the path at a segment boundary"),
    "add_prefix": string("then put in front of the path"),
    "regex": string("applied first: re.sub of the first match (needs replacement)"),
    "replacement": string("the replacement of regex; \\1 and named groups work"),
    "host": string("replaces the Host header (kept as the client sent it by default)"),
}

WEBSOCKET: KeyTable = {
    "enabled": boolean("whether WebSocket upgrades are allowed", True),
    "idle_timeout": nullable(
        duration("no byte either way for this long: closed with 1001 (default off)", None, True)
    ),
    "max_duration": nullable(
        duration("open this long: closed with 1001 (default off)", None, positive=True)
    ),
}

REQUEST_BUFFERING: KeyTable = {
    "max_size": size(
        "request bodies up to this size are read before an upstream connection is taken",
        DEFAULT_REQUEST_BUFFER_BYTES,
        positive=True,
        required=True,
    ),
}

_CHAIN_DESCRIPTION = "names of middleware entries, or inline {type: ...} entries"

# --- weighted splits and mirrors (proxy/config/traffic.py, docs/traffic.md) ---

SPLIT_SIDE: KeyTable = {
    "upstream": string("the upstream of this side", required=True),
    "weight": integer("this side's share of the sum of the weights", required=True),
}

SPLIT_STICKY: KeyTable = {
    "cookie": string("a request with this cookie goes to the side its value hashes to"),
    "header": string("a request with this header goes to the side its value hashes to"),
}

SPLIT: KeyTable = {
    "split": list_of(mapping(SPLIT_SIDE, "a side"), "the sides and their weights", 1,
                     required=True),
    "sticky": raw(
        "keep a user on one side: {cookie: NAME} or {header: NAME} (default off)",
        {**mapping(SPLIT_STICKY, "").schema, "minProperties": 1, "maxProperties": 1},
    ),
}  # fmt: skip

MIRROR: KeyTable = {
    "upstream": string("the shadow upstream the copies go to", required=True),
    "percent": number("the share of the route's forwarded requests copied", 100),
    "max_body": size("a request whose body is larger is not copied", DEFAULT_MIRROR_MAX_BODY),
    "max_in_flight": integer(
        "copies awaiting the shadow at once (per worker); more are dropped",
        DEFAULT_MIRROR_MAX_IN_FLIGHT,
        1,
    ),
    "timeout": duration(
        "the whole copy's exchange, to the end of the shadow's answer",
        DEFAULT_MIRROR_TIMEOUT_S,
        positive=True,
    ),
}

REDIRECT: KeyTable = {
    "to": string(
        "the Location, a template: {scheme} {host} {port} {path} {query} {uri} and the"
        " route's path_regex groups; {{ and }} for braces",
        required=True,
    ),
    "status": raw("the redirect's status", {"enum": list(REDIRECT_STATUSES)}, 302),
}

RESPOND: KeyTable = {
    "status": integer("the answer's status", 200, 200, 599),
    "body": string("the answer's body (text/plain unless headers give a Content-Type)", ""),
    "headers": string_map("header fields of the answer"),
}

ROUTE: KeyTable = {
    "name": string("the route's label in logs and metrics (default: derived from the match)"),
    "match": mapping(MATCH, "what requests the route takes", required=True),
    "upstream": any_of(
        "the upstream requests go to (or give redirect or respond)",
        string("an upstream's name"),
        mapping(SPLIT, "a weighted split between upstreams"),
    ),
    "mirror": mapping(MIRROR, "copy requests to a shadow upstream (default none)"),
    "redirect": mapping(REDIRECT, "answer with a redirect instead of forwarding"),
    "respond": mapping(RESPOND, "answer with a fixed response instead of forwarding"),
    "middleware": raw(f"the route's chain: {_CHAIN_DESCRIPTION}", {"$ref": MIDDLEWARE_CHAIN_REF}),
    "rewrite": mapping(REWRITE, "how the path and Host are rewritten"),
    "max_body_size": nullable(size("overrides limits.max_body_size for this route", None)),
    "websocket": any_of(
        "WebSocket upgrades: true, false, or their deadlines (default true with an http1 upstream)",
        boolean("on or off"),
        mapping(WEBSOCKET, "on, with deadlines"),
    ),
    "forward_raw_path": boolean(
        "forward the client's own spelling of the path (routing uses the canonical one)", False
    ),
    "request_buffering": any_of(
        "read bodies up to max_size before taking a connection; false: stream at once",
        boolean("on (1MiB) or off"),
        mapping(REQUEST_BUFFERING, "on, up to max_size"),
        default={"max_size": format_size(DEFAULT_REQUEST_BUFFER_BYTES)},
    ),
}

# --- the top level (proxy/config/load.py) ---

TOP: KeyTable = {
    "listeners": list_of(
        mapping(LISTENER, "a listener"), "the client-facing sockets", 1, required=True
    ),
    "admin": mapping(ADMIN, "the admin listener (default none)"),
    "upstreams": named(mapping(UPSTREAM, "an upstream"), "upstreams by name", required=True),
    "middleware": named(
        raw("a middleware entry", {"$ref": MIDDLEWARE_ENTRY_REF}),
        "named, reusable middleware entries: {type: ..., options}",
    ),
    "global_middleware": raw(
        f"the chain every request runs first: {_CHAIN_DESCRIPTION}", {"$ref": MIDDLEWARE_CHAIN_REF}
    ),
    "routes": list_of(
        mapping(ROUTE, "a route"), "the routes; the most specific match wins", required=True
    ),
    "limits": mapping(LIMITS, "the client connections' size and time limits"),
    "http2": mapping(HTTP2, "the HTTP/2 front end, per connection"),
    "http1_parser": choice(HTTP1_PARSERS, "auto: httptools, else h11", HTTP1_PARSERS[0]),
    "workers": nullable(
        integer("worker processes; default one per usable CPU (restart to change)", None, 1)
    ),
    "shutdown": mapping(SHUTDOWN, "graceful shutdown"),
    "reload": mapping(RELOAD, "reloading when the file changes"),
    "metrics": mapping(METRICS, "per-request metrics"),
    "path_normalization": mapping(PATH_NORMALIZATION, "the canonical path requests are routed on"),
    "headers_with_underscores": choice(
        UNDERSCORE_ACTIONS, "client header fields named with '_'", UNDERSCORE_ACTIONS[0]
    ),
    "client_ip": mapping(CLIENT_IP, "the load balancers in front, and what they tell"),
    "logging": mapping(LOGGING, "process logs (restart to change)"),
    "tracing": mapping(TRACING, "W3C trace propagation and OpenTelemetry spans"),
}
